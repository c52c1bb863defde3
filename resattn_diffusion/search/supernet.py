"""GLoRA supernet on a UNet: sample, set and count per-layer configurations; cut out a fixed GLoRA tuner file.

A GLoRA tuner added with ``supernet=True`` (``ResTunerConfig(tuner="glora", supernet=True, rank=8, ...)``) holds, on
every layer it sits beside, the largest forms of its choice space and evaluates whichever configuration is active.
A model's *configuration* (a *subnet*) is a dict ``{layer path: layer configuration string}``, e.g.
``{"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": "A=lora4,B=vector,C=none,D=scalar,E=none", ...}``.

* Training: call :func:`sample_subnet` once per optimisation step (a random configuration per layer per step),
  before the forward pass; the step then trains the weights that subnet uses. The training core does it through
  :class:`SubnetSampling`, the callback :func:`training_callbacks` hands it for a supernet.
* Search: :func:`set_subnet` evaluates a given configuration, :func:`subnet_parameter_count` is its size (what the
  budget limits); :mod:`resattn_diffusion.search.evolution` picks the best one.
* Export: :func:`save_subnet` writes the chosen configuration as an ordinary tuner file of a *fixed-configuration*
  GLoRA (default ``config`` plus exact per-layer ``overrides``), with weights cut out of the supernet; it loads with
  :func:`resattn_diffusion.load_res_tuner` like any other tuner and fuses into the weights.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from ..config import ResTunerConfig
from ..integration.api import ResTunerError, get_state, iter_tuners
from ..integration.io import file_tensors, write_tuner_file
from ..training.data import derive_seed
from ..training.trainable import TrainingCallback
from ..tuners.base import ConfigError
from ..tuners.glora import GLoRA, GLoRALayerConfig, num_parameters, parse_layer_config
from .glora_space import GLoRAChoiceSpace, sample_layer_config

__all__ = [
    "SubnetSampling",
    "fixed_glora_config",
    "get_subnet",
    "is_glora_supernet",
    "sample_layer_config",
    "sample_subnet",
    "save_subnet",
    "set_subnet",
    "subnet_parameter_count",
    "subnet_spaces",
    "supernet_layers",
    "training_callbacks",
]


# --- params ----------------------------------------------------------------------------------------------------


def is_glora_supernet(unet: nn.Module, adapter_name: str = "default") -> bool:
    """Whether ``unet`` carries a GLoRA supernet tuner named ``adapter_name`` (what a training loop checks to
    know it must call :func:`sample_subnet` every step)."""
    state = get_state(unet)
    if state is None or adapter_name not in state.configs:
        return False
    config = state.configs[adapter_name]
    return config.tuner == "glora" and bool(config.hyperparameters.get("supernet"))


def supernet_layers(unet: nn.Module, adapter_name: str = "default") -> Iterator[tuple[str, GLoRA]]:
    """(layer path, GLoRA supernet module) of the named tuner, in module order; a clear error if it is not one."""
    state = get_state(unet)
    if state is None or adapter_name not in state.configs:
        loaded = [] if state is None else list(state.configs)
        raise ResTunerError(
            f"no tuner named {adapter_name!r} on this UNet (loaded: {loaded}); add a GLoRA supernet with "
            "add_res_tuner(unet, ResTunerConfig(tuner='glora', supernet=True), adapter_name) or load its file"
        )
    if not is_glora_supernet(unet, adapter_name):
        config = state.configs[adapter_name]
        raise ResTunerError(
            f"tuner {adapter_name!r} is {config.tuner!r}"
            + (" with a fixed configuration" if config.tuner == "glora" else "")
            + ", not a GLoRA supernet; train one with --tuner glora --supernet (hyperparameter supernet=True)"
        )
    yield from iter_tuners(unet, adapter_name)


def _require_unfused(unet: nn.Module, adapter_name: str) -> None:
    for bank, _ in get_state(unet).banks:
        setting = bank.settings.get(adapter_name)
        if setting is not None and setting.fused:
            raise ResTunerError(
                f"tuner {adapter_name!r} is fused into the weights; unfuse_res_tuner(unet) before changing its subnet"
            )


def subnet_spaces(unet: nn.Module, adapter_name: str = "default") -> dict[str, GLoRAChoiceSpace]:
    """Layer path -> the choice space of that layer (without D on a bias-free layer)."""
    return {path: GLoRAChoiceSpace.of_module(module) for path, module in supernet_layers(unet, adapter_name)}


def get_subnet(unet: nn.Module, adapter_name: str = "default") -> dict[str, str]:
    """The configuration every layer evaluates now."""
    return {path: str(module.active_config) for path, module in supernet_layers(unet, adapter_name)}


def sample_subnet(
    unet: nn.Module, generator: torch.Generator | random.Random, adapter_name: str = "default"
) -> dict[str, str]:
    """Draw and set a random configuration on every layer (each layer and support independently, uniformly over its
    choice space); returns it. Reproducible for a seeded ``generator``. Call once per training step."""
    _require_unfused(unet, adapter_name)
    configs = {}
    for path, module in supernet_layers(unet, adapter_name):
        layer_config = sample_layer_config(module.held_forms, generator)
        module.set_active(layer_config)
        configs[path] = str(module.active_config)
    return configs


class SubnetSampling(TrainingCallback):
    """Train a random subnet per optimisation step (issue 3): the same on every process and a function of
    (seed, step) only, so a resumed run samples the same subnets. Batches accumulated into one step share it."""

    def __init__(self, seed: int, adapter_name: str = "default"):
        self.seed = seed
        self.adapter_name = adapter_name
        self._sampled_step: int | None = None

    def on_step_begin(self, unet: nn.Module, global_step: int) -> None:
        if self._sampled_step != global_step:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, "glora_subnet", global_step))
            sample_subnet(unet, generator, self.adapter_name)
            self._sampled_step = global_step


def training_callbacks(unet: nn.Module, seed: int, adapter_name: str = "default") -> list[TrainingCallback]:
    """What training the tuner ``adapter_name`` on ``unet`` needs each step: subnet sampling for a GLoRA
    supernet, nothing for any other tuner."""
    return [SubnetSampling(seed, adapter_name)] if is_glora_supernet(unet, adapter_name) else []


def _check_layers(layers: list[tuple[str, GLoRA]], configs: Mapping[str, str]) -> None:
    if not isinstance(configs, Mapping):  # a list of paths was a raw TypeError / AttributeError
        raise ConfigError(
            f"a subnet is a dict {{layer path: configuration string}} (as get_subnet(unet) returns), got "
            f"{type(configs).__name__}"
        )
    paths = {path for path, _ in layers}
    missing = [path for path, _ in layers if path not in configs]
    unknown = [path for path in configs if path not in paths]
    if missing or unknown:
        problems = []
        if missing:
            problems.append(f"{len(missing)} layer(s) of the supernet have no configuration, e.g. {missing[0]!r}")
        if unknown:
            problems.append(f"{len(unknown)} configured layer(s) are not in the supernet, e.g. {unknown[0]!r}")
        raise ConfigError(
            "the subnet does not fit this supernet: " + "; ".join(problems) + ". Give one configuration per layer "
            "(get_subnet(unet) lists them)"
        )


def _checked_subnet(layers: list[tuple[str, GLoRA]], configs: Mapping[str, str]) -> dict[str, GLoRALayerConfig]:
    """``configs`` parsed, one per layer, each inside its layer's choice space: the forms the supernet trained. A
    form it did not train (``lora3`` of a ``lora4|lora2`` space: a slice of a larger form that was never sampled)
    would cut weights that were never trained as that form."""
    _check_layers(layers, configs)
    parsed = {}
    for path, module in layers:
        layer_config = parse_layer_config(configs[path])
        space = GLoRAChoiceSpace.of_module(module)
        if not space.contains(layer_config if module.has_bias else layer_config.without_bias()):
            raise ConfigError(f"layer {path}: configuration {layer_config} is outside its choice space {space}")
        parsed[path] = layer_config
    return parsed


def set_subnet(unet: nn.Module, configs: Mapping[str, str], adapter_name: str = "default") -> None:
    """Make every layer evaluate ``configs[layer path]``; every layer needs one and each must lie in the supernet.
    Checked before anything changes."""
    _require_unfused(unet, adapter_name)
    layers = list(supernet_layers(unet, adapter_name))
    parsed = _checked_subnet(layers, configs)
    for path, module in layers:
        module.set_active(parsed[path])


def subnet_parameter_count(unet: nn.Module, configs: Mapping[str, str], adapter_name: str = "default") -> int:
    """Trainable parameters of the fixed GLoRA that ``configs`` describes (what the search's budget limits); each
    configuration must lie in the supernet's choice space."""
    layers = list(supernet_layers(unet, adapter_name))
    parsed = _checked_subnet(layers, configs)
    return sum(num_parameters(parsed[path], module.d_out, module.d_in, module.has_bias) for path, module in layers)


def fixed_glora_config(supernet_config: ResTunerConfig, configs: Mapping[str, str]) -> ResTunerConfig:
    """The config of a fixed-configuration GLoRA equal to the subnet ``configs``: the most common layer configuration
    as ``config`` and an exact-path override for every layer that differs (exact paths always win)."""
    canonical = {path: str(parse_layer_config(text)) for path, text in configs.items()}
    counts = Counter(canonical.values())
    # most common first; ties by the configuration string so the choice is deterministic
    default = min(counts, key=lambda text: (-counts[text], text))
    overrides = {path: text for path, text in canonical.items() if text != default}
    return supernet_config.replace(supernet=False, choices="", config=default, overrides=overrides)


def save_subnet(
    unet: nn.Module,
    configs: Mapping[str, str],
    path: str | os.PathLike,
    adapter_name: str = "default",
    saved_name: str = "default",
    overwrite: bool = True,
) -> Path:
    """Write the subnet ``configs`` of the supernet ``adapter_name`` as a tuner file of a fixed-configuration GLoRA
    (``path``: a ``.safetensors`` file, or a folder that gets ``res_tuner.safetensors``). ``saved_name`` is the name
    it loads under by default. Same format as :func:`resattn_diffusion.save_res_tuner` (atomic write)."""
    layers = list(supernet_layers(unet, adapter_name))
    _checked_subnet(layers, configs)  # an edited search result: only forms the supernet trained are cut out
    config = fixed_glora_config(get_state(unet).configs[adapter_name], configs)
    tensors = file_tensors((layer_path, module.fixed_state_dict(configs[layer_path])) for layer_path, module in layers)
    return write_tuner_file(unet, path, config, tensors, saved_name, overwrite)
