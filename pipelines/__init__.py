"""Thin diffusers pipelines with res tuners: a stock Stable Diffusion / SDXL / SD3 / Flux pipeline + ``ResTunerLoaderMixin``.

Each file defines one pipeline class, so each also works as ``DiffusionPipeline.from_pretrained(model,
custom_pipeline="pipelines/<file>.py", trust_remote_code=True)``.
"""

from .res_tuner_flux import ResTunerFluxPipeline
from .res_tuner_stable_diffusion import ResTunerStableDiffusionPipeline
from .res_tuner_stable_diffusion_3 import ResTunerStableDiffusion3Pipeline
from .res_tuner_stable_diffusion_img2img import ResTunerStableDiffusionImg2ImgPipeline
from .res_tuner_stable_diffusion_xl import ResTunerStableDiffusionXLPipeline
from .res_tuner_stable_diffusion_xl_img2img import ResTunerStableDiffusionXLImg2ImgPipeline

__all__ = [
    "ResTunerFluxPipeline",
    "ResTunerStableDiffusion3Pipeline",
    "ResTunerStableDiffusionImg2ImgPipeline",
    "ResTunerStableDiffusionPipeline",
    "ResTunerStableDiffusionXLImg2ImgPipeline",
    "ResTunerStableDiffusionXLPipeline",
]
