"""Res-Attn: a parallel low-rank multi-head attention beside a frozen operation (the project's headline tuner)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import (
    ConfigError,
    ExtraHeads,
    FrozenAttention,
    OperationTuner,
    OpShape,
    TunerParams,
    check_dropout,
    check_positive,
    init_down_projection,
    packed_multi_head_attention,
)


@dataclass
class ResAttnParams(TunerParams):
    rank: int = 8
    heads: int = 2
    dropout: float = 0.0

    def validate(self) -> None:
        check_positive("rank", self.rank)
        check_positive("heads", self.heads)
        check_dropout(self.dropout)
        if self.rank % self.heads:
            divisors = [h for h in range(1, self.rank + 1) if self.rank % h == 0]
            raise ConfigError(
                f"res_attn: rank={self.rank} is not divisible by heads={self.heads}; "
                f"with rank {self.rank} use heads in {divisors}, or pick a rank that is a multiple of {self.heads}"
            )


class ResAttn(OperationTuner):
    r"""Res-Attn: ``T(x, c) = W_up MHA_h(x A_q, c A_k, c A_v)``.

    ``A_q``: d x r, ``A_k``, ``A_v``: d_c x r (kaiming init), ``W_up``: r x d_out (zero init); ``MHA_h`` is
    scaled dot-product attention over ``h`` heads of ``r/h`` channels (softmax scale ``1/sqrt(r/h)``).
    On cross-attention the keys and values come from the text context, so the branch learns new text-to-image
    correspondences at low rank; on self-attention and the feed-forward ``c = x``. Keys the frozen attention masks
    (``frozen.key_mask``: a padded prompt's ``encoder_attention_mask``) are masked in ``MHA_h`` too.
    ``T = 0`` at init, and ``dL/dW_up = g MHA(...)^T`` is non-zero on the first step.
    Trainable parameters: ``r (d + 2 d_c + d_out)``.

    ``head_padding`` (``"auto"``, ``"off"``, ``"on"``; per module): whether the attention pads its heads to 8
    channels for the fused kernels (exact; ``"auto"``: on CUDA; see :func:`~.base.pads_head_dim`).
    """

    head_padding: str = "auto"

    def __init__(self, shape: OpShape, params: ResAttnParams):
        super().__init__()
        self.heads = params.heads
        self.rank = params.rank
        self.q_proj = nn.Linear(shape.in_dim, params.rank, bias=False)
        # k and v in one matrix: one matmul on the context instead of two.
        self.kv_proj = nn.Linear(shape.context_dim, 2 * params.rank, bias=False)
        self.dropout = nn.Dropout(params.dropout)
        self.out_proj = nn.Linear(params.rank, shape.out_dim, bias=False)
        init_down_projection(self.q_proj.weight)
        init_down_projection(self.kv_proj.weight)
        nn.init.zeros_(self.out_proj.weight)
        self._self_attention_ok = shape.context_dim == shape.in_dim

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, frozen: FrozenAttention | None = None
    ) -> torch.Tensor:
        # Hot path (once per attention call; on a GPU its host work, not its tiny GEMMs, is what it costs): the
        # projections stay packed -- q | k | v (self-attention: one GEMM) or k | v -- and the heads are viewed out
        # of them (packed_multi_head_attention); the weights are read directly instead of calling the Linear
        # modules, and dropout is only called when it can do something.
        mask = None if frozen is None else frozen.key_mask  # the keys are the frozen attention's tokens
        if context is None and self._self_attention_ok:
            # Self-attention: q, k and v from the same input in a single matmul.
            qkv = F.linear(x, torch.cat([self.q_proj.weight, self.kv_proj.weight]))
            attended = packed_multi_head_attention(qkv, self.heads, None, self.head_padding, mask)
        else:
            if context is None:  # keys and values are read from a d_c-wide context, which x (d wide) is not
                raise ConfigError(
                    f"res_attn: this branch sits on a cross-attention (context width {self.kv_proj.in_features}, "
                    f"input width {self.q_proj.in_features}): pass the context (encoder_hidden_states) as `context`"
                )
            q = F.linear(x, self.q_proj.weight)
            kv = F.linear(context, self.kv_proj.weight)
            attended = packed_multi_head_attention(q, self.heads, kv, self.head_padding, mask)
        if self.dropout.p > 0 and self.dropout.training:
            attended = self.dropout(attended)
        return F.linear(attended, self.out_proj.weight)

    def extra_heads(self, head_dim: int, scale: float, dtype: torch.dtype | None = None) -> ExtraHeads | None:
        """The branch as ``heads`` extra heads of a frozen attention with ``head_dim``-channel heads (same keys:
        ``c``, or ``x`` in self-attention). Each branch head is zero-padded from ``r/h`` to ``head_dim`` channels
        (zero channels add nothing to ``q . k``; the padded output channels meet zero columns of ``out``) and its
        query rows are multiplied by ``sqrt(head_dim / (r/h))``, so the shared softmax scale ``1/sqrt(head_dim)``
        gives the branch's own ``1/sqrt(r/h)``; ``scale`` goes into ``out``.

        Formed from the parameters in every call (differentiable; nothing about the parameters is cached, so no
        write to them can go unseen) by three small matmuls with constant placement matrices (:func:`_placement`:
        one non-zero per row, the padding and the factor in one op, each entry a single product: exactly the
        padded, scaled weights), in float32 whatever the autocast, then cast to ``dtype``. None while dropout is
        active, or when a branch head is wider than the frozen ones."""
        width = self.rank // self.heads
        if width > head_dim or (self.dropout.p > 0 and self.dropout.training):
            return None
        device_type = self.q_proj.weight.device.type
        if torch.is_autocast_enabled(device_type):
            with torch.autocast(device_type, enabled=False):
                return self._extra_heads(width, head_dim, scale, dtype)
        return self._extra_heads(width, head_dim, scale, dtype)

    def _extra_heads(self, width: int, head_dim: int, scale: float, dtype: torch.dtype | None) -> ExtraHeads:
        q_weight, kv_weight, up_weight = self.q_proj.weight, self.kv_proj.weight, self.out_proj.weight
        dtype = dtype or q_weight.dtype
        heads = self.heads
        query_factor = math.sqrt(head_dim / width)
        q = torch.mm(_placement(heads, width, head_dim, (query_factor,), q_weight), q_weight).to(dtype)
        k, v = torch.mm(_placement(heads, width, head_dim, (1.0, 1.0), kv_weight), kv_weight).to(dtype).chunk(2)
        out = torch.mm(up_weight, _placement(heads, width, head_dim, (scale,), up_weight, transposed=True))
        return ExtraHeads(q=q, k=k, v=v, out=out.to(dtype), heads=heads)


#: (heads, width, head_dim, factors, transposed, dtype, device) -> placement matrix (see :func:`_placement`).
_PLACEMENTS: dict[tuple, torch.Tensor] = {}
#: Entries kept at most (a per-call scale is part of the key): the cache is emptied beyond it.
_MAX_PLACEMENTS = 256


def _placement(
    heads: int, width: int, head_dim: int, factors: tuple[float, ...], like: torch.Tensor, transposed: bool = False
) -> torch.Tensor:
    """The constant ``(parts * heads * head_dim, parts * heads * width)`` matrix ``P`` (``parts = len(factors)``)
    whose row ``(p, i, c)`` holds ``factors[p]`` at column ``(p, i, c)`` for ``c < width`` and is zero for the
    padding channels ``c >= width``: ``P @ W`` is ``W`` with each head's rows zero-padded to ``head_dim`` and part
    ``p`` multiplied by ``factors[p]``, every entry a single product (exact). ``transposed``: ``P^T``, contiguous,
    for padding columns (``W @ P^T``). Built once per key, in ``like``'s dtype and device, outside inference mode."""
    key = (heads, width, head_dim, factors, transposed, like.dtype, like.device)
    placement = _PLACEMENTS.get(key)
    if placement is None:
        if len(_PLACEMENTS) >= _MAX_PLACEMENTS:
            _PLACEMENTS.clear()
        with torch.inference_mode(False), torch.no_grad():
            parts = len(factors)
            placement = torch.zeros(parts, heads, head_dim, parts, heads, width, dtype=like.dtype, device=like.device)
            for part, factor in enumerate(factors):
                for head in range(heads):
                    placement[part, head, :width, part, head].fill_diagonal_(factor)
            placement = placement.reshape(parts * heads * head_dim, parts * heads * width)
            if transposed:
                placement = placement.t().contiguous()
        _PLACEMENTS[key] = placement
    return placement
