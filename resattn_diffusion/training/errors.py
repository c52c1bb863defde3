"""Errors of the training scripts: each message says what went wrong and what to do."""

from __future__ import annotations


class TrainingError(RuntimeError):
    """Training cannot start or go on (bad flags for this model, an output that would be overwritten, ...)."""


class TrainingDataError(TrainingError, ValueError):
    """The training data cannot be used: a missing or empty folder, an unreadable image, a missing column."""


class NonFiniteLossError(TrainingError):
    """The loss became NaN or infinite; training stopped and no tuner was saved from the diverged weights."""
