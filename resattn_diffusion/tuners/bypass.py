r"""Res-Tuning-Bypass: a side network beside the UNet decoder that never sends a gradient into the UNet.

The bypass reads the *detached* outputs ``h_0, ..., h_N`` of the decoder's stages (in a Stable Diffusion UNet:
``mid_block`` and each ``up_blocks[i]``; ``h_i`` is (B, c_i, H_i, W_i)) and keeps its own state:

    b_0 = L_0(h_0)
    b_i = L_i(h_i) + V_i(up_i(b_{i-1}))                         i = 1 .. N

and the final ``b_N`` (B, c_N, H_N, W_N) is what the integration adds, times the tuner scale ``s``, to the input
of the UNet's output head (``conv_norm_out``). Because every ``h_i`` is detached, gradients stop at the bypass:
the frozen UNet runs without keeping its activations.

The parts (all trainable; this module is pure torch and knows nothing of diffusers):

* ``L_i`` -- the *lateral* Res-Tuner on the tokens of ``h_i`` (B, H_i W_i, c_i), after a parameter-free layer
  norm over channels (``normalize=True``: the raw UNet features have block-dependent scales of 1-100; the
  attention-side tuners also read normalised inputs). Its type is ``lateral``:

  - ``"adapter"``: ``W_up act(W_down x)``, rank r (Res-Adapter), ``2 r c_i`` parameters;
  - ``"attention"``: ``W_up MHA_h(x A_q, x A_k, x A_v)``, low-rank self-attention over the spatial tokens
    (Res-Attn), ``4 r c_i`` parameters.

* ``up_i`` -- nearest-neighbour resize of ``b_{i-1}`` to ``h_i``'s spatial size (nothing when the UNet's block
  did not upsample, e.g. the last up block), then a 3x3 conv ``c_{i-1} -> c_i`` (bias-free). Where the widths
  are equal the conv is left out (the identity; a full 1280 -> 1280 3x3 conv would add 14.7M parameters on
  SD 1.5) -- except on the last transition, which always has its conv because it carries the zero init.
  ``up_rank=r`` factorises each conv as a 3x3 conv ``c_{i-1} -> r`` followed by a 1x1 conv ``r -> c_i``.

* ``V_i`` -- the *vertical* Res-Tuner, in its parallel form around the identity: ``V_i(z) = z + T_i(z)``, with
  ``T_i`` of type ``vertical`` (``"adapter"``, ``"attention"`` as above, or ``"none"`` for ``V_i(z) = z``). The
  identity keeps the deeper stages connected to the output even through a narrow ``T_i``, and ``V_i(0) = 0``
  whatever ``T_i`` is (every part is bias-free).

Init: an exact no-op with exactly one zero factor per product. Unrolled, the output is a sum of chains

    b_N = L_N(h_N) + V_N(up_N(L_{N-1}(h_{N-1}) + V_{N-1}(up_{N-1}( ... L_0(h_0) ...))))

and every chain passes through exactly one zero-initialised factor: the last projection ``W_up`` of ``L_N``
(the chain of ``h_N``) or the conv of ``up_N`` (all other chains; its last factor when ``up_rank`` is set).
Everything else is random (kaiming-uniform, as LoRA's ``A``) -- also ``up_1 .. up_{N-1}`` and the other
laterals -- because zeroing them too would put two zero factors on one chain: the SPEC's rule. So ``b_N = 0``
at init, since ``V_N(up_N(.)) = V_N(0) = 0``, and on the first step the two zero factors get non-zero gradients,
with ``g = dLoss/db_N``:

* ``dLoss/dW_up(L_N) = sum_tokens g a^T`` with ``a = act(W_down norm(h_N))`` (or the low-rank attention output)
  -- non-zero because ``W_down`` is random;
* ``dLoss/dconv(up_N) = g' * resize(b_{N-1})`` (a correlation) with ``g' = (I + J_{T_N}(0))^T g`` -- non-zero
  because ``b_{N-1}`` is non-zero (random laterals) and ``V_N`` has the identity path.

Every other factor has a zero gradient on the first step, since all of its chains pass through one of those two
zeros; once they have moved (after the first optimizer step) the gradients reach ``W_down`` of ``L_N``, ``T_N``
(whose input ``up_N(b_{N-1})`` is then non-zero) and, through ``up_N``'s now non-zero conv, every earlier stage.
No factor waits behind a second zero, so nothing is stuck at a saddle (two zeros in series would keep each
other's gradient at zero forever).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import ResAdapter, ResAdapterParams
from .base import ConfigError, OpShape, TunerParams, check_choice, check_dropout, check_positive, init_down_projection
from .res_attn import ResAttn, ResAttnParams

LATERAL_TYPES = ("adapter", "attention")
VERTICAL_TYPES = ("adapter", "attention", "none")


@dataclass
class ResBypassParams(TunerParams):
    """Hyperparameters of the bypass.

    Args:
        lateral: type of the lateral tuners ``L_i``: ``"adapter"`` (bottleneck) or ``"attention"`` (low-rank
            self-attention over the spatial tokens; costs O((H W)^2) per stage -- fine on GPUs with SDPA, slow
            on CPU at full resolution).
        vertical: type of ``T_i`` in the vertical tuners ``V_i(z) = z + T_i(z)``: ``"adapter"``, ``"attention"``
            or ``"none"`` (``V_i`` is the identity).
        rank: width r of the lateral and vertical tuners.
        heads: attention heads of the ``"attention"`` type (``rank`` must be divisible by it).
        activation: activation of the ``"adapter"`` type.
        up_rank: None for a full 3x3 conv in each ``up_i``; an int r for a 3x3 conv to r channels followed by a
            1x1 conv to the next width (fewer parameters on wide UNets).
        normalize: parameter-free layer norm of each ``h_i`` over its channels before ``L_i``.
        dropout: dropout inside the lateral and vertical tuners.
    """

    lateral: str = "adapter"
    vertical: str = "adapter"
    rank: int = 16
    heads: int = 2
    activation: str = "gelu"
    up_rank: int | None = None
    normalize: bool = True
    dropout: float = 0.0

    def validate(self) -> None:
        check_choice("lateral", self.lateral, LATERAL_TYPES)
        check_choice("vertical", self.vertical, VERTICAL_TYPES)
        check_positive("rank", self.rank)
        check_positive("heads", self.heads)
        if not isinstance(self.rank, int) or not isinstance(self.heads, int):
            raise ConfigError(
                f"res_bypass: rank and heads must be integers, got rank={self.rank!r}, heads={self.heads!r}"
            )
        if "attention" in (self.lateral, self.vertical) and self.rank % self.heads:
            divisors = [h for h in range(1, self.rank + 1) if self.rank % h == 0]
            raise ConfigError(
                f"res_bypass: rank={self.rank} is not divisible by heads={self.heads} (attention tuners); "
                f"with rank {self.rank} use heads in {divisors}"
            )
        ResAdapterParams(rank=self.rank, activation=self.activation).validate()
        if self.up_rank is not None:
            if isinstance(self.up_rank, bool) or not isinstance(self.up_rank, int) or self.up_rank <= 0:
                raise ConfigError(
                    f"res_bypass: up_rank must be None (full 3x3 conv) or a positive int, got {self.up_rank!r}"
                )
        if not isinstance(self.normalize, bool):
            raise ConfigError(f"res_bypass: normalize must be true or false, got {self.normalize!r}")
        check_dropout(self.dropout)


def _token_tuner(kind: str, width: int, params: ResBypassParams, zero_output: bool) -> nn.Module:
    """A Res-Tuner ``width -> width`` on tokens (B, N, width). Its last projection is zero only if ``zero_output``;
    otherwise both of its factors are random (see the module docstring for why)."""
    shape = OpShape(in_dim=width, out_dim=width, context_dim=width)
    if kind == "adapter":
        tuner = ResAdapter(
            shape, ResAdapterParams(rank=params.rank, activation=params.activation, dropout=params.dropout)
        )
        last = tuner.up.weight
    else:
        tuner = ResAttn(shape, ResAttnParams(rank=params.rank, heads=params.heads, dropout=params.dropout))
        last = tuner.out_proj.weight
    if not zero_output:
        init_down_projection(last)
    return tuner


def _run_on_tokens(tuner: nn.Module, x: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """Apply a token tuner to a feature map (B, C, H, W): tokens (B, H W, C) in, the same layout back out."""
    batch, channels, height, width = x.shape
    tokens = x.flatten(2).transpose(1, 2)
    if normalize:
        tokens = F.layer_norm(tokens, (channels,))
    out = tuner(tokens, None, None)
    return out.transpose(1, 2).reshape(batch, -1, height, width)


class BypassUpsample(nn.Module):
    """``up_i``: nearest-neighbour resize to the next stage's size, then a bias-free 3x3 conv to the next width.

    ``conv`` is None at equal widths (the identity) unless ``zero_init``; with ``rank`` the conv is a 3x3 conv to
    ``rank`` channels then a 1x1 conv to ``out_channels`` (``proj``). With ``zero_init`` the last factor (``conv``
    or ``proj``) starts at zero.
    """

    def __init__(self, in_channels: int, out_channels: int, rank: int | None = None, zero_init: bool = False):
        super().__init__()
        self.conv: nn.Conv2d | None = None
        self.proj: nn.Conv2d | None = None
        if in_channels == out_channels and not zero_init:
            return
        if rank is None:
            self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
            last = self.conv
        else:
            self.conv = nn.Conv2d(in_channels, rank, kernel_size=3, padding=1, bias=False)
            self.proj = nn.Conv2d(rank, out_channels, kernel_size=1, bias=False)
            last = self.proj
        if zero_init:
            nn.init.zeros_(last.weight)

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        if tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=tuple(size), mode="nearest")
        if self.conv is not None:
            x = self.conv(x)
        if self.proj is not None:
            x = self.proj(x)
        return x


class BypassStage(nn.Module):
    """One stage ``b_i = L_i(h_i) + V_i(up_i(b_{i-1}))`` (the first stage has no ``up``/``vertical``)."""

    def __init__(
        self,
        width: int,
        previous_width: int | None,
        params: ResBypassParams,
        is_last: bool,
    ):
        super().__init__()
        self.normalize = params.normalize
        self.lateral = _token_tuner(params.lateral, width, params, zero_output=is_last)
        self.up: BypassUpsample | None = None
        self.vertical: nn.Module | None = None
        if previous_width is not None:
            self.up = BypassUpsample(previous_width, width, params.up_rank, zero_init=is_last)
            if params.vertical != "none":
                self.vertical = _token_tuner(params.vertical, width, params, zero_output=False)

    def forward(self, h: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
        b = _run_on_tokens(self.lateral, h, normalize=self.normalize)
        if self.up is not None:
            if previous is None:
                raise ValueError("this bypass stage needs the previous stage's state b_{i-1}")
            z = self.up(previous, h.shape[-2:])
            if self.vertical is not None:
                z = z + _run_on_tokens(self.vertical, z)
            b = b + z
        return b


class ResBypass(nn.Module):
    r"""Res-Tuning-Bypass: ``b_0 = L_0(h_0)``, ``b_i = L_i(h_i) + V_i(up_i(b_{i-1}))``; returns ``b_N``.

    Args:
        widths: channels ``c_0 .. c_N`` of the features it reads, in order (for SD 1.5: the mid block's 1280, then
            the up blocks' 1280, 1280, 640, 320).
        params: :class:`ResBypassParams`.

    ``forward(features)`` takes the list ``[h_0, ..., h_N]`` ((B, c_i, H_i, W_i), each stage at least as large
    spatially as the one before) and returns ``b_N`` (B, c_N, H_N, W_N), exactly zero at init. See the module
    docstring for the parts, the init and why every factor learns.
    """

    def __init__(self, widths: Sequence[int], params: ResBypassParams):
        super().__init__()
        widths = [int(w) for w in widths]
        if not widths or any(w <= 0 for w in widths):
            raise ConfigError(f"res_bypass needs the positive channel widths of the features it reads, got {widths}")
        params.validate()
        self.widths = widths
        last = len(widths) - 1
        self.stages = nn.ModuleList(
            BypassStage(width, widths[i - 1] if i else None, params, is_last=i == last)
            for i, width in enumerate(widths)
        )

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(features) != len(self.stages):
            raise ValueError(f"res_bypass reads {len(self.stages)} feature maps, got {len(features)}")
        b = None
        for stage, h, width in zip(self.stages, features, self.widths):
            if h.ndim != 4 or h.shape[1] != width:
                raise ValueError(f"res_bypass: expected a feature map (B, {width}, H, W), got shape {tuple(h.shape)}")
            b = stage(h, b)
        return b
