"""The attach interface of each tuner kind, registered with the registry under the kind's name.

Adding a kind: a :class:`~.base.TunerKindAttach` implementation and one line in :data:`KINDS`; tuners registered
with that kind name then attach through it.
"""

from __future__ import annotations

from ...config import ResTunerConfig
from ...registry import get_kind, register_kind
from .base import TunerKindAttach
from .layers import LinearKind, OperationKind
from .model import ModelKind

KINDS: tuple[TunerKindAttach, ...] = (OperationKind(), LinearKind(), ModelKind())

for _kind in KINDS:
    register_kind(_kind.name, _kind)


def kind_of(config: ResTunerConfig) -> TunerKindAttach:
    """The attach interface of ``config``'s tuner."""
    return get_kind(config.spec.kind)


__all__ = ["KINDS", "LinearKind", "ModelKind", "OperationKind", "TunerKindAttach", "kind_of"]
