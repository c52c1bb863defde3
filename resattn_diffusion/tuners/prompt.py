"""Res-Prompt: learned prompt tokens read through the frozen key/value projections, gated, in parallel."""

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
class ResPromptParams(TunerParams):
    prompt_length: int = 8
    dropout: float = 0.0

    def validate(self) -> None:
        check_positive("prompt_length", self.prompt_length)
        check_dropout(self.dropout)

    def validate_for(self, shape: OpShape) -> None:
        if not shape.is_attention:
            raise ConfigError("res_prompt needs an attention's frozen to_k/to_v/to_out: target attn1/attn2, not ff")


class ResPrompt(OperationTuner):
    r"""Res-Prompt: ``T(x) = g ⊙ W_o MHA(q, to_k(P), to_v(P))`` with the frozen ``to_q``, ``to_k``, ``to_v`` and
    ``to_out`` weight ``W_o`` (no bias), over the frozen attention's heads.

    ``P``: L x d_c prompt tokens in the context's space (~ N(0, 1), like layer-normed tokens), ``g``: a
    per-channel gate of size d_out (zero init): ``T = 0`` at init, ``dL/dg = g_out ⊙ W_o MHA(...)`` is non-zero
    on the first step, and ``P`` learns once ``g`` has moved. Trainable parameters: ``L d_c + d_out``.
    """

    needs_frozen_attention = True

    def __init__(self, shape: OpShape, params: ResPromptParams):
        super().__init__()
        params.validate_for(shape)
        self.prompt_tokens = nn.Parameter(torch.randn(1, params.prompt_length, shape.context_dim))
        self.gate = nn.Parameter(torch.zeros(shape.out_dim))
        self.dropout = nn.Dropout(params.dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None, frozen: FrozenAttention | None) -> torch.Tensor:
        query = frozen.frozen_query(x)
        tokens = self.prompt_tokens.to(query.dtype)
        attended = multi_head_attention(query, frozen.to_k(tokens), frozen.to_v(tokens), frozen.heads)
        return frozen.project_out(self.dropout(attended)) * self.gate.to(query.dtype)
