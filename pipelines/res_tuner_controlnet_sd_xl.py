"""Stable Diffusion XL guided by a ControlNet, with res tuners: ``StableDiffusionXLControlNetPipeline`` + the loader
mixin.

As a custom pipeline: ``DiffusionPipeline.from_pretrained(model,
custom_pipeline="pipelines/res_tuner_controlnet_sd_xl.py", trust_remote_code=True)``. One pipeline class per file
(diffusers picks the only one).
"""

from diffusers import StableDiffusionXLControlNetPipeline

from resattn_diffusion import ResTunerLoaderMixin


class ResTunerStableDiffusionXLControlNetPipeline(ResTunerLoaderMixin, StableDiffusionXLControlNetPipeline):
    """``StableDiffusionXLControlNetPipeline`` with the methods of :class:`resattn_diffusion.ResTunerLoaderMixin`."""
