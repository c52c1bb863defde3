"""The math of every tuner: small pure torch modules that know nothing of diffusers."""

from .base import ConfigError, FrozenAttention, LinearTuner, OperationTuner, OpShape, TunerParams

__all__ = ["ConfigError", "FrozenAttention", "LinearTuner", "OperationTuner", "OpShape", "TunerParams"]
