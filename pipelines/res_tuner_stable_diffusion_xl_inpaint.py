"""Stable Diffusion XL inpainting with res tuners: ``StableDiffusionXLInpaintPipeline`` + the loader mixin.

As a custom pipeline: ``DiffusionPipeline.from_pretrained(model,
custom_pipeline="pipelines/res_tuner_stable_diffusion_xl_inpaint.py", trust_remote_code=True)``. One pipeline class per
file (diffusers picks the only one).
"""

from diffusers import StableDiffusionXLInpaintPipeline

from resattn_diffusion import ResTunerLoaderMixin


class ResTunerStableDiffusionXLInpaintPipeline(ResTunerLoaderMixin, StableDiffusionXLInpaintPipeline):
    """``StableDiffusionXLInpaintPipeline`` with the methods of :class:`resattn_diffusion.ResTunerLoaderMixin`."""
