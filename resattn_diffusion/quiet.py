"""A quiet console: our progress bar and our messages on the terminal, library chatter in the run's log file.

diffusers, transformers, accelerate and huggingface_hub log INFO lines (accelerate's checkpoint lines land inside
the progress bar), warn about optional backends (transformers' "requires torchvision"), and draw their own loading
bars. :func:`quiet_libraries` sends all of that to a log file (or drops it when there is none) and keeps the
``resattn_diffusion`` loggers on the console with a short format. ``RESATTN_VERBOSE=1`` keeps everything on the
console, for debugging.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import torch

#: Library loggers whose records go to the log file instead of the console.
LIBRARY_LOGGERS = (
    "diffusers",
    "transformers",
    "accelerate",
    "huggingface_hub",
    "torch",
    "PIL",
    "bitsandbytes",
    "py.warnings",
)
_HANDLER_NAME = "resattn-log-file"
_CONSOLE_NAME = "resattn-console"


class _ProgressBarSafeHandler(logging.Handler):
    """Prints records with ``tqdm.write``: a message during training appears above the progress bar instead of
    being glued to it."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def from_pretrained_dtype(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The dtype keyword of ``from_pretrained``: ``dtype`` in diffusers/transformers that deprecate ``torch_dtype``
    (a FutureWarning on every call), ``torch_dtype`` in older ones."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401  (exists where "dtype" is the name)
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype}


def quiet_libraries(log_file: str | os.PathLike | None = None, main_process: bool = True) -> None:
    """Route library logs, warnings and loading bars off the console (into ``log_file`` when given).

    Idempotent; call it before the first model loads. Our own loggers (``resattn_diffusion.*``) print INFO and up
    on the main process, warnings and errors elsewhere.
    """
    verbose = os.environ.get("RESATTN_VERBOSE", "").lower() in ("1", "true", "yes")
    ours = logging.getLogger("resattn_diffusion")
    ours.setLevel(logging.INFO if main_process else logging.WARNING)
    if not any(h.get_name() == _CONSOLE_NAME for h in ours.handlers):
        console = _ProgressBarSafeHandler()
        console.set_name(_CONSOLE_NAME)
        console.setFormatter(logging.Formatter("%(message)s"))
        ours.addHandler(console)
    ours.propagate = False  # our records reach the console once, not again through the root logger
    if verbose:
        return

    import diffusers
    import transformers

    for library in (diffusers.utils.logging, transformers.utils.logging):
        library.disable_default_handler()  # their own stderr handlers
        library.enable_propagation()  # ... replaced by the root logger's file handler below
        library.set_verbosity_info() if log_file else library.set_verbosity_error()
        library.disable_progress_bar()  # "Loading weights", "Loading pipeline components"
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:  # pragma: no cover - very old huggingface_hub
        pass
    logging.captureWarnings(True)  # warnings.warn of libraries -> logger "py.warnings" -> the file

    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) in (sys.stderr, sys.stdout):
            root.removeHandler(handler)  # a basicConfig console handler would print the libraries' records
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).propagate = True
    for logger in (root, ours):  # a second run in the same process logs to its own file
        for handler in [h for h in logger.handlers if h.get_name() == _HANDLER_NAME]:
            logger.removeHandler(handler)
            handler.close()
    if log_file is not None:
        path = Path(log_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.set_name(_HANDLER_NAME)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        ours.addHandler(handler)  # our messages too, so the file tells the whole story
        root.setLevel(logging.INFO)
    elif not root.handlers:
        root.addHandler(logging.NullHandler())  # without a handler, logging's last resort would print warnings


__all__ = ["LIBRARY_LOGGERS", "from_pretrained_dtype", "quiet_libraries"]
