"""The UNet family: ``UNet2DConditionModel`` of SD 1.x / 2.x / XL (and any model built of diffusers'
``BasicTransformerBlock``): targets ``attn1`` (self-attention), ``attn2`` (cross-attention), ``ff``."""

from __future__ import annotations

import functools
from typing import Any

from torch import nn

from ...tuners.base import OpShape
from ..processors import ResTunerAttnProcessor
from .base import Layer, ModelFamily, feed_forward_layer

#: The attention projections of a UNet transformer block; ``to_out`` is ``to_out.0``.
UNET_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out")


def attention_shape(attn: nn.Module) -> OpShape:
    """The dims of a diffusers ``Attention``, read off its projections."""
    return OpShape(
        in_dim=attn.to_q.in_features,
        out_dim=attn.to_out[0].out_features,
        context_dim=attn.to_k.in_features,
        inner_dim=attn.to_q.out_features,
        heads=attn.heads,
    )


def attention_linears(attn: nn.Module, names: tuple[str, ...]) -> dict[str, tuple[str, nn.Module]]:
    """Projection name -> (path suffix, module) for the projections of ``names`` the attention has."""
    linears = {}
    for name in names:
        if name == "to_out":
            to_out = getattr(attn, "to_out", None)
            if to_out is not None:
                linears[name] = ("to_out.0", to_out[0])
        elif getattr(attn, name, None) is not None:
            linears[name] = (name, getattr(attn, name))
    return linears


def transformer_blocks(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every diffusers ``BasicTransformerBlock`` of the UNet, with its path."""
    from diffusers.models.attention import BasicTransformerBlock

    return [(path, module) for path, module in unet.named_modules() if isinstance(module, BasicTransformerBlock)]


def _set_default_attn_processor_keeping_tuners(unet: nn.Module) -> None:
    """Installed as ``unet.set_default_attn_processor``: diffusers' own refuses to run beside third-party
    processors; this one picks the default from the processors our tuners wrap, and our tuners stay."""
    from diffusers.models.attention_processor import (
        ADDED_KV_ATTENTION_PROCESSORS,
        CROSS_ATTENTION_PROCESSORS,
        AttnAddedKVProcessor,
        AttnProcessor,
    )

    bases = [p.base_processor if isinstance(p, ResTunerAttnProcessor) else p for p in unet.attn_processors.values()]
    if all(type(p) in ADDED_KV_ATTENTION_PROCESSORS for p in bases):
        processor = AttnAddedKVProcessor()
    elif all(type(p) in CROSS_ATTENTION_PROCESSORS for p in bases):
        processor = AttnProcessor()
    else:
        raise ValueError(
            f"Cannot call `set_default_attn_processor` when attention processors are of type {type(bases[0])}"
        )
    unet.set_attn_processor(processor)


class UNetFamily(ModelFamily):
    name = "unet"
    model_word = "UNet"
    model_classes = ("UNet2DConditionModel",)
    targets = ("attn1", "attn2", "ff")
    default_targets = ("attn1", "attn2")
    projections = UNET_PROJECTIONS
    default_projections = UNET_PROJECTIONS
    call_kwargs = "cross_attention_kwargs"
    kinds = ("operation", "linear", "model")
    block_examples = ("mid_block", "up_blocks.*")

    def matches(self, model: nn.Module) -> bool:
        # Any model built of BasicTransformerBlocks takes the UNet's tuners (e.g. a bare Transformer2DModel).
        return super().matches(model) or bool(transformer_blocks(model))

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return transformer_blocks(model)

    def operation(self, block_path: str, block: nn.Module, target: str) -> Layer | None:
        op = getattr(block, target, None)
        if op is None:
            return None  # e.g. a block without cross-attention
        path = f"{block_path}.{target}"
        if target == "ff":
            return feed_forward_layer(path, op)
        return Layer(
            path, op, "attention", attention_shape(op), ResTunerAttnProcessor, attention_linears(op, self.projections)
        )

    def _describe(self, get) -> dict[str, Any]:
        return {
            "block_out_channels": list(get("block_out_channels", []) or []),
            "cross_attention_dim": get("cross_attention_dim"),
            "addition_embed_type": get("addition_embed_type"),
        }

    def install_model_guards(self, model: nn.Module) -> None:
        model.set_default_attn_processor = functools.partial(_set_default_attn_processor_keeping_tuners, model)

    def remove_model_guards(self, model: nn.Module) -> None:
        model.__dict__.pop("set_default_attn_processor", None)
