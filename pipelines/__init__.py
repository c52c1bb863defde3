"""Thin diffusers pipelines with res tuners: a stock Stable Diffusion / SDXL / SD3 / Flux pipeline +
``ResTunerLoaderMixin``.

Each ``res_tuner_*.py`` file defines one pipeline class, so each also works as
``DiffusionPipeline.from_pretrained(model, custom_pipeline="pipelines/<file>.py", trust_remote_code=True)``.
``auto.py`` wraps diffusers' ``AutoPipelineFor*``.
"""

from .auto import (
    ResTunerAutoPipelineForImage2Image,
    ResTunerAutoPipelineForInpainting,
    ResTunerAutoPipelineForText2Image,
    with_res_tuners,
)
from .res_tuner_controlnet import ResTunerStableDiffusionControlNetPipeline
from .res_tuner_controlnet_sd_xl import ResTunerStableDiffusionXLControlNetPipeline
from .res_tuner_flux import ResTunerFluxPipeline
from .res_tuner_stable_diffusion import ResTunerStableDiffusionPipeline
from .res_tuner_stable_diffusion_3 import ResTunerStableDiffusion3Pipeline
from .res_tuner_stable_diffusion_img2img import ResTunerStableDiffusionImg2ImgPipeline
from .res_tuner_stable_diffusion_inpaint import ResTunerStableDiffusionInpaintPipeline
from .res_tuner_stable_diffusion_xl import ResTunerStableDiffusionXLPipeline
from .res_tuner_stable_diffusion_xl_img2img import ResTunerStableDiffusionXLImg2ImgPipeline
from .res_tuner_stable_diffusion_xl_inpaint import ResTunerStableDiffusionXLInpaintPipeline

__all__ = [
    "ResTunerAutoPipelineForImage2Image",
    "ResTunerAutoPipelineForInpainting",
    "ResTunerAutoPipelineForText2Image",
    "ResTunerFluxPipeline",
    "ResTunerStableDiffusion3Pipeline",
    "ResTunerStableDiffusionControlNetPipeline",
    "ResTunerStableDiffusionImg2ImgPipeline",
    "ResTunerStableDiffusionInpaintPipeline",
    "ResTunerStableDiffusionPipeline",
    "ResTunerStableDiffusionXLControlNetPipeline",
    "ResTunerStableDiffusionXLImg2ImgPipeline",
    "ResTunerStableDiffusionXLInpaintPipeline",
    "ResTunerStableDiffusionXLPipeline",
    "with_res_tuners",
]
