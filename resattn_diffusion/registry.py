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

from .tuners.base import ConfigError

TunerKind = Literal["operation", "linear", "unet"]


@dataclass(frozen=True)
class TunerSpec:
    name: str
    params_cls: type
    module_cls: type
    kind: TunerKind
    summary: str

    def make_params(self, **values):
        allowed = set(self.params_cls.__dataclass_fields__)
        unknown = set(values) - allowed
        if unknown:
            raise ConfigError(
                f"tuner {self.name!r} has no hyperparameter(s) {sorted(unknown)}; its hyperparameters are {sorted(allowed)}"
            )
        params = self.params_cls(**values)
        params.validate()
        return params


_TUNERS: dict[str, TunerSpec] = {}


def register_tuner(name: str, params_cls: type, module_cls: type, kind: TunerKind, summary: str) -> None:
    if name in _TUNERS:
        raise ValueError(f"tuner {name!r} is registered twice")
    _TUNERS[name] = TunerSpec(name, params_cls, module_cls, kind, summary)


def get_tuner_spec(name: str) -> TunerSpec:
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

register_tuner("res_attn", ResAttnParams, ResAttn, "operation", "parallel low-rank multi-head attention")
register_tuner("res_adapter", ResAdapterParams, ResAdapter, "operation", "bottleneck adapter W_up act(W_down x)")
register_tuner("res_prefix", ResPrefixParams, ResPrefix, "operation", "learned prefix keys/values, frozen query")
register_tuner("res_prompt", ResPromptParams, ResPrompt, "operation", "learned prompt tokens through frozen k/v")
register_tuner("res_lora", ResLoRAParams, ResLoRA, "linear", "LoRA in unbound form on a linear projection")
