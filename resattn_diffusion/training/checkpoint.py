"""Checkpoints: ``output_dir/checkpoint-<step>/`` holds accelerate's training state and the tuner file.

accelerate's ``save_state`` / ``load_state`` write the optimizer, learning-rate scheduler, gradient scaler and
random states. The frozen UNet is not written: a save hook replaces its multi-GB state dict by the tuner file
(``res_tuner.safetensors``), and a load hook copies that file's weights into the tuner being trained (in place,
so the optimizer keeps its parameters). ``training_state.json`` is written last; a folder without it is an
interrupted save and is never resumed from.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ResTunerConfig
from ..integration.api import get_res_tuner_configs
from ..integration.io import (
    WEIGHT_NAME,
    ResTunerFileError,
    check_tuner_file_fits,
    load_tuner_tensors,
    read_tuner_file,
    save_res_tuner,
    tuner_file_fields,
)
from .errors import TrainingError

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "training_state.json"
ADAPTER_NAME = "default"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``output_dir`` as ``(step, folder)``, oldest first."""
    output_dir = Path(output_dir)
    found = []
    if output_dir.is_dir():
        for folder in output_dir.iterdir():
            match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", folder.name)
            if match and folder.is_dir() and (folder / STATE_FILE).is_file():
                found.append((int(match.group(1)), folder))
    return sorted(found)


def resolve_resume_checkpoint(output_dir: str | Path, value: str | None) -> Path | None:
    """The checkpoint folder ``--resume_from_checkpoint`` names: ``latest`` (None when there is none yet) or a path
    (as given, or relative to ``output_dir``)."""
    if value is None:
        return None
    if value == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            logger.warning("--resume_from_checkpoint latest: no checkpoint in %s yet; starting a new run", output_dir)
            return None
        return checkpoints[-1][1]
    for candidate in (Path(value), Path(output_dir) / value):
        if candidate.is_dir():
            if not (candidate / STATE_FILE).is_file():
                raise TrainingError(
                    f"checkpoint {str(candidate)!r} is incomplete (no {STATE_FILE}; the save was interrupted); pick "
                    "an older one"
                )
            return candidate
    available = [folder.name for _, folder in list_checkpoints(output_dir)]
    raise TrainingError(
        f"--resume_from_checkpoint {value!r}: no such checkpoint folder; checkpoints in {str(output_dir)!r}: "
        f"{available or 'none'}"
    )


#: accelerate's per-process random state file in a checkpoint folder, and the states an exact resume restores
RANDOM_STATES = "random_states_{process}.pkl"
_REQUIRED_RANDOM_STATES = ("random_state", "numpy_random_seed", "torch_manual_seed")


def random_states_problem(folder: Path, process_index: int) -> str | None:
    """Why the checkpoint's random states for this process cannot be restored (None when they can). accelerate
    only logs an INFO line for a missing or corrupt file and goes on, which silently makes the resume inexact."""
    from accelerate.utils import load

    file = Path(folder) / RANDOM_STATES.format(process=process_index)
    if not file.is_file():
        return f"{str(file)!r} is missing"
    try:
        states = load(file)
    except Exception as err:  # pickle/zip/torch errors of a damaged file: all mean the same to the user
        return f"{str(file)!r} cannot be read ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    if not isinstance(states, dict) or any(key not in states for key in _REQUIRED_RANDOM_STATES):
        return f"{str(file)!r} does not hold accelerate's random states ({', '.join(_REQUIRED_RANDOM_STATES)})"
    torch_state = states["torch_manual_seed"]
    if not isinstance(torch_state, torch.Tensor) or torch_state.shape != torch.get_rng_state().shape:
        return f"{str(file)!r} holds no valid torch random state"
    if torch.cuda.is_available() and "torch_cuda_manual_seed" not in states:
        return f"{str(file)!r} holds no CUDA random state"
    return None


def check_random_states(folder: Path, process_index: int, allow_inexact: bool) -> None:
    """Refuse a resume whose random states cannot be restored, unless ``--allow_inexact_resume``; then warn loudly."""
    problem = random_states_problem(folder, process_index)
    if problem is None:
        return
    if not allow_inexact:
        raise TrainingError(
            f"cannot resume exactly from {str(folder)!r}: {problem}. Resume from another checkpoint, or pass "
            "--allow_inexact_resume to continue with fresh random states (the run will then differ from an "
            "uninterrupted one)"
        )
    logger.warning(
        "INEXACT RESUME: %s; --allow_inexact_resume was given, so training continues from %s with fresh random "
        "states and will NOT reproduce an uninterrupted run",
        problem,
        folder,
    )


def read_training_state(folder: Path) -> dict[str, Any]:
    """The checkpoint's ``training_state.json``: a JSON object whose ``global_step`` is a whole number >= 0 (and
    ``seed``, when present, an integer). Checked before the model loads: a damaged file is a ``TrainingError``
    naming it, not a raw ``JSONDecodeError`` / ``KeyError`` after minutes of loading."""
    file = Path(folder) / STATE_FILE
    try:
        with open(file, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise TrainingError(f"cannot resume from {str(folder)!r}: {str(file)!r} cannot be read ({err})") from None
    step = state.get("global_step") if isinstance(state, dict) else None
    seed = state.get("seed") if isinstance(state, dict) else None
    if (
        not isinstance(step, int)
        or isinstance(step, bool)
        or step < 0
        or (seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)))
    ):
        raise TrainingError(
            f"cannot resume from {str(folder)!r}: {str(file)!r} must be a JSON object with a whole-number "
            f"'global_step' (and an integer 'seed'), got {json.dumps(state)[:200]}; resume from another checkpoint"
        )
    return state


def check_checkpoint_matches(folder: Path, config: ResTunerConfig) -> None:
    """Resuming continues the same tuner: the checkpoint's tuner config must equal this run's."""
    file = folder / WEIGHT_NAME
    metadata, _ = read_tuner_file(file)
    saved, _, _ = tuner_file_fields(str(file), metadata)  # a damaged config is a ResTunerFileError naming the file
    if saved != config:
        raise TrainingError(
            f"checkpoint {str(folder)!r} trained {saved}, but this run asks for {config}; resume with the same tuner "
            "flags (or --tuner_config the args of that run) or start a new --output_dir"
        )


def prune_checkpoints(output_dir: Path, total_limit: int | None) -> None:
    """Delete the oldest checkpoints so that one more fits under ``--checkpoints_total_limit``."""
    if total_limit is None:
        return
    checkpoints = list_checkpoints(output_dir)
    excess = len(checkpoints) + 1 - total_limit
    for _, folder in checkpoints[: max(excess, 0)]:
        logger.info("removing old checkpoint %s (--checkpoints_total_limit %d)", folder, total_limit)
        shutil.rmtree(folder)


def save_checkpoint(
    accelerator: Any, output_dir: Path, global_step: int, total_limit: int | None, state: dict[str, Any]
) -> Path:
    """Save the training state as ``checkpoint-<global_step>`` on every process (each writes its random state);
    the main process prunes old checkpoints first and marks the new one complete last."""
    folder = output_dir / f"{CHECKPOINT_PREFIX}{global_step}"
    if accelerator.is_main_process:
        prune_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(folder))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(folder / STATE_FILE, "w", encoding="utf-8") as f:
            json.dump({**state, "global_step": global_step}, f, indent=2)
        logger.info("saved checkpoint %s", folder)
    accelerator.wait_for_everyone()
    return folder


def register_tuner_checkpoint_hooks(accelerator: Any, unet: nn.Module) -> None:
    """Make ``save_state`` / ``load_state`` store the tuner file instead of the whole UNet."""

    def is_our_unet(model: nn.Module) -> bool:
        return accelerator.unwrap_model(model) is unet

    def save_hook(models: list[nn.Module], weights: list[dict], folder: str) -> None:
        for index in reversed(range(len(models))):
            if is_our_unet(models[index]):
                if accelerator.is_main_process:
                    save_res_tuner(unet, folder, ADAPTER_NAME)
                weights.pop(index)  # the frozen UNet is not part of a checkpoint

    def load_hook(models: list[nn.Module], folder: str) -> None:
        for index in reversed(range(len(models))):
            if is_our_unet(models[index]):
                load_tuner_weights_in_place(unet, Path(folder) / WEIGHT_NAME)
                models.pop(index)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def load_tuner_weights_in_place(unet: nn.Module, file: Path) -> None:
    """Copy a tuner file's weights into the tuner already on ``unet`` (same config), keeping its parameters; the
    file gets the same checks as any tuner file (shapes, finiteness, nothing missing or left over)."""
    metadata, tensors = read_tuner_file(file)
    config = get_res_tuner_configs(unet)[ADAPTER_NAME]
    saved_config, saved_layers, base = tuner_file_fields(str(file), metadata)
    if saved_config != config:
        raise TrainingError(
            f"{str(file)!r} holds another tuner config than the one being trained; resume with the same tuner flags"
        )
    try:  # a checkpoint of a run on another base model: say so, not which tensor first has another shape
        check_tuner_file_fits(str(file), metadata, saved_layers, base, config, unet)
    except ResTunerFileError as err:
        raise TrainingError(
            f"cannot resume from {str(file.parent)!r}: it was trained on another base model than "
            f"--pretrained_model_name_or_path. {err}"
        ) from None
    load_tuner_tensors(unet, ADAPTER_NAME, tensors, str(file))
