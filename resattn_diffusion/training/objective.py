"""What the denoiser is trained to predict: the one place the loss and the GLoRA search's fitness get it from."""

from __future__ import annotations

from typing import Any

import torch

#: prediction types a target can be computed for (diffusers' schedulers' ``config.prediction_type``)
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction", "sample")


def prediction_target(
    scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """The target of ``scheduler.add_noise(latents, noise, timesteps)`` for the scheduler's prediction type: the
    noise (epsilon), the velocity (v_prediction) or the clean latents (sample). ValueError for another type."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if prediction_type == "sample":
        return latents
    raise ValueError(f"unsupported prediction_type {prediction_type!r}; use one of {', '.join(PREDICTION_TYPES)}")
