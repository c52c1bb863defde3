"""Stable Diffusion XL image-to-image with res tuners: ``StableDiffusionXLImg2ImgPipeline`` + the loader mixin.

As a custom pipeline: ``DiffusionPipeline.from_pretrained(model,
custom_pipeline="pipelines/res_tuner_stable_diffusion_xl_img2img.py", trust_remote_code=True)``.
One pipeline class per file (diffusers picks the only one).
"""

from diffusers import StableDiffusionXLImg2ImgPipeline

from resattn_diffusion import ResTunerLoaderMixin


class ResTunerStableDiffusionXLImg2ImgPipeline(ResTunerLoaderMixin, StableDiffusionXLImg2ImgPipeline):
    """``StableDiffusionXLImg2ImgPipeline`` with the methods of :class:`resattn_diffusion.ResTunerLoaderMixin`."""
