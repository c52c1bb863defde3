"""Model-level tuners on a diffusers UNet: the Res-Tuning-Bypass side network (tuner kind ``"model"``).

The kind's attach interface (:class:`~.kinds.model.ModelKind`) calls :func:`attach_unet_tuner`,
:func:`detach_unet_tuner`, :func:`iter_unet_tuner`, :func:`unet_tuner_settings` and :func:`unet_tuner_fingerprint`.
The math is :class:`resattn_diffusion.tuners.bypass.ResBypass`; this module only wires it to the UNet:

* a forward hook on ``mid_block`` and on each ``up_blocks[i]`` keeps the block's output, **detached** (``h_i``);
* a forward pre-hook on ``conv_norm_out`` (``conv_out`` when the UNet has no output norm) runs every active bypass
  on those outputs and adds ``s * b_N`` to its input;
* the named bypasses sit in one :class:`BypassBank` (a :class:`~.processors.TunerBank`), the UNet child module
  ``res_tuner_bypass``; the bank is in the core's ``state.banks``, so ``set_res_tuner_scale``,
  ``set_res_tuner_enabled`` and the per-call ``cross_attention_kwargs={"res_tuner_scale": s}`` reach it.

The memory/time promise. Gradients never enter the UNet, so when nothing inside the UNet body is trainable, a
training forward need not record the body at all. A forward pre-hook on the UNet then switches autograd off for
the body (from ``conv_in`` to the last up block), the injection pre-hook switches it back on, and the UNet's
forward hook (``always_call``: it runs when the forward raises, too) restores the caller's mode. The graph of
such a step holds only the bypass and the frozen tail ``conv_norm_out -> conv_act -> conv_out`` that carries
the gradient from the loss to the bypass; a training loop needs nothing special. The body keeps its graph, in
the caller's grad mode, whenever :func:`requires_unet_backward` says so -- an attention-side tuner (or peft LoRA,
or any other trainable parameter) lives in the body -- or an input of the call requires grad (e.g. a text
embedding from a text encoder being trained): then the bypass still reads detached outputs, and everything else
trains as usual.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..config import ResTunerConfig
from ..tuners.base import ConfigError
from .processors import TunerBank, TunerSetting
from .state import ResTunerError, ResTunerState, get_state, remove_forward_hooks

#: The UNet child module holding the bank of bypasses (its parameters are named ``res_tuner_bypass.*``).
BANK_ATTR = "res_tuner_bypass"
#: Set in the ``__dict__`` of every hooked block (not a child module): ``(bank, index of the feature or None)``.
_SLOT_ATTR = "_res_tuner_bypass_slot"


class BypassBank(TunerBank):
    """The named bypasses of one UNet, with their scales and on/off state, and the buffers of one UNet call.

    ``source_paths[i]`` is the block whose output is ``h_i`` (``"mid_block"``, ``"up_blocks.0"``, ...);
    ``injection_path`` the module whose input gets ``s * b_N``.
    """

    def __init__(self, source_paths: list[str], widths: list[int], injection_path: str):
        super().__init__(injection_path)
        self.source_paths = list(source_paths)
        self.widths = list(widths)
        self.injection_path = injection_path
        #: index -> detached output of ``source_paths[index]``, for the current UNet call only.
        self.features: dict[int, torch.Tensor] = {}
        #: Whether the current UNet call switched autograd off for the body (restored by the hooks).
        self.body_without_grad = False

    def extra_repr(self) -> str:
        return f"sources={self.source_paths}, injection={self.injection_path!r}, settings={self.settings}"


# --- where the bypass reads and writes ---------------------------------------------------------------------------
def bypass_sources(unet: nn.Module) -> list[tuple[str, nn.Module, int]]:
    """(path, block, output channels) of the blocks the bypass reads: ``mid_block`` (when the UNet has one) and
    every ``up_blocks[i]``, in the order the UNet runs them. Widths follow ``config.block_out_channels``."""
    config = getattr(unet, "config", None)
    widths = list(getattr(config, "block_out_channels", None) or [])
    up_blocks = getattr(unet, "up_blocks", None)
    if not widths or not isinstance(up_blocks, nn.ModuleList) or len(up_blocks) != len(widths):
        raise ResTunerError(
            "res_bypass sits beside the decoder of a diffusers UNet2DConditionModel (mid_block, up_blocks, "
            f"conv_norm_out); got a {type(unet).__name__}. Pass the pipeline's UNet (pipe.unet)"
        )
    sources: list[tuple[str, nn.Module, int]] = []
    if getattr(unet, "mid_block", None) is not None:
        sources.append(("mid_block", unet.mid_block, int(widths[-1])))
    for i, (block, width) in enumerate(zip(up_blocks, reversed(widths))):
        sources.append((f"up_blocks.{i}", block, int(width)))
    return sources


def injection_point(unet: nn.Module) -> tuple[str, nn.Module]:
    """The module whose input gets the bypass: ``conv_norm_out``, or ``conv_out`` in a UNet without output norm."""
    if getattr(unet, "conv_norm_out", None) is not None:
        return "conv_norm_out", unet.conv_norm_out
    if getattr(unet, "conv_out", None) is not None:
        return "conv_out", unet.conv_out
    raise ResTunerError(
        f"{type(unet).__name__} has neither conv_norm_out nor conv_out; res_bypass needs a diffusers UNet"
    )


def _decoder(unet: nn.Module) -> tuple[list[tuple[str, nn.Module, int]], str, nn.Module]:
    """The sources and the injection point, checked against each other."""
    sources = bypass_sources(unet)
    injection_path, injection = injection_point(unet)
    head_width = getattr(injection, "num_channels", None) or getattr(injection, "in_channels", None)
    if head_width is not None and head_width != sources[-1][2]:
        raise ResTunerError(
            f"{injection_path} takes {head_width} channels but the last up block gives {sources[-1][2]} "
            "(block_out_channels[0]); res_bypass supports UNet2DConditionModel layouts only"
        )
    return sources, injection_path, injection


def _tail_modules(unet: nn.Module) -> list[nn.Module]:
    """The frozen output head after the injection point, which the bypass's gradient passes through."""
    return [
        m
        for m in (getattr(unet, n, None) for n in ("conv_norm_out", "conv_act", "conv_out"))
        if isinstance(m, nn.Module)
    ]


def _check_config(config: ResTunerConfig) -> None:
    if config.blocks is not None:
        raise ConfigError(
            "res_bypass reads mid_block and every up block and adds its output before conv_norm_out: `blocks` does "
            f"not apply to it (got {list(config.blocks)}); leave blocks=None"
        )
    if config.placement != "parallel":
        raise ConfigError("res_bypass adds its output to the input of conv_norm_out; placement must be 'parallel'")


def _get_bank(unet: nn.Module, adapter_name: str | None = None) -> BypassBank:
    bank = getattr(unet, BANK_ATTR, None)
    if not isinstance(bank, BypassBank) or (adapter_name is not None and adapter_name not in bank.tuners):
        raise ResTunerError(f"no res_bypass named {adapter_name!r} on this UNet")
    return bank


# --- the functions the model kind calls -----------------------------------------------------------------------
def unet_tuner_fingerprint(unet: nn.Module, config: ResTunerConfig) -> dict[str, dict[str, int]]:
    """Path of each block the bypass reads -> its output channels: what a saved bypass must agree with."""
    _check_config(config)
    sources, _, _ = _decoder(unet)
    return {path: {"channels": width} for path, _, width in sources}


def attach_unet_tuner(unet: nn.Module, config: ResTunerConfig, adapter_name: str, state: ResTunerState) -> list[str]:
    """Build the bypass for this UNet's widths (trainable, in the dtype/device of the output head) and hook it in;
    returns the paths of the blocks it reads. Nothing on the UNet changes if building fails."""
    _check_config(config)
    sources, injection_path, injection = _decoder(unet)
    widths = [width for _, _, width in sources]
    reference = next(injection.parameters(), None)
    dtype = reference.dtype if reference is not None else torch.float32
    device = reference.device if reference is not None else torch.device("cpu")
    bypass = config.spec.module_cls(widths, config.params).to(device=device, dtype=dtype)

    bank = getattr(unet, BANK_ATTR, None)
    if bank is None:
        bank = BypassBank([path for path, _, _ in sources], widths, injection_path)
        _install(unet, bank, sources, injection)
        state.add_bank(bank, unet)  # in the state's banks, scales set for one call reach the bypass too
    bank.add(adapter_name, bypass, config.scale, "parallel")
    return list(bank.source_paths)


def detach_unet_tuner(unet: nn.Module, adapter_name: str, state: ResTunerState) -> None:
    """Remove the named bypass; with the last one, every hook and the bank go, restoring the UNet exactly."""
    bank = _get_bank(unet, adapter_name)
    bank.remove(adapter_name)
    if len(bank):
        return
    _uninstall(unet, bank)
    state.drop_bank(bank)


def iter_unet_tuner(unet: nn.Module, adapter_name: str) -> Iterator[tuple[str, nn.Module]]:
    """(path of the block a stage reads, the stage) for the named bypass: file keys are ``<path>.<parameter>``,
    e.g. ``up_blocks.3.up.conv.weight``."""
    bank = _get_bank(unet, adapter_name)
    yield from zip(bank.source_paths, bank.tuners[adapter_name].stages)


def unet_tuner_settings(unet: nn.Module, adapter_name: str) -> list[TunerSetting]:
    """The scale / enabled setting of the named bypass (what set_res_tuner_scale / set_res_tuner_enabled change)."""
    return [_get_bank(unet, adapter_name).settings[adapter_name]]


def requires_unet_backward(unet: nn.Module) -> bool:
    """Whether a training step on ``unet`` needs the autograd graph of the UNet body.

    False exactly when a bypass is on the UNet and nothing else in the body is trainable: no other res tuner
    (those sit in the body), and no parameter outside the bypass and the output head requires grad (peft LoRA,
    or a UNet that was not frozen with ``unet.requires_grad_(False)``). Then a training forward builds no graph
    through the body by itself (see the module docstring); a training core may also use this to skip gradient
    checkpointing. True for a UNet without a bypass.
    """
    bank = getattr(unet, BANK_ATTR, None)
    state = get_state(unet)
    if not isinstance(bank, BypassBank) or not len(bank) or state is None:
        return True
    if any(config.spec.kind != "model" for config in state.configs.values()):
        return True
    outside_body = {id(p) for p in bank.parameters()}
    for module in _tail_modules(unet):
        outside_body.update(id(p) for p in module.parameters())
    return any(p.requires_grad and id(p) not in outside_body for p in unet.parameters())


# --- hooks (module-level functions: a deep-copied UNet keeps working, removal finds them by identity) ----------
def _requires_grad(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.requires_grad
    if isinstance(value, (list, tuple)):
        return any(_requires_grad(v) for v in value)
    if isinstance(value, dict):
        return any(_requires_grad(v) for v in value.values())
    return False


def _bypass_unet_pre_hook(unet: nn.Module, args: tuple, kwargs: dict) -> None:
    bank: BypassBank = getattr(unet, BANK_ATTR)
    bank.features = {}
    bank.body_without_grad = False
    if torch.is_grad_enabled() and not requires_unet_backward(unet) and not _requires_grad((args, kwargs)):
        # Nothing in the body can receive a gradient: do not record it (switched back on at the injection point).
        bank.body_without_grad = True
        torch.set_grad_enabled(False)
    return None


def _bypass_unet_post_hook(unet: nn.Module, args: tuple, output: Any) -> None:
    # Registered with always_call=True: runs after a forward that raised, too, so the caller's mode comes back.
    bank = getattr(unet, BANK_ATTR, None)
    if isinstance(bank, BypassBank):
        if bank.body_without_grad:
            torch.set_grad_enabled(True)
            bank.body_without_grad = False
        bank.features = {}
    return None


def _capture_hook(block: nn.Module, args: tuple, output: Any) -> None:
    bank, index = block.__dict__[_SLOT_ATTR]
    hidden = output[0] if isinstance(output, tuple) else output
    if not isinstance(hidden, torch.Tensor):
        raise ResTunerError(f"res_bypass: {bank.source_paths[index]} returned a {type(hidden).__name__}, not a tensor")
    bank.features[index] = hidden.detach()  # detached: the bypass never sends a gradient into the UNet
    return None


def _inject_pre_hook(module: nn.Module, args: tuple) -> tuple | None:
    bank: BypassBank = module.__dict__[_SLOT_ATTR][0]
    if bank.body_without_grad:
        torch.set_grad_enabled(True)  # the bypass and the tail after this point carry the gradient
    features, bank.features = bank.features, {}
    if not features:
        return None  # called on its own, outside a UNet forward: there is nothing to add
    active = list(bank.active())
    if not active:
        return None
    missing = [path for i, path in enumerate(bank.source_paths) if i not in features]
    if missing:
        raise ResTunerError(
            f"res_bypass: {missing} did not run before {bank.injection_path} in this UNet call; the bypass reads the "
            "outputs of mid_block and every up block"
        )
    hidden = [features[i] for i in range(len(bank.source_paths))]
    sample = args[0]
    out = sample
    for _, bypass, scale, _ in active:
        dtype = next(bypass.parameters()).dtype
        b = bypass([h.to(dtype) for h in hidden])
        out = out + scale * b.to(sample.dtype)
    return (out, *args[1:])


def _install(
    unet: nn.Module, bank: BypassBank, sources: list[tuple[str, nn.Module, int]], injection: nn.Module
) -> None:
    setattr(unet, BANK_ATTR, bank)
    for index, (_, block, _) in enumerate(sources):
        block.__dict__[_SLOT_ATTR] = (bank, index)
        block.register_forward_hook(_capture_hook)
    injection.__dict__[_SLOT_ATTR] = (bank, None)
    injection.register_forward_pre_hook(_inject_pre_hook)
    unet.register_forward_pre_hook(_bypass_unet_pre_hook, with_kwargs=True)
    unet.register_forward_hook(_bypass_unet_post_hook, always_call=True)


def _uninstall(unet: nn.Module, bank: BypassBank) -> None:
    for module in unet.modules():
        slot = module.__dict__.get(_SLOT_ATTR)
        if slot is not None and slot[0] is bank:
            remove_forward_hooks(module, _capture_hook)
            remove_forward_hooks(module, _inject_pre_hook)
            del module.__dict__[_SLOT_ATTR]
    remove_forward_hooks(unet, _bypass_unet_pre_hook)
    remove_forward_hooks(unet, _bypass_unet_post_hook)
    if bank.body_without_grad:  # only if removed from inside a UNet call; give the caller its mode back
        torch.set_grad_enabled(True)
        bank.body_without_grad = False
    delattr(unet, BANK_ATTR)
