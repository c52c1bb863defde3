"""Feature extractors: images (and for CLIP, texts) to vectors, in batches.

Every extractor is an :class:`ImageEncoder`: ``encode_images(list of PIL images) -> float32 tensor (N, D)`` on
the CPU. :func:`extract_features` runs one over a folder with a progress bar. The extractors:

* :class:`ImageEncoder` itself wraps any ``nn.Module`` mapping an image batch to features, with a preprocessing
  callable (default: RGB in [0, 1], N x 3 x H x W) -- e.g. a digit classifier's penultimate layer.
* :class:`InceptionEncoder` -- the FID Inception (:mod:`.inception`).
* :class:`CLIPEncoder` -- transformers ``CLIPModel`` from a hub id or local folder; images and texts.
* :class:`DINOEncoder` -- a transformers ViT / DINOv2 (``AutoModel``); the CLS token of the last layer.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from .errors import EvaluationError
from .images import iter_image_batches, list_images
from .inception import FIDInceptionV3, TorchFidelityInception, find_inception_weights

Preprocess = Callable[[list[Image.Image]], torch.Tensor]


def pil_to_tensor(image: Image.Image, mode: str = "RGB") -> torch.Tensor:
    """One PIL image -> float tensor C x H x W in [0, 1] (``mode`` ``"RGB"`` or ``"L"`` for one channel)."""
    array = np.asarray(image.convert(mode), dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def images_to_tensor(
    images: Sequence[Image.Image], size: int | tuple[int, int] | None = None, mode: str = "RGB"
) -> torch.Tensor:
    """The default preprocessing of a user module: a batch N x C x H x W in [0, 1].

    Args:
        size: resize every image to ``size`` (``(height, width)`` or one int for a square) with bilinear
            interpolation; ``None`` keeps the size, which must then be the same for all images.
        mode: ``"RGB"`` (3 channels) or ``"L"`` (grayscale, 1 channel).
    """
    tensors = [pil_to_tensor(image, mode) for image in images]
    if size is not None:
        height, width = (size, size) if isinstance(size, int) else size
        tensors = [
            torch.nn.functional.interpolate(t[None], size=(height, width), mode="bilinear", align_corners=False)[0]
            for t in tensors
        ]
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise EvaluationError(
            f"images of different sizes {sorted(shapes)} cannot form one batch; give the feature extractor a "
            "resize (e.g. ImageEncoder(model, size=64)) or a preprocess callable."
        )
    return torch.stack(tensors)


def _first_tensor(output, what: str) -> torch.Tensor:
    """A model's features from whatever it returned: a tensor, a tuple starting with one, or a ModelOutput."""
    if isinstance(output, torch.Tensor):
        return output
    for name in ("image_embeds", "text_embeds", "pooler_output"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise EvaluationError(f"{what} returned {type(output).__name__}; expected a tensor of features (N x D).")


class ImageEncoder:
    """Any ``nn.Module`` as a feature extractor: ``features = model(preprocess(images))``, flattened to N x D.

    Args:
        model: maps a preprocessed batch to features (a tensor, or a tuple whose first item is one).
        preprocess: list of PIL images -> input batch. Default: :func:`images_to_tensor` with ``size`` and ``mode``
            (RGB or grayscale in [0, 1]); add normalisation inside ``model`` or in your own callable.
        name: recorded in reports and reference statistics, so that features of different extractors never mix.
        device: where the model runs; inputs are moved there and cast to the model's floating dtype.
        size, mode: options of the default preprocessing.
    """

    def __init__(
        self,
        model: nn.Module,
        preprocess: Preprocess | None = None,
        name: str = "custom",
        device: str | torch.device = "cpu",
        size: int | tuple[int, int] | None = None,
        mode: str = "RGB",
    ):
        if not isinstance(model, nn.Module):
            raise EvaluationError(f"the feature extractor must be a torch nn.Module, got {type(model).__name__}.")
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.name = name
        if preprocess is None:
            self.preprocess: Preprocess = lambda images: images_to_tensor(images, size=size, mode=mode)
        else:
            self.preprocess = preprocess

    def _input_dtype(self) -> torch.dtype:
        for parameter in self.model.parameters():
            if parameter.is_floating_point():
                return parameter.dtype
        return torch.float32

    def forward_features(self, batch: torch.Tensor) -> torch.Tensor:
        """The model's features for one preprocessed batch (override for models with structured outputs)."""
        return _first_tensor(self.model(batch), f"feature extractor {self.name!r}")

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """float32 CPU features, N x D, for a list of PIL images."""
        batch = self.preprocess(list(images))
        if not isinstance(batch, torch.Tensor):
            raise EvaluationError(f"the preprocess of {self.name!r} returned {type(batch).__name__}, not a tensor.")
        batch = batch.to(self.device, self._input_dtype())
        features = self.forward_features(batch)
        if features.shape[0] != len(images):
            raise EvaluationError(
                f"feature extractor {self.name!r} returned {features.shape[0]} rows for {len(images)} images."
            )
        return features.reshape(len(images), -1).float().cpu()


class InceptionEncoder(ImageEncoder):
    """The FID Inception as an :class:`ImageEncoder` (2048-d features).

    Args:
        weights_path: local weights file (see :func:`.inception.find_inception_weights`; never downloads).
        resize: ``"pytorch-fid"`` or ``"tf1"`` (see :mod:`.inception`).
        backend: ``"builtin"`` (:class:`.inception.FIDInceptionV3`) or ``"torch-fidelity"`` (needs that package;
            always the ``"tf1"`` pipeline).
    """

    def __init__(
        self,
        weights_path: str | os.PathLike | None = None,
        resize: str = "pytorch-fid",
        backend: str = "builtin",
        device: str | torch.device = "cpu",
    ):
        if backend == "builtin":
            model: nn.Module = FIDInceptionV3(resize=resize)
            model.load_weights(find_inception_weights(weights_path))
            name = f"inception-v3-fid/{resize}"
        elif backend == "torch-fidelity":
            model = TorchFidelityInception(weights_path)
            name = "inception-v3-fid/tf1"
        else:
            raise EvaluationError(f"inception backend must be 'builtin' or 'torch-fidelity', got {backend!r}.")
        super().__init__(model, preprocess=self._to_batch, name=name, device=device)
        self.backend = backend

    def _to_batch(self, images: list[Image.Image]) -> torch.Tensor:
        tensors = [pil_to_tensor(image) for image in images]
        if len({tuple(t.shape) for t in tensors}) > 1:
            if self.backend == "torch-fidelity":
                raise EvaluationError(
                    "the torch-fidelity backend needs images of one size per batch; use --batch-size 1 "
                    "or the built-in backend."
                )
            # The network resizes each image on its own, so resizing one by one before stacking changes nothing.
            tensors = [self.model.resize(t[None])[0] for t in tensors]
        return torch.stack(tensors)


def _load_pretrained(loader: Callable, name_or_path: str | os.PathLike, flag: str, what: str, **kwargs):
    """``loader(name_or_path)``; a hub or file error becomes an :class:`EvaluationError` naming ``flag``. A Hub id
    that is neither cached nor reachable fails at once (huggingface_hub would retry for about a minute)."""
    from ..hub import ModelSourceError, check_pretrained_source

    try:
        check_pretrained_source(name_or_path, flag, filename="config.json")
    except ModelSourceError as err:
        raise EvaluationError(f"could not load the {what}: {err}") from None
    try:
        return loader(str(name_or_path), **kwargs)
    except OSError as err:
        raise EvaluationError(
            f"could not load the {what} from {str(name_or_path)!r} (offline, or not a model folder). Pass a local "
            f"folder with {flag} /path/to/folder (a save_pretrained folder with the model and its "
            f"{'tokenizer and ' if 'CLIP' in what else ''}image processor). Cause: {err}"
        ) from err


class CLIPEncoder(ImageEncoder):
    """transformers ``CLIPModel`` embeddings (the projected ones, as in CLIP score) for images and texts.

    Loads ``CLIPModel``, ``AutoTokenizer`` and ``AutoImageProcessor`` from ``model_name_or_path`` (a hub id or a
    local ``save_pretrained`` folder). Works with transformers 4 (``get_*_features`` return tensors) and 5 (they
    return an output object whose ``pooler_output`` is the projected embedding).
    """

    def __init__(self, model_name_or_path: str | os.PathLike, device: str | torch.device = "cpu"):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        flag = "--clip-model"
        model = _load_pretrained(CLIPModel.from_pretrained, model_name_or_path, flag, "CLIP model")
        self.tokenizer = _load_pretrained(AutoTokenizer.from_pretrained, model_name_or_path, flag, "CLIP tokenizer")
        self.image_processor = _load_pretrained(
            AutoImageProcessor.from_pretrained, model_name_or_path, flag, "CLIP image processor"
        )
        super().__init__(model, preprocess=self._pixel_values, name=f"clip:{model_name_or_path}", device=device)
        self.max_text_length = min(
            int(getattr(self.tokenizer, "model_max_length", 77) or 77),
            int(model.config.text_config.max_position_embeddings),
        )

    def _pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"]

    def forward_features(self, batch: torch.Tensor) -> torch.Tensor:
        return _first_tensor(self.model.get_image_features(pixel_values=batch), "CLIPModel.get_image_features")

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """float32 CPU text embeddings, N x D. Prompts longer than CLIP's context (77 tokens) are truncated."""
        tokens = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_text_length, return_tensors="pt"
        )
        tokens = {
            key: value.to(self.device) for key, value in tokens.items() if key in ("input_ids", "attention_mask")
        }
        features = _first_tensor(self.model.get_text_features(**tokens), "CLIPModel.get_text_features")
        return features.float().cpu()


class DINOEncoder(ImageEncoder):
    """Self-supervised ViT features (DreamBooth's DINO metric): the CLS token of the last hidden state.

    Loads ``AutoModel`` + ``AutoImageProcessor`` from a hub id or local folder; ``facebook/dino-vits16`` is the
    model of the DreamBooth paper, DINOv2 checkpoints (``facebook/dinov2-small``) work as well. The model's own
    pooler is not used (DINO checkpoints have none; DINOv2's pooler output equals the CLS token).
    """

    def __init__(self, model_name_or_path: str | os.PathLike, device: str | torch.device = "cpu"):
        from transformers import AutoConfig, AutoImageProcessor, AutoModel

        flag = "--dino-model"
        config = _load_pretrained(AutoConfig.from_pretrained, model_name_or_path, flag, "DINO model")
        # A ViT's pooler (dense + tanh) is not part of DINO checkpoints; do not build it only to leave it unused.
        extra = {"add_pooling_layer": False} if config.model_type == "vit" else {}
        model = _load_pretrained(
            AutoModel.from_pretrained, model_name_or_path, flag, "DINO model", config=config, **extra
        )
        self.image_processor = _load_pretrained(
            AutoImageProcessor.from_pretrained, model_name_or_path, flag, "DINO image processor"
        )
        super().__init__(model, preprocess=self._pixel_values, name=f"dino:{model_name_or_path}", device=device)

    def _pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"]

    def forward_features(self, batch: torch.Tensor) -> torch.Tensor:
        output = self.model(pixel_values=batch)
        hidden = getattr(output, "last_hidden_state", None)
        if hidden is None:
            hidden = output[0]
        return hidden[:, 0]


def extract_features(
    images: str | os.PathLike | Sequence[Path],
    encoder: ImageEncoder,
    batch_size: int = 32,
    progress: bool = True,
    description: str | None = None,
) -> np.ndarray:
    """Features (float32, N x D) of every image in a folder (sorted by name) or in a list of files.

    Images are read and encoded ``batch_size`` at a time, with a tqdm progress bar.
    """
    files = list_images(images) if isinstance(images, (str, os.PathLike)) else [Path(f) for f in images]
    if not files:
        raise EvaluationError("no image files given to extract features from.")
    chunks = []
    with tqdm(total=len(files), desc=description or encoder.name, unit="img", disable=not progress) as bar:
        for start, batch in zip(range(0, len(files), batch_size), iter_image_batches(files, batch_size)):
            chunk = encoder.encode_images(batch).numpy()
            if chunks and chunk.shape[1] != chunks[0].shape[1]:
                # an extractor whose feature width follows the image size, on images of mixed sizes
                raise EvaluationError(
                    f"feature extractor {encoder.name!r} gave {chunk.shape[1]} features for {str(files[start])!r} but "
                    f"{chunks[0].shape[1]} for {str(files[0])!r} (images of different sizes?); give it a resize "
                    "(e.g. ImageEncoder(model, size=64)) or resize the images."
                )
            chunks.append(chunk)
            bar.update(len(batch))
    return np.concatenate(chunks, axis=0)
