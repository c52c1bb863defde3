"""Pins of GLoRA's fused forward and fold (issue 14: fewer dispatched ops per training step, same math).

``W0 ⊙ A + B_up B_down`` is one ``addmm``, the bias terms ``E + W0 C`` and ``+ b0 ⊙ D`` one ``addmv`` and one
``addcmul``, and whole lora factors are used without a slice. Every form combination is checked against the
definition (``reference_math.glora_delta``) in float64 -- outputs, the fold, and the gradients with respect to every
parameter, the input, W0 and b0 -- and the op counts of the default forms are pinned, so a wrong formula and a
lost fusion both fail here.
"""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch
from reference_math import assert_same_function, glora_delta, glora_supports, linear, randomize, seeded
from torch.utils._python_dispatch import TorchDispatchMode

from resattn_diffusion.tuners.base import OpShape
from resattn_diffusion.tuners.glora import GLoRA, GLoRAParams

FORMS = {
    "A": ("lora2", "vector", "scalar", "none"),
    "B": ("lora3", "vector", "scalar", "none"),
    "C": ("lora2", "vector", "none"),
    "D": ("vector", "scalar", "none"),
    "E": ("vector", "scalar", "none"),
}
DEFAULT_FORMS = "A=lora4,B=lora4,C=vector,D=scalar,E=vector"


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _module(config: str, d_in: int, d_out: int, has_bias: bool, seed: int = 0, **params) -> GLoRA:
    module = GLoRA(OpShape(d_in, d_out, d_in, has_bias=has_bias), GLoRAParams(config=config, **params)).double()
    randomize(module, seed)
    return module


def _forms(module: GLoRA) -> dict[str, str]:
    return {support: getattr(module.active_config, support) for support in FORMS}


def _check_against_definition(module: GLoRA, d_in: int, d_out: int, has_bias: bool, seed: int) -> None:
    w0 = seeded(d_out, d_in, seed=seed).requires_grad_()
    b0 = seeded(d_out, seed=seed + 1).requires_grad_() if has_bias else None
    x = seeded(2, 3, d_in, seed=seed + 2).requires_grad_()
    forms = _forms(module)
    inputs = [x, w0] + ([b0] if has_bias else [])

    def definition() -> torch.Tensor:
        delta_w, delta_b = glora_delta(glora_supports(module, forms, d_out, d_in), w0, b0)
        return linear(x, delta_w, delta_b)

    assert_same_function(lambda: module(x, w0, b0), definition, list(module.parameters()) + inputs)
    delta_w, delta_b = module.fold(w0, b0)
    expected_w, expected_b = glora_delta(glora_supports(module, forms, d_out, d_in), w0, b0)
    torch.testing.assert_close(delta_w, expected_w, rtol=1e-10, atol=1e-10)
    if delta_b is None:
        assert not expected_b.any(), f"{module.active_config}: fold dropped a bias term"
    else:
        assert delta_b.shape == (d_out,)
        torch.testing.assert_close(delta_b, expected_b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("has_bias", [True, False])
def test_every_form_combination_equals_the_definition_with_all_gradients(has_bias: bool) -> None:
    """All 432 combinations of forms (D dropped without a bias), d_in != d_out: forward, fold, and the gradients
    of every parameter, x, W0 and b0 agree with ``W0 ⊙ A + B`` / ``b0 ⊙ D + E + W0 C`` within 1e-10."""
    d_in, d_out = 7, 5
    combinations = list(itertools.product(*FORMS.values()))
    for index, forms in enumerate(combinations):
        config = ",".join(f"{support}={form}" for support, form in zip(FORMS, forms))
        module = _module(config, d_in, d_out, has_bias, seed=index)
        if not list(module.parameters()):  # every term absent (D dropped without a bias): T = 0
            x, w0 = seeded(3, d_in, seed=index), seeded(d_out, d_in, seed=index)
            assert torch.equal(module(x, w0, None), torch.zeros(3, d_out, dtype=torch.float64))
            continue
        _check_against_definition(module, d_in, d_out, has_bias, seed=index)


def test_a_supernet_below_its_largest_rank_slices_and_at_it_does_not() -> None:
    """Sub-rank lora uses the leading components (a slice), r_max the whole factors (no slice op): both equal the
    definition, and the factors beyond r get no gradient."""
    module = _module("", 9, 6, True, seed=3, supernet=True, rank=4)
    module.set_active("A=lora2,B=lora4,C=lora2,D=vector,E=scalar")
    _check_against_definition(module, 9, 6, True, seed=11)
    x, w0, b0 = seeded(4, 9, seed=1), seeded(6, 9, seed=2), seeded(6, seed=3)
    module.zero_grad()
    module(x, w0, b0).square().sum().backward()
    assert not module.A_lora_up.grad[:, 2:].any() and not module.A_lora_down.grad[2:].any()
    assert module.A_lora_up.grad[:, :2].any() and module.B_lora_up.grad[:, 3:].any()
    with _CountOps() as sub_rank:
        module(x, w0, b0)
    module.set_active("A=lora4,B=lora4,C=lora4,D=vector,E=scalar")
    _check_against_definition(module, 9, 6, True, seed=12)
    with _CountOps() as full_rank:
        module(x, w0, b0)
    assert sub_rank.counts["slice"] == 4  # A's up and down, C's up and down (B is whole at rank 4)
    assert full_rank.counts["slice"] == 0 and full_rank.counts["alias"] == 0


def _forward_backward_counts(config: str, has_bias: bool) -> tuple[Counter[str], Counter[str]]:
    module = _module(config, 16, 24, has_bias)
    w0 = seeded(24, 16, seed=1)
    b0 = seeded(24, seed=2) if has_bias else None
    x = seeded(2, 5, 16, seed=3).requires_grad_()
    with _CountOps() as forward:
        out = module(x, w0, b0)
    grad = torch.ones_like(out)
    with _CountOps() as backward:
        out.backward(grad)
    return forward.counts, backward.counts


@pytest.mark.parametrize("has_bias", [True, False])
def test_the_default_forms_dispatch_the_fused_ops(has_bias: bool) -> None:
    """Default forms, a 3-d input: forward = ``A_up A_down``, ``W0 ⊙ .``, one addmm for ``+ B_up B_down``, one addmv
    for ``E + W0 C`` (and one addcmul for ``+ b0 ⊙ D``), the linear (view, t, addmm, view): 8 ops (9 with a bias),
    no slice, no separate add; forward + backward (the AccumulateGrad detaches included) 36 (41)."""
    forward, backward = _forward_backward_counts(DEFAULT_FORMS, has_bias)
    assert forward["mm"] == 1 and forward["mul"] == 1 and forward["addmv"] == 1
    assert forward["addmm"] == 2  # B onto W0 ⊙ A, and the branch's linear with the bias terms as its bias
    assert forward["addcmul"] == (1 if has_bias else 0)
    for absent in ("add", "slice", "alias", "expand", "mv", "_to_copy", "promote_types"):
        assert forward[absent] == 0, f"forward dispatched {absent}: {dict(forward)}"
    assert sum(forward.values()) == (9 if has_bias else 8), dict(forward)
    assert backward["slice_backward"] == 0
    assert sum(forward.values()) + sum(backward.values()) == (41 if has_bias else 36), (dict(forward), dict(backward))


def test_the_fold_dispatches_the_fused_ops_and_no_dtype_promotion_when_dtypes_agree() -> None:
    module = _module(DEFAULT_FORMS, 16, 24, True)
    w0, b0 = seeded(24, 16, seed=1), seeded(24, seed=2)
    with _CountOps() as fold:
        module.fold(w0, b0)
    assert fold.counts["promote_types"] == 0 and fold.counts["add"] == 0 and fold.counts["slice"] == 0
    assert fold.counts["addmm"] == 1 and fold.counts["addmv"] == 1 and fold.counts["addcmul"] == 1
    assert sum(fold.counts.values()) == 5, dict(fold.counts)  # mm, mul, addmm, addmv, addcmul


@pytest.mark.parametrize(
    "config, has_bias",
    [
        ("A=none,B=none,C=none,D=none,E=scalar", False),
        ("A=none,B=none,C=none,D=scalar,E=none", True),
        ("A=none,B=none,C=lora2,D=none,E=none", False),
        ("A=lora2,B=none,C=none,D=scalar,E=scalar", True),
    ],
)
def test_lone_bias_terms_have_one_value_per_output(config: str, has_bias: bool) -> None:
    """E scalar alone is broadcast to (d_out,); D alone is ``b0 ⊙ D``; C alone ``W0 C``: the fold's bias has d_out
    entries and the forward broadcasts it over the tokens."""
    module = _module(config, 6, 4, has_bias, seed=5)
    _check_against_definition(module, 6, 4, has_bias, seed=21)
    w0, b0 = seeded(4, 6, seed=1), seeded(4, seed=2) if has_bias else None
    out = module(seeded(3, 6, seed=4), w0, b0)
    assert out.shape == (3, 4)


def test_wider_weight_than_parameters_computes_in_the_weight_dtype() -> None:
    """float32 parameters beside a float64 layer: the fused ops get one dtype (the small parameters are cast, the
    weight never narrowed); forward and fold are float64 and equal the definition up to the float32 rounding of the
    lora products (formed from the float32 factors, as before)."""
    module = GLoRA(OpShape(6, 5, 6), GLoRAParams(config="A=lora2,B=lora2,C=vector,D=vector,E=scalar"))
    randomize(module, 7)
    w0, b0, x = seeded(5, 6, seed=1), seeded(5, seed=2), seeded(3, 6, seed=3)
    out = module(x, w0, b0)
    delta_w, delta_b = module.fold(w0, b0)
    assert out.dtype == delta_w.dtype == delta_b.dtype == torch.float64
    wide = module.double()
    expected_w, expected_b = glora_delta(glora_supports(wide, _forms(wide), 5, 6), w0, b0)
    torch.testing.assert_close(out, linear(x, expected_w, expected_b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(delta_w, expected_w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(delta_b, expected_b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x @ delta_w.T + delta_b, out, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("config", [DEFAULT_FORMS, "A=lora2,B=vector,C=lora2,D=vector,E=scalar"])
def test_half_layers_with_float32_parameters_with_and_without_autocast(config: str) -> None:
    """The training recipe (half frozen weights, float32 parameters): without autocast the parameters are cast to the
    weight's dtype for the fused bias ops; under autocast its casts apply. Both return the activations' dtype, close
    to float64."""
    module = GLoRA(OpShape(12, 10, 12), GLoRAParams(config=config))
    randomize(module, 9, std=0.3)
    w0, b0, x = seeded(10, 12, seed=1), seeded(10, seed=2), seeded(2, 3, 12, seed=3)
    expected = module.double()(x, w0, b0)
    module.float()
    half = module(x.bfloat16(), w0.bfloat16(), b0.bfloat16())
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.double(), expected, rtol=3e-2, atol=5e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = module(x.bfloat16(), w0.bfloat16(), b0.bfloat16())
    torch.testing.assert_close(autocast.double(), expected, rtol=3e-2, atol=5e-2)
    half.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in module.parameters())
