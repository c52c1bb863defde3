"""``resattn-eval`` / ``python -m resattn_diffusion.evaluation``: generate, measure, report.

Subcommands:

* ``generate`` -- a pipeline (+ ``--tuner PATH --tuner-scale S``), prompts and seeds -> a folder of PNGs and
  ``manifest.jsonl`` (resumable).
* ``metrics`` -- folders of generated images -> FID, KID, CLIP score, CLIP-T, CLIP-I, DINO as JSON and a
  markdown table (printed and written).
* ``stats`` -- a reference folder -> an ``.npz`` of features and statistics to pass as ``--reference`` later.
* ``all`` -- ``generate`` then ``metrics`` on the new folder.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..integration.api import ResTunerError
from ..integration.io import ResTunerFileError
from ..quiet import quiet_libraries
from ..tuners.base import ConfigError
from .errors import EvaluationError, EvaluationWarning, check_output_file
from .features import ImageEncoder
from .generate import check_generation_settings, check_seed_count, check_seeds, generate_images, load_pipeline
from .images import MANIFEST_NAME
from .inception import FID_WEIGHTS_NAME, RESIZE_MODES
from .metrics import DEFAULT_CLIP_MODEL, DEFAULT_DINO_MODEL, METRICS, Evaluator, save_reference_statistics
from .report import write_reports


def parse_seeds(tokens: Sequence[str]) -> list[int]:
    """``["0-3", "7", "9,11"]`` -> ``[0, 1, 2, 3, 7, 9, 11]`` (ranges are inclusive)."""
    seeds: list[int] = []
    for token in tokens:
        for part in str(token).split(","):
            part = part.strip()
            if not part:
                continue
            try:
                low, high = (int(x) for x in part.split("-", 1)) if "-" in part else (int(part),) * 2
                if high < low:
                    raise ValueError
            except ValueError:
                raise EvaluationError(
                    f"--seeds: cannot read {part!r}; use ints and inclusive ranges like 0-99."
                ) from None
            check_seed_count(len(seeds) + high - low + 1, "--seeds")  # before the range is listed
            seeds.extend(range(low, high + 1))
    return seeds


def load_feature_extractor(spec: str, device: str) -> ImageEncoder:
    """``module.path:factory`` or ``path/to/file.py:factory``; the factory (called without arguments) returns an
    :class:`ImageEncoder`, an ``nn.Module`` (RGB in [0, 1]), or ``(nn.Module, preprocess)``."""
    module_name, sep, attribute = spec.rpartition(":")
    if not sep or not module_name or not attribute:
        raise EvaluationError(
            f"--feature-extractor must look like 'package.module:factory' or 'file.py:factory', got {spec!r}."
        )
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise EvaluationError(f"--feature-extractor: file {module_name!r} does not exist.")
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
        factory = getattr(module, attribute)
    except (ImportError, AttributeError) as err:
        raise EvaluationError(f"--feature-extractor: cannot import {spec!r}: {err}") from err
    made = factory()
    if isinstance(made, ImageEncoder):
        return made
    if isinstance(made, nn.Module):
        return ImageEncoder(made, name=f"custom:{spec}", device=device)
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], nn.Module) and callable(made[1]):
        return ImageEncoder(made[0], preprocess=made[1], name=f"custom:{spec}", device=device)
    raise EvaluationError(
        f"--feature-extractor {spec!r} returned {type(made).__name__}; return an ImageEncoder, an nn.Module or "
        "(nn.Module, preprocess)."
    )


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------


def _add_generate_arguments(parser: argparse.ArgumentParser, batch_flag: str) -> None:
    group = parser.add_argument_group("generation")
    group.add_argument(
        "--pipeline",
        required=True,
        metavar="FOLDER_OR_ID",
        help="diffusers pipeline folder (model_index.json) or hub id",
    )
    group.add_argument("--sdxl", action="store_true", help="load as StableDiffusionXLPipeline (default: auto-detect)")
    group.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        default=None,
        help="pipeline dtype (default: float16 on CUDA, float32 on CPU)",
    )
    group.add_argument(
        "--keep-safety-checker",
        action="store_true",
        help="keep an SD safety checker (default: dropped, its black images would enter the metrics)",
    )
    source = group.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompts", dest="prompt_file", metavar="FILE", help="text file, one prompt per line")
    source.add_argument("--prompt", dest="prompt_list", metavar="TEXT", action="append", help="a prompt (repeatable)")
    group.add_argument(
        "--seeds",
        nargs="+",
        default=None,
        metavar="SEEDS",
        help="seeds per prompt: ints and inclusive ranges, e.g. 0-9 (default 0)",
    )
    group.add_argument("--num-seeds", type=int, default=None, metavar="N", help="use seeds 0 .. N-1")
    group.add_argument("--steps", type=int, default=30, help="inference steps (default 30)")
    group.add_argument(
        "--guidance",
        type=float,
        default=7.5,
        help="classifier-free guidance scale (default 7.5); for Flux the distilled guidance value "
        "(3.5 for FLUX.1-dev)",
    )
    group.add_argument("--negative-prompt", default=None)
    group.add_argument("--height", type=int, default=None)
    group.add_argument("--width", type=int, default=None)
    group.add_argument(
        "--tuner",
        default=None,
        metavar="PATH",
        help="a trained tuner file (.safetensors) or its folder (on the UNet, or the SD3 / Flux transformer)",
    )
    group.add_argument("--tuner-scale", type=float, default=1.0, metavar="S", help="the tuner's scale s (default 1.0)")
    group.add_argument("--adapter-name", default=None, help="name to load the tuner under")
    group.add_argument("--out", required=True, metavar="FOLDER", help="output image folder (resumable)")
    group.add_argument(
        batch_flag,
        dest="generate_batch_size",
        type=int,
        default=4,
        metavar="N",
        help="images per pipeline call (default 4)",
    )


def _add_metric_arguments(parser: argparse.ArgumentParser, batch_flag: str, with_generated: bool) -> None:
    group = parser.add_argument_group("metrics")
    if with_generated:
        group.add_argument(
            "--generated",
            nargs="+",
            required=True,
            metavar="FOLDER",
            help="folder(s) of generated images, one row each",
        )
        group.add_argument(
            "--prompts",
            dest="metric_prompts",
            default=None,
            metavar="FILE",
            help="prompts for CLIP score/CLIP-T: a file, one per image in file-name order "
            "(default: each folder's manifest.jsonl)",
        )
    group.add_argument(
        "--metrics",
        nargs="+",
        choices=METRICS,
        default=None,
        metavar="METRIC",
        help=f"any of {', '.join(METRICS)} (default: what the inputs allow: fid kid with --reference, "
        "clip_score clip_t with prompts, clip_i dino with --subject)",
    )
    group.add_argument(
        "--reference",
        default=None,
        metavar="FOLDER_OR_NPZ",
        help="real images for FID/KID: a folder or an .npz from 'stats'",
    )
    group.add_argument("--subject", default=None, metavar="FOLDER", help="the subject's real images for CLIP-I/DINO")
    group.add_argument(
        "--inception-weights", default=None, metavar="PATH", help=f"local FID Inception weights ({FID_WEIGHTS_NAME})"
    )
    group.add_argument(
        "--inception-resize",
        choices=RESIZE_MODES,
        default="pytorch-fid",
        help="FID input resize: pytorch-fid (default) or tf1 (TTUR / torch-fidelity)",
    )
    group.add_argument("--inception-backend", choices=("builtin", "torch-fidelity"), default="builtin")
    group.add_argument(
        "--feature-extractor",
        default=None,
        metavar="MODULE:FACTORY",
        help="replace Inception for FID/KID: 'module:factory' or 'file.py:factory'",
    )
    group.add_argument(
        "--clip-model",
        default=DEFAULT_CLIP_MODEL,
        metavar="ID_OR_FOLDER",
        help=f"CLIP hub id or local folder (default {DEFAULT_CLIP_MODEL})",
    )
    group.add_argument(
        "--dino-model",
        default=DEFAULT_DINO_MODEL,
        metavar="ID_OR_FOLDER",
        help=f"DINO hub id or local folder (default {DEFAULT_DINO_MODEL})",
    )
    group.add_argument("--kid-subsets", type=int, default=100, metavar="N", help="KID random subsets (default 100)")
    group.add_argument("--kid-subset-size", type=int, default=1000, metavar="N", help="KID subset size (default 1000)")
    group.add_argument(
        batch_flag,
        dest="metrics_batch_size",
        type=int,
        default=32,
        metavar="N",
        help="images per feature batch (default 32)",
    )
    group.add_argument(
        "--json",
        dest="json_path",
        default=None,
        metavar="PATH",
        help="JSON report (default: <generated>/metrics.json, ./metrics.json for several folders)",
    )
    group.add_argument(
        "--markdown",
        dest="markdown_path",
        default=None,
        metavar="PATH",
        help="markdown table (default: <generated>/metrics.md, ./metrics.md for several folders)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resattn-eval",
        description="Generate images with a tuner and measure FID, KID, CLIP score, CLIP-T, CLIP-I and DINO.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="generate a folder of images + manifest.jsonl")
    _add_generate_arguments(generate, "--batch-size")

    metrics = commands.add_parser("metrics", help="metrics over folders of images -> JSON + markdown table")
    _add_metric_arguments(metrics, "--batch-size", with_generated=True)

    stats = commands.add_parser("stats", help="save reference features/statistics (.npz) for --reference")
    stats.add_argument("--images", required=True, metavar="FOLDER", help="folder of reference images")
    stats.add_argument("--out", required=True, metavar="PATH", help="output .npz")
    stats.add_argument(
        "--inception-weights", default=None, metavar="PATH", help=f"local FID Inception weights ({FID_WEIGHTS_NAME})"
    )
    stats.add_argument("--inception-resize", choices=RESIZE_MODES, default="pytorch-fid")
    stats.add_argument(
        "--feature-extractor",
        default=None,
        metavar="MODULE:FACTORY",
        help="'module:factory' or 'file.py:factory' instead of Inception",
    )
    stats.add_argument("--no-features", action="store_true", help="save mu/sigma only (no KID against this file)")
    stats.add_argument("--batch-size", dest="metrics_batch_size", type=int, default=32, metavar="N")

    everything = commands.add_parser("all", help="generate, then compute metrics on the generated folder")
    _add_generate_arguments(everything, "--batch-size")
    _add_metric_arguments(everything, "--eval-batch-size", with_generated=False)

    for command in (generate, metrics, stats, everything):
        command.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
        command.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


# ----------------------------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------------------------


def _seeds(args: argparse.Namespace) -> list[int]:
    if args.seeds is not None and args.num_seeds is not None:
        raise EvaluationError("give --seeds or --num-seeds, not both.")
    if args.num_seeds is not None:
        if args.num_seeds < 1:
            raise EvaluationError(f"--num-seeds must be >= 1, got {args.num_seeds}.")
        check_seed_count(args.num_seeds, "--num-seeds")
        return list(range(args.num_seeds))
    return check_seeds(parse_seeds(args.seeds)) if args.seeds is not None else [0]


def _check_generate_args(args: argparse.Namespace) -> list[int]:
    """The seeds, and every generation setting that can be checked without the pipeline: before it (and, for
    ``all``, the metric models) loads, not after."""
    seeds = _seeds(args)
    check_generation_settings(
        args.steps,
        args.guidance,
        args.generate_batch_size,
        args.tuner_scale if args.tuner is not None else None,
        args.height,
        args.width,
        args.tuner,
    )
    return seeds


def _run_generate(args: argparse.Namespace, device: str) -> None:
    seeds = _check_generate_args(args)
    pipeline = load_pipeline(
        args.pipeline, sdxl=args.sdxl, device=device, dtype=args.dtype, keep_safety_checker=args.keep_safety_checker
    )
    result = generate_images(
        pipeline,
        args.prompt_file if args.prompt_file is not None else args.prompt_list,
        args.out,
        seeds=seeds,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        tuner_path=args.tuner,
        tuner_scale=args.tuner_scale,
        batch_size=args.generate_batch_size,
        negative_prompt=args.negative_prompt,
        height=args.height,
        width=args.width,
        adapter_name=args.adapter_name,
        progress=not args.no_progress,
    )
    print(
        f"{result.out_dir}: {result.num_generated} images generated, {result.num_reused} kept "
        f"({len(result.records)} requested; see {MANIFEST_NAME})."
    )


def _reference_has_features(reference: str) -> bool:
    path = Path(reference)
    if not path.is_file():
        return True
    try:
        with np.load(path, allow_pickle=False) as data:
            return "features" in data.files
    except Exception:  # unreadable: let the Evaluator report it
        return True


def _chosen_metrics(args: argparse.Namespace, generated: Sequence[str]) -> list[str]:
    if args.metrics:
        return list(args.metrics)
    chosen = []
    if args.reference is not None:
        chosen.append("fid")
        if _reference_has_features(args.reference):
            chosen.append("kid")
    has_prompts = getattr(args, "metric_prompts", None) is not None or all(
        (Path(folder) / MANIFEST_NAME).is_file() for folder in generated
    )
    if has_prompts:
        chosen += ["clip_score", "clip_t"]
    if args.subject is not None:
        chosen += ["clip_i", "dino"]
    if not chosen:
        raise EvaluationError(
            "nothing to measure: pass --reference (FID, KID), prompts or a manifest (CLIP score, CLIP-T), --subject "
            "(CLIP-I, DINO), or choose --metrics."
        )
    return chosen


def _build_evaluator(args: argparse.Namespace, metrics: list[str], device: str) -> Evaluator:
    feature_extractor = load_feature_extractor(args.feature_extractor, device) if args.feature_extractor else None
    return Evaluator(
        metrics,
        reference=args.reference,
        subject=args.subject,
        inception_weights=args.inception_weights,
        inception_resize=args.inception_resize,
        inception_backend=args.inception_backend,
        feature_extractor=feature_extractor,
        clip_model=args.clip_model,
        dino_model=args.dino_model,
        batch_size=args.metrics_batch_size,
        device=device,
        kid_subsets=args.kid_subsets,
        kid_subset_size=args.kid_subset_size,
        progress=not args.no_progress,
    )


def _run_metrics(args: argparse.Namespace, evaluator: Evaluator, generated: Sequence[str], prompts) -> None:
    default_folder = Path(generated[0]) if len(generated) == 1 else Path(".")
    json_path = Path(args.json_path) if args.json_path else default_folder / "metrics.json"
    markdown_path = Path(args.markdown_path) if args.markdown_path else default_folder / "metrics.md"
    for path, flag in ((json_path, "--json"), (markdown_path, "--markdown")):
        check_output_file(path, flag)  # before the metrics are computed, not after
    with warnings.catch_warnings():
        # The notes are printed below the table instead, once per folder.
        warnings.simplefilter("ignore", EvaluationWarning)
        reports = [evaluator.evaluate(folder, prompts) for folder in generated]
    table = write_reports(reports, json_path, markdown_path)
    print(table, end="")
    for report in reports:
        for note in report["notes"]:
            print(f"note ({report['generated']}): {note}", file=sys.stderr)
    print(f"\nJSON: {json_path}\nmarkdown: {markdown_path}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 for input errors, which are printed)."""
    args = build_parser().parse_args(argv)
    quiet_libraries(None)  # library chatter off the console; the tables and our notes stay
    device = args.device or _default_device()
    try:
        if args.command == "generate":
            _run_generate(args, device)
        elif args.command == "stats":
            encoder = load_feature_extractor(args.feature_extractor, device) if args.feature_extractor else None
            if encoder is None:
                from .features import InceptionEncoder

                encoder = InceptionEncoder(args.inception_weights, resize=args.inception_resize, device=device)
            path = save_reference_statistics(
                args.images,
                args.out,
                encoder=encoder,
                keep_features=not args.no_features,
                batch_size=args.metrics_batch_size,
                device=device,
                progress=not args.no_progress,
            )
            print(f"reference statistics ({encoder.name}) written to {path}")
        elif args.command == "metrics":
            evaluator = _build_evaluator(args, _chosen_metrics(args, args.generated), device)
            _run_metrics(args, evaluator, args.generated, args.metric_prompts)
        else:  # all: load the metric models first, so a missing weight fails before the long generation
            _check_generate_args(args)
            metrics = args.metrics or _chosen_metrics_for_all(args)
            evaluator = _build_evaluator(args, metrics, device)
            _run_generate(args, device)
            _run_metrics(args, evaluator, [args.out], None)
    except (EvaluationError, ResTunerError, ResTunerFileError, ConfigError) as err:
        print(f"resattn-eval {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


def _chosen_metrics_for_all(args: argparse.Namespace) -> list[str]:
    # The folder gets a manifest, so prompt-based metrics are always possible.
    chosen = ["clip_score", "clip_t"]
    if args.reference is not None:
        chosen = ["fid"] + (["kid"] if _reference_has_features(args.reference) else []) + chosen
    if args.subject is not None:
        chosen += ["clip_i", "dino"]
    return chosen


if __name__ == "__main__":
    sys.exit(main())
