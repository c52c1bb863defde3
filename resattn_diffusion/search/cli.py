"""``resattn-glora-search`` / ``python -m resattn_diffusion.search``: pick a trained GLoRA supernet's configuration.

Loads a diffusers pipeline folder and a supernet tuner file, encodes a held-out image folder (VAE latents and text
embeddings, once), runs the search and writes to ``--output_dir``. SD 1.x/2.x/XL: the UNet, scored by
:class:`~.evolution.DenoisingFitness` (:func:`~.evolution.search_glora`); SD3 and Flux: the transformer, loaded as
the training scripts load it and scored by the rectified-flow loss (:class:`~.flow_fitness.FlowMatchingFitness`,
:func:`~.evolution.search_supernet`). Both fitnesses are the held-out loss at fixed timesteps and noise. Output:

* ``glora_search.json`` -- the chosen per-layer configuration, its parameter count and fitness, the fitness history
  and the search settings;
* ``res_tuner.safetensors`` -- a fixed-configuration GLoRA tuner cut from the supernet, which loads like any other
  tuner (``load_res_tuner(pipe.unet, output_dir)`` -- ``pipe.transformer`` for SD3 / Flux -- or
  ``pipe.load_res_tuner(output_dir)``) and fuses.

Held-out folder: images with a ``metadata.jsonl`` (one JSON object per line with ``file_name`` and a caption column,
``text`` by default -- the Hugging Face imagefolder layout), or images with same-named ``.txt`` caption files.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
from argparse import Namespace
from collections.abc import Sequence
from pathlib import Path

import torch

from ..hub import check_pretrained_source
from ..integration.api import ResTunerError
from ..integration.io import (
    WEIGHT_NAME,
    ResTunerFileError,
    check_path_characters,
    load_res_tuner,
    prepare_output_file,
    resolve_tuner_file,
)
from ..quiet import from_pretrained_dtype, quiet_libraries
from ..training.data import ImageTransform, load_image, read_image_folder
from ..training.errors import TrainingDataError, TrainingError
from ..training.families import family_of
from ..training.flow import FlowMatchingBase
from ..training.models import sdxl_time_ids
from ..tuners.base import ConfigError
from .evolution import DenoisingFitness, check_search_settings, search_glora, search_supernet
from .flow_fitness import FlowMatchingFitness, encode_flow_held_out, flow_flags
from .supernet import save_subnet

RESULT_NAME = "glora_search.json"
SUPERNET_NAME = "supernet"


class SearchInputError(ValueError):
    """Bad command-line input (a missing folder, an unreadable image, a malformed number); the message says what to
    do."""


# --- held-out data ---------------------------------------------------------------------------------------------


def read_captioned_images(
    folder: str | Path, caption_column: str = "text", image_column: str = "file_name"
) -> list[tuple[Path, str]]:
    """(image path, caption) pairs of a folder with ``metadata.jsonl`` or with same-named ``.txt`` captions (read
    as ``--train_data_dir`` is for training; a list of captions gives its first)."""
    source = read_image_folder(folder, caption_column, image_column, what="held-out data folder (--data_dir)")
    return [(path, caption if isinstance(caption, str) else str(caption[0])) for path, caption in source.records]


def load_image_tensor(path: Path, resolution: int) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """An image resized (shorter side) and centre-cropped to ``resolution``, as a (3, r, r) tensor in [-1, 1];
    also its original (height, width) and the crop's top-left corner (SDXL's added time ids). Training's
    transform with a centre crop and no flip (it draws nothing from the random generator)."""
    transform = ImageTransform(resolution, center_crop=True, random_flip=False)
    return transform(load_image(path, repr(str(path))), random.Random(0))


@torch.no_grad()
def encode_held_out(
    pipeline, pairs: Sequence[tuple[Path, str]], resolution: int, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor] | None]:
    """VAE latents (the posterior mean times the scaling factor: deterministic), text embeddings and, for SDXL, the
    added conditions (pooled text embeddings and time ids) of every held-out pair."""
    device = pipeline.unet.device
    is_sdxl = getattr(pipeline, "text_encoder_2", None) is not None
    latents, embeddings, pooled, time_ids = [], [], [], []
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start : start + batch_size]
        loaded = [load_image_tensor(path, resolution) for path, _ in batch]
        pixels = torch.stack([pixels for pixels, _, _ in loaded]).to(device=device, dtype=pipeline.vae.dtype)
        latents.append(pipeline.vae.encode(pixels).latent_dist.mean.float().cpu() * pipeline.vae.config.scaling_factor)
        captions = [caption for _, caption in batch]
        if is_sdxl:
            embeds, _, pooled_embeds, _ = pipeline.encode_prompt(
                prompt=captions, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
            pooled.append(pooled_embeds.float().cpu())
            originals = torch.tensor([original for _, original, _ in loaded])
            crops = torch.tensor([crop for _, _, crop in loaded])
            time_ids.append(sdxl_time_ids(originals, crops, resolution).float())
        else:
            embeds, _ = pipeline.encode_prompt(captions, device, 1, False)
        embeddings.append(embeds.float().cpu())
    added = {"text_embeds": torch.cat(pooled), "time_ids": torch.cat(time_ids)} if is_sdxl else None
    return torch.cat(latents), torch.cat(embeddings), added


# --- arguments -------------------------------------------------------------------------------------------------


def parse_budget(text: str | None) -> int | None:
    """``"250000"``, ``"250k"``, ``"1.5M"`` -> a parameter count; ``None``/``"none"`` -> no budget."""
    if text is None or str(text).strip().lower() in ("", "none"):
        return None
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgG]?)\s*", str(text))
    if not match:
        raise SearchInputError(f"--budget must be a parameter count like 250000, 250k or 1.5M, got {text!r}")
    factor = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[match.group(2).lower()]
    return int(round(float(match.group(1)) * factor))


def parse_timesteps(text: str) -> int | list[int]:
    """``"4"`` -> 4 evenly spread timesteps; ``"100,500,900"`` -> those timesteps."""
    parts = [part.strip() for part in str(text).split(",") if part.strip()]
    try:
        values = [int(part) for part in parts]
    except ValueError:
        raise SearchInputError(f"--timesteps must be a count (4) or a list (100,500,900), got {text!r}") from None
    if not values:
        raise SearchInputError("--timesteps is empty; give a count (4) or a list (100,500,900)")
    return values[0] if len(values) == 1 and "," not in str(text) else values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resattn-glora-search",
        description="Evolutionary search of a trained GLoRA supernet's per-layer configuration under a parameter "
        "budget; fitness is the held-out denoising loss at fixed timesteps and noise.",
    )
    parser.add_argument("--pretrained_model_name_or_path", required=True, help="diffusers pipeline folder (or hub id)")
    parser.add_argument(
        "--supernet", required=True, help="the GLoRA supernet tuner file, or the training output folder holding it"
    )
    parser.add_argument(
        "--data_dir", required=True, help="held-out images with metadata.jsonl or same-named .txt captions"
    )
    parser.add_argument("--caption_column", default="text", help="caption key in metadata.jsonl (default: text)")
    parser.add_argument("--image_column", default="file_name", help="image key in metadata.jsonl (default: file_name)")
    parser.add_argument(
        "--max_samples", type=int, default=None, help="use at most this many held-out images (first by name)"
    )
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="image size (default: the model's native one: a UNet's sample size x the VAE factor, the transformer "
        "pipeline's default)",
    )
    parser.add_argument("--output_dir", required=True, help="where glora_search.json and res_tuner.safetensors go")
    parser.add_argument("--overwrite", action="store_true", help="replace results already in --output_dir")
    parser.add_argument("--population_size", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=10, help="generations after the initial population")
    parser.add_argument(
        "--mutation_rate", type=float, default=0.1, help="probability to re-draw each layer of a child"
    )
    parser.add_argument("--crossover_rate", type=float, default=0.5, help="probability that a child mixes two parents")
    parser.add_argument(
        "--budget", default=None, help="max trainable parameters of the result, e.g. 500k or 1.2M (default: none)"
    )
    parser.add_argument(
        "--timesteps",
        default="4",
        help="a count of evenly spread timesteps (4), or a list (100,500,900; one timestep: 500,)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the evolution and the fixed noise")
    parser.add_argument("--batch_size", type=int, default=8, help="denoiser batch size while scoring")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=("float32", "float16", "bfloat16"),
        help="default: float16 on cuda, float32 on cpu",
    )
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def _device(name: str | None) -> torch.device:
    """``--device``, or cuda when available else cpu; a name torch does not know, or a CUDA device this machine does
    not have, is refused before anything loads (they were torch's raw RuntimeError / AssertionError)."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise SearchInputError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise SearchInputError(
            f"--device {name!r}: this machine has {torch.cuda.device_count() if torch.cuda.is_available() else 'no'} "
            "CUDA device(s); use --device cpu or an existing cuda:N"
        )
    return device


def _check_outputs(output_dir: Path, overwrite: bool) -> None:
    """The files the search writes, checked (and their folder made) before anything loads: a folder in their place,
    ``--output_dir`` under a file or holding a NUL byte used to fail only at the end with a raw OSError (after the
    tuner file had been written), or at once with a raw one."""
    check_path_characters(output_dir, "write the search results to")
    outputs = [output_dir / RESULT_NAME, output_dir / WEIGHT_NAME]
    for path in outputs:
        if path.is_dir():
            raise SearchInputError(f"{str(path)!r} is a folder; remove it or choose another --output_dir")
    existing = [str(path) for path in outputs if path.exists()]
    if existing and not overwrite:
        raise SearchInputError(
            f"{existing[0]!r} exists; pass --overwrite to replace it or choose another --output_dir"
        )
    prepare_output_file(outputs[0], True, "cannot write the search results to")  # makes the folder or says why not


def _load_pipeline(name_or_path: str, device: torch.device, dtype: torch.dtype):
    from diffusers import DiffusionPipeline

    try:
        pipeline = DiffusionPipeline.from_pretrained(name_or_path, **from_pretrained_dtype(dtype))
    except (OSError, ValueError) as err:
        raise SearchInputError(
            f"could not load the pipeline {name_or_path!r}: {err}\nOffline, pass a local diffusers folder (with "
            "model_index.json)"
        ) from None
    if getattr(pipeline, "unet", None) is None or getattr(pipeline, "vae", None) is None:
        raise SearchInputError(f"{name_or_path!r} is not a Stable Diffusion pipeline with a UNet and a VAE")
    pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _load_noise_scheduler(name_or_path: str):
    """The training noise schedule (as diffusers' training scripts build it), not the pipeline's sampler."""
    from diffusers import DDPMScheduler

    try:
        return DDPMScheduler.from_pretrained(name_or_path, subfolder="scheduler")
    except (OSError, ValueError) as err:
        raise SearchInputError(f"could not read the noise schedule of {name_or_path!r} (scheduler/): {err}") from None


def _training_family(name_or_path: str) -> type:
    """The training core's family class of the base model (reads ``model_index.json`` only)."""
    try:
        return family_of(Namespace(pretrained_model_name_or_path=name_or_path, revision=None, cache_dir=None))
    except TrainingError as err:
        raise SearchInputError(str(err)) from None


def _resolution(args: argparse.Namespace, default: int, multiple: int, why: str) -> int:
    resolution = default if args.resolution is None else args.resolution
    if resolution % multiple:  # the VAE (and a transformer's patches) would drop pixels
        raise SearchInputError(f"--resolution must be a multiple of {multiple} ({why}), got {resolution}")
    return resolution


def _search_unet(args, family, pairs, device, dtype, noise_scheduler, settings):
    """SD 1.x/2.x/XL: the pipeline's UNet, scored by :class:`DenoisingFitness` on cached latents and embeddings."""
    pipeline = _load_pipeline(args.pretrained_model_name_or_path, device, dtype)
    unet = pipeline.unet
    unet.requires_grad_(False)
    load_res_tuner(unet, args.supernet, adapter_name=SUPERNET_NAME)
    factor = pipeline.vae_scale_factor
    resolution = _resolution(args, unet.config.sample_size * factor, factor, "the VAE's downscaling")
    latents, embeddings, added = encode_held_out(pipeline, pairs, resolution, args.batch_size)
    result = search_glora(
        unet,
        latents,
        embeddings,
        noise_scheduler,
        added_cond_kwargs=added,
        adapter_name=SUPERNET_NAME,
        progress=not args.no_progress,
        **settings,
    )
    return unet, result, resolution


#: training flags that change what a transformer is shown (T5's token count, Flux's guidance): read from the
#: training run's ``args.json`` beside the supernet, so the search scores subnets on the conditioning they trained on
CONDITIONING_FLAGS = ("max_sequence_length", "guidance_scale")


def _trained_with(supernet: str) -> dict:
    """The :data:`CONDITIONING_FLAGS` the supernet was trained with, from the ``args.json`` the training scripts
    write beside it (none there: the scripts' defaults)."""
    file = resolve_tuner_file(supernet).parent / "args.json"
    if not file.is_file():
        return {}
    try:
        recorded = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise SearchInputError(
            f"{str(file)!r} beside the supernet is not readable JSON ({err}); fix or remove it"
        ) from None
    if not isinstance(recorded, dict):
        raise SearchInputError(f"{str(file)!r} beside the supernet is not a JSON object of training flags")
    flags = {name: recorded[name] for name in CONDITIONING_FLAGS if recorded.get(name) is not None}
    for name, value in flags.items():
        whole = name == "max_sequence_length"
        if (
            isinstance(value, bool)
            or not isinstance(value, int if whole else (int, float))
            or not math.isfinite(value)
        ):
            raise SearchInputError(
                f"{str(file)!r} records {name}={value!r}; a training run writes "
                f"{'a whole number' if whole else 'a number'} there: fix or remove the file"
            )
    return flags


def _search_flow(args, family, pairs, device, dtype, noise_scheduler, settings):
    """SD3 / Flux: the transformer loaded as the training scripts load it, scored by
    :class:`~.flow_fitness.FlowMatchingFitness` (the rectified-flow loss at fixed timesteps and noise)."""
    flags = flow_flags(args.pretrained_model_name_or_path, **_trained_with(args.supernet))
    family.check_args(flags)  # e.g. a sequence length T5 cannot take, before the models load
    base = family.load(flags, dtype)
    base.to(device, dtype)
    transformer = base.denoiser
    load_res_tuner(transformer, args.supernet, adapter_name=SUPERNET_NAME)
    resolution = _resolution(
        args, family.native_resolution(flags), base.resolution_multiple, "the VAE's downscaling times 2x2 patches"
    )
    pixels = torch.stack([load_image_tensor(path, resolution)[0] for path, _ in pairs])
    captions = [caption for _, caption in pairs]
    latents, conditioning = encode_flow_held_out(base, flags, pixels, captions, device, args.batch_size)
    fitness = FlowMatchingFitness(
        base, flags, latents, conditioning, timesteps=settings["timesteps"], seed=args.seed, batch_size=args.batch_size
    )
    evolution = {key: value for key, value in settings.items() if key not in ("timesteps", "batch_size")}
    result = search_supernet(
        transformer,
        fitness,
        adapter_name=SUPERNET_NAME,
        progress=not args.no_progress,
        settings={
            "timesteps": fitness.timesteps,
            "held_out_samples": len(pairs),
            "batch_size": args.batch_size,
            **{name: getattr(flags, name) for name in CONDITIONING_FLAGS if getattr(flags, name) is not None},
        },
        **evolution,
    )
    return transformer, result, resolution


def run(args: argparse.Namespace) -> Path:
    """The search as the CLI runs it; returns the result JSON's path. Every flag and output path is checked before
    the first model loads."""
    output_dir = Path(args.output_dir)
    budget = parse_budget(args.budget)
    timesteps = parse_timesteps(args.timesteps)
    # one set of the search's numbers: checked here, before anything loads, and handed to the search as they are
    settings = {
        "population_size": args.population_size,
        "iterations": args.iterations,
        "mutation_rate": args.mutation_rate,
        "crossover_rate": args.crossover_rate,
        "budget": budget,
        "seed": args.seed,
        "timesteps": timesteps,
        "batch_size": args.batch_size,
    }
    try:
        check_search_settings(**settings)
    except ConfigError as err:  # "batch_size must be ...": say it as the flag the user typed
        raise SearchInputError(f"--{err}" if str(err).split(" ", 1)[0] in settings else str(err)) from None
    if args.max_samples is not None and args.max_samples < 1:
        raise SearchInputError(f"--max_samples must be >= 1, got {args.max_samples}")
    if args.resolution is not None and args.resolution < 1:  # 0 used to mean the default, silently
        raise SearchInputError(f"--resolution must be a positive number of pixels, got {args.resolution}")
    device = _device(args.device)
    # what can be refused without loading a model, before anything is written (search.log included); the libraries
    # are quiet from here, into the log once it exists
    quiet_libraries()
    pairs = read_captioned_images(args.data_dir, args.caption_column, args.image_column)[: args.max_samples]
    check_pretrained_source(args.pretrained_model_name_or_path, "--pretrained_model_name_or_path")
    family = _training_family(args.pretrained_model_name_or_path)
    # the UNet's training schedule; of a transformer's, only its length is read here (its family loads its own)
    noise_scheduler = _load_noise_scheduler(args.pretrained_model_name_or_path)
    DenoisingFitness.fixed_timesteps(timesteps, noise_scheduler.config.num_train_timesteps)
    _check_outputs(output_dir, args.overwrite)
    quiet_libraries(output_dir / "search.log")

    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    search = _search_flow if issubclass(family, FlowMatchingBase) else _search_unet
    model, result, resolution = search(args, family, pairs, device, dtype, noise_scheduler, settings)
    result.settings.update(
        {
            "pretrained_model_name_or_path": str(args.pretrained_model_name_or_path),
            "supernet": str(args.supernet),
            "data_dir": str(args.data_dir),
            "resolution": resolution,
        }
    )
    # never a new tuner beside an old result: the old one goes first, so an interrupted write leaves the tuner alone
    (output_dir / RESULT_NAME).unlink(missing_ok=True)
    tuner_path = save_subnet(model, result.configs, output_dir, adapter_name=SUPERNET_NAME, saved_name="default")
    result.settings["tuner_file"] = str(tuner_path)
    result_path = result.save(output_dir / RESULT_NAME)
    print(
        f"best held-out loss {result.fitness:.6f} with {result.parameters:,} trainable parameters "
        f"({len(result.configs)} layers, {len(result.evaluated)} subnets evaluated)\n"
        f"configuration: {result_path}\ntuner file: {tuner_path} (load it with load_res_tuner / pipe.load_res_tuner)"
    )
    return result_path


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (
        SearchInputError,
        TrainingDataError,
        ConfigError,
        ResTunerError,
        ResTunerFileError,
        TrainingError,
        FileExistsError,
    ) as err:
        print(f"resattn-glora-search: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
