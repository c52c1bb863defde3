"""What every tuner shares: the shapes it is built from, the frozen parts it may read, and two small protocols.

This layer is pure torch: it knows nothing of diffusers. The integration layer (``resattn_diffusion.integration``)
reads the shapes off diffusers modules, decides where a branch sits (parallel or sequential) and its scale, and
calls the tuner. A tuner never learns where it sits.

Two kinds of tuner exist:

* :class:`OperationTuner` -- a branch ``T(x, c)`` beside a whole frozen operation (an attention or a feed-forward):
  ``y' = OP(x, c) + s * T(x, c)`` (parallel) or ``y' = OP(x, c) + s * T(OP(x, c))`` (sequential).
* :class:`LinearTuner` -- a branch beside one frozen linear projection ``y = W0 x + b0``. Its output is affine in
  its input, ``T(x) = dW x + db``, so it folds into the weight (:meth:`LinearTuner.fold`).

Contract checked by the tests for every registered tuner: an exact no-op at init (one factor of each product, or a
gate, is zero), and a non-zero gradient on that factor at the first step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn


class ConfigError(ValueError):
    """A tuner or config value that cannot work; the message says what is allowed."""


@dataclass(frozen=True)
class OpShape:
    """The dims of the frozen operation a tuner sits beside.

    ``in_dim`` is d (features of x), ``out_dim`` is d_out (features of OP's output), ``context_dim`` is d_c
    (features of c; equal to ``in_dim`` for self-attention and the feed-forward). ``inner_dim`` and ``heads``
    describe the frozen attention's q/k/v (0 for a feed-forward).
    """

    in_dim: int
    out_dim: int
    context_dim: int
    inner_dim: int = 0
    heads: int = 0
    #: whether the frozen linear has a bias (linear tuners only; GLoRA's ``b0 ⊙ D`` needs one)
    has_bias: bool = True

    @property
    def is_attention(self) -> bool:
        return self.heads > 0

    def as_dict(self) -> dict[str, int | bool]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class FrozenAttention:
    """Frozen pieces of an attention that a branch may reuse (never trained, never copied).

    ``query`` is the frozen ``to_q(x)`` when the frozen attention already computed it for this very input
    (so a branch does not compute it twice); otherwise None and the branch calls ``to_q`` itself.
    """

    to_q: Callable[[torch.Tensor], torch.Tensor]
    to_k: Callable[[torch.Tensor], torch.Tensor]
    to_v: Callable[[torch.Tensor], torch.Tensor]
    #: the frozen output projection's weight W_o; None for an attention without one (W_o = I)
    out_weight: torch.Tensor | None
    heads: int
    query: torch.Tensor | None = None
    #: the frozen attention's mask over its keys, shaped for a branch attending over the same keys with any number
    #: of heads: (B, 1, N_q or 1, N_k), additive (float) or boolean (True: attend); None: every key counts
    key_mask: torch.Tensor | None = None

    def frozen_query(self, x: torch.Tensor) -> torch.Tensor:
        return self.query if self.query is not None else self.to_q(x)

    def project_out(self, attended: torch.Tensor) -> torch.Tensor:
        """``W_o a`` (no bias): the frozen output projection, or ``a`` itself where the attention has none."""
        return attended if self.out_weight is None else F.linear(attended, self.out_weight)


#: Up to this many keys, :func:`multi_head_attention` computes the attention with two batched matmuls and a
#: softmax over the keys (see :func:`_few_keys_attention`) instead of ``scaled_dot_product_attention``, whose CPU
#: kernel spends its time on per-row overhead when the rows are this short (4-6x slower at 8 keys).
FEW_KEYS = 16


#: The fused flash / memory-efficient SDPA kernels take head dims that are multiples of this (16-bit inputs).
FUSED_ATTENTION_HEAD_DIM_MULTIPLE = 8
#: ``head_padding`` values of :func:`multi_head_attention` (and ``ResAttn.head_padding``).
HEAD_PADDINGS = ("auto", "off", "on")


def pads_head_dim(head_dim: int, device_type: str, head_padding: str = "auto") -> bool:
    """Whether :func:`multi_head_attention` zero-pads the heads to a multiple of
    :data:`FUSED_ATTENTION_HEAD_DIM_MULTIPLE`: never when the head dim already is one; ``"auto"`` where the fast
    paths are wanted (CUDA, where a head dim of 4 falls off the fused kernels onto one that materialises the
    N x N scores; see :mod:`~resattn_diffusion.tuners.fast_paths`); ``"on"``/``"off"`` force it."""
    if head_padding not in HEAD_PADDINGS:
        raise ConfigError(f"head_padding={head_padding!r} is not allowed; choose one of {list(HEAD_PADDINGS)}")
    if head_dim % FUSED_ATTENTION_HEAD_DIM_MULTIPLE == 0:
        return False
    if head_padding == "auto":
        from .fast_paths import fast_path_wanted  # fast_paths imports this module

        return fast_path_wanted(device_type)
    return head_padding == "on"


def multi_head_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, head_padding: str = "auto"
) -> torch.Tensor:
    """``MHA_h``: scaled dot-product attention over ``heads`` heads, softmax scale ``1/sqrt(head_dim)``.

    q (B, N, h*dh), k and v (B or 1, M, h*dh) -> (B, N, h*dv). Keys/values with batch 1 (learned prefixes) are
    broadcast without copying. With head padding (:func:`pads_head_dim`) q, k and v are zero-padded per head to
    a multiple of 8 channels and the softmax scale stays ``1/sqrt(dh)``: zero channels add nothing to ``q . k``,
    and the padded output channels (zero) are dropped -- the same attention, run by a fused kernel.
    """
    if k.shape[1] <= FEW_KEYS:
        return _few_keys_attention(q, k, v, heads)
    batch, n_q, width = q.shape
    head_dim = width // heads
    value_dim = v.shape[-1] // heads
    q = q.view(batch, n_q, heads, head_dim)
    k = k.view(k.shape[0], k.shape[1], heads, head_dim)
    v = v.view(v.shape[0], v.shape[1], heads, value_dim)
    scale = None
    if pads_head_dim(head_dim, q.device.type, head_padding) or (
        value_dim != head_dim and pads_head_dim(value_dim, q.device.type, head_padding)
    ):
        multiple = FUSED_ATTENTION_HEAD_DIM_MULTIPLE
        padded = -(-max(head_dim, value_dim) // multiple) * multiple
        q = F.pad(q, (0, padded - head_dim))
        k = F.pad(k, (0, padded - head_dim))
        v = F.pad(v, (0, padded - value_dim))
        scale = head_dim**-0.5
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if k.shape[0] != batch:
        k = k.expand(batch, -1, -1, -1)
        v = v.expand(batch, -1, -1, -1)
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    if out.shape[-1] != value_dim:
        out = out[..., :value_dim]
    return out.transpose(1, 2).reshape(batch, n_q, -1)


def packed_multi_head_attention(
    packed: torch.Tensor,
    heads: int,
    kv: torch.Tensor | None = None,
    head_padding: str = "auto",
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`multi_head_attention` of projections packed along channels, as one GEMM leaves them: ``packed``
    (B, N, 3 h dh) holds ``q | k | v`` when ``kv`` is None (self-attention), else ``packed`` is q (B, N, h dh)
    and ``kv`` (B or 1, M, 2 h dh) holds ``k | v``. Same heads, same scale, same result (heads of equal width).
    ``attn_mask`` (:attr:`FrozenAttention.key_mask`: broadcast to (B, h, N, M), additive or boolean) masks keys.

    Fewer ops per call than splitting first (a branch runs once per attention, and on a GPU every op is host
    time): the heads are viewed out of the packed tensor (``view``, ``permute``, ``unbind``: no copies, the same
    strides as split views) and, with head padding, the whole packed tensor is padded by one ``F.pad`` instead of
    one per q, k and v.
    """
    batch, n_q, width = packed.shape
    if kv is None:
        width //= 3
    # few keys (tiny feature maps): the bmm path, which takes no mask
    if attn_mask is None and (packed if kv is None else kv).shape[1] <= FEW_KEYS:
        q, k, v = packed.split(width, dim=-1) if kv is None else (packed, *kv.split(width, dim=-1))
        return _few_keys_attention(q, k, v, heads)
    head_dim = width // heads
    padded = head_dim
    if pads_head_dim(head_dim, packed.device.type, head_padding):
        padded = -(-head_dim // FUSED_ATTENTION_HEAD_DIM_MULTIPLE) * FUSED_ATTENTION_HEAD_DIM_MULTIPLE
    if kv is None:
        q, k, v = _packed_heads(packed, 3, heads, head_dim, padded)
    else:
        (q,) = _packed_heads(packed, 1, heads, head_dim, padded)
        k, v = _packed_heads(kv, 2, heads, head_dim, padded)
        if k.shape[0] != batch:
            k = k.expand(batch, -1, -1, -1)
            v = v.expand(batch, -1, -1, -1)
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        attn_mask = attn_mask.to(q.dtype)  # SDPA wants an additive mask in the query's dtype (autocast: half)
    scale = None if padded == head_dim else head_dim**-0.5
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    if padded != head_dim:
        out = out[..., :head_dim]
    return out.transpose(1, 2).reshape(batch, n_q, heads * head_dim)


def _packed_heads(
    packed: torch.Tensor, parts: int, heads: int, head_dim: int, padded: int
) -> tuple[torch.Tensor, ...]:
    """``parts`` tensors (B, h, N, padded) viewed out of ``packed`` (B, N, parts h head_dim), zero-padded per head
    to ``padded`` channels by one pad of the whole tensor when ``padded > head_dim``."""
    batch, tokens, _ = packed.shape
    # (B, N, parts, h, padded), or (B, N, h, padded) for a query alone (then one transpose, no permute and unbind)
    shape = (batch, tokens, parts, heads, padded) if parts > 1 else (batch, tokens, heads, padded)
    if padded == head_dim:
        heads_last = packed.view(shape)
    else:
        heads_last = F.pad(packed.view(batch, tokens, parts * heads, head_dim), (0, padded - head_dim)).view(shape)
    if parts == 1:
        return (heads_last.transpose(1, 2),)
    return heads_last.permute(2, 0, 3, 1, 4).unbind(0)


def _few_keys_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """:func:`multi_head_attention` for a few keys (learned prefixes, prompt tokens), equal up to rounding.

    The scores are laid out keys-first, ``(heads, M, tokens)``, so the softmax over the M keys runs across the long
    token axis (vectorised) instead of over rows of M elements; keys shared by the batch (batch 1) meet all
    ``B N`` queries in one matmul per head. Saved for backward: the ``M x N`` probabilities per head, at most
    ``FEW_KEYS / head_dim`` times the size of the queries.
    """
    batch, n_q, width = q.shape
    n_k = k.shape[1]
    head_dim = width // heads
    value_dim = v.shape[-1] // heads
    scaled_k = k * head_dim**-0.5  # scale the few keys rather than the many queries
    if k.shape[0] == 1:
        # (heads, dh, B N) x (heads, M, dh) -> probabilities (heads, M, B N) -> (heads, dv, B N)
        queries = q.reshape(batch * n_q, heads, head_dim).permute(1, 2, 0)
        keys = scaled_k.reshape(n_k, heads, head_dim).transpose(0, 1)
        values = v.reshape(n_k, heads, value_dim).permute(1, 2, 0)
        out = torch.bmm(values, torch.bmm(keys, queries).softmax(dim=1))
        return out.permute(2, 0, 1).reshape(batch, n_q, heads * value_dim)
    # per sample: (B heads, dh, N), (B heads, M, dh) -> (B heads, M, N) -> (B heads, dv, N)
    queries = q.reshape(batch, n_q, heads, head_dim).permute(0, 2, 3, 1).reshape(batch * heads, head_dim, n_q)
    keys = scaled_k.reshape(batch, n_k, heads, head_dim).transpose(1, 2).reshape(batch * heads, n_k, head_dim)
    values = v.reshape(batch, n_k, heads, value_dim).permute(0, 2, 3, 1).reshape(batch * heads, value_dim, n_k)
    out = torch.bmm(values, torch.bmm(keys, queries).softmax(dim=1))
    return out.reshape(batch, heads, value_dim, n_q).permute(0, 3, 1, 2).reshape(batch, n_q, heads * value_dim)


_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}


def make_activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ConfigError(f"unknown activation {name!r}; allowed: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]()


def check_choice(name: str, value: object, allowed: tuple | list | set) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not allowed; choose one of {sorted(map(str, allowed))}")


def check_positive(name: str, value: int | float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name} must be a positive number, got {value!r}")


def check_dropout(value: float) -> None:
    if not 0.0 <= float(value) < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {value!r}")


def init_down_projection(weight: torch.Tensor) -> None:
    """The trainable factor that is *not* zero: LoRA's kaiming-uniform init, so the product starts at zero
    but its zero factor gets a non-zero gradient on the first step."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


class TunerParams:
    """Base of every tuner's hyperparameter dataclass. Subclasses are dataclasses with defaults for every field
    and override :meth:`validate` (shape-free checks) and :meth:`validate_for` (checks against one layer)."""

    def validate(self) -> None:  # pragma: no cover - trivial default
        return None

    def validate_for(self, shape: OpShape) -> None:
        return None

    def for_layer(self, layer_path: str) -> TunerParams:
        """The hyperparameters for one layer (tuners with per-layer settings, e.g. GLoRA, override this)."""
        return self

    def validate_layers(self, layer_paths: list[str]) -> None:
        """Checks against the paths of all the layers the tuner is put on (e.g. GLoRA: every override pattern
        matches one of them). Raises :class:`ConfigError`."""
        return None

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]


@dataclass
class ExtraHeads:
    """A branch that is itself an attention over the frozen attention's keys, written as extra heads of it.

    With the frozen attention's heads of ``head_dim`` channels (softmax scale ``1/sqrt(head_dim)``), appending these
    rows to the frozen ``to_q``, ``to_k``, ``to_v`` weights and these columns to ``to_out``'s weight computes
    ``OP(x, c) + s T(x, c)`` as one attention of ``heads`` more heads: ``q`` (heads*head_dim, d), ``k`` and ``v``
    (heads*head_dim, d_c), ``out`` (d_out, heads*head_dim), the branch scale ``s`` already in ``out``.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor
    heads: int


class OperationTuner(nn.Module):
    """A branch ``T(x, c)`` beside a frozen attention or feed-forward.

    ``forward(x, context, frozen)``: x (B, N, in_dim), context (B, M, context_dim) or None (self-attention / ff),
    frozen the :class:`FrozenAttention` of the operation (None for a feed-forward). Returns (B, N, out_dim).
    """

    #: Needs the frozen attention's projections (Res-Prefix, Res-Prompt); such a tuner cannot sit on ``ff``.
    needs_frozen_attention: ClassVar[bool] = False

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None, frozen: FrozenAttention | None
    ) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_heads(self, head_dim: int, scale: float, dtype: torch.dtype | None = None) -> ExtraHeads | None:
        """This branch at ``scale`` as :class:`ExtraHeads` (in ``dtype``, default the parameters') of a frozen
        attention with heads of ``head_dim`` channels whose keys it shares, or None when it is not such an attention
        (the default). Differentiable in the tuner's parameters."""
        return None


class LinearTuner(nn.Module):
    """A branch beside one frozen linear ``y = W0 x + b0``: ``y' = y + s * T(x)``, with ``T`` affine in x.

    ``forward(x, weight, bias)`` gets the frozen ``W0`` (d_out x d_in) and ``b0`` (or None), since some tuners
    (GLoRA) are defined relative to them. :meth:`fold` returns ``(dW, db)`` with ``T(x) = dW x + db`` exactly,
    so the integration can fold ``W0 + s dW`` into the weight and restore ``W0`` afterwards.
    """

    #: Whether the tuner may also act on the output (U-Tuning's sequential form). Tuners defined relative to
    #: their own layer's weight (GLoRA) are parallel only.
    supports_sequential: ClassVar[bool] = True
    #: Whether ``T(x) = fold(W0, b0) applied to x`` holds in this call, with ``fold`` differentiable in the
    #: parameters: then the integration may run the frozen layer and the branch as one GEMM with ``W0 + s dW``
    #: (the GPU fast path, :func:`resattn_diffusion.integration.processors.select_linear_path`). A tuner with
    #: dropout on its input is not, while training.
    mergeable: ClassVar[bool] = False
    #: Whether the merged one-GEMM path is the automatic choice on CUDA (set from GPU measurements: a tuner whose
    #: merged path measured slower than its branch there sets False; ``forced_paths("fast")`` still merges it).
    merge_on_cuda: ClassVar[bool] = True
    #: Whether :meth:`fold` reads ``W0``/``b0`` (GLoRA's ``W0 ⊙ A``) or only their dtype: a LoRA export of a tuner
    #: that does not read them needs no base model.
    fold_reads_base: ClassVar[bool] = True

    def forward(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(down, up)`` with ``dW = up @ down`` (r x d_in, d_out x r) when the tuner is a low-rank product, else
        None: a LoRA export then writes them as they are instead of factorising the dense ``dW``."""
        return None

    def fold(
        self, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # pragma: no cover - abstract
        raise NotImplementedError
