"""Training data: image folders, captions, ``datasets`` datasets, the image transform, and a seeded sampler.

Every random choice of the data pipeline (shuffle order, crop, flip, caption choice and dropout) is a pure
function of ``(seed, epoch, index)``: a resumed run sees exactly the batches the uninterrupted run would have
seen, whatever the number of data-loading workers.

A batch (``collate_examples``) holds ``pixel_values`` (N, 3, H, W) in [-1, 1], ``captions`` (N strings),
``original_sizes`` and ``crop_top_lefts`` (N, 2; SDXL's size conditioning) and ``is_prior`` (N booleans: the
DreamBooth class images of prior preservation).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler

from .. import images as images_io
from .errors import TrainingDataError

METADATA_FILE = "metadata.jsonl"


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed that depends only on ``parts`` (stable across processes, platforms and Python runs)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# --- images ------------------------------------------------------------------------------------------------
def list_images(folder: str | Path, what: str) -> list[Path]:
    """The image files directly in ``folder``, sorted; clear errors for a missing folder or one without images.
    Each file's header is read, so a file that is not an image is reported by name before training starts."""
    images = images_io.list_images(folder, what, TrainingDataError)
    for path in images:
        check_image_file(path)
    return images


def check_image_file(path: Path) -> None:
    """Read the header of an image file; an unreadable one is an error naming it."""
    images_io.check_image_file(path, TrainingDataError)


def load_image(source: Any, name: str) -> Image.Image:
    """An RGB PIL image from a path, a PIL image, or a ``datasets`` image dict; EXIF rotation applied."""
    return images_io.load_image(source, name, TrainingDataError)


@dataclass
class ImageTransform:
    """Resize the shorter side to ``resolution``, flip (``random_flip``), crop to a square (centre or random),
    scale to [-1, 1]. Also returns SDXL's conditioning: the original (height, width) and the crop's top-left."""

    resolution: int
    center_crop: bool = False
    random_flip: bool = False
    #: PIL resampling of the resize (``--image_interpolation_mode``)
    interpolation: Image.Resampling = Image.Resampling.BILINEAR

    def __call__(
        self, image: Image.Image, rng: random.Random
    ) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        size = self.resolution
        original_size = (image.height, image.width)
        scale = size / min(image.width, image.height)
        width = max(size, round(image.width * scale))
        height = max(size, round(image.height * scale))
        image = image.resize((width, height), self.interpolation)
        if self.random_flip and rng.random() < 0.5:
            image = ImageOps.mirror(image)
        if self.center_crop:
            top, left = (height - size) // 2, (width - size) // 2
        else:
            top, left = rng.randint(0, height - size), rng.randint(0, width - size)
        image = image.crop((left, top, left + size, top + size))
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        pixels = torch.from_numpy(array).permute(2, 0, 1).contiguous()
        return pixels, original_size, (top, left)


class SeededDataset(Dataset):
    """A dataset whose random choices depend on ``(seed, epoch, index)`` only (see the module docstring)."""

    def __init__(self, transform: ImageTransform, seed: int):
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def rng(self, index: int) -> random.Random:
        return random.Random(derive_seed(self.seed, "data", self.epoch, index))

    def example(self, image: Image.Image, caption: str, rng: random.Random, is_prior: bool = False) -> dict[str, Any]:
        pixels, original_size, crop_top_left = self.transform(image, rng)
        return {
            "pixel_values": pixels,
            "caption": caption,
            "original_size": original_size,
            "crop_top_left": crop_top_left,
            "is_prior": is_prior,
        }


# --- DreamBooth ------------------------------------------------------------------------------------------------
class DreamBoothDataset(SeededDataset):
    """Instance images with the instance prompt; with prior preservation each example also carries a class image
    with the class prompt. Its length is the larger of the two image counts (as in diffusers)."""

    def __init__(
        self,
        instance_images: Sequence[Path],
        instance_prompt: str,
        transform: ImageTransform,
        seed: int,
        class_images: Sequence[Path] | None = None,
        class_prompt: str | None = None,
    ):
        super().__init__(transform, seed)
        self.instance_images = list(instance_images)
        self.instance_prompt = instance_prompt
        self.class_images = list(class_images or [])
        self.class_prompt = class_prompt

    def __len__(self) -> int:
        return max(len(self.instance_images), len(self.class_images))

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = self.rng(index)
        path = self.instance_images[index % len(self.instance_images)]
        example = self.example(load_image(path, repr(str(path))), self.instance_prompt, rng)
        if self.class_images:
            class_path = self.class_images[index % len(self.class_images)]
            example["prior"] = self.example(
                load_image(class_path, repr(str(class_path))), self.class_prompt, rng, is_prior=True
            )
        return example


# --- text-to-image -------------------------------------------------------------------------------------------
class CaptionedImageSource(Protocol):
    """Where text-to-image examples come from: ``get(i)`` is ``(image, caption or captions, name for errors)``."""

    def __len__(self) -> int: ...

    def get(self, index: int) -> tuple[Any, Any, str]: ...


class FolderSource:
    """Images of a folder with their captions (from metadata.jsonl or .txt files)."""

    def __init__(self, records: list[tuple[Path, str]]):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def get(self, index: int) -> tuple[Any, Any, str]:
        path, caption = self.records[index]
        return path, caption, repr(str(path))


class HFDatasetSource:
    """Rows of a ``datasets.Dataset``, read lazily (images are decoded when an example is loaded)."""

    def __init__(self, dataset: Any, image_column: str, caption_column: str, name: str):
        self.dataset = dataset
        self.image_column = image_column
        self.caption_column = caption_column
        self.name = name

    def __len__(self) -> int:
        return len(self.dataset)

    def get(self, index: int) -> tuple[Any, Any, str]:
        name = f"{self.name}[{index}] (column {self.image_column!r})"
        try:
            row = self.dataset[index]
        except (UnidentifiedImageError, OSError, ValueError) as err:  # the image feature decodes on access
            raise TrainingDataError(f"cannot read image {name}: {err}. Remove or fix that row.") from None
        return row[self.image_column], row[self.caption_column], name


class TextImageDataset(SeededDataset):
    """Captioned images; a caption list gives one caption at random, ``caption_dropout`` gives the empty caption."""

    def __init__(
        self, source: CaptionedImageSource, transform: ImageTransform, seed: int, caption_dropout: float = 0.0
    ):
        super().__init__(transform, seed)
        self.source = source
        self.caption_dropout = caption_dropout

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = self.rng(index)
        image, caption, name = self.source.get(index)
        if isinstance(caption, (list, tuple)):
            if not caption:
                raise TrainingDataError(f"example {name} has an empty list of captions")
            caption = rng.choice(list(caption))
        if not isinstance(caption, str):
            raise TrainingDataError(
                f"the caption of {name} is a {type(caption).__name__}, not text or a list of texts"
            )
        if self.caption_dropout and rng.random() < self.caption_dropout:
            caption = ""
        return self.example(load_image(image, name), caption, rng)


def read_image_folder(
    folder: str | Path, caption_column: str, image_column: str = "file_name", what: str = "--train_data_dir"
) -> FolderSource:
    """Captioned images of ``folder``: ``metadata.jsonl`` (``image_column`` + ``caption_column`` per line) if
    present, otherwise every image with a same-named ``.txt`` caption file. ``what`` names the folder in errors."""
    folder = Path(folder)
    metadata = folder / METADATA_FILE
    if folder.is_dir() and metadata.is_file():
        records = _read_metadata(folder, metadata, caption_column, image_column)
    else:
        images = list_images(folder, what)
        captions = [path.with_suffix(".txt") for path in images]
        missing = [path for path, caption in zip(images, captions) if not caption.is_file()]
        if missing:
            examples = ", ".join(f"{p.name} (expected {p.with_suffix('.txt').name})" for p in missing[:3])
            raise TrainingDataError(
                f"{what} {str(folder)!r}: {len(missing)} of {len(images)} images have no caption: {examples}. "
                f"Add a same-named .txt caption per image, or a {METADATA_FILE} with one JSON object per line, "
                f'e.g. {{"{image_column}": "{images[0].name}", "{caption_column}": "a caption"}}'
            )
        records = [(path, _read_text(caption).strip()) for path, caption in zip(images, captions)]
    return FolderSource(records)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:  # a caption or metadata file that is not text: name it, before training
        raise TrainingDataError(f"{str(path)!r} is not UTF-8 text ({err}); save it as UTF-8") from None


def _read_metadata(folder: Path, metadata: Path, caption_column: str, image_column: str) -> list[tuple[Path, str]]:
    records = []
    columns: set[str] = set()
    for line_number, line in enumerate(_read_text(metadata).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise TrainingDataError(f"{str(metadata)!r} line {line_number} is not JSON: {err}") from None
        if not isinstance(row, dict) or image_column not in row:
            raise TrainingDataError(
                f'{str(metadata)!r} line {line_number} has no "{image_column}"; each line is an object like '
                f'{{"{image_column}": "0001.png", "{caption_column}": "a caption"}}'
            )
        columns.update(row)
        if caption_column not in row:
            raise TrainingDataError(
                f"{str(metadata)!r} has no caption column {caption_column!r} (line {line_number}); "
                f"its columns are {sorted(columns)}: pass one of them as --caption_column"
            )
        name, caption = row[image_column], row[caption_column]
        if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
            raise TrainingDataError(
                f'{str(metadata)!r} line {line_number}: "{image_column}" must be the path of an image inside '
                f"{str(folder)!r}, got {json.dumps(name)[:80]}"
            )
        if not isinstance(caption, str):  # a list or null would reach the tokenizer mid-training
            raise TrainingDataError(
                f'{str(metadata)!r} line {line_number}: the caption "{caption_column}" must be a string, got '
                f"{json.dumps(caption)[:80]}"
            )
        path = folder / name
        if not path.is_file():
            raise TrainingDataError(
                f"{str(metadata)!r} line {line_number} names {row[image_column]!r}, which is not in {str(folder)!r}"
            )
        check_image_file(path)
        records.append((path, caption))
    if not records:
        raise TrainingDataError(f"{str(metadata)!r} is empty; add one line per image")
    return records


def load_hf_dataset(
    name: str, config_name: str | None, image_column: str, caption_column: str, cache_dir: str | None
) -> HFDatasetSource:
    """The train split of a ``datasets`` dataset (a hub name, a local data folder, or a ``save_to_disk`` folder)."""
    import datasets

    path = Path(name)
    try:
        if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
            dataset = datasets.load_from_disk(str(path))
        else:
            dataset = datasets.load_dataset(name, config_name, cache_dir=cache_dir)
    except (FileNotFoundError, ValueError, ConnectionError) as err:
        raise TrainingDataError(f"cannot load --dataset_name {name!r}: {err}") from None
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise TrainingDataError(f"--dataset_name {name!r} has no 'train' split; its splits are {sorted(dataset)}")
        dataset = dataset["train"]
    columns = list(dataset.column_names)
    for flag, column in (("--image_column", image_column), ("--caption_column", caption_column)):
        if column not in columns:
            raise TrainingDataError(
                f"--dataset_name {name!r} has no column {column!r} ({flag}); its columns are {columns}"
            )
    if len(dataset) == 0:
        raise TrainingDataError(f"--dataset_name {name!r} has no examples")
    return HFDatasetSource(dataset, image_column, caption_column, name)


class SubsetSource:
    """``limit`` examples of ``source`` chosen at random with ``seed`` (``--max_train_samples``)."""

    def __init__(self, source: CaptionedImageSource, limit: int, seed: int):
        indices = list(range(len(source)))
        random.Random(derive_seed(seed, "subset")).shuffle(indices)
        self.source = source
        self.indices = sorted(indices[:limit])

    def __len__(self) -> int:
        return len(self.indices)

    def get(self, index: int) -> tuple[Any, Any, str]:
        return self.source.get(self.indices[index])


# --- batching --------------------------------------------------------------------------------------------------
class RepeatedSource:
    """A captioned-image source seen ``repeats`` times per epoch (``--repeats``): index i is example i mod n."""

    def __init__(self, source: CaptionedImageSource, repeats: int):
        self.source = source
        self.repeats = repeats

    def __len__(self) -> int:
        return len(self.source) * self.repeats

    def get(self, index: int) -> tuple[Any, Any, str]:
        return self.source.get(index % len(self.source))


def collate_examples(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack examples into a batch; DreamBooth class examples follow the instance examples."""
    flat = list(examples) + [e["prior"] for e in examples if "prior" in e]
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in flat]).contiguous(),
        "captions": [e["caption"] for e in flat],
        "original_sizes": torch.tensor([e["original_size"] for e in flat], dtype=torch.long),
        "crop_top_lefts": torch.tensor([e["crop_top_left"] for e in flat], dtype=torch.long),
        "is_prior": torch.tensor([e["is_prior"] for e in flat], dtype=torch.bool),
    }


class EpochShuffleSampler(Sampler[int]):
    """A random order of ``range(length)`` that depends only on ``(seed, epoch)``; :meth:`set_epoch` each epoch."""

    def __init__(self, length: int, seed: int):
        self.length = length
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "order", self.epoch))
        return iter(torch.randperm(self.length, generator=generator).tolist())
