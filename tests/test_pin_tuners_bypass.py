"""Pins of the Res-Tuning-Bypass side network (``tuners/bypass.py``) against its recursion written out here:
``b_0 = L_0(norm(h_0))``, ``b_i = L_i(norm(h_i)) + z_i + T_i(z_i)`` with ``z_i = conv(nearest(b_{i-1}))`` -- on
trained-looking (all non-zero) parameters, with rectangular widths, an upsampling and a non-upsampling step, batch
2 -- plus the options that must reach the parts (dropout, normalize, up_rank) and the checks of bad widths.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from resattn_diffusion.tuners.base import ConfigError
from resattn_diffusion.tuners.bypass import BypassUpsample, ResBypass, ResBypassParams

WIDTHS = [12, 12, 8, 6]
SIZES = [(2, 2), (4, 4), (8, 8), (8, 8)]  # the last step does not upsample


def _features(seed: int = 0, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, w, *s, generator=generator, dtype=dtype) for w, s in zip(WIDTHS, SIZES)]


def _trained(module: nn.Module, seed: int = 1) -> nn.Module:
    """Every parameter non-zero (the zero-initialised factors too), in float64."""
    generator = torch.Generator().manual_seed(seed)
    module.double()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return module


def _adapter(tuner: nn.Module, tokens: torch.Tensor, activation) -> torch.Tensor:
    return activation(tokens @ tuner.down.weight.T) @ tuner.up.weight.T


def _on_tokens(fn, x: torch.Tensor, normalize: bool) -> torch.Tensor:
    """fn on the (B, H W, C) tokens of x (B, C, H, W), by hand, back to (B, C, H, W)."""
    batch, channels, height, width = x.shape
    tokens = x.permute(0, 2, 3, 1).reshape(batch, height * width, channels)
    if normalize:
        mean = tokens.mean(-1, keepdim=True)
        var = tokens.var(-1, unbiased=False, keepdim=True)
        tokens = (tokens - mean) / torch.sqrt(var + 1e-5)
    out = fn(tokens)
    return out.reshape(batch, height, width, -1).permute(0, 3, 1, 2)


def _reference(bypass: ResBypass, features: list[torch.Tensor], params: ResBypassParams) -> torch.Tensor:
    """The recursion of the module docstring, with adapter laterals / verticals computed from their weights."""
    activation = {"gelu": F.gelu, "relu": F.relu}[params.activation]
    b = None
    for stage, h in zip(bypass.stages, features):
        lateral = _on_tokens(lambda t, s=stage: _adapter(s.lateral, t, activation), h, params.normalize)
        if b is None:
            b = lateral
            continue
        z = b
        if z.shape[-2:] != h.shape[-2:]:
            # nearest neighbour by an integer factor: every pixel repeated
            factor = h.shape[-1] // z.shape[-1]
            z = z.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
        if stage.up.conv is not None:
            z = F.conv2d(z, stage.up.conv.weight, padding=1)
        if stage.up.proj is not None:
            z = F.conv2d(z, stage.up.proj.weight)
        if stage.vertical is not None:
            z = z + _on_tokens(lambda t, s=stage: _adapter(s.vertical, t, activation), z, False)
        b = lateral + z
    return b


@pytest.mark.parametrize(
    "params",
    [
        ResBypassParams(rank=4),
        ResBypassParams(rank=3, activation="relu", normalize=False, up_rank=2),
        ResBypassParams(rank=4, vertical="none"),
    ],
    ids=["adapter", "relu-unnormalized-up_rank", "no-vertical"],
)
def test_bypass_equals_its_recursion_on_trained_parameters(params: ResBypassParams) -> None:
    bypass = _trained(ResBypass(WIDTHS, params))
    features = _features()
    out = bypass(features)
    assert out.shape == (2, WIDTHS[-1], *SIZES[-1])
    torch.testing.assert_close(out, _reference(bypass, features, params), atol=1e-10, rtol=1e-8)


def test_the_parts_built_for_each_transition() -> None:
    """Equal widths skip the conv except on the last transition; up_rank factorises each conv; the vertical tuner
    is there unless vertical="none"; the first stage has neither."""
    bypass = ResBypass([8, 8, 4, 4], ResBypassParams(rank=2, up_rank=3))
    first, same, narrower, last = bypass.stages
    assert first.up is None and first.vertical is None
    assert same.up.conv is None and same.up.proj is None and same.vertical is not None
    assert tuple(narrower.up.conv.weight.shape) == (3, 8, 3, 3) and tuple(narrower.up.proj.weight.shape) == (
        4,
        3,
        1,
        1,
    )
    assert tuple(last.up.conv.weight.shape) == (3, 4, 3, 3) and torch.count_nonzero(last.up.proj.weight) == 0
    assert torch.count_nonzero(last.up.conv.weight) > 0  # only the last factor starts at zero
    full = ResBypass([8, 4], ResBypassParams(rank=2, vertical="none"))
    assert tuple(full.stages[1].up.conv.weight.shape) == (4, 8, 3, 3) and full.stages[1].up.proj is None
    assert torch.count_nonzero(full.stages[1].up.conv.weight) == 0 and full.stages[1].vertical is None
    # the laterals: only the last one's output projection starts at zero
    assert all(torch.count_nonzero(s.lateral.up.weight) > 0 for s in bypass.stages[:-1])
    assert torch.count_nonzero(bypass.stages[-1].lateral.up.weight) == 0
    assert torch.count_nonzero(bypass.stages[-1].vertical.up.weight) > 0


def test_upsample_resizes_by_nearest_neighbour_and_keeps_the_size_it_is_given() -> None:
    up = BypassUpsample(3, 3)  # equal widths, not the last transition: the identity after the resize
    assert up.conv is None and up.proj is None
    x = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    torch.testing.assert_close(up(x, (4, 4)), x.repeat_interleave(2, -2).repeat_interleave(2, -1), rtol=0, atol=0)
    assert torch.equal(up(x, (2, 2)), x)
    assert up(x, torch.Size([4, 6])).shape == (2, 3, 4, 6)


def test_normalize_makes_the_laterals_blind_to_each_tokens_scale_and_offset() -> None:
    """normalize=True: a per-token affine change of every feature map leaves b_N unchanged (layer norm over
    channels); normalize=False reads the raw features."""
    features = _features()
    changed = [3.0 * h + 2.0 for h in features]
    for normalize, same in ((True, True), (False, False)):
        bypass = _trained(ResBypass(WIDTHS, ResBypassParams(rank=4, normalize=normalize)))
        a, b = bypass(features), bypass(changed)
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-3) is same, normalize  # eps: not exactly


def test_dropout_reaches_the_lateral_and_vertical_tuners() -> None:
    params = ResBypassParams(rank=4, dropout=0.5, lateral="adapter", vertical="attention", heads=2)
    bypass = _trained(ResBypass(WIDTHS, params))
    rates = {m.p for name, m in bypass.named_modules() if isinstance(m, nn.Dropout)}
    assert rates == {0.5}
    features = _features()
    bypass.train()
    torch.manual_seed(0)
    first = bypass(features)
    second = bypass(features)
    assert not torch.allclose(first, second)  # dropout is on in training
    bypass.eval()
    assert torch.equal(bypass(features), bypass(features))


def test_attention_parts_get_the_rank_heads_and_dropout() -> None:
    params = ResBypassParams(rank=4, dropout=0.25, lateral="attention", vertical="attention", heads=4)
    bypass = ResBypass([8, 4], params)
    for tuner in (bypass.stages[0].lateral, bypass.stages[1].lateral, bypass.stages[1].vertical):
        assert tuner.heads == 4 and tuner.rank == 4 and tuner.dropout.p == 0.25


@pytest.mark.parametrize("widths", [[8, 0], [0], [4, -2], []])
def test_non_positive_or_missing_widths_are_refused(widths: list[int]) -> None:
    with pytest.raises(ConfigError, match="positive channel widths"):
        ResBypass(widths, ResBypassParams(rank=2))


def test_wrong_features_are_refused_with_the_expected_shape() -> None:
    bypass = ResBypass([8, 4], ResBypassParams(rank=2))
    with pytest.raises(ValueError, match="reads 2 feature maps, got 1"):
        bypass([torch.randn(1, 8, 2, 2)])
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\)"):
        bypass([torch.randn(1, 8, 2, 2), torch.randn(1, 5, 4, 4)])
    with pytest.raises(ValueError, match=r"\(B, 8, H, W\)"):
        bypass([torch.randn(1, 8, 2), torch.randn(1, 4, 4, 4)])
    with pytest.raises(ValueError, match="previous stage"):
        bypass.stages[1](torch.randn(1, 4, 4, 4))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"rank": 6, "heads": 4, "lateral": "attention"},
            r"rank=6 is not divisible by heads=4.*use heads in \[1, 2, 3, 6\]",
        ),
        ({"rank": 7, "heads": 2, "vertical": "attention"}, r"use heads in \[1, 7\]"),
        ({"rank": 4.0}, "rank and heads must be integers, got rank=4.0, heads=2"),
        ({"heads": 2.0}, "rank and heads must be integers"),
        ({"heads": 0}, "heads must be a positive number, got 0"),
        ({"rank": -1}, "rank must be a positive number, got -1"),
        ({"up_rank": True}, "up_rank must be None .* or a positive int, got True"),
        ({"up_rank": 0}, "up_rank must be None"),
        ({"normalize": 1}, "normalize must be true or false, got 1"),
        ({"activation": "swish2"}, "swish2"),
        ({"dropout": -0.1}, r"dropout must be in \[0, 1\)"),
        ({"lateral": "none"}, "lateral='none' is not allowed"),
        ({"vertical": "conv"}, "vertical='conv' is not allowed"),
    ],
)
def test_bad_parameters_are_refused_by_name(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ResBypassParams(**kwargs).validate()
    # adapters alone do not need rank % heads == 0
    ResBypassParams(rank=6, heads=4).validate()
