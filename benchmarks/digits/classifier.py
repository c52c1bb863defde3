"""A small CNN that recognises the 32x32 digits: the benchmark's judge of content and its feature extractor.

* :meth:`DigitClassifier.predict` -- the digit in each image (judges whether a pipeline drew what it was asked);
* :meth:`DigitClassifier.features` -- the penultimate layer ``(N, F)``, the feature space of the benchmark's
  Frechet distance (the digits' analogue of FID's Inception features).

Both take what pipelines and :mod:`benchmarks.digits.data` produce: PIL images, ``(N, H, W[, C])`` arrays or
``(N, C, H, W)`` tensors in [0, 1] (color is averaged to grayscale).

The shipped weights live in ``benchmarks/digits/assets/classifier/`` (``model.safetensors`` + ``config.json``);
:func:`load_digit_classifier` reads them. Rebuild them with::

    .venv/bin/python benchmarks/digits/classifier.py --out benchmarks/digits/assets/classifier --seed 0

**The style-aware classifier** (``assets/style_classifier/``, :func:`load_style_classifier`) is the same CNN with a
second head: trained with every :data:`~benchmarks.digits.data.STYLES` as augmentation (each training image drawn
plain or in one style, uniformly), it names the digit *whatever the style* (:meth:`DigitClassifier.predict`) and
the style itself (:meth:`DigitClassifier.predict_style`: ``"plain"`` or a style name). The style task judges its
samples with it: the plain classifier only knows upright plain strokes (it recognised 40% of real outlined test
digits), so a tuned model that learned the style would be scored as if it had forgotten the digit. Its accuracy on
real styled test digits, per style, is recorded in its ``config.json`` (all >= 0.95, checked by the tests).
Rebuild it with::

    .venv/bin/python benchmarks/digits/classifier.py --styles --out benchmarks/digits/assets/style_classifier --seed 0
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.digits.data import STYLES, DigitSet, load_digits_split, to_grayscale_tensor  # noqa: E402

DEFAULT_CLASSIFIER_DIR = Path(__file__).resolve().parent / "assets" / "classifier"
DEFAULT_STYLE_CLASSIFIER_DIR = Path(__file__).resolve().parent / "assets" / "style_classifier"
PLAIN = "plain"  # the style head's name for unstyled digits
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

ImageBatch = torch.Tensor | np.ndarray | Sequence[Image.Image]


@dataclass
class DigitClassifierConfig:
    """Shape of the CNN: three conv stages (two 3x3 convs each, then 2x2 max-pool), global average pooling.

    ``style_names`` (empty for the plain classifier) adds a style head over ``("plain", *style_names)``.
    """

    image_size: int = 32
    stage_channels: tuple[int, int, int] = (16, 32, 64)
    feature_dim: int = 64
    num_classes: int = 10
    style_names: tuple[str, ...] = ()

    @property
    def style_classes(self) -> tuple[str, ...]:
        return (PLAIN, *self.style_names) if self.style_names else ()

    @classmethod
    def from_dict(cls, values: dict) -> DigitClassifierConfig:
        known = {key: values[key] for key in cls.__dataclass_fields__ if key in values}
        for key in ("stage_channels", "style_names"):
            if key in known:
                known[key] = tuple(known[key])
        return cls(**known)


class DigitClassifier(nn.Module):
    """conv stages -> global average pool -> linear ``feature_dim`` + ReLU (the features) -> linear to 10 logits."""

    def __init__(self, config: DigitClassifierConfig | None = None) -> None:
        super().__init__()
        self.config = config or DigitClassifierConfig()
        layers: list[nn.Module] = []
        in_channels = 1
        for out_channels in self.config.stage_channels:
            layers += [
                nn.Conv2d(in_channels, out_channels, 3, padding=1),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
                nn.Conv2d(out_channels, out_channels, 3, padding=1),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            in_channels = out_channels
        self.trunk = nn.Sequential(*layers)
        self.feature_head = nn.Sequential(nn.Linear(in_channels, self.config.feature_dim), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout(0.2)
        self.logits_head = nn.Linear(self.config.feature_dim, self.config.num_classes)
        styles = len(self.config.style_classes)
        self.style_head = nn.Linear(self.config.feature_dim, styles) if styles else None

    def _prepare(self, images: ImageBatch) -> torch.Tensor:
        pixels = to_grayscale_tensor(images)
        size = self.config.image_size
        if pixels.shape[-2:] != (size, size):
            pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        # Centre the [0, 1] ink values so the first conv sees a zero-mean input.
        return (pixels - 0.5) * 2.0

    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Prepared ``(N, 1, H, W)`` pixels in [-1, 1] -> penultimate features ``(N, feature_dim)``."""
        pooled = self.trunk(pixels).mean(dim=(2, 3))
        return self.feature_head(pooled)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Prepared ``(N, 1, H, W)`` pixels in [-1, 1] -> logits ``(N, 10)``."""
        return self.logits_head(self.dropout(self.forward_features(pixels)))

    def forward_both(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prepared pixels -> (digit logits ``(N, 10)``, style logits ``(N, len(style_classes))``)."""
        if self.style_head is None:
            raise ValueError("this classifier has no style head; load the style-aware one (load_style_classifier)")
        features = self.dropout(self.forward_features(pixels))
        return self.logits_head(features), self.style_head(features)

    @torch.no_grad()
    def predict_style(self, images: ImageBatch, batch_size: int = 256) -> list[str]:
        """The style of each image: ``"plain"`` or one of ``config.style_names``."""
        pixels = self._prepare(images).to(self._device())
        was_training = self.training
        self.eval()
        indices = torch.cat([self.forward_both(chunk)[1].argmax(dim=-1) for chunk in pixels.split(batch_size)])
        self.train(was_training)
        return [self.config.style_classes[i] for i in indices.tolist()]

    @torch.no_grad()
    def features(self, images: ImageBatch, batch_size: int = 256) -> torch.Tensor:
        """Penultimate-layer features ``(N, feature_dim)`` of any image batch (for a Frechet distance)."""
        pixels = self._prepare(images).to(self._device())
        was_training = self.training
        self.eval()
        chunks = [self.forward_features(chunk) for chunk in pixels.split(batch_size)]
        self.train(was_training)
        return torch.cat(chunks).cpu()

    @torch.no_grad()
    def predict_proba(self, images: ImageBatch, batch_size: int = 256) -> torch.Tensor:
        """Class probabilities ``(N, 10)`` of any image batch."""
        pixels = self._prepare(images).to(self._device())
        was_training = self.training
        self.eval()
        chunks = [self(chunk).softmax(dim=-1) for chunk in pixels.split(batch_size)]
        self.train(was_training)
        return torch.cat(chunks).cpu()

    def predict(self, images: ImageBatch, batch_size: int = 256) -> torch.Tensor:
        """The predicted digit ``(N,)`` int64 of any image batch."""
        return self.predict_proba(images, batch_size).argmax(dim=-1)

    def accuracy(self, digits: DigitSet) -> float:
        """Share of ``digits`` whose label is predicted."""
        predicted = self.predict(digits.tensors(channels=1)).numpy()
        return float((predicted == digits.labels).mean())

    def _device(self) -> torch.device:
        return next(self.parameters()).device


def random_affine(
    pixels: torch.Tensor,
    generator: torch.Generator,
    max_degrees: float = 10.0,
    scale_range: tuple[float, float] = (0.9, 1.1),
    max_shift: float = 0.08,
) -> torch.Tensor:
    """Light augmentation: a random rotation, zoom and shift per image (shift as a fraction of the half-width)."""
    count = pixels.shape[0]
    angle = (torch.rand(count, generator=generator) * 2 - 1) * math.radians(max_degrees)
    scale = scale_range[0] + torch.rand(count, generator=generator) * (scale_range[1] - scale_range[0])
    shift = (torch.rand(count, 2, generator=generator) * 2 - 1) * max_shift * 2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
    # Padding with -1 keeps the background black (prepared pixels live in [-1, 1]).
    return F.grid_sample(pixels + 1.0, grid, align_corners=False, padding_mode="zeros") - 1.0


def styled_accuracies(model: DigitClassifier, digits: DigitSet) -> dict[str, dict[str, float]]:
    """For every style the model's head knows (plain included): digit and style accuracy on ``digits`` in it."""
    result = {}
    for style in model.config.style_classes:
        styled = digits if style == PLAIN else digits.styled(style)
        result[style] = {
            "digit_accuracy": model.accuracy(styled),
            "style_accuracy": float(np.mean([s == style for s in model.predict_style(styled.tensors(channels=1))])),
        }
    return result


def train_digit_classifier(
    config: DigitClassifierConfig | None = None,
    epochs: int = 15,
    batch_size: int = 64,
    learning_rate: float = 3e-3,
    seed: int = 0,
    log_every: int = 1,
) -> tuple[DigitClassifier, dict[str, float]]:
    """Train on all ten digits of the train split with light augmentation; return the model and its metrics.

    AdamW with a one-cycle schedule; about 20 s on one CPU thread. Metrics: ``test_accuracy`` on the held-out
    test split, ``train_seconds``. With ``config.style_names`` every image of an epoch is drawn plain or in one
    of those styles (uniformly; the styles are applied before the light affine jitter) and a second head learns
    which; an epoch then shows each image once per style class, and the metrics add ``styled`` (per style: digit
    and style accuracy on the real test split in that style).
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = DigitClassifier(config)
    train, test = (
        load_digits_split("train", model.config.image_size),
        load_digits_split("test", model.config.image_size),
    )
    styles = model.config.style_classes or (PLAIN,)
    # every style of every training image, precomputed: (styles, N, 1, H, W) prepared pixels
    variants = torch.stack(
        [
            model._prepare(train.tensors(channels=1) if style == PLAIN else train.styled(style).tensors(channels=1))
            for style in styles
        ]
    )
    repeats = len(styles)
    labels = torch.from_numpy(train.labels)
    steps_per_epoch = math.ceil(len(train) * repeats / batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=learning_rate, total_steps=epochs * steps_per_epoch
    )
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train) * repeats, generator=generator) % len(train)
        # (drawn only with styles, so the plain classifier's random stream, and its shipped weights, stay as they were)
        style_of = (
            torch.randint(0, repeats, (len(order),), generator=generator) if repeats > 1 else torch.zeros_like(order)
        )
        total_loss = 0.0
        for batch_indices, batch_styles in zip(order.split(batch_size), style_of.split(batch_size)):
            batch = random_affine(variants[batch_styles, batch_indices], generator)
            # A little pixel noise so that slightly noisy generated samples are judged like clean ones.
            batch = batch + 0.05 * torch.randn(batch.shape, generator=generator)
            if model.style_head is None:
                loss = F.cross_entropy(model(batch), labels[batch_indices], label_smoothing=0.05)
            else:
                digit_logits, style_logits = model.forward_both(batch)
                loss = F.cross_entropy(digit_logits, labels[batch_indices], label_smoothing=0.05)
                loss = loss + F.cross_entropy(style_logits, batch_styles, label_smoothing=0.05)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.item() * len(batch_indices)
        if log_every and ((epoch + 1) % log_every == 0 or epoch + 1 == epochs):
            print(
                f"epoch {epoch + 1}/{epochs}  loss {total_loss / len(order):.4f}  "
                f"test accuracy {model.accuracy(test):.4f}  {time.perf_counter() - start:.1f}s",
                flush=True,
            )
    model.eval()
    metrics = {"test_accuracy": model.accuracy(test), "train_seconds": round(time.perf_counter() - start, 1)}
    if model.style_head is not None:
        metrics["styled"] = styled_accuracies(model, test)
    return model, metrics


def save_digit_classifier(model: DigitClassifier, folder: str | Path, metrics: dict[str, float] | None = None) -> None:
    """Write ``model.safetensors`` and ``config.json`` (the shape, plus ``metrics`` as a record) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_NAME))
    record = asdict(model.config)
    record["stage_channels"] = list(model.config.stage_channels)
    record["style_names"] = list(model.config.style_names)
    if metrics:
        record["metrics"] = metrics
    (folder / CONFIG_NAME).write_text(json.dumps(record, indent=2) + "\n")


def load_digit_classifier(
    folder: str | Path = DEFAULT_CLASSIFIER_DIR, device: str | torch.device = "cpu"
) -> DigitClassifier:
    """Load the classifier saved in ``folder`` (default: the shipped one), in eval mode."""
    folder = Path(folder)
    if not (folder / WEIGHTS_NAME).is_file() or not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"no digit classifier in {folder} (expected {WEIGHTS_NAME} and {CONFIG_NAME}); train one with "
            f"`python benchmarks/digits/classifier.py --out {folder}`"
        )
    config = DigitClassifierConfig.from_dict(json.loads((folder / CONFIG_NAME).read_text()))
    model = DigitClassifier(config)
    model.load_state_dict(load_file(str(folder / WEIGHTS_NAME)))
    return model.to(device).eval()


def load_style_classifier(
    folder: str | Path = DEFAULT_STYLE_CLASSIFIER_DIR, device: str | torch.device = "cpu"
) -> DigitClassifier:
    """Load the style-aware classifier (a digit head and a style head; see the module docstring)."""
    model = load_digit_classifier(folder, device)
    if model.style_head is None:
        raise ValueError(
            f"the classifier in {folder} has no style head; train one with "
            f"`python benchmarks/digits/classifier.py --styles --out {folder}`"
        )
    return model


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the digits benchmark's classifier and save it.")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_CLASSIFIER_DIR, help="folder for model.safetensors + config.json"
    )
    parser.add_argument(
        "--styles",
        action="store_true",
        help="the style-aware classifier: every style as augmentation, and a style head",
    )
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = DigitClassifierConfig(style_names=tuple(STYLES)) if args.styles else None
    model, metrics = train_digit_classifier(config, epochs=args.epochs, seed=args.seed)
    save_digit_classifier(model, args.out, metrics)
    print(f"test accuracy {metrics['test_accuracy']:.4f} after {metrics['train_seconds']}s; saved to {args.out}")
    for style, values in metrics.get("styled", {}).items():
        print(
            f"  {style:9s} digit accuracy {values['digit_accuracy']:.3f}  style accuracy "
            f"{values['style_accuracy']:.3f}"
        )


if __name__ == "__main__":
    main()
