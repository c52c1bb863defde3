"""The methods the benchmark compares, each as the training-core flags that select it.

* every registered tuner (``resattn_diffusion.tuner_names()``) with its default settings (``<tuner>``) and, opt-in,
  one larger setting (``<tuner>-large``, :data:`LARGER_SETTINGS`; SURM's circulant and Toeplitz tuners have no size
  hyperparameter, so they have no larger setting). The default selection (:func:`default_methods`) leaves the larger
  settings out to keep the benchmark within its budget (~90 minutes on 2 cores); name them (``res_attn-large``) or
  pass ``with_large`` (``--with_large``) to add them, each with its own sweep;
* opt-in alternative settings of the same size (:data:`ALTERNATIVE_SETTINGS`, named in ``--methods`` only), for a
  default that speed asks to change: ``res_attn-1head`` is Res-Attn with one head of the same rank, whose branch
  attends at half the cost of the default's two;
* the peft peers on the same attention projections (to_q, to_k, to_v, to_out.0 of attn1 and attn2): LoRA at rank 4
  (23,296 parameters on the digits base, the closest rank to res_attn's default 24,064), peft's GLoRA at rank 4 and
  peft's block-circulant C3A at block size 8;
* full UNet fine-tuning, the ceiling.

Every method *and size* gets its own learning rate, chosen by a sweep on the sweep seed (see
:mod:`benchmarks.digits.plan`). ``family`` only says where a method's sweep starts (:data:`INITIAL_SWEEP`, three
rates one half-decade apart on :data:`RATE_LADDER`; the sweep widens along the ladder while its best rate sits at an
edge) and colours the plot. The res tuners form three families by how their weights act: ``operation`` (a side
branch beside attention or the decoder: res_attn, res_adapter, res_bypass, surm_adapter), ``token`` (learned
key/value or prompt tokens: res_prefix, res_prompt, which need far larger rates) and ``linear`` (weight updates of
the projections: res_lora, glora, surm_*). peft's C3A starts its own way (``c3a``): at LoRA's rates its
zero-initialised circulant kernels barely move.

:data:`PROMPT_BLIND` names the methods that cannot bind a new identifier by their math (see its comment): the
report shows their DreamBooth numbers at the best swept rate with that caveat instead of treating them as failures
of tuning.
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
#: opt-in alternatives at the default size: name -> (tuner, its --tuner_arg KEY=VALUE items)
ALTERNATIVE_SETTINGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "res_attn-1head": ("res_attn", ("heads=1",)),
}
MATCHED_LORA_RANK = 4
PEFT_GLORA_RANK = 4
PEFT_C3A_BLOCK_SIZE = 8

FAMILIES: tuple[str, ...] = ("operation", "token", "linear", "peft", "c3a", "full")
#: res tuners that are not in the family of their registry kind (operation / linear / unet -> operation)
TOKEN_TUNERS: tuple[str, ...] = ("res_prefix", "res_prompt")
#: Methods whose change cannot depend on the prompt the way a new identifier needs. Res-Prefix and Res-Prompt add
#: the same learned keys/values (tokens) whatever the prompt; the bypass reads the frozen decoder's outputs and
#: cannot change how the UNet attends to the text. Each sees the prompt only through what the frozen layers already
#: made of it, and the frozen base has no meaning for "sks", while prior preservation pulls the class prompt, which
#: differs from the identifier prompt by that one token, back to the base. DreamBooth's ``class_leak`` shows it.
PROMPT_BLIND: tuple[str, ...] = (
    "res_prefix",
    "res_prefix-large",
    "res_prompt",
    "res_prompt-large",
    "res_bypass",
    "res_bypass-large",
)
#: learning rates, half a decade apart: the sweep's grid and the steps it widens by
RATE_LADDER: tuple[float, ...] = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
#: (family, task) -> the rates a method's sweep starts with (measured optima of an earlier run sit in the middle)
INITIAL_SWEEP: dict[tuple[str, str], tuple[float, ...]] = {
    ("operation", "dreambooth"): (1e-3, 3e-3, 1e-2),
    ("operation", "style"): (3e-3, 1e-2, 3e-2),
    ("token", "dreambooth"): (1e-2, 3e-2, 1e-1),
    ("token", "style"): (3e-2, 1e-1, 3e-1),
    ("linear", "dreambooth"): (3e-4, 1e-3, 3e-3),
    ("linear", "style"): (3e-3, 1e-2, 3e-2),
    ("peft", "dreambooth"): (3e-4, 1e-3, 3e-3),
    ("peft", "style"): (1e-3, 3e-3, 1e-2),
    ("c3a", "dreambooth"): (3e-2, 1e-1, 3e-1),
    ("c3a", "style"): (3e-2, 1e-1, 3e-1),
    ("full", "dreambooth"): (3e-5, 1e-4, 3e-4),
    ("full", "style"): (1e-4, 3e-4, 1e-3),
}
#: the methods the README's comparisons are made against, and the headline tuner: they get extra seeds
REFERENCE_METHODS: tuple[str, ...] = ("peft_lora", "full_finetune")
#: (res_attn-1head is a candidate for res_attn's default, so it is measured on the same seeds)
HEADLINE_METHODS: tuple[str, ...] = ("res_attn", "res_attn-1head", *REFERENCE_METHODS)


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
                Method(
                    f"{tuner}-large",
                    family,
                    ("--tuner", tuner, "--tuner_arg", *larger),
                    f"{tuner}, {' '.join(larger)}",
                )
            )
        for name, (alternative_of, settings) in ALTERNATIVE_SETTINGS.items():
            if alternative_of == tuner:
                flags = ("--tuner", tuner, "--tuner_arg", *settings)
                methods.append(Method(name, family, flags, f"{tuner}, {' '.join(settings)}"))
    methods += [
        Method(
            "peft_lora",
            "peft",
            ("--peft_method", "lora", "--peft_rank", str(MATCHED_LORA_RANK)),
            f"peft LoRA rank {MATCHED_LORA_RANK} (matched to res_attn's parameters)",
        ),
        Method(
            "peft_glora",
            "peft",
            ("--peft_method", "glora", "--peft_rank", str(PEFT_GLORA_RANK)),
            f"peft GLoRA rank {PEFT_GLORA_RANK}, peft's default A/B/C/D/E settings",
        ),
        Method(
            "peft_c3a",
            "c3a",
            ("--peft_method", "c3a", "--peft_block_size", str(PEFT_C3A_BLOCK_SIZE)),
            f"peft C3A block size {PEFT_C3A_BLOCK_SIZE}",
        ),
        Method("full_finetune", "full", ("--full_finetune",), "every UNet weight (the ceiling)"),
    ]
    return methods


def is_larger_setting(name: str) -> bool:
    """Whether ``name`` is a tuner's opt-in larger setting (``<tuner>-large``)."""
    return name.endswith("-large") and name.removesuffix("-large") in LARGER_SETTINGS


def is_opt_in(name: str) -> bool:
    """Whether ``name`` runs only when asked for: a larger setting or an alternative one."""
    return is_larger_setting(name) or name in ALTERNATIVE_SETTINGS


def default_methods() -> list[Method]:
    """The default selection: every tuner at its default size, the peft peers and full fine-tuning."""
    return [method for method in all_methods() if not is_opt_in(method.name)]


def select_methods(names: list[str] | None, with_large: bool = False) -> list[Method]:
    """The methods called ``names``, in the benchmark's order: None = :func:`default_methods`, ["all"] = every method
    including the larger and alternative settings. ``with_large`` adds the larger setting of every selected tuner
    that has one."""
    methods = all_methods()
    if names == ["all"]:
        return methods
    known = {method.name: method for method in methods}
    unknown = [name for name in names or [] if name not in known]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {sorted(known)} or 'all'")
    wanted = set(names) if names else {method.name for method in default_methods()}
    if with_large:
        wanted |= {f"{name}-large" for name in wanted if f"{name}-large" in known}
    return [method for method in methods if method.name in wanted]


def method_by_name(name: str) -> Method:
    """Any method, larger settings included (a run names its method; the selection does not matter here)."""
    return select_methods([name])[0]
