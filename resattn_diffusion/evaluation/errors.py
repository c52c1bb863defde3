"""The one error type of the evaluation tools, and the check of the files they write."""

from __future__ import annotations

from pathlib import Path


class EvaluationError(ValueError):
    """Input the evaluation cannot work with (a missing folder, an unreadable image, a model that cannot be
    loaded offline, ...). The message says what was wrong and which argument or flag fixes it."""


class EvaluationWarning(UserWarning):
    """A result that is valid but easy to misread (e.g. FID on fewer images than feature dimensions)."""


def check_output_file(path: Path, what: str) -> None:
    """``path`` can be written as a file: it is not a folder and no folder above it is a file. Checked before any
    slow work, so that results are never computed only to fail at the end with a raw ``OSError``."""
    if path.is_dir():
        raise EvaluationError(f"{what} {str(path)!r} is a folder; pass a file path.")
    blocking = next((parent for parent in path.parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise EvaluationError(f"{what} {str(path)!r} cannot be written: {str(blocking)!r} is a file, not a folder.")
