"""The one place a tuner registers: its name -> its hyperparameters (a dataclass) and its module.

Adding a method means one file under ``tuners/`` and one :func:`register_tuner` line below.
``kind`` names the tuner kind, i.e. how the integration layer attaches the module:

* ``"operation"``: an :class:`~resattn_diffusion.tuners.base.OperationTuner` beside a whole operation: an attention
  (in its attention processor) or a feed-forward (a hook on its output);
* ``"linear"``: a :class:`~resattn_diffusion.tuners.base.LinearTuner` beside linear projections of those operations;
* ``"model"``: a model-level tuner, e.g. a side network over the whole UNet decoder (Res-Tuning-Bypass).

The registry also holds, by name, the attach interface of each kind (:func:`register_kind`, filled in by
``integration/kinds``) and the model families (:func:`register_family`, filled in by ``integration/families``), so
the vocabulary a config is checked against (:func:`known_targets`, :func:`known_projections`) grows with them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from .checks import check_hyperparameters
from .tuners.base import ConfigError

TunerKind = Literal["operation", "linear", "model"]


@dataclass(frozen=True)
class TunerSpec:
    name: str
    params_cls: type
    module_cls: type
    kind: TunerKind
    summary: str  # the branch's formula, shown in tables

    def make_params(self, **values):
        allowed = set(self.params_cls.__dataclass_fields__)
        unknown = set(values) - allowed
        if unknown:
            raise ConfigError(
                f"tuner {self.name!r} has no hyperparameter(s) {sorted(map(str, unknown))}; its hyperparameters are "
                f"{sorted(allowed)}"
            )
        check_hyperparameters(self.name, self.params_cls, values)  # types and sizes, before anything is built
        params = self.params_cls(**values)
        params.validate()
        return params


_TUNERS: dict[str, TunerSpec] = {}


def register_tuner(name: str, params_cls: type, module_cls: type, kind: TunerKind, summary: str) -> None:
    if name in _TUNERS:
        raise ValueError(f"tuner {name!r} is registered twice")
    _TUNERS[name] = TunerSpec(name, params_cls, module_cls, kind, summary)


def get_tuner_spec(name: str) -> TunerSpec:
    if not isinstance(name, str):
        raise ConfigError(
            f"tuner must be the name of a registered tuner, got {type(name).__name__}; registered tuners: "
            f"{sorted(_TUNERS)}"
        )
    try:
        return _TUNERS[name]
    except KeyError:
        raise ConfigError(f"unknown tuner {name!r}; registered tuners: {sorted(_TUNERS)}") from None


def tuner_names() -> list[str]:
    return list(_TUNERS)


# --- tuner kinds and model families (registered by the integration layer) -------------------------------------
_KINDS: dict[str, Any] = {}
_FAMILIES: dict[str, Any] = {}


def register_kind(name: str, attach: Any) -> None:
    """Register the attach interface (an ``integration.kinds.TunerKindAttach``) of the tuner kind ``name``."""
    if name in _KINDS:
        raise ValueError(f"tuner kind {name!r} is registered twice")
    _KINDS[name] = attach


def get_kind(name: str) -> Any:
    try:
        return _KINDS[name]
    except KeyError:
        raise ConfigError(f"unknown tuner kind {name!r}; registered kinds: {sorted(_KINDS)}") from None


def register_family(family: Any) -> None:
    """Register a model family (an ``integration.families.ModelFamily``): its targets and projections become
    names a config may use."""
    if family.name in _FAMILIES:
        raise ValueError(f"model family {family.name!r} is registered twice")
    _FAMILIES[family.name] = family


def known_targets() -> tuple[str, ...]:
    """Every target name of every registered family, in registration order."""
    return tuple(dict.fromkeys(t for family in _FAMILIES.values() for t in family.targets))


def known_projections() -> tuple[str, ...]:
    """Every projection name of every registered family, in registration order."""
    return tuple(dict.fromkeys(p for family in _FAMILIES.values() for p in family.projections))


# --- registrations -------------------------------------------------------------------------------------------
from .tuners.adapter import ResAdapter, ResAdapterParams  # noqa: E402
from .tuners.bypass import ResBypass, ResBypassParams  # noqa: E402
from .tuners.glora import GLoRA, GLoRAParams  # noqa: E402
from .tuners.lora import ResLoRA, ResLoRAParams  # noqa: E402
from .tuners.prefix import ResPrefix, ResPrefixParams  # noqa: E402
from .tuners.prompt import ResPrompt, ResPromptParams  # noqa: E402
from .tuners.res_attn import ResAttn, ResAttnParams  # noqa: E402
from .tuners.surm import (  # noqa: E402
    SURMLDR,
    SURMAdapter,
    SURMAdapterParams,
    SURMCirculant,
    SURMCirculantParams,
    SURMKronecker,
    SURMKroneckerParams,
    SURMLDRParams,
    SURMToeplitz,
    SURMToeplitzParams,
)

register_tuner("res_attn", ResAttnParams, ResAttn, "operation", "W_up MHA_h(x A_q, c A_k, c A_v)")
register_tuner("res_adapter", ResAdapterParams, ResAdapter, "operation", "W_up act(W_down x)")
register_tuner("res_prefix", ResPrefixParams, ResPrefix, "operation", "W_o MHA(to_q(x), P_k, P_v)")
register_tuner("res_prompt", ResPromptParams, ResPrompt, "operation", "g ⊙ W_o MHA(to_q(x), to_k(P), to_v(P))")
register_tuner("res_lora", ResLoRAParams, ResLoRA, "linear", "B A x, beside each linear")
register_tuner(
    "res_bypass",
    ResBypassParams,
    ResBypass,
    "model",
    "b_i = L_i(h_i) + V_i(up(b_{i-1})) over detached decoder outputs; + b at conv_norm_out",
)
register_tuner("glora", GLoRAParams, GLoRA, "linear", "(W0 ⊙ A) x + B x + b0 ⊙ D + E + W0 C")
register_tuner("surm_circulant", SURMCirculantParams, SURMCirculant, "linear", "circ(v) x, by FFT")
register_tuner("surm_toeplitz", SURMToeplitzParams, SURMToeplitz, "linear", "T(t) x, by FFT")
register_tuner("surm_kronecker", SURMKroneckerParams, SURMKronecker, "linear", "(A ⊗ B) x = vec(A X B^T)")
register_tuner("surm_ldr", SURMLDRParams, SURMLDR, "linear", "Σ_i circ(g_i) skew(h_i) x, by FFT")
register_tuner("surm_adapter", SURMAdapterParams, SURMAdapter, "operation", "U act(D x), D and U structured")
