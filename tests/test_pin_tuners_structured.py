"""Pins of the structured matrices (``tuners/structured.py``) and the SURM tuners built on them (``tuners/surm.py``):
the dtypes the FFT paths compute and return in (float64 kept exact, half precision computed in float32 and
returned in the input's dtype), the path each call takes, the factor shapes and their errors, and what the
modules report. The formulas themselves are pinned in ``test_surm_math.py`` / ``test_reference_tuners.py``.
"""

from __future__ import annotations

import pytest
import torch

from resattn_diffusion.tuners import structured
from resattn_diffusion.tuners.base import ConfigError, OpShape
from resattn_diffusion.tuners.fast_paths import forced_paths
from resattn_diffusion.tuners.structured import (
    STRUCTURES,
    CirculantMatrix,
    KroneckerMatrix,
    LDRMatrix,
    ToeplitzMatrix,
    circulant_apply,
    circulant_matrix,
    kronecker_apply,
    ldr_apply,
    skew_circulant_apply,
    skew_circulant_matrix,
    toeplitz_apply,
    toeplitz_matrix,
)
from resattn_diffusion.tuners.surm import (
    SURMAdapter,
    SURMAdapterParams,
    SURMCirculant,
    SURMCirculantParams,
    SURMKronecker,
    SURMKroneckerParams,
    SURMLDRParams,
    SURMToeplitzParams,
)

FAMILY_KWARGS = {"circulant": {}, "toeplitz": {}, "kronecker": {}, "ldr": {"displacement_rank": 2}}


def _seeded(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _applications(d_out: int, d_in: int):
    """Each FFT application with its parameters and its materialised d_out x d_in matrix (float64)."""
    n = max(d_out, d_in)
    v, h = _seeded(n, seed=1), _seeded(n, seed=2)
    g2, h2 = _seeded(2, n, seed=3), _seeded(2, n, seed=4)
    t = _seeded(d_out + d_in - 1, seed=5)
    ldr = sum(circulant_matrix(g) @ skew_circulant_matrix(k) for g, k in zip(g2, h2))
    return {
        "circulant": (lambda x: circulant_apply(v, x, d_out), circulant_matrix(v)[:d_out, :d_in]),
        "skew": (lambda x: skew_circulant_apply(h, x, d_out), skew_circulant_matrix(h)[:d_out, :d_in]),
        "toeplitz": (lambda x: toeplitz_apply(t, x, d_out), toeplitz_matrix(t, d_out, d_in)),
        "ldr": (lambda x: ldr_apply(g2, h2, x, d_out), ldr[:d_out, :d_in]),
    }


@pytest.mark.parametrize("d_out, d_in", [(13, 9), (9, 13)])
@pytest.mark.parametrize("name", ["circulant", "skew", "toeplitz", "ldr"])
def test_fft_applications_are_float64_exact_for_float64_inputs(name: str, d_out: int, d_in: int) -> None:
    apply, matrix = _applications(d_out, d_in)[name]
    x = _seeded(3, 4, d_in, seed=6)
    y = apply(x)
    assert y.dtype == torch.float64 and y.shape == (3, 4, d_out)
    torch.testing.assert_close(y, x @ matrix.T, rtol=1e-12, atol=1e-12)  # float32 anywhere would miss by 1e-7


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["circulant", "skew", "toeplitz", "ldr"])
def test_fft_applications_compute_half_inputs_in_float32_and_return_their_dtype(name: str, dtype) -> None:
    apply, matrix = _applications(12, 10)[name]
    x = _seeded(5, 10, seed=7).to(dtype)
    y = apply(x)
    assert y.dtype == dtype
    # the float32 result rounded once to the input's dtype (a half-precision FFT would lose far more)
    expected = (x.double() @ matrix.T).to(dtype)
    torch.testing.assert_close(y, expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("family", sorted(STRUCTURES))
@pytest.mark.parametrize("path", ["structured", "dense"])
def test_every_family_returns_the_input_dtype_on_both_paths(family: str, path: str) -> None:
    matrix = STRUCTURES[family](12, 8, init="random", **FAMILY_KWARGS[family])
    matrix.path = path
    x = _seeded(4, 8, seed=8, dtype=torch.float32)
    reference = x.double() @ matrix.materialize().double().T
    for dtype in (torch.bfloat16, torch.float64):
        y = matrix(x.to(dtype))
        assert y.dtype == dtype, (family, path, dtype)
        torch.testing.assert_close(y.double(), reference, rtol=3e-2, atol=3e-2)


def test_kronecker_apply_keeps_batch_dims_and_dtype() -> None:
    a, b = _seeded(2, 3, seed=1), _seeded(4, 5, seed=2)
    x = _seeded(2, 3, 15, seed=3)
    y = kronecker_apply(a, b, x)
    assert y.shape == (2, 3, 8) and y.dtype == torch.float64
    torch.testing.assert_close(y, x @ torch.kron(a, b).T, rtol=1e-12, atol=1e-12)
    assert kronecker_apply(a.float(), b.float(), x.half()).dtype == torch.float16


def test_toeplitz_matrix_refuses_a_wrong_parameter_count() -> None:
    with pytest.raises(ValueError, match="a 3 x 4 Toeplitz matrix has 6 parameters, got 5"):
        toeplitz_matrix(torch.zeros(5), 3, 4)


# --- shapes, factors, init -------------------------------------------------------------------------------------------


def test_kronecker_factors_default_near_square_and_explicit_ones_must_divide() -> None:
    assert structured.resolve_kronecker_factors(320, 768) == (16, 24, 20, 32)
    assert structured.resolve_kronecker_factors(12, 7) == (3, 1, 4, 7)  # a prime: 1 x 7
    assert structured.resolve_kronecker_factors(12, 8, out_factor=6, in_factor=8) == (6, 8, 2, 1)
    assert structured.resolve_kronecker_factors(16, 16) == (4, 4, 4, 4)  # sqrt exactly
    with pytest.raises(
        ConfigError,
        match=r"out_factor \(a1, rows of A\)=5 does not divide 12; valid values: "
        r"\[1, 2, 3, 4, 6, 12\].*out_factor=3, in_factor=2",
    ):
        structured.resolve_kronecker_factors(12, 8, out_factor=5)
    with pytest.raises(ConfigError, match=r"in_factor \(a2, columns of A\)=-1 does not divide 8"):
        structured.resolve_kronecker_factors(12, 8, in_factor=-1)
    with pytest.raises(ConfigError, match="out_factor.*; in_factor"):
        structured.resolve_kronecker_factors(12, 8, out_factor=7, in_factor=3)


def test_modules_report_their_shapes_and_parameter_counts() -> None:
    kron = KroneckerMatrix(12, 8, out_factor=6, in_factor=2)
    assert (tuple(kron.a.shape), tuple(kron.b.shape)) == ((6, 2), (2, 4))
    assert repr(kron) == "KroneckerMatrix(d_out=12, d_in=8, A=(6, 2), B=(2, 4))"
    assert KroneckerMatrix.count_parameters(12, 8, out_factor=6, in_factor=2) == 6 * 2 + 2 * 4
    ldr = LDRMatrix(6, 10, displacement_rank=3)
    assert tuple(ldr.g.shape) == tuple(ldr.h.shape) == (3, 10)
    assert repr(ldr) == "LDRMatrix(d_out=6, d_in=10, displacement_rank=3)"
    assert LDRMatrix.count_parameters(6, 10, displacement_rank=3) == 60
    assert LDRMatrix.count_parameters(6, 10) == 20 and tuple(LDRMatrix(6, 10).g.shape) == (1, 10)  # k = 1 by default
    assert repr(CirculantMatrix(6, 10)) == "CirculantMatrix(d_out=6, d_in=10)"
    assert tuple(CirculantMatrix(6, 10).v.shape) == (10,) and CirculantMatrix.count_parameters(6, 10) == 10
    assert tuple(ToeplitzMatrix(6, 10).t.shape) == (15,) and ToeplitzMatrix.count_parameters(6, 10) == 15
    for family, kwargs in FAMILY_KWARGS.items():
        matrix = STRUCTURES[family](6, 10, **kwargs)
        assert sum(p.numel() for p in matrix.parameters()) == type(matrix).count_parameters(6, 10, **kwargs)


@pytest.mark.parametrize("family", sorted(STRUCTURES))
def test_zero_init_is_exactly_zero_with_one_random_factor_and_random_init_is_not(family: str) -> None:
    torch.manual_seed(0)
    zero = STRUCTURES[family](12, 8, **FAMILY_KWARGS[family])
    assert torch.count_nonzero(zero.materialize()) == 0
    nonzero = [name for name, p in zero.named_parameters() if torch.count_nonzero(p) > 0]
    assert nonzero == {"circulant": [], "toeplitz": [], "kronecker": ["b"], "ldr": ["h"]}[family]
    random = STRUCTURES[family](12, 8, init="random", **FAMILY_KWARGS[family])
    # LoRA's down-projection scale: uniform in +-1/sqrt(fan_in); LDR's g shares it among its k = 2 terms
    fan_in = {"circulant": {"v": 12}, "toeplitz": {"t": 8}, "kronecker": {"a": 2, "b": 4}, "ldr": {"g": 24, "h": 12}}
    for name, p in random.named_parameters():
        assert torch.count_nonzero(p) == p.numel(), name
        assert p.abs().max() <= fan_in[family][name] ** -0.5, name
    with pytest.raises(ConfigError, match=r"init='ones' is not allowed; choose one of \['zero', 'random'\]"):
        STRUCTURES[family](12, 8, init="ones", **FAMILY_KWARGS[family])
    with pytest.raises(ConfigError, match="positive dims, got 0 x 8"):
        STRUCTURES[family](0, 8, **FAMILY_KWARGS[family])
    with pytest.raises(ConfigError, match="positive dims, got 12 x 0"):
        STRUCTURES[family](12, 0, **FAMILY_KWARGS[family])


def test_ldr_needs_a_positive_displacement_rank() -> None:
    with pytest.raises(ConfigError, match="displacement_rank must be >= 1, got 0"):
        LDRMatrix(4, 4, displacement_rank=0)


# --- which path a call takes ---------------------------------------------------------------------------------------


def test_path_choice_follows_the_setting_the_forced_paths_and_the_cost_model() -> None:
    matrix = CirculantMatrix(16, 16, init="random")
    x = torch.zeros(3, 16)
    matrix.path = "dense"
    assert matrix.uses_dense_path(x)
    matrix.path = "structured"
    assert not matrix.uses_dense_path(x)
    with forced_paths("fast"):
        assert not matrix.uses_dense_path(x)  # a forced module path wins over the forced fast path
    matrix.path = "fft"
    with pytest.raises(
        ConfigError, match=r"path='fft' is not allowed; choose one of \['auto', 'structured', 'dense'\]"
    ):
        matrix.uses_dense_path(x)
    matrix.path = "auto"
    with forced_paths("fast"):
        assert matrix.uses_dense_path(x)
    # the CPU cost model: small widths take the dense matmul; a row count changes the comparison
    rows = 3
    assert matrix.uses_dense_path(x) == (matrix.dense_cost(rows) < matrix.structured_cost(rows))
    assert matrix.dense_cost(rows) == 16 * 16 * (rows + 1)
    with forced_paths("reference"):
        assert matrix.uses_dense_path(x) == (matrix.dense_cost(rows) < matrix.structured_cost(rows))
    assert matrix.uses_dense_path(torch.zeros(3, 16, device="meta")) is False  # not CPU, not CUDA: structured
    # the rows of a 1-wide input are its elements: LDR 32 x 1 on 8 rows, dense 32 * 8 + 32^3 = 33024 < FFT
    # 8 * 50 * 32 log2 32 = 64000 (on 4 rows the FFT would be the cheaper: 32896 > 32000)
    narrow = LDRMatrix(32, 1)
    assert narrow.dense_cost(8) == 33024 and narrow.structured_cost(8) == 64000
    assert narrow.uses_dense_path(torch.zeros(8, 1)) and not narrow.uses_dense_path(torch.zeros(4, 1))
    assert narrow.uses_dense_path(torch.zeros(2, 4, 1))


def test_cost_model_picks_the_fft_for_wide_layers_and_the_matmul_for_narrow_ones() -> None:
    for family, wide in (("circulant", 1024), ("toeplitz", 2048), ("ldr", 2048)):
        narrow_matrix = STRUCTURES[family](16, 16)
        wide_matrix = STRUCTURES[family](wide, wide)
        assert narrow_matrix.uses_dense_path(torch.zeros(64, 16)), family
        assert not wide_matrix.uses_dense_path(torch.zeros(64, wide)), family
    # LDR's dense form costs k n^3 to materialise
    ldr = LDRMatrix(8, 4, displacement_rank=3)
    assert ldr.dense_cost(5) == 8 * 4 * 5 + 3 * 8**3
    assert ldr.structured_cost(5) == 5 * 3 * structured.FFT_COST_PER_ELEMENT["ldr"] * 8 * 3
    toeplitz = ToeplitzMatrix(6, 5)  # FFT length: next fast length >= 10 is 10
    assert toeplitz.structured_cost(2) == pytest.approx(
        2 * structured.FFT_COST_PER_ELEMENT["toeplitz"] * 10 * 3.321928
    )
    assert KroneckerMatrix(6, 4).structured_cost(7) == 0.0  # always the factor matmuls under "auto" on CPU
    assert not KroneckerMatrix(6, 4).uses_dense_path(torch.zeros(7, 4))


def test_dense_forward_on_cpu_runs_in_float32_under_autocast() -> None:
    matrix = ToeplitzMatrix(12, 8, init="random")
    matrix.path = "dense"
    x = _seeded(4, 8, seed=9, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = matrix(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, x @ matrix.materialize().detach().T, rtol=1e-6, atol=1e-6)


# --- SURM modules ----------------------------------------------------------------------------------------------------


def test_surm_kronecker_uses_the_given_factors() -> None:
    shape = OpShape(in_dim=8, out_dim=12, context_dim=8)
    tuner = SURMKronecker(shape, SURMKroneckerParams(out_factor=6, in_factor=2))
    assert tuple(tuner.delta.a.shape) == (6, 2) and tuple(tuner.delta.b.shape) == (2, 4)
    assert SURMKronecker.num_parameters_for(shape, SURMKroneckerParams(out_factor=6, in_factor=2)) == 20
    with pytest.raises(ConfigError, match="does not divide 12"):
        SURMKronecker(shape, SURMKroneckerParams(out_factor=5))


@pytest.mark.parametrize("structure", sorted(STRUCTURES))
def test_surm_adapter_parts_and_dropout(structure: str) -> None:
    shape = OpShape(in_dim=8, out_dim=12, context_dim=8)
    params = SURMAdapterParams(structure=structure, hidden_dim=6, dropout=0.5, displacement_rank=2)
    adapter = SURMAdapter(shape, params)
    assert isinstance(adapter.down, STRUCTURES[structure]) and isinstance(adapter.up, STRUCTURES[structure])
    assert (adapter.down.d_out, adapter.down.d_in, adapter.up.d_out, adapter.up.d_in) == (6, 8, 12, 6)
    assert torch.count_nonzero(adapter.up.materialize()) == 0 and torch.count_nonzero(adapter.down.materialize()) > 0
    if structure == "ldr":
        assert adapter.down.g.shape[0] == adapter.up.g.shape[0] == 2
    assert adapter.dropout.p == 0.5
    assert SURMAdapter.num_parameters_for(shape, params) == sum(p.numel() for p in adapter.parameters())


@pytest.mark.parametrize("name, widest", [("circulant", 16), ("skew", 32), ("toeplitz", 27), ("ldr", 64)])
def test_cpu_row_blocks_hold_about_the_set_number_of_elements(name: str, widest: int, monkeypatch) -> None:
    """On CPU each block has ``CPU_ROW_BLOCK_ELEMENTS // widest`` rows, ``widest`` the widest intermediate per row
    (circulant n, skew-circulant 2n complex, Toeplitz the FFT length L, LDR 2 k n): the cache-sized working set
    the blocking is for. n = 16, k = 2, L = next fast length >= 11 + 16 - 1 = 27."""
    apply, matrix = _applications(11, 16)[name]
    monkeypatch.setattr(structured, "CPU_ROW_BLOCK_ELEMENTS", 20 * widest)  # blocks of 20 rows
    blocks: list[int] = []
    original = structured._over_row_blocks

    def counting(fn, x, width):
        def fn_counted(rows):
            blocks.append(rows.reshape(-1, rows.shape[-1]).shape[0])
            return fn(rows)

        return original(fn_counted, x, width)

    monkeypatch.setattr(structured, "_over_row_blocks", counting)
    x = _seeded(3, 15, 16, seed=10)  # 45 rows: blocks of 20, 20, 5
    torch.testing.assert_close(apply(x), x @ matrix.T, rtol=1e-12, atol=1e-12)
    assert blocks == [20, 20, 5]
    blocks.clear()
    torch.testing.assert_close(apply(x[0, :4]), x[0, :4] @ matrix.T, rtol=1e-12, atol=1e-12)
    assert blocks == [4]  # fewer rows than a block: one pass


def test_skew_modulation_under_torch_compile_equals_eager() -> None:
    """While dynamo traces, the modulation is built in the graph (not read from the cache): same values."""
    h, x = _seeded(12, seed=11), _seeded(3, 12, seed=12)
    compiled = torch.compile(lambda h, x: skew_circulant_apply(h, x, 12), backend="eager")
    torch.testing.assert_close(compiled(h, x), x @ skew_circulant_matrix(h).T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "params, message",
    [
        (SURMLDRParams(displacement_rank=2.5), "displacement_rank must be a positive integer, got 2.5"),
        (SURMLDRParams(displacement_rank=True), "displacement_rank must be a positive integer, got True"),
        (SURMLDRParams(displacement_rank=-1), "displacement_rank must be a positive integer"),
        (SURMAdapterParams(structure="ldr", displacement_rank=0), "displacement_rank must be a positive integer"),
        (SURMKroneckerParams(out_factor=1.5), "out_factor must be a non-negative integer"),
        (SURMKroneckerParams(in_factor=False), "in_factor must be a non-negative integer"),
        (SURMKroneckerParams(in_factor=-2), r"in_factor must be a non-negative integer \(0 = automatic\), got -2"),
        (SURMAdapterParams(hidden_dim=True), "hidden_dim must be a non-negative integer"),
        (SURMAdapterParams(hidden_dim=2.0), "hidden_dim must be a non-negative integer"),
        (SURMAdapterParams(activation="swish2"), "swish2"),
        (SURMAdapterParams(dropout=1.0), r"dropout must be in \[0, 1\)"),
    ],
)
def test_surm_params_refuse_bad_values_by_name(params, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        params.validate()


@pytest.mark.parametrize(
    "params",
    [SURMCirculantParams(), SURMToeplitzParams(), SURMKroneckerParams(), SURMLDRParams(), SURMAdapterParams()],
)
def test_surm_refuses_empty_layers(params) -> None:
    params.validate_for(OpShape(in_dim=1, out_dim=1, context_dim=1))  # the smallest layer is fine
    for in_dim, out_dim in ((0, 4), (4, 0)):
        with pytest.raises(ConfigError, match=f"positive in_dim and out_dim, got {in_dim} -> {out_dim}"):
            params.validate_for(OpShape(in_dim=in_dim, out_dim=out_dim, context_dim=4))


def test_surm_linear_folds_into_the_weights_dtype_and_ignores_the_frozen_weight() -> None:
    shape = OpShape(in_dim=6, out_dim=4, context_dim=6)
    tuner = SURMCirculant(shape, SURMCirculantParams())
    with torch.no_grad():
        tuner.delta.v.copy_(_seeded(6, seed=13, dtype=torch.float32))
    weight = torch.randn(4, 6, dtype=torch.float64)
    delta, bias = tuner.fold(weight, torch.zeros(4, dtype=torch.float64))
    assert bias is None and delta.dtype == torch.float64
    torch.testing.assert_close(delta, tuner.materialize().detach().double())
    x = _seeded(3, 6, seed=14, dtype=torch.float32)
    torch.testing.assert_close(tuner(x, weight, None), tuner(x), rtol=0, atol=0)  # T(x) = dW x: W0 is not read


@pytest.mark.parametrize("family", ["circulant", "toeplitz", "ldr"])
def test_dense_matrix_is_the_exact_materialisation_off_the_fast_path(family: str, monkeypatch) -> None:
    """Off the fast path (CPU, or no gradient wanted) the dense matrix is :meth:`materialize` itself -- an exact
    gather of the parameters -- never the FFT of the identity, which carries rounding. On the forced fast path with a
    gradient it is the FFT form (here: strided forms switched off), equal up to rounding."""
    monkeypatch.setattr(structured.StructuredMatrix, "use_strided_dense", False)
    matrix = STRUCTURES[family](12, 9, init="random", **FAMILY_KWARGS[family])
    exact = matrix.materialize().detach()
    assert torch.equal(matrix.dense_matrix(), exact)  # gradient enabled, CPU, nothing forced
    with forced_paths("reference"):
        assert torch.equal(matrix.dense_matrix(), exact)
    with forced_paths("fast"), torch.no_grad():
        assert torch.equal(matrix.dense_matrix(), exact)
    with forced_paths("fast"):
        through_fft = matrix.dense_matrix()
        assert through_fft.requires_grad
        torch.testing.assert_close(through_fft, exact, rtol=1e-5, atol=1e-6)
        assert not torch.equal(through_fft, exact)  # the FFT form, not the gather
        matrix.requires_grad_(False)
        assert torch.equal(matrix.dense_matrix(), exact)  # nothing to train: the gather


def test_the_kronecker_parameter_count_uses_both_given_factors() -> None:
    for out_factor, in_factor in [(6, 2), (2, 4), (0, 8), (3, 0)]:
        kron = KroneckerMatrix(12, 8, out_factor=out_factor, in_factor=in_factor)
        counted = KroneckerMatrix.count_parameters(12, 8, out_factor=out_factor, in_factor=in_factor)
        assert counted == sum(p.numel() for p in kron.parameters()), (out_factor, in_factor)


def test_the_skew_modulation_is_complex64_for_float32_and_complex128_for_float64() -> None:
    # the FFT of LDR / skew-circulant runs in the input's precision: complex128 for float32 would double its memory
    for dtype, complex_dtype in [(torch.float32, torch.complex64), (torch.float64, torch.complex128)]:
        modulation = structured._build_skew_modulation(6, torch.device("cpu"), dtype)
        assert modulation.dtype == complex_dtype
        angle = torch.arange(6, dtype=torch.float64) * (torch.pi / 6)
        torch.testing.assert_close(modulation, torch.complex(angle.cos(), angle.sin()).to(complex_dtype))


def test_a_structured_matrix_may_have_one_output_or_one_input() -> None:
    for cls in (CirculantMatrix, ToeplitzMatrix, LDRMatrix, KroneckerMatrix):
        assert cls(1, 4).dense_matrix().shape == (1, 4) and cls(4, 1).dense_matrix().shape == (4, 1)
    with pytest.raises(ConfigError):
        CirculantMatrix(0, 4)
