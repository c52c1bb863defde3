"""Which model family a base model folder is: the one place that maps ``model_index.json`` to a
:class:`~resattn_diffusion.training.models.DenoiserFamily` class.

A new family (another diffusion transformer) is a class with that shape added to :data:`FAMILIES`; the training
loop, validation and checkpoints need no change.
"""

from __future__ import annotations

from argparse import Namespace

from .errors import TrainingError
from .flow import FluxBase, SD3Base
from .models import DenoiserFamily, StableDiffusionBase, read_model_index

#: Every family the training core knows, tried in order.
FAMILIES: tuple[type, ...] = (StableDiffusionBase, SD3Base, FluxBase)


def family_of(args: Namespace) -> type[DenoiserFamily]:
    """The family class of ``args.pretrained_model_name_or_path`` (reads ``model_index.json`` only)."""
    model_index = read_model_index(args.pretrained_model_name_or_path, args.revision, args.cache_dir)
    for family in FAMILIES:
        if family.matches(model_index):
            return family
    denoiser = model_index.get("transformer") or model_index.get("unet") or ["", "no denoiser"]
    raise TrainingError(
        f"{args.pretrained_model_name_or_path} is a {model_index.get('_class_name', 'pipeline')} with a "
        f"{denoiser[1]}; the training scripts know Stable Diffusion 1.x/2.x/XL (UNet2DConditionModel), SD3 "
        "(SD3Transformer2DModel) and Flux (FluxTransformer2DModel)"
    )


def native_resolution(args: Namespace) -> int:
    """The image size the base model was trained at, from its configs only."""
    return family_of(args).native_resolution(args)
