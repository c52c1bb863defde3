"""Stable Diffusion 1.x / 2.x text-to-image with res tuners: diffusers' ``StableDiffusionPipeline`` + the loader mixin.

Usable as a class (``from pipelines import ResTunerStableDiffusionPipeline``) or as a diffusers custom pipeline::

    pipe = DiffusionPipeline.from_pretrained(model, custom_pipeline="pipelines/res_tuner_stable_diffusion.py",
                                             trust_remote_code=True)

diffusers copies this file into its modules cache and takes the one pipeline class defined here, so the file
holds exactly one and imports ``resattn_diffusion`` as an installed package (``pip install -e .``).
"""

from diffusers import StableDiffusionPipeline

from resattn_diffusion import ResTunerLoaderMixin


class ResTunerStableDiffusionPipeline(ResTunerLoaderMixin, StableDiffusionPipeline):
    """``StableDiffusionPipeline`` with ``load_res_tuner`` / ``unload_res_tuner`` / ``set_res_tuners`` /
    ``fuse_res_tuner`` and the rest of :class:`resattn_diffusion.ResTunerLoaderMixin`."""
