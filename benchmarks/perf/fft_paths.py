"""SURM's structured paths (FFT for circulant, Toeplitz and LDR; two small matmuls for Kronecker) against
materialising the d x d matrix and multiplying by it, at SD's widths.

Per width (320, 640, 1280 -- with the tokens one such layer sees in SD 1.5 at 512 px, batch 2: 8192, 2048, 512)
and family, the median time of:

* ``structured`` -- ``M x`` without forming M (``StructuredMatrix.structured_forward``);
* ``materialise`` -- building M from its parameters, then ``F.linear(x, M)`` (what a naive implementation runs);
* ``dense`` -- ``F.linear(x, M)`` with M built beforehand (a plain linear layer of that size, for scale),

in inference (``torch.no_grad``) and in training (forward and backward to x and the parameters), interleaved.
``auto`` says which of the first two SURM's ``forward`` takes there (its cost model picks the cheaper one on
CPU). The target is ``materialise / structured >= 2`` at width 1280 for circulant and Toeplitz.

Run alone: ``python -m benchmarks.perf.fft_paths [--tiny] [--repeats N] [--threads N]``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from resattn_diffusion.tuners.structured import STRUCTURES

from .common import (
    RESULTS_DIR,
    BenchmarkSize,
    add_common_arguments,
    configure_threads,
    default_clock,
    interleaved_timings,
    log,
    machine_info,
    markdown_table,
    ratio,
    size_from_args,
    write_json,
)

FAMILIES = ("circulant", "toeplitz", "ldr", "kronecker")
PATHS = ("structured", "materialise", "dense")


def _path_calls(
    family: str, width: int, tokens: int, train: bool, seed: int = 0, device: str = "cpu"
) -> tuple[dict[str, Callable[[], None]], bool]:
    """The three calls to time, and whether SURM's own ``forward`` would take the dense path here."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, width, generator=generator).to(device).requires_grad_(train)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        matrix = STRUCTURES[family](width, width, init="random").to(device)
    prebuilt = matrix.materialize().detach().requires_grad_(train)
    computations = {
        "structured": lambda: matrix.structured_forward(x),
        "materialise": lambda: F.linear(x, matrix.materialize()),
        "dense": lambda: F.linear(x, prebuilt),
    }

    def timed(compute: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def call() -> None:
            if train:
                compute().sum().backward()
            else:
                with torch.no_grad():
                    compute()

        return call

    return {path: timed(compute) for path, compute in computations.items()}, matrix.uses_dense_path(x)


def run(size: BenchmarkSize, families: tuple[str, ...] = FAMILIES, clock: str | None = None) -> dict[str, Any]:
    clock = clock or default_clock()
    rows = []
    for width, tokens in zip(size.fft_widths, size.fft_tokens):
        for train in (False, True):
            mode = "train" if train else "inference"
            log(f"fft_paths: width {width}, {tokens} tokens, {mode}")
            for family in families:
                calls, auto_dense = _path_calls(family, width, tokens, train, device=size.device)
                timings = interleaved_timings(calls, max(size.repeats, 1), size.warmup, clock, device=size.device)
                medians = {path: timings[path].median * 1e3 for path in PATHS}
                rows.append(
                    {
                        "family": family,
                        "width": width,
                        "tokens": tokens,
                        "mode": mode,
                        "structured_ms": medians["structured"],
                        "materialise_ms": medians["materialise"],
                        "dense_ms": medians["dense"],
                        "materialise_over_structured": ratio(medians["materialise"], medians["structured"]),
                        "dense_over_structured": ratio(medians["dense"], medians["structured"]),
                        "auto_path": "dense" if auto_dense else "structured",
                    }
                )
    return {"benchmark": "fft_paths", "clock": clock, "size": size.describe(), "machine": machine_info(), "rows": rows}


def to_markdown(result: dict[str, Any]) -> str:
    headers = [
        "family",
        "width",
        "tokens",
        "mode",
        "structured (ms)",
        "materialise + matmul (ms)",
        "dense matmul (ms)",
        "materialise / structured",
        "SURM takes",
    ]
    table = [
        [
            row["family"],
            str(row["width"]),
            str(row["tokens"]),
            row["mode"],
            row["structured_ms"],
            row["materialise_ms"],
            row["dense_ms"],
            row["materialise_over_structured"],
            row["auto_path"],
        ]
        for row in result["rows"]
    ]
    return markdown_table(headers, table)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--out", default=str(RESULTS_DIR / "fft_paths.json"))
    args = parser.parse_args(argv)
    configure_threads(args.threads)
    result = run(size_from_args(args), clock=args.clock)
    write_json(args.out, result)
    print(to_markdown(result))
    return result


if __name__ == "__main__":
    main()
