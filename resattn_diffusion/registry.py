"""The one place a tuner registers: its name -> its hyperparameters (a dataclass) and its module.

Adding a method means one file under ``tuners/`` and one :func:`register_tuner` line below.
``kind`` tells the integration layer where the module goes:

* ``"operation"``: an :class:`~resattn_diffusion.tuners.base.OperationTuner` beside ``attn1``/``attn2`` (in the
  attention processor) or ``ff`` (a hook on the feed-forward);
* ``"linear"``: a :class:`~resattn_diffusion.tuners.base.LinearTuner` beside linear projections of those operations;
* ``"unet"``: a side network over the whole UNet decoder (Res-Tuning-Bypass).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .checks import check_hyperparameters
from .tuners.base import ConfigError

TunerKind = Literal["operation", "linear", "unet"]


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
                f"tuner {self.name!r} has no hyperparameter(s) {sorted(map(str, unknown))}; its hyperparameters are {sorted(allowed)}"
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
        raise ConfigError(f"tuner must be the name of a registered tuner, got {type(name).__name__}; registered tuners: {sorted(_TUNERS)}")
    try:
        return _TUNERS[name]
    except KeyError:
        raise ConfigError(f"unknown tuner {name!r}; registered tuners: {sorted(_TUNERS)}") from None


def tuner_names() -> list[str]:
    return list(_TUNERS)


# --- registrations -------------------------------------------------------------------------------------------
from .tuners.adapter import ResAdapter, ResAdapterParams  # noqa: E402
from .tuners.prefix import ResPrefix, ResPrefixParams  # noqa: E402
from .tuners.prompt import ResPrompt, ResPromptParams  # noqa: E402
from .tuners.res_attn import ResAttn, ResAttnParams  # noqa: E402
from .tuners.lora import ResLoRA, ResLoRAParams  # noqa: E402
from .tuners.bypass import ResBypass, ResBypassParams  # noqa: E402
from .tuners.glora import GLoRA, GLoRAParams  # noqa: E402
from .tuners.surm import (  # noqa: E402
    SURMAdapter,
    SURMAdapterParams,
    SURMCirculant,
    SURMCirculantParams,
    SURMKronecker,
    SURMKroneckerParams,
    SURMLDR,
    SURMLDRParams,
    SURMToeplitz,
    SURMToeplitzParams,
)

register_tuner("res_attn", ResAttnParams, ResAttn, "operation", "W_up MHA_h(x A_q, c A_k, c A_v)")
register_tuner("res_adapter", ResAdapterParams, ResAdapter, "operation", "W_up act(W_down x)")
register_tuner("res_prefix", ResPrefixParams, ResPrefix, "operation", "W_o MHA(to_q(x), P_k, P_v)")
register_tuner("res_prompt", ResPromptParams, ResPrompt, "operation", "g ⊙ W_o MHA(to_q(x), to_k(P), to_v(P))")
register_tuner("res_lora", ResLoRAParams, ResLoRA, "linear", "B A x, beside each linear")
register_tuner("res_bypass", ResBypassParams, ResBypass, "unet", "b_i = L_i(h_i) + V_i(up(b_{i-1})) over detached decoder outputs; + b at conv_norm_out")
register_tuner("glora", GLoRAParams, GLoRA, "linear", "(W0 ⊙ A) x + B x + b0 ⊙ D + E + W0 C")
register_tuner("surm_circulant", SURMCirculantParams, SURMCirculant, "linear", "circ(v) x, by FFT")
register_tuner("surm_toeplitz", SURMToeplitzParams, SURMToeplitz, "linear", "T(t) x, by FFT")
register_tuner("surm_kronecker", SURMKroneckerParams, SURMKronecker, "linear", "(A ⊗ B) x = vec(A X B^T)")
register_tuner("surm_ldr", SURMLDRParams, SURMLDR, "linear", "Σ_i circ(g_i) skew(h_i) x, by FFT")
register_tuner("surm_adapter", SURMAdapterParams, SURMAdapter, "operation", "U act(D x), D and U structured")
