"""Time to load a tuner file into a pipeline, for every tuner, and a peft LoRA file through diffusers for reference.

A Stable Diffusion pipeline around the benchmark UNet (``pipelines.ResTunerStableDiffusionPipeline``, the stock
pipeline with our loader mixin) gets each tuner file -- saved beforehand from the tuner at its default size, with
non-zero weights -- through ``pipe.load_res_tuner(file)``; the timed call is the load alone (read the
safetensors file, check the metadata and the base fingerprint, build the tuner modules, install processors and
hooks, copy the weights); the unload after each call is not timed. The reference is a diffusers LoRA file
(``save_lora_weights``) of Res-Attn's parameter count loaded with ``pipe.load_lora_weights``.

Run alone: ``python -m benchmarks.perf.load_time [--tiny] [--repeats N] [--threads N]``.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from resattn_diffusion import ResTunerConfig, add_res_tuner, res_tuner_parameters, save_res_tuner, tuner_names
from resattn_diffusion.integration.api import remove_res_tuner
from resattn_diffusion.integration.io import load_res_tuner
from resattn_diffusion.testing import tiny_pipeline

from . import peers
from .common import (
    RESULTS_DIR,
    BenchmarkSize,
    add_common_arguments,
    clone_unet,
    configure_threads,
    default_clock,
    frozen_unet,
    interleaved_timings,
    log,
    machine_info,
    markdown_table,
    size_from_args,
    write_json,
)

PEFT_LORA = "peft_lora (load_lora_weights)"


def benchmark_pipeline(unet: nn.Module):
    """A Stable Diffusion pipeline with ``unet`` (and the tiny VAE and text encoder: only the UNet is loaded into),
    of the class with our loader mixin when ``pipelines/`` is importable."""
    components = dict(tiny_pipeline("sd1").components)
    components["unet"] = unet
    try:
        from pipelines import ResTunerStableDiffusionPipeline as pipeline_class
    except ImportError:  # the package alone (no repository checkout): the stock pipeline, loaded through the core
        from diffusers import StableDiffusionPipeline as pipeline_class
    return pipeline_class(**components, requires_safety_checker=False)


def _load_our_tuner(pipe, path: Path) -> Callable[[], Any]:
    if hasattr(pipe, "load_res_tuner"):
        return lambda: pipe.load_res_tuner(path)
    return lambda: load_res_tuner(pipe.unet, path)


def _unload_our_tuner(pipe) -> Callable[[], Any]:
    if hasattr(pipe, "unload_res_tuner"):
        return lambda: pipe.unload_res_tuner()
    return lambda: remove_res_tuner(pipe.unet)


@torch.no_grad()
def _perturb(parameters: list[nn.Parameter], seed: int = 0) -> None:
    """Non-zero weights, as after training (a zero-initialised factor would otherwise be saved as zeros)."""
    generator = torch.Generator().manual_seed(seed)
    for parameter in parameters:
        parameter.add_(0.01 * torch.randn(parameter.shape, generator=generator).to(parameter.dtype))


def save_files(
    base: nn.Module, folder: Path, tuners: list[str], with_peers: bool
) -> tuple[dict[str, Path], dict[str, Any]]:
    """One file per tuner (and the peft LoRA folder); returns name -> path and name -> error for those that failed."""
    files: dict[str, Path] = {}
    errors: dict[str, Any] = {}
    for name in tuners:
        unet = clone_unet(base)
        try:
            add_res_tuner(unet, ResTunerConfig(name))
            _perturb(res_tuner_parameters(unet))
            files[name] = save_res_tuner(unet, folder / f"{name}.safetensors")
        except Exception as error:
            errors[name] = f"{type(error).__name__}: {error}"
    if with_peers and peers.peft_available():
        from diffusers import StableDiffusionPipeline
        from peft.utils import get_peft_model_state_dict

        unet = clone_unet(base)
        add_res_tuner(unet, ResTunerConfig("res_attn"))
        rank = peers.matched_lora_rank(base, sum(p.numel() for p in res_tuner_parameters(unet)))
        unet = clone_unet(base)
        try:
            peers.add_peft_lora(unet, rank)
            _perturb(peers.trainable_parameters(unet))
            lora_folder = folder / "peft_lora"
            StableDiffusionPipeline.save_lora_weights(lora_folder, unet_lora_layers=get_peft_model_state_dict(unet))
            files[PEFT_LORA] = lora_folder
        except Exception as error:
            errors[PEFT_LORA] = f"{type(error).__name__}: {error}"
    return files, errors


def run(
    size: BenchmarkSize, tuners: list[str] | None = None, with_peers: bool = True, clock: str | None = None
) -> dict[str, Any]:
    log(f"load_time: saving tuner files from the {size.name} UNet")
    base = frozen_unet(size)
    tuners = tuners if tuners is not None else tuner_names()
    with tempfile.TemporaryDirectory(prefix="resattn-load-bench-") as tmp:
        files, errors = save_files(base, Path(tmp), tuners, with_peers)
        ours = benchmark_pipeline(clone_unet(base))
        loads, unloads = {}, {}
        for name, path in files.items():
            if name == PEFT_LORA:
                theirs = benchmark_pipeline(clone_unet(base))
                loads[name] = lambda theirs=theirs, path=path: theirs.load_lora_weights(path, adapter_name="bench")
                unloads[name] = theirs.unload_lora_weights
            else:
                loads[name] = _load_our_tuner(ours, path)
                unloads[name] = _unload_our_tuner(ours)
        clock = clock or default_clock()
        log(f"load_time: timing {len(loads)} files x {size.repeats} interleaved rounds ({type(ours).__name__})")
        timings = interleaved_timings(loads, size.repeats, size.warmup, clock, teardowns=unloads)
        sizes = {name: _file_bytes(path) for name, path in files.items()}
    rows = []
    for name in list(tuners) + ([PEFT_LORA] if PEFT_LORA in files or PEFT_LORA in errors else []):
        timing = timings.get(name)
        rows.append(
            {
                "name": name,
                "error": errors.get(name),
                "file_kb": None if name not in sizes else sizes[name] / 1024,
                "load_s": None if timing is None else timing.median,
                "timing": None if timing is None else timing.as_dict(),
            }
        )
    return {
        "benchmark": "load_time",
        "clock": clock,
        "pipeline": type(ours).__name__,
        "size": size.describe(),
        "machine": machine_info(),
        "rows": rows,
    }


def _file_bytes(path: Path) -> int:
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def to_markdown(result: dict[str, Any]) -> str:
    headers = ["file", "size (KB)", "load (ms)"]
    table = []
    for row in result["rows"]:
        if row["error"]:
            table.append([row["name"], "–", f"error: {row['error'][:100]}"])
        else:
            table.append([row["name"], row["file_kb"], row["load_s"] * 1e3])
    return markdown_table(headers, table)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--tuners", nargs="*", default=None, help="only these of our tuners (default: all registered)")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--out", default=str(RESULTS_DIR / "load_time.json"))
    args = parser.parse_args(argv)
    configure_threads(args.threads)
    result = run(size_from_args(args), args.tuners, not args.no_peers, args.clock)
    write_json(args.out, result)
    print(to_markdown(result))
    return result


if __name__ == "__main__":
    main()
