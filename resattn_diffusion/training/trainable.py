"""What a training run updates, and how the result is saved and loaded: the provider interface and ours.

The training core (:func:`~resattn_diffusion.training.train`) never decides what trains. It asks a
:class:`TrainableProvider` to prepare the UNet, give the parameters the optimizer gets, describe them in one log
line, and save them; everything else of a run (data, loss, optimizer, checkpoints of the optimizer state,
validation) is the same whatever trains. The library's provider is :class:`ResTunerTrainable` (a res tuner from
``--tuner`` and its flags, saved as ``res_tuner.safetensors``); comparison baselines (peft adapters, full
fine-tuning) are providers that live with the benchmarks (``benchmarks/peers``) and go through the same core.

A provider may also hand the loop :class:`TrainingCallback` objects: called before every optimizer step's
forward passes and once after training (a GLoRA supernet samples its subnet there, see
:class:`~resattn_diffusion.search.supernet.SubnetSampling`).

:func:`load_trained_unet` puts a res tuner run's result back on a base UNet and :func:`load_tuned_pipeline` builds
the tuned pipeline for evaluation::

    pipe = load_tuned_pipeline("base_model_folder", "output_dir")
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ResTunerConfig
from ..integration.api import add_res_tuner, format_summary, res_tuner_parameters, res_tuner_summary
from ..integration.io import WEIGHT_NAME, load_res_tuner, save_res_tuner
from .errors import TrainingError

TUNER_CONFIG_NAME = "tuner_config.json"


@dataclass(frozen=True)
class TrainingSummary:
    """What a finished run did, as the loop measured it (handed to :meth:`TrainingCallback.on_train_end`)."""

    output_dir: Path
    #: the saved result (:meth:`TrainableProvider.result_path`)
    result: Path
    trainable_parameters: int
    #: optimizer steps of this run (a resumed run counts only its own)
    steps: int
    #: wall time of the training loop: data, forward, backward, optimizer, and any checkpoints and validation
    #: in between; no model loading
    loop_seconds: float


class TrainingCallback:
    """Hooks the training loop calls; override what you need (the defaults do nothing).

    Callbacks run on every process. ``on_step_begin`` runs before the forward pass of each batch, with the number
    of finished optimizer steps (the same for all batches that accumulate into one step); ``on_train_end`` runs on
    the main process after the result is saved.
    """

    def on_step_begin(self, unet: nn.Module, global_step: int) -> None:
        """Before the forward pass of a batch of optimizer step ``global_step`` (0-based)."""

    def on_train_end(self, summary: TrainingSummary) -> None:
        """After the result is saved (main process only)."""


class TrainableProvider(ABC):
    """What to train: the interface between the training core and whatever makes the trainable parameters.

    ``prepare`` gets the frozen UNet (already on its device, in the weight dtype) and returns what the optimizer
    gets; ``save`` writes the result under ``output_dir`` at :meth:`result_path`. The optional hooks default to
    doing nothing, so a provider is four methods.
    """

    #: a short name for logs and records, e.g. ``"res_tuner"``
    name: str = "trainable"

    @abstractmethod
    def result_path(self, output_dir: Path) -> Path:
        """Where :meth:`save` writes inside ``output_dir`` (a file or a folder); its existence means a finished run."""

    @abstractmethod
    def prepare(self, unet: nn.Module, weight_dtype: torch.dtype) -> list[nn.Parameter]:
        """Make ``unet`` trainable as this provider wants and return its trainable parameters.

        Trainable parameters are kept in fp32 under mixed precision (the frozen weights run in ``weight_dtype``):
        fp16 gradients cannot be unscaled, and bf16 weights lose small updates.
        """

    @abstractmethod
    def describe(self, unet: nn.Module, parameters: list[nn.Parameter]) -> str:
        """A log paragraph: what trains, and how many parameters."""

    @abstractmethod
    def save(self, unet: nn.Module, output_dir: Path) -> Path:
        """Save what was trained into ``output_dir``; returns :meth:`result_path`."""

    # --- optional hooks ----------------------------------------------------------------------------------------
    def check_resume(self, checkpoint: Path) -> None:  # noqa: B027 - an optional hook: doing nothing is its default
        """Raise :class:`TrainingError` if ``checkpoint`` was written by a run that trained something else."""

    def register_checkpoint_hooks(self, accelerator: Any, unet: nn.Module) -> None:  # noqa: B027 - an optional hook: doing nothing is its default
        """Change what accelerate's ``save_state`` / ``load_state`` store of ``unet`` (default: its whole state)."""

    def write_config(self, output_dir: Path) -> None:  # noqa: B027 - an optional hook: doing nothing is its default
        """Write the provider's own config beside the run's ``args.json`` (main process, before training)."""

    def callbacks(self, unet: nn.Module, seed: int) -> list[TrainingCallback]:
        """Callbacks this provider needs during training of the prepared ``unet`` (``seed``: the run's seed)."""
        return []


def prepare_unet_for_training(
    unet: nn.Module, config: ResTunerConfig, weight_dtype: torch.dtype
) -> list[nn.Parameter]:
    """Freeze ``unet`` in ``weight_dtype``, add the tuner, and keep the tuner's parameters in fp32.

    Under mixed precision the frozen weights run in fp16/bf16 while the optimizer updates fp32 tuner weights
    (diffusers' ``cast_training_params``): fp16 gradients cannot be unscaled, and bf16 weights lose small updates.
    Returns the trainable parameters (what the optimizer gets).
    """
    from diffusers.training_utils import cast_training_params

    from .models import move

    unet.requires_grad_(False)
    move(unet, None, weight_dtype)
    add_res_tuner(unet, config)
    cast_training_params(unet, dtype=torch.float32)
    parameters = res_tuner_parameters(unet)
    not_fp32 = [p for p in parameters if p.dtype != torch.float32]
    if not_fp32:
        raise TrainingError(
            f"{len(not_fp32)} tuner parameter(s) of {config.tuner} are not registered under the UNet, so they could "
            "not be kept in fp32 (and would not be synchronised across processes): the tuner must be a submodule of "
            "the UNet"
        )
    return parameters


class ResTunerTrainable(TrainableProvider):
    """The library's provider: the res tuner ``config`` (from ``--tuner`` and its flags), saved as
    ``res_tuner.safetensors``; checkpoints hold the tuner file instead of the frozen UNet."""

    name = "res_tuner"

    def __init__(self, config: ResTunerConfig):
        self.config = config

    def result_path(self, output_dir: Path) -> Path:
        return Path(output_dir) / WEIGHT_NAME

    def prepare(self, unet: nn.Module, weight_dtype: torch.dtype) -> list[nn.Parameter]:
        return prepare_unet_for_training(unet, self.config, weight_dtype)

    def describe(self, unet: nn.Module, parameters: list[nn.Parameter]) -> str:
        return format_summary(res_tuner_summary(unet))

    def save(self, unet: nn.Module, output_dir: Path) -> Path:
        return save_res_tuner(unet, output_dir)

    def check_resume(self, checkpoint: Path) -> None:
        from .checkpoint import check_checkpoint_matches

        check_checkpoint_matches(checkpoint, self.config)

    def register_checkpoint_hooks(self, accelerator: Any, unet: nn.Module) -> None:
        from .checkpoint import register_tuner_checkpoint_hooks

        register_tuner_checkpoint_hooks(accelerator, unet)

    def write_config(self, output_dir: Path) -> None:
        self.config.save(str(Path(output_dir) / TUNER_CONFIG_NAME))

    def callbacks(self, unet: nn.Module, seed: int) -> list[TrainingCallback]:
        # a tuner that changes shape while it trains (a GLoRA supernet) brings its own per-step sampling
        from ..search.supernet import training_callbacks

        return training_callbacks(unet, seed)


def parameters_are_finite(parameters: list[nn.Parameter]) -> bool:
    return all(torch.isfinite(p).all() for p in parameters)


# --- loading a result back ---------------------------------------------------------------------------------------
def load_trained_unet(unet: nn.Module, output_dir: str | Path) -> nn.Module:
    """Put the res tuner a training run saved in ``output_dir`` on a base ``unet`` (in place); returns ``unet``."""
    output_dir = Path(output_dir)
    if not (output_dir / WEIGHT_NAME).is_file():
        raise TrainingError(
            f"{str(output_dir)!r} holds no training result (expected {WEIGHT_NAME}); pass the --output_dir of a "
            "finished run"
        )
    load_res_tuner(unet, output_dir)
    return unet


def load_tuned_pipeline(
    base_model: str | Path,
    output_dir: str | Path,
    device: str | torch.device = "cpu",
    load_unet: Callable[[nn.Module, str | Path], nn.Module] = load_trained_unet,
) -> Any:
    """The base diffusers pipeline in ``base_model`` with the result of the run in ``output_dir`` on its denoiser
    (``pipeline.unet``, or ``pipeline.transformer`` of SD3 / Flux).

    ``load_unet(denoiser, output_dir)`` puts the result on the base denoiser and returns the one to use (default: a
    res tuner, :func:`load_trained_unet`; the benchmarks pass their peers' loader).
    """
    from diffusers import DiffusionPipeline

    from ..integration.loader_mixin import denoiser_attribute

    pipeline = DiffusionPipeline.from_pretrained(str(base_model))
    attribute = denoiser_attribute(pipeline)
    setattr(pipeline, attribute, load_unet(getattr(pipeline, attribute), output_dir))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)
