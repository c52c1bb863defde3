"""Image folders and image files, read the one way training, evaluation and search all use.

Each caller passes its own error class (``TrainingDataError``, ``EvaluationError``, ...), so a bad folder or file
is reported in the words and type of the command that read it; the rules (which files are images, how a file is
decoded) are the same everywhere.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

#: File name endings read as images in folders (case-insensitive).
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def list_images(folder: str | os.PathLike, what: str, error: type[Exception]) -> list[Path]:
    """The image files directly in ``folder``, sorted by name; ``error`` for a missing folder, a file, or a folder
    without images (``what`` names the folder in the message, e.g. ``"--instance_data_dir"``)."""
    folder = Path(folder)
    if not folder.exists():
        raise error(f"{what} {str(folder)!r} does not exist; pass a folder of images")
    if not folder.is_dir():
        raise error(f"{what} {str(folder)!r} is a file, not a directory; pass a folder of images")
    files = sorted(p for p in folder.iterdir() if is_image_file(p))
    if not files:
        raise error(
            f"{what} {str(folder)!r} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)} files); add some images"
        )
    return files


def count_images(folder: str | os.PathLike) -> int:
    """How many image files ``folder`` holds (0 for a missing folder)."""
    folder = Path(folder)
    return sum(1 for p in folder.iterdir() if is_image_file(p)) if folder.is_dir() else 0


#: What Pillow raises for files it cannot decode; a decompression bomb (a header claiming more pixels than Pillow's
#: ``MAX_IMAGE_PIXELS`` limit, ~179 million) is not an ``OSError``.
_UNREADABLE = (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)
#: The modes Pillow opens 16-bit grayscale PNG / TIFF files in: white is 65535, and ``convert("RGB")`` clips every
#: value above 255, so the picture would turn (almost) white.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def check_image_file(path: Path, error: type[Exception]) -> None:
    """Read the header of an image file; an unreadable one is ``error`` naming it."""
    try:
        with Image.open(path) as image:
            mode, file_format = image.mode, image.format  # the header is parsed on open
    except _UNREADABLE as err:
        raise error(f"cannot read image {str(path)!r}: {err}. Remove or replace the file.") from None
    _check_white_level(mode, file_format, repr(str(path)), error)


def _check_white_level(mode: str, file_format: str | None, name: str, error: type[Exception]) -> None:
    """Pillow's 32-bit integer and floating-point modes have no fixed white level (except a PNG's, which holds at
    most 16 bits): refused rather than guessed."""
    if mode == "F" or (mode == "I" and file_format != "PNG"):
        raise error(
            f"image {name} has 32-bit {'integer' if mode == 'I' else 'floating-point'} pixels (Pillow mode "
            f"{mode!r}), whose white level is unknown; save it with 8 or 16 bits per channel (e.g. a PNG)"
        )


def _as_rgb(image: Image.Image, file_format: str | None, name: str, error: type[Exception]) -> Image.Image:
    """The picture as RGB with 8 bits per channel, as a viewer shows it. A 16-bit grayscale image (and Pillow's
    32-bit integer mode when it comes from a PNG, which holds at most 16 bits) is scaled by 255/65535; a 32-bit
    integer or floating-point image from elsewhere has no known white level and is refused."""
    _check_white_level(image.mode, file_format, name, error)
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "I":
        values = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.rint(values / 257.0).clip(0, 255).astype(np.uint8), "L").convert("RGB")
    return image.convert("RGB")


def load_image(source: Any, name: str | None, error: type[Exception]) -> Image.Image:
    """An RGB PIL image from a path, a PIL image, or a ``datasets`` image dict; EXIF rotation applied, the whole
    file decoded (a truncated one fails here). ``name`` names it in ``error`` (None: the path)."""
    name = name if name is not None else repr(str(source))
    if isinstance(source, Image.Image):
        opener = None
    elif isinstance(source, (str, os.PathLike)):
        opener = lambda: Image.open(source)  # noqa: E731
    elif isinstance(source, dict) and (source.get("bytes") or source.get("path")):
        data = source.get("bytes")
        opener = lambda: Image.open(io.BytesIO(data) if data else source["path"])  # noqa: E731
    else:
        raise error(f"image {name} is a {type(source).__name__}, not an image or an image path")
    try:
        if opener is None:
            image = source
            image.load()
            file_format = image.format
        else:
            with opener() as opened:
                image = opened.copy()  # copy() decodes the whole file, so a truncated one fails here
                file_format = opened.format  # a copy has none
        image = ImageOps.exif_transpose(image)
    except _UNREADABLE as err:
        raise error(f"cannot read image {name}: {err}. Remove or replace it.") from None
    return _as_rgb(image, file_format, name, error)
