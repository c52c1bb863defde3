"""DreamBooth prior preservation: generate the missing class images with the base model, before training."""

from __future__ import annotations

import gc
import hashlib
import logging
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..images import count_images
from ..quiet import from_pretrained_dtype
from .data import derive_seed
from .errors import TrainingDataError
from .models import read_model_index

logger = logging.getLogger(__name__)

_GENERATION_DTYPES = {"fp32": torch.float32, "no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def generate_class_images(args: Any, accelerator: Any, resolution: int, seed: int) -> int:
    """Fill ``args.class_data_dir`` up to ``args.num_class_images`` images of ``args.class_prompt``.

    Runs before the training models are loaded (as in diffusers): the base pipeline is loaded in the generation
    precision, generates the missing images in batches of ``args.sample_batch_size`` split across processes, and
    is freed. Image ``i`` uses a generator seeded from ``(seed, i)`` and is saved as ``<i>-<hash>.png``.
    Returns the number of images this process generated.
    """
    from diffusers import AutoencoderKL, DiffusionPipeline

    folder = Path(args.class_data_dir)
    if folder.exists() and not folder.is_dir():
        raise TrainingDataError(f"--class_data_dir {str(folder)!r} is a file; pass a folder for the class images")
    folder.mkdir(parents=True, exist_ok=True)
    existing = count_images(folder)
    accelerator.wait_for_everyone()  # every process counts before any writes, so all agree on what is missing
    missing = args.num_class_images - existing
    if missing <= 0:
        return 0

    if args.prior_generation_precision is not None:
        dtype = _GENERATION_DTYPES[args.prior_generation_precision]
    else:
        dtype = torch.float16 if accelerator.device.type == "cuda" else torch.float32
    logger.info("generating %d class image(s) of %r in %s", missing, args.class_prompt, folder)
    components: dict[str, Any] = {}
    if "safety_checker" in read_model_index(args.pretrained_model_name_or_path, args.revision, args.cache_dir):
        components.update(safety_checker=None, requires_safety_checker=False)
    if args.pretrained_vae_model_name_or_path is not None:
        components["vae"] = AutoencoderKL.from_pretrained(
            args.pretrained_vae_model_name_or_path, cache_dir=args.cache_dir, **from_pretrained_dtype(dtype)
        )
    pipeline = DiffusionPipeline.from_pretrained(
        args.pretrained_model_name_or_path,
        revision=args.revision,
        variant=args.variant,
        cache_dir=args.cache_dir,
        **from_pretrained_dtype(dtype),
        **components,
    )
    pipeline.set_progress_bar_config(disable=True)
    pipeline.to(accelerator.device)

    generated = 0
    indices = list(range(existing, args.num_class_images))
    with accelerator.split_between_processes(indices) as own:
        batches = [own[i : i + args.sample_batch_size] for i in range(0, len(own), args.sample_batch_size)]
        for batch in tqdm(batches, desc="Generating class images", disable=not accelerator.is_local_main_process):
            generators = [
                torch.Generator(device=accelerator.device).manual_seed(derive_seed(seed, "class", i)) for i in batch
            ]
            prompts = [args.class_prompt] * len(batch)
            images = pipeline(prompts, generator=generators, height=resolution, width=resolution).images
            for index, image in zip(batch, images):
                digest = hashlib.sha1(image.tobytes()).hexdigest()[:12]
                image.save(folder / f"{index:05d}-{digest}.png")
                generated += 1
    del pipeline
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    accelerator.wait_for_everyone()
    return generated
