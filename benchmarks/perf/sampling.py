"""Sampling cost: one UNet forward under ``torch.no_grad`` with each tuner, as a ratio to the frozen UNet.

Rows: ``base`` (the frozen UNet), every registered tuner at its default size running as a branch
(``unfused``), and every tuner that folds into the weights (``res_lora``, ``glora``, ``surm_*``) after
``fuse_res_tuner`` (``fused``: the only cost left is the hooks). peft LoRA at Res-Attn's parameter count, unmerged
and merged (``fuse_lora``), is the reference a diffusers user knows. Ratios are medians of the per-round ratios
(:func:`~benchmarks.perf.common.paired_ratio`); a forward is cheap, so it runs twice as many rounds as ``--repeats``.

Run alone: ``python -m benchmarks.perf.sampling [--tiny] [--repeats N] [--threads N]``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from resattn_diffusion import (
    ResTunerConfig,
    add_res_tuner,
    fuse_res_tuner,
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
    frozen_unet,
    interleaved_timings,
    log,
    machine_info,
    markdown_table,
    paired_ratio,
    size_from_args,
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


def build_cases(base: nn.Module, tuners: list[str] | None = None, with_peers: bool = True) -> list[dict[str, Any]]:
    """Rows as dicts with ``name``, ``tuner``, ``mode`` and the ``unet`` to call (or an ``error``)."""
    cases: list[dict[str, Any]] = [{"name": BASE, "tuner": None, "mode": "frozen", "unet": clone_unet(base)}]
    for name in tuners if tuners is not None else tuner_names():
        folds = get_tuner_spec(name).kind == "linear"
        for mode in ("unfused", "fused") if folds else ("unfused",):
            row: dict[str, Any] = {"name": f"{name} ({mode})", "tuner": name, "mode": mode}
            unet = clone_unet(base)
            try:
                add_res_tuner(unet, ResTunerConfig(name))
                row["trainable_parameters"] = sum(p.numel() for p in res_tuner_parameters(unet))
                if mode == "fused":
                    fuse_res_tuner(unet)
                row["unet"] = unet
            except Exception as error:  # reported in the table, e.g. a tuner that cannot fuse on this UNet
                row["error"] = f"{type(error).__name__}: {error}"
            cases.append(row)
    if with_peers and peers.peft_available():
        unet = clone_unet(base)
        add_res_tuner(unet, ResTunerConfig("res_attn"))
        rank = peers.matched_lora_rank(base, sum(p.numel() for p in res_tuner_parameters(unet)))
        for mode in ("unfused", "fused"):
            row = {"name": f"peft_lora r{rank} ({mode})", "tuner": "peft_lora", "mode": mode}
            unet = clone_unet(base)
            try:
                peers.add_peft_lora(unet, rank)
                row["trainable_parameters"] = peers.lora_parameter_count(base, rank)
                if mode == "fused":
                    unet.fuse_lora(lora_scale=1.0)
                row["unet"] = unet
            except Exception as error:
                row["error"] = f"{type(error).__name__}: {error}"
            cases.append(row)
    return cases


def run(
    size: BenchmarkSize, tuners: list[str] | None = None, with_peers: bool = True, clock: str | None = None
) -> dict[str, Any]:
    log(f"sampling: building cases on the {size.name} UNet")
    base = frozen_unet(size)
    inputs = benchmark_inputs(base, size)
    cases = build_cases(base, tuners, with_peers)
    calls = {case["name"]: _forward(case["unet"], inputs) for case in cases if "unet" in case}
    # A forward is a third of a training step: twice the rounds for the same time, and the fused rows' target
    # (within 2% of the base) needs them.
    rounds = SAMPLING_ROUNDS_PER_REPEAT * size.repeats
    log(f"sampling: timing {len(calls)} cases x {rounds} interleaved rounds")
    clock = clock or default_clock()
    timings = interleaved_timings(calls, rounds, size.warmup, clock, progress=lambda m: log(f"sampling: {m}"))
    base_timing = timings[BASE].as_dict()
    rows = []
    for case in cases:
        timing = timings.get(case["name"])
        rows.append(
            {
                "name": case["name"],
                "tuner": case["tuner"],
                "mode": case["mode"],
                "trainable_parameters": case.get("trainable_parameters"),
                "error": case.get("error"),
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


def to_markdown(result: dict[str, Any]) -> str:
    headers = ["row", "trainable params", "forward (s)", "× base", "spread"]
    table = []
    for row in result["rows"]:
        if row["error"]:
            table.append([row["name"], "–", f"error: {row['error'][:100]}", "–", "–"])
            continue
        table.append(
            [row["name"], row["trainable_parameters"], f"{row['forward_s']:.4f}", row["vs_base"], row["forward_spread"]]
        )
    rounds = result.get("rounds")
    return markdown_table(headers, table) + ("" if rounds is None else f"\n\n(median of {rounds} interleaved rounds)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--tuners", nargs="*", default=None, help="only these of our tuners (default: all registered)")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--out", default=str(RESULTS_DIR / "sampling.json"))
    args = parser.parse_args(argv)
    configure_threads(args.threads)
    size = size_from_args(args)
    result = run(size, args.tuners, not args.no_peers, args.clock)
    write_json(args.out, result)
    print(to_markdown(result))
    return result


if __name__ == "__main__":
    main()
