"""Training step time and peak memory of every tuner, against the peers and against the frozen floor.

One training step: UNet forward on noisy latents, MSE loss against a noise target, backward, AdamW step on the
trainable parameters. Rows:

* ``floor`` -- the frozen UNet with the latents requiring grad: the forward plus the backward to the inputs,
  which any tuner inside the UNet needs as well (the gradient must flow back to the earliest branch); no
  parameter gradient, no optimizer.
* every registered tuner at its default size and targets (``ResTunerConfig(name)``);
* ``glora (peft's config)`` -- our GLoRA with support-tensor forms peft's GLoRA can express, beside it:
* ``peft_glora`` -- peft's GLoRA with the same forms and rank;
* ``peft_lora`` -- peft LoRA through diffusers at the rank whose parameters match Res-Attn's;
* ``peft_c3a (~surm_circulant)``, ``peft_c3a (~surm_toeplitz)`` -- peft's block-circulant C3A with per-layer
  block sizes matching the parameters of SURM circulant / Toeplitz.

Ratios: step time and peak memory over the floor's, over peft LoRA's, and over the matched peer's; time ratios
are medians of the per-round ratios (:func:`~benchmarks.perf.common.paired_ratio`).

On a GPU (``--device cuda --size sd15|sd21|sdxl --dtype fp16|bf16``) every case follows the training scripts'
precision recipe: frozen weights in ``--dtype``, trainable parameters (ours and the peers') in fp32, the forward
under autocast; times are CUDA-synchronised, memory is the allocator's peak above what was resident. A case that
fails (e.g. out of memory) is recorded as that row's error and the others go on.

Run alone: ``python -m benchmarks.perf.train_step [--tiny] [--repeats N] [--threads N] [--device cuda --size sd15]``.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from resattn_diffusion import ResTunerConfig, add_res_tuner, res_tuner_parameters, tuner_names
from resattn_diffusion.integration.families.unet import UNetFamily
from resattn_diffusion.tuners.glora import parse_layer_config

from . import peers
from .common import (
    RESULTS_DIR,
    BenchmarkSize,
    add_common_arguments,
    benchmark_inputs,
    cast_trainable_to_fp32,
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
    peak_memory_bytes,
    ratio,
    size_from_args,
    write_json,
)

FLOOR = "floor"
PEFT_LORA = "peft_lora"
PEFT_GLORA = "peft_glora"
GLORA_PEFT_CONFIG = "glora (peft's config)"
#: GLoRA forms both implementations can express (peft ties A to B and D to E); rank from our default.
GLORA_COMPARISON_FORMS = "A=lora,B=lora,C=vector,D=vector,E=vector"
C3A_CIRCULANT = "peft_c3a (~surm_circulant)"
C3A_TOEPLITZ = "peft_c3a (~surm_toeplitz)"

#: Our row -> the peer row it is matched with (same configuration or matched parameters).
MATCHED_PEERS = {
    "res_attn": PEFT_LORA,
    GLORA_PEFT_CONFIG: PEFT_GLORA,
    "surm_circulant": C3A_CIRCULANT,
    "surm_toeplitz": C3A_TOEPLITZ,
}


@dataclass
class Case:
    """One row: a frozen UNet with (or without) a tuner, and how it is trained."""

    name: str
    group: str  # "floor", "ours" or "peer"
    description: str
    unet: nn.Module | None = None
    parameters: list[nn.Parameter] = field(default_factory=list)
    error: str | None = None

    @property
    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters)


def _our_case(base: nn.Module, name: str, config: ResTunerConfig, description: str) -> Case:
    try:
        unet = clone_unet(base)
        add_res_tuner(unet, config)
    except Exception as error:  # a tuner that cannot sit on this UNet (or out of memory) is reported, not fatal
        return Case(name, "ours", description, error=describe_error(error))
    return _with_fp32_trainables(Case(name, "ours", description, unet, res_tuner_parameters(unet)), base)


def _peer_case(base: nn.Module, name: str, description: str, attach: Callable[[nn.Module], None]) -> Case:
    try:
        unet = clone_unet(base)
        attach(unet)
    except Exception as error:
        return Case(name, "peer", description, error=describe_error(error))
    return _with_fp32_trainables(Case(name, "peer", description, unet, peers.trainable_parameters(unet)), base)


def _with_fp32_trainables(case: Case, base: nn.Module) -> Case:
    """Frozen weights below fp32: the trainable parameters in fp32 (the training scripts' recipe)."""
    if next(base.parameters()).dtype != torch.float32:
        cast_trainable_to_fp32(case.parameters)
    return case


def our_tuner_configs(names: list[str] | None = None) -> dict[str, ResTunerConfig]:
    """Every registered tuner (or ``names``) at its default size and targets."""
    configs = {}
    for name in names if names is not None else tuner_names():
        configs[name] = ResTunerConfig(name)
    return configs


def glora_comparison_config() -> ResTunerConfig:
    return ResTunerConfig("glora", config=GLORA_COMPARISON_FORMS)


#: Every peer row (``build_cases(peer_rows=...)`` picks some).
PEER_ROWS = (PEFT_LORA, PEFT_GLORA, C3A_CIRCULANT, C3A_TOEPLITZ)


def build_cases(
    base: nn.Module,
    tuners: list[str] | None = None,
    with_peers: bool = True,
    peer_rows: tuple[str, ...] = PEER_ROWS,
    extra_configs: dict[str, ResTunerConfig] | None = None,
) -> list[Case]:
    """The floor, our tuners (and ``extra_configs``: row name -> config, e.g. Res-Attn with other heads) and the
    peers in ``peer_rows`` (each on its own copy of ``base``)."""
    cases = [Case(FLOOR, "floor", "frozen UNet, backward to the latents", clone_unet(base))]
    configs = our_tuner_configs(tuners) | dict(extra_configs or {})
    for name, config in configs.items():
        cases.append(_our_case(base, name, config, get_description(config)))
    if not with_peers or not peers.peft_available():
        return cases

    # peft LoRA at Res-Attn's parameter count (Res-Attn at its default size, wherever it is in the list).
    res_attn_count = _parameter_count_of(base, ResTunerConfig("res_attn"))
    rank = peers.matched_lora_rank(base, res_attn_count)
    if PEFT_LORA in peer_rows:
        cases.append(
            _peer_case(
                base,
                PEFT_LORA,
                f"peft LoRA r{rank} (q,k,v,out), matched to res_attn",
                lambda u: peers.add_peft_lora(u, rank),
            )
        )

    if PEFT_GLORA in peer_rows and peers.peft_has("glora"):
        ours = glora_comparison_config()
        forms = parse_layer_config(ours.params.config, ours.params.rank)
        a_b, c, d_e = peers.glora_peft_forms(forms.A, forms.B, forms.C, forms.D, forms.E)
        cases.append(_our_case(base, GLORA_PEFT_CONFIG, ours, get_description(ours)))
        cases.append(
            _peer_case(
                base,
                PEFT_GLORA,
                f"peft GLoRA r{ours.params.rank} A,B={a_b} C={c} D,E={d_e}",
                lambda u: peers.add_peft_glora(u, ours.params.rank, a_b, c, d_e),
            )
        )

    if peers.peft_has("c3a"):
        from resattn_diffusion.tuners.structured import CirculantMatrix, ToeplitzMatrix

        for name, family in ((C3A_CIRCULANT, CirculantMatrix), (C3A_TOEPLITZ, ToeplitzMatrix)):
            if name not in peer_rows:
                continue
            sizes = peers.c3a_block_sizes(base, family.count_parameters)
            blocks = sorted(set(sizes.values()))
            cases.append(
                _peer_case(
                    base,
                    name,
                    f"peft C3A, block sizes {blocks} per layer",
                    lambda u, sizes=sizes: peers.add_peft_c3a(u, sizes),
                )
            )
    return cases


def get_description(config: ResTunerConfig) -> str:
    hyper = ", ".join(f"{k}={v}" for k, v in config.params.to_dict().items() if v not in ({}, "", False))
    targets = ",".join(config.targets or UNetFamily.default_targets)
    return f"{config.tuner}({hyper}) on {targets}"


def _parameter_count_of(base: nn.Module, config: ResTunerConfig) -> int:
    """Trainable parameters ``config`` puts on ``base`` (built on a throwaway copy)."""
    unet = clone_unet(base)
    add_res_tuner(unet, config)
    count = sum(p.numel() for p in res_tuner_parameters(unet))
    del unet
    free_device_memory(next(base.parameters()).device)
    return count


def make_train_step(
    case: Case,
    inputs: dict[str, Any],
    seed: int = 0,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    context: Callable[[], Any] = contextlib.nullcontext,
    foreach: bool | None = None,
) -> Callable[[], None]:
    """One training step of ``case``: forward (under ``autocast()``), MSE loss in fp32, backward, AdamW step
    (the floor: backward to the latents); the whole step inside ``context()`` (e.g. forcing a tuner's path).
    ``foreach``: AdamW's (None: torch's choice, the multi-tensor kernels on CUDA and a loop per parameter on CPU)."""
    unet = case.unet
    unet.train()
    generator = torch.Generator().manual_seed(seed + 1)
    sample = inputs["sample"].detach().clone()
    target = torch.randn(sample.shape, generator=generator).to(sample.device)
    optimizer = torch.optim.AdamW(case.parameters, lr=1e-4, foreach=foreach) if case.parameters else None
    if case.group == "floor":
        sample.requires_grad_(True)
    timestep, text = inputs["timestep"], inputs["encoder_hidden_states"]
    extra = {"added_cond_kwargs": inputs["added_cond_kwargs"]} if "added_cond_kwargs" in inputs else {}

    def step() -> None:
        with context():
            with autocast():
                prediction = unet(sample, timestep, encoder_hidden_states=text, return_dict=False, **extra)[0]
            loss = F.mse_loss(prediction.float(), target)
            loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            sample.grad = None

    return step


def run(
    size: BenchmarkSize,
    tuners: list[str] | None = None,
    with_peers: bool = True,
    measure_memory: bool = True,
    clock: str | None = None,
    peer_rows: tuple[str, ...] = PEER_ROWS,
    extra_configs: dict[str, ResTunerConfig] | None = None,
    deadline: float | None = None,
    checkpoint: Callable[[dict[str, Any]], None] | None = None,
    case_contexts: dict[str, Callable[[], Any]] | None = None,
) -> dict[str, Any]:
    """Measure every case; returns the JSON-ready result (rows with times, memory, parameters and ratios).

    ``case_contexts[name]()`` is a context every step of that row runs in (e.g. forcing the reference paths).
    ``deadline`` (a ``time.perf_counter()`` value) stops the timed rounds early (after at least one) and skips
    the memory measurements left when it has passed; ``checkpoint(result)`` is called with the result so far after
    the timings and after each memory measurement (to write partial results that survive a kill).
    """
    log(f"train_step: building cases on the {size.name} UNet ({size.device}, {size.dtype})")
    base = frozen_unet(size)
    inputs = benchmark_inputs(base, size)
    cases = build_cases(base, tuners, with_peers, peer_rows, extra_configs)
    del base
    free_device_memory(size.device)
    runnable = [case for case in cases if case.error is None]
    contexts = case_contexts or {}
    steps = {
        case.name: make_train_step(
            case, inputs, autocast=size.autocast, context=contexts.get(case.name, contextlib.nullcontext)
        )
        for case in runnable
    }
    log(f"train_step: timing {len(steps)} cases x {size.repeats} interleaved rounds")
    clock = clock or default_clock()
    errors: dict[str, str] = {}
    if checkpoint is not None:  # the rows as built (parameter counts, build errors), should the timing be killed
        checkpoint(_result(size, clock, cases, {}, {}, errors))
    timings = interleaved_timings(
        steps,
        size.repeats,
        size.warmup,
        clock,
        progress=lambda m: log(f"train_step: {m}"),
        device=size.device,
        errors=errors,
        deadline=deadline,
    )
    memory: dict[str, int] = {}

    def result() -> dict[str, Any]:
        return _result(size, clock, cases, timings, memory, errors)

    if checkpoint is not None:
        checkpoint(result())
    if measure_memory:
        for name, step in steps.items():
            if name in errors:
                continue
            if deadline is not None and time.perf_counter() > deadline:
                log(f"train_step: time guard: peak memory of {name} and the rows after it not measured")
                break
            try:
                step()  # optimizer state and gradients as after a first step, so every measured step is alike
                memory[name] = peak_memory_bytes(step, size.device)
            except Exception as error:
                errors[name] = describe_error(error)
                free_device_memory(size.device)
            if checkpoint is not None:
                checkpoint(result())
    return result()


def _result(
    size: BenchmarkSize,
    clock: str,
    cases: list[Case],
    timings: dict[str, Any],
    memory: dict[str, int],
    errors: dict[str, str],
) -> dict[str, Any]:
    rows = []
    for case in cases:
        timing = timings.get(case.name)
        error = case.error or errors.get(case.name)
        rows.append(
            {
                "name": case.name,
                "group": case.group,
                "description": case.description,
                "trainable_parameters": case.parameter_count if case.error is None else None,
                "error": error,
                "step_s": None if timing is None else timing.median,
                "step_spread": None if timing is None else timing.spread,
                "timing": None if timing is None else timing.as_dict(),
                "peak_memory_mb": None if case.name not in memory else memory[case.name] / 2**20,
                "matched_peer": MATCHED_PEERS.get(case.name),
            }
        )
    _add_ratios(rows)
    return {
        "benchmark": "train_step",
        "clock": clock,
        "size": size.describe(),
        "machine": machine_info(),
        "rows": rows,
    }


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    by_name = {row["name"]: row for row in rows}
    floor = by_name.get(FLOOR, {})
    lora = by_name.get(PEFT_LORA, {})
    for row in rows:
        peer = by_name.get(row["matched_peer"] or "", {})
        row["time_vs_floor"] = paired_ratio(row["timing"], floor.get("timing"))
        row["time_vs_peft_lora"] = paired_ratio(row["timing"], lora.get("timing"))
        row["time_vs_matched_peer"] = paired_ratio(row["timing"], peer.get("timing"))
        row["memory_vs_floor"] = ratio(row["peak_memory_mb"], floor.get("peak_memory_mb"))
        row["memory_vs_peft_lora"] = ratio(row["peak_memory_mb"], lora.get("peak_memory_mb"))
        row["memory_vs_matched_peer"] = ratio(row["peak_memory_mb"], peer.get("peak_memory_mb"))


def to_markdown(result: dict[str, Any]) -> str:
    headers = [
        "row",
        "trainable params",
        "step (s)",
        "× floor",
        "× peft LoRA",
        "matched peer",
        "× peer",
        "peak MB",
        "mem × floor",
        "mem × peer",
    ]
    table = []
    for row in result["rows"]:
        if row["error"] and row["step_s"] is None:
            table.append([row["name"], "–", f"error: {row['error'][:80]}"] + ["–"] * (len(headers) - 3))
            continue
        table.append(
            [
                row["name"],
                row["trainable_parameters"],
                _seconds(row["step_s"]),
                row["time_vs_floor"],
                row["time_vs_peft_lora"],
                row["matched_peer"] or "–",
                row["time_vs_matched_peer"],
                row["peak_memory_mb"],
                row["memory_vs_floor"],
                row["memory_vs_matched_peer"],
            ]
        )
    notes = "\n".join(f"- `{row['name']}`: {row['description']}" for row in result["rows"])
    return markdown_table(headers, table) + "\n\nRows:\n" + notes


def _seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--tuners", nargs="*", default=None, help="only these of our tuners (default: all registered)")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--out", default=str(RESULTS_DIR / "train_step.json"))
    args = parser.parse_args(argv)
    configure_threads(args.threads)
    size = size_from_args(args)
    result = run(size, args.tuners, not args.no_peers, not args.no_memory, args.clock)
    write_json(args.out, result)
    print(to_markdown(result))
    return result


if __name__ == "__main__":
    main()
