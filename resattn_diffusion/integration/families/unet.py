"""The UNet family: ``UNet2DConditionModel`` of SD 1.x / 2.x / XL (and any model built of diffusers'
``BasicTransformerBlock``): targets ``attn1`` (self-attention), ``attn2`` (cross-attention), ``ff``."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from ...tuners.base import OpShape
from ..processors import ResTunerAttnProcessor
from ..state import ResTunerError
from .base import Layer, ModelFamily, feed_forward_layer, install_diffusers_guards, remove_diffusers_guards

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


#: A transformer of a down or up block (side, block, index, rest of the path), and of the mid block, in diffusers.
_BLOCK_ATTENTION = re.compile(r"(down|up)_blocks\.(\d+)\.attentions\.(\d+)\.(.+)")
_MID_ATTENTION = re.compile(r"mid_block\.attentions\.(\d+)\.(.+)")
#: diffusers' blocks that are SGM's (resnet, spatial transformer) blocks; other attention blocks have no SGM form.
_SGM_TRANSFORMER_BLOCKS = ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D")
_SGM_MID_BLOCK = "UNetMidBlock2DCrossAttn"


@dataclass(frozen=True)
class SgmLayout:
    """Where the transformers of a diffusers ``UNet2DConditionModel`` sit in the original SGM/LDM UNet, the layout of
    SDXL checkpoints and of the UNet kohya's sd-scripts train SDXL on (so their LoRA names), read off the config.

    SGM numbers ``input_blocks`` from 0 = ``conv_in``, then per resolution ``layers_per_block`` blocks of (resnet,
    transformer) and, after every resolution but the last, a downsampler block; ``middle_block`` is (resnet,
    transformer, resnet); ``output_blocks`` hold ``layers_per_block + 1`` blocks of (resnet, transformer[,
    upsampler]) per resolution. A transformer is child 1 of its block. diffusers' SDXL loader maps these numbers
    back with the same config (``_maybe_map_sgm_blocks_to_diffusers``).
    """

    layers_per_block: int
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    mid_block_type: str | None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> SgmLayout:
        layers = config.get("layers_per_block", 2)  # diffusers' default
        if isinstance(layers, bool) or not isinstance(layers, int):
            # diffusers' conversion back adds 1 to one integer count: a per-block list would not load
            raise ResTunerError(
                f"this UNet's layers_per_block {list(layers)} gives each block its own count; the SGM block numbers "
                "of kohya's SDXL names (and diffusers' conversion back) follow one integer count: export with "
                "format='diffusers'"
            )
        return cls(
            layers_per_block=layers,
            down_block_types=tuple(config.get("down_block_types", ())),
            up_block_types=tuple(config.get("up_block_types", ())),
            mid_block_type=config.get("mid_block_type", _SGM_MID_BLOCK),
        )

    def module_path(self, path: str) -> str:
        """The SGM path of the diffusers layer ``path`` (a linear inside a transformer of a down, mid or up block)."""
        mid = _MID_ATTENTION.fullmatch(path)
        if mid is not None:
            if self.mid_block_type != _SGM_MID_BLOCK or int(mid.group(1)) != 0:
                raise _no_sgm_counterpart(
                    path, f"SGM's middle block holds one transformer (attentions.0 of a {_SGM_MID_BLOCK})"
                )
            return f"middle_block.1.{mid.group(2)}"
        match = _BLOCK_ATTENTION.fullmatch(path)
        if match is None:
            raise _no_sgm_counterpart(path, "it is outside the down, mid and up blocks")
        side, block, index, rest = match.group(1), int(match.group(2)), int(match.group(3)), match.group(4)
        types = self.down_block_types if side == "down" else self.up_block_types
        if block >= len(types):
            raise _no_sgm_counterpart(path, f"this UNet has {len(types)} {side} blocks")
        if types[block] not in _SGM_TRANSFORMER_BLOCKS:
            raise _no_sgm_counterpart(path, f"{side}_blocks.{block} is a {types[block]}, not an SGM transformer block")
        # An up block has one layer more than a down block: it also takes the skip of the downsampler.
        if side == "up":
            per_block, count = self.layers_per_block + 1, "layers_per_block + 1"
        else:
            per_block, count = self.layers_per_block, "layers_per_block"
        if index >= per_block:
            raise _no_sgm_counterpart(path, f"each {side} block holds {count} = {per_block} transformers")
        # A resolution's SGM blocks: layers_per_block layers and a downsampler block going down; layers_per_block + 1
        # layers going up (the upsampler is a child of the last one).
        stride = self.layers_per_block + 1
        if side == "down":
            return f"input_blocks.{1 + block * stride + index}.1.{rest}"  # input block 0 is conv_in
        return f"output_blocks.{block * stride + index}.1.{rest}"


def _no_sgm_counterpart(path: str, why: str) -> ResTunerError:
    return ResTunerError(
        f"layer {path} has no counterpart in the SGM UNet layout kohya's sd-scripts name SDXL LoRA modules by: "
        f"{why}; export this tuner with format='diffusers'"
    )


class UNetFamily(ModelFamily):
    name = "unet"
    model_word = "UNet"
    component = "unet"
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

    def kohya_module_paths(
        self, paths: Sequence[str], described: Mapping[str, Any], model_config: Mapping[str, Any] | None
    ) -> dict[str, str]:
        if "UNet" not in str(described.get("class", "UNet")):  # e.g. a bare Transformer2DModel: no lora_unet_ names
            return super().kohya_module_paths(paths, described, model_config)
        # A file that records its base says whether it is SDXL; for an older one the base's config does.
        if "addition_embed_type" in described:
            addition = described["addition_embed_type"]
        else:
            addition = (model_config or {}).get("addition_embed_type")
        if addition != "text_time":
            # SD 1.x/2.x: sd-scripts train a UNet with diffusers' module names, and diffusers' SD loader maps kohya
            # keys without any block renumbering.
            return {path: path for path in paths}
        # SDXL ("text_time" added conditions): sd-scripts train the SGM UNet, whose block numbers depend on the
        # config; diffusers' SDXL loader renumbers them with the pipeline's UNet config.
        if model_config is None:
            raise ResTunerError(
                "an SDXL UNet's kohya names follow the SGM layout, whose block numbers come from the UNet's "
                "layers_per_block and block types: pass base= (the base model's local folder or its unet folder, "
                "with its config.json, or the UNet itself) so that its config is read"
            )
        recorded, given = described.get("block_out_channels"), model_config.get("block_out_channels")
        if recorded and given is not None and list(recorded) != list(given):
            raise ResTunerError(
                f"the base's config has block_out_channels {list(given)}, the tuner was trained on a UNet with "
                f"{list(recorded)}: pass the base model it was trained on"
            )
        layout = SgmLayout.from_config(model_config)
        return {path: layout.module_path(path) for path in paths}

    def install_model_guards(self, model: nn.Module) -> None:
        model.set_default_attn_processor = functools.partial(_set_default_attn_processor_keeping_tuners, model)
        install_diffusers_guards(model)

    def remove_model_guards(self, model: nn.Module) -> None:
        model.__dict__.pop("set_default_attn_processor", None)
        remove_diffusers_guards(model)
