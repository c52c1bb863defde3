"""diffusers' ``AutoPipelineFor*`` with the res tuner methods:
``ResTunerAutoPipelineForText2Image.from_pretrained(model)`` returns the pipeline diffusers picks for ``model`` (SD,
SDXL, their ControlNet variants, ...) with ``load_res_tuner`` & co. of :class:`resattn_diffusion.ResTunerLoaderMixin`
available; ``from_pipe`` switches task and keeps the loaded tuners (they live on the shared UNet).
"""

from __future__ import annotations

from typing import Any

from diffusers import (
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    AutoPipelineForText2Image,
    DiffusionPipeline,
)

from resattn_diffusion import ResTunerLoaderMixin

from .res_tuner_controlnet import ResTunerStableDiffusionControlNetPipeline
from .res_tuner_controlnet_sd_xl import ResTunerStableDiffusionXLControlNetPipeline
from .res_tuner_stable_diffusion import ResTunerStableDiffusionPipeline
from .res_tuner_stable_diffusion_img2img import ResTunerStableDiffusionImg2ImgPipeline
from .res_tuner_stable_diffusion_inpaint import ResTunerStableDiffusionInpaintPipeline
from .res_tuner_stable_diffusion_xl import ResTunerStableDiffusionXLPipeline
from .res_tuner_stable_diffusion_xl_img2img import ResTunerStableDiffusionXLImg2ImgPipeline
from .res_tuner_stable_diffusion_xl_inpaint import ResTunerStableDiffusionXLInpaintPipeline

#: stock diffusers pipeline class -> the class with the mixin (the named ones above; others are made on first use).
_WITH_TUNERS: dict[type, type] = {
    cls.__bases__[1]: cls  # (ResTunerLoaderMixin, stock)
    for cls in (
        ResTunerStableDiffusionPipeline,
        ResTunerStableDiffusionImg2ImgPipeline,
        ResTunerStableDiffusionInpaintPipeline,
        ResTunerStableDiffusionXLPipeline,
        ResTunerStableDiffusionXLImg2ImgPipeline,
        ResTunerStableDiffusionXLInpaintPipeline,
        ResTunerStableDiffusionControlNetPipeline,
        ResTunerStableDiffusionXLControlNetPipeline,
    )
}


def with_res_tuners(pipe: DiffusionPipeline) -> DiffusionPipeline:
    """The same pipeline object with the res tuner methods: its class becomes the subclass with
    :class:`~resattn_diffusion.ResTunerLoaderMixin` in front (nothing is copied or reloaded)."""
    if isinstance(pipe, ResTunerLoaderMixin):
        return pipe
    if not isinstance(pipe, DiffusionPipeline):
        raise TypeError(f"with_res_tuners takes a diffusers pipeline, got {type(pipe).__name__}")
    stock = type(pipe)
    if stock not in _WITH_TUNERS:
        _WITH_TUNERS[stock] = type(
            f"ResTuner{stock.__name__}",
            (ResTunerLoaderMixin, stock),
            {"__module__": __name__, "__doc__": f"``{stock.__name__}`` with the res tuner loader methods."},
        )
    pipe.__class__ = _WITH_TUNERS[stock]
    return pipe


def _stock_class(cls: type) -> type:
    """The diffusers pipeline class under a class with the mixin (the class itself when it has none)."""
    return next(c for c in cls.__mro__ if issubclass(c, DiffusionPipeline) and not issubclass(c, ResTunerLoaderMixin))


class _ResTunerAutoPipeline:
    _auto: type

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise OSError(f"{type(self).__name__} is made with from_pretrained(model) or from_pipe(pipe)")

    @classmethod
    def from_pretrained(cls, pretrained_model_or_path: Any, **kwargs: Any) -> DiffusionPipeline:
        """diffusers' ``from_pretrained`` of the same auto class, with the res tuner methods added."""
        return with_res_tuners(cls._auto.from_pretrained(pretrained_model_or_path, **kwargs))

    @classmethod
    def from_pipe(cls, pipeline: DiffusionPipeline, **kwargs: Any) -> DiffusionPipeline:
        """diffusers' ``from_pipe``: the pipeline for this task over the same components (and loaded tuners)."""
        # diffusers picks the task's class by the pipeline's class name, which it must see as the stock one.
        own_class = type(pipeline)
        pipeline.__class__ = _stock_class(own_class)
        try:
            return with_res_tuners(cls._auto.from_pipe(pipeline, **kwargs))
        finally:
            pipeline.__class__ = own_class


class ResTunerAutoPipelineForText2Image(_ResTunerAutoPipeline):
    """``AutoPipelineForText2Image`` whose pipelines have ``load_res_tuner`` & co."""

    _auto = AutoPipelineForText2Image


class ResTunerAutoPipelineForImage2Image(_ResTunerAutoPipeline):
    """``AutoPipelineForImage2Image`` whose pipelines have ``load_res_tuner`` & co."""

    _auto = AutoPipelineForImage2Image


class ResTunerAutoPipelineForInpainting(_ResTunerAutoPipeline):
    """``AutoPipelineForInpainting`` whose pipelines have ``load_res_tuner`` & co."""

    _auto = AutoPipelineForInpainting
