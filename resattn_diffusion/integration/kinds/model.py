"""Model-level tuners: one module beside the whole model (today the Res-Tuning-Bypass on a UNet's decoder).

The wiring of the bypass is :mod:`..unet_tuners`; this class is its face to the API. A family that cannot take a
model-level tuner leaves ``"model"`` out of its ``kinds`` and the API refuses such a tuner before anything changes.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from ...config import ResTunerConfig
from .. import unet_tuners
from ..families.base import ModelFamily
from ..processors import TunerSetting
from ..state import ResTunerState
from .base import TunerKindAttach


class ModelKind(TunerKindAttach):
    name = "model"

    def fingerprint(self, model: nn.Module, family: ModelFamily, config: ResTunerConfig) -> dict[str, dict]:
        return unet_tuners.unet_tuner_fingerprint(model, config)

    def plan(self, model: nn.Module, family: ModelFamily, config: ResTunerConfig) -> list[tuple[str, nn.Module]]:
        unet_tuners.unet_tuner_fingerprint(model, config)  # the bypass's own checks of config and UNet
        sources = unet_tuners.bypass_sources(model)
        bypass = config.spec.module_cls([width for _, _, width in sources], config.params)
        return list(zip([path for path, _, _ in sources], bypass.stages))

    def attach(
        self, model: nn.Module, family: ModelFamily, config: ResTunerConfig, adapter_name: str, state: ResTunerState
    ) -> list[str]:
        unet_tuners.unet_tuner_fingerprint(model, config)  # raises on a config or model it cannot take, first
        return unet_tuners.attach_unet_tuner(model, config, adapter_name, state)

    def detach(self, model: nn.Module, state: ResTunerState, adapter_name: str) -> None:
        unet_tuners.detach_unet_tuner(model, adapter_name, state)

    def iterate(self, model: nn.Module, state: ResTunerState, adapter_name: str) -> Iterator[tuple[str, nn.Module]]:
        return unet_tuners.iter_unet_tuner(model, adapter_name)

    def settings(self, model: nn.Module, state: ResTunerState, adapter_name: str) -> list[TunerSetting]:
        return unet_tuners.unet_tuner_settings(model, adapter_name)
