"""Training step time and peak memory of our tuners on diffusion transformers, against peft LoRA on the same layers.

Two model shapes, both with their real width and fewer blocks (so they fit one GPU and a short run):

* ``flux``: a FLUX.1-shaped ``FluxTransformer2DModel``: width 3072 (24 heads x 128), T5 context 4096, 64 packed
  latent channels, guidance embedding; 2 double-stream and 4 single-stream blocks (FLUX.1 has 19 and 38).
  512 x 512 images: 1024 image tokens, 512 text tokens.
* ``sd3``: an SD3-medium-shaped ``SD3Transformer2DModel``: width 1536 (24 heads x 64), patch 2 on 16 latent channels;
  4 joint blocks (SD3-medium has 24). 512 x 512 images: 1024 image tokens, 333 text tokens (CLIP 77 + T5 256).

One training step: forward on random latents and text states, MSE loss against a random flow target, backward,
AdamW step on the trainable parameters. Frozen weights in ``--dtype`` (bf16 on CUDA), trainable parameters in
float32 and the forward under autocast, as diffusers' SD3/Flux LoRA scripts train. Rows per shape:

* ``floor``: the frozen model with the latents requiring grad (forward + backward to the input, no optimizer);
* ``res_attn`` on every joint attention (its default targets), and the linear tuners (``res_lora``, ``glora``,
  ``surm_*``) beside every attention projection of both streams (their default targets and projections);
* ``peft_lora``: peft LoRA at ``res_lora``'s rank on exactly the linears ``res_lora`` sits beside.

Ratios: step time and peak memory over peft LoRA's and over the floor's, measured in the same run on the same
device. Time: median over ``--repeats`` steps after a warm-up (CUDA synchronised around every step). Memory: on
CUDA the peak allocated during one step above what was allocated before it; on CPU the dispatch-mode tracker of
:func:`~benchmarks.perf.common.peak_memory_bytes`.

A time guard (``--time_limit``, 90 s by default on CUDA) skips the cases it would not finish and says so; the JSON
goes to ``--out`` (a folder; ``transformer_step.json``). ``--tiny`` runs both shapes at width 64 with one block
each kind on the CPU in seconds (the test suite runs it; its numbers mean nothing).

Run: ``python -m benchmarks.perf.transformer_step --device cuda --out results/`` (or ``--device cpu --tiny``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from resattn_diffusion import ResTunerConfig, add_res_tuner, remove_res_tuner, res_tuner_parameters
from resattn_diffusion.integration.api import find_layers

from . import peers
from .common import (
    configure_threads,
    interleaved_timings,
    log,
    machine_info,
    markdown_table,
    peak_memory_bytes,
    ratio,
    write_json,
)

FLOOR = "floor"
PEFT_LORA = "peft_lora"
#: Our rows: the headline attention tuner and the linear tuners (peft LoRA's like-for-like rivals).
OUR_TUNERS = ("res_attn", "res_lora", "glora", "surm_circulant", "surm_toeplitz", "surm_kronecker", "surm_ldr")
RESULT_NAME = "transformer_step.json"


@dataclass(frozen=True)
class Shape:
    """A transformer shape: the diffusers class, its config, and the sizes of one batch."""

    name: str
    model_class: str
    config: dict[str, Any]
    batch_size: int
    image_tokens: int  # after patching / packing
    text_tokens: int


def shapes(tiny: bool) -> list[Shape]:
    if tiny:
        return [
            Shape(
                "flux",
                "FluxTransformer2DModel",
                {
                    "patch_size": 1,
                    "in_channels": 16,
                    "num_layers": 1,
                    "num_single_layers": 1,
                    "attention_head_dim": 16,
                    "num_attention_heads": 4,
                    "joint_attention_dim": 32,
                    "pooled_projection_dim": 24,
                    "guidance_embeds": True,
                    "axes_dims_rope": (4, 6, 6),
                },
                batch_size=1,
                image_tokens=16,
                text_tokens=8,
            ),
            Shape(
                "sd3",
                "SD3Transformer2DModel",
                {
                    "sample_size": 8,
                    "patch_size": 2,
                    "in_channels": 16,
                    "out_channels": 16,
                    "num_layers": 2,
                    "attention_head_dim": 16,
                    "num_attention_heads": 4,
                    "joint_attention_dim": 32,
                    "caption_projection_dim": 64,
                    "pooled_projection_dim": 24,
                    "pos_embed_max_size": 16,
                },
                batch_size=1,
                image_tokens=16,
                text_tokens=8,
            ),
        ]
    return [
        # FLUX.1-dev's config.json with fewer blocks.
        Shape(
            "flux",
            "FluxTransformer2DModel",
            {
                "patch_size": 1,
                "in_channels": 64,
                "num_layers": 2,
                "num_single_layers": 4,
                "attention_head_dim": 128,
                "num_attention_heads": 24,
                "joint_attention_dim": 4096,
                "pooled_projection_dim": 768,
                "guidance_embeds": True,
                "axes_dims_rope": (16, 56, 56),
            },
            batch_size=1,
            image_tokens=1024,
            text_tokens=512,
        ),
        # SD3-medium's config.json with fewer blocks, at 512 px (64 x 64 latents).
        Shape(
            "sd3",
            "SD3Transformer2DModel",
            {
                "sample_size": 64,
                "patch_size": 2,
                "in_channels": 16,
                "out_channels": 16,
                "num_layers": 4,
                "attention_head_dim": 64,
                "num_attention_heads": 24,
                "joint_attention_dim": 4096,
                "caption_projection_dim": 1536,
                "pooled_projection_dim": 2048,
                "pos_embed_max_size": 192,
            },
            batch_size=1,
            image_tokens=1024,
            text_tokens=333,
        ),
    ]


def build_model(shape: Shape, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """The frozen transformer, initialised directly on ``device`` (a Flux-width model is slow to initialise on CPU)."""
    import diffusers

    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with torch.device(device):
            model = getattr(diffusers, shape.model_class)(**shape.config)
    model = model.to(dtype).requires_grad_(False)
    return model.train()  # training mode (no dropout in these models): what a training step runs


def make_inputs(model: nn.Module, shape: Shape, seed: int = 0) -> dict[str, Any]:
    config = model.config
    device, dtype = model.device, model.dtype
    generator = torch.Generator().manual_seed(seed)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=generator).to(device, dtype)

    batch = shape.batch_size
    inputs: dict[str, Any] = {
        "encoder_hidden_states": randn(batch, shape.text_tokens, config.joint_attention_dim),
        "pooled_projections": randn(batch, config.pooled_projection_dim),
    }
    if shape.model_class == "FluxTransformer2DModel":
        side = int(shape.image_tokens**0.5)
        ids = torch.zeros(side, side, 3)
        ids[..., 1] = torch.arange(side)[:, None]
        ids[..., 2] = torch.arange(side)[None, :]
        inputs.update(
            {
                "hidden_states": randn(batch, shape.image_tokens, config.in_channels),
                "timestep": torch.rand(batch, generator=generator).to(device, dtype),
                "img_ids": ids.reshape(-1, 3).to(device, dtype),
                "txt_ids": torch.zeros(shape.text_tokens, 3).to(device, dtype),
                "guidance": torch.full((batch,), 3.5).to(device, dtype),
            }
        )
    else:
        size = config.sample_size
        inputs.update(
            {
                "hidden_states": randn(batch, config.in_channels, size, size),
                "timestep": (torch.rand(batch, generator=generator) * 1000).to(device),
            }
        )
    return inputs


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def make_step(
    model: nn.Module, inputs: dict[str, Any], parameters: list[nn.Parameter], dtype: torch.dtype
) -> Callable[[], None]:
    """One training step. Without parameters (the floor) the latents require grad and no optimizer runs."""
    device = model.device
    inputs = dict(inputs)
    target = torch.randn_like(inputs["hidden_states"])
    optimizer = torch.optim.AdamW(parameters, lr=1e-4) if parameters else None
    if optimizer is None:
        inputs["hidden_states"] = inputs["hidden_states"].detach().requires_grad_(True)

    def step() -> None:
        with _autocast(device, dtype):
            prediction = model(**inputs, return_dict=False)[0]
        loss = F.mse_loss(prediction.float(), target.float())
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            inputs["hidden_states"].grad = None
        _synchronize(device)

    return step


def step_memory(step: Callable[[], None], device: torch.device) -> int:
    """Peak memory one step adds to what is allocated before it (after a warm-up created the optimizer state)."""
    if device.type != "cuda":
        return peak_memory_bytes(step)
    gc.collect()
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    return torch.cuda.max_memory_allocated(device) - before


@dataclass
class Attached:
    """A case on the shared frozen model: its trainable parameters and how to take it off again."""

    description: str
    parameters: list[nn.Parameter]
    detach: Callable[[], None]


def attach_ours(model: nn.Module, tuner: str) -> Attached:
    config = ResTunerConfig(tuner)
    paths = add_res_tuner(model, config)
    parameters = res_tuner_parameters(model)
    for parameter in parameters:  # trainable weights in float32, as diffusers' cast_training_params does
        parameter.data = parameter.data.float()
    return Attached(f"{tuner} on {len(paths)} layers", parameters, lambda: remove_res_tuner(model))


def attach_peft_lora(model: nn.Module, rank: int) -> Attached:
    """peft LoRA (through diffusers' ``add_adapter``) on exactly the linears res_lora sits beside."""
    from peft import LoraConfig

    paths = [layer.path for layer in find_layers(model, ResTunerConfig("res_lora", rank=rank))]
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=paths))
    parameters = [p for n, p in model.named_parameters() if "lora_" in n]
    for parameter in parameters:
        parameter.data = parameter.data.float()

    def detach() -> None:
        model.delete_adapters(model.active_adapters())

    return Attached(f"peft LoRA r{rank} on {len(paths)} linears", parameters, detach)


def run_shape(
    shape: Shape,
    device: torch.device,
    dtype: torch.dtype,
    repeats: int,
    warmup: int,
    deadline: float,
    tuners: tuple[str, ...],
) -> dict[str, Any]:
    started = time.perf_counter()
    model = build_model(shape, device, dtype)
    inputs = make_inputs(model, shape)
    frozen = sum(p.numel() for p in model.parameters())
    log(f"{shape.name}: {frozen / 1e6:.1f}M frozen parameters, built in {time.perf_counter() - started:.1f} s")
    lora_rank = ResTunerConfig("res_lora").params.rank
    attachers: dict[str, Callable[[], Attached]] = {
        FLOOR: lambda: Attached("frozen, backward to the latents", [], lambda: None)
    }
    for tuner in tuners:
        attachers[tuner] = lambda tuner=tuner: attach_ours(model, tuner)
    if peers.peft_available():
        attachers[PEFT_LORA] = lambda: attach_peft_lora(model, lora_rank)
    rows: list[dict[str, Any]] = []
    last_case_s = 0.0
    for name, attach in attachers.items():
        if time.perf_counter() + 1.5 * last_case_s > deadline:
            rows.append({"case": name, "skipped": "time guard"})
            log(f"{shape.name}/{name}: skipped (time guard)")
            continue
        case_start = time.perf_counter()
        try:
            attached = attach()
        except Exception as error:  # a tuner that cannot sit on this model: its row says why, the others go on
            rows.append({"case": name, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"})
            log(f"{shape.name}/{name}: FAILED to attach: {rows[-1]['error']}")
            continue
        try:
            step = make_step(model, inputs, attached.parameters, dtype)
            timing = interleaved_timings({name: step}, repeats=repeats, warmup=warmup, clock="wall")[name]
            memory = step_memory(step, device)
        except Exception as error:  # recorded in its row; a CUDA fault poisons the context, so then stop the shape
            message = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
            rows.append({"case": name, "error": message})
            log(f"{shape.name}/{name}: FAILED: {message}")
            if device.type == "cuda" and "CUDA error" in str(error):
                rows += [
                    {"case": other, "skipped": f"after {name}'s CUDA error"}
                    for other in attachers
                    if other not in {row["case"] for row in rows}
                ]
                break
            with contextlib.suppress(Exception):
                attached.detach()
            continue
        attached.detach()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(
            {
                "case": name,
                "description": attached.description,
                "trainable_parameters": sum(p.numel() for p in attached.parameters),
                "step_ms": 1000 * timing.median,
                "step_ms_samples": [1000 * t for t in timing.samples],
                "peak_memory_bytes": memory,
            }
        )
        last_case_s = time.perf_counter() - case_start
        log(f"{shape.name}/{name}: {rows[-1]['step_ms']:.1f} ms, {memory / 2**20:.1f} MiB")
    by_name = {row["case"]: row for row in rows if "step_ms" in row}
    for row in rows:
        if "step_ms" not in row:
            continue
        for reference in (PEFT_LORA, FLOOR):
            other = by_name.get(reference)
            row[f"time_vs_{reference}"] = ratio(row["step_ms"], other and other["step_ms"])
            row[f"memory_vs_{reference}"] = ratio(row["peak_memory_bytes"], other and other["peak_memory_bytes"])
    return {
        "shape": shape.name,
        "model_class": shape.model_class,
        "config": shape.config,
        "frozen_parameters": frozen,
        "batch_size": shape.batch_size,
        "image_tokens": shape.image_tokens,
        "text_tokens": shape.text_tokens,
        "rows": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    parts = []
    for table in result["shapes"]:
        rows = []
        for row in table["rows"]:
            if "step_ms" not in row:
                rows.append([row["case"], row.get("error") or row.get("skipped", ""), None, None, None, None, None])
                continue
            rows.append(
                [
                    row["case"],
                    row["description"],
                    row["trainable_parameters"],
                    row["step_ms"],
                    row["peak_memory_bytes"] / 2**20,
                    row["time_vs_peft_lora"],
                    row["memory_vs_peft_lora"],
                ]
            )
        parts.append(
            f"**{table['shape']}** ({table['model_class']}, {table['frozen_parameters'] / 1e6:.2f}M frozen, "
            f"{table['image_tokens']} image + {table['text_tokens']} text tokens, batch {table['batch_size']})\n\n"
            + markdown_table(
                ["case", "what", "trainable", "step ms", "peak MiB", "time / LoRA", "memory / LoRA"], rows
            )
        )
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--tiny", action="store_true", help="width 64, one block of each kind: seconds on a CPU")
    parser.add_argument("--out", type=Path, default=None, help="folder for transformer_step.json (default: results/)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per case (default 5; tiny 1)")
    parser.add_argument(
        "--dtype", choices=("bf16", "fp32"), default=None, help="frozen weights (default: bf16 on cuda)"
    )
    parser.add_argument(
        "--time_limit", type=float, default=None, help="seconds for the whole run (default: 90 on cuda)"
    )
    parser.add_argument("--threads", default="auto", help="CPU torch threads, or 'auto' (all cores when idle, else 1)")
    parser.add_argument(
        "--tuners", nargs="+", default=list(OUR_TUNERS), help=f"our rows (default: {' '.join(OUR_TUNERS)})"
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; use --device cpu (with --tiny on a small machine)")
    device = torch.device(args.device)
    configure_threads(args.threads)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[
        args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    ]
    repeats = args.repeats or (1 if args.tiny else 5)
    warmup = 1 if args.tiny else 2  # the first step allocates the optimizer state and, on CUDA, picks kernels
    time_limit = args.time_limit if args.time_limit is not None else (90.0 if args.device == "cuda" else float("inf"))
    deadline = started + time_limit - 5.0  # leave time to write the results
    all_shapes = shapes(args.tiny)
    tables = []
    for index, shape in enumerate(all_shapes):
        # each shape gets its share of what is left, so the second one is not starved by the first
        share = (deadline - time.perf_counter()) / (len(all_shapes) - index)
        tables.append(
            run_shape(shape, device, dtype, repeats, warmup, time.perf_counter() + share, tuple(args.tuners))
        )
        if any("CUDA error" in row.get("error", "") for row in tables[-1]["rows"]):
            log(f"{shape.name}: a CUDA fault poisoned the context; the shapes after it are not run")
            break  # nothing more can run on this device in this process (not even empty_cache)
        gc.collect()  # the shape's model goes before the next one is built
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result = {
        "benchmark": "transformer_step",
        "machine": machine_info(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).replace("torch.", ""),
        "tiny": args.tiny,
        "repeats": repeats,
        "time_limit_s": time_limit,
        "elapsed_s": time.perf_counter() - started,
        "shapes": tables,
    }
    out = (args.out or Path(__file__).resolve().parent / "results") / RESULT_NAME
    write_json(out, result)
    print(markdown(result))
    log(f"wrote {out} in {result['elapsed_s']:.1f} s")
    return result


if __name__ == "__main__":
    main()
