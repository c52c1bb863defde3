"""The methods the benchmark compares, each as the training-core flags that select it.

* every registered tuner (``resattn_diffusion.tuner_names()``) with its default settings (``<tuner>``) and one
  larger setting (``<tuner>-large``, :data:`LARGER_SETTINGS`); SURM's circulant and Toeplitz tuners have no size
  hyperparameter, so they have no larger setting;
* the peft peers on the same attention projections (to_q, to_k, to_v, to_out.0 of attn1 and attn2): LoRA at rank 4
  (23,296 parameters on the digits base, the closest rank to res_attn's default 24,064), peft's GLoRA at rank 4 and
  peft's block-circulant C3A at block size 8;
* full UNet fine-tuning, the ceiling.

``family`` groups methods that share a learning rate: the sweep runs on one representative per family
(:data:`SWEEP_REPRESENTATIVES`) and the family's other methods use the learning rate it chose. The res tuners form
three families by how their weights act: ``operation`` (a side branch beside attention or the decoder: res_attn,
res_adapter, res_bypass, surm_adapter), ``token`` (learned key/value or prompt tokens: res_prefix, res_prompt,
which need far larger rates) and ``linear`` (weight updates of the projections: res_lora, glora, surm_*). peft's C3A
gets its own sweep (``c3a``): at the LoRA family's rates its zero-initialised circulant kernels barely move.
"""

from __future__ import annotations

from dataclasses import dataclass

import resattn_diffusion

#: tuner -> its larger setting, as --tuner_arg KEY=VALUE items (about 4x the default's size where possible)
LARGER_SETTINGS: dict[str, tuple[str, ...]] = {
    "res_attn": ("rank=32",),
    "res_adapter": ("rank=64",),
    "res_prefix": ("prefix_length=32",),
    "res_prompt": ("prompt_length=32",),
    "res_lora": ("rank=16",),
    "res_bypass": ("rank=64",),
    "glora": ("rank=16",),
    "surm_kronecker": ("out_factor=2", "in_factor=2"),
    "surm_ldr": ("displacement_rank=4",),
    "surm_adapter": ("hidden_dim=128",),
}
MATCHED_LORA_RANK = 4
PEFT_GLORA_RANK = 4
PEFT_C3A_BLOCK_SIZE = 8

FAMILIES: tuple[str, ...] = ("operation", "token", "linear", "peft", "c3a", "full")
#: res tuners that are not in the family of their registry kind (operation / linear / unet -> operation)
TOKEN_TUNERS: tuple[str, ...] = ("res_prefix", "res_prompt")
#: the method whose learning-rate sweep sets each family's learning rate
SWEEP_REPRESENTATIVES: dict[str, str] = {
    "operation": "res_attn", "token": "res_prefix", "linear": "res_lora", "peft": "peft_lora", "c3a": "peft_c3a",
    "full": "full_finetune",
}
#: learning rates swept per family unless --lrs says otherwise
DEFAULT_SWEEP: dict[str, tuple[float, ...]] = {
    "operation": (3e-4, 1e-3, 3e-3, 1e-2),
    "token": (1e-2, 3e-2, 1e-1),
    "linear": (1e-3, 3e-3, 1e-2),
    "peft": (3e-4, 1e-3, 3e-3),
    "c3a": (1e-2, 3e-2, 1e-1),
    "full": (3e-5, 1e-4, 3e-4),
}


def tuner_family(tuner: str) -> str:
    """The learning-rate family of a registered tuner (see the module docstring)."""
    if tuner in TOKEN_TUNERS:
        return "token"
    return "linear" if resattn_diffusion.get_tuner_spec(tuner).kind == "linear" else "operation"


@dataclass(frozen=True)
class Method:
    """One compared method: its name in tables, its family, and the training-core flags that select it."""

    name: str
    family: str
    flags: tuple[str, ...]
    description: str


def all_methods() -> list[Method]:
    """Every method in the benchmark's order: res tuners (default, larger), peft peers, full fine-tuning."""
    methods = []
    for tuner in resattn_diffusion.tuner_names():
        family = tuner_family(tuner)
        methods.append(Method(tuner, family, ("--tuner", tuner), f"{tuner}, default settings"))
        if tuner in LARGER_SETTINGS:
            larger = LARGER_SETTINGS[tuner]
            methods.append(
                Method(f"{tuner}-large", family, ("--tuner", tuner, "--tuner_arg", *larger), f"{tuner}, {' '.join(larger)}")
            )
    methods += [
        Method("peft_lora", "peft", ("--peft_method", "lora", "--peft_rank", str(MATCHED_LORA_RANK)),
               f"peft LoRA rank {MATCHED_LORA_RANK} (matched to res_attn's parameters)"),
        Method("peft_glora", "peft", ("--peft_method", "glora", "--peft_rank", str(PEFT_GLORA_RANK)),
               f"peft GLoRA rank {PEFT_GLORA_RANK}, peft's default A/B/C/D/E settings"),
        Method("peft_c3a", "c3a", ("--peft_method", "c3a", "--peft_block_size", str(PEFT_C3A_BLOCK_SIZE)),
               f"peft C3A block size {PEFT_C3A_BLOCK_SIZE}"),
        Method("full_finetune", "full", ("--full_finetune",), "every UNet weight (the ceiling)"),
    ]
    return methods


def select_methods(names: list[str] | None) -> list[Method]:
    """The methods called ``names`` (None or ["all"] = every method), in the benchmark's order."""
    methods = all_methods()
    if not names or names == ["all"]:
        return methods
    known = {method.name: method for method in methods}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {sorted(known)} or 'all'")
    return [method for method in methods if method.name in names]


def method_by_name(name: str) -> Method:
    return select_methods([name])[0]
