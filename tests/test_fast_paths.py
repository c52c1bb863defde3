"""The GPU fast paths (issue 14) are exact against the reference paths, outputs and gradients, checked on CPU by
forcing them; the automatic choice keeps the reference paths on CPU; forcing refuses nonsense."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import resattn_diffusion as rd
from resattn_diffusion.integration.processors import LinearBank, select_linear_path
from resattn_diffusion.testing import frozen_tiny_unet, randomize_tuner, unet_inputs
from resattn_diffusion.tuners import base as tuner_base
from resattn_diffusion.tuners import structured
from resattn_diffusion.tuners.fast_paths import fast_path_wanted, forced_path, forced_paths
from resattn_diffusion.tuners.structured import STRUCTURES

LINEAR_TUNERS = [name for name in rd.tuner_names() if rd.get_tuner_spec(name).kind == "linear"]


def _unet_with(config: rd.ResTunerConfig, dtype=torch.float64, name: str = "default"):
    unet = frozen_tiny_unet("sd1").to(dtype)
    rd.add_res_tuner(unet, config, name)
    randomize_tuner(unet, name, std=0.05)
    return unet


def _output_and_grads(unet, inputs, path: str, **call_kwargs):
    parameters = rd.res_tuner_parameters(unet)
    with forced_paths(path):
        out = unet(**inputs, **call_kwargs).sample
        grads = torch.autograd.grad(out.square().sum(), parameters, allow_unused=True)  # fused tuners: unused
    return out, grads


def _assert_paths_agree(unet, inputs, rtol=1e-9, atol=1e-9, **call_kwargs):
    reference, reference_grads = _output_and_grads(unet, inputs, "reference", **call_kwargs)
    fast, fast_grads = _output_and_grads(unet, inputs, "fast", **call_kwargs)
    torch.testing.assert_close(fast, reference, rtol=rtol, atol=atol)
    assert len(fast_grads) == len(reference_grads) > 0
    assert any(grad is not None for grad in fast_grads)
    for fast_grad, reference_grad in zip(fast_grads, reference_grads):
        assert (fast_grad is None) == (reference_grad is None)
        if fast_grad is not None:
            torch.testing.assert_close(fast_grad, reference_grad, rtol=rtol, atol=atol)
    return reference


def _inputs(unet, dtype=torch.float64):
    inputs = unet_inputs(unet, batch_size=2, seed=0)
    return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}


# --- merged linear path ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tuner", LINEAR_TUNERS)
def test_merged_linear_path_equals_branches(tuner, monkeypatch):
    unet = _unet_with(rd.ResTunerConfig(tuner))
    inputs = _inputs(unet)
    merged_calls = []
    original = LinearBank.merged_forward
    monkeypatch.setattr(LinearBank, "merged_forward", lambda *a: merged_calls.append(1) or original(*a))
    reference = _assert_paths_agree(unet, inputs)
    assert merged_calls, "forced_paths('fast') did not take the merged path"
    with torch.no_grad():  # and the tuner does something: the check above is not between two frozen UNets
        rd.set_res_tuner_enabled(unet, False)
        assert not torch.allclose(unet(**inputs).sample, reference)


@pytest.mark.parametrize(
    "forms",
    [
        "A=vector,B=lora,C=lora,D=vector,E=scalar",
        "A=scalar,B=vector,C=none,D=none,E=none",
        "A=none,B=none,C=vector,D=none,E=vector",
    ],
)
def test_merged_path_equals_branches_for_glora_forms(forms):
    unet = _unet_with(rd.ResTunerConfig("glora", config=forms))
    _assert_paths_agree(unet, _inputs(unet))


def test_merged_path_with_scales_fused_and_stacked_tuners():
    unet = _unet_with(rd.ResTunerConfig("res_lora"), name="a")
    rd.add_res_tuner(unet, rd.ResTunerConfig("glora"), "b")
    randomize_tuner(unet, "b", seed=1)
    rd.add_res_tuner(unet, rd.ResTunerConfig("surm_toeplitz"), "c")
    randomize_tuner(unet, "c", seed=2)
    rd.set_res_tuner_scale(unet, 0.5, "b")
    inputs = _inputs(unet)
    _assert_paths_agree(unet, inputs)
    _assert_paths_agree(unet, inputs, cross_attention_kwargs={rd.SCALE_KWARG: {"a": 0.25, "c": 2.0}})
    rd.fuse_res_tuner(unet, "a")  # the merged GEMM adds the unfused deltas to the weight that holds the fused one
    _assert_paths_agree(unet, inputs)


def test_sequential_and_dropout_tuners_stay_on_branches():
    unet = _unet_with(rd.ResTunerConfig("res_lora", placement="sequential"))
    bank = next(m.res_tuner_bank for m in unet.modules() if isinstance(getattr(m, "res_tuner_bank", None), LinearBank))
    x = torch.randn(1, 3, 4, dtype=torch.float64)
    with forced_paths("fast"):
        assert select_linear_path(bank, x, bank.active()) == "branch"
    _assert_paths_agree(unet, _inputs(unet))
    bank.path = "merged"
    with pytest.raises(rd.ConfigError, match="parallel and mergeable"):
        select_linear_path(bank, x, bank.active())
    bank.path = "sideways"
    with pytest.raises(rd.ConfigError, match="LinearBank.path"):
        select_linear_path(bank, x, bank.active())

    dropout = _unet_with(rd.ResTunerConfig("res_lora", dropout=0.5))
    tuner = next(m for m in dropout.modules() if type(m).__name__ == "ResLoRA")
    dropout.train()
    assert not tuner.mergeable
    dropout.eval()
    assert tuner.mergeable


def test_automatic_choice_keeps_the_reference_paths_on_cpu():
    assert forced_path() is None
    assert fast_path_wanted("cuda") and not fast_path_wanted("cpu")
    with forced_paths("reference"):
        assert not fast_path_wanted("cuda")
        with forced_paths("fast"):
            assert fast_path_wanted("cpu")
        assert forced_path() == "reference"
    assert forced_path() is None
    with pytest.raises(rd.ConfigError, match="forced_paths"):
        with forced_paths("quick"):
            pass
    unet = _unet_with(rd.ResTunerConfig("glora"))
    bank = next(m.res_tuner_bank for m in unet.modules() if isinstance(getattr(m, "res_tuner_bank", None), LinearBank))
    assert select_linear_path(bank, torch.zeros(1, 2, 4), bank.active()) == "branch"
    assert not tuner_base.pads_head_dim(4, "cpu") and tuner_base.pads_head_dim(4, "cuda")
    assert not tuner_base.pads_head_dim(8, "cuda") and not tuner_base.pads_head_dim(16, "cuda", "on")
    with pytest.raises(rd.ConfigError, match="head_padding"):
        tuner_base.pads_head_dim(4, "cuda", "yes")
    matrix = STRUCTURES["circulant"](1280, 1280)
    assert not matrix.uses_dense_path(torch.zeros(512, 1280))  # the CPU cost model, as before


def test_linear_forward_is_bound_per_copy_and_removed_with_the_tuner():
    unet = _unet_with(rd.ResTunerConfig("res_lora"))
    linear = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert "forward" in linear.__dict__
    clone = copy.deepcopy(unet)
    clone_linear = clone.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert clone_linear.forward.args[0] is clone_linear
    keys = set(unet.state_dict())
    rd.remove_res_tuner(unet)
    assert "forward" not in linear.__dict__ and not hasattr(linear, "res_tuner_bank")
    assert keys >= set(unet.state_dict())
    x = torch.randn(2, linear.in_features, dtype=torch.float64)
    torch.testing.assert_close(linear(x), F.linear(x, linear.weight, linear.bias))


# --- dense structured matrices -----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["circulant", "toeplitz", "ldr", "kronecker"])
@pytest.mark.parametrize("d_out, d_in", [(12, 20), (20, 12), (16, 16)])
def test_dense_matrix_through_fft_equals_materialize(family, d_out, d_in):
    torch.manual_seed(0)
    matrix = STRUCTURES[family](d_out, d_in, init="random").double()
    weights = torch.randn(d_out, d_in, dtype=torch.float64)
    exact = matrix.materialize()
    exact_grads = torch.autograd.grad((exact * weights).sum(), list(matrix.parameters()))
    with forced_paths("fast"):
        fast = matrix.dense_matrix()
        fast_grads = torch.autograd.grad((fast * weights).sum(), list(matrix.parameters()))
    torch.testing.assert_close(fast, exact)
    for a, b in zip(fast_grads, exact_grads):
        torch.testing.assert_close(a, b)


def test_surm_adapter_dense_path_equals_structured():
    unet = _unet_with(rd.ResTunerConfig("surm_adapter"))
    _assert_paths_agree(unet, _inputs(unet))


# --- padded attention heads --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "keys_batch, n_keys, heads, head_dim, value_dim",
    [(3, 40, 2, 4, 4), (1, 33, 2, 4, 6), (3, 24, 1, 3, 3), (3, 20, 4, 12, 12), (3, 20, 2, 8, 5)],
)
def test_padded_heads_equal_unpadded(keys_batch, n_keys, heads, head_dim, value_dim):
    torch.manual_seed(0)
    q = torch.randn(3, 50, heads * head_dim, dtype=torch.float64, requires_grad=True)
    k = torch.randn(keys_batch, n_keys, heads * head_dim, dtype=torch.float64, requires_grad=True)
    v = torch.randn(keys_batch, n_keys, heads * value_dim, dtype=torch.float64, requires_grad=True)
    assert n_keys > tuner_base.FEW_KEYS  # the SDPA path, the one that pads
    outputs, grads = {}, {}
    for padding in ("off", "on"):
        outputs[padding] = tuner_base.multi_head_attention(q, k, v, heads, padding)
        grads[padding] = torch.autograd.grad(outputs[padding].square().sum(), (q, k, v))
    assert outputs["on"].shape == (3, 50, heads * value_dim)
    torch.testing.assert_close(outputs["on"], outputs["off"])
    for a, b in zip(grads["on"], grads["off"]):
        torch.testing.assert_close(a, b)


def test_res_attn_padded_heads_in_the_unet(monkeypatch):
    unet = _unet_with(rd.ResTunerConfig("res_attn"))
    padded = []
    original = tuner_base.pads_head_dim
    monkeypatch.setattr(tuner_base, "pads_head_dim", lambda *a: padded.append(original(*a)) or padded[-1])
    _assert_paths_agree(unet, _inputs(unet))
    assert True in padded and False in padded  # both paths ran
    tuner = next(m for m in unet.modules() if type(m).__name__ == "ResAttn")
    tuner.head_padding = "sideways"
    with pytest.raises(rd.ConfigError, match="head_padding"):
        unet(**_inputs(unet))


def test_fast_paths_under_autocast_follow_the_reference_in_half_precision():
    """The training recipe (fp32 tuner parameters, bf16 autocast): the fast paths are as close to the fp32
    result as the reference paths are."""
    for name in ("glora", "surm_circulant", "res_attn"):
        unet = _unet_with(rd.ResTunerConfig(name), dtype=torch.float32)
        inputs = _inputs(unet, torch.float32)
        with torch.no_grad():
            exact = unet(**inputs).sample
            results = {}
            for path in ("reference", "fast"):
                with forced_paths(path), torch.autocast("cpu", dtype=torch.bfloat16):
                    results[path] = unet(**inputs).sample.float()
        errors = {path: (out - exact).abs().max().item() for path, out in results.items()}
        scale = exact.abs().max().item()
        assert errors["fast"] <= 2 * errors["reference"] + 1e-2 * scale, (name, errors)


# --- the FFT families' dense matrix keeps nothing for backward (issue 14, third GPU run) -------------------------


def _saved_bytes_of(fn):
    saved = [0]

    def pack(tensor):
        saved[0] += tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn()
    return out, saved[0]


@pytest.mark.parametrize("strided", [True, False])
@pytest.mark.parametrize("family", ["circulant", "toeplitz", "ldr"])
@pytest.mark.parametrize("d_out, d_in", [(24, 40), (40, 24), (17, 17)])
def test_fast_dense_forms_equal_materialize_and_keep_nothing_n_by_n(family, strided, d_out, d_in, monkeypatch):
    """The fast path's dense M -- strided views of the parameters (run 3; LDR since run 4: its strided skew factor
    convolved with g by FFT, with its own backward) or the FFT path on the identity (run 2) -- equals the reference
    ``materialize`` in values and gradients; with ``recompute_dense`` it keeps nothing n x n for backward, and
    recomputing gives the same numbers, bit for bit, as keeping."""
    torch.manual_seed(0)
    matrix = STRUCTURES[family](d_out, d_in, init="random").double()
    monkeypatch.setattr(type(matrix), "use_strided_dense", strided)
    weights = torch.randn(d_out, d_in, dtype=torch.float64)
    results = {}
    for recompute in (False, True):
        matrix.recompute_dense = recompute
        with forced_paths("fast"):
            dense, saved = _saved_bytes_of(matrix.dense_matrix)
        grads = torch.autograd.grad((dense * weights).sum(), list(matrix.parameters()))
        results[recompute] = dense, grads, saved
    n = max(d_out, d_in)
    # LDR's convolution form keeps g's spectrum and its skew factor's n + d_in - 1 diagonals, never anything n x n
    small = 3 * (n + 2) * 8 if strided and family == "ldr" else 0
    assert results[True][2] <= small
    keeps_factors = not strided  # the FFT form's spectra of the identity
    assert (results[False][2] > small) == keeps_factors
    assert torch.equal(results[True][0], results[False][0])
    assert all(torch.equal(a, b) for a, b in zip(results[True][1], results[False][1]))
    exact = matrix.materialize()
    torch.testing.assert_close(results[True][0], exact)
    if strided and family != "ldr":
        assert torch.equal(results[True][0], exact)  # the same entries, copied: no rounding at all
    exact_grads = torch.autograd.grad((exact * weights).sum(), list(matrix.parameters()))
    for fast_grad, exact_grad in zip(results[True][1], exact_grads):
        torch.testing.assert_close(fast_grad, exact_grad)


@pytest.mark.parametrize("n, rows, cols", [(8, 8, 8), (8, 5, 8), (8, 8, 3), (1, 1, 1), (20, 12, 20), (5, 5, 1)])
def test_strided_blocks_gradcheck(n, rows, cols):
    torch.manual_seed(0)
    v = torch.randn(n, dtype=torch.float64, requires_grad=True)
    for block, reference in (
        (structured.circulant_block, structured.circulant_matrix),
        (structured.skew_circulant_block, structured.skew_circulant_matrix),
    ):
        assert torch.equal(block(v, rows, cols), reference(v)[:rows, :cols])
        assert torch.autograd.gradcheck(lambda v, block=block: block(v, rows, cols), (v,))
    t = torch.randn(rows + cols - 1, dtype=torch.float64, requires_grad=True)
    assert torch.equal(structured.toeplitz_block(t.flip(0), rows, cols), structured.toeplitz_matrix(t, rows, cols))
    assert torch.autograd.gradcheck(lambda t: structured.toeplitz_block(t.flip(0), rows, cols), (t,))


@pytest.mark.parametrize("d_out, d_in, rank", [(24, 40, 1), (40, 24, 2), (17, 17, 3), (5, 1, 1), (1, 5, 2), (1, 1, 1)])
def test_ldr_dense_by_fft_is_the_product_of_its_factors_with_exact_gradients(d_out, d_in, rank):
    """LDR's fast dense form (run 4): ``(sum_i circ(g_i) skew(h_i))[:d_out, :d_in]`` by FFT convolution of its
    strided skew factor with g, and a hand-written backward -- against the materialised product, ``gradcheck``."""
    torch.manual_seed(0)
    n = max(d_out, d_in)
    g = torch.randn(rank, n, dtype=torch.float64, requires_grad=True)
    h = torch.randn(rank, n, dtype=torch.float64, requires_grad=True)
    product = sum(structured.circulant_matrix(a) @ structured.skew_circulant_matrix(b) for a, b in zip(g, h))
    torch.testing.assert_close(structured.ldr_dense_by_fft(g, h, d_out, d_in), product[:d_out, :d_in])
    assert torch.autograd.gradcheck(lambda g, h: structured.ldr_dense_by_fft(g, h, d_out, d_in), (g, h))


def test_ldr_fast_dense_form_dispatches_fewer_ops_than_run_3s_matmul(monkeypatch):
    """One forward and backward of SURM-LDR's fast dense delta: the FFT convolution with its own backward (no
    checkpoint, no n x n matmul) dispatches fewer ops than run 3's checkpointed matmul of the strided factors, which
    ``use_strided_matmul`` brings back -- equal values and gradients either way."""
    from benchmarks.perf.common import dispatched_ops

    torch.manual_seed(0)
    matrix = STRUCTURES["ldr"](48, 64, init="random")
    weights = torch.randn(48, 64)
    results = {}
    for matmul in (False, True):
        monkeypatch.setattr(structured.LDRMatrix, "use_strided_matmul", matmul)

        def step(matmul=matmul):
            dense = matrix.dense_matrix()
            results[matmul] = dense, torch.autograd.grad((dense * weights).sum(), list(matrix.parameters()))

        with forced_paths("fast"):
            results[f"ops {matmul}"] = sum(dispatched_ops(step).values())
    assert results["ops False"] < 0.75 * results["ops True"], results
    torch.testing.assert_close(results[False][0], results[True][0])
    for fast_grad, matmul_grad in zip(results[False][1], results[True][1]):
        torch.testing.assert_close(fast_grad, matmul_grad)


def test_ldr_fast_dense_form_compiles_in_one_graph_with_its_backward():
    """``torch.compile(fullgraph=True)`` traces LDR's fast dense form and AOT autograd its hand-written backward
    (what the CUDA training path runs): no graph break, the same gradients as eager."""
    torch.manual_seed(0)
    matrix = STRUCTURES["ldr"](24, 40, init="random", displacement_rank=2)
    weights = torch.randn(24, 40)

    def loss():
        return (matrix.dense_matrix() * weights).sum()

    with forced_paths("fast"):
        eager = torch.autograd.grad(loss(), list(matrix.parameters()))
        compiled_loss = torch.compile(loss, fullgraph=True, backend="aot_eager")
        compiled = torch.autograd.grad(compiled_loss(), list(matrix.parameters()))
    for compiled_grad, eager_grad in zip(compiled, eager):
        torch.testing.assert_close(compiled_grad, eager_grad)


@pytest.mark.parametrize("tuner, strided", [("surm_ldr", True), ("surm_ldr", False), ("surm_kronecker", True)])
def test_surm_ldr_and_kronecker_train_on_the_merged_path_without_per_token_ffts(tuner, strided, monkeypatch):
    """On the fast path (CUDA's choice) a training step of SURM-LDR runs FFTs of at most d_in rows -- its skew
    factor's (the strided form since run 4) or the d_in x n identity's (run 2's form) -- never of the tokens (the
    merged GEMM carries them); Kronecker none; all equal the reference."""
    monkeypatch.setattr(structured.StructuredMatrix, "use_strided_dense", strided)
    unet = _unet_with(rd.ResTunerConfig(tuner))
    inputs = _inputs(unet)
    widest = max(m.in_features for m in unet.modules() if isinstance(m, torch.nn.Linear))
    tokens = inputs["sample"].shape[0] * inputs["sample"].shape[-1] * inputs["sample"].shape[-2]
    assert tokens > widest  # so a per-token FFT would show
    rows_seen = []
    for name in ("fft", "ifft", "rfft", "irfft"):
        original = getattr(torch.fft, name)

        def recording(x, *args, original=original, **kwargs):
            rows_seen.append(x.numel() // max(x.shape[-1], 1))
            return original(x, *args, **kwargs)

        monkeypatch.setattr(torch.fft, name, recording)
    merged = []
    original_merged = LinearBank.merged_forward
    monkeypatch.setattr(LinearBank, "merged_forward", lambda *a: merged.append(1) or original_merged(*a))
    unet.train()
    with forced_paths("fast"):
        out = unet(**inputs).sample
        out.square().sum().backward()
    assert merged
    if tuner == "surm_ldr":
        assert rows_seen and max(rows_seen) <= widest, max(rows_seen)
    else:
        assert not rows_seen
    unet.eval()
    _assert_paths_agree(unet, inputs)


def test_res_attn_self_attention_branch_is_one_qkv_gemm_and_padded_sdpa(monkeypatch):
    """Res-Attn's branch where c = x: q, k and v come out of one GEMM, and on the fast path the attention gets
    heads padded from 4 to 8 channels (the fused kernels' multiple) -- the same output as unpadded."""
    from resattn_diffusion.tuners.res_attn import ResAttn, ResAttnParams

    torch.manual_seed(0)
    tuner = ResAttn(tuner_base.OpShape(32, 32, 32, 32, 4), ResAttnParams()).double()
    torch.nn.init.normal_(tuner.out_proj.weight)
    x = torch.randn(2, 40, 32, dtype=torch.float64)
    linears, head_dims = [], []
    original_linear, original_sdpa = F.linear, F.scaled_dot_product_attention
    monkeypatch.setattr(F, "linear", lambda *a, **k: linears.append(a[1].shape) or original_linear(*a, **k))
    monkeypatch.setattr(
        F,
        "scaled_dot_product_attention",
        lambda q, *a, **k: head_dims.append(q.shape[-1]) or original_sdpa(q, *a, **k),
    )
    outputs = {}
    for path in ("reference", "fast"):
        linears.clear()
        with forced_paths(path), torch.no_grad():
            outputs[path] = tuner(x, None, None)
        assert linears == [torch.Size([24, 32]), torch.Size([32, 8])], linears  # qkv in one GEMM, then W_up
    assert head_dims == [4, 8]
    torch.testing.assert_close(outputs["fast"], outputs["reference"])


def test_skew_modulation_is_a_cached_constant_usable_after_inference_mode():
    """LDR's modulation ``exp(i pi t / n)`` is built once per (n, device, dtype) -- also when first asked for under
    ``inference_mode`` -- and autograd can save it afterwards; the cached value equals a fresh one."""
    from resattn_diffusion.tuners import structured

    n = 37  # a size no other test uses, so the first call below builds it
    structured._SKEW_MODULATIONS.pop((n, torch.device("cpu"), torch.float32), None)
    with torch.inference_mode():
        first = structured._skew_modulation(n, torch.device("cpu"), torch.float32)
    assert not first.is_inference()
    assert structured._skew_modulation(n, torch.device("cpu"), torch.float32) is first
    torch.testing.assert_close(first, structured._build_skew_modulation(n, torch.device("cpu"), torch.float32))
    matrix = STRUCTURES["ldr"](n, n, init="random")
    x = torch.randn(3, n, requires_grad=True)
    matrix.path = "structured"
    matrix(x).sum().backward()  # the cached constant saved for backward
    assert x.grad is not None and matrix.g.grad is not None
