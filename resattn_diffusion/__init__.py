"""resattn-diffusion: side tuners for Stable Diffusion (Res-Attn, the Res-Tuning / U-Tuning family, GLoRA, SURM)."""

__version__ = "0.1.0"

from .config import PLACEMENTS, PROJECTIONS, TARGETS, ResTunerConfig
from .integration.api import (
    ResTunerError,
    add_res_tuner,
    format_summary,
    fuse_res_tuner,
    get_res_tuner_configs,
    remove_res_tuner,
    res_tuner_parameters,
    res_tuner_summary,
    set_res_tuner_enabled,
    set_res_tuner_scale,
    unfuse_res_tuner,
)
from .integration.export import export_lora
from .integration.io import ResTunerFileError, load_res_tuner, save_res_tuner
from .integration.loader_mixin import ResTunerLoaderMixin
from .integration.processors import SCALE_KWARG, ResTunerAttnProcessor
from .registry import get_tuner_spec, register_tuner, tuner_names
from .tuners.base import ConfigError

__all__ = [
    "ConfigError",
    "PLACEMENTS",
    "PROJECTIONS",
    "ResTunerAttnProcessor",
    "ResTunerConfig",
    "ResTunerError",
    "ResTunerFileError",
    "ResTunerLoaderMixin",
    "SCALE_KWARG",
    "TARGETS",
    "add_res_tuner",
    "export_lora",
    "format_summary",
    "fuse_res_tuner",
    "get_res_tuner_configs",
    "get_tuner_spec",
    "load_res_tuner",
    "register_tuner",
    "remove_res_tuner",
    "res_tuner_parameters",
    "res_tuner_summary",
    "save_res_tuner",
    "set_res_tuner_enabled",
    "set_res_tuner_scale",
    "tuner_names",
    "unfuse_res_tuner",
]
