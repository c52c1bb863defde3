"""What a tuner will hold on a model, known before it is built: every tensor's file key and shape, from modules
built on the ``meta`` device (no memory, no initialisation cost, whatever the config says). Used to refuse a
tuner larger than its model (the core API, the training flags) and a file whose tensors do not match its own
config (a 24 kB file whose config claims rank 1,000,000) before a single real parameter is allocated.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ResTunerConfig
from .families import family_of
from .io import tuner_file_key
from .kinds import kind_of
from .state import ResTunerError


def planned_tensor_shapes(unet: nn.Module, config: ResTunerConfig) -> dict[str, tuple[int, ...]]:
    """File key (:func:`~.io.tuner_file_key`, as :func:`~.io.tuner_state_dict` writes them) -> shape of every
    tensor of the tuner ``config`` puts on ``unet``. Raises ``ConfigError`` / ``ResTunerError`` like adding it."""
    family = family_of(unet)
    family.check_kind(config)
    with torch.device("meta"):
        modules = kind_of(config).plan(unet, family, config)
    return {
        tuner_file_key(path, key): tuple(value.shape)
        for path, module in modules
        for key, value in module.state_dict().items()
    }


def own_parameter_count(unet: nn.Module) -> int:
    """Parameters of the model itself, without the res tuners on it (they live under ``res_tuner*`` / ``bank``)."""
    return sum(p.numel() for name, p in unet.named_parameters() if "res_tuner" not in name and ".bank." not in name)


def check_tuner_size(
    unet: nn.Module, config: ResTunerConfig, shapes: dict[str, tuple[int, ...]] | None = None
) -> None:
    """Refuse a tuner with more parameters than the model it tunes: a side tuner is a small fraction of its
    model (a few percent at most), so a bigger one is a typo or an attack (rank 10^9), and building it would
    exhaust memory before any shape check could fail."""
    shapes = planned_tensor_shapes(unet, config) if shapes is None else shapes
    count = sum(_numel(shape) for shape in shapes.values())
    own = own_parameter_count(unet)
    if count > own:
        raise ResTunerError(
            f"this {config.tuner} config ({config.hyperparameters}) would have {count:,} parameters, more than the "
            f"{own:,} of the model it tunes; a side tuner is a small fraction of its model: lower its rank or sizes"
        )


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count
