"""The one training core of ``train_dreambooth.py`` and ``train_text2img.py``.

- :func:`parse_args` / :func:`build_parser`: the shared command line (diffusers' flag names + the tuner flags);
- :func:`train`: accelerate training of what a :class:`~.trainable.TrainableProvider` provides (default: the res
  tuner of the flags) on a frozen SD 1.x / 2.x / SDXL model (noise prediction) or SD3 / Flux model (rectified flow;
  :mod:`.flow`), the family read from the model folder (:mod:`.families`); returns the saved result;
- :func:`load_tuned_pipeline` / :func:`load_trained_unet`: put a trained res tuner back on the base model;
- :func:`run_script`: run a script's ``main`` and turn the errors below into a one-line message and exit code 1.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from ..integration.api import ResTunerError
from ..integration.io import ResTunerFileError
from ..tuners.base import ConfigError
from .args import build_parser, parse_args, tuner_config_from_args
from .errors import NonFiniteLossError, TrainingDataError, TrainingError
from .loop import train
from .trainable import (
    ResTunerTrainable,
    TrainableProvider,
    TrainingCallback,
    TrainingSummary,
    load_trained_unet,
    load_tuned_pipeline,
)

__all__ = [
    "NonFiniteLossError",
    "ResTunerTrainable",
    "TrainableProvider",
    "TrainingCallback",
    "TrainingSummary",
    "TrainingDataError",
    "TrainingError",
    "build_parser",
    "load_trained_unet",
    "load_tuned_pipeline",
    "parse_args",
    "run_script",
    "train",
    "tuner_config_from_args",
]


def run_script(main: Callable[[], Any]) -> None:
    """Call ``main()``; a known error (bad data, flags, config, tuner file) prints ``error: ...`` and exits 1."""
    try:
        main()
    except (TrainingError, ConfigError, ResTunerError, ResTunerFileError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
