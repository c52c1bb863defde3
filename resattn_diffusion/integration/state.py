"""What a model carries once it has tuners: its named configs, the banks that hold the tuners, its family.

Imported by every module of the integration layer (the kinds, the families, the API in ``api.py``, ``io.py``),
and importing none of them: the one place shared state lives, so nothing imports in a circle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..config import ResTunerConfig

if TYPE_CHECKING:  # only for type hints: families import this module
    from .families.base import ModelFamily
    from .processors import TunerBank

#: The attribute on the model that holds its tuners' state (a plain object, not a module).
STATE_ATTR = "_res_tuner_state"


class ResTunerError(RuntimeError):
    """A tuner operation that cannot be done on this model; the message says why and what to do."""


@dataclass
class ResTunerState:
    #: the model family the tuners were attached for (decides the per-call scale kwarg, the file's base description)
    family: ModelFamily
    configs: dict[str, ResTunerConfig] = field(default_factory=dict)
    #: (bank, the module that owns it) for every bank on the model, in module order.
    banks: list[tuple[TunerBank, nn.Module]] = field(default_factory=list)

    def add_bank(self, bank: TunerBank, owner: nn.Module) -> None:
        if not any(b is bank for b, _ in self.banks):
            self.banks.append((bank, owner))

    def drop_bank(self, bank: TunerBank) -> None:
        self.banks = [(b, o) for b, o in self.banks if b is not bank]


def get_state(model: nn.Module) -> ResTunerState | None:
    return getattr(model, STATE_ATTR, None)


def require_name(state: ResTunerState, name: str) -> str:
    if not isinstance(name, str):
        raise ResTunerError(f"adapter_name must be a tuner's name (a string), got {type(name).__name__} {name!r}")
    if name not in state.configs:
        raise ResTunerError(
            f"no tuner named {name!r} on this model; loaded tuners (adapter names): {list(state.configs)}"
        )
    return name


def remove_forward_hooks(module: nn.Module, fn: Callable[..., Any]) -> None:
    """Remove ``fn`` from the module's forward (pre-)hooks, with its entries in torch's bookkeeping dicts (found by
    identity, so a deep-copied model's hooks are found too: no handle is kept)."""
    for hooks, extras in (
        (module._forward_pre_hooks, (module._forward_pre_hooks_with_kwargs,)),
        (module._forward_hooks, (module._forward_hooks_with_kwargs, module._forward_hooks_always_called)),
    ):
        for hook_id in [k for k, hook in hooks.items() if hook is fn]:
            del hooks[hook_id]
            for extra in extras:
                extra.pop(hook_id, None)


def module_dtype_device(module: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The dtype and device of a module's first parameter (float32 on CPU for a module without parameters)."""
    param = next(module.parameters(), None)
    if param is None:
        return torch.float32, torch.device("cpu")
    return param.dtype, param.device
