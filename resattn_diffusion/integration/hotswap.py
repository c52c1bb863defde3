"""Hotswap: replace the weights of a loaded tuner in place, so that a compiled UNet runs the new ones without
recompiling (the parameters stay the same tensor objects, the bank's branches and settings stay as they were).

Like diffusers' ``load_lora_weights(..., hotswap=True)``: the new weights must be of the same tuner, placement and
layers with the same shapes; anything else is refused before a single value changes.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ResTunerConfig
from .api import ResTunerError, get_state, res_tuner_settings, set_res_tuner_scale
from .io import ResTunerFileError, load_tuner_tensors


def _structure(config: ResTunerConfig) -> dict:
    """What must agree for weights to swap in place: everything in the config but the scale."""
    data = config.to_dict()
    data.pop("scale", None)
    return data


def hotswap_res_tuner(
    unet: nn.Module, adapter_name: str, config: ResTunerConfig, tensors: dict[str, torch.Tensor], source: str
) -> str:
    """Copy ``tensors`` (file keys) into the loaded tuner ``adapter_name``, which must have ``config``'s structure;
    the tuner's scale becomes ``config.scale``. Everything is checked first; on any error nothing changes."""
    state = get_state(unet)
    loaded = [] if state is None else list(state.configs)
    if adapter_name not in loaded:
        raise ResTunerError(
            f"hotswap=True replaces a loaded tuner, but none is named {adapter_name!r} (loaded: {loaded}); load it "
            "first without hotswap, or pass the name of a loaded one"
        )
    current = state.configs[adapter_name]
    if _structure(current) != _structure(config):
        mine, theirs = _structure(current), _structure(config)
        differing = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        raise ResTunerFileError(
            f"cannot hotswap {source!r} into tuner {adapter_name!r}: their configs differ in {differing} "
            f"(loaded: {[mine.get(k) for k in differing]}, new: {[theirs.get(k) for k in differing]}). Hotswap needs "
            "the same tuner, targets, blocks, projections, placement and hyperparameters; unload and load instead"
        )
    if res_tuner_settings(unet)[adapter_name]["fused"]:
        raise ResTunerError(f"tuner {adapter_name!r} is fused into the weights; unfuse it before hotswapping")
    # every tensor checked first (present, shape, finite, none left over), then copied into the same parameters
    load_tuner_tensors(unet, adapter_name, tensors, source)
    if current.scale != config.scale:
        set_res_tuner_scale(unet, config.scale, adapter_name)
    return adapter_name


__all__ = ["hotswap_res_tuner"]
