"""Validation images: the denoiser being trained inside its family's stock diffusers pipeline, saved as a PNG grid and
logged."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .models import DenoiserFamily

logger = logging.getLogger(__name__)


def image_grid(images: list[Image.Image], columns: int = 4) -> Image.Image:
    """diffusers' ``make_image_grid`` with at most ``columns`` columns; a last row that is not full is padded with
    white (``make_image_grid`` needs rows x columns images)."""
    from diffusers.utils import make_image_grid

    columns = min(columns, len(images))
    rows = math.ceil(len(images) / columns)
    blank = Image.new("RGB", images[0].size, "white")
    return make_image_grid(list(images) + [blank] * (rows * columns - len(images)), rows, columns)


def log_validation(
    accelerator: Any,
    base: DenoiserFamily,
    denoiser: torch.nn.Module,
    args: Any,
    resolution: int,
    seed: int,
    step: int,
    tag: str,
) -> Path:
    """Generate ``args.num_validation_images`` images of ``args.validation_prompt``; save the grid as
    ``output_dir/validation/<tag>.png`` and log the images to the trackers. Call on the main process only."""
    logger.info("validation at step %d: %d image(s) of %r", step, args.num_validation_images, args.validation_prompt)
    was_training = denoiser.training
    denoiser.eval()
    pipeline = base.inference_pipeline(denoiser)
    generator = torch.Generator(device=accelerator.device).manual_seed(seed)
    prompt_kwargs = base.validation_kwargs(args, accelerator.device)
    images = []
    with accelerator.autocast():
        for _ in range(args.num_validation_images):
            result = pipeline(
                **prompt_kwargs,
                num_inference_steps=args.validation_inference_steps,
                height=resolution,
                width=resolution,
                generator=generator,
            )
            images.append(result.images[0])
    denoiser.train(was_training)

    folder = Path(args.output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{tag}.png"
    image_grid(images).save(path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            stacked = np.stack([np.asarray(image) for image in images])
            tracker.writer.add_images("validation", stacked, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log(
                {
                    "validation": [
                        wandb.Image(image, caption=f"{i}: {args.validation_prompt}") for i, image in enumerate(images)
                    ]
                },
                step=step,
            )
    del pipeline
    return path
