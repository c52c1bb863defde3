"""Sampling cost: one UNet forward under ``torch.no_grad`` with each tuner, as a ratio to the frozen UNet.

Rows: ``base`` (the frozen UNet), every registered tuner at its default size running as a branch
(``unfused``), and every tuner that folds into the weights (``res_lora``, ``glora``, ``surm_*``) after
``fuse_res_tuner`` (``fused``: the only cost left is the hooks). peft LoRA at Res-Attn's parameter count, unmerged
and merged (``fuse_lora``), is the reference a diffusers user knows. Ratios are medians of the per-round ratios
(:func:`~benchmarks.perf.common.paired_ratio`); a forward is cheap, so it runs twice as many rounds as ``--repeats``.

On a GPU (``--device cuda --size sd15 --dtype fp16``) the UNet and the tuners are in ``--dtype`` (as a pipeline
loaded in half precision has them), times are CUDA-synchronised, and :func:`run_compiled` also times a few rows
under ``torch.compile`` (inductor) against the compiled base; a row that fails is recorded, not fatal.

Run alone: ``python -m benchmarks.perf.sampling [--tiny] [--repeats N] [--threads N] [--device cuda --size sd15]
[--compiled]``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from resattn_diffusion import (
    ResTunerAttnProcessor,
    ResTunerConfig,
    add_res_tuner,
    fuse_res_tuner,
    get_res_tuner_configs,
    get_tuner_spec,
    res_tuner_parameters,
    tuner_names,
)

from . import peers
from .common import (
    RESULTS_DIR,
    BenchmarkSize,
    add_common_arguments,
    benchmark_inputs,
    clone_unet,
    configure_threads,
    default_clock,
    describe_error,
    free_device_memory,
    frozen_unet,
    interleaved_timings,
    log,
    machine_info,
    markdown_table,
    paired_ratio,
    paired_ratio_interval,
    ratio,
    size_from_args,
    synchronize,
    write_json,
)

BASE = "base"
#: Rounds per ``--repeats``.
SAMPLING_ROUNDS_PER_REPEAT = 2


def _forward(unet: nn.Module, inputs: dict[str, Any]) -> Callable[[], None]:
    unet.eval()

    def call() -> None:
        with torch.no_grad():
            unet(**inputs, return_dict=False)

    return call


def build_cases(
    base: nn.Module,
    tuners: list[str] | None = None,
    with_peers: bool = True,
    modes: tuple[str, ...] = ("unfused", "fused"),
) -> list[dict[str, Any]]:
    """Rows as dicts with ``name``, ``tuner``, ``mode`` and the ``unet`` to call (or an ``error``); ``modes``:
    which of the unfused / fused rows to build (fused only for the tuners that fold, and peft LoRA)."""
    cases: list[dict[str, Any]] = [{"name": BASE, "tuner": None, "mode": "frozen", "unet": clone_unet(base)}]
    for name in tuners if tuners is not None else tuner_names():
        folds = get_tuner_spec(name).kind == "linear"
        for mode in modes if folds else [m for m in modes if m == "unfused"]:
            row: dict[str, Any] = {"name": f"{name} ({mode})", "tuner": name, "mode": mode}
            try:
                unet = clone_unet(base)
                add_res_tuner(unet, ResTunerConfig(name))
                row["trainable_parameters"] = sum(p.numel() for p in res_tuner_parameters(unet))
                if mode == "fused":
                    fuse_res_tuner(unet)
                row["unet"] = unet
            except Exception as error:  # reported in the table, e.g. a tuner that cannot fuse on this UNet
                row["error"] = describe_error(error)
            cases.append(row)
    if with_peers and peers.peft_available():
        unet = clone_unet(base)
        add_res_tuner(unet, ResTunerConfig("res_attn"))
        rank = peers.matched_lora_rank(base, sum(p.numel() for p in res_tuner_parameters(unet)))
        del unet
        for mode in modes:
            row = {"name": f"peft_lora r{rank} ({mode})", "tuner": "peft_lora", "mode": mode}
            try:
                unet = clone_unet(base)
                peers.add_peft_lora(unet, rank)
                row["trainable_parameters"] = peers.lora_parameter_count(base, rank)
                if mode == "fused":
                    unet.fuse_lora(lora_scale=1.0)
                row["unet"] = unet
            except Exception as error:
                row["error"] = describe_error(error)
            cases.append(row)
    return cases


def run(
    size: BenchmarkSize,
    tuners: list[str] | None = None,
    with_peers: bool = True,
    clock: str | None = None,
    deadline: float | None = None,
    separate_branch_row: bool = False,
    one_head_row: bool = False,
) -> dict[str, Any]:
    """One no-grad forward of every case of :func:`build_cases` (and, with ``separate_branch_row``, of
    :data:`RES_ATTN_SEPARATE_BRANCH`; with ``one_head_row``, of :data:`RES_ATTN_ONE_HEAD`), interleaved; ratios
    paired per round against the base."""
    log(f"sampling: building cases on the {size.name} UNet ({size.device}, {size.dtype})")
    base = frozen_unet(size)
    inputs = benchmark_inputs(base, size)
    cases = build_cases(base, tuners, with_peers)
    if separate_branch_row:
        res_attn = [case for case in cases if case["name"] == "res_attn (unfused)"]
        cases += [_res_attn_variant(case, RES_ATTN_SEPARATE_BRANCH, extra_heads="off") for case in res_attn]
    if one_head_row:
        unet = clone_unet(base)
        add_res_tuner(unet, ResTunerConfig("res_attn", heads=1))
        cases.append(
            {
                "name": RES_ATTN_ONE_HEAD,
                "tuner": "res_attn",
                "mode": "unfused",
                "unet": unet,
                "trainable_parameters": sum(p.numel() for p in res_tuner_parameters(unet)),
                # read back from the attached tuner: the row says what it timed
                "hyperparameters": get_res_tuner_configs(unet)["default"].hyperparameters,
            }
        )
    del base
    calls = {case["name"]: _forward(case["unet"], inputs) for case in cases if "unet" in case}
    # A forward is a third of a training step: twice the rounds for the same time, and the fused rows' target
    # (within 2% of the base) needs them.
    rounds = SAMPLING_ROUNDS_PER_REPEAT * size.repeats
    log(f"sampling: timing {len(calls)} cases x {rounds} interleaved rounds")
    clock = clock or default_clock()
    errors: dict[str, str] = {}
    timings = interleaved_timings(
        calls,
        rounds,
        size.warmup,
        clock,
        progress=lambda m: log(f"sampling: {m}"),
        device=size.device,
        errors=errors,
        deadline=deadline,
    )
    base_timing = timings[BASE].as_dict() if BASE in timings else None
    rows = []
    for case in cases:
        timing = timings.get(case["name"])
        rows.append(
            {
                "name": case["name"],
                "tuner": case["tuner"],
                "mode": case["mode"],
                "trainable_parameters": case.get("trainable_parameters"),
                "hyperparameters": case.get("hyperparameters"),
                "error": case.get("error") or errors.get(case["name"]),
                "forward_s": None if timing is None else timing.median,
                "forward_spread": None if timing is None else timing.spread,
                "timing": None if timing is None else timing.as_dict(),
                "vs_base": None if timing is None else paired_ratio(timing.as_dict(), base_timing),
            }
        )
    return {
        "benchmark": "sampling",
        "clock": clock,
        "rounds": rounds,
        "size": size.describe(),
        "machine": machine_info(),
        "rows": rows,
    }


#: Rows timed under ``torch.compile`` on a GPU (each costs a cold inductor compile of the whole UNet, so a few):
#: the base, Res-Attn and peft LoRA as branches, and one tuner that folds (fused: the hooks are all that is left).
COMPILED_ROWS = (BASE, "res_attn (unfused)", "peft_lora (unfused)", "res_lora (fused)")
#: Res-Attn unfused with its branch kept as extra heads of the frozen attention while compiling
#: (``ResTunerAttnProcessor.extra_heads_compiled`` on its processors): asked for by name, never a default row.
RES_ATTN_EXTRA_HEADS_COMPILED = "res_attn (unfused) [extra heads]"
#: Res-Attn unfused with its branch beside the frozen attention (``extra_heads = "off"`` on its processors) where
#: the default on CUDA runs it as extra heads: at SDXL's 64-channel heads the extra heads are padded from 4 to 64
#: channels, so which is faster there is measured (``gpu_suite sampling_sdxl``).
RES_ATTN_SEPARATE_BRANCH = "res_attn (unfused) [separate branch]"
#: Res-Attn unfused with one head of the same rank (half the branch's attention work): what the default's second
#: head costs, beside the digits benchmark's ``res_attn-1head``, which measures what it learns (README, Performance).
RES_ATTN_ONE_HEAD = "res_attn (unfused) [heads=1]"


def run_compiled(
    size: BenchmarkSize,
    rows: tuple[str, ...] = COMPILED_ROWS,
    clock: str | None = None,
    deadline: float | None = None,
    checkpoint: Callable[[dict[str, Any]], None] | None = None,
    backend: str = "inductor",
) -> dict[str, Any]:
    """Eager and ``torch.compile``-d (``backend``, default inductor, default mode) ``no_grad`` forwards of ``rows``
    (names as in :data:`COMPILED_ROWS`; ``"peft_lora (unfused)"`` is peft LoRA at Res-Attn's parameter count),
    interleaved.

    Rows are compiled in the order given, with inductor's on-disk caches as configured (a fused row's graph equals
    the base's, so it may hit the cache: ``compile_s`` is the first call's time, not a cold compile; the CPU
    suite's ``compile_breaks`` times cold compiles). A row is skipped when ``deadline`` would pass before a compile
    as long as the slowest so far. Ratios: each row's compiled time over the compiled base's, and its eager time
    over the eager base's (paired per round).
    """
    import torch._dynamo

    log(f"sampling (compiled): building cases on the {size.name} UNet ({size.device}, {size.dtype})")
    base = frozen_unet(size)
    inputs = benchmark_inputs(base, size)
    tuners = sorted({row.split(" (")[0] for row in rows} - {BASE, "peft_lora"})
    built = build_cases(base, tuners, with_peers=any(row.startswith("peft_lora") for row in rows))
    if RES_ATTN_EXTRA_HEADS_COMPILED in rows:
        res_attn = [case for case in built if _row_key(case) == "res_attn (unfused)"]
        built += [
            _res_attn_variant(case, RES_ATTN_EXTRA_HEADS_COMPILED, extra_heads_compiled=True) for case in res_attn
        ]
    cases = [case for case in built if _row_key(case) in rows]
    del base, built
    free_device_memory(size.device)
    clock = clock or default_clock()
    result: dict[str, Any] = {
        "benchmark": "sampling_compiled",
        "clock": clock,
        "backend": backend,
        "size": size.describe(),
        "machine": machine_info(),
        "rows": [],
    }
    # Every row is the same UNet class: room for each one's guards, never a silent fall-back to eager.
    torch._dynamo.reset()
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 8 * len(cases))
    calls: dict[str, Callable[[], None]] = {}
    compile_seconds: dict[str, float] = {}
    errors: dict[str, str] = {case["name"]: case["error"] for case in cases if "error" in case}
    slowest = 0.0
    for case in cases:
        name = case["name"]
        if "unet" not in case:
            continue
        if deadline is not None and time.perf_counter() + 1.2 * slowest > deadline:
            errors[name] = "skipped: time guard (no time left for another cold compile)"
            continue
        log(f"sampling (compiled): compiling {name}")
        start = time.perf_counter()
        try:
            _forward(case["unet"], inputs)()  # builds what is built lazily (a bank's branch list) before tracing
            compiled = torch.compile(case["unet"], backend=backend)
            with torch.no_grad():
                compiled(**inputs, return_dict=False)
            synchronize(size.device)
        except Exception as error:
            errors[name] = describe_error(error)
            free_device_memory(size.device)
            continue
        compile_seconds[name] = time.perf_counter() - start
        slowest = max(slowest, compile_seconds[name])
        calls[f"{name} eager"] = _forward(case["unet"], inputs)
        calls[f"{name} compiled"] = _forward(compiled, inputs)
        if checkpoint is not None:
            result["rows"] = _compiled_rows(cases, {}, compile_seconds, errors)
            checkpoint(result)
    rounds = SAMPLING_ROUNDS_PER_REPEAT * size.repeats
    log(f"sampling (compiled): timing {len(calls)} calls x {rounds} interleaved rounds")
    timings = interleaved_timings(
        calls,
        rounds,
        size.warmup,
        clock,
        progress=lambda m: log(f"sampling (compiled): {m}"),
        device=size.device,
        errors=errors,
        deadline=None if deadline is None else deadline + 30.0,  # compiled calls are fast: rounds, not compiles
    )
    result["rows"] = _compiled_rows(cases, timings, compile_seconds, errors)
    result["rounds"] = rounds
    return result


def _row_key(case: dict[str, Any]) -> str:
    """A case's name in :data:`COMPILED_ROWS` (peft LoRA's row name carries its rank; the key does not)."""
    if case["name"] in (BASE, RES_ATTN_EXTRA_HEADS_COMPILED):
        return case["name"]
    return f"{case['tuner']} ({case['mode']})"


def _res_attn_variant(case: dict[str, Any], name: str, **processor_settings: Any) -> dict[str, Any]:
    """Row ``name``: a copy of the case's UNet with ``processor_settings`` set on each of its Res-Attn processors
    (:data:`RES_ATTN_EXTRA_HEADS_COMPILED`, :data:`RES_ATTN_SEPARATE_BRANCH`)."""
    row = dict(case, name=name)
    if "unet" in case:
        row["unet"] = clone_unet(case["unet"])
        for processor in row["unet"].attn_processors.values():
            if isinstance(processor, ResTunerAttnProcessor):
                for attribute, value in processor_settings.items():
                    setattr(processor, attribute, value)
    return row


def _compiled_rows(
    cases: list[dict[str, Any]], timings: dict[str, Any], compile_seconds: dict[str, float], errors: dict[str, str]
) -> list[dict[str, Any]]:
    def as_dict(key: str) -> dict[str, Any] | None:
        timing = timings.get(key)
        return None if timing is None else timing.as_dict()

    rows = []
    for case in cases:
        name = case["name"]
        eager, compiled = as_dict(f"{name} eager"), as_dict(f"{name} compiled")
        rows.append(
            {
                "name": name,
                "error": errors.get(name) or errors.get(f"{name} eager") or errors.get(f"{name} compiled"),
                "compile_s": compile_seconds.get(name),
                "eager_s": None if eager is None else eager["median_s"],
                "compiled_s": None if compiled is None else compiled["median_s"],
                "speedup": ratio(
                    None if eager is None else eager["median_s"], None if compiled is None else compiled["median_s"]
                ),
                "eager_vs_base_eager": paired_ratio(eager, as_dict(f"{BASE} eager")),
                "compiled_vs_base_compiled": paired_ratio(compiled, as_dict(f"{BASE} compiled")),
                "eager_timing": eager,
                "compiled_timing": compiled,
            }
        )
    return rows


def compiled_to_markdown(result: dict[str, Any]) -> str:
    headers = ["row", "cold compile (s)", "eager (ms)", "compiled (ms)", "speedup", "eager × base", "compiled × base"]
    table = []
    for row in result["rows"]:
        if row["compiled_s"] is None:
            table.append([row["name"], "–", f"error: {(row['error'] or 'not timed')[:100]}"] + ["–"] * 4)
            continue
        table.append(
            [
                row["name"],
                row["compile_s"],
                row["eager_s"] * 1e3,
                row["compiled_s"] * 1e3,
                row["speedup"],
                row["eager_vs_base_eager"],
                row["compiled_vs_base_compiled"],
            ]
        )
    return markdown_table(headers, table)


def to_markdown(result: dict[str, Any]) -> str:
    headers = ["row", "trainable params", "forward (s)", "× base", "95% interval", "spread"]
    base_timing = next((row["timing"] for row in result["rows"] if row["name"] == BASE), None)
    table = []
    for row in result["rows"]:
        if row["forward_s"] is None:
            table.append([row["name"], "–", f"error: {(row['error'] or 'not timed')[:100]}", "–", "–", "–"])
            continue
        interval = None if row["name"] == BASE else paired_ratio_interval(row["timing"], base_timing)
        table.append(
            [
                row["name"],
                row["trainable_parameters"],
                f"{row['forward_s']:.4f}",
                row["vs_base"],
                "–" if interval is None else f"[{interval[0]:.2f}, {interval[1]:.2f}]",
                row["forward_spread"],
            ]
        )
    rounds = result.get("rounds")
    return markdown_table(headers, table) + ("" if rounds is None else f"\n\n(median of {rounds} interleaved rounds)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--tuners", nargs="*", default=None, help="only these of our tuners (default: all registered)")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--compiled", action="store_true", help="time the rows of COMPILED_ROWS under torch.compile")
    parser.add_argument("--one-head-row", action="store_true", help=f"also time {RES_ATTN_ONE_HEAD!r}")
    parser.add_argument("--out", default=str(RESULTS_DIR / "sampling.json"))
    args = parser.parse_args(argv)
    configure_threads(args.threads)
    size = size_from_args(args)
    if args.compiled:
        result = run_compiled(size, clock=args.clock)
        write_json(args.out, result)
        print(compiled_to_markdown(result))
        return result
    result = run(size, args.tuners, not args.no_peers, args.clock, one_head_row=args.one_head_row)
    write_json(args.out, result)
    print(to_markdown(result))
    return result


if __name__ == "__main__":
    main()
