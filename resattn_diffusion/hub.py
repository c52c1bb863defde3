"""Hub lookups that fail fast offline: is a model name a local path, in the local Hub cache, or reachable?

huggingface_hub retries an unreachable Hub for tens of seconds before it gives up (23 s for a missing training
model, 57 s for the evaluation's default CLIP model). :func:`check_pretrained_source` answers in about a second
instead, with what to pass: a local folder, or the download command for when the machine is online.
"""

from __future__ import annotations

import functools
import os
import re
import socket

from .tuners.base import ConfigError

#: Seconds a Hub lookup may take before the Hub counts as unreachable.
HUB_TIMEOUT_S = 4.0

# "user/repo" or "repo": what a Hub repo id looks like (a local path, absolute or with 3+ parts, does not).
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelSourceError(ConfigError):
    """A model name that is neither a local path nor a Hub repo this machine can get; the message says what to pass."""


def looks_like_repo_id(name: str) -> bool:
    """Whether ``name`` has the shape of a Hub repo id (``"user/model"``), not of a file path, and is one the Hub
    accepts: huggingface_hub's own rule (at most 96 characters, no leading or trailing ``-`` / ``.``, no ``--``)
    decides, since every Hub call raised its raw ``HFValidationError`` on a path typo like ``./my-model-``."""
    if not (_REPO_ID.match(name) and not name.endswith(".safetensors") and ".." not in name):
        return False
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def hub_unreachable_reason() -> str | None:
    """Why the Hub cannot be reached right now (offline mode, or no connection within a second), or None. Behind a
    proxy (``HTTPS_PROXY``) a direct connection says nothing, so the request itself decides."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if hub_offline_by_setting():
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    parsed = urlparse(constants.ENDPOINT)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=1.0).close()
    except OSError as err:
        return f"no connection to {parsed.hostname}:{port} ({err.strerror or type(err).__name__})"
    return None


def in_hub_cache(
    repo_id: str,
    filename: str,
    cache_dir: str | None = None,
    revision: str | None = None,
    subfolder: str | None = None,
) -> bool:
    """Whether the file is in the local Hub cache (then a download returns it without a connection)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(
        repo_id, f"{subfolder}/{filename}" if subfolder else filename, cache_dir=cache_dir, revision=revision
    )
    return isinstance(found, str)


def hub_offline_by_setting() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE`` / ``DIFFUSERS_OFFLINE``) says not to use the network."""
    from huggingface_hub import constants

    flags = (os.environ.get(name, "").upper() for name in ("TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE"))
    return bool(constants.HF_HUB_OFFLINE) or any(flag in ("1", "ON", "YES", "TRUE") for flag in flags)


@functools.cache
def _probe(repo_id: str, revision: str | None, token: str | bool | None) -> str:
    """``"ok"``, ``"missing"`` (no such repo), ``"gated"`` or ``"unreachable"``: one request, ``HUB_TIMEOUT_S``."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        HfApi().model_info(repo_id, revision=revision, token=token, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        return "gated"
    except (RepositoryNotFoundError, RevisionNotFoundError):
        return "missing"
    except Exception:  # connection refused, DNS, proxy, timeout, HTTP 5xx: all mean "cannot get it now"
        return "unreachable"
    return "ok"


def check_pretrained_source(
    name_or_path: str | os.PathLike,
    flag: str,
    filename: str = "model_index.json",
    cache_dir: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
) -> None:
    """Raise :class:`ModelSourceError` at once when ``name_or_path`` (given with ``flag``) cannot be loaded: not a
    local path, and as a Hub repo neither in the local cache (``filename`` from it) nor reachable. A local path or
    a reachable/cached repo returns silently; the loader then does the rest."""
    name = str(name_or_path)
    if os.path.exists(name):
        return
    if not looks_like_repo_id(name):
        raise ModelSourceError(
            f"{flag} {name!r}: no such file or folder (and it is not a Hub repo id like 'user/model')"
        )
    if in_hub_cache(name, filename, cache_dir, revision):
        return
    unreachable = hub_unreachable_reason()
    status = "unreachable" if unreachable else _probe(name, revision, token)
    if status == "ok":
        return
    reason = {
        "unreachable": f"the Hugging Face Hub cannot be reached ({unreachable or 'no answer'}) and it is not in the "
        "local Hub cache",
        "missing": "the Hub has no such repo (or it is private: log in with `hf auth login` or pass a token)",
        "gated": "the repo is gated: accept its terms on the Hub and log in (`hf auth login`)",
    }[status]
    raise ModelSourceError(
        f"{flag} {name!r} is not a local path, and {reason}. Pass a local folder instead (a diffusers model folder, "
        f"as saved by save_pretrained), or download it first where the Hub is reachable: "
        f"`hf download {name} --local-dir ./{name.split('/')[-1]}`."
    )


__all__ = [
    "HUB_TIMEOUT_S",
    "ModelSourceError",
    "check_pretrained_source",
    "hub_offline_by_setting",
    "hub_unreachable_reason",
    "in_hub_cache",
    "looks_like_repo_id",
]
