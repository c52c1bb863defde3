"""Stable Diffusion XL text-to-image with res tuners: ``StableDiffusionXLPipeline`` + the loader mixin.

As a custom pipeline: ``DiffusionPipeline.from_pretrained(model,
custom_pipeline="pipelines/res_tuner_stable_diffusion_xl.py", trust_remote_code=True)``.
One pipeline class per file (diffusers picks the only one).
"""

from diffusers import StableDiffusionXLPipeline

from resattn_diffusion import ResTunerLoaderMixin


class ResTunerStableDiffusionXLPipeline(ResTunerLoaderMixin, StableDiffusionXLPipeline):
    """``StableDiffusionXLPipeline`` with the methods of :class:`resattn_diffusion.ResTunerLoaderMixin`."""
