"""Res-Prefix: learned prefix keys and values attended by the frozen query, in parallel to the frozen attention."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import (
    ConfigError,
    FrozenAttention,
    OperationTuner,
    OpShape,
    TunerParams,
    check_dropout,
    check_positive,
    multi_head_attention,
)


@dataclass
class ResPrefixParams(TunerParams):
    prefix_length: int = 8
    dropout: float = 0.0

    def validate(self) -> None:
        check_positive("prefix_length", self.prefix_length)
        check_dropout(self.dropout)

    def validate_for(self, shape: OpShape) -> None:
        if not shape.is_attention:
            raise ConfigError("res_prefix needs an attention's frozen query and to_out: target attn1/attn2, not ff")


class ResPrefix(OperationTuner):
    r"""Res-Prefix: ``T(x) = W_o MHA(q, P_k, P_v)`` with ``q = to_q(x)`` the frozen query and ``W_o`` the frozen
    ``to_out`` weight (no bias), over the frozen attention's heads.

    ``P_k``, ``P_v``: L x d_inner (``P_k`` ~ N(0, 1), ``P_v`` zero): ``T = 0`` at init, and
    ``dL/dP_v = softmax(q P_k^T / sqrt(d_h))^T (g W_o)`` is non-zero on the first step. The frozen query is
    reused from the frozen attention when it has computed it, never recomputed.
    Trainable parameters: ``2 L d_inner``.
    """

    needs_frozen_attention = True

    def __init__(self, shape: OpShape, params: ResPrefixParams):
        super().__init__()
        params.validate_for(shape)
        self.prefix_keys = nn.Parameter(torch.randn(1, params.prefix_length, shape.inner_dim))
        self.prefix_values = nn.Parameter(torch.zeros(1, params.prefix_length, shape.inner_dim))
        self.dropout = nn.Dropout(params.dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None, frozen: FrozenAttention | None) -> torch.Tensor:
        query = frozen.frozen_query(x)
        keys = self.prefix_keys.to(query.dtype)
        values = self.prefix_values.to(query.dtype)
        attended = multi_head_attention(query, keys, values, frozen.heads)
        return frozen.project_out(self.dropout(attended))
