"""Issue 14, host overhead: Res-Attn's lean paths compute what the reference paths compute, and dispatch fewer ops.

* ``packed_multi_head_attention`` (heads viewed out of the packed q|k|v or k|v projection, one pad) equals
  ``multi_head_attention`` on the split tensors, values and gradients, padded or not, few keys or SDPA;
* the extra-heads path of ``ResTunerAttnProcessor`` (sampling: the lone Res-Attn branch as extra heads of the frozen
  attention) equals the reference path on SD1/SD2/SDXL UNets, forced on CPU, at the stored scale and at per-call
  scales, and with gradients (``extra_heads_training``); it is not taken where it would be wrong (gradients by
  default, two branches, dropout, a LoRA wrapper or linear tuner on a projection, forced off) and it follows every
  write to the parameters (nothing about them is cached);
* the op counts the README quotes: the benchmark's counter, and the extra ops per attention of the sampling forward.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from processor_spies import record_extra_heads_calls

import resattn_diffusion as rd
from benchmarks.perf.common import dispatched_ops
from resattn_diffusion.integration.processors import ResTunerAttnProcessor
from resattn_diffusion.testing import frozen_tiny_unet, randomize_tuner, unet_inputs
from resattn_diffusion.tuners import base as tuner_base
from resattn_diffusion.tuners.fast_paths import forced_paths


def _unet(kind: str = "sd1", dtype=torch.float64, **hyper):
    unet = frozen_tiny_unet(kind).to(dtype)
    rd.add_res_tuner(unet, rd.ResTunerConfig("res_attn", **hyper))
    randomize_tuner(unet, "default", std=0.05)
    return unet


def _inputs(unet, dtype=torch.float64):
    def cast(value):
        if isinstance(value, dict):
            return {k: cast(v) for k, v in value.items()}
        return value.to(dtype) if torch.is_tensor(value) and value.is_floating_point() else value

    return cast(unet_inputs(unet, batch_size=2, seed=0))


def _processors(unet) -> list[ResTunerAttnProcessor]:
    return [p for p in unet.attn_processors.values() if isinstance(p, ResTunerAttnProcessor)]


# --- packed projections -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding", ["off", "on"])
@pytest.mark.parametrize(
    "self_attention, keys_batch, n_keys, heads, head_dim",
    [(True, 3, 40, 2, 4), (True, 3, 9, 2, 4), (False, 3, 33, 2, 4), (False, 1, 20, 4, 3), (False, 3, 12, 1, 8)],
)
def test_packed_attention_equals_split_attention(self_attention, keys_batch, n_keys, heads, head_dim, padding):
    torch.manual_seed(0)
    width = heads * head_dim
    n_q = n_keys if self_attention else 17
    if self_attention:
        packed = torch.randn(3, n_q, 3 * width, dtype=torch.float64, requires_grad=True)
        kv = None
        q, k, v = packed.split(width, dim=-1)
        leaves = (packed,)
    else:
        packed = torch.randn(3, n_q, width, dtype=torch.float64, requires_grad=True)
        kv = torch.randn(keys_batch, n_keys, 2 * width, dtype=torch.float64, requires_grad=True)
        q, (k, v) = packed, kv.split(width, dim=-1)
        leaves = (packed, kv)
    packed_out = tuner_base.packed_multi_head_attention(packed, heads, kv, padding)
    split_out = tuner_base.multi_head_attention(q, k, v, heads, padding)
    torch.testing.assert_close(packed_out, split_out, rtol=1e-12, atol=1e-12)
    weights = torch.randn_like(split_out)  # a loss that weighs every output channel differently
    packed_grads = torch.autograd.grad((packed_out * weights).sum(), leaves)
    split_grads = torch.autograd.grad((split_out * weights).sum(), leaves)
    for a, b in zip(packed_grads, split_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(packed_out, tuner_base.multi_head_attention(q, v, k, heads, padding))


def test_packed_padding_is_one_pad_and_no_split(monkeypatch):
    calls = []
    for name in ("pad", "scaled_dot_product_attention"):
        real = getattr(torch.nn.functional, name)
        monkeypatch.setattr(
            torch.nn.functional, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k)
        )
    packed = torch.randn(2, 30, 3 * 8)
    ops = dispatched_ops(lambda: tuner_base.packed_multi_head_attention(packed, 2, None, "on"))
    assert calls == ["pad", "scaled_dot_product_attention"]
    assert "split" not in ops and ops["constant_pad_nd"] == 1


# --- extra heads ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_extra_heads_sampling_equals_the_reference_path(kind, monkeypatch):
    unet = _unet(kind)
    inputs = _inputs(unet)
    rd.set_res_tuner_scale(unet, 0.7)
    taken = record_extra_heads_calls(monkeypatch)
    with torch.no_grad():
        for call_kwargs in ({}, {"cross_attention_kwargs": {rd.SCALE_KWARG: 1.5}}):
            with forced_paths("reference"):
                reference = unet(**inputs, **call_kwargs).sample
            assert taken and not any(taken)
            taken.clear()
            with forced_paths("fast"):
                fast = unet(**inputs, **call_kwargs).sample
            assert taken and all(taken), "the extra-heads path was not taken"
            taken.clear()
            torch.testing.assert_close(fast, reference, rtol=1e-10, atol=1e-10)
        base = frozen_tiny_unet(kind).double()(**inputs).sample
    assert not torch.allclose(fast, base, atol=1e-4)  # the branch changes the output: the check is not vacuous


def test_extra_heads_with_one_head_and_a_wider_branch_head(monkeypatch):
    """heads=1 (a branch head of 8 channels, as wide as the tiny UNet's narrowest frozen heads: no padding) and
    rank 16 in one head: wider than the frozen heads of the first level (8), as wide as those of the second (16); the
    extra-heads form applies only where the branch head fits, the branch path runs elsewhere."""
    taken = record_extra_heads_calls(monkeypatch)
    for hyper in ({"heads": 1}, {"rank": 16, "heads": 1}):
        unet = _unet("sd1", **hyper)
        inputs = _inputs(unet)
        with torch.no_grad():
            with forced_paths("reference"):
                reference = unet(**inputs).sample
            taken.clear()
            with forced_paths("fast"):
                fast = unet(**inputs).sample
        if hyper.get("rank") == 16:
            assert True in taken and False in taken, taken
        else:
            assert taken and all(taken), taken
        torch.testing.assert_close(fast, reference, rtol=1e-10, atol=1e-10)


def test_extra_heads_not_taken_where_it_would_be_wrong(monkeypatch):
    unet = _unet("sd1")
    inputs = _inputs(unet)
    taken = record_extra_heads_calls(monkeypatch)
    with forced_paths("fast"):
        unet(**inputs)  # gradients wanted: the branch path (training)
        assert not any(taken)
        with torch.no_grad():
            rd.set_res_tuner_enabled(unet, False)
            unet(**inputs)  # no branch running: the processor returns the frozen output
            assert not any(taken)
            rd.set_res_tuner_enabled(unet, True)
            for processor in _processors(unet):
                processor.extra_heads = "off"  # per processor, wins over forced_paths
            unet(**inputs)
            assert not any(taken)
            for processor in _processors(unet):
                processor.extra_heads = "sideways"
            with pytest.raises(rd.ConfigError, match="extra_heads='sideways' is not allowed"):
                unet(**inputs)
            for processor in _processors(unet):
                processor.extra_heads = "auto"
            rd.add_res_tuner(unet, rd.ResTunerConfig("res_adapter"), "second")  # two branches
            unet(**inputs)
            assert taken and not any(taken)
    taken.clear()
    with torch.no_grad():  # on CPU, unforced: the reference path
        rd.remove_res_tuner(unet, "second")
        unet(**inputs)
        assert taken and not any(taken)


def test_extra_heads_not_taken_beside_a_peft_lora_or_a_linear_tuner(monkeypatch):
    pytest.importorskip("peft")
    from peft import LoraConfig

    taken = record_extra_heads_calls(monkeypatch)
    unet = _unet("sd1")
    inputs = _inputs(unet)
    with torch.no_grad(), forced_paths("reference"):
        reference = unet(**inputs).sample
    unet.add_adapter(LoraConfig(r=2, target_modules=["to_q"], init_lora_weights="gaussian"))
    for name, parameter in unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.05)
    unet.to(torch.float64)
    with torch.no_grad():
        with forced_paths("reference"):
            with_lora = unet(**inputs).sample
        taken.clear()
        with forced_paths("fast"):
            fast = unet(**inputs).sample
    assert taken and not any(taken)  # to_q is a peft wrapper now: its weight alone is not the projection
    assert not torch.allclose(with_lora, reference, atol=1e-6)
    torch.testing.assert_close(fast, with_lora, rtol=1e-10, atol=1e-10)

    unet = _unet("sd1")
    rd.add_res_tuner(unet, rd.ResTunerConfig("res_lora", targets=["attn1"]), "lora")  # a bank on to_q
    randomize_tuner(unet, "lora", seed=3)
    taken.clear()
    with torch.no_grad():
        with forced_paths("reference"):
            reference = unet(**inputs).sample
        with forced_paths("fast"):
            fast = unet(**inputs).sample
    # attn1's projections carry our linear bank (its forward), attn2's are plain: only attn2 takes extra heads
    assert True in taken and False in taken
    torch.testing.assert_close(fast, reference, rtol=1e-10, atol=1e-10)


def test_extra_heads_follow_parameter_updates_loads_and_dtype(tmp_path):
    unet = _unet("sd1")
    inputs = _inputs(unet)

    def both():
        with torch.no_grad():
            with forced_paths("reference"):
                reference = unet(**inputs).sample
            with forced_paths("fast"):
                fast = unet(**inputs).sample
        torch.testing.assert_close(fast, reference, rtol=1e-10, atol=1e-10)
        return fast

    first = both()
    with torch.no_grad():
        for parameter in rd.res_tuner_parameters(unet):
            parameter.mul_(1.5)  # in place, as an optimizer step does
    second = both()
    assert not torch.allclose(first, second, atol=1e-6)
    originals = [parameter.detach().clone() for parameter in rd.res_tuner_parameters(unet)]
    for parameter in rd.res_tuner_parameters(unet):  # through .data, as diffusers' EMAModel.copy_to: no version bump
        parameter.data.copy_(parameter.data * 0.5)
    assert not torch.allclose(both(), second, atol=1e-6)
    for parameter, original in zip(rd.res_tuner_parameters(unet), originals):
        parameter.data.copy_(original)
    torch.testing.assert_close(both(), second, rtol=1e-10, atol=1e-10)
    path = tmp_path / "tuner.safetensors"
    rd.save_res_tuner(unet, path)
    randomize_tuner(unet, "default", seed=7)
    third = both()
    assert not torch.allclose(third, second, atol=1e-6)
    rd.remove_res_tuner(unet)
    rd.load_res_tuner(unet, path)
    torch.testing.assert_close(both(), second, rtol=1e-10, atol=1e-10)
    unet.to(torch.float32)
    with torch.no_grad(), forced_paths("fast"):
        assert unet(**_inputs(unet, torch.float32)).sample.dtype == torch.float32


def test_extra_heads_under_inference_mode_then_no_grad():
    unet = _unet("sd1")
    inputs = _inputs(unet)
    with forced_paths("fast"):
        with torch.inference_mode():
            first = unet(**inputs).sample.clone()
        with torch.no_grad():
            second = unet(**inputs).sample
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_sampling_ops_per_attention():
    """What the README quotes, on the tiny SD1 UNet (8 attentions): on the CUDA paths a sampling forward with Res-Attn
    dispatches fewer ops than the base (one concatenated weight and one GEMM per input of each attention: x in
    self-attention, x and c in cross-attention; the branch's padded rows from three small matmuls, no pads); on the
    CPU reference path more (the branch is separate)."""
    base = frozen_tiny_unet("sd1")
    unet = _unet("sd1", dtype=torch.float32)
    inputs = _inputs(unet, torch.float32)

    def forward(model):
        def call():
            with torch.no_grad():
                model(**inputs)

        return call

    forward(unet)()
    base_counts = dispatched_ops(forward(base))
    reference_ops = dispatched_ops(forward(unet))
    with forced_paths("fast"):
        forward(unet)()  # builds the cached extra heads once
        fast_ops = dispatched_ops(forward(unet))
    attentions = len(_processors(unet))
    assert attentions == 8
    assert sum(fast_ops.values()) < sum(base_counts.values()) < sum(reference_ops.values())
    # one concatenated weight per GEMM: attn1 [q|k|v] and the output, attn2 q, [k|v] and the output
    assert fast_ops["cat"] - base_counts["cat"] == attentions // 2 * (2 + 3)
    # GEMMs: attn1 saves 2 of the frozen ones, attn2 1; each attention forms its branch rows in 3 small matmuls
    gemms = base_counts["mm"] + base_counts["addmm"] - attentions // 2 * (2 + 1) + 3 * attentions
    assert fast_ops["mm"] + fast_ops["addmm"] == gemms
    assert "constant_pad_nd" not in fast_ops


def test_sampling_under_compile_has_no_graph_breaks_on_the_fast_paths():
    """Under ``torch.compile`` the extra-heads path steps aside (the compiler removes the launches anyway): a
    ``no_grad`` forward with the fast paths forced traces without graph breaks, also with the path forced on."""
    from benchmarks.perf.compile_breaks import compile_unet, count_graph_breaks

    unet = compile_unet(["res_attn"], tiny=True)
    unet.eval()
    inputs = unet_inputs(unet, batch_size=2, seed=0)
    with torch.no_grad(), forced_paths("fast"):
        assert count_graph_breaks(unet, inputs)["breaks"] == 0
        for processor in _processors(unet):
            processor.extra_heads = "on"
        assert count_graph_breaks(unet, inputs)["breaks"] == 0


def test_extra_heads_compiled_when_asked_one_sdpa_per_attention_and_the_same_output(monkeypatch):
    """``extra_heads_compiled`` (per processor; off by default) keeps the extra heads while ``torch.compile``
    traces: one SDPA per attention instead of a second one for the branch; traced in one graph, the compiled forward
    equals the eager reference path."""
    import torch._dynamo

    unet = _unet(dtype=torch.float32)
    unet.eval()
    inputs = _inputs(unet, torch.float32)
    processors = _processors(unet)
    with torch.no_grad(), forced_paths("reference"):
        expected = unet(**inputs).sample

    def sdpa_in_graph() -> tuple[int, torch.Tensor]:
        graphs = []

        def recording(graph_module, example_inputs):
            graphs.append(graph_module)
            return graph_module.forward

        torch._dynamo.reset()
        with torch.no_grad(), forced_paths("fast"), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = torch.compile(unet, backend=recording, fullgraph=True)(**inputs).sample
        torch._dynamo.reset()
        # the per-call scale's positional look-up is traced as a function, not through its cache (dynamo warns then)
        assert not [w for w in caught if "lru_cache" in str(w.message)], [str(w.message) for w in caught]
        sdpa = torch.nn.functional.scaled_dot_product_attention
        return sum(node.target is sdpa for graph in graphs for node in graph.graph.nodes), out

    assert ResTunerAttnProcessor.extra_heads_compiled is False  # the class default
    for processor in processors:
        processor.extra_heads_compiled = True
    sdpa_count, out = sdpa_in_graph()
    assert sdpa_count == len(processors)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    # Off (the default), traced code runs the branch beside the frozen attention. Checked in eager with tracing
    # pretended: a second trace would take seconds.
    calls = record_extra_heads_calls(monkeypatch)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    for compiled_heads in (True, False):
        for processor in processors:
            processor.extra_heads_compiled = compiled_heads
        calls.clear()
        with torch.no_grad(), forced_paths("fast"):
            unet(**inputs)
        assert len(calls) == len(processors) and all(taken == compiled_heads for taken in calls), calls


@pytest.fixture
def extra_heads_in_training():
    ResTunerAttnProcessor.extra_heads_training = True
    yield
    ResTunerAttnProcessor.extra_heads_training = False


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_extra_heads_in_training_equal_the_reference_outputs_and_gradients(kind, extra_heads_in_training, monkeypatch):
    """With ``extra_heads_training`` the training forward runs the extra heads too: the output and the gradients of
    every tuner parameter (and of the input latents) equal the reference path's, at a scale that is not 1."""
    unet = _unet(kind)
    rd.set_res_tuner_scale(unet, 0.6)
    inputs = _inputs(unet)
    parameters = rd.res_tuner_parameters(unet)
    taken = record_extra_heads_calls(monkeypatch)
    results = {}
    for path in ("reference", "fast"):
        taken.clear()
        sample = inputs["sample"].clone().requires_grad_(True)
        with forced_paths(path):
            out = unet(**dict(inputs, sample=sample)).sample
        grads = torch.autograd.grad(
            (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), [sample, *parameters]
        )
        results[path] = (out, grads)
        assert taken and all(taken) == (path == "fast") and any(taken) == (path == "fast")
    torch.testing.assert_close(results["fast"][0], results["reference"][0], rtol=1e-10, atol=1e-10)
    for fast, reference in zip(results["fast"][1], results["reference"][1]):
        torch.testing.assert_close(fast, reference, rtol=1e-9, atol=1e-10)
    assert all(grad.abs().sum() > 0 for grad in results["fast"][1])


def test_extra_heads_in_training_under_autocast_and_dropout(extra_heads_in_training, monkeypatch):
    """The training recipe (fp32 tuner parameters beside bf16 autocast) keeps the parameters' gradients in fp32 and
    close to the reference path's; dropout while training leaves the extra-heads form (the branch path runs)."""
    unet = _unet("sd1", dtype=torch.float32)
    inputs = _inputs(unet, torch.float32)
    parameters = rd.res_tuner_parameters(unet)
    grads = {}
    for path in ("reference", "fast"):
        with forced_paths(path), torch.autocast("cpu", dtype=torch.bfloat16):
            out = unet(**inputs).sample
        grads[path] = torch.autograd.grad(out.float().square().sum(), parameters)
    for fast, reference in zip(grads["fast"], grads["reference"]):
        assert fast.dtype == torch.float32
        torch.testing.assert_close(fast, reference, rtol=0.1, atol=0.1 * reference.abs().max().item())
    unet = _unet("sd1", dtype=torch.float32, dropout=0.1)
    unet.train()
    taken = record_extra_heads_calls(monkeypatch)
    with forced_paths("fast"):
        unet(**_inputs(unet, torch.float32))
    assert taken and not any(taken)


def test_extra_heads_not_taken_with_an_attention_mask(monkeypatch):
    """With a mask (here (B, N_k), as diffusers' processors also take it) the branch path runs, masking the keys the
    frozen attention masks (tests/test_reference_processor.py checks that against a hand computation)."""
    unet = _unet("sd1")
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    x = torch.randn(2, 5, attn.to_q.in_features, dtype=torch.float64)
    c = torch.randn(2, 7, attn.to_k.in_features, dtype=torch.float64)
    mask = torch.zeros(2, 7, dtype=torch.float64)
    mask[:, -2:] = -1e4
    taken = record_extra_heads_calls(monkeypatch)
    with torch.no_grad():
        with forced_paths("reference"):
            reference = attn(x, c, attention_mask=mask)
        with forced_paths("fast"):
            fast = attn(x, c, attention_mask=mask)
            unmasked = attn(x, c)
    assert taken == [True]  # only the unmasked call
    torch.testing.assert_close(fast, reference, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(unmasked, reference, atol=1e-6)
