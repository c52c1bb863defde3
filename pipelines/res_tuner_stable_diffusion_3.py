"""Stable Diffusion 3 / 3.5 text-to-image with res tuners: diffusers' ``StableDiffusion3Pipeline`` + the loader mixin.

The tuners sit on ``pipe.transformer``. Usable as a class (``from pipelines import ResTunerStableDiffusion3Pipeline``)
or as a diffusers custom pipeline::

    pipe = DiffusionPipeline.from_pretrained(model, custom_pipeline="pipelines/res_tuner_stable_diffusion_3.py",
                                             trust_remote_code=True)

A per-call tuner scale goes through ``joint_attention_kwargs={"res_tuner_scale": s}``. The file holds exactly one
pipeline class (diffusers takes the one it finds) and imports ``resattn_diffusion`` as an installed package.
"""

from diffusers import StableDiffusion3Pipeline

from resattn_diffusion import ResTunerLoaderMixin


class ResTunerStableDiffusion3Pipeline(ResTunerLoaderMixin, StableDiffusion3Pipeline):
    """``StableDiffusion3Pipeline`` with ``load_res_tuner`` / ``unload_res_tuner`` / ``set_res_tuners`` /
    ``fuse_res_tuner`` and the rest of :class:`resattn_diffusion.ResTunerLoaderMixin`, on ``pipe.transformer``."""
