"""Flags diffusers' training scripts have and users rely on: the optimizer (AdamW or Prodigy, with the names and
defaults of diffusers' ``train_dreambooth_lora_sdxl.py``), image interpolation, data repeats, ``--local_rank``,
and the Hub upload (``--push_to_hub``, ``--hub_model_id``, ``--hub_token``).

Optional packages (prodigyopt, bitsandbytes, huggingface_hub's upload) are imported only when their flag is used.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import logging
import os
from typing import Any

import torch
from PIL import Image

from .errors import TrainingError

logger = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "prodigy")
#: Flags never written to args.json, trackers or the model card.
SECRET_FLAGS = frozenset({"hub_token"})
#: ``--image_interpolation_mode`` (torchvision's InterpolationMode names, as in diffusers) -> PIL's resampling.
INTERPOLATION_MODES: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "nearest_exact": Image.Resampling.NEAREST,  # PIL's nearest is torchvision's "exact" one
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}


def _bool(text: str) -> bool:
    """argparse's ``type=bool`` takes "False" as True; this reads what the user means."""
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_user_flags(parser: argparse.ArgumentParser) -> None:
    """Add the flags of this module to a training script's parser (after :func:`build_parser`'s own)."""
    opt = parser.add_argument_group("optimizer (diffusers' names; --adam_* apply to AdamW and Prodigy)")
    opt.add_argument(
        "--optimizer",
        type=str.lower,
        default="adamw",
        choices=OPTIMIZERS,
        help="adamw (torch, or bitsandbytes' 8-bit with --use_8bit_adam) or prodigy (pip install prodigyopt; use "
        "--learning_rate 1.0).",
    )
    opt.add_argument("--prodigy_beta3", type=float, default=None, help="Prodigy's beta3 (default: sqrt(beta2)).")
    opt.add_argument(
        "--prodigy_decouple", type=_bool, default=True, help="Prodigy: AdamW-style decoupled weight decay."
    )
    opt.add_argument(
        "--prodigy_use_bias_correction", type=_bool, default=True, help="Prodigy: Adam's bias correction."
    )
    opt.add_argument(
        "--prodigy_safeguard_warmup",
        type=_bool,
        default=True,
        help="Prodigy: drop the learning rate from the denominator of D's estimate during warmup.",
    )

    data = parser.add_argument_group("data (more)")
    data.add_argument(
        "--image_interpolation_mode",
        type=str.lower,
        default="bilinear",
        choices=list(INTERPOLATION_MODES),
        help="Resampling when images are resized (diffusers' default is lanczos; this project's is bilinear).",
    )
    data.add_argument("--repeats", type=int, default=1, help="How many times each training image is seen per epoch.")

    dist = parser.add_argument_group("distributed")
    dist.add_argument(
        "--local_rank",
        type=int,
        default=-1,
        help="Set by torch.distributed launchers; LOCAL_RANK from the environment wins (accelerate sets it).",
    )

    hub = parser.add_argument_group("Hugging Face Hub")
    hub.add_argument(
        "--push_to_hub", action="store_true", help="Upload output_dir (tuner, model card, images) at the end."
    )
    hub.add_argument(
        "--hub_model_id",
        type=str,
        default=None,
        help="The repo to upload to (default: the output_dir's name under your user).",
    )
    hub.add_argument("--hub_token", type=str, default=None, help="Hub token (default: the one `hf auth login` saved).")
    hub.add_argument(
        "--push_checkpoints_to_hub",
        action="store_true",
        help="With --push_to_hub: also upload output_dir at every checkpoint (the run continues if one fails).",
    )
    hub.add_argument("--hub_private", action="store_true", help="Create the Hub repo private.")
    hub.add_argument(
        "--export_lora",
        type=str,
        default=None,
        choices=["diffusers", "kohya"],
        help="Also write the trained tuner as a LoRA file (res_lora, glora, surm_* only): lora_<format>.safetensors.",
    )
    hub.add_argument(
        "--export_lora_rank", type=int, default=None, help="Truncate the exported LoRA to this rank (default: exact)."
    )


def check_user_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Checks of these flags (``parser.error`` with what to do); also applies ``LOCAL_RANK`` as diffusers does."""
    env_local_rank = int(os.environ.get("LOCAL_RANK", -1))
    if env_local_rank != -1 and env_local_rank != args.local_rank:
        args.local_rank = env_local_rank
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.optimizer == "prodigy" and args.use_8bit_adam:
        parser.error("--use_8bit_adam is for --optimizer adamw; Prodigy has no 8-bit variant: drop one of them")
    if args.prodigy_beta3 is not None and not 0.0 <= args.prodigy_beta3 < 1.0:
        parser.error(f"--prodigy_beta3 must be in [0, 1), got {args.prodigy_beta3}")
    if args.export_lora_rank is not None and (args.export_lora is None or args.export_lora_rank < 1):
        parser.error("--export_lora_rank is a positive rank for --export_lora; add --export_lora diffusers (or kohya)")
    if args.push_checkpoints_to_hub and not args.push_to_hub:
        parser.error("--push_checkpoints_to_hub uploads with --push_to_hub; add --push_to_hub")
    if args.hub_token is not None and "wandb" in args.report_to:
        parser.error(
            "--hub_token with --report_to wandb would expose the token in the run's logged config (as diffusers "
            "refuses too); log in with `hf auth login` and drop --hub_token"
        )


def check_optimizer_package(args: argparse.Namespace) -> None:
    """Before any model loads: the optimizer's package is installed."""
    if args.optimizer == "prodigy" and importlib.util.find_spec("prodigyopt") is None:
        raise TrainingError("--optimizer prodigy needs prodigyopt: pip install prodigyopt (or use --optimizer adamw)")


def make_optimizer(
    args: argparse.Namespace, parameters: list[torch.nn.Parameter], learning_rate: float
) -> torch.optim.Optimizer:
    """AdamW (torch or bitsandbytes 8-bit) or Prodigy over ``parameters``, with diffusers' flag meanings."""
    if getattr(args, "optimizer", "adamw") == "prodigy":
        from prodigyopt import Prodigy

        if learning_rate <= 0.1:
            logger.warning(
                "--learning_rate %g is low for Prodigy, which estimates the step size itself; 1.0 is the usual value",
                learning_rate,
            )
        with contextlib.redirect_stdout(io.StringIO()) as printed:  # Prodigy print()s its settings
            optimizer = Prodigy(
                parameters,
                lr=learning_rate,
                betas=(args.adam_beta1, args.adam_beta2),
                beta3=args.prodigy_beta3,
                weight_decay=args.adam_weight_decay,
                eps=args.adam_epsilon,
                decouple=args.prodigy_decouple,
                use_bias_correction=args.prodigy_use_bias_correction,
                safeguard_warmup=args.prodigy_safeguard_warmup,
            )
        if printed.getvalue().strip():
            logger.debug("prodigyopt: %s", printed.getvalue().strip())
        return optimizer
    if args.use_8bit_adam:
        import bitsandbytes as bnb  # only here: importing it prints kernel messages on machines without its GPU build

        optimizer_class: Any = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(
        parameters,
        lr=learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )


__all__ = [
    "INTERPOLATION_MODES",
    "OPTIMIZERS",
    "SECRET_FLAGS",
    "add_user_flags",
    "check_optimizer_package",
    "check_user_flags",
    "make_optimizer",
]
