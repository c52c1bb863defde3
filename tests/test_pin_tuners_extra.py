"""Pins of Res-Attn's extra heads (``ResAttn.extra_heads``: the branch written as extra heads of the frozen
attention, the GPU sampling fast path), of its dropout, and of the structured matrices' dense fast path.

The extra heads are checked against the branch's formula written out by hand (``tests/reference_math.py``): an
attention of ``heads`` heads of ``head_dim`` channels over ``x e.q^T``, ``c e.k^T``, ``c e.v^T`` with the shared
softmax scale ``1/sqrt(head_dim)``, then ``e.out``, must equal ``s W_up MHA_h(x A_q, c A_k, c A_v)`` -- in float64,
in a low-precision dtype, and under CPU autocast (which must not touch how they are formed). The placement cache
behind them must hand back the same matrices for a key and stay bounded whatever scales a caller passes.
"""

from __future__ import annotations

import pytest
import torch
from reference_math import (
    assert_same_function,
    circulant,
    linear,
    mha,
    randomize,
    res_attn_reference,
    seeded,
    skew_circulant,
    structured_dense,
    toeplitz,
)

from resattn_diffusion.tuners import res_attn
from resattn_diffusion.tuners.base import FEW_KEYS, ConfigError, OpShape
from resattn_diffusion.tuners.fast_paths import forced_paths
from resattn_diffusion.tuners.res_attn import ResAttn, ResAttnParams
from resattn_diffusion.tuners.structured import (
    STRUCTURES,
    circulant_apply,
    ldr_apply,
    skew_circulant_apply,
    toeplitz_apply,
)

# (rank, heads, head_dim): branch heads as wide as the frozen ones (no padding), narrower by a power of two, by a
# factor 5/2 (a query factor sqrt(2.5) that is no power of two), and one head.
SHAPES = [(8, 2, 4), (8, 2, 8), (6, 3, 5), (4, 1, 7)]


def _tuner(rank: int, heads: int, in_dim: int = 6, context_dim: int = 6, out_dim: int = 5, dropout: float = 0.0):
    tuner = ResAttn(OpShape(in_dim, out_dim, context_dim), ResAttnParams(rank=rank, heads=heads, dropout=dropout))
    return tuner.double()


def _through_extra_heads(extra, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """What the frozen attention computes on the appended heads: per head softmax(q k^T / sqrt(head_dim)) v (the
    frozen heads' scale), concatenated, times ``out``."""
    return linear(mha(linear(x, extra.q), linear(c, extra.k), linear(c, extra.v), extra.heads), extra.out)


@pytest.mark.parametrize("rank, heads, head_dim", SHAPES)
@pytest.mark.parametrize("cross", [False, True])
def test_extra_heads_equal_the_branch_in_float64(rank, heads, head_dim, cross):
    """Shapes, zero padding, and the attention they give: ``s T(x, c)`` (outputs and gradients)."""
    context_dim = 3 if cross else 6
    tuner = _tuner(rank, heads, context_dim=context_dim)
    randomize(tuner, 11)
    scale = 0.7
    width = rank // heads
    extra = tuner.extra_heads(head_dim, scale)
    assert extra is not None and extra.heads == heads
    assert extra.q.shape == (heads * head_dim, 6)
    assert extra.k.shape == extra.v.shape == (heads * head_dim, context_dim)
    assert extra.out.shape == (5, heads * head_dim)
    assert all(t.dtype == torch.float64 for t in (extra.q, extra.k, extra.v, extra.out))
    # each head's rows: the branch's rows (the query's times sqrt(head_dim / width)), then zero padding
    for head in range(heads):
        rows = slice(head * head_dim, head * head_dim + width)
        pad = slice(head * head_dim + width, (head + 1) * head_dim)
        branch = slice(head * width, (head + 1) * width)
        factor = (head_dim / width) ** 0.5
        torch.testing.assert_close(extra.q[rows], tuner.q_proj.weight[branch] * factor, rtol=1e-15, atol=0)
        assert torch.equal(extra.k[rows], tuner.kv_proj.weight[branch])
        assert torch.equal(extra.v[rows], tuner.kv_proj.weight[rank:][branch])
        torch.testing.assert_close(extra.out[:, rows], scale * tuner.out_proj.weight[:, branch], rtol=1e-15, atol=0)
        assert not extra.q[pad].any() and not extra.k[pad].any() and not extra.v[pad].any()
        assert not extra.out[:, pad].any()
    x = seeded(2, 7, 6, seed=1)
    c = seeded(2, 4, context_dim, seed=2) if cross else x
    assert_same_function(
        lambda: _through_extra_heads(tuner.extra_heads(head_dim, scale), x, c),
        lambda: scale * res_attn_reference(tuner, x, c, heads),
        list(tuner.parameters()),
    )


@pytest.mark.parametrize("rank, heads, head_dim", SHAPES)
def test_extra_heads_cast_to_the_asked_dtype(rank, heads, head_dim):
    """In the frozen weights' dtype when asked (each entry one float32 product, then rounded), else the branch's."""
    tuner = _tuner(rank, heads).float()
    randomize(tuner, 3)
    wide = tuner.extra_heads(head_dim, 0.3)
    assert all(t.dtype == torch.float32 for t in (wide.q, wide.k, wide.v, wide.out))
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        low = tuner.extra_heads(head_dim, 0.3, dtype)
        for name in ("q", "k", "v", "out"):
            got, expected = getattr(low, name), getattr(wide, name)
            assert got.dtype == dtype, name
            assert torch.equal(got, expected.to(dtype)), name


@pytest.mark.parametrize("rank, heads, head_dim", SHAPES)
def test_extra_heads_under_autocast_are_formed_in_full_precision(rank, heads, head_dim):
    """Autocast (the training / sampling recipe) must not round the weights to bfloat16 before the padding and
    the factors: the extra heads are the same numbers with autocast on or off, and in bfloat16 they run through a
    bfloat16 attention as close to the float64 branch as that precision allows."""
    tuner = _tuner(rank, heads).float()
    randomize(tuner, 5)
    scale = 0.3  # not a power of two: a product rounded to bfloat16 differs
    outside = tuner.extra_heads(head_dim, scale, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = tuner.extra_heads(head_dim, scale, torch.float32)
        inside_bf16 = tuner.extra_heads(head_dim, scale, torch.bfloat16)
        assert torch.is_autocast_enabled("cpu")  # the guard restores autocast on the way out
    for name in ("q", "k", "v", "out"):
        assert getattr(inside, name).dtype == torch.float32
        assert torch.equal(getattr(inside, name), getattr(outside, name)), name
        assert torch.equal(getattr(inside_bf16, name), getattr(outside, name).to(torch.bfloat16)), name
    x = seeded(2, 5, 6, seed=8)
    exact = scale * res_attn_reference(tuner.double(), x, x, heads)
    tuner.float()
    got = _through_extra_heads(inside_bf16, x.bfloat16(), x.bfloat16()).double()
    torch.testing.assert_close(got, exact, rtol=5e-2, atol=5e-2 * exact.abs().max().item())


def test_extra_heads_refuse_a_branch_wider_than_the_heads_and_active_dropout():
    tuner = _tuner(8, 2)  # branch heads of 4 channels
    assert tuner.extra_heads(3, 1.0) is None  # would need negative padding
    assert tuner.extra_heads(4, 1.0) is not None  # as wide: no padding
    assert tuner.extra_heads(5, 1.0) is not None
    dropping = _tuner(8, 2, dropout=0.25).eval()
    assert dropping.extra_heads(8, 1.0) is not None  # eval mode: dropout does nothing
    dropping.train()
    assert dropping.extra_heads(8, 1.0) is None  # a random mask per call cannot be a weight
    plain = _tuner(8, 2, dropout=0.0).train()
    assert plain.extra_heads(8, 1.0) is not None


def test_extra_heads_placements_are_reused_and_bounded(monkeypatch):
    """The placement matrices are built once per key (same tensors on the next call, in the weights' dtype) and
    the cache stays bounded when every call brings a new scale (the key holds it): no unbounded memory."""
    monkeypatch.setattr(res_attn, "_PLACEMENTS", {})
    tuner = _tuner(6, 3)
    randomize(tuner, 4)
    tuner.extra_heads(5, 0.5)
    first = dict(res_attn._PLACEMENTS)
    assert len(first) == 3  # the query's, the keys' and values', the output's
    assert all(isinstance(p, torch.Tensor) and p.dtype == torch.float64 for p in first.values())
    tuner.extra_heads(5, 0.5)
    assert res_attn._PLACEMENTS.keys() == first.keys()
    assert all(res_attn._PLACEMENTS[key] is placement for key, placement in first.items())
    tuner.float()
    tuner.extra_heads(5, 0.5)  # another dtype: other entries, the float64 ones untouched
    assert len(res_attn._PLACEMENTS) == 6
    assert {p.dtype for p in res_attn._PLACEMENTS.values()} == {torch.float32, torch.float64}
    tuner.double()
    x = seeded(1, 4, 6, seed=6)
    sizes = []
    for step in range(2 * res_attn._MAX_PLACEMENTS):
        scale = 0.5 + step / 1000
        extra = tuner.extra_heads(5, scale)
        sizes.append(len(res_attn._PLACEMENTS))
    assert max(sizes) <= res_attn._MAX_PLACEMENTS
    assert min(sizes[-res_attn._MAX_PLACEMENTS :]) < res_attn._MAX_PLACEMENTS  # it was emptied, and refilled
    torch.testing.assert_close(_through_extra_heads(extra, x, x), scale * res_attn_reference(tuner, x, x, 3))


def test_extra_heads_first_formed_under_inference_mode_still_train(monkeypatch):
    """A sampling call (inference mode) that builds the placements first must not leave inference tensors in the
    cache: a later training call differentiates through them."""
    monkeypatch.setattr(res_attn, "_PLACEMENTS", {})
    tuner = _tuner(8, 2)
    randomize(tuner, 9)
    with torch.inference_mode():
        tuner.extra_heads(8, 0.5)
    extra = tuner.extra_heads(8, 0.5)
    x = seeded(1, 3, 6, seed=1)
    _through_extra_heads(extra, x, x).sum().backward()
    assert tuner.out_proj.weight.grad is not None and tuner.out_proj.weight.grad.any()


@pytest.mark.parametrize("cross", [False, True])
def test_res_attn_dropout_acts_only_in_training(cross):
    """Dropout on the attended values: in training each entry is dropped or scaled by 1/(1-p); in eval, and with
    p = 0 in training, the branch is exactly its formula."""
    tuner = _tuner(6, 2, out_dim=6, dropout=0.5)
    randomize(tuner, 1)
    with torch.no_grad():
        tuner.out_proj.weight.copy_(torch.eye(6, dtype=torch.float64))  # the output is the attended values
    x = seeded(2, 9, 6, seed=3)
    c = seeded(2, 4, 6, seed=4) if cross else None
    expected = res_attn_reference(tuner, x, x if c is None else c, 2)
    torch.testing.assert_close(tuner.eval()(x, c), expected)
    torch.manual_seed(0)
    dropped = tuner.train()(x, c)
    kept = dropped != 0
    assert 0 < kept.sum() < kept.numel()
    torch.testing.assert_close(dropped[kept], 2 * expected[kept])
    plain = _tuner(6, 2, out_dim=6, dropout=0.0)
    plain.load_state_dict(tuner.state_dict())
    assert torch.equal(plain.train()(x, c), tuner.eval()(x, c))


@pytest.mark.parametrize("family", sorted(STRUCTURES))
def test_structured_dense_fast_path_multiplies_in_the_input_dtype(family):
    """``forced_paths("fast")`` runs the GPU's dense path on CPU: one matmul by M in the activations' dtype --
    float64 exact against the hand-built matrix (outputs and gradients), bfloat16 in and out, equal to the
    bfloat16 product of the rounded operands; off the fast path the dense matmul runs in float32."""
    kwargs = {"displacement_rank": 2} if family == "ldr" else {}
    matrix = STRUCTURES[family](12, 8, init="random", **kwargs).double()
    randomize(matrix, 7)
    x = seeded(3, 5, 8, seed=2)
    with forced_paths("fast"):
        assert matrix.uses_dense_path(x)
        assert_same_function(
            lambda: matrix(x), lambda: linear(x, structured_dense(matrix, 12, 8)), list(matrix.parameters())
        )
        with torch.no_grad():
            m = matrix.dense_matrix()
            low = matrix(x.bfloat16())
        assert low.dtype == torch.bfloat16 and low.shape == (3, 5, 12)
        assert torch.equal(low, torch.nn.functional.linear(x.bfloat16(), m.bfloat16()))
    matrix.path = "dense"  # unforced on CPU: the dense matmul, widened to float32 like the FFT paths
    with torch.no_grad():
        widened = matrix(x.bfloat16())
    assert widened.dtype == torch.bfloat16
    assert torch.equal(widened, torch.nn.functional.linear(x.bfloat16().float(), m.float()).bfloat16())


@pytest.mark.parametrize("cross", [False, True])
def test_res_attn_checks_its_head_padding_on_both_paths(cross):
    """The module's ``head_padding`` reaches the attention on the self-attention and the cross-attention path: a
    bad value is refused with the setting's name, whichever path the call takes; the valid ones are exact."""
    tuner = _tuner(8, 2, context_dim=3 if cross else 6)
    randomize(tuner, 2)
    keys = FEW_KEYS + 3  # the SDPA path, where the padding applies (a few keys take a plain bmm)
    x = seeded(2, keys, 6, seed=1)
    c = seeded(2, keys, 3, seed=2) if cross else None
    expected = res_attn_reference(tuner, x, x if c is None else c, 2)
    for padding in ("auto", "on", "off"):
        tuner.head_padding = padding
        torch.testing.assert_close(tuner(x, c), expected)
    tuner.head_padding = "sideways"
    with pytest.raises(ConfigError, match=r"head_padding='sideways' is not allowed"):
        tuner(x, c)


def test_fft_paths_widen_float32_parameters_for_float64_activations():
    """Float32 parameters with float64 activations (a float64 evaluation of a float32 checkpoint): every FFT path
    runs in float64 with the parameters widened exactly, so the product is exact to float64 rounding (a spectrum
    of the parameters taken in float32 would be off by ~1e-7)."""
    n, d_in, d_out = 12, 9, 7
    x = seeded(4, d_in, seed=5)
    v, h = (seeded(n, seed=s).float() for s in (6, 7))
    g2, h2 = seeded(2, n, seed=8).float(), seeded(2, n, seed=9).float()
    t = seeded(d_out + d_in - 1, seed=10).float()
    cases = {
        "circulant": (circulant_apply(v, x, d_out), circulant(v.double())[:d_out, :d_in]),
        "skew": (skew_circulant_apply(h, x, d_out), skew_circulant(h.double())[:d_out, :d_in]),
        "toeplitz": (toeplitz_apply(t, x, d_out), toeplitz(t.double(), d_out, d_in)),
        "ldr": (
            ldr_apply(g2, h2, x, d_out),
            sum(circulant(a.double()) @ skew_circulant(b.double()) for a, b in zip(g2, h2))[:d_out, :d_in],
        ),
    }
    for name, (got, matrix) in cases.items():
        assert got.dtype == torch.float64, name
        torch.testing.assert_close(got, linear(x, matrix), rtol=1e-12, atol=1e-12, msg=name)
