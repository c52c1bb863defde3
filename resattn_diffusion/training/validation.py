"""Validation images: the UNet being trained inside a stock diffusers pipeline, saved as a PNG grid and logged."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .models import BaseModel

logger = logging.getLogger(__name__)


def inference_pipeline(base: BaseModel, unet: torch.nn.Module) -> Any:
    """A stock SD / SDXL pipeline around the frozen components and ``unet`` (with its tuner), using the model's
    own inference scheduler. No safety checker is loaded for validation images."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = base.inference_scheduler
    if base.sdxl:
        pipeline = StableDiffusionXLPipeline(
            vae=base.vae,
            text_encoder=base.text_encoders[0],
            text_encoder_2=base.text_encoders[1],
            tokenizer=base.tokenizers[0],
            tokenizer_2=base.tokenizers[1],
            unet=unet,
            scheduler=scheduler,
        )
    else:
        pipeline = StableDiffusionPipeline(
            vae=base.vae,
            text_encoder=base.text_encoders[0],
            tokenizer=base.tokenizers[0],
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


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
    base: BaseModel,
    unet: torch.nn.Module,
    args: Any,
    resolution: int,
    seed: int,
    step: int,
    tag: str,
) -> Path:
    """Generate ``args.num_validation_images`` images of ``args.validation_prompt``; save the grid as
    ``output_dir/validation/<tag>.png`` and log the images to the trackers. Call on the main process only."""
    logger.info("validation at step %d: %d image(s) of %r", step, args.num_validation_images, args.validation_prompt)
    was_training = unet.training
    unet.eval()
    pipeline = inference_pipeline(base, unet)
    generator = torch.Generator(device=accelerator.device).manual_seed(seed)
    images = []
    with accelerator.autocast():
        for _ in range(args.num_validation_images):
            result = pipeline(
                args.validation_prompt,
                num_inference_steps=args.validation_inference_steps,
                height=resolution,
                width=resolution,
                generator=generator,
            )
            images.append(result.images[0])
    unet.train(was_training)

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

            tracker.log({"validation": [wandb.Image(image, caption=f"{i}: {args.validation_prompt}") for i, image in enumerate(images)]}, step=step)
    del pipeline
    return path
