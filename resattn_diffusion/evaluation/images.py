"""Image folders and prompt lists: listing, reading with clear errors, batching."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from PIL import Image

from .. import images as images_io
from .errors import EvaluationError

#: Name of the per-folder manifest written by :func:`resattn_diffusion.evaluation.generate_images`.
MANIFEST_NAME = "manifest.jsonl"


def list_images(folder: str | os.PathLike, what: str = "image folder") -> list[Path]:
    """The image files directly inside ``folder``, sorted by name.

    Raises:
        EvaluationError: ``folder`` does not exist, is not a directory, or holds no image file.
    """
    return images_io.list_images(folder, what, EvaluationError)


def load_image(path: str | os.PathLike) -> Image.Image:
    """Read one image as RGB (EXIF rotation applied); an unreadable or truncated file raises an error that names it."""
    return images_io.load_image(path, None, EvaluationError)


def iter_image_batches(files: Sequence[Path], batch_size: int) -> Iterator[list[Image.Image]]:
    """Consecutive batches of at most ``batch_size`` decoded RGB images, in the order of ``files``."""
    if batch_size < 1:
        raise EvaluationError(f"batch_size must be >= 1, got {batch_size}.")
    for start in range(0, len(files), batch_size):
        yield [load_image(path) for path in files[start : start + batch_size]]


def read_prompts(prompts: str | os.PathLike | Sequence[str]) -> list[str]:
    """Prompts from a list, or from a text file with one prompt per line (blank lines are skipped).

    A single string is read as a file path (pass ``[text]`` for one prompt).
    """
    if isinstance(prompts, (str, os.PathLike)):
        path = Path(prompts)
        if not path.is_file():
            raise EvaluationError(
                f"prompt file {str(path)!r} does not exist; pass a text file with one prompt per line "
                "(or a list of prompts in Python)."
            )
        try:
            with open(path, encoding="utf-8") as file:
                result = [line.strip() for line in file if line.strip()]
        except UnicodeDecodeError as err:  # e.g. an image passed as --prompts
            raise EvaluationError(f"prompt file {str(path)!r} is not UTF-8 text ({err}).") from None
        if not result:
            raise EvaluationError(f"prompt file {str(path)!r} holds no prompt (one per line expected).")
        return result
    result = list(prompts)
    if not result:
        raise EvaluationError("the prompt list is empty; give at least one prompt.")
    for prompt in result:
        if not isinstance(prompt, str):
            raise EvaluationError(f"prompts must be strings, got {type(prompt).__name__}: {prompt!r}")
    return result


def read_manifest(folder: str | os.PathLike) -> list[dict]:
    """The records of ``folder/manifest.jsonl`` (empty if there is none), one dict per line.

    A later record for the same file replaces an earlier one. A corrupt line raises an error naming the line.
    """
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return []
    by_file: dict[str, dict] = {}
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise EvaluationError(
                    f"{str(path)!r} line {number} is not valid JSON ({err}); fix or delete that line."
                ) from err
            if not isinstance(record, dict) or "file" not in record:
                raise EvaluationError(f"{str(path)!r} line {number} has no 'file' field; fix or delete that line.")
            _check_manifest_record(path, number, record)
            by_file[record["file"]] = record
    return list(by_file.values())


def _check_manifest_record(path: Path, number: int, record: dict) -> None:
    """The fields every reader of a manifest uses: ``file`` a file name in the folder, ``prompt`` a string, ``seed``
    an integer (a list there was a raw ``TypeError: unhashable type`` in the reports, a list prompt reached CLIP)."""
    name = record["file"]
    if not isinstance(name, str) or not name or name in (".", "..") or os.path.basename(name) != name:
        raise EvaluationError(
            f"{str(path)!r} line {number}: 'file' must be the name of an image in the folder, got {name!r}; fix or "
            "delete that line."
        )
    for key, kind, word in (("prompt", str, "a string"), ("seed", int, "an integer")):
        value = record.get(key)
        if key in record and (not isinstance(value, kind) or isinstance(value, bool)):
            raise EvaluationError(
                f"{str(path)!r} line {number}: {key!r} must be {word}, got {json.dumps(value)[:80]}; fix or delete "
                "that line."
            )


def prompts_for_images(files: Sequence[Path], prompts: str | os.PathLike | Sequence[str] | None = None) -> list[str]:
    """The prompt of each image in ``files``.

    With ``prompts`` given (list or file), the i-th prompt belongs to the i-th file in name order; a single
    prompt applies to every image. Without it, the prompts come from the folder's ``manifest.jsonl``.
    """
    if not files:
        raise EvaluationError("no images to match prompts to.")
    if prompts is not None:
        prompt_list = read_prompts(prompts)
        if len(prompt_list) == 1:
            return prompt_list * len(files)
        if len(prompt_list) != len(files):
            raise EvaluationError(
                f"{len(prompt_list)} prompts for {len(files)} images in {str(files[0].parent)!r}: give one prompt "
                "per image (in file-name order), a single prompt for all, or no prompts to use manifest.jsonl."
            )
        return prompt_list
    folder = files[0].parent
    by_file = {record["file"]: record for record in read_manifest(folder)}
    if not by_file:
        raise EvaluationError(
            f"{str(folder)!r} has no {MANIFEST_NAME} to take prompts from; pass the prompts (--prompts FILE)."
        )
    missing = [path.name for path in files if path.name not in by_file or "prompt" not in by_file[path.name]]
    if missing:
        raise EvaluationError(
            f"{len(missing)} images in {str(folder)!r} have no prompt in {MANIFEST_NAME} (e.g. {missing[0]!r}); "
            "remove them or pass the prompts (--prompts FILE)."
        )
    return [by_file[path.name]["prompt"] for path in files]
