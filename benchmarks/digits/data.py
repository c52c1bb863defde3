"""The digits benchmark's data: scikit-learn's 1,797 handwritten digits as 32x32 captioned images, offline.

``sklearn.datasets.load_digits`` ships 8x8 images with ink values 0..16. They are padded by one source pixel
(so strokes do not touch the border and rotations stay inside the frame), upsampled to 32x32 with bicubic
interpolation and clipped to [0, 1]: white ink (1) on a black background (0), like MNIST.

Everything downstream works on a :class:`DigitSet` (grayscale ``(N, H, W)`` float32 images in [0, 1] and their
labels) and converts at the edge: :meth:`DigitSet.tensors` gives ``(N, 3, H, W)`` tensors in [0, 1],
:meth:`DigitSet.pil_images` RGB PIL images, :meth:`DigitSet.captions` the prompts naming each digit.

The split is deterministic and stratified (:func:`load_digits_split`); the base model is trained on the train
split without the held-out digit (:func:`base_training_set`). :data:`STYLES` are image transforms the base never
sees (mirrored, bold strokes, inverted, rotated, ...), for the style-learning task.

Example::

    from benchmarks.digits.data import base_training_set, load_digits_split, apply_style

    train = base_training_set(heldout_digit=9)          # train split, digit 9 removed
    pixels = train.tensors()                            # (N, 3, 32, 32) in [0, 1]
    prompts = train.captions("a photo of digit {name}")
    nines = load_digits_split("train").only(9).first(5)  # DreamBooth's five examples
    bold = load_digits_split("test").styled("bold")
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

DIGIT_NAMES: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DEFAULT_CAPTION_TEMPLATE = "a photo of digit {name}"
DEFAULT_IMAGE_SIZE = 32
DEFAULT_HELDOUT_DIGIT = 9
DEFAULT_TEST_FRACTION = 0.2
DEFAULT_SPLIT_SEED = 0
_SOURCE_MARGIN = 1  # source pixels of black border added around the 8x8 digit before upsampling


def check_digit(digit: int) -> int:
    """Return ``digit`` as an int if it is one of 0..9; otherwise raise a ValueError that says so."""
    if isinstance(digit, bool) or int(digit) != digit or not 0 <= int(digit) <= 9:
        raise ValueError(f"a digit must be an integer from 0 to 9, got {digit!r}")
    return int(digit)


def caption_for(digit: int, template: str = DEFAULT_CAPTION_TEMPLATE) -> str:
    """The caption naming ``digit``: ``template`` with ``{name}`` (e.g. "seven") and/or ``{digit}`` (e.g. "7").

    >>> caption_for(7)
    'a photo of digit seven'
    """
    digit = check_digit(digit)
    if "{name}" not in template and "{digit}" not in template:
        raise ValueError(
            f"caption template {template!r} names no digit; put '{{name}}' (e.g. seven) or '{{digit}}' (e.g. 7) in it"
        )
    return template.format(name=DIGIT_NAMES[digit], digit=digit)


def caption_words(template: str = DEFAULT_CAPTION_TEMPLATE) -> list[str]:
    """Every word the captions of all ten digits use (for building a tokenizer vocabulary), in first-seen order."""
    words: list[str] = []
    for digit in range(10):
        for word in caption_for(digit, template).split():
            if word not in words:
                words.append(word)
    return words


def upsample_digits(images_8x8: np.ndarray, size: int = DEFAULT_IMAGE_SIZE) -> np.ndarray:
    """Upsample raw ``(N, 8, 8)`` digits (ink 0..16) to ``(N, size, size)`` float32 in [0, 1].

    A one-pixel black border is added first, then bicubic interpolation gives smooth strokes; the overshoot of
    the bicubic kernel is clipped away.
    """
    images = np.asarray(images_8x8, dtype=np.float32)
    if images.ndim != 3 or images.shape[1:] != (8, 8):
        raise ValueError(f"expected raw digits of shape (N, 8, 8), got {images.shape}")
    if size < 8:
        raise ValueError(f"size must be at least 8 pixels, got {size}")
    ink = torch.from_numpy(images / 16.0)[:, None]
    ink = F.pad(ink, (_SOURCE_MARGIN,) * 4)
    ink = F.interpolate(ink, size=(size, size), mode="bicubic", align_corners=False)
    return ink[:, 0].clamp(0.0, 1.0).numpy()


@lru_cache(maxsize=4)
def _all_digits(size: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # imported here: scikit-learn is only needed by the benchmark

    raw = load_digits()
    images = upsample_digits(raw.images, size)
    labels = raw.target.astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


@dataclass(frozen=True)
class DigitSet:
    """Grayscale digit images ``(N, H, W)`` float32 in [0, 1] (ink = 1) with their labels ``(N,)`` int64.

    ``style`` names the style applied to the images (None for plain digits). Methods return new sets; the arrays
    are never modified in place.
    """

    images: np.ndarray
    labels: np.ndarray
    style: str | None = None

    def __post_init__(self) -> None:
        if self.images.ndim != 3:
            raise ValueError(f"images must be (N, H, W), got shape {self.images.shape}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must be ({self.images.shape[0]},), got shape {self.labels.shape}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    @property
    def digits(self) -> list[int]:
        """The distinct digits present, ascending."""
        return sorted(int(d) for d in np.unique(self.labels))

    def subset(self, indices: Sequence[int] | np.ndarray) -> DigitSet:
        indices = np.asarray(indices, dtype=np.int64)
        return DigitSet(self.images[indices], self.labels[indices], self.style)

    def only(self, *digits: int) -> DigitSet:
        """The images of the given digits."""
        wanted = [check_digit(d) for d in digits]
        return self.subset(np.flatnonzero(np.isin(self.labels, wanted)))

    def without(self, *digits: int) -> DigitSet:
        """The images of every digit except the given ones."""
        unwanted = [check_digit(d) for d in digits]
        return self.subset(np.flatnonzero(~np.isin(self.labels, unwanted)))

    def first(self, count: int) -> DigitSet:
        """The first ``count`` images (the split order is already shuffled, so this is a fixed random sample)."""
        if count > len(self):
            raise ValueError(f"asked for {count} images but this set holds only {len(self)}")
        return self.subset(np.arange(count))

    def styled(self, style: str) -> DigitSet:
        """The same digits with one of :data:`STYLES` applied."""
        if self.style is not None:
            raise ValueError(f"this set is already styled {self.style!r}; style the plain digits instead")
        return DigitSet(apply_style(self.images, style), self.labels, style)

    def captions(self, template: str = DEFAULT_CAPTION_TEMPLATE) -> list[str]:
        """One caption per image; ``template`` may also use ``{style}`` (the style name, e.g. for style prompts)."""
        style_name = self.style or ""
        return [caption_for(int(d), template.replace("{style}", style_name)) for d in self.labels]

    def tensors(self, channels: int = 3) -> torch.Tensor:
        """The images as a float32 tensor ``(N, channels, H, W)`` in [0, 1] (grayscale repeated over channels)."""
        return images_to_tensor(self.images, channels)

    def pil_images(self) -> list[Image.Image]:
        """The images as RGB PIL images."""
        return images_to_pil(self.images)


def load_digits_split(
    split: str = "train",
    size: int = DEFAULT_IMAGE_SIZE,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    seed: int = DEFAULT_SPLIT_SEED,
) -> DigitSet:
    """One side of the deterministic, stratified train/test split of all 1,797 digits (shuffled order).

    With the defaults the train split holds 1,437 images and the test split 360 (36 per digit).
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    from sklearn.model_selection import train_test_split

    images, labels = _all_digits(size)
    indices = np.arange(len(labels))
    train_indices, test_indices = train_test_split(
        indices, test_size=test_fraction, random_state=seed, stratify=labels, shuffle=True
    )
    chosen = {"train": train_indices, "test": test_indices, "all": indices}[split]
    return DigitSet(images[chosen], labels[chosen])


def base_training_set(heldout_digit: int | None = DEFAULT_HELDOUT_DIGIT, size: int = DEFAULT_IMAGE_SIZE) -> DigitSet:
    """The base model's training data: the train split without the held-out digit (None keeps all ten)."""
    train = load_digits_split("train", size)
    return train if heldout_digit is None else train.without(heldout_digit)


def images_to_tensor(images: np.ndarray, channels: int = 3) -> torch.Tensor:
    """Grayscale ``(N, H, W)`` arrays in [0, 1] -> float32 tensor ``(N, channels, H, W)``."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    tensor = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))[:, None]
    return tensor.repeat(1, channels, 1, 1) if channels == 3 else tensor


def images_to_pil(images: np.ndarray) -> list[Image.Image]:
    """Grayscale ``(N, H, W)`` arrays in [0, 1] -> RGB PIL images."""
    pixels = np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)
    return [Image.fromarray(image, mode="L").convert("RGB") for image in pixels]


def to_grayscale_tensor(images: torch.Tensor | np.ndarray | Sequence[Image.Image]) -> torch.Tensor:
    """Any image batch this benchmark meets -> float32 ``(N, 1, H, W)`` in [0, 1].

    Accepts PIL images (a pipeline's output), numpy arrays ``(N, H, W)``, ``(N, H, W, C)`` in [0, 1] (a pipeline
    with ``output_type="np"``), or tensors ``(N, C, H, W)`` / ``(N, H, W)`` in [0, 1]. Color is averaged.
    """
    if isinstance(images, (list, tuple)):
        if not images or not isinstance(images[0], Image.Image):
            raise TypeError("a list of images must hold PIL images")
        arrays = [np.asarray(image.convert("L"), dtype=np.float32) / 255.0 for image in images]
        return torch.from_numpy(np.stack(arrays))[:, None]
    if isinstance(images, np.ndarray):
        array = images.astype(np.float32)
        if array.ndim == 4:  # (N, H, W, C), the layout diffusers returns for output_type="np"
            array = array.mean(axis=-1)
        if array.ndim != 3:
            raise ValueError(f"numpy images must be (N, H, W) or (N, H, W, C), got shape {images.shape}")
        return torch.from_numpy(array)[:, None]
    if isinstance(images, torch.Tensor):
        tensor = images.float()
        if tensor.ndim == 3:
            tensor = tensor[:, None]
        if tensor.ndim != 4:
            raise ValueError(f"tensor images must be (N, C, H, W) or (N, H, W), got shape {tuple(images.shape)}")
        return tensor.mean(dim=1, keepdim=True)
    raise TypeError(f"cannot read images of type {type(images).__name__}; pass PIL images, a numpy array or a tensor")


# --- styles the base model never sees -------------------------------------------------------------------------


def _disk(radius: float) -> np.ndarray:
    extent = int(np.ceil(radius))
    yy, xx = np.mgrid[-extent : extent + 1, -extent : extent + 1]
    return (xx**2 + yy**2) <= radius**2


def mirror(images: np.ndarray) -> np.ndarray:
    """Flip left-right."""
    return np.ascontiguousarray(images[:, :, ::-1])


def bold(images: np.ndarray, radius: float = 1.0) -> np.ndarray:
    """Thicker strokes: grey dilation with a disk of ``radius`` pixels (at 32x32, strokes grow by ~2 pixels)."""
    footprint = _disk(radius)
    return np.stack([ndimage.grey_dilation(image, footprint=footprint) for image in images]).astype(np.float32)


def thin(images: np.ndarray, radius: float = 1.0) -> np.ndarray:
    """Thinner strokes: grey erosion with a disk of ``radius`` pixels."""
    footprint = _disk(radius)
    return np.stack([ndimage.grey_erosion(image, footprint=footprint) for image in images]).astype(np.float32)


def invert(images: np.ndarray) -> np.ndarray:
    """Black ink on a white background."""
    return (1.0 - images).astype(np.float32)


def rotate(images: np.ndarray, degrees: float = 90.0) -> np.ndarray:
    """Rotate counter-clockwise by ``degrees`` about the centre (exact for multiples of 90)."""
    if degrees % 90 == 0:
        return np.ascontiguousarray(np.rot90(images, k=int(degrees // 90) % 4, axes=(1, 2)))
    rotated = ndimage.rotate(images, degrees, axes=(2, 1), reshape=False, order=1, mode="constant", cval=0.0)
    return np.clip(rotated, 0.0, 1.0).astype(np.float32)


def outline(images: np.ndarray, radius: float = 1.0) -> np.ndarray:
    """Hollow strokes: the dilated digit minus the eroded one, keeping only the edges of each stroke."""
    return np.clip(bold(images, radius + 0.5) - thin(images, radius), 0.0, 1.0).astype(np.float32)


STYLES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "mirrored": mirror,
    "bold": bold,
    "thin": thin,
    "inverted": invert,
    "rotated": rotate,
    "outline": outline,
}
"""Style name -> transform of grayscale ``(N, H, W)`` images in [0, 1]; none of them is in the base's training."""


def apply_style(images: np.ndarray, style: str) -> np.ndarray:
    """Apply one of :data:`STYLES` to grayscale ``(N, H, W)`` images in [0, 1]."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; choose one of {sorted(STYLES)}")
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 3:
        raise ValueError(f"images must be grayscale (N, H, W), got shape {images.shape}")
    return STYLES[style](images)
