"""Stable Diffusion 1.x / 2.x inpainting with res tuners: ``StableDiffusionInpaintPipeline`` + the loader mixin.

As a custom pipeline: ``DiffusionPipeline.from_pretrained(model,
custom_pipeline="pipelines/res_tuner_stable_diffusion_inpaint.py", trust_remote_code=True)``. One pipeline class per
file (diffusers picks the only one).
"""

from diffusers import StableDiffusionInpaintPipeline

from resattn_diffusion import ResTunerLoaderMixin


class ResTunerStableDiffusionInpaintPipeline(ResTunerLoaderMixin, StableDiffusionInpaintPipeline):
    """``StableDiffusionInpaintPipeline`` with the methods of :class:`resattn_diffusion.ResTunerLoaderMixin`."""
