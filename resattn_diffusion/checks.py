"""Checks of values that reach the library from outside (calls, files, flags): each either returns the value or
raises :class:`ConfigError` saying what is wrong and what is allowed. They are cheap (O(1) in every size they
guard) and run at entry points before anything changes; the README's "What is refused and why" lists them.

The bounds, and why they are where they are:

* :data:`MAX_ABS_SCALE` = 1000: a scale multiplies a trained branch; 0 is off, 1 is as trained, and useful
  values are of order 1 (negative ones included). A thousand times the trained branch no longer describes the
  tuned model, and values far beyond it (1e30, inf) only arise from typos or overflow and give NaN images.
* :data:`MAX_ABS_WEIGHT` = 65504, the largest finite float16: pipelines run in half precision, so a tuner weight
  beyond it cannot be used there at all; trained tuners hold values of order 1, so this refuses only corrupt or
  hostile files (3e38), never a training result.
* :data:`MAX_SIZE` = 65536 for every integer hyperparameter (rank, heads, lengths, factors): the widest layer of
  any Stable Diffusion model is 10240 (SDXL's GEGLU), and no size of a side tuner usefully exceeds the layer it
  sits beside. The model-dependent bound (a tuner may not have more parameters than the model it tunes) is
  checked where the model is known (``integration.plan``).
* :data:`MAX_ITEMS` = 4096 entries in any list or mapping of a config (block patterns, GLoRA overrides): a real
  SDXL has about 1700 linear layers a tuner can sit on, and a pattern list is checked against every block.
"""

from __future__ import annotations

import math
import numbers
import re
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from .tuners.base import ConfigError

MAX_ABS_SCALE = 1000.0
MAX_ABS_WEIGHT = 65504.0
MAX_SIZE = 65536
MAX_ITEMS = 4096
MAX_NAME_LENGTH = 128
#: The largest seed a ``torch.Generator`` takes (``manual_seed`` overflows above it with a raw error).
MAX_SEED = 2**64 - 1
#: The largest seed numpy's legacy generator takes: the training scripts' seed also seeds numpy (``set_seed``).
MAX_NUMPY_SEED = 2**32 - 1
#: What an adapter name may be: it becomes a key of ``nn.ModuleDict``s (a module name), a JSON string in the
#: file and a word in messages, so letters, digits, ``_`` and ``-`` only.
_NAME = re.compile(r"[\w-]+")
#: Names a ``nn.ModuleDict`` refuses as keys (its own attributes: ``forward``, ``training``, ``_modules``, ...).
_RESERVED_NAMES = frozenset(dir(nn.ModuleDict()))


def check_scale(value: Any, what: str = "scale") -> float:
    """``value`` as a float, if it is a real number (not a bool) with ``|value| <= MAX_ABS_SCALE``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{what} must be a number, got {type(value).__name__} {_short(value)}")
    scale = float(value)
    if not math.isfinite(scale) or abs(scale) > MAX_ABS_SCALE:
        raise ConfigError(
            f"{what} must be a finite number with |{what}| <= {MAX_ABS_SCALE:g} (0 is off, 1 as trained), got "
            f"{scale!r}"
        )
    return scale


def check_call_scale(value: Any, names: Iterable[str] | None = None, what: str = "res_tuner_scale") -> None:
    """A per-call scale: one number for every tuner, or a dict ``{adapter name: number}`` whose names are all in
    ``names`` (when given). Raises before the call does any work. A dict, not any mapping: the banks read it per
    call as one (``TunerBank.active``), and the hot path does not convert it."""
    if isinstance(value, Mapping) and not isinstance(value, dict):
        raise ConfigError(
            f"{what} must be one number or a dict {{adapter name: number}}, got a {type(value).__name__}: pass "
            "dict(...) of it"
        )
    if isinstance(value, dict):
        known = None if names is None else list(names)
        for name, scale in value.items():
            if not isinstance(name, str) or (known is not None and name not in known):
                raise ConfigError(f"{what} names no loaded tuner {name!r}; loaded tuners: {known}")
            check_scale(scale, f"{what}[{name!r}]")
        return
    check_scale(value, what)


def check_enabled(value: Any, what: str = "enabled") -> bool:
    """A switch must be ``True`` or ``False``: ``"False"`` (a true string) or ``0`` is refused, not guessed."""
    if not isinstance(value, bool):
        raise ConfigError(f"{what} must be True or False, got {type(value).__name__} {_short(value)}")
    return value


def check_adapter_name(name: Any, where: str = "adapter name") -> str:
    """An adapter name that can name a module: 1-128 letters, digits, ``_`` or ``-``, not a module attribute."""
    if not isinstance(name, str):
        raise ConfigError(f"{where} must be a string, got {type(name).__name__} {_short(name)}")
    if not name or len(name) > MAX_NAME_LENGTH or not _NAME.fullmatch(name) or name in _RESERVED_NAMES:
        raise ConfigError(
            f"{where} {_short(name)} is not allowed: use 1-{MAX_NAME_LENGTH} letters, digits, '_' or '-' (it names "
            "modules, so no '.', '/' or spaces), and not an attribute of a module such as 'forward' or 'training'"
        )
    return name


def check_hyperparameters(tuner: str, params_cls: type, values: Mapping[str, Any]) -> None:
    """Type and size of each hyperparameter against its dataclass annotation, before anything is built from it:
    an int field takes an int (not a bool, not 1.5) in ``[.., MAX_SIZE]``, a float field a finite number, a bool
    field a bool, a str field a str, a container at most ``MAX_ITEMS`` entries. Each tuner's own ``validate``
    checks the rest (positivity, divisibility, choices)."""
    hints = _type_hints(params_cls)
    for name, value in values.items():
        allowed = _allowed_types(hints.get(name))
        if allowed is None:
            continue
        if value is None and type(None) in allowed:
            continue
        where = f"{tuner}: hyperparameter {name}"
        if isinstance(value, bool) and bool not in allowed:
            raise ConfigError(f"{where} must be {_type_names(allowed)}, got the bool {value!r}")
        if not isinstance(value, allowed):
            raise ConfigError(f"{where} must be {_type_names(allowed)}, got {type(value).__name__} {_short(value)}")
        if float not in allowed and isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_SIZE:
            raise ConfigError(
                f"{where}={value} is beyond any layer of a Stable Diffusion model; sizes are at most {MAX_SIZE}"
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        if isinstance(value, (list, tuple, dict)) and len(value) > MAX_ITEMS:
            raise ConfigError(f"{where} has {len(value)} entries; at most {MAX_ITEMS} are allowed")
        if isinstance(value, dict):
            _check_mapping_items(where, value, hints.get(name))


def check_item_count(what: str, values: Any) -> None:
    """A list in a config holds at most ``MAX_ITEMS`` entries (checked before anything iterates over it)."""
    if hasattr(values, "__len__") and len(values) > MAX_ITEMS:
        raise ConfigError(f"{what} has {len(values)} entries; at most {MAX_ITEMS} are allowed")


def check_model(model: Any, pipelines_ok: bool = True) -> nn.Module:
    """The denoiser to act on: a module itself, or (with ``pipelines_ok``) a pipeline's ``.unet`` / ``.transformer``
    (SD3, Flux); anything else is refused, saying to pass ``pipe.unet`` or ``pipe.transformer``."""
    if isinstance(model, nn.Module):
        return model
    denoiser = getattr(model, "unet", None)
    if not isinstance(denoiser, nn.Module):
        denoiser = getattr(model, "transformer", None)
    if pipelines_ok and isinstance(denoiser, nn.Module):
        return denoiser
    raise ConfigError(
        "expected a diffusers UNet or transformer (pass the pipeline's denoiser: pipe.unet, or pipe.transformer for "
        f"SD3 / Flux), got {type(model).__name__}"
    )


# --- helpers ------------------------------------------------------------------------------------------------------
def _check_mapping_items(where: str, value: dict, hint: Any) -> None:
    """Keys and values of a ``dict[K, V]`` hyperparameter (e.g. GLoRA's ``overrides``: pattern -> configuration)."""
    args = next((typing.get_args(h) for h in (hint, *typing.get_args(hint)) if typing.get_origin(h) is dict), ())
    if len(args) != 2:
        return
    key_types, value_types = _allowed_types(args[0]), _allowed_types(args[1])
    for key, item in value.items():
        if (key_types and not isinstance(key, key_types)) or (value_types and not isinstance(item, value_types)):
            raise ConfigError(
                f"{where} maps {_type_names(key_types or (object,))} to {_type_names(value_types or (object,))}; got "
                f"{_short(key)}: {_short(item)}"
            )


_HINTS: dict[type, dict[str, Any]] = {}


def _type_hints(params_cls: type) -> dict[str, Any]:
    if params_cls not in _HINTS:
        try:
            _HINTS[params_cls] = typing.get_type_hints(params_cls)
        except Exception:  # unresolvable annotations: the tuner's own validate() is then the only check
            _HINTS[params_cls] = {}
    return _HINTS[params_cls]


def _allowed_types(hint: Any) -> tuple[type, ...] | None:
    """The runtime types an annotation allows (None: do not check). ``float`` admits ints, as Python does."""
    if hint is None or hint is Any:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        parts = [_allowed_types(arg) for arg in typing.get_args(hint)]
        if any(p is None for p in parts):
            return None
        return tuple(t for p in parts for t in p)  # type: ignore[union-attr]
    if hint is type(None):
        return (type(None),)
    base = origin or hint
    if base is float:
        return (float, int)
    if base in (int, bool, str):
        return (base,)
    if base in (dict, Mapping, typing.Mapping):
        return (dict,)
    if base in (list, tuple):
        return (list, tuple)
    return None


def _type_names(allowed: tuple[type, ...]) -> str:
    """The types a value may have, as an error message says them: ``(float, type(None))`` -> ``"None or a number"``."""
    return " or ".join(
        sorted({"a number" if t is float else ("None" if t is type(None) else f"a {t.__name__}") for t in allowed})
    )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
