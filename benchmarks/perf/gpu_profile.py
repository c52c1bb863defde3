"""Where the time goes on a GPU (issue 14): ``torch.profiler`` over a few training steps and sampling forwards.

    python -m benchmarks.perf.gpu_profile --out DIR [--budget SECONDS] [--rows ...]   # on CUDA (default)
    python -m benchmarks.perf.gpu_profile --out DIR --tiny --device cpu                # the smoke test

Rows (:data:`TRAIN_ROWS`, :data:`SAMPLING_ROWS`): an SD 1.5 512 px batch 4 fp16 training step (the training
scripts' recipe, as ``train_step.py``) of the floor, peft LoRA matched to Res-Attn, res_attn, glora, surm_ldr and
surm_circulant; an eager ``no_grad`` UNet forward at batch 2 of the base and of Res-Attn unfused (run in
:data:`DEFAULT_ORDER`, so the time guard drops the last ones). Per row, written
to ``DIR/profile.json`` after every row (a killed run keeps the rows it finished) and ``DIR/profile.md``:

* the top :data:`TOP_KERNELS` CUDA kernels by self time per step (on CPU: the top ops by self CPU time);
* the step's time split -- ``frozen`` / ``branch`` / ``fold`` / ``optimizer`` -- in kernel time (CPU: op time).
  ``branch`` is what runs inside a tuner module's forward (ours; peft's ``lora_A``/``lora_B``), ``fold`` the
  deltas our merged-GEMM path forms from the parameters (:meth:`LinearTuner.fold` while profiling), and each
  backward op goes where the forward op that recorded its autograd node went (the profiler's sequence numbers).
  The merged GEMM itself is ``frozen``: it is the frozen projection's GEMM, with the delta added to its weight;
* the wall time of a call (timed without the profiler, whose overhead slows the launching side; also with it)
  beside its kernel time: a call whose wall time is far above its kernel time is bound by the CPU launching
  kernels, not by the GPU;
* the bytes saved for backward by each tuner module, the folds and the frozen model
  (``torch.autograd.graph.saved_tensors_hooks`` over one step; each storage counted once, parameters not at all),
  and the allocator's peak of the step.

The ranges that attribute time are opened by forward hooks and wrappers this script installs for the profiled
steps only and removes afterwards: the library carries no profiling code, so it costs nothing when not profiling.
``--budget`` is a time guard: no row starts after it (minus a margin for the last writes).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, record_function

from resattn_diffusion.tuners.base import LinearTuner, OperationTuner
from resattn_diffusion.tuners.fast_paths import forced_paths

from . import sampling, train_step
from .common import (
    benchmark_inputs,
    clone_unet,
    describe_error,
    free_device_memory,
    frozen_unet,
    log,
    machine_info,
    markdown_table,
    peak_memory_bytes,
    synchronize,
    write_json,
)
from .gpu_suite import GUARD_MARGIN_S, part_size

TRAIN_ROWS = (train_step.FLOOR, "res_attn", train_step.PEFT_LORA, "surm_ldr", "surm_circulant", "glora")
SAMPLING_ROWS = (sampling.BASE, "res_attn (unfused)")
#: Kernels (ops on CPU) listed per row.
TOP_KERNELS = 15
#: (warm-up, profiled) calls per row on a GPU: a training step of SD 1.5 takes ~0.1-0.3 s, a forward ~0.03 s; what
#: costs is the profiler's post-processing of every op and kernel, so one profiled training step.
GPU_CALLS = {"train": (2, 1), "sampling": (3, 3)}
#: Calls timed without the profiler (at least), for the wall time per call.
UNPROFILED_CALLS = 2
#: The order rows run in (the time guard skips the last ones first): the headline tuner and its baselines first.
DEFAULT_ORDER = (
    train_step.FLOOR,
    "res_attn",
    sampling.BASE,
    "res_attn (unfused)",
    train_step.PEFT_LORA,
    "surm_ldr",
    "surm_circulant",
    "glora",
)
#: Range-name prefix of the attribution ranges (``res::<category>::<module>``).
RANGE_PREFIX = "res::"
CATEGORIES = ("frozen", "branch", "fold", "optimizer")
#: Modules of peft's LoRA layers that compute its branch (the base layer inside the wrapper stays frozen).
PEFT_BRANCH_MODULES = ("lora_A", "lora_B", "lora_dropout")
#: The backward op of an autograd node: its sequence number is the forward op's that recorded the node.
BACKWARD_PREFIX = "autograd::engine::evaluate_function:"


# --- attribution -----------------------------------------------------------------------------------------------


def branch_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> module for every module whose forward is a tuner branch: our tuners (the outermost
    :class:`OperationTuner` / :class:`LinearTuner`) and peft LoRA's ``lora_A`` / ``lora_B`` / ``lora_dropout``."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if any(name.startswith(outer + ".") for outer in found):
            continue  # inside a tuner already found: the outer range covers it
        is_peft_branch = any(f".{part}." in f".{name}." for part in PEFT_BRANCH_MODULES)
        if isinstance(module, (OperationTuner, LinearTuner)) or (is_peft_branch and not list(module.children())):
            found[name] = module
    return found


class Attribution:
    """While active: each branch module's forward runs inside ``record_function("res::branch::<name>")`` and each
    :meth:`LinearTuner.fold` inside ``res::fold::<class>``, and ``current`` names the innermost of them (or
    ``"frozen"``) for the saved-tensor count. Installs hooks and class wrappers on entry, removes them on exit."""

    def __init__(self, model: nn.Module, ranges: bool = True):
        self.model = model
        self.ranges = ranges
        self.stack: list[str] = []
        self._handles: list[Any] = []
        self._open: list[Any] = []
        self._patched: list[tuple[type, Callable]] = []

    @property
    def current(self) -> str:
        return self.stack[-1] if self.stack else "frozen"

    def _enter(self, label: str) -> None:
        self.stack.append(label)
        if self.ranges:
            scope = record_function(RANGE_PREFIX + label)
            scope.__enter__()
            self._open.append(scope)

    def _exit(self) -> None:
        self.stack.pop()
        if self.ranges:
            self._open.pop().__exit__(None, None, None)

    def __enter__(self) -> Attribution:
        for name, module in branch_modules(self.model).items():
            label = f"branch::{name}"
            self._handles.append(module.register_forward_pre_hook(lambda *_, label=label: self._enter(label)))
            self._handles.append(module.register_forward_hook(lambda *_: self._exit()))
        # The class that defines each tuner's fold (SURM's families inherit SURMLinear's), wrapped once.
        owners = {
            next(k for k in type(m).__mro__ if "fold" in k.__dict__)
            for m in self.model.modules()
            if isinstance(m, LinearTuner)
        }
        for owner in owners:
            original = owner.__dict__["fold"]
            self._patched.append((owner, original))
            owner.fold = self._wrap_fold(original, f"fold::{owner.__name__}")
        return self

    def _wrap_fold(self, original: Callable, label: str) -> Callable:
        def fold(tuner, *args, **kwargs):
            self._enter(label)
            try:
                return original(tuner, *args, **kwargs)
            finally:
                self._exit()

        return fold

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        for cls, original in self._patched:
            cls.fold = original
        self._handles, self._patched = [], []
        while self.stack:  # an exception inside a branch left its range open
            self._exit()


def category_of(label: str) -> str:
    return label.split("::", 1)[0]


def classify_events(events: list[Any]) -> list[tuple[Any, str]]:
    """``(event, category)`` for every CPU event of a profile (:data:`CATEGORIES`): the category of the innermost
    ``res::`` or ``Optimizer.`` range around it; for a backward op (and what it calls), the category of the forward
    op whose sequence number and thread it carries; else ``frozen``."""
    by_id: dict[int, str] = {}
    forward_category: dict[tuple[int, int], str] = {}

    def own_category(event: Any) -> str | None:
        name = event.name
        if name.startswith(RANGE_PREFIX):
            return category_of(name[len(RANGE_PREFIX) :])
        if name.startswith("Optimizer."):
            return "optimizer"
        if name.startswith(BACKWARD_PREFIX):
            return forward_category.get((event.fwd_thread, event.sequence_nr), "frozen")
        return None

    def category(event: Any) -> str:
        chain = []
        found = None
        while event is not None and event.id not in by_id:
            found = own_category(event)
            chain.append(event)
            if found is not None:
                break
            event = event.cpu_parent
        if found is None:
            found = by_id[event.id] if event is not None else "frozen"
        for item in chain:
            by_id[item.id] = found
        return found

    cpu_events = [e for e in events if e.device_type == DeviceType.CPU]
    # Forward ops first, in time order, to learn which autograd nodes the branches and folds recorded ...
    ordered = sorted(cpu_events, key=lambda e: (e.name.startswith(BACKWARD_PREFIX), e.time_range.start))
    for event in ordered:
        where = category(event)
        if event.sequence_nr >= 0 and not event.name.startswith(BACKWARD_PREFIX):
            # Ops that create no node peek the same number as the next op that does: the last one (which created
            # the node) wins, so a frozen op right after a branch keeps its own backward.
            forward_category[(event.thread, event.sequence_nr)] = where
    by_id.clear()  # ... then everything again with that map complete (ops run inside a backward op included)
    return [(event, category(event)) for event in ordered]


def split_time(events: list[Any], on_device: bool) -> dict[str, float]:
    """Microseconds of the profiled calls per category (:data:`CATEGORIES`, on a GPU plus ``unattributed``: kernels
    no CPU op launched): each op's own time -- its kernels on a GPU, its self CPU time on CPU -- goes to its
    category (:func:`classify_events`)."""
    totals: dict[str, float] = defaultdict(float)
    for event, where in classify_events(events):
        totals[where] += sum(k.duration for k in event.kernels) if on_device else event.self_cpu_time_total
    if on_device:
        kernel_total = sum(e.time_range.end - e.time_range.start for e in events if e.device_type == DeviceType.CUDA)
        totals["unattributed"] = max(0.0, kernel_total - sum(totals.values()))
    return {name: totals.get(name, 0.0) for name in (*CATEGORIES, "unattributed") if on_device or name in CATEGORIES}


def top_kernels(averages: Any, on_device: bool, calls: int, count: int = TOP_KERNELS) -> list[dict[str, Any]]:
    """The ``count`` kernels (CPU: ops) with the most self time, per profiled call."""
    if on_device:
        items = [a for a in averages if a.device_type == DeviceType.CUDA] or list(averages)
        key = "self_device_time_total"
    else:
        items = [a for a in averages if not a.key.startswith(RANGE_PREFIX)]
        key = "self_cpu_time_total"
    items = sorted(items, key=lambda a: getattr(a, key), reverse=True)
    total = sum(getattr(a, key) for a in items) or 1.0
    return [
        {
            "name": a.key,
            "self_ms_per_call": getattr(a, key) / 1e3 / calls,
            "calls_per_call": a.count / calls,
            "share": getattr(a, key) / total,
        }
        for a in items[:count]
    ]


def saved_bytes(model: nn.Module, call: Callable[[], None]) -> dict[str, Any]:
    """Bytes saved for backward during ``call()``, by where they were saved: each branch module (and each fold) by
    name, and ``frozen`` for the rest. A storage is counted once, where it was first saved; the model's parameters
    and buffers (resident anyway) are not counted."""
    resident = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: set[int] = set()
    by_label: dict[str, int] = defaultdict(int)
    attribution = Attribution(model, ranges=False)

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in resident and pointer not in seen:
            seen.add(pointer)
            by_label[attribution.current] += storage.nbytes()
        return tensor

    with attribution, torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        call()
    totals: dict[str, int] = defaultdict(int)
    for label, count in by_label.items():
        totals[category_of(label)] += count
    modules = sorted(((label, count) for label, count in by_label.items() if label != "frozen"), key=lambda x: -x[1])
    return {
        "total_mb": sum(by_label.values()) / 2**20,
        "by_category_mb": {name: totals.get(name, 0) / 2**20 for name in ("frozen", "branch", "fold")},
        "modules": len(modules),
        "largest_modules_mb": {label: count / 2**20 for label, count in modules[:10]},
    }


# --- rows ------------------------------------------------------------------------------------------------------


def profile_call(
    model: nn.Module, call: Callable[[], None], device: str, warmup: int, calls: int, trainable: bool
) -> dict[str, Any]:
    """Warm up, time ``calls`` calls without the profiler (its own overhead slows the launching side), profile
    ``calls`` calls, then count the saved bytes and the peak memory of one more."""
    on_device = torch.device(device).type == "cuda"
    for _ in range(warmup):
        call()
    synchronize(device)
    unprofiled_calls = max(calls, UNPROFILED_CALLS)
    start = time.perf_counter()
    for _ in range(unprofiled_calls):
        call()
    synchronize(device)
    unprofiled = (time.perf_counter() - start) / unprofiled_calls
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    with Attribution(model), torch.profiler.profile(activities=activities) as profiler:
        start = time.perf_counter()
        for _ in range(calls):
            call()
        synchronize(device)
        wall = time.perf_counter() - start
    events = list(profiler.events())
    split = split_time(events, on_device)
    row: dict[str, Any] = {
        "calls_profiled": calls,
        "time_unit": "GPU kernel time" if on_device else "CPU op self time",
        "wall_ms_per_call": unprofiled * 1e3,
        "wall_ms_per_call_profiled": wall * 1e3 / calls,
        "split_ms_per_call": {name: value / 1e3 / calls for name, value in split.items()},
        "top_kernels": top_kernels(profiler.key_averages(), on_device, calls),
    }
    row["measured_ms_per_call"] = sum(row["split_ms_per_call"].values())
    if trainable:
        row["saved_for_backward"] = saved_bytes(model, call)
    row["peak_memory_mb"] = peak_memory_bytes(call, device) / 2**20
    return row


def _forcing(call: Callable[[], None], path: str) -> Callable[[], None]:
    def forced() -> None:
        with forced_paths(path):
            call()

    return forced


def _train_case(base: nn.Module, name: str) -> train_step.Case:
    """One row of ``train_step``'s cases (built the same way: same configs, same fp32 trainables)."""
    if name == train_step.FLOOR:
        return train_step.Case(name, "floor", "frozen UNet, backward to the latents", clone_unet(base))
    is_peer = name == train_step.PEFT_LORA
    cases = train_step.build_cases(base, [] if is_peer else [name], with_peers=is_peer, peer_rows=(name,))
    case = next((c for c in cases if c.name == name), None)
    if case is None:
        raise RuntimeError(f"{name}: not built (peft missing?)")
    if case.error:
        raise RuntimeError(case.error)
    return case


def run(
    out: Path,
    device: str = "cuda",
    tiny: bool = False,
    budget: float = 150.0,
    rows: list[str] | None = None,
    started_at: float | None = None,
    paths: str = "auto",
) -> dict[str, Any]:
    """Profile ``rows`` (default: :data:`DEFAULT_ORDER`, every row), writing ``out/profile.json`` and
    ``out/profile.md`` after each. ``paths``: ``"auto"`` (each tuner's automatic choice: the fast paths on CUDA) or
    ``"reference"`` / ``"fast"`` (:func:`~resattn_diffusion.tuners.fast_paths.forced_paths` around every call)."""
    start = time.perf_counter()
    already = 0.0 if started_at is None else max(0.0, time.time() - started_at)
    deadline = start + budget - already - GUARD_MARGIN_S
    wanted = list(rows) if rows is not None else list(DEFAULT_ORDER)
    unknown = sorted(set(wanted) - set(TRAIN_ROWS) - set(SAMPLING_ROWS))
    if unknown:
        raise SystemExit(f"--rows {unknown}: choose among {[*TRAIN_ROWS, *SAMPLING_ROWS]}")
    train_size = part_size("train_sd15", device, tiny)
    sample_size = part_size("sampling", device, tiny)
    result: dict[str, Any] = {
        "benchmark": "gpu_profile",
        "train_size": train_size.describe(),
        "sampling_size": sample_size.describe(),
        "machine": machine_info(),
        "budget_s": budget,
        "paths": paths,
        "rows": [],
    }

    def checkpoint() -> None:
        result["elapsed_s"] = time.perf_counter() - start
        write_json(out / "profile.json", result)
        (out / "profile.md").write_text(to_markdown(result) + "\n")

    checkpoint()  # the file exists from the start: a run killed in its first row still says what it was
    log(f"gpu_profile: building the {train_size.name} UNet ({device}, {train_size.dtype})")
    base = frozen_unet(train_size)
    for name in wanted:
        is_train = name in TRAIN_ROWS
        if time.perf_counter() > deadline:
            result["rows"].append({"name": name, "error": "skipped: time guard"})
            log(f"gpu_profile: {name} skipped (time guard)")
            continue
        log(f"gpu_profile: {name}")
        row: dict[str, Any] = {"name": name, "kind": "training step" if is_train else "sampling forward"}
        row_start = time.perf_counter()
        warmup, calls = (1, 1) if tiny else GPU_CALLS["train" if is_train else "sampling"]
        try:
            if is_train:
                case = _train_case(base, name)
                row["trainable_parameters"] = case.parameter_count
                inputs = benchmark_inputs(base, train_size)
                model = case.unet
                call = train_step.make_train_step(case, inputs, autocast=train_size.autocast)
            else:
                tuner = name.split(" (")[0]
                built = sampling.build_cases(base, [] if name == sampling.BASE else [tuner], False, ("unfused",))
                picked = next(c for c in built if c["name"] == name)
                if "error" in picked:
                    raise RuntimeError(picked["error"])
                model, inputs = picked["unet"], benchmark_inputs(base, sample_size)
                model.eval()

                def call(model=model, inputs=inputs) -> None:
                    with torch.no_grad():
                        model(**inputs, return_dict=False)

            if paths != "auto":
                call = _forcing(call, paths)
            row |= profile_call(model, call, device, warmup, calls, trainable=is_train)
        except Exception as error:  # a row that fails (out of memory, peft missing) is reported, not fatal
            row["error"] = describe_error(error)
            log(f"gpu_profile: {name} failed: {row['error']}")
        row["seconds"] = time.perf_counter() - row_start
        result["rows"].append(row)
        model = call = case = built = picked = None  # noqa: F841 - free this row's UNets before the next row
        free_device_memory(device)
        checkpoint()
    checkpoint()
    return result


# --- report ----------------------------------------------------------------------------------------------------


def to_markdown(result: dict[str, Any]) -> str:
    rows = result.get("rows", [])
    machine = result.get("machine", {})
    gpu = machine.get("gpu")
    where = f"{gpu['name']} (CUDA {gpu['cuda']})" if gpu else "CPU (no GPU)"
    unit = next((r["time_unit"] for r in rows if "time_unit" in r), "time")
    headers = [
        "row",
        "wall ms/call",
        f"{unit} ms/call",
        *[f"{c} ms" for c in CATEGORIES],
        "unattributed ms",
        "saved MB frozen / branch / fold",
        "peak MB",
    ]
    table = []
    for row in rows:
        if "error" in row and "split_ms_per_call" not in row:
            table.append([row["name"], f"error: {row['error'][:80]}"] + ["–"] * (len(headers) - 2))
            continue
        split = row["split_ms_per_call"]
        saved = row.get("saved_for_backward")
        saved_cell = (
            " / ".join(f"{saved['by_category_mb'][c]:.0f}" for c in ("frozen", "branch", "fold")) if saved else "–"
        )
        table.append(
            [
                f"{row['name']} ({row['kind']})",
                row["wall_ms_per_call"],
                row["measured_ms_per_call"],
                *[split.get(c) for c in CATEGORIES],
                split.get("unattributed", "–"),
                saved_cell,
                row.get("peak_memory_mb"),
            ]
        )
    parts = [
        f"# Where the time goes ({where})",
        "",
        f"Training: {_size_line(result.get('train_size'))}; sampling: {_size_line(result.get('sampling_size'))}. "
        f"Per call, over the profiled calls. `branch`: inside tuner modules (peft: lora_A/B); `fold`: forming the "
        "merged GEMM's delta; backward ops follow their forward op. Wall time: without the profiler; far above the "
        "kernel time, the call is bound by launching kernels, not by the GPU.",
        "",
        markdown_table(headers, table),
    ]
    for row in rows:
        if not row.get("top_kernels"):
            continue
        kernels = [
            [k["name"][:90], k["self_ms_per_call"], k["calls_per_call"], k["share"]] for k in row["top_kernels"]
        ]
        parts += [
            "",
            f"## {row['name']}: top {len(kernels)} by self time",
            "",
            markdown_table(["kernel / op", "self ms/call", "calls/call", "share"], kernels),
        ]
        saved = row.get("saved_for_backward")
        if saved and saved["largest_modules_mb"]:
            largest = ", ".join(f"`{k}` {v:.1f}" for k, v in list(saved["largest_modules_mb"].items())[:5])
            parts += ["", f"Saved for backward: {saved['total_mb']:.0f} MB; largest branch modules (MB): {largest}."]
    return "\n".join(parts)


def _size_line(size: dict[str, Any] | None) -> str:
    if not size:
        return "–"
    return f"{size['name']} {size['dtype']} batch {size['batch_size']} ({size['latent_size']}² latents)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for profile.json and profile.md")
    parser.add_argument("--budget", type=float, default=150.0, help="time guard in seconds")
    parser.add_argument("--device", default="cuda", help="'cuda' (default) or 'cpu' (with --tiny: the smoke test)")
    parser.add_argument("--tiny", action="store_true", help="the tiny UNet, one profiled call per row")
    parser.add_argument("--rows", nargs="*", default=None, help="only these rows (default: all)")
    parser.add_argument(
        "--paths",
        default="auto",
        choices=["auto", "reference", "fast"],
        help="force every tuner's path (default: auto)",
    )
    parser.add_argument("--started-at", type=float, default=None, help="epoch seconds the process was launched")
    args = parser.parse_args(argv)
    if args.device != "cpu" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from .run_all import _quiet_libraries

    _quiet_libraries()
    result = run(out, args.device, args.tiny, args.budget, args.rows, args.started_at, args.paths)
    print((out / "profile.md").read_text())
    failed = [row["name"] for row in result["rows"] if "error" in row]
    if failed:
        log(f"gpu_profile: rows with errors or skipped: {failed}")


if __name__ == "__main__":
    main()
