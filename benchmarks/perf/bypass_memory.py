"""Res-Tuning-Bypass against Res-Attn and peft LoRA: training step time and peak memory, as ratios to LoRA.

The three train the same steps on copies of the same frozen UNet (``benchmark_unet_config()``: SD 1-shaped,
widths 64/128/256, two layers per block, 32x32 latents, batch 2, a 77-token context): forward on fixed noisy
latents, MSE loss against a fixed noise target, backward, AdamW step. Res-Attn (attn1 + attn2 of every
transformer block) and peft LoRA (``to_q, to_k, to_v, to_out.0`` through diffusers' ``add_adapter``) get the rank
whose trainable parameter count is nearest the bypass's, so the comparison is at a similar trainable size.

Measured in one run:

* **step time** -- the cases run round-robin, one step each per round, the starting case rotating
  (``common.interleaved_timings``); the median over rounds. With one torch thread the reported clock is this
  process's CPU time (other processes on the shared cores barely move it), with more threads the wall time.
* **peak memory** -- the peak of the tensor memory allocated *during* one training step (activations kept for
  backward, temporaries, gradients, optimizer temporaries; the model already in memory is not counted). On a GPU:
  ``torch.cuda.max_memory_allocated`` over the step minus the memory allocated before it. On CPU, where torch
  keeps no allocator statistics, two independent measurements that should agree:

  - ``peak_memory_mb``: a torch dispatch mode sees every op's outputs, counts each *new* storage (one that is not
    the storage of one of the op's inputs: views and in-place results are not allocations) until it is freed,
    and keeps the peak;
  - ``allocator_peak_mb``: the running total of torch's CPU allocator, from the allocation events the torch
    profiler records with ``profile_memory=True``; its peak minus its value at the step's start.
* **saved for backward** -- the bytes of the tensors autograd keeps between forward and backward (through
  ``torch.autograd.graph.saved_tensors_hooks``; storages counted once, parameters not counted): the activation
  memory the bypass promises not to need.

Run::

    .venv/bin/python -m benchmarks.perf.bypass_memory                 # the full size, 7 rounds
    .venv/bin/python -m benchmarks.perf.bypass_memory --tiny          # seconds; numbers meaningless
    .venv/bin/python -m benchmarks.perf.bypass_memory --widths 32 64 --latent-size 16 --batch-size 1 --repeats 3

It prints a markdown table and writes ``results/bypass_memory.json`` and ``results/bypass_memory.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.perf import peers  # noqa: E402
from benchmarks.perf.common import (  # noqa: E402
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
    peak_memory_bytes,
    ratio,
    size_from_args,
    write_json,
)
from resattn_diffusion import ResTunerConfig, add_res_tuner, res_tuner_parameters  # noqa: E402
from resattn_diffusion.integration.families.unet import UNetFamily  # noqa: E402
from resattn_diffusion.integration.unet_tuners import requires_unet_backward  # noqa: E402

BYPASS, RES_ATTN, LORA = "res_bypass", "res_attn", "peft_lora"


@dataclasses.dataclass
class Case:
    name: str
    description: str
    unet: nn.Module
    parameters: list[nn.Parameter]

    @property
    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters)


# --- the three cases ---------------------------------------------------------------------------------------------
def _res_attn_rank(base: nn.Module, target_parameters: int, heads: int = 2) -> int:
    """The Res-Attn rank (a multiple of ``heads``) whose parameter count is nearest ``target_parameters``."""
    probe = clone_unet(base)
    add_res_tuner(probe, ResTunerConfig(tuner="res_attn", rank=heads, heads=heads))
    per_head_step = sum(p.numel() for p in res_tuner_parameters(probe))  # parameters are linear in the rank
    steps = max(1, round(target_parameters / per_head_step))
    return steps * heads


def build_cases(base: nn.Module, bypass_config: ResTunerConfig) -> list[Case]:
    """The bypass, and Res-Attn and peft LoRA at its trainable size, each on its own copy of ``base``."""
    bypass_unet = clone_unet(base)
    add_res_tuner(bypass_unet, bypass_config)
    bypass = Case(BYPASS, _describe(bypass_config), bypass_unet, res_tuner_parameters(bypass_unet))
    if requires_unet_backward(bypass_unet):
        raise RuntimeError("the bypass UNet still needs the UNet backward; is the base UNet frozen?")

    attn_rank = _res_attn_rank(base, bypass.parameter_count)
    attn_config = ResTunerConfig(tuner="res_attn", rank=attn_rank, heads=2)
    attn_unet = clone_unet(base)
    add_res_tuner(attn_unet, attn_config)
    attn = Case(RES_ATTN, _describe(attn_config), attn_unet, res_tuner_parameters(attn_unet))

    lora_rank = peers.matched_lora_rank(base, bypass.parameter_count)
    lora_unet = clone_unet(base)
    peers.add_peft_lora(lora_unet, lora_rank)
    lora = Case(
        LORA, f"peft LoRA r={lora_rank} on to_q,to_k,to_v,to_out.0", lora_unet, peers.trainable_parameters(lora_unet)
    )
    return [bypass, attn, lora]


def _describe(config: ResTunerConfig) -> str:
    hyper = ", ".join(f"{k}={v}" for k, v in config.hyperparameters.items() if v is not None)
    where = (
        "decoder side network" if config.tuner == BYPASS else ",".join(config.targets or UNetFamily.default_targets)
    )
    return f"{config.tuner}({hyper}) on {where}"


def make_train_step(case: Case, inputs: dict[str, Any], seed: int = 0) -> Callable[[], torch.Tensor]:
    """One training step of ``case`` on a fixed batch: forward, MSE loss, backward, AdamW step; returns the loss."""
    unet = case.unet
    unet.train()
    generator = torch.Generator().manual_seed(seed + 1)
    target = torch.randn(inputs["sample"].shape, generator=generator).to(inputs["sample"].device)
    optimizer = torch.optim.AdamW(case.parameters, lr=1e-4)
    sample, timestep, context = inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"]

    def step() -> torch.Tensor:
        prediction = unet(sample, timestep, encoder_hidden_states=context, return_dict=False)[0]
        loss = F.mse_loss(prediction.float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


# --- memory ----------------------------------------------------------------------------------------------------
def step_peak_memory_bytes(step: Callable[[], Any], device: torch.device) -> int:
    """Peak tensor memory allocated during one step (see the module docstring for the CPU and GPU methods)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    return peak_memory_bytes(step)  # CPU: torch keeps no allocator statistics; count new storages op by op


def allocator_peak_bytes(step: Callable[[], Any]) -> int | None:
    """Cross-check on CPU: the peak of torch's CPU allocator running total during one step, from the torch
    profiler's allocation events (None if this torch's profiler does not expose them)."""
    try:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile
    except ImportError:
        return None
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    try:
        nodes = list(prof.profiler.kineto_results.experimental_event_tree())
    except AttributeError:
        return None
    allocations = []
    while nodes:
        node = nodes.pop()
        nodes.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            allocations.append((node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.total_allocated))
    if not allocations:
        return None
    allocations.sort()
    start = allocations[0][2] - allocations[0][1]  # the allocator's total just before the step's first allocation
    return max(total for _, _, total in allocations) - start


def saved_for_backward_bytes(step: Callable[[], Any], parameters: Sequence[nn.Parameter]) -> int:
    """Bytes of the distinct tensor storages autograd saves for backward during one step, parameters excluded."""
    parameter_storages = {p.untyped_storage().data_ptr() for p in parameters}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameter_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return sum(saved.values())


# --- the run ---------------------------------------------------------------------------------------------------
def run(size: BenchmarkSize, bypass_config: ResTunerConfig, clock: str | None = None) -> dict[str, Any]:
    log(f"bypass_memory: building the cases on the {size.name} UNet {size.describe()}")
    base = frozen_unet(size)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    base.to(device)
    inputs = benchmark_inputs(base, size)
    cases = build_cases(base, bypass_config)
    steps = {case.name: make_train_step(case, inputs) for case in cases}
    frozen = list(base.parameters())

    clock = clock or default_clock()
    log(f"bypass_memory: timing {len(steps)} cases x {size.repeats} interleaved rounds ({clock} clock)")
    timings = interleaved_timings(
        steps, size.repeats, size.warmup, clock, progress=lambda m: log(f"bypass_memory: {m}")
    )

    rows = []
    for case in cases:
        step = steps[case.name]
        step()  # optimizer state as after a first step, so the measured step is like every other
        all_parameters = frozen + list(case.unet.parameters())
        timing = timings[case.name]
        rows.append(
            {
                "name": case.name,
                "description": case.description,
                "trainable_parameters": case.parameter_count,
                "step_s": timing.median,
                "step_spread": timing.spread,
                "timing": timing.as_dict(),
                "peak_memory_mb": step_peak_memory_bytes(step, device) / 2**20,
                "allocator_peak_mb": None if device.type != "cpu" else _mb(allocator_peak_bytes(step)),
                "saved_for_backward_mb": saved_for_backward_bytes(step, all_parameters) / 2**20,
            }
        )
    lora = next(row for row in rows if row["name"] == LORA)
    for row in rows:
        row["time_vs_lora"] = ratio(row["step_s"], lora["step_s"])
        row["memory_vs_lora"] = ratio(row["peak_memory_mb"], lora["peak_memory_mb"])
        row["allocator_memory_vs_lora"] = ratio(row["allocator_peak_mb"], lora["allocator_peak_mb"])
        row["saved_vs_lora"] = ratio(row["saved_for_backward_mb"], lora["saved_for_backward_mb"])
    return {
        "benchmark": "bypass_memory",
        "device": device.type,
        "clock": clock,
        "size": size.describe(),
        "unet_parameters": sum(p.numel() for p in frozen),
        "machine": machine_info(),
        "rows": rows,
    }


def _mb(value: int | None) -> float | None:
    return None if value is None else value / 2**20


def to_markdown(result: dict[str, Any]) -> str:
    size = result["size"]
    headers = [
        "case",
        "trainable params",
        "step (ms)",
        "step / LoRA",
        "peak memory (MB)",
        "peak memory / LoRA",
        "saved for backward (MB)",
        "saved / LoRA",
    ]
    rows = [
        [
            row["name"],
            row["trainable_parameters"],
            1e3 * row["step_s"],
            row["time_vs_lora"],
            row["peak_memory_mb"],
            row["memory_vs_lora"],
            row["saved_for_backward_mb"],
            row["saved_vs_lora"],
        ]
        for row in result["rows"]
    ]
    machine = result["machine"]
    lines = [
        f"UNet widths {size['block_out_channels']}, {size['layers_per_block']} layers per block "
        f"({result['unet_parameters']:,} frozen parameters), {size['latent_size']}x{size['latent_size']} latents, "
        f"batch {size['batch_size']}, {size['context_tokens']} context tokens; device {result['device']}, "
        f"{machine['torch_threads']} torch thread(s), {result['clock']} clock, median of {size['repeats']} "
        f"interleaved rounds; load average {machine['load_average_1_5_15min']}.",
        "",
        markdown_table(headers, rows),
        "",
        *[f"- {row['name']}: {row['description']}" for row in result["rows"]],
    ]
    cross = [row for row in result["rows"] if row.get("allocator_peak_mb") is not None]
    if cross:
        lines.append(
            "- cross-check, CPU allocator peak per step (torch profiler): "
            + ", ".join(
                f"{row['name']} {row['allocator_peak_mb']:.1f} MB ({row['allocator_memory_vs_lora']:.2f}x LoRA)"
                for row in cross
            )
        )
    return "\n".join(lines) + "\n"


def _size(args: argparse.Namespace) -> BenchmarkSize:
    size = size_from_args(args)
    config = dict(size.unet_config)
    if args.widths:
        # the benchmark UNet's layout at any depth: cross-attention on every level but the lowest-resolution one
        levels = len(args.widths)
        config["block_out_channels"] = list(args.widths)
        config["down_block_types"] = ["CrossAttnDownBlock2D"] * (levels - 1) + ["DownBlock2D"]
        config["up_block_types"] = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (levels - 1)
        config["norm_num_groups"] = math.gcd(32, *args.widths)  # GroupNorm needs a divisor of every width
    if args.layers_per_block is not None:
        config["layers_per_block"] = args.layers_per_block
    if args.latent_size is not None:
        config["sample_size"] = args.latent_size
    changes: dict[str, Any] = {"unet_config": config}
    if args.batch_size is not None:
        changes["batch_size"] = args.batch_size
    if args.context_tokens is not None:
        changes["context_tokens"] = args.context_tokens
    if len(changes) > 1 or config != size.unet_config:
        changes["name"] = f"{size.name} (shrunk)"
    return dataclasses.replace(size, **changes)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_arguments(parser)
    parser.add_argument("--widths", type=int, nargs="+", default=None, help="block_out_channels (default 64 128 256)")
    parser.add_argument("--layers-per-block", type=int, default=None, help="layers per block (default 2)")
    parser.add_argument("--latent-size", type=int, default=None, help="latent height = width (default 32)")
    parser.add_argument("--context-tokens", type=int, default=None, help="text context tokens (default 77)")
    parser.add_argument("--bypass-rank", type=int, default=16, help="rank of the bypass's lateral/vertical tuners")
    parser.add_argument("--bypass-up-rank", type=int, default=None, help="low-rank up convs (default: full 3x3 convs)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where the JSON and markdown go")
    args = parser.parse_args(argv)

    configure_threads(args.threads)
    size = _size(args)
    bypass_config = ResTunerConfig(tuner=BYPASS, rank=args.bypass_rank, up_rank=args.bypass_up_rank)
    result = run(size, bypass_config, args.clock)
    markdown = to_markdown(result)
    print(markdown)
    write_json(args.out_dir / "bypass_memory.json", result)
    (args.out_dir / "bypass_memory.md").write_text(
        "# Res-Tuning-Bypass: step time and peak memory vs peft LoRA\n\n" + markdown
    )
    log(f"bypass_memory: wrote {args.out_dir / 'bypass_memory.json'} and bypass_memory.md")
    return result


if __name__ == "__main__":
    main()
