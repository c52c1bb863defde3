"""The SD3 family: ``SD3Transformer2DModel`` (SD3, SD3.5). Each ``JointTransformerBlock`` has the joint attention
``attn`` over text and image tokens, SD3.5's optional second image self-attention ``attn2``, the image stream's
feed-forward ``ff`` and the text stream's ``ff_context`` (absent in the last, ``context_pre_only`` block)."""

from __future__ import annotations

from typing import Any

from torch import nn

from .joint import JointTransformerFamily


class SD3Family(JointTransformerFamily):
    name = "sd3"
    model_word = "SD3 transformer"
    model_classes = ("SD3Transformer2DModel",)
    targets = ("attn", "attn2", "ff", "ff_context")
    default_targets = ("attn", "attn2")
    block_examples = ("transformer_blocks.*", "transformer_blocks.1*")

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(f"transformer_blocks.{i}", block) for i, block in enumerate(model.transformer_blocks)]

    def _describe(self, get) -> dict[str, Any]:
        return {
            "num_layers": get("num_layers"),
            "num_attention_heads": get("num_attention_heads"),
            "attention_head_dim": get("attention_head_dim"),
            "joint_attention_dim": get("joint_attention_dim"),
            "dual_attention_layers": list(get("dual_attention_layers", ()) or ()),
        }
