"""Pins of the tuners' math against formulas written out here (SPEC.md), on tiny shapes where a plausible wrong
formula changes the result: several heads, rectangular projections, more and fewer keys than the few-keys
threshold, batch > 1, keys shared by the batch, and non-zero (trained-looking) zero-init factors.

Written to kill the surviving mutants of ``scripts/dev.sh mutate`` (README, "Mutation score"): each test fails on
at least one mutant that the contract tests (no-op at init, save/load, ...) let through.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from resattn_diffusion.tuners.adapter import ResAdapter, ResAdapterParams
from resattn_diffusion.tuners.base import (
    FEW_KEYS,
    ConfigError,
    FrozenAttention,
    OpShape,
    check_choice,
    check_dropout,
    check_positive,
    make_activation,
    multi_head_attention,
    packed_multi_head_attention,
    pads_head_dim,
)
from resattn_diffusion.tuners.fast_paths import fast_path_wanted, forced_path, forced_paths
from resattn_diffusion.tuners.lora import ResLoRA, ResLoRAParams
from resattn_diffusion.tuners.prefix import ResPrefix, ResPrefixParams
from resattn_diffusion.tuners.prompt import ResPrompt, ResPromptParams
from resattn_diffusion.tuners.res_attn import ResAttn, ResAttnParams

TOL = {"atol": 1e-5, "rtol": 1e-5}


def reference_mha(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q_h k_h^T / sqrt(dh)) v_h per head and sample, by plain loops; k/v with batch 1 are shared."""
    batch, n_q, width = q.shape
    dh, dv = width // heads, v.shape[-1] // heads
    out = torch.empty(batch, n_q, heads * dv, dtype=q.dtype)
    for b in range(batch):
        kb, vb = k[0 if k.shape[0] == 1 else b], v[0 if v.shape[0] == 1 else b]
        for h in range(heads):
            qh, kh, vh = q[b, :, h * dh : (h + 1) * dh], kb[:, h * dh : (h + 1) * dh], vb[:, h * dv : (h + 1) * dv]
            scores = qh @ kh.T / math.sqrt(dh)
            weights = torch.exp(scores - scores.max(dim=1, keepdim=True).values)
            out[b, :, h * dv : (h + 1) * dv] = (weights / weights.sum(dim=1, keepdim=True)) @ vh
    return out


def randomize(module: nn.Module) -> nn.Module:
    """Non-zero values in every parameter (the zero-init factors too): a trained tuner."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return module.eval()


# --- multi-head attention: every path against the loops -------------------------------------------------------
@pytest.mark.parametrize("heads", [1, 2, 3])
@pytest.mark.parametrize("n_keys", [5, FEW_KEYS, FEW_KEYS + 1, 23])
@pytest.mark.parametrize("shared_keys", [False, True])
def test_multi_head_attention_equals_the_loops(heads: int, n_keys: int, shared_keys: bool) -> None:
    dh, dv = 4, 3  # value width != key width: a path that confuses them fails
    q = torch.randn(2, 7, heads * dh)
    k = torch.randn(1 if shared_keys else 2, n_keys, heads * dh) * 2
    v = torch.randn(1 if shared_keys else 2, n_keys, heads * dv)
    expected = reference_mha(q, k, v, heads)
    for padding in ("off", "on", "auto"):
        torch.testing.assert_close(multi_head_attention(q, k, v, heads, padding), expected, **TOL)
    with forced_paths("fast"):
        torch.testing.assert_close(multi_head_attention(q, k, v, heads), expected, **TOL)


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("n_keys", [5, FEW_KEYS + 7])
@pytest.mark.parametrize("kv_batch", [None, 1, 3])  # None: self-attention, q | k | v packed in one tensor
def test_packed_multi_head_attention_equals_the_loops(heads: int, n_keys: int, kv_batch: int | None) -> None:
    dh, n_q = 4, n_keys if kv_batch is None else 6
    q = torch.randn(3, n_q, heads * dh)
    k = torch.randn(kv_batch or 3, n_keys, heads * dh) * 2
    v = torch.randn(kv_batch or 3, n_keys, heads * dh)
    expected = reference_mha(q, k, v, heads)
    # keys shared by the batch (kv_batch 1: a learned prefix) meet all 3 samples' queries
    packed, kv = (torch.cat([q, k, v], dim=-1), None) if kv_batch is None else (q, torch.cat([k, v], dim=-1))
    torch.testing.assert_close(packed_multi_head_attention(packed, heads, kv), expected, **TOL)  # "auto"
    for padding in ("off", "on"):
        torch.testing.assert_close(packed_multi_head_attention(packed, heads, kv, padding), expected, **TOL)
    with forced_paths("fast"):
        torch.testing.assert_close(packed_multi_head_attention(packed, heads, kv), expected, **TOL)


def test_multi_head_attention_padding_keeps_the_scale_of_the_true_head_dim() -> None:
    # head dim 4 padded to 8: a scale of 1/sqrt(8) would be a different attention
    q, k, v = torch.randn(2, 5, 8) * 3, torch.randn(2, 30, 8) * 3, torch.randn(2, 30, 8)
    expected = reference_mha(q, k, v, heads=2)
    torch.testing.assert_close(multi_head_attention(q, k, v, 2, "on"), expected, **TOL)
    # head dim 8 (no padding needed) with value width 5 (padded): value padding alone must not rescale
    v5 = torch.randn(2, 30, 10)
    torch.testing.assert_close(multi_head_attention(q, k, v5, 1, "on"), reference_mha(q, k, v5, 1), **TOL)


def test_pads_head_dim_rules() -> None:
    assert not pads_head_dim(8, "cuda", "on") and not pads_head_dim(16, "cpu", "on")
    assert pads_head_dim(4, "cpu", "on") and not pads_head_dim(4, "cuda", "off")
    assert pads_head_dim(4, "cuda", "auto") and not pads_head_dim(4, "cpu", "auto")
    with forced_paths("fast"):
        assert pads_head_dim(4, "cpu", "auto")
    with forced_paths("reference"):
        assert not pads_head_dim(4, "cuda", "auto")
    with pytest.raises(ConfigError, match="head_padding"):
        pads_head_dim(4, "cpu", "yes")


def test_forced_paths_nest_and_restore() -> None:
    assert forced_path() is None and fast_path_wanted("cuda") and not fast_path_wanted("cpu")
    with forced_paths("fast"):
        assert forced_path() == "fast" and fast_path_wanted("cpu")
        with forced_paths("reference"):
            assert forced_path() == "reference" and not fast_path_wanted("cuda")
        assert forced_path() == "fast"
    assert forced_path() is None
    with pytest.raises(ConfigError, match="forced_paths"):
        with forced_paths("gpu"):
            pass
    assert forced_path() is None


# --- the operation tuners --------------------------------------------------------------------------------------
@pytest.mark.parametrize("heads", [1, 2, 4])
@pytest.mark.parametrize("n_context", [6, 20])
def test_res_attn_equals_its_formula_on_cross_and_self_attention(heads: int, n_context: int) -> None:
    rank, d, d_c, d_out = 8, 12, 10, 9
    tuner = randomize(ResAttn(OpShape(d, d_out, d_c, d, 3), ResAttnParams(rank=rank, heads=heads)))
    a_q, a_kv, w_up = tuner.q_proj.weight, tuner.kv_proj.weight, tuner.out_proj.weight
    a_k, a_v = a_kv[:rank], a_kv[rank:]
    x, c = torch.randn(2, 7, d), torch.randn(2, n_context, d_c)
    expected = reference_mha(x @ a_q.T, c @ a_k.T, c @ a_v.T, heads) @ w_up.T
    torch.testing.assert_close(tuner(x, c, None), expected, **TOL)

    square = randomize(ResAttn(OpShape(d, d_out, d, d, 3), ResAttnParams(rank=rank, heads=heads)))
    a_q, a_kv, w_up = square.q_proj.weight, square.kv_proj.weight, square.out_proj.weight
    xs = torch.randn(2, n_context, d)
    expected_self = reference_mha(xs @ a_q.T, xs @ a_kv[:rank].T, xs @ a_kv[rank:].T, heads) @ w_up.T
    torch.testing.assert_close(square(xs, None, None), expected_self, **TOL)  # fused qkv path
    torch.testing.assert_close(square(xs, xs, None), expected_self, **TOL)  # separate projections
    for padding in ("on", "off"):
        square.head_padding = padding
        torch.testing.assert_close(square(xs, None, None), expected_self, **TOL)


def test_res_attn_on_a_cross_attention_without_its_context_is_refused_by_name() -> None:
    tuner = ResAttn(OpShape(12, 9, 10, 12, 3), ResAttnParams(rank=8, heads=2))  # d = 12, d_c = 10
    with pytest.raises(ConfigError, match=r"cross-attention \(context width 10, input width 12\): pass the context"):
        tuner(torch.randn(2, 7, 12), None, None)  # was torch's "mat1 and mat2 shapes cannot be multiplied"


def test_res_attn_params_checks() -> None:
    ResAttnParams(rank=6, heads=3).validate()
    ResAttnParams(rank=4, heads=4).validate()
    with pytest.raises(ConfigError, match=r"rank=6 is not divisible by heads=4.*\[1, 2, 3, 6\]"):
        ResAttnParams(rank=6, heads=4).validate()
    for bad in (ResAttnParams(rank=0), ResAttnParams(heads=0), ResAttnParams(dropout=1.0)):
        with pytest.raises(ConfigError):
            bad.validate()


@pytest.mark.parametrize("activation", ["gelu", "relu", "silu", "tanh", "identity"])
def test_res_adapter_equals_its_formula_for_each_activation(activation: str) -> None:
    act = {"gelu": torch.nn.functional.gelu, "relu": torch.relu, "silu": torch.nn.functional.silu,
           "tanh": torch.tanh, "identity": lambda t: t}[activation]  # fmt: skip
    tuner = randomize(ResAdapter(OpShape(6, 5, 6), ResAdapterParams(rank=3, activation=activation)))
    x = torch.randn(2, 4, 6) * 2
    expected = act(x @ tuner.down.weight.T) @ tuner.up.weight.T
    torch.testing.assert_close(tuner(x, torch.randn(2, 3, 6), None), expected, **TOL)


def test_activation_and_value_checks() -> None:
    with pytest.raises(ConfigError, match="unknown activation 'swish'"):
        make_activation("swish")
    with pytest.raises(ConfigError, match="rank must be a positive number"):
        ResAdapterParams(rank=0).validate()
    with pytest.raises(ConfigError, match="unknown activation"):
        ResAdapterParams(activation="swish").validate()
    for good in (1, 0.5, 3):
        check_positive("x", good)
    for bad in (0, -1, -0.5, True, "2", None):
        with pytest.raises(ConfigError, match="x must be a positive number"):
            check_positive("x", bad)
    for good in (0, 0.0, 0.5, 0.999):
        check_dropout(good)
    for bad in (1.0, -0.01, 1.5):
        with pytest.raises(ConfigError, match="dropout must be in"):
            check_dropout(bad)
    check_choice("mode", "a", ("a", "b"))
    with pytest.raises(ConfigError, match=r"mode='c' is not allowed; choose one of \['a', 'b'\]"):
        check_choice("mode", "c", ("b", "a"))


def _frozen(d: int, d_c: int, inner: int, heads: int, out_weight: bool, query: torch.Tensor | None = None):
    to_q, to_k, to_v = nn.Linear(d, inner), nn.Linear(d_c, inner), nn.Linear(d_c, inner)
    w_o = torch.randn(d, inner) if out_weight else None
    return FrozenAttention(to_q, to_k, to_v, w_o, heads, query), (to_q, to_k, to_v, w_o)


@pytest.mark.parametrize("out_weight", [True, False])
@pytest.mark.parametrize("length", [4, 20])
def test_res_prefix_equals_its_formula(out_weight: bool, length: int) -> None:
    d, inner, heads = 6, 8, 2
    tuner = randomize(ResPrefix(OpShape(d, d, 5, inner, heads), ResPrefixParams(prefix_length=length)))
    frozen, (to_q, _, _, w_o) = _frozen(d, 5, inner, heads, out_weight)
    x = torch.randn(2, 3, d)
    with torch.no_grad():
        attended = reference_mha(to_q(x), tuner.prefix_keys, tuner.prefix_values, heads)
        expected = attended if w_o is None else attended @ w_o.T
        torch.testing.assert_close(tuner(x, None, frozen), expected, **TOL)
        # the frozen query, when the attention already computed it, is used as it is (not recomputed)
        given = torch.randn(2, 3, inner)
        frozen.query = given
        attended = reference_mha(given, tuner.prefix_keys, tuner.prefix_values, heads)
        torch.testing.assert_close(tuner(x, None, frozen), attended if w_o is None else attended @ w_o.T, **TOL)


@pytest.mark.parametrize("out_weight", [True, False])
@pytest.mark.parametrize("length", [4, 20])
def test_res_prompt_equals_its_formula(out_weight: bool, length: int) -> None:
    d, d_c, inner, heads = 6, 5, 8, 4
    tuner = randomize(ResPrompt(OpShape(d, d if out_weight else inner, d_c, inner, heads),
                                ResPromptParams(prompt_length=length)))  # fmt: skip
    frozen, (to_q, to_k, to_v, w_o) = _frozen(d, d_c, inner, heads, out_weight)
    x = torch.randn(2, 3, d)
    with torch.no_grad():
        p = tuner.prompt_tokens
        attended = reference_mha(to_q(x), to_k(p), to_v(p), heads)
        expected = (attended if w_o is None else attended @ w_o.T) * tuner.gate
        torch.testing.assert_close(tuner(x, None, frozen), expected, **TOL)


def test_prefix_and_prompt_refuse_a_feed_forward() -> None:
    ff = OpShape(6, 6, 6)
    with pytest.raises(ConfigError, match="res_prefix needs an attention"):
        ResPrefix(ff, ResPrefixParams())
    with pytest.raises(ConfigError, match="res_prompt needs an attention"):
        ResPrompt(ff, ResPromptParams())
    for bad in (ResPrefixParams(prefix_length=0), ResPrefixParams(dropout=-1), ResPromptParams(prompt_length=0),
                ResPromptParams(dropout=1)):  # fmt: skip
        with pytest.raises(ConfigError):
            bad.validate()
    ResPrefixParams().validate_for(OpShape(6, 6, 6, 8, 2))
    ResPromptParams().validate_for(OpShape(6, 6, 6, 8, 2))


def test_res_lora_forward_fold_and_factors() -> None:
    tuner = randomize(ResLoRA(OpShape(7, 5, 7), ResLoRAParams(rank=3)))
    a, b = tuner.lora_A.weight, tuner.lora_B.weight
    assert a.shape == (3, 7) and b.shape == (5, 3)
    x = torch.randn(2, 4, 7)
    torch.testing.assert_close(tuner(x, torch.randn(5, 7), None), x @ a.T @ b.T, **TOL)
    d_w, d_b = tuner.fold(torch.randn(5, 7), torch.randn(5))
    torch.testing.assert_close(d_w, b @ a, **TOL)
    assert d_b is None
    down, up = tuner.low_rank_factors()
    assert down is a and up is b
    assert tuner.mergeable
    dropped = ResLoRA(OpShape(7, 5, 7), ResLoRAParams(rank=3, dropout=0.5))
    assert not dropped.train().mergeable and dropped.eval().mergeable
    assert ResLoRA(OpShape(7, 5, 7), ResLoRAParams(rank=3)).train().mergeable
    with pytest.raises(ConfigError, match="rank"):
        ResLoRAParams(rank=0).validate()
    with pytest.raises(ConfigError, match="dropout"):
        ResLoRAParams(dropout=1.0).validate()


# --- which attention path runs (the outputs agree, so only the path tells these mutants apart) ----------------
def _spy_sdpa(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, int]]:
    """Record (q, k, v) last dims of every scaled_dot_product_attention call."""
    calls: list[tuple[int, int, int]] = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        calls.append((q.shape[-1], k.shape[-1], v.shape[-1]))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return calls


def test_few_keys_path_up_to_the_threshold_then_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _spy_sdpa(monkeypatch)
    q = torch.randn(1, 3, 32)  # width 32 > FEW_KEYS: a threshold read off the wrong axis takes the other path
    multi_head_attention(q, torch.randn(1, FEW_KEYS, 32), torch.randn(1, FEW_KEYS, 32), 4)
    assert calls == []
    multi_head_attention(q, torch.randn(1, FEW_KEYS + 1, 32), torch.randn(1, FEW_KEYS + 1, 32), 4)
    assert calls == [(8, 8, 8)]


def test_packed_attention_picks_its_path_by_the_number_of_keys_not_queries(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _spy_sdpa(monkeypatch)
    few_queries = torch.randn(1, 3, 8)
    packed_multi_head_attention(few_queries, 2, torch.randn(1, FEW_KEYS + 1, 16))  # 3 queries, 17 keys: SDPA
    assert len(calls) == 1
    packed_multi_head_attention(torch.randn(1, FEW_KEYS + 5, 8), 2, torch.randn(1, FEW_KEYS, 16))  # 16 keys: bmm
    assert len(calls) == 1


@pytest.mark.parametrize(
    ("dh", "dv", "padding", "expected"),
    [
        (4, 4, "on", (8, 8, 8)),  # the query/key heads padded, the values with them
        (4, 4, "off", (4, 4, 4)),
        (8, 5, "on", (8, 8, 8)),  # only the values need it
        (8, 5, "off", (8, 8, 5)),
        (8, 8, "on", (8, 8, 8)),  # nothing to pad
        (4, 12, "on", (16, 16, 16)),  # to the larger of the two, rounded up to 8
    ],
)
def test_head_padding_pads_to_a_multiple_of_8_only_when_asked(monkeypatch, dh, dv, padding, expected) -> None:
    calls = _spy_sdpa(monkeypatch)
    n_q = dv  # as many queries as value channels: slicing the wrong axis would go unnoticed otherwise
    q, k, v = torch.randn(2, n_q, 2 * dh), torch.randn(2, 20, 2 * dh), torch.randn(1, 20, 2 * dv)
    out = multi_head_attention(q, k, v, 2, padding)
    assert calls == [expected]
    torch.testing.assert_close(out, reference_mha(q, k, v, 2), **TOL)


def test_init_down_projection_is_lora_kaiming_uniform() -> None:
    # kaiming_uniform_ with a = sqrt(5): bound = sqrt(6 / ((1 + a^2) fan_in)) = 1 / sqrt(fan_in)
    tuner = ResAdapter(OpShape(256, 4, 256), ResAdapterParams(rank=64))
    bound = 1 / math.sqrt(256)
    weight = tuner.down.weight
    assert weight.abs().max() <= bound and weight.abs().max() > 0.99 * bound
    assert torch.all(tuner.up.weight == 0)


def test_op_shape_as_dict_and_default_head_padding() -> None:
    shape = OpShape(1, 2, 3, 4, 5, False)
    assert shape.as_dict() == {"in_dim": 1, "out_dim": 2, "context_dim": 3, "inner_dim": 4, "heads": 5,
                               "has_bias": False}  # fmt: skip
    assert shape.is_attention and not OpShape(1, 2, 3).is_attention
    assert pads_head_dim(4, "cuda") and not pads_head_dim(4, "cpu")  # the default is "auto"


def test_res_attn_self_attention_uses_the_context_when_given_and_one_qkv_matmul_without(monkeypatch) -> None:
    rank, d = 8, 12
    square = randomize(ResAttn(OpShape(d, 5, d, d, 3), ResAttnParams(rank=rank, heads=2)))
    a_q, a_kv, w_up = square.q_proj.weight, square.kv_proj.weight, square.out_proj.weight
    x, c = torch.randn(2, 6, d), torch.randn(2, 9, d)  # a context of the input's width, but not the input
    expected = reference_mha(x @ a_q.T, c @ a_kv[:rank].T, c @ a_kv[rank:].T, 2) @ w_up.T
    torch.testing.assert_close(square(x, c, None), expected, **TOL)

    linears: list[tuple[int, ...]] = []
    real_linear = torch.nn.functional.linear
    monkeypatch.setattr(
        torch.nn.functional, "linear", lambda t, w, b=None: linears.append(w.shape) or real_linear(t, w, b)
    )
    square(x, None, None)
    assert linears == [(3 * rank, d), (5, rank)]  # q, k, v in one matmul, then the output projection
    linears.clear()
    square(x, c, None)
    assert linears == [(rank, d), (2 * rank, d), (5, rank)]


def test_res_attn_passes_its_head_padding_to_the_attention(monkeypatch) -> None:
    tuner = randomize(ResAttn(OpShape(6, 6, 6, 6, 2), ResAttnParams(rank=8, heads=2)))  # head dim 4
    calls = _spy_sdpa(monkeypatch)
    x = torch.randn(1, FEW_KEYS + 4, 6)
    tuner.head_padding = "on"
    tuner(x, None, None)
    tuner.head_padding = "off"
    tuner(x, None, None)
    assert calls == [(8, 8, 8), (4, 4, 4)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_prefix_and_prompt_follow_the_query_dtype(dtype: torch.dtype) -> None:
    d, inner, heads = 6, 8, 2
    frozen, _ = _frozen(d, d, inner, heads, True)
    frozen.to_q, frozen.to_k, frozen.to_v = (m.to(dtype) for m in (frozen.to_q, frozen.to_k, frozen.to_v))
    frozen.out_weight = frozen.out_weight.to(dtype)
    x = torch.randn(3, 4, d, dtype=dtype)  # batch 3: tokens made with another batch size do not broadcast
    prefix = randomize(ResPrefix(OpShape(d, d, d, inner, heads), ResPrefixParams(prefix_length=3)))
    prompt = randomize(ResPrompt(OpShape(d, d, d, inner, heads), ResPromptParams(prompt_length=3)))
    assert prompt.prompt_tokens.shape == (1, 3, d) and prefix.prefix_keys.shape == (1, 3, inner)
    with torch.no_grad():
        assert prefix(x, None, frozen).dtype == dtype
        assert prompt(x, None, frozen).dtype == dtype


def test_length_and_rank_checks_name_the_value() -> None:
    cases = [
        (ResAttnParams(rank=0), "rank"), (ResAttnParams(heads=0), "heads"), (ResLoRAParams(rank=0), "rank"),
        (ResAdapterParams(rank=0), "rank"), (ResPrefixParams(prefix_length=0), "prefix_length"),
        (ResPromptParams(prompt_length=0), "prompt_length"),
    ]  # fmt: skip
    for params, name in cases:
        with pytest.raises(ConfigError, match=f"^{name} must be a positive number, got 0$"):
            params.validate()


def test_surm_checks_dims_factors_and_hidden_width() -> None:
    from resattn_diffusion.tuners.surm import SURMAdapterParams, SURMCirculantParams, SURMKroneckerParams

    for bad in (OpShape(0, 5, 0), OpShape(5, 0, 5)):
        with pytest.raises(ConfigError, match="SURM needs positive in_dim and out_dim"):
            SURMCirculantParams().validate_for(bad)
    SURMCirculantParams().validate_for(OpShape(1, 1, 1))  # one feature is enough
    for name in ("out_factor", "in_factor"):
        for bad in ("2", 2.0, True, -1):
            with pytest.raises(ConfigError, match=f"^{name} must be a non-negative integer"):
                SURMKroneckerParams(**{name: bad}).validate()
    SURMKroneckerParams(out_factor=0, in_factor=3).validate()
    for bad in ("4", 4.0, True, -1):
        with pytest.raises(ConfigError, match="hidden_dim must be a non-negative integer"):
            SURMAdapterParams(hidden_dim=bad).validate()
    with pytest.raises(ConfigError, match="^structure="):
        SURMAdapterParams(structure="dense").validate()
