"""SURM LDR's dense delta on the fast path (what a CUDA training step forms once per layer and forward): the FFT
convolution of its strided skew factor with g, with its own backward (since GPU run 3), against run 3's form -- the
float32 matmul of the two strided n x n factors under activation checkpointing (``LDRMatrix.use_strided_matmul``).

Per SD 1.5 attention-projection shape (d_out x d_in: 320 x 320, 320 x 768, 640 x 640, 640 x 768, 1280 x 1280,
1280 x 768; displacement rank 1, the default), one call = forming M and backpropagating a fixed weighting of it to g
and h. Reported: the median time of each form over interleaved rounds, the paired ratio (new / run 3) with its 95%
sign-test interval, the aten ops each call dispatches (deterministic: the host-overhead claim) and the float32
multiply-adds of run 3's matmuls. Both forms give the same M and gradients up to rounding (checked per shape before
timing).

    python -m benchmarks.perf.ldr_delta                     # CPU, 1 thread; writes results/ldr_delta.json and .md
    python -m benchmarks.perf.ldr_delta --device cuda --out OUT/ldr_delta.json    # gpu_run4.sh part (c)

With ``--budget`` (seconds, counted from ``--started-at`` when given) no new shape starts after it: the shapes
measured so far are written.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from resattn_diffusion.tuners.fast_paths import forced_paths
from resattn_diffusion.tuners.structured import LDRMatrix

from .common import (
    RESULTS_DIR,
    configure_threads,
    default_clock,
    dispatched_ops,
    interleaved_timings,
    log,
    machine_info,
    markdown_table,
    paired_ratio,
    paired_ratio_interval,
    write_json,
)
from .gpu_suite import run3_dense

#: SD 1.5's attention projections (d_out, d_in): q/k/v/out at each width, and the cross-attention k/v from the
#: 768-wide text states.
SHAPES = ((320, 320), (320, 768), (640, 640), (640, 768), (1280, 1280), (1280, 768))
TINY_SHAPES = ((12, 20), (24, 24))
FORMS = ("fft convolution", "run-3 matmul")


def _calls(d_out: int, d_in: int, device: str) -> dict[str, Callable[[], list[torch.Tensor]]]:
    """One call per form (forming M, then its backward to g and h, returning both), checked to agree."""
    torch.manual_seed(0)
    matrix = LDRMatrix(d_out, d_in, init="random").to(device)
    weights = torch.randn(d_out, d_in, device=device)

    def call(matmul: bool) -> Callable[[], list[torch.Tensor]]:
        def run() -> list[torch.Tensor]:
            with run3_dense() if matmul else contextlib.nullcontext(), forced_paths("fast"):
                dense = matrix.dense_matrix()
                grads = torch.autograd.grad((dense * weights).sum(), list(matrix.parameters()))
            return [dense.detach(), *grads]

        return run

    runs = {FORMS[0]: call(False), FORMS[1]: call(True)}
    outputs = {name: run() for name, run in runs.items()}
    for new, old in zip(outputs[FORMS[0]], outputs[FORMS[1]]):
        torch.testing.assert_close(new, old, rtol=1e-4, atol=1e-4 * old.abs().max().item())
    return runs


def run(
    shapes=SHAPES, repeats: int = 9, device: str = "cpu", clock: str | None = None, deadline: float | None = None
) -> dict[str, Any]:
    """The rows of :data:`SHAPES` (or ``shapes``); none starts after ``deadline`` (a ``time.perf_counter()``)."""
    clock = clock or default_clock()
    rows = []
    for d_out, d_in in shapes:
        if deadline is not None and time.perf_counter() > deadline:
            log(f"ldr_delta: time guard reached, {d_out} x {d_in} and later shapes skipped")
            break
        log(f"ldr_delta: {d_out} x {d_in} on {device}")
        runs = _calls(d_out, d_in, device)
        ops = {name: sum(dispatched_ops(fn).values()) for name, fn in runs.items()}
        timings = interleaved_timings(runs, repeats, warmup=2, clock=clock, device=device)
        new, old = timings[FORMS[0]].as_dict(), timings[FORMS[1]].as_dict()
        n = max(d_out, d_in)
        rows.append(
            {
                "d_out": d_out,
                "d_in": d_in,
                "fft_ms": timings[FORMS[0]].median * 1e3,
                "run3_matmul_ms": timings[FORMS[1]].median * 1e3,
                "time_ratio": paired_ratio(new, old),
                "time_ratio_interval": paired_ratio_interval(new, old),
                "fft_ops": ops[FORMS[0]],
                "run3_matmul_ops": ops[FORMS[1]],
                # forward, the checkpoint's recompute, and two products in backward
                "run3_matmul_float32_multiply_adds": 4 * d_out * n * d_in,
            }
        )
    return {
        "benchmark": "ldr_delta",
        "clock": clock,
        "device": device,
        "repeats": repeats,
        "machine": machine_info(),
        "rows": rows,
    }


def to_markdown(result: dict[str, Any]) -> str:
    headers = ["d_out x d_in", "FFT convolution ms", "run 3 matmul ms", "time × run 3 [95%]", "ops (run 3)"]
    headers.append("run 3's float32 multiply-adds")
    table = []
    for row in result["rows"]:
        interval = row["time_ratio_interval"]
        bracket = "" if interval is None else f" [{interval[0]:.2f}, {interval[1]:.2f}]"
        table.append(
            [
                f"{row['d_out']} x {row['d_in']}",
                row["fft_ms"],
                row["run3_matmul_ms"],
                f"{row['time_ratio']:.2f}{bracket}",
                f"{row['fft_ops']} ({row['run3_matmul_ops']})",
                f"{row['run3_matmul_float32_multiply_adds']:.2e}",
            ]
        )
    machine = result["machine"]
    title = (
        f"# SURM LDR's fast dense delta, forward + backward ({result['device']}, {result['clock']} clock, "
        f"{result['repeats']} interleaved rounds; torch {machine.get('torch')})\n\n"
    )
    return title + markdown_table(headers, table) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", default="1", help="CPU threads (default 1, as the other CPU benchmarks)")
    parser.add_argument("--tiny", action="store_true", help="two small shapes, 2 rounds: the smoke test")
    parser.add_argument("--out", default=str(RESULTS_DIR / "ldr_delta.json"))
    parser.add_argument("--budget", type=float, default=None, help="seconds: no new shape starts after them")
    parser.add_argument("--started-at", type=float, default=None, help="epoch seconds the process was launched")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be at least 1, got {args.repeats}")
    if args.device != "cpu" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    deadline = None
    if args.budget is not None:
        already = 0.0 if args.started_at is None else max(0.0, time.time() - args.started_at)
        deadline = time.perf_counter() + args.budget - already - 2.0  # 2 s to write the results
    if args.device == "cpu":
        configure_threads(args.threads)
    shapes = TINY_SHAPES if args.tiny else SHAPES
    result = run(shapes, 2 if args.tiny else args.repeats, args.device, deadline=deadline)
    out = Path(args.out)
    write_json(out, result)
    markdown = to_markdown(result)
    out.with_suffix(".md").write_text(markdown)
    print(markdown)
    return result


if __name__ == "__main__":
    main()
