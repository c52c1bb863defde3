"""SURM math: structured fast paths against materialised matrices, rectangular shapes, init, gradients, folding,
parameter counts, float32 FFTs under bf16 autocast, the Kronecker shape error, and SURM-Adapter."""

from __future__ import annotations

import pytest
import torch

from resattn_diffusion.tuners import structured
from resattn_diffusion.tuners.base import ConfigError, OpShape
from resattn_diffusion.tuners.structured import (
    CirculantMatrix,
    KroneckerMatrix,
    LDRMatrix,
    ToeplitzMatrix,
    circulant_matrix,
    next_fast_fft_length,
    resolve_kronecker_factors,
    skew_circulant_apply,
    skew_circulant_matrix,
    toeplitz_matrix,
)
from resattn_diffusion.tuners.surm import (
    SURMLDR,
    SURMAdapter,
    SURMAdapterParams,
    SURMCirculant,
    SURMCirculantParams,
    SURMKronecker,
    SURMKroneckerParams,
    SURMLDRParams,
    SURMToeplitz,
    SURMToeplitzParams,
)

SHAPES = [(320, 320), (320, 768), (1280, 320), (17, 29), (29, 17)]  # (d_out, d_in)

LINEAR_TUNERS = {
    "circulant": (SURMCirculant, SURMCirculantParams()),
    "toeplitz": (SURMToeplitz, SURMToeplitzParams()),
    "kronecker": (SURMKronecker, SURMKroneckerParams()),
    "ldr": (SURMLDR, SURMLDRParams(displacement_rank=3)),
}


def shape_of(d_out: int, d_in: int) -> OpShape:
    return OpShape(in_dim=d_in, out_dim=d_out, context_dim=d_in)


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm()).item()


# --- materialised matrices follow the documented definitions (checked element by element) -----------------------


def test_circulant_and_skew_circulant_definitions():
    v = torch.arange(1.0, 6.0)
    n = 5
    circ, skew = circulant_matrix(v), skew_circulant_matrix(v)
    for i in range(n):
        for j in range(n):
            assert circ[i, j] == v[(i - j) % n]
            assert skew[i, j] == (v[i - j] if i >= j else -v[n + i - j])
    assert torch.equal(circ[:, 0], v) and torch.equal(skew[:, 0], v)


def test_toeplitz_definition():
    d_out, d_in = 3, 5
    t = torch.arange(1.0, d_out + d_in)
    matrix = toeplitz_matrix(t, d_out, d_in)
    for i in range(d_out):
        for j in range(d_in):
            assert matrix[i, j] == t[i - j + d_in - 1]
    assert torch.equal(matrix[:, 0], t[d_in - 1 :])
    assert torch.equal(matrix[0], t[:d_in].flip(0))


def test_kronecker_materialisation_and_row_major_identity():
    module = KroneckerMatrix(6, 10, init="random", out_factor=2, in_factor=5)  # A 2x5, B 3x2
    a, b = module.a.detach(), module.b.detach()
    product = module.materialize().detach()
    for i in range(6):
        for j in range(10):
            assert product[i, j] == a[i // 3, j // 2] * b[i % 3, j % 2]
    x = torch.randn(4, 10)
    torch.testing.assert_close(module(x), x @ product.T)
    # the identity itself: (A (x) B) vec_r(X) = vec_r(A X B^T) with torch's row-major reshape
    grid = x[0].reshape(5, 2)
    torch.testing.assert_close((a @ grid @ b.T).reshape(6), product @ x[0])


def test_skew_circulant_fast_path():
    h = torch.randn(29)
    x = torch.randn(3, 29)
    assert relative_error(skew_circulant_apply(h, x, 29), x.double() @ skew_circulant_matrix(h).double().T) < 1e-5


def test_ldr_is_a_sum_of_circulant_times_skew_circulant():
    module = LDRMatrix(9, 9, init="random", displacement_rank=2)
    g, h = module.g.detach(), module.h.detach()
    expected = circulant_matrix(g[0]) @ skew_circulant_matrix(h[0]) + circulant_matrix(g[1]) @ skew_circulant_matrix(
        h[1]
    )
    torch.testing.assert_close(module.materialize().detach(), expected)


def test_next_fast_fft_length():
    assert [next_fast_fft_length(n) for n in (1, 7, 11, 320, 1087, 2047)] == [1, 8, 12, 320, 1125, 2048]


@pytest.fixture(autouse=True)
def force_structured_path(monkeypatch):
    """These tests are about the FFT / Kronecker paths; on CPU the "auto" path takes a dense matmul for small
    widths, which would make them compare the materialised matrix with itself. (auto == structured is checked in
    tests/test_perf_benchmarks.py.)"""
    monkeypatch.setattr(structured.StructuredMatrix, "path", "structured")


# --- fast paths equal the materialised matrix ----------------------------------------------------------------------


@pytest.mark.parametrize("d_out, d_in", SHAPES)
@pytest.mark.parametrize(
    "make",
    [
        lambda o, i: CirculantMatrix(o, i, init="random"),
        lambda o, i: ToeplitzMatrix(o, i, init="random"),
        lambda o, i: KroneckerMatrix(o, i, init="random"),
        lambda o, i: LDRMatrix(o, i, init="random", displacement_rank=3),
    ],
    ids=["circulant", "toeplitz", "kronecker", "ldr"],
)
def test_fast_path_equals_materialised(make, d_out, d_in):
    torch.manual_seed(0)
    module = make(d_out, d_in)
    x = torch.randn(2, 11, d_in)
    with torch.no_grad():
        fast = module(x)
        dense = x.double() @ module.materialize().double().T
    assert fast.shape == (2, 11, d_out) and fast.dtype == torch.float32
    assert relative_error(fast, dense) < 1e-5


@pytest.mark.parametrize("family", ["circulant", "toeplitz", "ldr"])
def test_cpu_row_blocks_give_the_same_result_and_gradients(family, monkeypatch):
    module = {"circulant": CirculantMatrix, "toeplitz": ToeplitzMatrix, "ldr": LDRMatrix}[family](
        24, 40, init="random"
    )
    x = torch.randn(3, 50, 40, requires_grad=True)
    whole = module(x)
    (whole_grad_x,) = torch.autograd.grad(whole.square().sum(), x)
    monkeypatch.setattr(structured, "CPU_ROW_BLOCK_ELEMENTS", 200)  # blocks of a few rows
    blocked = module(x)
    (blocked_grad_x,) = torch.autograd.grad(blocked.square().sum(), x)
    torch.testing.assert_close(blocked, whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(blocked_grad_x, whole_grad_x, rtol=1e-5, atol=1e-6)
    assert relative_error(blocked, x.detach().double() @ module.materialize().detach().double().T) < 1e-5


def test_kronecker_explicit_factors_on_sd_shapes():
    for d_out, d_in, out_factor, in_factor in [(320, 768, 16, 24), (1280, 320, 32, 10), (320, 320, 4, 80)]:
        module = KroneckerMatrix(d_out, d_in, init="random", out_factor=out_factor, in_factor=in_factor)
        assert module.a.shape == (out_factor, in_factor)
        assert module.b.shape == (d_out // out_factor, d_in // in_factor)
        x = torch.randn(5, d_in)
        with torch.no_grad():
            assert relative_error(module(x), x.double() @ module.materialize().double().T) < 1e-5


# --- the linear tuners ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(LINEAR_TUNERS))
@pytest.mark.parametrize("d_out, d_in", [(320, 768), (1280, 320), (17, 29)])
def test_identity_at_init_and_fold_equals_forward(family, d_out, d_in):
    cls, params = LINEAR_TUNERS[family]
    module = cls(shape_of(d_out, d_in), params)
    weight = torch.randn(d_out, d_in)
    x = torch.randn(3, 4, d_in)
    out = module(x, weight, None)
    assert torch.equal(out, torch.zeros(3, 4, d_out))
    randomize(module)
    with torch.no_grad():
        delta_weight, delta_bias = module.fold(weight, torch.zeros(d_out))
        out = module(x, weight, None)
    assert delta_bias is None and delta_weight.shape == (d_out, d_in)
    assert relative_error(out, x.double() @ delta_weight.double().T) < 1e-5
    assert torch.equal(delta_weight, module.materialize().detach())
    assert module.fold(weight.half(), None)[0].dtype == torch.float16


@pytest.mark.parametrize("family", list(LINEAR_TUNERS))
def test_gradients_first_step_and_after(family):
    torch.manual_seed(0)
    cls, params = LINEAR_TUNERS[family]
    module = cls(shape_of(24, 40), params)
    zero_factors = {name for name, parameter in module.named_parameters() if not parameter.any()}
    assert len(zero_factors) == 1, "exactly one factor of the product is zero-initialised"
    x, target = torch.randn(4, 6, 40), torch.randn(4, 6, 24)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)

    def step() -> dict[str, torch.Tensor]:
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(module(x, None, None), target).backward()
        grads = {name: parameter.grad.clone() for name, parameter in module.named_parameters()}
        optimizer.step()
        return grads

    first = step()
    for name in zero_factors:
        assert torch.count_nonzero(first[name]) > 0, f"zero-initialised {name} got no gradient on the first step"
    second = step()
    for name, grad in second.items():
        assert torch.count_nonzero(grad) > 0, f"{name} got no gradient after one step"


@pytest.mark.parametrize(
    "family, d_out, d_in, expected",
    [
        ("circulant", 320, 768, 768),
        ("circulant", 1280, 320, 1280),
        ("toeplitz", 320, 768, 320 + 768 - 1),
        ("toeplitz", 1280, 320, 1280 + 320 - 1),
        ("kronecker", 320, 768, 16 * 24 + 20 * 32),
        ("kronecker", 1280, 320, 32 * 16 + 40 * 20),
        ("ldr", 320, 768, 2 * 3 * 768),
        ("ldr", 17, 29, 2 * 3 * 29),
    ],
)
def test_parameter_counts(family, d_out, d_in, expected):
    cls, params = LINEAR_TUNERS[family]
    module = cls(shape_of(d_out, d_in), params)
    assert sum(parameter.numel() for parameter in module.parameters()) == expected
    assert cls.num_parameters_for(shape_of(d_out, d_in), params) == expected


def test_kronecker_param_count_with_explicit_factors():
    params = SURMKroneckerParams(out_factor=16, in_factor=24)
    module = SURMKronecker(shape_of(320, 768), params)
    assert (
        sum(p.numel() for p in module.parameters())
        == 16 * 24 + 20 * 32
        == SURMKronecker.num_parameters_for(shape_of(320, 768), params)
    )


def test_kronecker_shape_error_suggests_valid_factors():
    params = SURMKroneckerParams(out_factor=7, in_factor=5)
    params.validate()
    with pytest.raises(ConfigError) as error:
        params.validate_for(shape_of(320, 768))
    message = str(error.value)
    assert "out_factor (a1, rows of A)=7 does not divide 320" in message
    assert "[1, 2, 4, 5, 8, 10, 16, 20, 32, 40, 64, 80, 160, 320]" in message
    assert "in_factor (a2, columns of A)=5 does not divide 768" in message
    assert "automatic choice is out_factor=16, in_factor=24" in message
    with pytest.raises(ConfigError, match="does not divide 320"):
        SURMKronecker(shape_of(320, 768), params)
    with pytest.raises(ConfigError, match="non-negative integer"):
        SURMKroneckerParams(out_factor=-2).validate()
    assert resolve_kronecker_factors(320, 768) == (16, 24, 20, 32)


def test_params_defaults_and_validation():
    for params in (
        SURMCirculantParams(),
        SURMToeplitzParams(),
        SURMKroneckerParams(),
        SURMLDRParams(),
        SURMAdapterParams(),
    ):
        params.validate()
        params.validate_for(shape_of(320, 768))
    with pytest.raises(ConfigError, match="displacement_rank"):
        SURMLDRParams(displacement_rank=0).validate()
    with pytest.raises(ConfigError, match="structure"):
        SURMAdapterParams(structure="hankel").validate()
    with pytest.raises(ConfigError, match="hidden_dim"):
        SURMAdapterParams(hidden_dim=-1).validate()


# --- float32 FFTs under autocast -----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["circulant", "toeplitz", "ldr"])
def test_fft_runs_in_float32_under_bf16_autocast(family):
    cls, params = LINEAR_TUNERS[family]
    module = cls(shape_of(320, 768), params)
    randomize(module)
    x = torch.randn(2, 9, 768)
    with torch.no_grad():
        reference = x.double() @ module.materialize().double().T
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_float = module(x, None, None)
            out_bf16 = module(x.bfloat16(), None, None)
    # float32 input: full float32 accuracy despite autocast (a bf16 computation would be ~1e-2 off)
    assert out_float.dtype == torch.float32
    assert relative_error(out_float, reference) < 1e-5
    # bf16 input: computed in float32 from the bf16 values, rounded once to bf16 at the end
    exact_from_bf16 = x.bfloat16().double() @ module.materialize().double().T
    assert out_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(out_bf16, exact_from_bf16.to(torch.bfloat16), rtol=1e-2, atol=1e-2)
    assert relative_error(out_bf16, exact_from_bf16) < 4e-3


def test_fft_gradient_under_autocast():
    module = SURMToeplitz(shape_of(64, 96), SURMToeplitzParams())
    x = torch.randn(3, 96, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        module(x, None, None).float().square().sum().backward()
    assert module.delta.t.grad.dtype == torch.float32


# --- SURM-Adapter ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("structure", ["circulant", "toeplitz", "kronecker", "ldr"])
@pytest.mark.parametrize("in_dim, out_dim, hidden_dim", [(64, 64, 0), (48, 80, 0), (64, 64, 96)])
def test_adapter_identity_gradients_and_count(structure, in_dim, out_dim, hidden_dim):
    torch.manual_seed(0)
    shape = OpShape(in_dim=in_dim, out_dim=out_dim, context_dim=in_dim)
    params = SURMAdapterParams(structure=structure, hidden_dim=hidden_dim, displacement_rank=2)
    adapter = SURMAdapter(shape, params)
    hidden = hidden_dim or in_dim
    assert (adapter.down.d_out, adapter.down.d_in, adapter.up.d_out, adapter.up.d_in) == (
        hidden,
        in_dim,
        out_dim,
        hidden,
    )
    assert sum(p.numel() for p in adapter.parameters()) == SURMAdapter.num_parameters_for(shape, params)
    x = torch.randn(2, 5, in_dim)
    out = adapter(x, None, None)
    assert torch.equal(out, torch.zeros(2, 5, out_dim))
    zero_factors = [name for name, parameter in adapter.named_parameters() if not parameter.any()]
    assert len(zero_factors) == 1 and zero_factors[0].startswith("up."), zero_factors
    optimizer = torch.optim.SGD(adapter.parameters(), lr=0.5)
    target = torch.randn(2, 5, out_dim)
    for step in range(2):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(adapter(x, None, None), target).backward()
        # first step: the zero factor of U learns; after one step every factor does
        for name in zero_factors if step == 0 else [name for name, _ in adapter.named_parameters()]:
            grad = adapter.get_parameter(name).grad
            assert torch.count_nonzero(grad) > 0, f"{name} got no gradient at step {step}"
        optimizer.step()


def test_adapter_parameter_count_formula():
    shape = OpShape(in_dim=320, out_dim=320, context_dim=768)
    assert SURMAdapter.num_parameters_for(shape, SURMAdapterParams()) == 320 + 320
    assert SURMAdapter.num_parameters_for(shape, SURMAdapterParams(structure="toeplitz")) == 2 * (320 + 320 - 1)
    assert (
        SURMAdapter.num_parameters_for(shape, SURMAdapterParams(structure="ldr", displacement_rank=2))
        == 2 * 2 * 2 * 320
    )


def test_registered_with_defaults():
    from resattn_diffusion.registry import get_tuner_spec

    shape = OpShape(in_dim=768, out_dim=320, context_dim=768)
    expected_kinds = {
        "glora": "linear",
        "surm_circulant": "linear",
        "surm_toeplitz": "linear",
        "surm_kronecker": "linear",
        "surm_ldr": "linear",
        "surm_adapter": "operation",
    }
    for name, kind in expected_kinds.items():
        spec = get_tuner_spec(name)
        assert spec.kind == kind
        params = spec.make_params()
        params.validate_for(shape)
        module = spec.module_cls(shape, params)
        x = torch.randn(2, 3, 768)
        out = module(x, torch.randn(320, 768), None) if kind == "linear" else module(x, None, None)
        assert out.shape == (2, 3, 320) and not out.any()
