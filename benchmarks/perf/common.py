"""What every performance benchmark shares: sizes, frozen UNets, interleaved timing, peak memory, result files.

Timing is *interleaved*: the cases of one table run round-robin (one call of each per round, the starting case
rotating every round), so a burst of load from another process on the shared cores hits every case alike, and
the median over rounds is compared. Memory is the peak of the tensor memory allocated *during* one call (what the
call adds on top of the model already in memory): on CPU tracked op by op with a dispatch mode, on CUDA from the
allocator's statistics (``max_memory_allocated`` minus what was allocated before the call); it is deterministic,
so it is measured once per case, outside the timed runs.

On a GPU (``BenchmarkSize.device == "cuda"``, see :meth:`BenchmarkSize.real`) the models are the real SD 1.5 /
SD 2.1 / SDXL UNet architectures with seeded random weights at native resolution, frozen weights in fp16/bf16 and
trainable parameters in fp32 under autocast (the training scripts' recipe); every timed call is bracketed by
``torch.cuda.synchronize`` so the wall clock measures the GPU work, not the kernel launches.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import dataclasses
import datetime
import functools
import gc
import json
import math
import os
import platform
import statistics
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from resattn_diffusion.testing import (
    SD15_UNET_CONFIG,
    SD21_UNET_CONFIG,
    SDXL_UNET_CONFIG,
    tiny_unet_config,
    unet_from_config,
    unet_inputs,
)

#: Where ``run_all`` writes its JSON files and the markdown summary.
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def benchmark_unet_config() -> dict[str, Any]:
    """An SD 1-shaped UNet config of realistic depth and small width, for CPU performance benchmarks.

    Same block layout as SD 1.5 minus its lowest-resolution level: widths (64, 128, 256), 2 layers per block,
    8 heads, a 128-wide text context, 32x32 latents. About 17.8M parameters; a fresh dict on every call.
    """
    return {
        "sample_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": [64, 128, 256],
        "layers_per_block": 2,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": 128,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
    }


@dataclass(frozen=True)
class BenchmarkSize:
    """The model and data a benchmark runs on, and how often each case is timed.

    ``full()`` is issue 8's size (an SD 1-shaped UNet with widths 64/128/256, two layers per block, 32x32 latents,
    batch 2, a 77-token text context); ``tiny()`` is the test suite's (a UNet of a few milliseconds, one round).
    """

    name: str
    unet_config: dict[str, Any]
    batch_size: int
    context_tokens: int
    repeats: int
    warmup: int = 1
    #: SURM FFT benchmark: layer widths and tokens per layer (SD 1.5 at 512 px, batch 2: 64x64, 32x32, 16x16 latents).
    fft_widths: tuple[int, ...] = (320, 640, 1280)
    fft_tokens: tuple[int, ...] = (8192, 2048, 512)
    #: ``"cpu"`` or ``"cuda"`` (or ``"cuda:1"``): where models, inputs and timings live.
    device: str = "cpu"
    #: the frozen weights' dtype (:data:`DTYPES`); below fp32 the trainable parameters stay fp32 under autocast.
    dtype: str = "fp32"

    @classmethod
    def full(cls, repeats: int = 7) -> BenchmarkSize:
        return cls("full", benchmark_unet_config(), batch_size=2, context_tokens=77, repeats=repeats)

    @classmethod
    def tiny(cls, repeats: int = 1) -> BenchmarkSize:
        return cls(
            "tiny",
            tiny_unet_config("sd1"),
            batch_size=1,
            context_tokens=7,
            repeats=repeats,
            warmup=0,
            fft_widths=(32, 64),
            fft_tokens=(16, 8),
        )

    @classmethod
    def real(
        cls,
        model: str,
        device: str = "cuda",
        dtype: str = "fp16",
        batch_size: int | None = None,
        repeats: int = 9,
        warmup: int = 2,
    ) -> BenchmarkSize:
        """A real architecture (:data:`REAL_MODELS`: ``sd15``, ``sd21``, ``sdxl``) at its native resolution,
        seeded random weights, 77 context tokens; default batch 4 (SDXL: 1). For GPUs: on CPU it would take hours."""
        if model not in REAL_MODELS:
            raise SystemExit(f"--size must be one of {sorted(REAL_MODELS)} or 'full', got {model!r}")
        if dtype not in DTYPES:
            raise SystemExit(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if batch_size is None:
            batch_size = 1 if model == "sdxl" else 4
        # The FFT benchmark at this model's widths, with the tokens its levels see at this batch.
        config = REAL_MODELS[model]
        latent = config["sample_size"]
        widths = tuple(config["block_out_channels"][:3])
        tokens = tuple(batch_size * (latent // 2**level) ** 2 for level in range(len(widths)))
        return cls(
            model,
            config,
            batch_size=batch_size,
            context_tokens=77,
            repeats=repeats,
            warmup=warmup,
            fft_widths=widths,
            fft_tokens=tokens,
            device=device,
            dtype=dtype,
        )

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def is_cuda(self) -> bool:
        return torch.device(self.device).type == "cuda"

    @property
    def mixed_precision(self) -> bool:
        """Frozen weights below fp32: trainable parameters in fp32 and the forward under autocast."""
        return self.torch_dtype != torch.float32

    def autocast(self):
        """The training scripts' autocast for this size (a no-op context in fp32)."""
        if not self.mixed_precision:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(self.device).type, dtype=self.torch_dtype)

    def describe(self) -> dict[str, Any]:
        config = self.unet_config
        return {
            "name": self.name,
            "device": self.device,
            "dtype": self.dtype,
            "block_out_channels": list(config["block_out_channels"]),
            "layers_per_block": config["layers_per_block"],
            "latent_size": config["sample_size"],
            "batch_size": self.batch_size,
            "context_tokens": self.context_tokens,
            "repeats": self.repeats,
        }


#: ``--dtype`` names -> the frozen weights' dtype.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: ``--size`` names of the real architectures (GPU runs).
REAL_MODELS = {"sd15": SD15_UNET_CONFIG, "sd21": SD21_UNET_CONFIG, "sdxl": SDXL_UNET_CONFIG}


# --- machine -------------------------------------------------------------------------------------------------


def configure_threads(threads: int | str = "auto") -> int:
    """Set torch's intra-op threads and return the number used.

    ``"auto"``: every core when nobody else is computing (1-minute load average below 0.5), else one thread --
    on shared cores, OpenMP threads that wait for each other make every op many times slower than one thread.
    """
    cores = os.cpu_count() or 1
    if threads == "auto":
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        threads = cores if load < 0.5 else 1
    threads = int(threads)
    if threads < 1:
        raise ValueError(f"threads must be >= 1 or 'auto', got {threads}")
    torch.set_num_threads(threads)
    return threads


def machine_info() -> dict[str, Any]:
    """What the numbers depend on: CPU count, torch threads, load averages (other processes), versions."""
    import diffusers

    try:
        import peft

        peft_version = peft.__version__
    except ImportError:  # the peers are optional
        peft_version = None
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    gpu = None
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(torch.cuda.current_device())
        gpu = {
            "name": properties.name,
            "memory_gb": round(properties.total_memory / 2**30, 1),
            "count": torch.cuda.device_count(),
            "cuda": torch.version.cuda,
        }
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "gpu": gpu,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15min": [round(value, 2) for value in load],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "peft": peft_version,
    }


# --- models and inputs -----------------------------------------------------------------------------------------


def frozen_unet(size: BenchmarkSize, seed: int = 0) -> torch.nn.Module:
    """A UNet of ``size`` with seeded random weights, every parameter frozen, in eval mode, on ``size.device`` in
    ``size.dtype`` (built on the device itself: initialising SDXL's 2.6 B weights on the CPU takes a minute)."""
    device = torch.device(size.device)
    cuda_index = (
        (device.index if device.index is not None else torch.cuda.current_device()) if device.type == "cuda" else None
    )
    with torch.random.fork_rng(devices=[] if cuda_index is None else [cuda_index]):
        torch.manual_seed(seed)
        unet = unet_from_config(size.unet_config, device=device)
    unet.requires_grad_(False)
    return unet.to(size.torch_dtype).eval()


def cast_trainable_to_fp32(parameters: Sequence[torch.nn.Parameter]) -> None:
    """The training scripts' recipe under mixed precision (diffusers' ``cast_training_params``): trainable
    parameters in fp32 beside frozen fp16/bf16 weights, the forward under autocast."""
    for parameter in parameters:
        parameter.data = parameter.data.float()


def clone_unet(unet: torch.nn.Module) -> torch.nn.Module:
    """An independent copy (each interleaved case owns its model, so no case pays for another's set-up)."""
    return copy.deepcopy(unet)


def benchmark_inputs(unet: torch.nn.Module, size: BenchmarkSize, seed: int = 0) -> dict[str, Any]:
    """``unet(**inputs)`` keyword arguments of ``size`` (latents, timesteps, text context), seeded, on the UNet's
    device and in its dtype."""
    return unet_inputs(unet, batch_size=size.batch_size, seed=seed, tokens=size.context_tokens)


def synchronize(device: str | torch.device) -> None:
    """Wait for the GPU's queued work (a no-op on CPU): without it a wall clock times kernel launches."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_device_memory(device: str | torch.device) -> None:
    """Collect garbage and return cached blocks (after a case failed, e.g. out of memory)."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def describe_error(error: BaseException) -> str:
    """One line for a table cell and the JSON: the error type and the first line of its message."""
    first_line = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first_line[:300]}"


def trainable_parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# --- timing --------------------------------------------------------------------------------------------------


#: Clocks a benchmark can be timed with: wall time, or the CPU time of this process. With one torch thread
#: the CPU time is the compute itself, and barely moves when other processes load the cores (they lengthen the
#: wall time of every op they pre-empt); with several threads the CPU time would also count OpenMP spin-waits.
CLOCKS = ("wall", "cpu")


def default_clock(threads: int | None = None) -> str:
    """``"cpu"`` with one torch thread, ``"wall"`` with more."""
    return "cpu" if (threads or torch.get_num_threads()) == 1 else "wall"


@dataclass
class Timing:
    """Times (seconds) of one case over the interleaved rounds, on both clocks; ``clock`` is the one reported."""

    clock: str = "wall"
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    @property
    def samples(self) -> list[float]:
        return self.cpu if self.clock == "cpu" else self.wall

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    @property
    def spread(self) -> float:
        """(max - min) / median: how noisy the rounds were."""
        if len(self.samples) < 2:
            return 0.0
        return (max(self.samples) - min(self.samples)) / self.median

    def as_dict(self) -> dict[str, Any]:
        return {
            "clock": self.clock,
            "median_s": self.median,
            "spread": self.spread,
            "wall_median_s": statistics.median(self.wall) if self.wall else None,
            "cpu_median_s": statistics.median(self.cpu) if self.cpu else None,
            "wall_samples_s": self.wall,
            "cpu_samples_s": self.cpu,
        }


def interleaved_timings(
    runs: dict[str, Callable[[], Any]],
    repeats: int,
    warmup: int = 1,
    clock: str | None = None,
    progress: Callable[[str], None] | None = None,
    teardowns: dict[str, Callable[[], Any]] | None = None,
    device: str | torch.device = "cpu",
    errors: dict[str, str] | None = None,
    deadline: float | None = None,
) -> dict[str, Timing]:
    """Time every function ``repeats`` times, round-robin, after ``warmup`` untimed rounds.

    The order within a round rotates by one each round, so no case always runs right after the same neighbour
    (allocator and cache state) or always first in a round. Both clocks are recorded; ``clock`` (default
    :func:`default_clock`) is the one :attr:`Timing.median` reports. ``teardowns[name]``, if given, runs untimed
    after every call of ``runs[name]`` (e.g. unloading what the timed call loaded).

    On a CUDA ``device`` every call is bracketed by ``torch.cuda.synchronize``. With ``errors`` (a dict to fill),
    a case that raises (e.g. out of GPU memory) is recorded there as ``"Type: message"`` and dropped from the
    remaining rounds instead of aborting the table. With ``deadline`` (a ``time.perf_counter()`` value), no new
    round starts after it once every case has at least one timed round (a time guard for one-shot GPU runs).
    """
    teardowns = teardowns or {}
    clock = clock or default_clock()
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
    names = list(runs)

    def call(name: str) -> bool:
        """Run one case; False (and the error recorded) if it failed and ``errors`` collects failures."""
        try:
            runs[name]()
        except Exception as error:
            if errors is None:
                raise
            errors[name] = describe_error(error)
            names.remove(name)
            free_device_memory(device)
            if progress is not None:
                progress(f"{name} failed: {errors[name]}")
            return False
        return True

    for warmup_round in range(warmup):
        if deadline is not None and warmup_round > 0 and time.perf_counter() > deadline:
            break  # one warm-up round is needed (first calls allocate, compile, autotune); more is a luxury
        for name in list(names):
            if call(name) and name in teardowns:
                teardowns[name]()
    timings = {name: Timing(clock) for name in names}
    for round_index in range(repeats):
        if deadline is not None and round_index > 0 and time.perf_counter() > deadline:
            if progress is not None:
                progress(f"time guard: stopped after {round_index} of {repeats} rounds")
            break
        shift = round_index % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            synchronize(device)
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            ok = call(name)
            synchronize(device)
            cpu_end, wall_end = time.process_time(), time.perf_counter()
            if not ok:
                timings.pop(name, None)
                continue
            timings[name].wall.append(wall_end - wall_start)
            timings[name].cpu.append(cpu_end - cpu_start)
            if name in teardowns:
                teardowns[name]()
        if progress is not None:
            progress(f"round {round_index + 1}/{repeats}")
    return timings


def paired_ratio(numerator: dict[str, Any] | None, denominator: dict[str, Any] | None) -> float | None:
    """Median over rounds of the ratio of two cases' times *in the same round* (``Timing.as_dict()`` of each).

    The load other processes put on shared cores drifts over seconds, so the cases of one round see about the
    same machine: pairing them cancels that common drift, which a ratio of the two medians does not.
    """
    if not numerator or not denominator:
        return None
    key = f"{numerator['clock']}_samples_s"
    pairs = [a / b for a, b in zip(numerator[key], denominator[key]) if b > 0]
    return statistics.median(pairs) if pairs else None


def paired_ratio_interval(
    numerator: dict[str, Any] | None, denominator: dict[str, Any] | None, confidence: float = 0.95
) -> tuple[float, float] | None:
    """A distribution-free interval for :func:`paired_ratio`: order statistics of the per-round ratios that bracket
    their median with at least ``confidence`` (the sign test's interval: ``[r_(k), r_(n+1-k)]`` with the largest
    ``k`` for which ``P(Binomial(n, 1/2) < k) <= (1 - confidence) / 2``). None with too few rounds for it (fewer
    than 6 at 95%): the error bar of a ratio the README reports, without assuming how the rounds' noise is shaped."""
    if not numerator or not denominator:
        return None
    key = f"{numerator['clock']}_samples_s"
    pairs = sorted(a / b for a, b in zip(numerator[key], denominator[key]) if b > 0)
    n = len(pairs)
    tail = (1.0 - confidence) / 2.0
    k, below = 0, 0.0  # below: P(Binomial(n, 1/2) < k + 1)
    while k < n // 2:
        below += math.comb(n, k) / 2**n
        if below > tail:
            break
        k += 1
    if k == 0:
        return None
    return pairs[k - 1], pairs[n - k]


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0 or numerator != numerator:
        return None
    return numerator / denominator


# --- memory --------------------------------------------------------------------------------------------------


class _PeakMemoryMode(TorchDispatchMode):
    """Counts the bytes of every new tensor storage an op creates, until that storage is freed; keeps the peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[weakref.ref, int]] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Outputs sharing an input's storage (views, in-place results) allocate nothing: a view of a frozen weight
        # must not count as a copy of it.
        inputs = {id(t.untyped_storage()) for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for value in pytree.tree_leaves(out):
            if isinstance(value, torch.Tensor):
                self._track(value, inputs)
        return out

    def _track(self, tensor: torch.Tensor, inputs: set[int]) -> None:
        # A storage's Python object lives exactly as long as the storage (torch preserves it), so its id is a key
        # while it lives and its weakref fires when it is freed.
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in inputs or (key in self.live and self.live[key][0]() is storage):
            return
        nbytes = storage.nbytes()
        self.live[key] = (weakref.ref(storage, functools.partial(self._freed, key)), nbytes)
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def _freed(self, key: int, _reference: weakref.ref) -> None:
        entry = self.live.get(key)
        if entry is not None and entry[0] is _reference:
            del self.live[key]
            self.current -= entry[1]


def peak_memory_bytes(fn: Callable[[], Any], device: str | torch.device = "cpu") -> int:
    """Peak of the tensor memory allocated while ``fn`` runs (tensors that already exist are not counted):
    activations saved for backward, temporaries, gradients and optimizer states created by the call.

    On CUDA: the allocator's ``max_memory_allocated`` (reset before the call) minus what was allocated before.
    On CPU, where torch keeps no allocator statistics: tracked with a dispatch mode that sees every op's outputs
    (in the forward and in autograd's backward) and the moment each new storage is freed.
    """
    gc.collect()
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    mode = _PeakMemoryMode()
    with mode:
        fn()
    return mode.peak


# --- dispatched ops ------------------------------------------------------------------------------------------


class _OpCountMode(TorchDispatchMode):
    """Counts every aten op that reaches the dispatcher (forward and autograd's backward), by name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def dispatched_ops(fn: Callable[[], Any]) -> collections.Counter[str]:
    """aten op name -> how many times one call of ``fn`` dispatched it, views and the backward included.

    Deterministic for a given model, input and code path, so it is the host-overhead claim a shared machine can
    make: on a GPU each op costs host time (the dispatcher, and for most a kernel launch) whatever its size.
    """
    mode = _OpCountMode()
    with mode:
        fn()
    return mode.counts


# --- results -------------------------------------------------------------------------------------------------


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    os.replace(temporary, path)
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def format_number(value: Any, digits: int = 2) -> str:
    """Table cell: floats with ``digits`` decimals, None as an en dash."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:
            return "–"
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(cell if isinstance(cell, str) else format_number(cell) for cell in row) + " |")
    return "\n".join(lines)


def log(message: str) -> None:
    print(f"[perf {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- command line --------------------------------------------------------------------------------------------


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """``--tiny``, ``--repeats``, ``--threads``, ``--clock``, ``--device``, ``--size``, ``--dtype``,
    ``--batch-size``: the options every benchmark script takes."""
    parser.add_argument(
        "--tiny", action="store_true", help="the test suite's tiny sizes, one round (numbers meaningless)"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="interleaved timed rounds per case (default 7; tiny 1; GPU 9)"
    )
    parser.add_argument(
        "--threads", default="auto", help="torch threads, or 'auto': all cores on an idle machine, else 1 (default)"
    )
    parser.add_argument(
        "--clock", choices=CLOCKS, default=None, help="reported clock (default: 'cpu' with 1 thread, else 'wall')"
    )
    parser.add_argument("--device", default="cpu", help="'cpu' (default) or 'cuda': where models and timings run")
    parser.add_argument(
        "--size",
        choices=["full", *REAL_MODELS],
        default=None,
        help="'full' (issue 8's CPU size, the default on CPU) or a real architecture at native resolution "
        "(sd15 512 px, sd21 768 px, sdxl 1024 px; the default on CUDA is sd15)",
    )
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="frozen weights' dtype (default fp32 on CPU, fp16 on CUDA)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help="batch size (default: 2 full, 1 tiny; real sizes 4, SDXL 1)"
    )


def size_from_args(args: argparse.Namespace) -> BenchmarkSize:
    device = getattr(args, "device", "cpu") or "cpu"
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: torch sees no CUDA device here (torch {torch.__version__})")
    on_gpu = torch.device(device).type != "cpu"
    dtype = getattr(args, "dtype", None) or ("fp16" if on_gpu else "fp32")
    model = getattr(args, "size", None) or ("sd15" if on_gpu and not args.tiny else "full")
    if args.repeats is not None and args.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
    if args.tiny:
        size = dataclasses.replace(BenchmarkSize.tiny(), device=device, dtype=dtype)
    elif model == "full":
        size = dataclasses.replace(BenchmarkSize.full(), device=device, dtype=dtype)
    else:
        size = BenchmarkSize.real(model, device, dtype, getattr(args, "batch_size", None))
    if args.repeats is not None:
        size = dataclasses.replace(size, repeats=args.repeats)
    batch_size = getattr(args, "batch_size", None)
    if batch_size is not None:
        if batch_size < 1:
            raise SystemExit(f"--batch-size must be >= 1, got {batch_size}")
        size = dataclasses.replace(size, batch_size=batch_size)
    return size
