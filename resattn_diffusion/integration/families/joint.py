"""What the SD3 and Flux families share: the joint attention of a diffusion transformer as a tuner layer, and
how a block's targets become layers (:class:`JointTransformerFamily`)."""

from __future__ import annotations

from torch import nn

from ...tuners.base import OpShape
from ..processors import ResTunerJointAttnProcessor
from ..state import ResTunerError
from .base import (
    Layer,
    ModelFamily,
    feed_forward_layer,
    install_diffusers_guards,
    linear_layer,
    remove_diffusers_guards,
)
from .unet import attention_linears

#: Projections of a joint attention: the image stream's, then the text stream's (``to_out`` is ``to_out.0``).
JOINT_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def joint_attention_layer(path: str, attn: nn.Module) -> Layer:
    """An SD3 ``Attention`` / Flux ``FluxAttention`` as a layer of role ``"attention"``, wrapped by
    :class:`ResTunerJointAttnProcessor`.

    The branch's input ``x`` is the image stream (or the one sequence of SD3.5's ``attn2`` and Flux's single blocks);
    its context is the joint sequence ``[c; x]``, so the text stream's width must equal the image stream's (it does
    in SD3 and Flux, where ``context_embedder`` maps the text to the model width). Without ``to_out`` (Flux's
    single blocks) the branch returns the attention's inner width. A ``context_pre_only`` attention (SD3's last
    block) offers no text-query / text-output projection to linear tuners.
    """
    in_dim, inner_dim = attn.to_q.in_features, attn.to_q.out_features
    added_k = getattr(attn, "add_k_proj", None)
    context_dim = in_dim if added_k is None else added_k.in_features
    if context_dim != in_dim:
        raise ResTunerError(
            f"{path}: the text stream is {context_dim} wide and the image stream {in_dim}; the branches read the "
            "joint sequence [text; image] and need one width"
        )
    to_out = getattr(attn, "to_out", None)
    out_dim = inner_dim if to_out is None else to_out[0].out_features
    shape = OpShape(in_dim=in_dim, out_dim=out_dim, context_dim=context_dim, inner_dim=inner_dim, heads=attn.heads)
    projections = JOINT_PROJECTIONS
    if getattr(attn, "context_pre_only", False):
        # SD3's last block drops the text stream's output (diffusers builds no to_add_out there), but keeps its text
        # query projection: a tuner on it could never change the image.
        projections = tuple(p for p in projections if p != "add_q_proj")
    return Layer(path, attn, "attention", shape, ResTunerJointAttnProcessor, attention_linears(attn, projections))


class JointTransformerFamily(ModelFamily):
    """A diffusion transformer of joint-attention blocks (SD3, Flux): joint attentions, feed-forwards and, where a
    family names them in :attr:`single_linears`, single linear projections as targets."""

    component = "transformer"
    projections = JOINT_PROJECTIONS
    default_projections = JOINT_PROJECTIONS
    call_kwargs = "joint_attention_kwargs"
    #: targets that are one linear each (Flux's single blocks' ``proj_mlp``, ``proj_out``): linear tuners only
    single_linears: tuple[str, ...] = ()

    def install_model_guards(self, model: nn.Module) -> None:
        install_diffusers_guards(model)

    def remove_model_guards(self, model: nn.Module) -> None:
        remove_diffusers_guards(model)

    def operation(self, block_path: str, block: nn.Module, target: str) -> Layer | None:
        op = getattr(block, target, None)
        if op is None:
            # not in every block: SD3's attn2 (dual-attention blocks only) and ff_context (not the last block),
            # Flux's ff / ff_context (double blocks only) and proj_mlp / proj_out (single blocks only)
            return None
        path = f"{block_path}.{target}"
        if target in self.single_linears:
            return linear_layer(path, op)
        if target in ("ff", "ff_context"):
            return feed_forward_layer(path, op)
        return joint_attention_layer(path, op)
