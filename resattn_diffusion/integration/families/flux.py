"""The Flux family: ``FluxTransformer2DModel``. Double-stream ``FluxTransformerBlock``s have the joint attention
``attn`` and the feed-forwards ``ff`` (image) and ``ff_context`` (text); single-stream
``FluxSingleTransformerBlock``s have ``attn`` over the concatenated text+image sequence (no output projection) and
the linears ``proj_mlp`` and ``proj_out`` (the latter reads ``[attention; mlp]``), targets for linear tuners."""

from __future__ import annotations

from typing import Any

from torch import nn

from .joint import JointTransformerFamily


class FluxFamily(JointTransformerFamily):
    name = "flux"
    model_word = "Flux transformer"
    model_classes = ("FluxTransformer2DModel",)
    targets = ("attn", "ff", "ff_context", "proj_mlp", "proj_out")
    default_targets = ("attn",)
    single_linears = ("proj_mlp", "proj_out")
    block_examples = ("transformer_blocks.*", "single_transformer_blocks.*")

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        double = [(f"transformer_blocks.{i}", b) for i, b in enumerate(model.transformer_blocks)]
        single = [(f"single_transformer_blocks.{i}", b) for i, b in enumerate(model.single_transformer_blocks)]
        return double + single

    def _describe(self, get) -> dict[str, Any]:
        return {
            "num_layers": get("num_layers"),
            "num_single_layers": get("num_single_layers"),
            "num_attention_heads": get("num_attention_heads"),
            "attention_head_dim": get("attention_head_dim"),
            "joint_attention_dim": get("joint_attention_dim"),
        }
