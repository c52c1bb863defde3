"""The peers our tuners are measured against, attached the way a diffusers user would, at matched sizes.

* peft LoRA through diffusers (``unet.add_adapter(LoraConfig(...))``) on ``to_q, to_k, to_v, to_out.0``, with
  the rank whose parameter count is nearest a given one;
* peft's GLoRA (``peft.tuners.glora``) with the same support-tensor forms and rank as our GLoRA;
* peft's block-circulant C3A (``peft.tuners.c3a``), the nearest thing to SURM, with a block size per layer
  chosen so that each layer has (nearly) the parameters of a given SURM family.

All of them sit beside the same projections as our linear tuners' default (attn1 and attn2 of every
transformer block), and start as exact no-ops, like ours.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

#: The attention projections every peer (and our linear tuners by default) sits beside.
PEER_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")


def attention_linears(unet: nn.Module) -> dict[str, nn.Linear]:
    """Full name -> the frozen ``nn.Linear`` of every ``to_q/to_k/to_v/to_out.0`` of the UNet's attentions."""
    linears = {}
    for name, module in unet.named_modules():
        if isinstance(module, nn.Linear) and any(name.endswith("." + target) for target in PEER_TARGET_MODULES):
            linears[name] = module
    if not linears:
        raise ValueError("the UNet has no to_q/to_k/to_v/to_out.0 linear layers; peers cannot be attached")
    return linears


def lora_parameter_count(unet: nn.Module, rank: int) -> int:
    """Trainable parameters of LoRA of ``rank`` on every attention projection: ``sum r (d_in + d_out)``."""
    return sum(rank * (linear.in_features + linear.out_features) for linear in attention_linears(unet).values())


def matched_lora_rank(unet: nn.Module, target_parameters: int) -> int:
    """The LoRA rank whose parameter count is nearest ``target_parameters`` (at least 1)."""
    per_rank = lora_parameter_count(unet, 1)
    low = max(1, target_parameters // per_rank)
    return min((low, low + 1), key=lambda rank: abs(rank * per_rank - target_parameters))


def add_peft_lora(unet: nn.Module, rank: int) -> None:
    """peft LoRA of ``rank`` (``lora_alpha = rank``) through diffusers' ``add_adapter``; B is zero, as ours."""
    from peft import LoraConfig

    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, target_modules=list(PEER_TARGET_MODULES), init_lora_weights="gaussian")
    )


def add_peft_glora(unet: nn.Module, rank: int, config_a_b: str, config_c: str, config_d_e: str) -> None:
    """peft's GLoRA: A and B share a form (``config_a_b``), so do D and E (``config_d_e``); ``"constant"`` is
    peft's name for our ``"scalar"``. peft leaves C, D, E out on layers without bias."""
    from peft.tuners.glora import GloraConfig

    unet.add_adapter(
        GloraConfig(
            r=rank,
            target_modules=list(PEER_TARGET_MODULES),
            config_A_B=config_a_b,
            config_C=config_c,
            config_D_E=config_d_e,
        )
    )


def glora_peft_forms(
    config_a: str, config_b: str, config_c: str, config_d: str, config_e: str
) -> tuple[str, str, str]:
    """Our GLoRA forms -> peft's (config_A_B, config_C, config_D_E); raises if peft cannot express them."""

    def peft_name(form: str) -> str:
        if form.startswith("lora"):
            return "lora"
        return {"scalar": "constant"}.get(form, form)

    if peft_name(config_a) != peft_name(config_b) or peft_name(config_d) != peft_name(config_e):
        raise ValueError(
            f"peft's GLoRA ties A to B and D to E; A={config_a}, B={config_b}, D={config_d}, E={config_e} "
            "has no peft equivalent"
        )
    return peft_name(config_a), peft_name(config_c), peft_name(config_d)


def _common_divisors(a: int, b: int) -> list[int]:
    g = math.gcd(a, b)
    return [d for d in range(1, g + 1) if g % d == 0]


def c3a_block_sizes(unet: nn.Module, parameters_per_layer: Callable[[int, int], int]) -> dict[str, int]:
    """Per layer, the C3A block size b (dividing d_in and d_out) whose parameter count ``d_in d_out / b`` is
    nearest ``parameters_per_layer(d_out, d_in)`` (ties: the larger block, i.e. fewer parameters)."""
    sizes = {}
    for name, linear in attention_linears(unet).items():
        d_in, d_out = linear.in_features, linear.out_features
        target = parameters_per_layer(d_out, d_in)
        sizes[name] = min(_common_divisors(d_in, d_out), key=lambda b: (abs(d_in * d_out // b - target), -b))
    return sizes


def c3a_parameter_count(unet: nn.Module, block_sizes: dict[str, int]) -> int:
    linears = attention_linears(unet)
    return sum(linears[name].in_features * linears[name].out_features // b for name, b in block_sizes.items())


def add_peft_c3a(unet: nn.Module, block_sizes: dict[str, int]) -> None:
    """peft's C3A with one block size per layer (``block_size_pattern`` keyed by the full layer name, which peft
    looks up as it is); ``init_weights=True`` zero-initialises the kernels (a no-op, as ours)."""
    from peft.tuners.c3a import C3AConfig

    default = max(set(block_sizes.values()), key=list(block_sizes.values()).count)
    unet.add_adapter(
        C3AConfig(
            block_size=default,
            block_size_pattern=dict(block_sizes),
            target_modules=list(PEER_TARGET_MODULES),
            init_weights=True,
        )
    )


def peft_available() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


def peft_has(method: str) -> bool:
    """Whether the installed peft has ``peft.tuners.<method>`` (GLoRA and C3A are recent additions)."""
    import importlib

    try:
        importlib.import_module(f"peft.tuners.{method}")
    except ImportError:
        return False
    return True


def trainable_parameters(unet: nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in unet.parameters() if p.requires_grad]
