"""The tuner file: one ``.safetensors`` with the weights, and JSON metadata (config, format version, adapter name,
and a fingerprint of the base model's layer shapes). Never pickle. Writes are atomic; loads check everything first.

Tensor keys are ``<layer path>.<parameter>``, e.g.
``up_blocks.1.attentions.0.transformer_blocks.0.attn2.q_proj.weight``: they name where a tuner sits in the model,
not how this library happens to hold it.
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import struct
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checks import MAX_ABS_WEIGHT, check_adapter_name, check_model
from ..config import ResTunerConfig
from ..tuners.base import ConfigError
from .api import add_res_tuner, expected_fingerprint, get_res_tuner_configs, iter_tuners, remove_res_tuner
from .families import family_named, family_of
from .state import ResTunerError, get_state

FORMAT_NAME = "resattn-diffusion"
FORMAT_VERSION = 1
#: The file name inside a folder (a training output folder holds one).
WEIGHT_NAME = "res_tuner.safetensors"
#: The header (metadata and tensor table) of a file is checked before anything else is read. A real SDXL tuner's
#: header is under 1 MiB; a longer one is refused unread, so a small file cannot make parsing it the attack.
MAX_HEADER_BYTES = 16 << 20
#: Tensor dtypes a tuner file may hold (safetensors' names): weights are floating point, cast to the layer's dtype.
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_FLOAT_TORCH_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class ResTunerFileError(ValueError):
    """A tuner file that cannot be loaded here (missing, corrupt, of another format, or made for another base), or
    a path a tuner cannot be saved to."""


def base_description(unet: nn.Module) -> dict:
    """What the file records of the base model: its family, class, name and the config values its family names."""
    family = family_of(unet)
    return {"family": family.name, **family.describe(unet)}


def tuner_file_key(layer_path: str, key: str) -> str:
    """The key of one tuner tensor in a tuner file: ``<layer path>.<parameter>`` (the one place it is spelled)."""
    return f"{layer_path}.{key}"


def tuner_state_dict(unet: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The named tuner's weights under file keys (:func:`tuner_file_key`)."""
    return file_tensors((layer_path, tuner.state_dict()) for layer_path, tuner in iter_tuners(unet, adapter_name))


def file_tensors(layers: Iterable[tuple[str, dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """``(layer path, state dict)`` pairs as the tensors of a tuner file: file keys, contiguous, on the CPU."""
    return {
        tuner_file_key(layer_path, key): value.detach().contiguous().cpu()
        for layer_path, state in layers
        for key, value in state.items()
    }


def resolve_tuner_file(path: str | os.PathLike, weight_name: str | None = None) -> Path:
    """A tuner file path from a file or a folder (a training output folder); clear errors otherwise. The result is
    a regular file: a FIFO, device or socket named ``*.safetensors`` would block or never end when read."""
    if not isinstance(path, (str, os.PathLike)):
        raise ResTunerFileError(
            f"path must be a tuner file or a folder holding one (a str or os.PathLike), got {type(path).__name__} "
            f"{path!r}"
        )
    if weight_name is not None:
        _check_weight_name(weight_name)
    path = Path(path)
    if path.is_dir():
        candidate = path / (weight_name or WEIGHT_NAME)
        if candidate.is_dir():
            raise ResTunerFileError(
                f"{str(candidate)!r} is a folder, not a tuner file; pass the tuner file itself, or the folder that "
                f"holds a file named {candidate.name!r}"
            )
        if not os.path.lexists(candidate):
            found = sorted(p.name for p in path.glob("*.safetensors") if p.is_file())
            hint = f"; it has {found}: pass weight_name=" if found else ""
            raise ResTunerFileError(f"folder {str(path)!r} has no tuner file {candidate.name!r}{hint}")
        path = candidate
    elif weight_name is not None:
        raise ResTunerFileError(f"weight_name={weight_name!r} is for a folder, but {str(path)!r} is not a folder")
    elif not os.path.lexists(path):
        raise ResTunerFileError(f"no tuner file at {str(path)!r}: the path does not exist")
    _check_regular_file(path)
    return path


def _check_weight_name(weight_name: Any) -> None:
    """A file name inside the folder: no separators or '..' (an absolute or relative path would leave the folder)."""
    if (
        not isinstance(weight_name, str)
        or not weight_name
        or weight_name in (".", "..")
        or os.path.basename(weight_name) != weight_name
        or (os.altsep and os.altsep in weight_name)
    ):
        raise ResTunerFileError(
            f"weight_name must be the name of a file inside the folder (like {WEIGHT_NAME!r}, no '/' or '..'), got "
            f"{weight_name!r}"
        )


def _check_regular_file(path: Path) -> None:
    try:
        mode = os.stat(path).st_mode  # follows symlinks: a link to /dev/zero is a device
    except OSError as err:
        raise ResTunerFileError(
            f"cannot read the tuner file {str(path)!r}: {err.strerror} (a dangling link?)"
        ) from None
    if not stat.S_ISREG(mode):
        raise ResTunerFileError(
            f"{str(path)!r} is not a regular file (a FIFO, device or socket); a tuner file is a .safetensors file on "
            "disk"
        )


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
    unet = check_model(unet)  # a pipeline's UNet is fine
    state = get_state(unet)
    if state is None or not isinstance(adapter_name, str) or adapter_name not in state.configs:
        loaded = [] if state is None else list(state.configs)
        raise ResTunerError(
            f"no tuner named {adapter_name!r} on this model to save; loaded tuners (adapter names): {loaded}"
        )
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

    if not isinstance(path, (str, os.PathLike)):
        raise ResTunerFileError(
            f"path must be a .safetensors file or a folder (a str or os.PathLike), got {type(path).__name__} {path!r}"
        )
    check_adapter_name(adapter_name)
    path = _save_target(path)
    prepare_output_file(path, overwrite, "cannot save the tuner to")
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "adapter_name": adapter_name,
        "config": config.to_json(indent=None),
        "layers": json.dumps(expected_fingerprint(unet, config)),
        "base": json.dumps(base_description(unet)),
    }
    remove_stale_temporaries(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path.name), suffix=".tmp", dir=path.parent)
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


def check_path_characters(path: Path, action: str) -> None:
    """A path the OS accepts: a NUL byte in it makes every ``os`` call raise a raw ``ValueError``."""
    if "\x00" in str(path):
        raise ResTunerFileError(f"cannot {action} {str(path)!r}: a path cannot contain a NUL byte ('\\x00')")


def prepare_output_file(path: Path, overwrite: bool, what: str) -> None:
    """Refuse an existing ``path`` unless ``overwrite``, and create its folder; ``what`` begins the error (e.g.
    ``"cannot save the tuner to"``) when the folder cannot be made (a parent is a file, ...)."""
    if path.exists() and not overwrite:
        raise FileExistsError(f"{str(path)!r} exists; pass overwrite=True (or --overwrite) to replace it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # e.g. a parent is a file: the error names it
        raise ResTunerFileError(
            f"{what} {str(path)!r}: cannot create its folder ({err.strerror}: {err.filename!r})"
        ) from None


def _save_target(path: str | os.PathLike) -> Path:
    """The file a save writes: ``path`` itself if it names a ``.safetensors`` file, else ``res_tuner.safetensors``
    in the folder ``path`` (also an existing folder named ``*.safetensors``: where ``load_res_tuner`` looks)."""
    if not os.fspath(path):
        raise ResTunerFileError("path is empty; pass a .safetensors file or a folder to save the tuner in")
    path = Path(path)
    check_path_characters(path, "save the tuner to")
    try:
        if path.suffix != ".safetensors" or path.is_dir():
            path = path / WEIGHT_NAME
        if path.is_dir():
            raise ResTunerFileError(
                f"cannot save the tuner to {str(path)!r}: it is a folder; pass another file name or folder"
            )
    except OSError as err:  # a name too long, a loop of links: what stat says
        raise ResTunerFileError(f"cannot save the tuner to {str(path)!r}: {err.strerror or err}") from None
    return path


# --- temporaries of interrupted saves ---------------------------------------------------------------------------
#: A save writes ``.<file>.rt-<host>-<pid>-<random>.tmp`` beside its target; the writer's host and pid say whether
#: it can still be in flight. Older versions wrote ``.<file>.<random>.tmp`` (no owner: judged by age alone).
_TEMPORARY = re.compile(
    r"^\.(?P<target>.+\.safetensors)\.rt-(?P<host>[A-Za-z0-9-]*)-(?P<pid>\d+)-[A-Za-z0-9_]{8}\.tmp$"
)
_LEGACY_TEMPORARY = re.compile(r"^\.(?P<target>.+\.safetensors)\.[a-z0-9_]{8}\.tmp$")
#: A temporary whose writer cannot be checked (another host, an older version) is stale once untouched this long:
#: a save writes its file in one go, so an in-flight one is never this old.
STALE_TEMPORARY_SECONDS = 3600.0
#: ...and one whose writer has exited on this host, once untouched this long (a margin for clock and pid quirks).
DEAD_WRITER_GRACE_SECONDS = 10.0


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:64]


#: The temporary holds at most this many bytes of the target's name (its end, so ``.safetensors`` stays): with
#: the host, pid and random part added it stays within the 255 bytes a file name may have, as the target does.
_TEMPORARY_TARGET_BYTES = 120


def _temporary_prefix(file_name: str) -> str:
    # bytes, not characters: a name of 80 CJK characters is 240 bytes (a cut character is dropped, not garbled)
    target = os.fsencode(file_name)[-_TEMPORARY_TARGET_BYTES:].decode("utf-8", errors="ignore")
    return f".{target}.rt-{_host()}-{os.getpid()}-"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # it exists (another user's) or cannot be checked: assume in flight
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporaries that interrupted saves (a killed process, a full disk) left in ``folder``.

    Only this library's own temporary names, and only stale ones: written by a process of this host that is gone,
    or (writer unknown: another host, an older version) untouched for :data:`STALE_TEMPORARY_SECONDS`. Another
    process's save in progress is never touched. Best effort: what cannot be removed stays. Returns what went."""
    removed = []
    now = time.time()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        ours = _TEMPORARY.match(entry.name)
        if ours is None and _LEGACY_TEMPORARY.match(entry.name) is None:
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            age = now - entry.stat(follow_symlinks=False).st_mtime
            if ours is not None and ours["host"] == _host():
                pid = int(ours["pid"])
                stale = pid != os.getpid() and not _process_alive(pid) and age > DEAD_WRITER_GRACE_SECONDS
            else:
                stale = age > STALE_TEMPORARY_SECONDS
            if stale:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue
    return removed


def read_tuner_file(path: str | os.PathLike, weight_name: str | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of a tuner file, with clear errors for anything that is not one."""
    file, metadata, entries = read_tuner_header(path, weight_name)
    return metadata, _read_tensors(file, entries)


def read_tuner_header(
    path: str | os.PathLike, weight_name: str | None = None
) -> tuple[Path, dict[str, str], dict[str, tuple[str, tuple[int, ...]]]]:
    """(file, metadata, key -> (dtype, shape)) of a tuner file, reading no tensor data: a regular file whose header
    is at most ``MAX_HEADER_BYTES`` (checked from its first 8 bytes, before it is parsed), a resattn-diffusion
    format of a version this library reads, and only floating-point tensors."""
    from safetensors import safe_open

    file = resolve_tuner_file(path, weight_name)
    _check_header_size(file)
    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
            entries = {}
            for key in f.keys():
                piece = f.get_slice(key)
                entries[key] = (piece.get_dtype(), tuple(piece.get_shape()))
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
    _check_format_version(str(file), metadata.get("format_version"))
    for key, (dtype, _) in entries.items():
        if dtype not in FLOAT_DTYPES:
            raise ResTunerFileError(
                f"{str(file)!r}: tensor {key!r} has dtype {dtype}; tuner weights are floating point "
                f"({', '.join(FLOAT_DTYPES)})"
            )
    return file, metadata, entries


def _check_header_size(file: Path) -> None:
    # O_NONBLOCK: if the path was swapped for a FIFO since it was checked, opening it does not wait for a writer.
    fd = os.open(file, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ResTunerFileError(f"{str(file)!r} is not a regular file (a FIFO, device or socket)")
        size = os.fstat(fd).st_size
        prefix = os.read(fd, 8)
    finally:
        os.close(fd)
    if len(prefix) < 8:
        raise ResTunerFileError(
            f"{str(file)!r} is not a readable safetensors file: {size} bytes, shorter than a header"
        )
    (header_bytes,) = struct.unpack("<Q", prefix)
    if header_bytes > MAX_HEADER_BYTES:
        raise ResTunerFileError(
            f"{str(file)!r} has a safetensors header of {header_bytes:,} bytes; a tuner file's header (its metadata "
            f"and tensor table) is at most {MAX_HEADER_BYTES:,} bytes. This is not a tuner file saved by "
            "save_res_tuner"
        )
    if 8 + header_bytes > size:
        raise ResTunerFileError(
            f"{str(file)!r} is truncated: its header claims {header_bytes:,} bytes, the file has {size:,}"
        )


def _check_format_version(file: str, text: str | None) -> None:
    if not isinstance(text, str) or not text.isascii() or not text.isdigit():
        raise ResTunerFileError(
            f"{file!r}: metadata field 'format_version' is {text!r}; it must be a whole number from 1 to "
            f"{FORMAT_VERSION} (the file was not written by save_res_tuner, or was altered)"
        )
    version = int(text[:12])  # at most 12 digits are read: a 10^40 version is as unreadable as 10^12
    if version > FORMAT_VERSION:
        raise ResTunerFileError(
            f"{file!r} has format version {text[:12]}; this resattn-diffusion reads up to {FORMAT_VERSION}: upgrade it"
        )
    if version < 1:
        raise ResTunerFileError(f"{file!r}: metadata field 'format_version' is {text!r}; versions start at 1")


def _read_tensors(file: Path, entries: dict[str, tuple[str, tuple[int, ...]]]) -> dict[str, torch.Tensor]:
    """The tensors of a file whose header was checked; each must still have the dtype and shape the header had."""
    from safetensors import safe_open

    _check_regular_file(file)
    _check_header_size(file)
    try:
        with safe_open(str(file), framework="pt") as f:
            if set(f.keys()) != set(entries):
                raise ResTunerFileError(f"{str(file)!r} changed while it was read; load it again")
            tensors = {key: f.get_tensor(key) for key in entries}
    except ResTunerFileError:
        raise
    except Exception as err:
        raise ResTunerFileError(
            f"{str(file)!r} is not a readable safetensors file (truncated or corrupt?): {err}"
        ) from None
    for key, tensor in tensors.items():
        if tuple(tensor.shape) != entries[key][1] or not tensor.is_floating_point():
            raise ResTunerFileError(f"{str(file)!r} changed while it was read; load it again")
    return tensors


def _check_weight_values(file: str, tensors: dict[str, torch.Tensor]) -> None:
    """Finite and at most ``MAX_ABS_WEIGHT`` (the largest float16) in magnitude: what a trained tuner holds."""
    for key, tensor in tensors.items():
        if not tensor.numel():
            continue
        values = tensor.detach().float()
        if not torch.isfinite(values).all():
            raise ResTunerFileError(f"{file!r}: tensor {key!r} holds NaN or inf; the tuner diverged when trained")
        largest = values.abs().max().item()
        if largest > MAX_ABS_WEIGHT:
            raise ResTunerFileError(
                f"{file!r}: tensor {key!r} holds values up to {largest:.3g} in magnitude; tuner weights are at most "
                f"{MAX_ABS_WEIGHT:g} (the largest float16), trained ones of order 1: the file is corrupt"
            )


def _json_field(file: str, metadata: dict[str, str], key: str, kind: type, what: str) -> Any:
    """The JSON value of a metadata field, of the type ``kind``; a clear error naming the file and the field."""
    if key not in metadata:
        raise ResTunerFileError(
            f"{file!r} has no metadata field '{key}' ({what}); it was not written by save_res_tuner: re-save it"
        )
    try:
        value = json.loads(metadata[key])
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError; RecursionError: nested too deeply
        raise ResTunerFileError(
            f"{file!r}: metadata field '{key}' is not valid JSON (or nested too deeply); it must be {what}"
        ) from None
    if not isinstance(value, kind):
        raise ResTunerFileError(f"{file!r}: metadata field '{key}' must be {what}, got {type(value).__name__}")
    return value


def _file_config(file: str, metadata: dict[str, str]) -> ResTunerConfig:
    if "config" not in metadata:
        raise ResTunerFileError(f"{file!r} has no metadata field 'config' (the tuner config); re-save the tuner")
    try:
        return ResTunerConfig.from_json(metadata["config"])
    except ConfigError as err:
        raise ResTunerFileError(f"{file!r}: metadata field 'config' is not a valid tuner config: {err}") from None


def tuner_file_fields(file: str, metadata: dict[str, str]) -> tuple[ResTunerConfig, dict[str, dict], dict]:
    """``(config, layers, base)`` of a tuner file's metadata, each checked (valid JSON of the right type, a valid
    config): a ``ResTunerFileError`` naming the file and the field otherwise."""
    config = _file_config(file, metadata)
    layers = _file_layers(file, metadata)
    base = _json_field(file, metadata, "base", dict, "a JSON object describing the base model")
    return config, layers, base


def _file_layers(file: str, metadata: dict[str, str]) -> dict[str, dict]:
    layers = _json_field(file, metadata, "layers", dict, "a JSON object: layer path -> its shape")
    for path, shape in layers.items():
        if not isinstance(shape, dict):
            raise ResTunerFileError(
                f"{file!r}: metadata field 'layers' maps layer {path!r} to a {type(shape).__name__}; each layer maps "
                "to its shape (an object)"
            )
    return layers


def _check_against_plan(
    file: str, unet: nn.Module, config: ResTunerConfig, entries: dict[str, tuple[str, tuple[int, ...]]]
) -> None:
    """Before anything is built: the tensors (key -> (dtype, shape)) are exactly those of the tuner ``config``
    plans on ``unet`` (on the meta device), and that tuner is not larger than the model."""
    from .plan import check_tuner_size, planned_tensor_shapes

    try:
        planned = planned_tensor_shapes(unet, config)
        _check_planned_tensors(file, config, entries, planned)
        check_tuner_size(unet, config, planned)
    except (ConfigError, ResTunerError) as err:
        raise ResTunerFileError(f"tuner file {file!r} cannot be loaded here: {err}") from None


def _state_dict_entries(file: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Key -> (dtype, shape) of an in-memory state dict, refusing what a file may not hold either (non-float)."""
    entries = {}
    for key, value in tensors.items():
        if value.dtype not in _FLOAT_TORCH_DTYPES:
            raise ResTunerFileError(
                f"{file}: tensor {key!r} has dtype {value.dtype}; tuner weights are floating point "
                "(float16, bfloat16, float32 or float64)"
            )
        entries[key] = (str(value.dtype), tuple(value.shape))
    return entries


def _check_planned_tensors(
    file: str,
    config: ResTunerConfig,
    entries: dict[str, tuple[str, tuple[int, ...]]],
    planned: dict[str, tuple[int, ...]],
) -> None:
    """The file's tensors are exactly those its config builds on this UNet, with the same shapes."""
    for key in planned:
        if key not in entries:
            raise ResTunerFileError(f"{file!r} lacks tensor {key!r}; the file is incomplete: re-save it")
    extra = [key for key in entries if key not in planned]
    if extra:
        raise ResTunerFileError(f"{file!r} has {len(extra)} tensor(s) this tuner does not use, e.g. {extra[0]!r}")
    for key, shape in planned.items():
        if entries[key][1] != shape:
            raise ResTunerFileError(
                f"{file!r}: tensor {key!r} has shape {entries[key][1]}, but the {config.tuner} its config describes "
                f"(hyperparameters {config.hyperparameters}) needs {shape}: the config and the weights disagree"
            )


def _describe(base: dict) -> str:
    details = ", ".join(f"{k}={v}" for k, v in base.items() if k not in ("class", "name_or_path", "family"))
    return f"{base.get('class')} {base.get('name_or_path') or '(unnamed)'}" + (f", {details}" if details else "")


def _fingerprint_mismatch(file: str, meta: dict, saved: dict, expected: dict, unet: nn.Module) -> str | None:
    if saved == expected:
        return None
    base = _json_field(file, meta, "base", dict, "a JSON object describing the base model")
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


def check_tuner_file_fits(
    file: str, metadata: dict[str, str], saved: dict, base: dict, config: ResTunerConfig, unet: nn.Module
) -> None:
    """The file was made for this kind of model (``base``) and its layers (``saved``) are those its config selects
    on ``unet``, of the same shapes; a :class:`ResTunerFileError` saying which model it was made for otherwise."""
    family = family_of(unet)
    made_for = base.get("family")
    if made_for is not None and made_for != family.name:
        other = family_named(str(made_for))
        raise ResTunerFileError(
            f"tuner file {file!r} was made for a {base.get('class', '?')} "
            f"({other.model_word if other else made_for}), not for this {type(unet).__name__} ({family.model_word}); "
            "load it into the kind of model it was trained on"
        )
    try:
        expected = expected_fingerprint(unet, config)
    except (ConfigError, ResTunerError) as err:
        raise ResTunerFileError(f"tuner file {file!r} does not fit this {family.model_word}: {err}") from None
    problem = _fingerprint_mismatch(file, metadata, saved, expected, unet)
    if problem:
        raise ResTunerFileError(problem)


def load_res_tuner(
    unet: nn.Module,
    path: str | os.PathLike | Mapping[str, torch.Tensor],
    adapter_name: str | None = None,
    weight_name: str | None = None,
    hotswap: bool = False,
    config: ResTunerConfig | None = None,
) -> str:
    """Load a tuner file (or a folder holding one) onto ``unet`` (or a pipeline's UNet) under ``adapter_name``
    (default: the name it was saved with); returns the name. Everything is checked before the UNet changes -- the
    file's type and header size, its metadata, the config, the layers against this UNet, every tensor's dtype and
    shape against modules planned on the meta device, the values -- so on any error it is unchanged.

    ``path`` may also be a state dict (file keys, as :func:`res_tuner_state_dict` returns); it then needs
    ``config``, except with ``hotswap``, where the loaded tuner's config is the default. ``hotswap=True`` copies the
    weights into the loaded tuner ``adapter_name`` in place (same tuner, config and shapes), so that a
    ``torch.compile``-d UNet runs them without recompiling (:mod:`~resattn_diffusion.integration.hotswap`)."""
    if isinstance(path, Mapping) or hotswap:
        return _load_state_dict_or_hotswap(unet, path, adapter_name, weight_name, hotswap, config)
    if config is not None:
        raise ConfigError("config= is for loading a state dict; a tuner file carries its own config: drop config=")
    unet = check_model(unet)
    if adapter_name is not None:
        check_adapter_name(adapter_name)
    file_path, metadata, entries = read_tuner_header(path, weight_name)
    file = str(file_path)
    saved_name = metadata.get("adapter_name")
    if saved_name is not None:
        try:
            check_adapter_name(saved_name, where=f"the adapter name in the metadata of {file!r}")
        except ConfigError as err:
            raise ResTunerFileError(str(err)) from None
    config, saved, base = tuner_file_fields(file, metadata)
    name = adapter_name or saved_name or "default"
    state = get_state(unet)
    if state is not None and name in state.configs:
        raise ResTunerError(f"a tuner named {name!r} is already loaded; unload it or pass another adapter_name")

    check_tuner_file_fits(file, metadata, saved, base, config, unet)
    _check_against_plan(file, unet, config, entries)
    tensors = _read_tensors(file_path, entries)
    _check_weight_values(file, tensors)
    return _install_checked(unet, config, name, tensors, file)


def _install_checked(
    unet: nn.Module, config: ResTunerConfig, name: str, tensors: dict[str, torch.Tensor], file: str
) -> str:
    """Add tuner ``name`` and copy the already-checked ``tensors`` into it; on any failure it is removed again."""
    add_res_tuner(unet, config, name)
    try:
        load_tuner_tensors(unet, name, tensors, file)
    except Exception:
        remove_res_tuner(unet, name)
        raise
    return name


def _load_state_dict_or_hotswap(
    unet: nn.Module,
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    adapter_name: str | None,
    weight_name: str | None,
    hotswap: bool,
    config: ResTunerConfig | None,
) -> str:
    """:func:`load_res_tuner` from a state dict, or with ``hotswap``: the same checks of names, config and every
    tensor (:func:`checked_tuner_tensors`) before the UNet changes."""
    unet = check_model(unet)
    if adapter_name is not None:
        check_adapter_name(adapter_name)
    if hotswap and adapter_name is None:
        raise ResTunerError("hotswap=True needs adapter_name=, the loaded tuner whose weights to replace")
    if isinstance(source, Mapping):
        file = "the state dict"
        bad = [key for key, value in source.items() if not isinstance(key, str) or not isinstance(value, torch.Tensor)]
        if bad:
            raise ResTunerFileError(f"a tuner state dict maps file keys to tensors; entry {bad[0]!r} is not one")
        tensors = dict(source)
        if config is None and hotswap and adapter_name is not None:
            config = get_res_tuner_configs(unet).get(adapter_name)
        if config is None:
            raise ResTunerFileError(
                "a state dict carries no tuner config: pass config= (the ResTunerConfig it was trained with), or "
                "load the tuner file, which holds it"
            )
        if not isinstance(config, ResTunerConfig):
            raise ConfigError(f"config must be a ResTunerConfig, got {type(config).__name__}")
        name = adapter_name or "default"
        entries = _state_dict_entries(file, tensors)
    else:  # a file, so hotswap=True (a plain file load is load_res_tuner's): no new name, no plan to check
        if config is not None:
            raise ConfigError("config= is for loading a state dict; a tuner file carries its own config: drop config=")
        metadata, tensors = read_tuner_file(source, weight_name)
        file = str(resolve_tuner_file(source, weight_name))
        config, saved, base = tuner_file_fields(file, metadata)
        # the file's own record of its base, as a plain load checks it: the tensor names and shapes alone let a
        # file made for another model through (a Flux tuner into SD3 where the layers agree) or blamed it as corrupt
        check_tuner_file_fits(file, metadata, saved, base, config, unet)
    _check_weight_values(file, tensors)
    if hotswap:
        from .hotswap import hotswap_res_tuner

        return hotswap_res_tuner(unet, adapter_name, config, tensors, file)
    check_adapter_name(name)
    state = get_state(unet)
    if state is not None and name in state.configs:
        raise ResTunerError(f"a tuner named {name!r} is already loaded; unload it or pass another adapter_name")
    _check_against_plan(file, unet, config, entries)
    return _install_checked(unet, config, name, tensors, file)


def checked_tuner_tensors(
    tuners: Iterable[tuple[str, nn.Module]], tensors: dict[str, torch.Tensor], file: str
) -> list[tuple[nn.Module, dict[str, torch.Tensor]]]:
    """Each ``(layer path, tuner)`` with its state dict from ``tensors`` (file keys), every tensor checked: present,
    of the tuner's shape, finite, and none left over. The one place a tuner file's tensors are checked."""
    remaining = dict(tensors)
    checked = []
    for layer_path, tuner in tuners:
        values = {}
        for key, target in tuner.state_dict().items():
            file_key = tuner_file_key(layer_path, key)
            if file_key not in remaining:
                raise ResTunerFileError(f"{file!r} lacks tensor {file_key!r}; the file is incomplete: re-save it")
            value = remaining.pop(file_key)
            if value.shape != target.shape:
                raise ResTunerFileError(
                    f"{file!r}: tensor {file_key!r} has shape {tuple(value.shape)}, the tuner here needs "
                    f"{tuple(target.shape)}"
                )
            if not torch.isfinite(value.float()).all():
                raise ResTunerFileError(
                    f"{file!r}: tensor {file_key!r} holds NaN or inf; the tuner diverged when trained"
                )
            values[key] = value
        checked.append((tuner, values))
    if remaining:
        raise ResTunerFileError(
            f"{file!r} has {len(remaining)} tensor(s) this tuner does not use, e.g. {next(iter(remaining))!r}"
        )
    return checked


@torch.no_grad()
def load_tuner_tensors(unet: nn.Module, name: str, tensors: dict[str, torch.Tensor], file: str) -> None:
    """Copy ``tensors`` (file keys) into the tuner ``name`` already on ``unet``, in place: its parameters stay the
    same objects (an optimizer holding them keeps working). Every tensor is checked first
    (:func:`checked_tuner_tensors`), so on any error the tuner is unchanged."""
    for tuner, values in checked_tuner_tensors(iter_tuners(unet, name), tensors, file):
        own = tuner.state_dict()
        tuner.load_state_dict(
            {key: value.to(device=own[key].device, dtype=own[key].dtype) for key, value in values.items()}
        )


#: The public name of :func:`tuner_state_dict` (the role of peft's ``get_peft_model_state_dict``).
res_tuner_state_dict = tuner_state_dict
