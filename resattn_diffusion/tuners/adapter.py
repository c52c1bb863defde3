"""Res-Adapter: a bottleneck adapter beside a frozen operation (U-Tuning / Res-Tuning)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import (
    FrozenAttention,
    OperationTuner,
    OpShape,
    TunerParams,
    check_dropout,
    check_positive,
    init_down_projection,
    make_activation,
)


@dataclass
class ResAdapterParams(TunerParams):
    rank: int = 16
    activation: str = "gelu"
    dropout: float = 0.0

    def validate(self) -> None:
        check_positive("rank", self.rank)
        make_activation(self.activation)
        check_dropout(self.dropout)


class ResAdapter(OperationTuner):
    r"""Res-Adapter: ``T(x) = W_up act(W_down x)``.

    ``W_down``: d -> r (kaiming init), ``W_up``: r -> d_out (zero init), so ``T = 0`` at init while
    ``dL/dW_up = g (act(W_down x))^T`` is non-zero on the first step. Trainable parameters: ``r (d + d_out)``.
    The context is not used: an adapter reads only the operation's input (or output, in sequential form).
    """

    def __init__(self, shape: OpShape, params: ResAdapterParams):
        super().__init__()
        self.down = nn.Linear(shape.in_dim, params.rank, bias=False)
        self.act = make_activation(params.activation)
        self.dropout = nn.Dropout(params.dropout)
        self.up = nn.Linear(params.rank, shape.out_dim, bias=False)
        init_down_projection(self.down.weight)
        nn.init.zeros_(self.up.weight)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, frozen: FrozenAttention | None = None
    ) -> torch.Tensor:
        return self.up(self.dropout(self.act(self.down(x))))
