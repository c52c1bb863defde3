"""Model families tuners attach to; :func:`family_of` picks the one describing a model.

Adding a family: a :class:`~.base.ModelFamily` subclass in its own module and one line in :data:`FAMILIES`
(before any family whose ``matches`` is broader).
"""

from __future__ import annotations

from torch import nn

from ...registry import register_family
from ..state import ResTunerError
from .base import Layer, ModelFamily
from .flux import FluxFamily
from .sd3 import SD3Family
from .unet import UNetFamily

#: Every supported family, most specific first (the UNet family also takes any model of BasicTransformerBlocks).
FAMILIES: tuple[ModelFamily, ...] = (UNetFamily(), SD3Family(), FluxFamily())

for _family in FAMILIES:
    register_family(_family)


def family_of(model: nn.Module) -> ModelFamily:
    """The family describing ``model``; a :class:`ResTunerError` naming the supported model classes otherwise."""
    for family in FAMILIES:
        if family.matches(model):
            return family
    supported = ", ".join(f"{cls} ({f.model_word})" for f in FAMILIES for cls in f.model_classes)
    raise ResTunerError(
        f"res tuners do not know a {type(model).__name__}; they sit on {supported}: pass the pipeline's denoiser "
        "(pipe.unet, or pipe.transformer for SD3 / Flux)"
    )


def family_named(name: str) -> ModelFamily | None:
    return next((family for family in FAMILIES if family.name == name), None)


__all__ = ["FAMILIES", "Layer", "ModelFamily", "family_of", "family_named"]
