"""Res-LoRA: LoRA in unbound form, a low-rank branch beside one frozen linear projection (the U-Tuning baseline)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import LinearTuner, OpShape, TunerParams, check_dropout, check_positive, init_down_projection


@dataclass
class ResLoRAParams(TunerParams):
    rank: int = 4
    dropout: float = 0.0

    def validate(self) -> None:
        check_positive("rank", self.rank)
        check_dropout(self.dropout)


class ResLoRA(LinearTuner):
    r"""Res-LoRA: ``T(x) = B A x`` beside a frozen ``y = W0 x + b0``, so ``y' = y + s B A x``.

    ``A``: r x d_in (kaiming init), ``B``: d_out x r (zero init): ``T = 0`` at init and ``dL/dB = g (A x)^T``
    is non-zero on the first step. Trainable parameters: ``r (d_in + d_out)``. It folds exactly:
    ``dW = B A``, ``db = 0``. (Unlike diffusers' LoRA there is no alpha/r factor: the scale ``s`` plays that role.)
    """

    fold_reads_base = False

    def __init__(self, shape: OpShape, params: ResLoRAParams):
        super().__init__()
        self.lora_A = nn.Linear(shape.in_dim, params.rank, bias=False)
        self.lora_B = nn.Linear(params.rank, shape.out_dim, bias=False)
        self.dropout = nn.Dropout(params.dropout)
        init_down_projection(self.lora_A.weight)
        nn.init.zeros_(self.lora_B.weight)

    @property
    def mergeable(self) -> bool:  # type: ignore[override]
        """Dropout on x while training is not a function of ``B A`` alone: then the branch runs on its own."""
        return not (self.training and self.dropout.p > 0)

    def forward(
        self, x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.lora_B(self.lora_A(self.dropout(x)))

    def fold(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.lora_B.weight @ self.lora_A.weight, None

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A.weight, self.lora_B.weight
