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
    correspondences at low rank; on self-attention and the feed-forward ``c = x``.
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
        if context is None and self._self_attention_ok:
            # Self-attention: q, k and v from the same input in a single matmul.
            qkv = F.linear(x, torch.cat([self.q_proj.weight, self.kv_proj.weight]))
            attended = packed_multi_head_attention(qkv, self.heads, None, self.head_padding)
        else:
            q = F.linear(x, self.q_proj.weight)
            kv = F.linear(x if context is None else context, self.kv_proj.weight)
            attended = packed_multi_head_attention(q, self.heads, kv, self.head_padding)
        if self.dropout.p > 0 and self.dropout.training:
            attended = self.dropout(attended)
        return F.linear(attended, self.out_proj.weight)

    def extra_heads(self, head_dim: int, scale: float, dtype: torch.dtype | None = None) -> ExtraHeads | None:
        """The branch as ``heads`` extra heads of a frozen attention with ``head_dim``-channel heads (same keys:
        ``c``, or ``x`` in self-attention). Each branch head is zero-padded from ``r/h`` to ``head_dim`` channels
        (zero channels add nothing to ``q . k``; the padded output channels meet zero columns of ``out``) and its
        query rows are multiplied by ``sqrt(head_dim / (r/h))``, so the shared softmax scale ``1/sqrt(head_dim)``
        gives the branch's own ``1/sqrt(r/h)``. Differentiable in the parameters (a few ops on the weights, none
        on activations). None while dropout is active, or when a branch head is wider than the frozen ones."""
        branch_dim = self.rank // self.heads
        if branch_dim > head_dim or (self.dropout.p > 0 and self.dropout.training):
            return None
        query = self.q_proj.weight * math.sqrt(head_dim / branch_dim)
        if self._self_attention_ok:  # q, k and v rows padded (and cast) in one go
            q, k, v = _pad_heads(torch.cat([query, self.kv_proj.weight]), 3 * self.heads, head_dim, 0, dtype).chunk(3)
        else:
            q = _pad_heads(query, self.heads, head_dim, 0, dtype)
            k, v = _pad_heads(self.kv_proj.weight, 2 * self.heads, head_dim, 0, dtype).chunk(2)
        up = self.out_proj.weight if scale == 1.0 else self.out_proj.weight * scale
        return ExtraHeads(q=q, k=k, v=v, out=_pad_heads(up, self.heads, head_dim, 1, dtype), heads=self.heads)


def _pad_heads(
    weight: torch.Tensor, heads: int, head_dim: int, dim: int, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``weight`` with its ``dim`` (``heads`` heads of equal width) zero-padded per head to ``head_dim``, in
    ``dtype`` (default: its own)."""
    if dtype is not None:
        weight = weight.to(dtype)
    width = weight.shape[dim] // heads
    if width == head_dim:
        return weight
    if dim == 0:
        rows = weight.reshape(heads, width, weight.shape[1])
        return F.pad(rows, (0, 0, 0, head_dim - width)).reshape(heads * head_dim, weight.shape[1])
    columns = weight.reshape(weight.shape[0], heads, width)
    return F.pad(columns, (0, head_dim - width)).reshape(weight.shape[0], heads * head_dim)
