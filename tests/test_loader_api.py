"""The rest of the loader: hotswap (no recompile), state dicts, save from the pipeline, safe fusing, unfusing one
tuner, per-block weights, and the mixin on inpainting, ControlNet and AutoPipeline."""

from __future__ import annotations

import pytest
import torch

from pipelines import (
    ResTunerAutoPipelineForInpainting,
    ResTunerAutoPipelineForText2Image,
    ResTunerStableDiffusionControlNetPipeline,
    ResTunerStableDiffusionInpaintPipeline,
    ResTunerStableDiffusionPipeline,
    ResTunerStableDiffusionXLControlNetPipeline,
    ResTunerStableDiffusionXLInpaintPipeline,
    ResTunerStableDiffusionXLPipeline,
    with_res_tuners,
)
from resattn_diffusion import ResTunerConfig, ResTunerError, ResTunerFileError, add_res_tuner, save_res_tuner
from resattn_diffusion.testing import frozen_tiny_unet, randomize_tuner, save_tiny_pipeline, tiny_pipeline, unet_inputs

LORA = ResTunerConfig(tuner="res_lora", targets=("attn1", "attn2"))


def _tuner_file(tmp_path, name, config=LORA, seed=0, kind="sd1"):
    unet = frozen_tiny_unet(kind)
    add_res_tuner(unet, config)
    randomize_tuner(unet, seed=seed, std=0.2)
    return save_res_tuner(unet, tmp_path / f"{name}.safetensors")


def _pipe(kind="sd1", cls=None):
    stock = tiny_pipeline(kind)
    cls = cls or (ResTunerStableDiffusionXLPipeline if kind == "sdxl" else ResTunerStableDiffusionPipeline)
    pipe = cls(**stock.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe, **kwargs):
    return pipe(
        "a photo", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np", **kwargs
    ).images


def _unet_out(unet):
    with torch.no_grad():
        return unet(**unet_inputs(unet)).sample


# --- hotswap ---------------------------------------------------------------------------------------------------
def test_hotswap_under_torch_compile_does_not_recompile(tmp_path):
    from resattn_diffusion import load_res_tuner

    first, second = _tuner_file(tmp_path, "a", seed=1), _tuner_file(tmp_path, "b", seed=2)
    unet = frozen_tiny_unet("sd1")
    load_res_tuner(unet, first, adapter_name="style")
    # One transformer block holds tuners on attn1 and attn2 and compiles in a second; the whole UNet takes ~40 s.
    block = unet.down_blocks[0].attentions[0].transformer_blocks[0]
    width = block.attn1.to_q.in_features
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 16, width, generator=generator)
    context = torch.randn(2, 7, block.attn2.to_k.in_features, generator=generator)
    compilations = []

    def counting_backend(graph_module, example_inputs):  # each (re)compilation of a frame calls the backend
        compilations.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    try:
        compiled = torch.compile(block, backend=counting_backend)
        with torch.no_grad():
            before = compiled(hidden, encoder_hidden_states=context)
            compiled(hidden, encoder_hidden_states=context)
            compiled_once = len(compilations)
            load_res_tuner(unet, second, adapter_name="style", hotswap=True)
            after = compiled(hidden, encoder_hidden_states=context)
            eager = block(hidden, encoder_hidden_states=context)
    finally:
        torch._dynamo.reset()
    assert compiled_once > 0 and len(compilations) == compiled_once  # 0 recompiles
    assert not torch.allclose(before, after)  # the compiled block runs the new weights
    reference = frozen_tiny_unet("sd1")
    load_res_tuner(reference, second, adapter_name="style")
    with torch.no_grad():
        expected = reference.down_blocks[0].attentions[0].transformer_blocks[0](hidden, encoder_hidden_states=context)
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(eager, expected, rtol=1e-5, atol=1e-6)


def test_hotswap_refuses_a_mismatched_file_before_changing_anything(tmp_path):
    pipe = _pipe()
    pipe.load_res_tuner(_tuner_file(tmp_path, "a"), adapter_name="style")
    before = _unet_out(pipe.unet)
    other_rank = _tuner_file(tmp_path, "r8", ResTunerConfig(tuner="res_lora", targets=("attn1", "attn2"), rank=8))
    other_tuner = _tuner_file(tmp_path, "attn", ResTunerConfig(tuner="res_attn"))
    for bad, match in ((other_rank, "rank"), (other_tuner, "tuner")):
        with pytest.raises(ResTunerFileError, match=match):
            pipe.load_res_tuner(bad, adapter_name="style", hotswap=True)
    with pytest.raises(ResTunerError, match="none is named 'other'"):
        pipe.load_res_tuner(other_rank, adapter_name="other", hotswap=True)
    broken = {k: v for k, v in pipe.res_tuner_state_dict("style").items()}
    broken[next(iter(broken))] = torch.full_like(next(iter(broken.values())), float("nan"))
    with pytest.raises(ResTunerFileError, match="NaN"):
        pipe.load_res_tuner(broken, adapter_name="style", hotswap=True)
    torch.testing.assert_close(_unet_out(pipe.unet), before, rtol=0, atol=0)


# --- state dicts and saving from the pipeline -------------------------------------------------------------------
def test_state_dict_round_trip_and_pipeline_save(tmp_path):
    pipe = _pipe()
    pipe.load_res_tuner(_tuner_file(tmp_path, "a"), adapter_name="style")
    expected = _unet_out(pipe.unet)
    state = pipe.res_tuner_state_dict("style")
    config = pipe.get_res_tuners()["style"]["config"]
    saved = pipe.save_res_tuner(tmp_path / "out", adapter_name="style")
    assert saved.name == "res_tuner.safetensors"
    pipe.unload_res_tuner()
    with pytest.raises(ResTunerFileError, match="config="):
        pipe.load_res_tuner(state, adapter_name="style")
    pipe.load_res_tuner(state, adapter_name="style", config=config)
    torch.testing.assert_close(_unet_out(pipe.unet), expected, rtol=0, atol=0)
    pipe.unload_res_tuner()
    pipe.load_res_tuner(tmp_path / "out")
    torch.testing.assert_close(_unet_out(pipe.unet), expected, rtol=0, atol=0)
    with pytest.raises(ResTunerError, match="no tuner named 'missing'"):
        pipe.save_res_tuner(tmp_path / "x.safetensors", adapter_name="missing")


# --- fusing ----------------------------------------------------------------------------------------------------
def test_safe_fusing_refuses_non_finite_weights_and_changes_nothing(tmp_path):
    pipe = _pipe()
    pipe.load_res_tuner(_tuner_file(tmp_path, "a"), adapter_name="style")
    from resattn_diffusion import res_tuner_parameters

    diverged = res_tuner_parameters(pipe.unet, "style")[-1]
    saved = diverged.detach().clone()
    with torch.no_grad():
        diverged[0] = float("inf")  # a tuner that diverged in memory
    weights = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with pytest.raises(ResTunerError, match="NaN or inf"):
        pipe.fuse_res_tuner("style", safe_fusing=True)
    assert not pipe.get_res_tuners()["style"]["fused"]
    assert all(torch.equal(weights[k], v) for k, v in pipe.unet.state_dict().items())
    with torch.no_grad():
        diverged.copy_(saved)
    pipe.fuse_res_tuner("style", safe_fusing=True)
    assert pipe.get_res_tuners()["style"]["fused"]


def test_unfusing_one_named_tuner_keeps_the_other_fused(tmp_path):
    pipe = _pipe()
    pipe.load_res_tuner(_tuner_file(tmp_path, "a", seed=1), adapter_name="a")
    pipe.load_res_tuner(_tuner_file(tmp_path, "b", seed=2), adapter_name="b")
    both = _unet_out(pipe.unet)
    pipe.fuse_res_tuner(["a", "b"])
    pipe.unfuse_res_tuner("a")
    status = pipe.get_res_tuners()
    assert not status["a"]["fused"] and status["b"]["fused"]
    torch.testing.assert_close(_unet_out(pipe.unet), both, rtol=1e-4, atol=1e-5)
    pipe.unfuse_res_tuner()
    pipe.unload_res_tuner("b")
    only_a = _unet_out(pipe.unet)
    pipe.unload_res_tuner()
    fresh = _pipe()
    fresh.load_res_tuner(_tuner_file(tmp_path, "a", seed=1), adapter_name="a")
    torch.testing.assert_close(only_a, _unet_out(fresh.unet), rtol=0, atol=0)


def test_unloading_several_names_is_all_or_nothing(tmp_path):
    # "a" unfused, "b" fused over a weight someone edited afterwards: unfusing "b" is refused, so "a" must stay too
    pipe = _pipe()
    pipe.load_res_tuner(_tuner_file(tmp_path, "a", seed=1), adapter_name="a")
    pipe.load_res_tuner(_tuner_file(tmp_path, "b", seed=2), adapter_name="b")
    pipe.fuse_res_tuner("b")
    linear = pipe.unet.get_submodule(next(p for p, _ in pipe.unet.named_modules() if p.endswith("attn1.to_q")))
    with torch.no_grad():
        linear.weight[0, 0] += 0.5
    before = _unet_out(pipe.unet)
    for names in (["a", "b"], ["b", "a"], ["a", "missing"]):
        with pytest.raises(ResTunerError, match="accept_changed_weights|no tuner named 'missing'"):
            pipe.unload_res_tuner(names)
        assert sorted(pipe.get_res_tuners()) == ["a", "b"] and pipe.get_res_tuners()["b"]["fused"]
        torch.testing.assert_close(_unet_out(pipe.unet), before, rtol=0, atol=0)
    pipe.unload_res_tuner(["a", "a"])  # a repeated name is removed once
    assert list(pipe.get_res_tuners()) == ["b"]


# --- per-block weights ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_per_block_weights_match_the_same_scales_set_by_hand(kind, tmp_path):
    pipe = _pipe(kind)
    pipe.load_res_tuner(_tuner_file(tmp_path, "a", kind=kind), adapter_name="style")
    pipe.set_res_tuners("style", {"down": 0.0, "mid": 0.0, "up": 0.0})
    zero = _unet_out(pipe.unet)
    pipe.disable_res_tuner()
    torch.testing.assert_close(zero, _unet_out(pipe.unet), rtol=0, atol=0)
    pipe.set_res_tuners("style", {"down": 0.0, "mid": 0.0})  # up blocks at the default 1.0
    up_only = _unet_out(pipe.unet)
    hand = _pipe(kind)
    hand.load_res_tuner(_tuner_file(tmp_path, "a", kind=kind), adapter_name="style")
    from resattn_diffusion.integration.api import set_res_tuner_layer_scales

    set_res_tuner_layer_scales(hand.unet, "style", {"down_blocks": 0.0, "mid_block": 0.0})
    torch.testing.assert_close(up_only, _unet_out(hand.unet), rtol=0, atol=0)
    with pytest.raises(ValueError, match="per-block scales .* unknown key"):
        pipe.set_res_tuners("style", {"sideways": 1.0})
    with pytest.raises(ValueError, match="per-block scales"):
        pipe.set_res_tuners("style", {"mid": [1.0, 2.0]})
    with pytest.raises(ValueError, match="finite"):
        pipe.set_res_tuners("style", {"down": float("nan")})


def test_per_block_weights_naming_a_block_diffusers_would_not_read_are_refused_changing_nothing(tmp_path):
    # diffusers' expansion drops such keys unread: the scale the user asked for would silently not apply
    pipe = _pipe()
    pipe.load_res_tuner(_tuner_file(tmp_path, "a"), adapter_name="style")
    pipe.set_res_tuners("style", {"up": 0.5})
    before = _unet_out(pipe.unet)
    without_attention = [f"block_{i}" for i, b in enumerate(pipe.unet.down_blocks) if not hasattr(b, "attentions")]
    bad = [{"up": {"block_9": 0.0}}, {"up": {"blok_1": 0.0}}, {"down": {"block_1": 0.0, "block_-1": 0.0}}]
    bad += [{"down": {block: 0.0}} for block in without_attention]
    assert without_attention  # the tiny UNet has a down block without attentions, like SD's last one
    for weights in bad:
        with pytest.raises(ValueError, match=r"name no (up|down) block with attention layers.*block_"):
            pipe.set_res_tuners("style", weights)
        torch.testing.assert_close(_unet_out(pipe.unet), before, rtol=0, atol=0)


# --- pipelines --------------------------------------------------------------------------------------------------
def _controlnet_pipe(kind):
    from diffusers import ControlNetModel

    stock = tiny_pipeline(kind)
    controlnet = ControlNetModel.from_unet(stock.unet, conditioning_embedding_out_channels=(8, 16))
    cls = ResTunerStableDiffusionXLControlNetPipeline if kind == "sdxl" else ResTunerStableDiffusionControlNetPipeline
    expected = set(cls._get_signature_keys(cls)[0])
    components = {k: v for k, v in stock.components.items() if k in expected}
    pipe = cls(**components, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    return pipe, {"image": torch.rand(1, 3, 32, 32)}


def _inpaint_pipe(kind):
    cls = ResTunerStableDiffusionXLInpaintPipeline if kind == "sdxl" else ResTunerStableDiffusionInpaintPipeline
    pipe = _pipe(kind, cls)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    return pipe, {"image": torch.rand(1, 3, 32, 32), "mask_image": mask, "strength": 1.0}


@pytest.mark.parametrize("make", [_controlnet_pipe, _inpaint_pipe], ids=["controlnet", "inpaint"])
@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_inpainting_and_controlnet_pipelines_run_tuners(make, kind, tmp_path):
    pipe, call = make(kind)
    base = _images(pipe, **call)
    pipe.load_res_tuner(_tuner_file(tmp_path, "a", kind=kind), adapter_name="style")
    tuned = _images(pipe, **call)
    assert abs(tuned - base).max() > 1e-3
    pipe.unload_res_tuner()
    assert abs(_images(pipe, **call) - base).max() == 0


def test_auto_pipelines_have_the_tuner_methods_and_keep_tuners_across_from_pipe(tmp_path):
    folder = save_tiny_pipeline("sd1", tmp_path / "model")
    pipe = ResTunerAutoPipelineForText2Image.from_pretrained(folder)
    assert isinstance(pipe, ResTunerStableDiffusionPipeline)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_res_tuner(_tuner_file(tmp_path, "a"), adapter_name="style")
    reference = _pipe()
    reference.load_res_tuner(_tuner_file(tmp_path, "a"), adapter_name="style")
    assert abs(_images(pipe) - _images(reference)).max() == 0
    inpaint = ResTunerAutoPipelineForInpainting.from_pipe(pipe)
    assert isinstance(inpaint, ResTunerStableDiffusionInpaintPipeline)
    assert list(inpaint.get_res_tuners()) == ["style"]
    with pytest.raises(TypeError, match="diffusers pipeline"):
        with_res_tuners(object())
