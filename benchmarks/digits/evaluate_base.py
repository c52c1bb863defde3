"""Does a digits pipeline draw what it is asked? Sample prompts naming each digit and let the classifier judge.

:func:`evaluate_prompt_following` takes a pipeline object (the shipped base, or a tuned copy of it) and returns
the share of samples the classifier places in the prompted class, per digit and overall. :func:`sample_digits`
and :func:`save_image_grid` are the pieces it uses, reusable for other reports.

Command line (the shipped base and the shipped classifier by default)::

    .venv/bin/python benchmarks/digits/evaluate_base.py --samples 50 --grid /tmp/base_grid.png
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.digits.classifier import DigitClassifier, load_digit_classifier  # noqa: E402
from benchmarks.digits.data import DEFAULT_CAPTION_TEMPLATE, DEFAULT_HELDOUT_DIGIT, caption_for, check_digit  # noqa: E402

DEFAULT_BASE_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "base_model"
DEFAULT_GUIDANCE_SCALE = 4.0
DEFAULT_INFERENCE_STEPS = 20


def load_base_pipeline(folder: str | Path = DEFAULT_BASE_MODEL_DIR, device: str | torch.device = "cpu"):
    """Load a digits pipeline folder (default: the shipped base) as a ``StableDiffusionPipeline``, offline."""
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{folder} is not a diffusers pipeline folder (no model_index.json); build the base with "
            f"`python benchmarks/digits/train_base.py --out {folder}`"
        )
    pipeline = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


@torch.no_grad()
def sample_digits(
    pipeline,
    digits: Sequence[int],
    samples_per_digit: int,
    template: str = DEFAULT_CAPTION_TEMPLATE,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    num_inference_steps: int = DEFAULT_INFERENCE_STEPS,
    seed: int = 0,
    batch_size: int = 64,
) -> dict[int, np.ndarray]:
    """Generate ``samples_per_digit`` images for the caption of each digit.

    Returns digit -> float array ``(samples_per_digit, H, W, 3)`` in [0, 1]. Sample ``i`` of every digit starts
    from the same initial noise (seeded by ``seed`` and ``i``), so rows of a grid are comparable and results are
    reproducible.
    """
    if samples_per_digit < 1:
        raise ValueError(f"samples_per_digit must be at least 1, got {samples_per_digit}")
    samples: dict[int, np.ndarray] = {}
    for digit in digits:
        prompt = caption_for(check_digit(digit), template)
        images = []
        for start in range(0, samples_per_digit, batch_size):
            count = min(batch_size, samples_per_digit - start)
            generators = [torch.Generator("cpu").manual_seed(seed * 100_003 + start + index) for index in range(count)]
            output = pipeline(
                prompt=[prompt] * count,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=generators,
                output_type="np",
            )
            images.append(output.images)
        samples[int(digit)] = np.concatenate(images)
    return samples


@dataclass
class PromptFollowingReport:
    """Classifier accuracy on samples prompted with each digit's caption."""

    per_digit: dict[int, float]
    overall: float
    samples_per_digit: int
    guidance_scale: float
    num_inference_steps: int
    seconds: float
    predictions: dict[int, list[int]] = field(default_factory=dict, repr=False)

    def table(self) -> str:
        """A small markdown table: one row per digit, then the overall accuracy."""
        lines = ["| digit | accuracy | most common wrong prediction |", "|---|---|---|"]
        for digit, accuracy in self.per_digit.items():
            wrong = [p for p in self.predictions.get(digit, []) if p != digit]
            common = max(set(wrong), key=wrong.count) if wrong else "-"
            lines.append(f"| {digit} | {accuracy:.3f} | {common} |")
        lines.append(f"| **all** | **{self.overall:.3f}** | |")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        record = asdict(self)
        record["per_digit"] = {str(k): v for k, v in self.per_digit.items()}
        record["predictions"] = {str(k): v for k, v in self.predictions.items()}
        return record


def evaluate_prompt_following(
    pipeline,
    classifier: DigitClassifier | None = None,
    digits: Sequence[int] | None = None,
    heldout_digit: int | None = DEFAULT_HELDOUT_DIGIT,
    samples_per_digit: int = 50,
    template: str = DEFAULT_CAPTION_TEMPLATE,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    num_inference_steps: int = DEFAULT_INFERENCE_STEPS,
    seed: int = 0,
    samples: dict[int, np.ndarray] | None = None,
) -> PromptFollowingReport:
    """Sample each digit's caption and report the share the classifier recognises as that digit.

    Args:
        pipeline: a ``StableDiffusionPipeline`` (the base or a tuned one).
        classifier: the judge; default the shipped classifier.
        digits: digits to prompt; default every digit except ``heldout_digit`` (the seen digits).
        samples: already generated samples (digit -> images), to judge without sampling again.
    """
    classifier = classifier or load_digit_classifier()
    if digits is None:
        digits = [d for d in range(10) if heldout_digit is None or d != check_digit(heldout_digit)]
    start = time.perf_counter()
    if samples is None:
        samples = sample_digits(
            pipeline, digits, samples_per_digit, template, guidance_scale, num_inference_steps, seed
        )
    per_digit: dict[int, float] = {}
    predictions: dict[int, list[int]] = {}
    for digit in digits:
        predicted = classifier.predict(samples[digit]).tolist()
        predictions[digit] = predicted
        per_digit[digit] = float(np.mean([p == digit for p in predicted]))
    overall = float(np.mean([p == d for d in digits for p in predictions[d]]))
    return PromptFollowingReport(
        per_digit=per_digit,
        overall=overall,
        samples_per_digit=len(predictions[digits[0]]),
        guidance_scale=guidance_scale,
        num_inference_steps=num_inference_steps,
        seconds=round(time.perf_counter() - start, 1),
        predictions=predictions,
    )


def save_image_grid(
    rows: Sequence[np.ndarray],
    path: str | Path,
    row_labels: Sequence[str] | None = None,
    zoom: int = 3,
    mode: str = "RGB",
) -> Path:
    """Write rows of images (each ``(N, H, W[, C])`` in [0, 1]) as one PNG, enlarged ``zoom`` times, labelled.

    ``mode="L"`` saves grayscale (a third of the size, for the digits' grayscale samples). Returns the path written.
    """
    if not rows:
        raise ValueError("save_image_grid needs at least one row of images")
    gap = 2
    height, width = rows[0].shape[1:3]
    columns = max(len(row) for row in rows)
    label_width = 0 if row_labels is None else 40
    canvas = Image.new(
        "RGB", (label_width + columns * (width * zoom + gap), len(rows) * (height * zoom + gap)), (60, 60, 60)
    )
    draw = ImageDraw.Draw(canvas)
    for row_index, row in enumerate(rows):
        top = row_index * (height * zoom + gap)
        if row_labels is not None:
            draw.text((4, top + height * zoom // 2 - 6), str(row_labels[row_index]), fill=(255, 255, 255))
        for column_index, image in enumerate(row):
            pixels = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
            if pixels.ndim == 2:
                pixels = np.repeat(pixels[..., None], 3, axis=-1)
            tile = Image.fromarray(np.round(pixels * 255).astype(np.uint8)).resize(
                (width * zoom, height * zoom), Image.NEAREST
            )
            canvas.paste(tile, (label_width + column_index * (width * zoom + gap), top))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.convert(mode).save(path, optimize=True)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Classifier accuracy of a digits pipeline's samples, per digit.")
    parser.add_argument("--model", type=Path, default=DEFAULT_BASE_MODEL_DIR, help="diffusers pipeline folder")
    parser.add_argument("--heldout", type=int, default=DEFAULT_HELDOUT_DIGIT, help="digit left out of the judged set")
    parser.add_argument("--samples", type=int, default=50, help="samples per digit")
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE_SCALE)
    parser.add_argument("--steps", type=int, default=DEFAULT_INFERENCE_STEPS)
    parser.add_argument("--template", default=DEFAULT_CAPTION_TEMPLATE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", type=Path, default=None, help="also write a grid PNG (rows = digits 0-9)")
    parser.add_argument("--json", type=Path, default=None, help="also write the report as JSON")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    pipeline = load_base_pipeline(args.model)
    report = evaluate_prompt_following(
        pipeline,
        heldout_digit=args.heldout,
        samples_per_digit=args.samples,
        template=args.template,
        guidance_scale=args.guidance,
        num_inference_steps=args.steps,
        seed=args.seed,
    )
    print(report.table())
    print(
        f"seen-digit accuracy {report.overall:.3f} ({report.samples_per_digit} samples per digit, {report.seconds}s)"
    )
    if args.json:
        args.json.write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    if args.grid:
        grid_samples = sample_digits(pipeline, range(10), 8, args.template, args.guidance, args.steps, args.seed)
        path = save_image_grid([grid_samples[d] for d in range(10)], args.grid, [str(d) for d in range(10)])
        print(f"grid written to {path}")


if __name__ == "__main__":
    main()
