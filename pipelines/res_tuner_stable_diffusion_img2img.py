"""Stable Diffusion 1.x / 2.x image-to-image with res tuners: ``StableDiffusionImg2ImgPipeline`` + the loader mixin.

As a custom pipeline: ``DiffusionPipeline.from_pretrained(model,
custom_pipeline="pipelines/res_tuner_stable_diffusion_img2img.py", trust_remote_code=True)``.
One pipeline class per file (diffusers picks the only one).
"""

from diffusers import StableDiffusionImg2ImgPipeline

from resattn_diffusion import ResTunerLoaderMixin


class ResTunerStableDiffusionImg2ImgPipeline(ResTunerLoaderMixin, StableDiffusionImg2ImgPipeline):
    """``StableDiffusionImg2ImgPipeline`` with the methods of :class:`resattn_diffusion.ResTunerLoaderMixin`."""
