r"""SURM: structured unrestricted-rank matrices as weight updates and as adapter projections (papers/surm.md).

Beside a frozen ``y = W0 x + b0`` a SURM linear tuner adds ``T(x) = dW x`` (no bias term), where ``dW`` is a
structured, possibly full-rank d_out x d_in matrix with few parameters, applied without being materialised:

* ``surm_circulant``: ``dW = circ(v)[:d_out, :d_in]``, v of length ``n = max(d_in, d_out)``; n parameters.
* ``surm_toeplitz``: ``dW = T(t)``, ``T[i, j] = t[i - j + d_in - 1]``; ``d_out + d_in - 1`` parameters.
* ``surm_kronecker``: ``dW = A (x) B``, A a1 x a2, B b1 x b2, ``a1 b1 = d_out``, ``a2 b2 = d_in``;
  ``a1 a2 + b1 b2`` parameters.
* ``surm_ldr``: ``dW = (sum_{i<k} circ(g_i) skew(h_i))[:d_out, :d_in]``; ``2 k n`` parameters,
  ``n = max(d_in, d_out)``.

The precise definitions (first-column conventions of circulant and skew-circulant, the Toeplitz indexing, the
row-major Kronecker identity) are in :mod:`resattn_diffusion.tuners.structured`.

Rectangular weights (SD cross-attention ``to_k``: 768 -> 320, feed-forward 320 -> 2560 / 1280 -> 320, ...):
circulant and LDR use the top-left d_out x d_in block of an n x n matrix, ``n = max(d_in, d_out)``, applied by
zero-padding x to n and truncating the output to d_out (every parameter still reaches the block). Toeplitz and
Kronecker are rectangular by definition.

Init: exactly ``dW = 0`` -- circulant ``v = 0`` and Toeplitz ``t = 0`` (one factor, linear in it: the gradient
``dL/dv`` is a correlation of the output gradient with x, non-zero at ``v = 0``); Kronecker ``A = 0`` with B
random; LDR ``g = 0`` with h random (only ONE factor of each product is zero, so the zero factor has a non-zero
gradient on the first step and the other one as soon as it has moved).

FFT paths (circulant, Toeplitz, LDR) compute in float32 with autocast disabled and return the input's dtype.
``fold`` materialises ``dW`` exactly, so a trained SURM delta fuses into the weight like LoRA's.

SURM-Adapter (``surm_adapter``, an operation tuner): ``T(x) = U act(D x)`` with D (d -> h) and U (h -> d_out)
structured matrices of one family. A circulant has no rank to shrink, so there is no bottleneck: the hidden width
h defaults to the full input width d. D is random, U zero-initialised (its zero factor).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .base import (
    ConfigError,
    FrozenAttention,
    LinearTuner,
    OperationTuner,
    OpShape,
    TunerParams,
    check_choice,
    check_dropout,
    make_activation,
)
from .structured import (
    STRUCTURES,
    CirculantMatrix,
    KroneckerMatrix,
    LDRMatrix,
    StructuredMatrix,
    ToeplitzMatrix,
    resolve_kronecker_factors,
)


def _check_dims(shape: OpShape) -> None:
    if shape.in_dim < 1 or shape.out_dim < 1:
        raise ConfigError(f"SURM needs positive in_dim and out_dim, got {shape.in_dim} -> {shape.out_dim}")


def _check_displacement_rank(value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"displacement_rank must be a positive integer, got {value!r}")


def _check_factor(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"{name} must be a non-negative integer (0 = automatic), got {value!r}")


# --- params ----------------------------------------------------------------------------------------------------


@dataclass
class SURMCirculantParams(TunerParams):
    """Circulant has no hyperparameter: its size is ``max(d_in, d_out)``."""

    def validate_for(self, shape: OpShape) -> None:
        _check_dims(shape)


@dataclass
class SURMToeplitzParams(TunerParams):
    """Toeplitz has no hyperparameter: it has ``d_out + d_in - 1`` parameters."""

    def validate_for(self, shape: OpShape) -> None:
        _check_dims(shape)


@dataclass
class SURMKroneckerParams(TunerParams):
    """``out_factor`` = a1 (rows of A, divides d_out), ``in_factor`` = a2 (columns of A, divides d_in).

    0 means automatic: the largest divisor <= sqrt(dim), i.e. near-square factors (320 -> 16 x 20, 768 -> 24 x 32).
    A fixed factor applies to every layer the tuner is put on, so it must divide all of their dims.
    """

    out_factor: int = 0
    in_factor: int = 0

    def validate(self) -> None:
        _check_factor("out_factor", self.out_factor)
        _check_factor("in_factor", self.in_factor)

    def validate_for(self, shape: OpShape) -> None:
        _check_dims(shape)
        resolve_kronecker_factors(shape.out_dim, shape.in_dim, self.out_factor, self.in_factor)


@dataclass
class SURMLDRParams(TunerParams):
    """``displacement_rank`` = k, the number of circulant x skew-circulant products summed."""

    displacement_rank: int = 1

    def validate(self) -> None:
        _check_displacement_rank(self.displacement_rank)

    def validate_for(self, shape: OpShape) -> None:
        _check_dims(shape)


# --- linear tuners ---------------------------------------------------------------------------------------------


class SURMLinear(LinearTuner):
    """Shared body of the SURM linear tuners: ``T(x) = dW x`` with ``dW = self.delta`` a structured matrix."""

    structure: ClassVar[str]
    fold_reads_base = False  # dW is the structured matrix alone

    def __init__(self, shape: OpShape, params: TunerParams):
        super().__init__()
        params.validate()
        params.validate_for(shape)
        self.delta: StructuredMatrix = STRUCTURES[self.structure](
            shape.out_dim, shape.in_dim, init="zero", **self._structure_kwargs(params)
        )

    @staticmethod
    def _structure_kwargs(params: TunerParams) -> dict[str, int]:
        return {}

    @classmethod
    def num_parameters_for(cls, shape: OpShape, params: TunerParams) -> int:
        """Trainable parameters on a d_in -> d_out layer (the formula in the class docstring)."""
        return STRUCTURES[cls.structure].count_parameters(shape.out_dim, shape.in_dim, **cls._structure_kwargs(params))

    def forward(
        self, x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.delta(x)

    def materialize(self) -> torch.Tensor:
        """``dW`` as a dense d_out x d_in matrix (in the parameters' dtype)."""
        return self.delta.materialize()

    #: ``T`` folds into the frozen GEMM during training too (the GPU fast path of the linear bank).
    mergeable: ClassVar[bool] = True

    def fold(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(dW, None)``: ``T(x) = dW x`` exactly (no bias term), in the frozen weight's dtype. Differentiable
        (the merged fast path trains through it): ``StructuredMatrix.dense_matrix``."""
        return self.delta.dense_matrix().to(weight.dtype), None


class SURMCirculant(SURMLinear):
    r"""SURM circulant: ``T(x) = circ(v)[:d_out, :d_in] x``, ``circ(v)[i, j] = v[(i - j) mod n]``,
    ``n = max(d_in, d_out)``; computed as ``irfft(rfft(pad_n(x)) * rfft(v))[:d_out]``. Parameters: n. Init
    ``v = 0``."""

    structure = "circulant"


class SURMToeplitz(SURMLinear):
    r"""SURM Toeplitz: ``T(x) = T(t) x``, ``T(t)[i, j] = t[i - j + d_in - 1]``; computed as the slice
    ``[d_in - 1, d_in - 1 + d_out)`` of ``irfft(rfft(x, L) * rfft(t, L))`` with L the fast FFT length
    ``>= d_out + d_in - 1`` (a circulant embedding). Parameters: ``d_out + d_in - 1``. Init ``t = 0``."""

    structure = "toeplitz"


class SURMKronecker(SURMLinear):
    r"""SURM Kronecker: ``T(x) = (A (x) B) x = (A X B^T).reshape(d_out)`` with ``X = x.reshape(a2, b2)`` (row-major),
    A a1 x a2, B b1 x b2, ``a1 b1 = d_out``, ``a2 b2 = d_in``. Parameters: ``a1 a2 + b1 b2``. Init ``A = 0``, B
    random."""

    structure = "kronecker"

    @staticmethod
    def _structure_kwargs(params: SURMKroneckerParams) -> dict[str, int]:
        return {"out_factor": params.out_factor, "in_factor": params.in_factor}


class SURMLDR(SURMLinear):
    r"""SURM low displacement rank: ``T(x) = (sum_{i<k} circ(g_i) skew(h_i))[:d_out, :d_in] x``, with
    ``skew(h)[i, j] = h[i - j]`` (i >= j), ``-h[n + i - j]`` (i < j), ``n = max(d_in, d_out)``; the skew-circulant is
    applied as ``conj(w^t) ifft(fft(w^t h) fft(w^t x))``, ``w = exp(i pi / n)``. Parameters: ``2 k n``.
    Init ``g = 0``, h random."""

    structure = "ldr"

    @staticmethod
    def _structure_kwargs(params: SURMLDRParams) -> dict[str, int]:
        return {"displacement_rank": params.displacement_rank}


# --- SURM-Adapter ----------------------------------------------------------------------------------------------


@dataclass
class SURMAdapterParams(TunerParams):
    """``structure``: the family of both projections; ``hidden_dim``: the adapter width h (0 = the input width d);
    ``displacement_rank``: k for ``structure="ldr"``. Kronecker factors are automatic (near-square)."""

    structure: str = "circulant"
    hidden_dim: int = 0
    activation: str = "gelu"
    dropout: float = 0.0
    displacement_rank: int = 1

    def validate(self) -> None:
        check_choice("structure", self.structure, tuple(STRUCTURES))
        if not isinstance(self.hidden_dim, int) or isinstance(self.hidden_dim, bool) or self.hidden_dim < 0:
            raise ConfigError(
                f"hidden_dim must be a non-negative integer (0 = the input width), got {self.hidden_dim!r}"
            )
        make_activation(self.activation)
        check_dropout(self.dropout)
        _check_displacement_rank(self.displacement_rank)

    def validate_for(self, shape: OpShape) -> None:
        _check_dims(shape)

    def hidden_width(self, shape: OpShape) -> int:
        return self.hidden_dim or shape.in_dim

    def structure_kwargs(self) -> dict[str, int]:
        return {"displacement_rank": self.displacement_rank} if self.structure == "ldr" else {}


class SURMAdapter(OperationTuner):
    r"""SURM-Adapter: ``T(x) = U act(D x)``, D a structured h x d matrix (random init), U a structured d_out x h
    matrix (zero init: its zero factor), same family for both. ``T = 0`` at init; ``dL/dU`` is non-zero on the
    first step, D learns once U has moved.

    There is no low-rank bottleneck (a circulant's rank cannot be chosen): by default ``h = d`` (full width).
    Parameters: ``count(h, d) + count(d_out, h)`` with ``count`` the family's formula (circulant ``max``, Toeplitz
    ``rows + cols - 1``, Kronecker ``a1 a2 + b1 b2`` with automatic factors, LDR ``2 k max``). The context is not
    used: like Res-Adapter it reads only the operation's input (or output, in sequential form).
    """

    def __init__(self, shape: OpShape, params: SURMAdapterParams):
        super().__init__()
        params.validate()
        params.validate_for(shape)
        hidden = params.hidden_width(shape)
        family = STRUCTURES[params.structure]
        kwargs = params.structure_kwargs()
        self.down = family(hidden, shape.in_dim, init="random", **kwargs)
        self.act = make_activation(params.activation)
        self.dropout = nn.Dropout(params.dropout)
        self.up = family(shape.out_dim, hidden, init="zero", **kwargs)

    @staticmethod
    def num_parameters_for(shape: OpShape, params: SURMAdapterParams) -> int:
        hidden = params.hidden_width(shape)
        family = STRUCTURES[params.structure]
        kwargs = params.structure_kwargs()
        return family.count_parameters(hidden, shape.in_dim, **kwargs) + family.count_parameters(
            shape.out_dim, hidden, **kwargs
        )

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, frozen: FrozenAttention | None = None
    ) -> torch.Tensor:
        return self.up(self.dropout(self.act(self.down(x))))


__all__ = [
    "SURMAdapter",
    "SURMAdapterParams",
    "SURMCirculant",
    "SURMCirculantParams",
    "SURMKronecker",
    "SURMKroneckerParams",
    "SURMLDR",
    "SURMLDRParams",
    "SURMLinear",
    "SURMToeplitz",
    "SURMToeplitzParams",
    "CirculantMatrix",
    "ToeplitzMatrix",
    "KroneckerMatrix",
    "LDRMatrix",
]
