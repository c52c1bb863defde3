"""Stable Diffusion 1.x / 2.x guided by a ControlNet, with res tuners: ``StableDiffusionControlNetPipeline`` + the
loader mixin.

As a custom pipeline: ``DiffusionPipeline.from_pretrained(model, custom_pipeline="pipelines/res_tuner_controlnet.py",
trust_remote_code=True)``. One pipeline class per file (diffusers picks the only one).
"""

from diffusers import StableDiffusionControlNetPipeline

from resattn_diffusion import ResTunerLoaderMixin


class ResTunerStableDiffusionControlNetPipeline(ResTunerLoaderMixin, StableDiffusionControlNetPipeline):
    """``StableDiffusionControlNetPipeline`` with the methods of :class:`resattn_diffusion.ResTunerLoaderMixin`."""
