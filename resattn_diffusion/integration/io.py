"""The tuner file: one ``.safetensors`` with the weights, and JSON metadata (config, format version, adapter name,
and a fingerprint of the base model's layer shapes). Never pickle. Writes are atomic; loads check everything first.

Tensor keys are ``<layer path>.<parameter>``, e.g.
``up_blocks.1.attentions.0.transformer_blocks.0.attn2.q_proj.weight``: they name where a tuner sits in the model,
not how this library happens to hold it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..config import ResTunerConfig
from ..tuners.base import ConfigError
from .families import family_named, family_of
from .inject import add_res_tuner, expected_fingerprint, iter_tuners, remove_res_tuner
from .state import ResTunerError, get_state

FORMAT_NAME = "resattn-diffusion"
FORMAT_VERSION = 1
#: The file name inside a folder (a training output folder holds one).
WEIGHT_NAME = "res_tuner.safetensors"


class ResTunerFileError(ValueError):
    """A tuner file that cannot be loaded here: missing, corrupt, of another format, or made for another base."""


def base_description(unet: nn.Module) -> dict:
    """What the file records of the base model: its family, class, name and the config values its family names."""
    family = family_of(unet)
    return {"family": family.name, **family.describe(unet)}


def tuner_state_dict(unet: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The named tuner's weights under file keys ``<layer path>.<parameter>``."""
    tensors = {}
    for layer_path, tuner in iter_tuners(unet, adapter_name):
        for key, value in tuner.state_dict().items():
            tensors[f"{layer_path}.{key}"] = value.detach().contiguous().cpu()
    return tensors


def resolve_tuner_file(path: str | os.PathLike, weight_name: str | None = None) -> Path:
    """A tuner file path from a file or a folder (a training output folder); clear errors otherwise."""
    path = Path(path)
    if path.is_dir():
        candidate = path / (weight_name or WEIGHT_NAME)
        if candidate.is_file():
            return candidate
        found = sorted(p.name for p in path.glob("*.safetensors"))
        hint = f"; it has {found}: pass weight_name=" if found else ""
        raise ResTunerFileError(f"folder {str(path)!r} has no tuner file {candidate.name!r}{hint}")
    if weight_name is not None:
        raise ResTunerFileError(f"weight_name={weight_name!r} is for a folder, but {str(path)!r} is not a folder")
    if not path.exists():
        raise ResTunerFileError(f"no tuner file at {str(path)!r}")
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_res_tuner(
    unet: nn.Module, path: str | os.PathLike, adapter_name: str = "default", overwrite: bool = True
) -> Path:
    """Save the named tuner to ``path`` (a ``.safetensors`` file, or a folder that gets ``res_tuner.safetensors``).

    The file is written to a temporary name beside the target and renamed into place, so a crash mid-save leaves
    any older file intact. With ``overwrite=False`` an existing file is an error.
    """
    state = get_state(unet)
    if state is None or adapter_name not in state.configs:
        loaded = [] if state is None else list(state.configs)
        raise ResTunerError(f"no tuner named {adapter_name!r} on this model to save; loaded tuners: {loaded}")
    config = state.configs[adapter_name]
    return write_tuner_file(unet, path, config, tuner_state_dict(unet, adapter_name), adapter_name, overwrite)


def write_tuner_file(
    unet: nn.Module,
    path: str | os.PathLike,
    config: ResTunerConfig,
    tensors: dict[str, torch.Tensor],
    adapter_name: str = "default",
    overwrite: bool = True,
) -> Path:
    """Write ``tensors`` (file keys) with ``config`` as a tuner file for ``unet``: atomic, never pickled."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / WEIGHT_NAME
    if path.exists() and not overwrite:
        raise FileExistsError(f"{str(path)!r} exists; pass overwrite=True (or --overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "adapter_name": adapter_name,
        "config": config.to_json(indent=None),
        "layers": json.dumps(expected_fingerprint(unet, config)),
        "base": json.dumps(base_description(unet)),
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the permissions open() would
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_tuner_file(path: str | os.PathLike, weight_name: str | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of a tuner file, with clear errors for anything that is not one."""
    from safetensors import safe_open

    file = resolve_tuner_file(path, weight_name)
    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # safetensors raises its own error types for truncated/corrupt headers and data
        raise ResTunerFileError(
            f"{str(file)!r} is not a readable safetensors file (truncated or corrupt?): {err}. "
            "Re-save the tuner, or restore the file from a training checkpoint."
        ) from None
    if metadata.get("format") != FORMAT_NAME:
        raise ResTunerFileError(
            f"{str(file)!r} is a safetensors file but not a resattn-diffusion tuner (no '{FORMAT_NAME}' format in its "
            "metadata); a diffusers/peft LoRA loads with pipe.load_lora_weights instead"
        )
    version = int(metadata.get("format_version", "0"))
    if version > FORMAT_VERSION:
        raise ResTunerFileError(
            f"{str(file)!r} has format version {version}; this resattn-diffusion reads up to {FORMAT_VERSION}: upgrade it"
        )
    return metadata, tensors


def _json_object(text: str) -> dict:
    """A JSON object from file metadata; {} for anything else (the fingerprint check then says what differs)."""
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _describe(base: dict) -> str:
    details = ", ".join(f"{k}={v}" for k, v in base.items() if k not in ("class", "name_or_path", "family"))
    return f"{base.get('class')} {base.get('name_or_path') or '(unnamed)'}" + (f", {details}" if details else "")


def _fingerprint_mismatch(file: str, meta: dict, saved: dict, expected: dict, unet: nn.Module) -> str | None:
    if saved == expected:
        return None
    base = _json_object(meta.get("base", "{}"))
    here = base_description(unet)
    word = family_of(unet).model_word
    lines = [
        f"tuner file {file!r} does not fit this {word}.",
        f"  made for: {_describe(base)}",
        f"  this {word}: {_describe(here)}",
    ]
    missing = [p for p in saved if p not in expected]
    extra = [p for p in expected if p not in saved]
    differing = [p for p in saved if p in expected and saved[p] != expected[p]]
    if missing:
        lines.append(f"  {len(missing)} layer(s) of the file do not exist here, e.g. {missing[0]}")
    if extra:
        lines.append(f"  {len(extra)} layer(s) here are not in the file, e.g. {extra[0]}")
    for path in differing[:3]:
        lines.append(f"  layer {path}: file {saved[path]}, this {word} {expected[path]}")
    if len(differing) > 3:
        lines.append(f"  ... and {len(differing) - 3} more layer(s) with other shapes")
    lines.append("Load it into the base model it was trained on.")
    return "\n".join(lines)


def load_res_tuner(
    unet: nn.Module,
    path: str | os.PathLike,
    adapter_name: str | None = None,
    weight_name: str | None = None,
) -> str:
    """Load a tuner file (or a folder holding one) onto ``unet`` under ``adapter_name`` (default: the name it was
    saved with); returns the name. Everything is checked before the UNet changes; on any error it is unchanged."""
    metadata, tensors = read_tuner_file(path, weight_name)
    file = str(resolve_tuner_file(path, weight_name))
    try:
        config = ResTunerConfig.from_json(metadata["config"])
    except (KeyError, ConfigError) as err:
        raise ResTunerFileError(f"{file!r} has no valid tuner config in its metadata: {err}") from None
    name = adapter_name or metadata.get("adapter_name") or "default"
    state = get_state(unet)
    if state is not None and name in state.configs:
        raise ResTunerError(f"a tuner named {name!r} is already loaded; unload it or pass another adapter_name")

    family = family_of(unet)
    base = _json_object(metadata.get("base", "{}"))
    made_for = base.get("family")
    if made_for is not None and made_for != family.name:
        other = family_named(made_for)
        raise ResTunerFileError(
            f"tuner file {file!r} was made for a {base.get('class', '?')} ({other.model_word if other else made_for}), "
            f"not for this {type(unet).__name__} ({family.model_word}); load it into the kind of model it was trained on"
        )
    saved = json.loads(metadata.get("layers", "{}"))
    try:
        expected = expected_fingerprint(unet, config)
    except (ConfigError, ResTunerError) as err:
        raise ResTunerFileError(f"tuner file {file!r} does not fit this {family.model_word}: {err}") from None
    problem = _fingerprint_mismatch(file, metadata, saved, expected, unet)
    if problem:
        raise ResTunerFileError(problem)

    add_res_tuner(unet, config, name)
    try:
        _load_tensors(unet, name, tensors, file)
    except Exception:
        remove_res_tuner(unet, name)
        raise
    return name


@torch.no_grad()
def _load_tensors(unet: nn.Module, name: str, tensors: dict[str, torch.Tensor], file: str) -> None:
    remaining = dict(tensors)
    for layer_path, tuner in iter_tuners(unet, name):
        own = tuner.state_dict()
        for key, target in own.items():
            file_key = f"{layer_path}.{key}"
            if file_key not in remaining:
                raise ResTunerFileError(f"{file!r} lacks tensor {file_key!r}; the file is incomplete: re-save it")
            value = remaining.pop(file_key)
            if value.shape != target.shape:
                raise ResTunerFileError(
                    f"{file!r}: tensor {file_key!r} has shape {tuple(value.shape)}, the tuner here needs {tuple(target.shape)}"
                )
            if not torch.isfinite(value.float()).all():
                raise ResTunerFileError(f"{file!r}: tensor {file_key!r} holds NaN or inf; the tuner diverged when trained")
        tuner.load_state_dict(
            {key: tensors[f"{layer_path}.{key}"].to(device=own[key].device, dtype=own[key].dtype) for key in own}
        )
    if remaining:
        raise ResTunerFileError(f"{file!r} has {len(remaining)} tensor(s) this tuner does not use, e.g. {next(iter(remaining))!r}")
