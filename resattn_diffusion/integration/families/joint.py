"""What the SD3 and Flux families share: the joint attention of a diffusion transformer as a tuner layer, and
how a block's targets become layers (:class:`JointTransformerFamily`)."""

from __future__ import annotations

import functools
from typing import Any

from torch import nn

from ...tuners.base import OpShape
from ..processors import LinearBank, ResTunerJointAttnProcessor
from ..state import ResTunerError, get_state
from .base import (
    FUSED_PROJECTIONS,
    LAYERWISE_CASTING_REFUSAL,
    Layer,
    ModelFamily,
    feed_forward_layer,
    install_peft_guards,
    linear_layer,
    remove_peft_guards,
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


def _fuse_qkv_projections_keeping_tuners(model: nn.Module) -> None:
    """Installed as ``model.fuse_qkv_projections`` while tuners sit on it.

    diffusers copies ``to_q`` / ``to_k`` / ``to_v`` (and the text stream's ``add_*_proj``) into one new linear that
    the attention then runs instead: a linear tuner beside the separate projections would silently stop running (a
    fused one would be copied in for good, and unfusing it later would no longer reach the copy). That is refused
    before anything changes. Attention-side tuners stay: SD3 installs a fused processor, which ours wraps; diffusers
    remembers the processors to restore in ``unfuse_qkv_projections()`` -- ours, now wrapping the fused one -- so
    those are replaced by the processors ours wrapped before, and unfusing brings the unfused computation back.
    """
    state = get_state(model)
    fused_names = {name for names in FUSED_PROJECTIONS.values() for name in names}
    beside = [
        bank.layer_path
        for bank, _ in ([] if state is None else state.banks)
        if isinstance(bank, LinearBank) and bank.layer_path.rsplit(".", 1)[-1] in fused_names
    ]
    if beside:
        raise ResTunerError(
            f"fuse_qkv_projections() would copy the q/k/v projections into one linear the attention runs instead, "
            f"and the res tuner(s) beside {len(beside)} of them (e.g. {beside[0]}) would silently stop running; "
            "nothing was fused. Remove those tuners first (remove_res_tuner), or keep the projections unfused: "
            "fuse_res_tuner folds linear tuners into the weights for inference"
        )
    before = {name: getattr(p, "base_processor", p) for name, p in model.attn_processors.items()}
    type(model).fuse_qkv_projections(model)
    if getattr(model, "original_attn_processors", None) is not None:
        model.original_attn_processors = before


def _enable_layerwise_casting_refused(model: nn.Module, *args: Any, **kwargs: Any) -> None:
    """Installed as ``model.enable_layerwise_casting`` while tuners sit on it: diffusers would cast every module
    under each linear and attention to the storage dtype -- the tuners that are children of them too -- and back to
    the compute dtype around each call, so the tuners' weights would be rounded to float8 for good (and some would
    fail in the forward with a raw dtype error)."""
    raise ResTunerError(LAYERWISE_CASTING_REFUSAL)


class JointTransformerFamily(ModelFamily):
    """A diffusion transformer of joint-attention blocks (SD3, Flux): joint attentions, feed-forwards and, where a
    family names them in :attr:`single_linears`, single linear projections as targets."""

    projections = JOINT_PROJECTIONS
    default_projections = JOINT_PROJECTIONS
    call_kwargs = "joint_attention_kwargs"
    #: targets that are one linear each (Flux's single blocks' ``proj_mlp``, ``proj_out``): linear tuners only
    single_linears: tuple[str, ...] = ()

    def install_model_guards(self, model: nn.Module) -> None:
        model.fuse_qkv_projections = functools.partial(_fuse_qkv_projections_keeping_tuners, model)
        if hasattr(type(model), "enable_layerwise_casting"):  # diffusers 0.33 and later
            model.enable_layerwise_casting = functools.partial(_enable_layerwise_casting_refused, model)
        install_peft_guards(model)

    def remove_model_guards(self, model: nn.Module) -> None:
        model.__dict__.pop("fuse_qkv_projections", None)
        model.__dict__.pop("enable_layerwise_casting", None)
        remove_peft_guards(model)

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
