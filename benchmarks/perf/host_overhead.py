"""Host overhead: the work a tuner adds to a UNet call on the host -- dispatched aten ops and wall time -- measured
on a UNet whose compute is negligible (issue 14).

On the H100 an SD 1.5 forward is bound by the host launching kernels, not by the GPU (GPU run 3: the base's
kernels take 12.2 ms of its ~35 ms; Res-Attn's branch kernels add ~1.2 ms but its wall time is 1.39x the base's).
What a tuner costs there is mostly its per-call host work: Python in the processor, and every aten op it
dispatches (the dispatcher, and for most ops a kernel launch, whatever the tensor size). A CPU measures that work
once the compute is taken away: this benchmark builds the SD 1.5 block structure (4 levels, 2 layers per block,
16 transformer blocks, 32 attentions, 8 heads) with tiny widths and latents, batch 2 and a 77-token context, and
per row counts the aten ops of one call (a dispatch mode: deterministic, the claim to quote) and times the call
(median of interleaved rounds, ratios paired per round against the base in the same run; noisy on shared cores).

Rows: ``base`` (diffusers' own processors; in training: the frozen UNet with the backward pass to the latents that
any tuner inside it needs), ``res_attn`` (unfused, default config), ``res_attn [reference]`` (the same model and
call under ``forced_paths("reference")``: the separate branch), ``res_attn [fast]`` (sampling: under
``forced_paths("fast")``, the extra heads), ``res_attn [extra heads]`` (training: forced fast paths with
``ResTunerAttnProcessor.extra_heads_training`` on), ``peft_lora`` (rank matched to Res-Attn's parameters,
:mod:`.peers`), ``res_lora``, ``glora`` (default forms), ``glora (peft's config)`` and ``peft_glora`` (the forms
both express, peft's GLoRA: :func:`.train_step.build_cases`), ``surm_ldr`` and, in training, ``surm_ldr [run-3
dense]`` (its CUDA delta formed as in GPU run 3, ``LDRMatrix.use_strided_matmul``). GLoRA's merged path is forced by
``forced_paths("fast")`` but not taken on CUDA unforced (``GLoRA.merge_on_cuda``): for GLoRA the column ``ops`` is
the CUDA default. Modes: ``sampling`` (one forward under ``no_grad``, eval) and ``training`` (forward, MSE loss,
backward, AdamW step with its multi-tensor kernels as on CUDA: :func:`.train_step.make_train_step`). On
CPU each row is also counted with ``forced_paths("fast")`` -- the paths CUDA takes automatically (extra heads,
padded heads, merged linears) -- so the column ``ops, CUDA paths`` is what a GPU would dispatch.

    python -m benchmarks.perf.host_overhead                      # CPU, 1 thread, writes results/host_overhead.*
    python -m benchmarks.perf.host_overhead --device cuda --out OUT/host_overhead.json   # same code on a GPU
    python -m benchmarks.perf.host_overhead --dtype bf16         # on CPU: the autocast casts of mixed precision
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from resattn_diffusion.testing import SD15_UNET_CONFIG
from resattn_diffusion.tuners.fast_paths import forced_paths

from . import gpu_suite, sampling, train_step
from .common import (
    DTYPES,
    RESULTS_DIR,
    BenchmarkSize,
    Timing,
    benchmark_inputs,
    configure_threads,
    dispatched_ops,
    free_device_memory,
    frozen_unet,
    interleaved_timings,
    log,
    machine_info,
    markdown_table,
    paired_ratio,
    ratio,
    write_json,
)

BASE = "base"
#: Res-Attn with ``forced_paths("reference")`` (the separate branch of the CPU default; on a GPU: the fast paths'
#: gain, measured in the same run). On CPU it equals ``res_attn``.
RES_ATTN_REFERENCE = "res_attn [reference]"
#: Res-Attn's sampling forward with ``forced_paths("fast")``: the CUDA paths (the branch as extra heads of the
#: frozen attention), timed on any device -- on CPU, against ``res_attn [reference]`` in the same run.
RES_ATTN_FAST = "res_attn [fast]"
#: Res-Attn's training step on the fast paths with its branch as extra heads of the frozen attention in training
#: too (``ResTunerAttnProcessor.extra_heads_training``, off by default: this row measures it).
RES_ATTN_EXTRA_HEADS = gpu_suite.EXTRA_HEADS_ROW
#: Rows in table order: the base, Res-Attn (default, forced paths), its matched peer, the linear tuner with a merged
#: fast path, GLoRA at its default forms, GLoRA at the forms peft can express (``glora (peft's config)``) and peft's
#: GLoRA with those forms (:func:`.train_step.build_cases`), SURM LDR and, in training, LDR with run 3's dense delta.
ROWS = (
    BASE,
    "res_attn",
    RES_ATTN_REFERENCE,
    RES_ATTN_FAST,
    RES_ATTN_EXTRA_HEADS,
    "peft_lora",
    "res_lora",
    "glora",
    train_step.GLORA_PEFT_CONFIG,
    train_step.PEFT_GLORA,
    "surm_ldr",
    gpu_suite.RUN3_DENSE_ROW,
)
OUR_TUNERS = ("res_attn", "res_lora", "glora", "surm_ldr")
MODES = ("sampling", "training")
#: Interleaved timed rounds per mode (a call takes milliseconds here).
DEFAULT_REPEATS = 15
#: Seconds of the budget kept for writing the results after the last guarded step.
GUARD_MARGIN_S = 3.0


def host_unet_config(latent: int = 16) -> dict[str, Any]:
    """SD 1.5's UNet (``SD15_UNET_CONFIG``: block types, 2 layers per block, 8 heads, 16 transformer blocks) at
    widths (32, 32, 64, 64), a 32-wide text context and ``latent``-square latents: the same modules, calls and
    branches as SD 1.5, with compute small enough that the host work shows. (At 16x16 latents the self-attentions
    of the third level and the mid block see 16 and 4 tokens: there a branch takes the few-keys path, where SD 1.5
    at 512 px, with 256 and 64 tokens, takes SDPA.)"""
    config = copy.deepcopy(SD15_UNET_CONFIG)
    config.update(block_out_channels=[32, 32, 64, 64], cross_attention_dim=32, sample_size=latent)
    return config


def host_size(device: str = "cpu", dtype: str = "fp32", repeats: int = DEFAULT_REPEATS, tiny: bool = False):
    """The benchmark's :class:`~.common.BenchmarkSize` (``tiny``: the test suite's UNet, one round)."""
    if tiny:
        return dataclasses.replace(BenchmarkSize.tiny(), device=device, dtype=dtype)
    return BenchmarkSize("host", host_unet_config(), 2, 77, repeats, warmup=2, device=device, dtype=dtype)


def attention_count(unet: nn.Module) -> int:
    """Attentions of the UNet's transformer blocks (``attn1`` and ``attn2``): where Res-Attn adds a branch."""
    from diffusers.models.attention_processor import Attention

    return sum(
        1 for name, module in unet.named_modules() if isinstance(module, Attention) and ".transformer_blocks." in name
    )


def build_calls(size: BenchmarkSize, with_peers: bool = True) -> tuple[dict[str, dict[str, Any]], int]:
    """(mode -> row -> ``{"call": fn, "parameters": n}``, the UNet's attention count), on fresh copies of one
    frozen UNet (sampling rows from :func:`.sampling.build_cases`, training rows from
    :func:`.train_step.build_cases`)."""
    base = frozen_unet(size)
    inputs = benchmark_inputs(base, size)
    calls: dict[str, dict[str, Any]] = {mode: {} for mode in MODES}
    for case in sampling.build_cases(base, list(OUR_TUNERS), with_peers, modes=("unfused",)):
        name = case["tuner"] or BASE
        if "unet" in case:
            calls["sampling"][name] = {
                "call": sampling._forward(case["unet"], inputs),
                "parameters": case.get("trainable_parameters", 0),
            }
    peer_rows = (train_step.PEFT_LORA, train_step.PEFT_GLORA) if with_peers else ()
    if with_peers:
        # sampling.build_cases has no GLoRA peer: the forward of the training cases' GLoRA pair, on their own copies
        for case in train_step.build_cases(base, [], with_peers, peer_rows=(train_step.PEFT_GLORA,)):
            if case.group != "floor" and case.error is None:
                calls["sampling"][case.name] = {
                    "call": sampling._forward(case.unet, inputs),
                    "parameters": case.parameter_count,
                }
    for case in train_step.build_cases(base, list(OUR_TUNERS), with_peers, peer_rows=peer_rows):
        name = BASE if case.group == "floor" else case.name
        if case.error is None:
            # AdamW's multi-tensor form, as on CUDA: torch's CPU default loops over the parameters, which would
            # count ~10 ops per trainable tensor that a GPU never dispatches.
            step = train_step.make_train_step(case, inputs, autocast=size.autocast, foreach=True)
            calls["training"][name] = {"call": step, "parameters": case.parameter_count}
    for mode in MODES:
        if "res_attn" in calls[mode]:
            row = calls[mode]["res_attn"]
            calls[mode][RES_ATTN_REFERENCE] = dict(row, call=_forcing(row["call"], "reference"))
            if mode == "sampling":
                calls[mode][RES_ATTN_FAST] = dict(row, call=_forcing(row["call"], "fast"))
            else:
                extra_heads = _within(row["call"], gpu_suite.extra_heads_in_training)
                calls[mode][RES_ATTN_EXTRA_HEADS] = dict(row, call=_forcing(extra_heads, "fast"))
        if mode == "training" and "surm_ldr" in calls[mode]:
            row = calls[mode]["surm_ldr"]
            calls[mode][gpu_suite.RUN3_DENSE_ROW] = dict(row, call=_within(row["call"], gpu_suite.run3_dense))
        calls[mode] = {name: calls[mode][name] for name in ROWS if name in calls[mode]}
    return calls, attention_count(base)


def _forcing(call: Callable[[], None], path: str) -> Callable[[], None]:
    """``call`` under ``forced_paths(path)`` (a path forced inside ``call`` wins: the innermost does)."""
    return _within(call, lambda: forced_paths(path))


def _within(call: Callable[[], None], context: Callable[[], Any]) -> Callable[[], None]:
    def inside() -> None:
        with context():
            call()

    return inside


def measure_mode(
    mode: str,
    rows: dict[str, dict[str, Any]],
    size: BenchmarkSize,
    attentions: int,
    deadline: float | None = None,
) -> list[dict[str, Any]]:
    """Op counts (as run, and on CPU with the CUDA paths forced) and interleaved wall times of every row."""
    on_cpu = torch.device(size.device).type == "cpu"
    counts: dict[str, dict[str, int]] = {}
    counts_cuda_paths: dict[str, dict[str, int]] = {}
    for name, row in rows.items():
        row["call"]()  # warm: lazily built state (a bank's branch list, the optimizer's moments) is not counted
        counts[name] = dict(dispatched_ops(row["call"]))
        if on_cpu:
            forced = _forcing(row["call"], "fast")
            forced()
            counts_cuda_paths[name] = dict(dispatched_ops(forced))
    log(f"host_overhead: {mode}: timing {len(rows)} rows x {size.repeats} interleaved rounds")
    timings = interleaved_timings(
        {name: row["call"] for name, row in rows.items()},
        size.repeats,
        size.warmup,
        clock="wall",
        device=size.device,
        deadline=deadline,
    )
    base = timings.get(BASE)
    base_timing = base.as_dict() if base is not None else None
    base_ops = sum(counts.get(BASE, {}).values()) or None
    base_ops_cuda = sum(counts_cuda_paths.get(BASE, {}).values()) or None
    results = []
    for name, row in rows.items():
        timing = timings.get(name)
        ops = sum(counts[name].values())
        ops_cuda = sum(counts_cuda_paths[name].values()) if name in counts_cuda_paths else None
        results.append(
            {
                "name": name,
                "mode": mode,
                "trainable_parameters": row["parameters"],
                "ops": ops,
                "ops_vs_base": ratio(ops, base_ops),
                "extra_ops_per_attention": None if base_ops is None else (ops - base_ops) / attentions,
                "ops_cuda_paths": ops_cuda,
                "ops_cuda_paths_vs_base": ratio(ops_cuda, base_ops_cuda),
                "extra_ops_per_attention_cuda_paths": (
                    None if ops_cuda is None or base_ops_cuda is None else (ops_cuda - base_ops_cuda) / attentions
                ),
                "wall_ms": None if timing is None else 1000 * timing.median,
                "wall_spread": None if timing is None else timing.spread,
                "wall_vs_base": None if timing is None else paired_ratio(timing.as_dict(), base_timing),
                # this process's CPU time: with one thread, what preemption by other processes inflates least
                "cpu_ms": None if timing is None else 1000 * statistics.median(timing.cpu),
                "cpu_vs_base": None if timing is None else paired_ratio(_on_cpu_clock(timing), _on_cpu_clock(base)),
                "timing": None if timing is None else timing.as_dict(),
                "op_counts": counts[name],
                "op_counts_cuda_paths": counts_cuda_paths.get(name),
            }
        )
    return results


def _on_cpu_clock(timing: Timing | None) -> dict[str, Any] | None:
    """``timing.as_dict()`` read on the process-CPU-time clock (for :func:`~.common.paired_ratio`)."""
    return None if timing is None else dict(timing.as_dict(), clock="cpu")


def run(
    size: BenchmarkSize, with_peers: bool = True, deadline: float | None = None, out: Path | None = None
) -> dict[str, Any]:
    """Both modes; with ``out``, the JSON and markdown are written after each mode (a killed run keeps the first)."""
    log(f"host_overhead: building rows on the {size.name} UNet ({size.device}, {size.dtype})")
    calls, attentions = build_calls(size, with_peers)
    result: dict[str, Any] = {
        "benchmark": "host_overhead",
        "clock": "wall",
        "size": size.describe(),
        "attentions": attentions,
        "machine": machine_info(),
        "rows": [],
    }
    for mode in MODES:
        if deadline is not None and time.perf_counter() > deadline and result["rows"]:
            log(f"host_overhead: time guard: {mode} not measured")
            break
        result["rows"] += measure_mode(mode, calls[mode], size, attentions, deadline)
        if out is not None:
            write_results(result, out)
        free_device_memory(size.device)
    return result


def write_results(result: dict[str, Any], out: Path) -> None:
    write_json(out, result)
    Path(out).with_suffix(".md").write_text(to_markdown(result) + "\n")


def to_markdown(result: dict[str, Any]) -> str:
    size = result["size"]
    machine = result["machine"]
    device = machine["gpu"]["name"] if machine.get("gpu") and size["device"] != "cpu" else machine["processor"]
    lines = [
        "# Host overhead (issue 14)",
        "",
        f"SD 1.5 block structure at widths {size['block_out_channels']}, {size['latent_size']}² latents, batch "
        f"{size['batch_size']}, {size['context_tokens']} context tokens, {size['dtype']}, {size['device']} "
        f"({device}, {machine['torch_threads']} thread(s), torch {machine['torch']}, load "
        f"{machine['load_average_1_5_15min']}); {result['attentions']} attentions. `ops`: aten ops dispatched by one "
        "call (forward, and in training backward and AdamW), deterministic; `extra / attention`: (ops - base ops) / "
        "attentions. Wall and this process's CPU time: medians of interleaved rounds, ratios paired per round "
        "against the base (noisy on shared cores, the wall clock most: quote the op counts).",
    ]
    for mode in MODES:
        rows = [row for row in result["rows"] if row["mode"] == mode]
        if not rows:
            continue
        cuda_column = any(row["ops_cuda_paths"] is not None for row in rows)
        headers = ["row", "params", "ops", "ops × base", "extra / attention"]
        headers += ["ops, CUDA paths", "extra / attention, CUDA paths"] if cuda_column else []
        headers += ["wall ms", "wall × base", "CPU ms", "CPU × base"]
        table = []
        for row in rows:
            cells = [row["name"], row["trainable_parameters"], row["ops"], row["ops_vs_base"]]
            cells.append(_one_decimal(row["extra_ops_per_attention"]))
            if cuda_column:
                cells += [row["ops_cuda_paths"], _one_decimal(row["extra_ops_per_attention_cuda_paths"])]
            cells += [row["wall_ms"], row["wall_vs_base"], row["cpu_ms"], row["cpu_vs_base"]]
            table.append(cells)
        title = "one forward under no_grad" if mode == "sampling" else "one training step (base: backward to latents)"
        lines += ["", f"## {mode}: {title}", "", markdown_table(headers, table)]
    return "\n".join(lines)


def _one_decimal(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="'cpu' (default) or 'cuda'")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="frozen weights (default fp32; CUDA fp16)"
    )
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help="interleaved timed rounds per mode")
    parser.add_argument("--threads", default="1", help="torch threads (default 1: host work, not parallel compute)")
    parser.add_argument("--tiny", action="store_true", help="the test suite's tiny UNet, one round (smoke test)")
    parser.add_argument("--no-peers", action="store_true", help="leave out peft LoRA")
    parser.add_argument("--out", default=str(RESULTS_DIR / "host_overhead.json"), help="JSON path (.md beside it)")
    parser.add_argument("--budget", type=float, default=None, help="seconds: no timed round starts after them")
    parser.add_argument("--started-at", type=float, default=None, help="epoch seconds the process was launched")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch sees no CUDA device here (torch {torch.__version__})")
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
    configure_threads(args.threads)
    dtype = args.dtype or ("fp32" if torch.device(args.device).type == "cpu" else "fp16")
    size = host_size(args.device, dtype, 1 if args.tiny else args.repeats, args.tiny)
    deadline = None
    if args.budget is not None:
        already = 0.0 if args.started_at is None else max(0.0, time.time() - args.started_at)
        deadline = start + args.budget - already - GUARD_MARGIN_S
    result = run(size, not args.no_peers, deadline, Path(args.out))
    print(to_markdown(result))
    return result


if __name__ == "__main__":
    main()
