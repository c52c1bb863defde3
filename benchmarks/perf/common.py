"""What every performance benchmark shares: sizes, frozen UNets, interleaved timing, peak memory, result files.

Timing is *interleaved*: the cases of one table run round-robin (one call of each per round, the starting case
rotating every round), so a burst of load from another process on the shared cores hits every case alike, and
the median over rounds is compared. Memory is the peak of the tensor memory allocated *during* one call (what the
call adds on top of the model already in memory), tracked with torch's ``MemTracker`` dispatch mode; it is
deterministic, so it is measured once per case, outside the timed runs.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import gc
import datetime
import json
import os
import platform
import statistics
import time
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from resattn_diffusion.testing import tiny_unet_config, unet_from_config, unet_inputs

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

    def describe(self) -> dict[str, Any]:
        config = self.unet_config
        return {
            "name": self.name,
            "block_out_channels": list(config["block_out_channels"]),
            "layers_per_block": config["layers_per_block"],
            "latent_size": config["sample_size"],
            "batch_size": self.batch_size,
            "context_tokens": self.context_tokens,
            "repeats": self.repeats,
        }


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
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
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
    """A UNet of ``size`` with seeded random weights, every parameter frozen, in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = unet_from_config(size.unet_config, device="cpu")
    unet.requires_grad_(False)
    return unet.eval()


def clone_unet(unet: torch.nn.Module) -> torch.nn.Module:
    """An independent copy (each interleaved case owns its model, so no case pays for another's set-up)."""
    return copy.deepcopy(unet)


def benchmark_inputs(unet: torch.nn.Module, size: BenchmarkSize, seed: int = 0) -> dict[str, Any]:
    """``unet(**inputs)`` keyword arguments of ``size`` (latents, timesteps, text context), seeded."""
    return unet_inputs(unet, batch_size=size.batch_size, seed=seed, tokens=size.context_tokens)


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
) -> dict[str, Timing]:
    """Time every function ``repeats`` times, round-robin, after ``warmup`` untimed rounds.

    The order within a round rotates by one each round, so no case always runs right after the same neighbour
    (allocator and cache state) or always first in a round. Both clocks are recorded; ``clock`` (default
    :func:`default_clock`) is the one :attr:`Timing.median` reports. ``teardowns[name]``, if given, runs untimed
    after every call of ``runs[name]`` (e.g. unloading what the timed call loaded).
    """
    teardowns = teardowns or {}
    clock = clock or default_clock()
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
    names = list(runs)
    for _ in range(warmup):
        for name in names:
            runs[name]()
            if name in teardowns:
                teardowns[name]()
    timings = {name: Timing(clock) for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            runs[name]()
            cpu_end, wall_end = time.process_time(), time.perf_counter()
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


def peak_memory_bytes(fn: Callable[[], Any]) -> int:
    """Peak of the tensor memory allocated while ``fn`` runs (tensors that already exist are not counted):
    activations saved for backward, temporaries, gradients and optimizer states created by the call.

    Tracked with a dispatch mode that sees every op's outputs (in the forward and in autograd's backward) and
    the moment each new storage is freed; so it works on CPU, where torch keeps no allocator statistics.
    """
    gc.collect()
    mode = _PeakMemoryMode()
    with mode:
        fn()
    return mode.peak


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
    """``--tiny``, ``--repeats``, ``--threads``, ``--clock``: the options every benchmark script takes."""
    parser.add_argument(
        "--tiny", action="store_true", help="the test suite's tiny sizes, one round (numbers meaningless)"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="interleaved timed rounds per case (default 7; tiny 1)"
    )
    parser.add_argument(
        "--threads", default="auto", help="torch threads, or 'auto': all cores on an idle machine, else 1 (default)"
    )
    parser.add_argument(
        "--clock", choices=CLOCKS, default=None, help="reported clock (default: 'cpu' with 1 thread, else 'wall')"
    )


def size_from_args(args: argparse.Namespace) -> BenchmarkSize:
    size = BenchmarkSize.tiny() if args.tiny else BenchmarkSize.full()
    if args.repeats is not None:
        if args.repeats < 1:
            raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
        size = dataclasses.replace(size, repeats=args.repeats)
    return size
