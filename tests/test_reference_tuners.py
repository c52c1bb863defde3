"""Every registered tuner's branch against SPEC.md's formula written out by hand (``tests/reference_math.py``).

The modules' parameters are randomised first (their zero init would make any formula pass), everything runs in
float64, and the shapes are the ones where a wrong formula of the right shape shows: several heads, rectangular
projections (768 -> 320, 40 -> 24), key counts below and above the few-key threshold (16), batch > 1, keys distinct
from values. Every path a tuner can take (few keys / SDPA, padded heads, FFT / dense structured matrices, row
blocks) is forced on CPU and compared with the same reference, outputs and gradients of the tuner's parameters.
The processor, the linear banks, GLoRA's W0 and the bypass are in ``test_reference_processor.py``.
"""

from __future__ import annotations

import pytest
import torch
from reference_math import (
    ACTIVATIONS,
    assert_same_function,
    glora_delta,
    glora_supports,
    linear,
    mha,
    randomize,
    res_attn_reference,
    seeded,
    structured_dense,
)
from torch import nn

import resattn_diffusion as rd
from resattn_diffusion.tuners import base as tuner_base
from resattn_diffusion.tuners import structured
from resattn_diffusion.tuners.base import FrozenAttention, OpShape
from resattn_diffusion.tuners.fast_paths import forced_paths

FEW_KEYS = tuner_base.FEW_KEYS  # the threshold the key counts below straddle


def build(name: str, shape: OpShape, seed: int = 0, **hyper) -> nn.Module:
    """The registered tuner ``name`` on ``shape``, float64, every parameter random."""
    spec = rd.get_tuner_spec(name)
    module = spec.module_cls(shape, spec.make_params(**hyper)).double()
    randomize(module, seed)
    return module


def frozen_attention(d: int, d_c: int, inner: int, d_out: int, heads: int, seed: int = 5) -> FrozenAttention:
    """A frozen attention's projections (random, float64), as the processor hands them to a branch."""
    to_q, to_k, to_v = nn.Linear(d, inner, bias=False), nn.Linear(d_c, inner), nn.Linear(d_c, inner)
    for module in (to_q, to_k, to_v):
        module.double().requires_grad_(False)
        randomize(module, seed := seed + 1)
    return FrozenAttention(to_q, to_k, to_v, seeded(d_out, inner, seed=seed + 1, std=0.3), heads)


def test_every_registered_tuner_has_a_reference_here():
    covered = {"res_attn", "res_adapter", "res_prefix", "res_prompt", "res_lora", "glora", "surm_circulant"}
    covered |= {"surm_toeplitz", "surm_kronecker", "surm_ldr", "surm_adapter", "res_bypass"}  # bypass: processor file
    assert set(rd.tuner_names()) == covered, "a new tuner needs its reference equation in tests/reference_math.py"
    assert set(tuner_base._ACTIVATIONS) == set(ACTIVATIONS)
    assert set(structured.STRUCTURES) == {"circulant", "toeplitz", "kronecker", "ldr"}


# --- Res-Attn ------------------------------------------------------------------------------------------------------


RES_ATTN_CASES = [
    # d, d_c, d_out, rank, heads, tokens N, context tokens M (None: self-attention, M = N)
    (40, 24, 40, 12, 3, 9, 7),  # cross, few keys
    (40, 24, 24, 12, 3, 9, 21),  # cross, SDPA, d_out != d
    (32, 32, 32, 8, 2, 5, None),  # self, few keys
    (32, 32, 40, 8, 2, 20, None),  # self, SDPA (the fused qkv matmul), d_out != d
    (40, 24, 32, 8, 4, 17, 17),  # head dim 2, one above the threshold
    (40, 24, 32, 8, 1, 6, 16),  # one head, exactly at the threshold
]


@pytest.mark.parametrize("d, d_c, d_out, rank, heads, n, m", RES_ATTN_CASES)
@pytest.mark.parametrize("head_padding", ["off", "on"])
def test_res_attn_equals_low_rank_multi_head_attention(d, d_c, d_out, rank, heads, n, m, head_padding):
    tuner = build("res_attn", OpShape(in_dim=d, out_dim=d_out, context_dim=d_c), rank=rank, heads=heads)
    tuner.head_padding = head_padding  # "on": the zero-padded heads of the GPU fast path, forced on CPU
    x = seeded(3, n, d, seed=1)
    c = None if m is None else seeded(3, m, d_c, seed=2)
    context = x if c is None else c
    out = assert_same_function(
        lambda: tuner(x, c, None), lambda: res_attn_reference(tuner, x, context, heads), list(tuner.parameters())
    )
    # the test sees what it is meant to: heads, and keys distinct from values, change the result here
    if heads > 1:
        assert not torch.allclose(out, res_attn_reference(tuner, x, context, 1), atol=1e-3)
    assert not torch.allclose(out, res_attn_reference(tuner, x, context, heads, swap_kv=True), atol=1e-3)
    assert out.shape == (3, n, d_out)


def test_res_attn_heads_one_differs_from_heads_h():
    """A module built with heads=1 computes a different function than heads=4 with the same weights."""
    shape = OpShape(in_dim=40, out_dim=24, context_dim=24)
    four, one = build("res_attn", shape, rank=8, heads=4), build("res_attn", shape, rank=8, heads=1)
    one.load_state_dict(four.state_dict())
    x, c = seeded(2, 20, 40, seed=3), seeded(2, 19, 24, seed=4)
    assert not torch.allclose(four(x, c, None), one(x, c, None), atol=1e-3)
    torch.testing.assert_close(one(x, c, None), res_attn_reference(one, x, c, 1))


def test_res_attn_fast_paths_forced_equal_reference():
    """``forced_paths("fast")`` (padded heads on the SDPA path) and ``"reference"`` both equal the formula."""
    tuner = build("res_attn", OpShape(in_dim=24, out_dim=40, context_dim=40), rank=12, heads=2)
    x, c = seeded(2, 30, 24, seed=5), seeded(2, 25, 40, seed=6)
    for path in ("fast", "reference"):
        with forced_paths(path):
            assert_same_function(
                lambda: tuner(x, c, None), lambda: res_attn_reference(tuner, x, c, 2), list(tuner.parameters())
            )


# --- Res-Adapter ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("d, d_out, rank", [(40, 24, 6), (24, 40, 5)])
def test_res_adapter_equals_up_act_down(activation, d, d_out, rank):
    tuner = build("res_adapter", OpShape(in_dim=d, out_dim=d_out, context_dim=d), rank=rank, activation=activation)
    x = seeded(3, 7, d, seed=1)
    act = ACTIVATIONS[activation]
    assert_same_function(
        lambda: tuner(x, seeded(3, 5, d, seed=9), None),  # the context is ignored
        lambda: linear(act(linear(x, tuner.down.weight)), tuner.up.weight),
        list(tuner.parameters()),
    )


# --- Res-Prefix and Res-Prompt -----------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [5, FEW_KEYS, FEW_KEYS + 4])
@pytest.mark.parametrize("heads", [1, 4])
def test_res_prefix_equals_frozen_query_attending_learned_keys(length, heads):
    d, inner, d_out = 40, 24, 32
    frozen = frozen_attention(d, 48, inner, d_out, heads)
    shape = OpShape(in_dim=d, out_dim=d_out, context_dim=48, inner_dim=inner, heads=heads)
    tuner = build("res_prefix", shape, prefix_length=length)
    x = seeded(3, 11, d, seed=1)

    def reference(prefix_keys=tuner.prefix_keys, prefix_values=tuner.prefix_values, heads=heads):
        q = linear(x, frozen.to_q.weight)
        return linear(mha(q, prefix_keys, prefix_values, heads), frozen.out_weight)

    out = assert_same_function(lambda: tuner(x, None, frozen), reference, list(tuner.parameters()))
    assert not torch.allclose(out, reference(tuner.prefix_values, tuner.prefix_keys), atol=1e-3)
    if heads > 1:
        assert not torch.allclose(out, reference(heads=1), atol=1e-3)
    # a frozen query handed over by the processor is used as is
    given = FrozenAttention(frozen.to_q, frozen.to_k, frozen.to_v, frozen.out_weight, heads, frozen.to_q(x))
    torch.testing.assert_close(tuner(x, None, given), out)


@pytest.mark.parametrize("length", [3, FEW_KEYS + 1])
@pytest.mark.parametrize("heads", [1, 3])
def test_res_prompt_equals_gated_attention_over_projected_prompts(length, heads):
    d, d_c, inner, d_out = 40, 24, 30, 40
    frozen = frozen_attention(d, d_c, inner, d_out, heads)
    shape = OpShape(in_dim=d, out_dim=d_out, context_dim=d_c, inner_dim=inner, heads=heads)
    tuner = build("res_prompt", shape, prompt_length=length)
    x = seeded(2, 13, d, seed=1)

    def reference(swap=False, heads=heads):
        q = linear(x, frozen.to_q.weight)
        k = linear(tuner.prompt_tokens, frozen.to_k.weight, frozen.to_k.bias)
        v = linear(tuner.prompt_tokens, frozen.to_v.weight, frozen.to_v.bias)
        if swap:
            k, v = v, k
        return tuner.gate * linear(mha(q, k, v, heads), frozen.out_weight)

    out = assert_same_function(lambda: tuner(x, None, frozen), reference, list(tuner.parameters()))
    assert not torch.allclose(out, reference(swap=True), atol=1e-3)
    if heads > 1:
        assert not torch.allclose(out, reference(heads=1), atol=1e-3)


# --- Res-LoRA ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d_in, d_out, rank", [(40, 24, 3), (24, 40, 4), (768, 320, 4)])
def test_res_lora_equals_b_a_x(d_in, d_out, rank):
    tuner = build("res_lora", OpShape(in_dim=d_in, out_dim=d_out, context_dim=d_in), rank=rank)
    w0, b0 = seeded(d_out, d_in, seed=3), seeded(d_out, seed=4)
    x = seeded(2, 5, d_in, seed=1)
    reference = lambda: linear(linear(x, tuner.lora_A.weight), tuner.lora_B.weight)  # noqa: E731
    assert_same_function(lambda: tuner(x, w0, b0), reference, list(tuner.parameters()))
    delta_w, delta_b = tuner.fold(w0, b0)
    torch.testing.assert_close(delta_w, tuner.lora_B.weight @ tuner.lora_A.weight)
    assert delta_b is None


# --- GLoRA -----------------------------------------------------------------------------------------------------------

GLORA_CONFIGS = [
    "A=lora3,B=lora2,C=lora2,D=vector,E=vector",
    "A=vector,B=vector,C=vector,D=scalar,E=scalar",
    "A=scalar,B=scalar,C=none,D=none,E=none",
    "A=none,B=lora3,C=vector,D=vector,E=none",
    "A=lora2,B=none,C=none,D=none,E=scalar",
    "A=vector,B=lora2,C=lora3,D=none,E=vector",
    "A=none,B=scalar,C=none,D=scalar,E=none",
]


def _forms(text: str) -> dict[str, str]:
    return dict(item.split("=") for item in text.split(","))


@pytest.mark.parametrize("config", GLORA_CONFIGS)
@pytest.mark.parametrize("d_in, d_out, has_bias", [(40, 24, True), (24, 40, False)])
def test_glora_equals_reparameterised_linear_minus_frozen(config, d_in, d_out, has_bias):
    shape = OpShape(in_dim=d_in, out_dim=d_out, context_dim=d_in, has_bias=has_bias)
    tuner = build("glora", shape, config=config)
    forms = _forms(config)
    if not has_bias:
        forms["D"] = "none"  # b0 ⊙ D = 0 without a bias: the module drops D
    w0, b0 = seeded(d_out, d_in, seed=3), seeded(d_out, seed=4) if has_bias else None
    x = seeded(2, 6, d_in, seed=1)

    def reference():
        delta_w, delta_b = glora_delta(glora_supports(tuner, forms, d_out, d_in), w0, b0)
        return linear(x, delta_w, delta_b)

    out = assert_same_function(lambda: tuner(x, w0, b0), reference, list(tuner.parameters()))
    assert out.abs().max() > 1e-3
    delta_w, delta_b = tuner.fold(w0, b0)
    expected_w, expected_b = glora_delta(glora_supports(tuner, forms, d_out, d_in), w0, b0)
    torch.testing.assert_close(delta_w, expected_w)
    torch.testing.assert_close(torch.zeros(d_out, dtype=torch.float64) if delta_b is None else delta_b, expected_b)
    # W0 matters (it is read, not assumed): another base gives another branch unless only B and E are active
    if any(forms[s] != "none" for s in "ACD"):
        assert not torch.allclose(tuner(x, 2 * w0, None if b0 is None else 2 * b0), out)


def test_glora_supernet_uses_the_first_r_components():
    shape = OpShape(in_dim=24, out_dim=20, context_dim=24)
    tuner = build("glora", shape, supernet=True, rank=4)
    w0, b0, x = seeded(20, 24, seed=3), seeded(20, seed=4), seeded(2, 5, 24, seed=1)
    for config in ("A=lora2,B=lora4,C=lora2,D=scalar,E=vector", "A=vector,B=lora2,C=vector,D=vector,E=none"):
        tuner.set_active(config)
        forms = _forms(config)
        assert_same_function(
            lambda: tuner(x, w0, b0),
            lambda: linear(x, *glora_delta(glora_supports(tuner, forms, 20, 24), w0, b0)),  # noqa: B023
            list(tuner.parameters()),
        )


# --- SURM linear tuners ----------------------------------------------------------------------------------------------

SURM_LINEAR = {
    "surm_circulant": {},
    "surm_toeplitz": {},
    "surm_kronecker": {},
    "surm_ldr": {"displacement_rank": 3},
}


@pytest.mark.parametrize("name", sorted(SURM_LINEAR))
@pytest.mark.parametrize("d_in, d_out", [(40, 24), (24, 40), (36, 36), (768, 320)])
@pytest.mark.parametrize("path", ["structured", "dense"])
def test_surm_linear_equals_dense_structured_matrix(name, d_in, d_out, path):
    tuner = build(name, OpShape(in_dim=d_in, out_dim=d_out, context_dim=d_in), **SURM_LINEAR[name])
    tuner.delta.path = path  # the FFT / factor path, or the dense matmul (the CPU cost model's other choice)
    w0 = seeded(d_out, d_in, seed=3)
    x = seeded(2, 3, d_in, seed=1)
    reference = lambda: linear(x, structured_dense(tuner.delta, d_out, d_in))  # noqa: E731
    assert_same_function(lambda: tuner(x, w0, None), reference, list(tuner.parameters()))
    delta_w, delta_b = tuner.fold(w0, None)
    torch.testing.assert_close(delta_w, structured_dense(tuner.delta, d_out, d_in))
    assert delta_b is None


@pytest.mark.parametrize("family", sorted(structured.STRUCTURES))
def test_structured_fast_dense_matrix_and_row_blocks_equal_reference(family):
    """The FFT-materialised matrix of the GPU fast path (``forced_paths("fast")``), and the CPU FFT path over row
    blocks (more rows than one block), against the hand-built matrix: outputs and gradients."""
    kwargs = {"displacement_rank": 2} if family == "ldr" else {}
    matrix = structured.STRUCTURES[family](20, 12, init="random", **kwargs).double()
    randomize(matrix, 2)
    parameters = list(matrix.parameters())
    with forced_paths("fast"):
        assert_same_function(lambda: matrix.dense_matrix(), lambda: structured_dense(matrix, 20, 12), parameters)
        assert matrix.uses_dense_path(torch.zeros(1, 12))
    rows = structured.CPU_ROW_BLOCK_ELEMENTS // 20 + 7  # more than one block of every family's widest row
    x = seeded(rows, 12, seed=4)
    matrix.path = "structured"
    assert_same_function(lambda: matrix(x), lambda: linear(x, structured_dense(matrix, 20, 12)), parameters)


# --- SURM-Adapter ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(structured.STRUCTURES))
@pytest.mark.parametrize("d, d_out, hidden", [(40, 24, 0), (24, 40, 30)])
@pytest.mark.parametrize("path", ["structured", "dense"])
def test_surm_adapter_equals_up_act_down(family, d, d_out, hidden, path):
    hyper = {"structure": family, "hidden_dim": hidden, "activation": "silu"}
    if family == "ldr":
        hyper["displacement_rank"] = 2
    tuner = build("surm_adapter", OpShape(in_dim=d, out_dim=d_out, context_dim=d), **hyper)
    width = hidden or d
    tuner.down.path = tuner.up.path = path
    x = seeded(3, 5, d, seed=1)

    def reference():
        hidden_states = ACTIVATIONS["silu"](linear(x, structured_dense(tuner.down, width, d)))
        return linear(hidden_states, structured_dense(tuner.up, d_out, width))

    assert_same_function(lambda: tuner(x, None, None), reference, list(tuner.parameters()))
