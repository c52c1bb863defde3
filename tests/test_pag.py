"""Perturbed-attention guidance (diffusers' ``*PAGPipeline``) with tuners, through ``with_res_tuners`` (the mixin in
front of the stock class). diffusers installs its PAG processors by plain assignment, which torch refuses over our
processor (a module): the mixin steps ours aside for it and runs each PAG processor inside one of ours."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPAGPipeline, StableDiffusionXLPAGPipeline

import resattn_diffusion as rd
from pipelines import with_res_tuners
from resattn_diffusion.testing import randomize_tuner, tiny_pipeline, unet_inputs

PAG_PIPELINES = {"sd1": StableDiffusionPAGPipeline, "sdxl": StableDiffusionXLPAGPipeline}


def processors(unet: torch.nn.Module) -> dict[str, tuple]:
    return {name: (p, getattr(p, "base_processor", None)) for name, p in unet.attn_processors.items()}


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_pag_runs_the_tuners_on_the_perturbed_layers_and_puts_everything_back(kind):
    pipe = with_res_tuners(PAG_PIPELINES[kind](**tiny_pipeline(kind).components, pag_applied_layers=["mid"]))
    unet = pipe.unet
    rd.add_res_tuner(unet, rd.ResTunerConfig("res_attn", targets=["attn1", "attn2"]))
    rd.add_res_tuner(unet, rd.ResTunerConfig("res_lora", rank=2), adapter_name="lora")
    randomize_tuner(unet, std=0.3)
    randomize_tuner(unet, "lora", seed=1, std=0.3)
    perturbed = next(m for name, m in unet.named_modules() if name.startswith("mid_block") and name.endswith("attn1"))
    calls = []
    perturbed.processor.bank.tuners["default"].register_forward_hook(lambda *_: calls.append(1))
    inputs = unet_inputs(unet)
    with torch.no_grad():
        before_output = unet(**inputs).sample
    before = processors(unet)

    def sample(pag_scale: float):
        generator = torch.Generator().manual_seed(0)
        return pipe("a photo", num_inference_steps=2, pag_scale=pag_scale, generator=generator, output_type="np")

    guided = sample(3.0).images
    assert calls, "the tuner on the perturbed self-attention did not run"
    assert processors(unet) == before  # the same processors of ours, around the same processors
    with torch.no_grad():
        torch.testing.assert_close(unet(**inputs).sample, before_output, rtol=0, atol=0)
    assert abs(guided - sample(0.0).images).max() > 1e-4  # the guidance did something


def test_the_auto_pipeline_with_enable_pag_runs_with_tuners():
    """``ResTunerAutoPipelineForText2Image.from_pipe(pipe, enable_pag=True)`` gives diffusers' PAG class with the
    mixin in front, which a stock PAG pipeline lacks (it raises torch's TypeError with a tuner on a PAG layer)."""
    from pipelines import ResTunerAutoPipelineForText2Image

    pipe = ResTunerAutoPipelineForText2Image.from_pipe(
        tiny_pipeline("sd1"), enable_pag=True, pag_applied_layers=["mid"]
    )
    assert isinstance(pipe, StableDiffusionPAGPipeline)
    rd.add_res_tuner(pipe.unet, rd.ResTunerConfig("res_attn", targets=["attn1"]))
    assert pipe("a photo", num_inference_steps=1, pag_scale=3.0, output_type="np").images.shape == (1, 32, 32, 3)

    stock = StableDiffusionPAGPipeline(**tiny_pipeline("sd1").components, pag_applied_layers=["mid"])
    rd.add_res_tuner(stock.unet, rd.ResTunerConfig("res_attn", targets=["attn1"]))
    with pytest.raises(TypeError, match="cannot assign"):  # what the README tells stock pipelines' users
        stock("a photo", num_inference_steps=1, pag_scale=3.0, output_type="np")


def test_sd3_pag_runs_the_joint_attention_tuners_and_puts_everything_back():
    """SD3's PAG pipeline perturbs joint attentions: the PAG processor runs inside a joint processor of ours."""
    from diffusers import StableDiffusion3PAGPipeline

    from resattn_diffusion.testing import tiny_dit_pipeline

    components = {
        k: v for k, v in tiny_dit_pipeline("sd3").components.items() if k not in ("image_encoder", "feature_extractor")
    }
    pipe = with_res_tuners(StableDiffusion3PAGPipeline(**components, pag_applied_layers=["blocks.1"]))
    transformer = pipe.transformer
    rd.add_res_tuner(transformer, rd.ResTunerConfig("res_attn"))
    randomize_tuner(transformer, std=0.3)
    calls = []
    transformer.transformer_blocks[1].attn.processor.bank.tuners["default"].register_forward_hook(
        lambda *_: calls.append(1)
    )
    before = processors(transformer)
    images = pipe("a photo", num_inference_steps=2, pag_scale=3.0, height=32, width=32, output_type="np").images
    assert images.shape == (1, 32, 32, 3) and calls
    assert processors(transformer) == before
