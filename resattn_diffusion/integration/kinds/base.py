"""The attach interface of a tuner kind: how tuners of that kind get onto a model, and off again.

Three kinds exist (``registry.TunerKind``): operation tuners inside attention processors and beside feed-forwards
(:class:`~.layers.OperationKind`), linear tuners beside projections (:class:`~.layers.LinearKind`), model-level
tuners such as the Res-Tuning-Bypass (:class:`~.model.ModelKind`). The API (``api.py``) and the file format
(``io.py``) call only these methods, so a new kind is one new implementation registered in ``kinds/__init__.py``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import ClassVar

from torch import nn

from ...config import ResTunerConfig
from ..families.base import ModelFamily
from ..processors import TunerSetting
from ..state import ResTunerError, ResTunerState


class TunerKindAttach(ABC):
    """Attach, detach, iterate, settings, fingerprint (and fuse, where the kind folds into weights)."""

    #: the registry's kind name
    name: ClassVar[str]
    #: whether tuners of this kind fold into the frozen weights (:meth:`fuse` / :meth:`unfuse`)
    can_fuse: ClassVar[bool] = False

    @abstractmethod
    def fingerprint(self, model: nn.Module, family: ModelFamily, config: ResTunerConfig) -> dict[str, dict]:
        """Path -> shape of every place ``config`` puts a tuner on ``model``: what a tuner file must agree with.
        Raises (changing nothing) when ``config`` cannot sit on ``model``."""

    @abstractmethod
    def plan(self, model: nn.Module, family: ModelFamily, config: ResTunerConfig) -> list[tuple[str, nn.Module]]:
        """(path, module) of the tuner ``config`` would put on ``model``, built in the current device context (the
        meta device: sizes without memory) and not attached. Raises like :meth:`attach` would."""

    @abstractmethod
    def attach(
        self, model: nn.Module, family: ModelFamily, config: ResTunerConfig, adapter_name: str, state: ResTunerState
    ) -> list[str]:
        """Build the tuner (trainable, in the dtype/device of what it sits beside) and hook it in; returns the
        paths it sits at. Builds everything before changing the model, so a failure leaves it unchanged."""

    @abstractmethod
    def detach(self, model: nn.Module, state: ResTunerState, adapter_name: str) -> None:
        """Remove the named tuner; with the last tuner at a place, that place is restored exactly."""

    @abstractmethod
    def iterate(self, model: nn.Module, state: ResTunerState, adapter_name: str) -> Iterator[tuple[str, nn.Module]]:
        """(path, module) of the named tuner's parts, in module order: file keys are ``<path>.<parameter>``."""

    @abstractmethod
    def settings(self, model: nn.Module, state: ResTunerState, adapter_name: str) -> list[TunerSetting]:
        """The scale / enabled / fused settings of the named tuner (one per place it sits)."""

    def fuse(self, model: nn.Module, state: ResTunerState, names: list[str], safe_fusing: bool = False) -> None:
        """Fold the named tuners into the frozen weights; with ``safe_fusing`` check every new weight first and
        change nothing if one is not finite."""
        raise ResTunerError(f"{self.name} tuners add a branch that does not fold into a weight")

    def unfuse(  # noqa: B027 - optional hook, no-op by default
        self,
        model: nn.Module,
        state: ResTunerState,
        names: list[str] | None = None,
        accept_changed_weights: bool = False,
    ) -> None:
        """Restore the weights the named tuners (all when None) were folded into, exactly (nothing to do for kinds
        that never fuse); ``accept_changed_weights``: see ``unfuse_res_tuner``."""
