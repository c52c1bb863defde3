"""The core contract of every tuner on the SD1-, SD2- and SDXL-like tiny UNets (issue 2) and on the tiny SD3, SD3.5 and
Flux transformers (issue 17): one test, parametrised over model families."""

from __future__ import annotations

import functools

import pytest
import torch

import resattn_diffusion as rd
from resattn_diffusion.integration.families import family_of
from resattn_diffusion.testing import (
    TRANSFORMER_KINDS,
    frozen_tiny_model,
    model_inputs,
    present_targets,
    unet_inputs,
)
from resattn_diffusion.testing import (
    frozen_tiny_unet as _frozen_unet,
)

KINDS = ("sd1", "sd2", "sdxl")
LAYER_TUNERS = [n for n in rd.tuner_names() if rd.get_tuner_spec(n).kind != "model"]


@functools.cache
def _family(kind):
    return family_of(frozen_tiny_model(kind))


# Read-only facts of the frozen tiny model of each kind, computed once per process: a deep copy of the model costs
# about a third of a contract test, so the tests do not make one just to read these.
@functools.cache
def _frozen_processor_types(kind):
    return {k: type(v) for k, v in frozen_tiny_model(kind).attn_processors.items()}


@functools.cache
def _frozen_output(kind):
    """The frozen model's output on the contract's inputs (never mutated: callers compare against it)."""
    model = frozen_tiny_model(kind)
    with torch.no_grad():
        return _run(model, model_inputs(model, batch_size=2, seed=1))


# Every tuner x placement x target runs on sd1 (conv projections, UNet blocks) and Flux (joint and single blocks, the
# most targets). On sd2, SDXL, SD3 and SD3.5 the other cases run no line or branch of the library that these do not
# (coverage run --branch with per-test contexts over resattn_diffusion/, pipelines/, benchmarks/ and the training
# scripts), so there the contract runs where those families differ in shape only: the attention-side tuners
# (heads per block, context width, joint attention) in parallel on the attention targets, and res_lora on every
# target.
FULL_KINDS = ("sd1", "flux")
ATTENTION_TARGETS = ("attn1", "attn2", "attn")


def _shape_case(tuner, placement, target):
    """Whether an sd2 / SDXL / SD3 / SD3.5 case is one of the shape checks kept beside sd1 and Flux."""
    if tuner == "res_lora":
        return placement == "parallel"
    return rd.get_tuner_spec(tuner).kind == "operation" and placement == "parallel" and target in ATTENTION_TARGETS


def _cases():
    for kind in KINDS + TRANSFORMER_KINDS:
        targets = present_targets(frozen_tiny_model(kind))  # once per kind: each call deep-copies the model
        for tuner in LAYER_TUNERS:
            spec = rd.get_tuner_spec(tuner)
            placements = (
                ("parallel", "sequential") if getattr(spec.module_cls, "supports_sequential", True) else ("parallel",)
            )
            for placement in placements:
                for target in targets:
                    if target in ("ff", "ff_context") and getattr(spec.module_cls, "needs_frozen_attention", False):
                        continue
                    if target in ("proj_mlp", "proj_out") and spec.kind != "linear":
                        continue  # single linears of Flux: linear tuners only (refusal tested in test_transformers)
                    if kind in FULL_KINDS or _shape_case(tuner, placement, target):
                        yield kind, tuner, placement, target


def _run(unet, inputs, **kwargs):
    return unet(**inputs, **kwargs).sample


@pytest.mark.parametrize("kind,tuner,placement,target", list(_cases()))
def test_tuner_contract(kind, tuner, placement, target, tmp_path):
    unet = frozen_tiny_model(kind)
    inputs = model_inputs(unet, batch_size=2, seed=1)
    call_kwargs = _family(kind).call_kwargs  # cross_attention_kwargs (UNet) / joint_attention_kwargs (SD3, Flux)
    reference = _frozen_output(kind)

    config = rd.ResTunerConfig(tuner=tuner, placement=placement, targets=[target])
    layers = rd.add_res_tuner(unet, config)
    assert layers and all(f".{target}" in p for p in layers)

    # exact no-op at init
    out = _run(unet, inputs)
    assert torch.equal(out, reference)

    # only tuner parameters get gradients, and the zero-initialised factor gets a non-zero one
    out.float().pow(2).mean().backward()
    tuner_params = {id(p) for p in rd.res_tuner_parameters(unet)}
    for name, param in unet.named_parameters():
        if id(param) not in tuner_params:
            assert param.grad is None, name
    grads = [p.grad for p in rd.res_tuner_parameters(unet)]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)

    # one optimizer step changes the output
    optimizer = torch.optim.Adam(rd.res_tuner_parameters(unet), lr=1e-2)
    optimizer.step()
    optimizer.zero_grad()
    with torch.no_grad():
        tuned = _run(unet, inputs)
        assert not torch.allclose(tuned, reference)
        # after a second step every trainable factor has moved off its init (all factors learn)
        out = _run(unet, inputs)
    with torch.enable_grad():
        _run(unet, inputs).float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in rd.res_tuner_parameters(unet))
    optimizer.zero_grad()

    with torch.no_grad():
        # scale 0, per call and set on the tuner, gives the frozen output exactly
        assert torch.equal(_run(unet, inputs, **{call_kwargs: {rd.SCALE_KWARG: 0.0}}), reference)
        rd.set_res_tuner_scale(unet, 0.0)
        assert torch.equal(_run(unet, inputs), reference)
        rd.set_res_tuner_scale(unet, 1.0)
        assert torch.equal(_run(unet, inputs), tuned)

        # save -> load into a freshly built UNet gives identical outputs
        path = rd.save_res_tuner(unet, tmp_path / "tuner.safetensors")
        fresh = frozen_tiny_model(kind)
        rd.load_res_tuner(fresh, path)
        assert torch.equal(_run(fresh, inputs), tuned)

        # removing restores the original processors and outputs exactly
        rd.remove_res_tuner(unet)
        assert torch.equal(_run(unet, inputs), reference)
        assert {k: type(v) for k, v in unet.attn_processors.items()} == _frozen_processor_types(kind)
        assert not any("res_tuner" in n or ".bank." in n for n, _ in unet.named_parameters())


def test_prefix_and_prompt_refuse_ff():
    for tuner in ("res_prefix", "res_prompt"):
        with pytest.raises(rd.ConfigError, match="ff"):
            rd.ResTunerConfig(tuner=tuner, targets=["ff"])


def test_blocks_pattern_selects_only_up_blocks():
    unet = _frozen_unet("sd1")
    layers = rd.add_res_tuner(unet, rd.ResTunerConfig(blocks=["up_blocks.*"]))
    assert layers and all(p.startswith("up_blocks.") for p in layers)


def test_pattern_matching_no_layer_is_an_error_and_changes_nothing():
    unet = _frozen_unet("sd1")
    with pytest.raises(rd.ConfigError, match="matches no transformer block"):
        rd.add_res_tuner(unet, rd.ResTunerConfig(blocks=["up_blocks.7"]))
    assert rd.get_res_tuner_configs(unet) == {}
    assert all(type(p).__name__ != "ResTunerAttnProcessor" for p in unet.attn_processors.values())


def test_several_named_tuners_with_their_own_scales():
    unet = _frozen_unet("sd1")
    inputs = unet_inputs(unet, batch_size=2, seed=3)
    rd.add_res_tuner(unet, rd.ResTunerConfig(tuner="res_attn"), adapter_name="a")
    rd.add_res_tuner(unet, rd.ResTunerConfig(tuner="res_adapter", targets=["ff", "attn1"]), adapter_name="b")
    with torch.no_grad():
        for p in rd.res_tuner_parameters(unet):
            p.add_(0.05 * torch.randn_like(p))
        base = _run(unet, inputs, cross_attention_kwargs={rd.SCALE_KWARG: 0.0})
        only_a = _run(unet, inputs, cross_attention_kwargs={rd.SCALE_KWARG: {"a": 1.0, "b": 0.0}})
        only_b = _run(unet, inputs, cross_attention_kwargs={rd.SCALE_KWARG: {"a": 0.0, "b": 1.0}})
        both = _run(unet, inputs)
        assert not torch.allclose(only_a, base) and not torch.allclose(only_b, base)
        assert not torch.allclose(both, only_a)
        rd.set_res_tuner_scale(unet, 0.0, adapter_name="b")
        torch.testing.assert_close(_run(unet, inputs), only_a, rtol=0, atol=0)
        rd.set_res_tuner_enabled(unet, False, adapter_name="a")
        assert torch.equal(_run(unet, inputs), base)
        rd.set_res_tuner_enabled(unet, True)
        rd.remove_res_tuner(unet, "a")
        assert set(rd.get_res_tuner_configs(unet)) == {"b"}
        with pytest.raises(rd.ResTunerError, match="already"):
            rd.add_res_tuner(unet, rd.ResTunerConfig(), adapter_name="b")
        with pytest.raises(rd.ResTunerError, match="no tuner named"):
            rd.remove_res_tuner(unet, "a")


def test_tuners_survive_diffusers_replacing_processors():
    from diffusers.models.attention_processor import AttnProcessor2_0, XFormersAttnProcessor

    unet = _frozen_unet("sd2")
    inputs = unet_inputs(unet, batch_size=2, seed=4)
    rd.add_res_tuner(unet, rd.ResTunerConfig(tuner="res_attn"))
    with torch.no_grad():
        for p in rd.res_tuner_parameters(unet):
            p.add_(0.05 * torch.randn_like(p))
        tuned = _run(unet, inputs)
        unet.set_attention_slice(1)  # sliced attention: our processor now wraps diffusers' SlicedAttnProcessor
        torch.testing.assert_close(_run(unet, inputs), tuned, rtol=1e-5, atol=1e-6)
        unet.set_default_attn_processor()  # diffusers' classic AttnProcessor (baddbmm): equal up to rounding
        torch.testing.assert_close(_run(unet, inputs), tuned, rtol=1e-5, atol=1e-6)
        # what enable_xformers_memory_efficient_attention installs (it needs CUDA to run, so we only install it)
        unet.set_attn_processor(XFormersAttnProcessor())
        procs = [p for p in unet.attn_processors.values() if isinstance(p, rd.ResTunerAttnProcessor)]
        assert procs and all(isinstance(p.base_processor, XFormersAttnProcessor) for p in procs)
        unet.set_attn_processor(AttnProcessor2_0())
        assert torch.equal(_run(unet, inputs), tuned)
        rd.remove_res_tuner(unet)
        assert all(type(p) is AttnProcessor2_0 for p in unet.attn_processors.values())


def test_peft_lora_works_beside_our_tuner():
    from peft import LoraConfig

    unet = _frozen_unet("sd1")
    inputs = unet_inputs(unet, batch_size=2, seed=5)
    unet.add_adapter(
        LoraConfig(
            r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"]
        )
    )
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.add_(0.05 * torch.randn_like(p))
        lora_only = _run(unet, inputs)
    rd.add_res_tuner(unet, rd.ResTunerConfig(tuner="res_lora"))  # hooks on the same projections peft wrapped
    rd.add_res_tuner(unet, rd.ResTunerConfig(tuner="res_attn"), adapter_name="attn")
    out = _run(unet, inputs)
    assert torch.equal(out, lora_only)
    out.pow(2).mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in rd.res_tuner_parameters(unet))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in unet.named_parameters() if "lora_B" in n)
    rd.remove_res_tuner(unet)
    with torch.no_grad():
        assert torch.equal(_run(unet, inputs), lora_only)


def test_summary_counts_match_the_formulas():
    unet = _frozen_unet("sd1")
    rd.add_res_tuner(unet, rd.ResTunerConfig(tuner="res_attn", rank=8, heads=2, targets=["attn2"]))
    expected = 0
    for _, block in rd.integration.api.transformer_blocks(unet):
        a = block.attn2
        d, dc, dout = a.to_q.in_features, a.to_k.in_features, a.to_out[0].out_features
        expected += 8 * (d + 2 * dc + dout)
    summary = rd.res_tuner_summary(unet)
    assert summary["tuners"]["default"]["parameters"] == expected
    assert summary["unet_parameters"] == sum(p.numel() for p in _frozen_unet("sd1").parameters())
    assert "res_attn" in rd.format_summary(summary)


def test_fp16_weights_run_a_forward_on_cpu():
    unet = _frozen_unet("sd1").to(torch.float16)
    inputs = {
        k: (v.half() if torch.is_tensor(v) and v.is_floating_point() else v)
        for k, v in unet_inputs(unet, 1, 0).items()
    }
    with torch.no_grad():
        reference = _run(unet, inputs)
        rd.add_res_tuner(unet, rd.ResTunerConfig(tuner="res_attn"))
        assert all(p.dtype == torch.float16 for p in rd.res_tuner_parameters(unet))
        assert torch.equal(_run(unet, inputs), reference)


def test_bf16_autocast_training_step_on_cpu():
    unet = _frozen_unet("sdxl")
    inputs = unet_inputs(unet, batch_size=2, seed=6)
    rd.add_res_tuner(unet, rd.ResTunerConfig(tuner="res_attn", targets=["attn1", "attn2", "ff"]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _run(unet, inputs)
    out.float().pow(2).mean().backward()
    assert all(p.dtype == torch.float32 for p in rd.res_tuner_parameters(unet))
    assert any(
        p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
        for p in rd.res_tuner_parameters(unet)
    )


def test_scale_and_enable_refusals_change_no_tuner():
    unet = _frozen_unet("sd1")
    rd.add_res_tuner(unet, rd.ResTunerConfig(tuner="res_attn"), adapter_name="attn")
    rd.add_res_tuner(unet, rd.ResTunerConfig(tuner="res_lora"), adapter_name="lora")
    rd.fuse_res_tuner(unet, "lora")
    for change in (lambda: rd.set_res_tuner_scale(unet, 0.5), lambda: rd.set_res_tuner_enabled(unet, False)):
        with pytest.raises(rd.ResTunerError, match="'lora' is fused"):
            change()
        status = rd.integration.api.res_tuner_settings(unet)
        assert status["attn"] == {"scale": 1.0, "enabled": True, "fused": False}  # the unfused one is untouched too
        assert rd.get_res_tuner_configs(unet)["attn"].scale == 1.0


def test_branches_get_the_normalised_context_on_both_processor_paths():
    """With cross_attention_norm the context is normalised once, in the frozen attention, and the branches reuse it;
    the wrapped path (any other processor) must hand them the same context."""
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    from resattn_diffusion.integration.processors import ResTunerAttnProcessor
    from resattn_diffusion.tuners.res_attn import ResAttn, ResAttnParams

    attn = Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8, cross_attention_norm="layer_norm")
    tuner = ResAttn(rd.integration.api.attention_shape(attn), ResAttnParams(rank=4, heads=2))
    torch.nn.init.normal_(tuner.out_proj.weight)
    x, context = torch.randn(2, 5, 16), 3 * torch.randn(2, 7, 12) + 1
    outputs = []
    for base in (AttnProcessor2_0(), AttnProcessor()):
        processor = ResTunerAttnProcessor(base, "attn")
        processor.bank.add("t", tuner, 1.0, "parallel")
        assert processor.backend == ("sdpa" if isinstance(base, AttnProcessor2_0) else "wrapped")
        with torch.no_grad():
            outputs.append(processor(attn, x, context) - base(attn, x, context))  # the branch alone
    expected = tuner(x, attn.norm_encoder_hidden_states(context), None)
    torch.testing.assert_close(outputs[0], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outputs[1], expected, rtol=1e-5, atol=1e-6)
