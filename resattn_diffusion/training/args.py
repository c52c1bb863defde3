"""The command line of ``train_dreambooth.py`` and ``train_text2img.py``: one argparse builder for both.

Flags carry the names and meanings of diffusers' ``train_dreambooth_lora.py`` / ``train_text_to_image_lora.py``
(and their SDXL variants) wherever the meaning is the same, so habits carry over. What is new is the tuner:

* ``--tuner NAME`` picks any registered tuner (``resattn_diffusion.tuner_names()``);
* ``--targets``, ``--blocks``, ``--projections``, ``--placement``, ``--tuner_scale`` say where it sits;
* ``--rank`` / ``--heads`` are shortcuts for the common hyperparameters, and ``--tuner_arg key=value`` sets any
  hyperparameter of any tuner, so a newly registered tuner needs no change here;
* ``--tuner_config file.json`` loads a saved :class:`~resattn_diffusion.ResTunerConfig`; flags given beside it
  override its fields.

Only flags given explicitly reach the tuner config (their defaults are ``None``); everything else keeps the
defaults of :class:`~resattn_diffusion.ResTunerConfig` and of the tuner's own hyperparameters.
"""

from __future__ import annotations

import argparse
import json
import math
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers.optimization import SchedulerType

from ..checks import MAX_NUMPY_SEED
from ..config import PLACEMENTS, ResTunerConfig
from ..integration.api import ResTunerError
from ..registry import get_tuner_spec, known_projections, known_targets, tuner_names
from ..tuners.base import ConfigError
from .user_flags import SECRET_FLAGS, add_user_flags, check_user_flags

Task = Literal["dreambooth", "text2img"]
TASKS: tuple[str, ...] = ("dreambooth", "text2img")

#: Defaults that differ between the two scripts (diffusers' values for the same flags).
_TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "dreambooth": {
        "output_dir": "res-tuner-dreambooth",
        "train_batch_size": 4,
        "num_train_epochs": 1,
        "learning_rate": 5e-4,
        "validation_epochs": 50,
    },
    "text2img": {
        "output_dir": "res-tuner-text2img",
        "train_batch_size": 16,
        "num_train_epochs": 100,
        "learning_rate": 1e-4,
        "validation_epochs": 1,
    },
}
_DESCRIPTIONS = {
    "dreambooth": "Train a res tuner on a subject with DreamBooth (optionally with prior preservation).",
    "text2img": "Train a res tuner on captioned images (a style, a domain) for text-to-image generation.",
}


def build_parser(task: Task) -> argparse.ArgumentParser:
    """The argument parser of one training script (``task`` is ``"dreambooth"`` or ``"text2img"``)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    defaults = _TASK_DEFAULTS[task]
    parser = argparse.ArgumentParser(
        description=_DESCRIPTIONS[task],
        epilog=f"Registered tuners: {', '.join(tuner_names())}. Multi-GPU / multi-node: run with `accelerate launch`.",
    )

    model = parser.add_argument_group("base model")
    model.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        required=True,
        help="A diffusers model folder (or hub id) of SD 1.x / 2.x or SDXL; SDXL is detected from the folder.",
    )
    model.add_argument(
        "--pretrained_vae_model_name_or_path",
        type=str,
        default=None,
        help="Another VAE to use, e.g. an fp16-safe SDXL VAE (default: the model's own).",
    )
    model.add_argument("--revision", type=str, default=None, help="Revision of the pretrained model on the hub.")
    model.add_argument("--variant", type=str, default=None, help="Variant of the model files, e.g. 'fp16'.")
    model.add_argument("--cache_dir", type=str, default=None, help="Where downloaded models and datasets are stored.")

    tuner = parser.add_argument_group("tuner (defaults: those of ResTunerConfig and of the tuner itself)")
    tuner.add_argument(
        "--tuner", type=str, default=None, help=f"Tuner name (default res_attn): {', '.join(tuner_names())}."
    )
    tuner.add_argument(
        "--rank", type=int, default=None, help="The tuner's 'rank' hyperparameter (only for tuners that have one)."
    )
    tuner.add_argument(
        "--heads", type=int, default=None, help="The tuner's 'heads' hyperparameter (only for tuners that have one)."
    )
    tuner.add_argument(
        "--tuner_arg",
        type=str,
        nargs="+",
        action="extend",
        default=None,
        metavar="KEY=VALUE",
        help="Any hyperparameter of the tuner, e.g. --tuner_arg activation=relu prefix_length=16 (repeatable).",
    )
    tuner.add_argument(
        "--targets",
        type=str,
        nargs="+",
        default=None,
        choices=known_targets(),
        help="Operations that get a branch (default: the model's: attn1 attn2 on a UNet, attn (and attn2) on "
        "SD3 / Flux).",
    )
    tuner.add_argument(
        "--blocks",
        type=str,
        nargs="+",
        default=None,
        help="Glob patterns of transformer blocks, e.g. 'up_blocks.*' mid_block (default: every block).",
    )
    tuner.add_argument(
        "--projections",
        type=str,
        nargs="+",
        default=None,
        choices=known_projections(),
        help="Linear tuners: projections that get a branch (default: all the model has).",
    )
    tuner.add_argument(
        "--placement",
        type=str,
        default=None,
        choices=PLACEMENTS,
        help="parallel (Res-Tuning) or sequential (U-Tuning); default parallel.",
    )
    tuner.add_argument("--tuner_scale", type=float, default=None, help="The branch scale s (default 1.0).")
    tuner.add_argument(
        "--tuner_config",
        type=str,
        default=None,
        help="A tuner config JSON (ResTunerConfig.save); flags above override it.",
    )

    data = parser.add_argument_group("data")
    if task == "dreambooth":
        data.add_argument(
            "--instance_data_dir", type=str, required=True, help="Folder with the images of the subject."
        )
        data.add_argument(
            "--instance_prompt",
            type=str,
            required=True,
            help="Prompt with the subject's identifier, e.g. 'a photo of sks dog'.",
        )
        data.add_argument(
            "--class_data_dir", type=str, default=None, help="Folder of class images (missing ones are generated)."
        )
        data.add_argument("--class_prompt", type=str, default=None, help="Prompt of the class, e.g. 'a photo of dog'.")
        data.add_argument(
            "--with_prior_preservation", action="store_true", help="Add the prior-preservation loss on class images."
        )
        data.add_argument(
            "--prior_loss_weight", type=float, default=1.0, help="Weight of the prior-preservation loss."
        )
        data.add_argument(
            "--num_class_images",
            type=int,
            default=100,
            help="Class images wanted; missing ones are generated by the base model.",
        )
        data.add_argument(
            "--sample_batch_size", type=int, default=4, help="Batch size (per device) when generating class images."
        )
        data.add_argument(
            "--prior_generation_precision",
            type=str,
            default=None,
            choices=["no", "fp32", "fp16", "bf16"],
            help="Precision of class image generation (default fp16 on a GPU, fp32 otherwise).",
        )
    else:
        data.add_argument(
            "--dataset_name",
            type=str,
            default=None,
            help="A `datasets` name or a local dataset path (load_dataset / save_to_disk folder).",
        )
        data.add_argument(
            "--dataset_config_name", type=str, default=None, help="The dataset's config, if it has several."
        )
        data.add_argument(
            "--train_data_dir",
            type=str,
            default=None,
            help="Folder of images with a metadata.jsonl (file_name + caption column) or same-named .txt captions.",
        )
        data.add_argument("--image_column", type=str, default="image", help="Image column of --dataset_name.")
        data.add_argument(
            "--caption_column", type=str, default="text", help="Caption column (a caption or a list of captions)."
        )
        data.add_argument(
            "--caption_dropout",
            type=float,
            default=0.0,
            help="Probability of training on the empty caption (for classifier-free guidance).",
        )
        data.add_argument(
            "--max_train_samples", type=int, default=None, help="Use only this many (randomly chosen) examples."
        )
    data.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="Training resolution; images are resized (shorter side) and cropped to it "
        "(default: the model's native size).",
    )
    data.add_argument("--center_crop", action="store_true", help="Center crop (default: random crop).")
    data.add_argument("--random_flip", action="store_true", help="Randomly flip images horizontally.")
    data.add_argument(
        "--dataloader_num_workers", type=int, default=0, help="Data loading subprocesses (0: in the main process)."
    )

    train = parser.add_argument_group("training")
    train.add_argument(
        "--output_dir",
        type=str,
        default=defaults["output_dir"],
        help="Where the tuner, checkpoints, logs and validation images go.",
    )
    train.add_argument(
        "--overwrite_output", action="store_true", help="Replace a tuner already saved in --output_dir."
    )
    train.add_argument(
        "--seed",
        type=int,
        default=None,
        help="Seed of the whole run (data order, noise, tuner init); chosen and recorded if not given.",
    )
    train.add_argument(
        "--train_batch_size", type=int, default=defaults["train_batch_size"], help="Batch size per device."
    )
    train.add_argument("--num_train_epochs", type=int, default=defaults["num_train_epochs"])
    train.add_argument(
        "--max_train_steps", type=int, default=None, help="Total optimizer steps; overrides --num_train_epochs."
    )
    train.add_argument(
        "--gradient_accumulation_steps", type=int, default=1, help="Batches accumulated per optimizer step."
    )
    train.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="Recompute activations in the backward pass to save memory.",
    )
    train.add_argument(
        "--learning_rate", type=float, default=defaults["learning_rate"], help="Learning rate (after warmup)."
    )
    train.add_argument(
        "--scale_lr", action="store_true", help="Multiply the learning rate by processes x accumulation x batch size."
    )
    train.add_argument(
        "--lr_scheduler",
        type=str,
        default="constant",
        choices=[t.value for t in SchedulerType],
        help="diffusers' get_scheduler name.",
    )
    train.add_argument("--lr_warmup_steps", type=int, default=0, help="Warmup steps of the learning-rate scheduler.")
    train.add_argument("--lr_num_cycles", type=int, default=1, help="Cycles of cosine_with_restarts.")
    train.add_argument("--lr_power", type=float, default=1.0, help="Power of the polynomial scheduler.")
    train.add_argument("--use_8bit_adam", action="store_true", help="8-bit AdamW from bitsandbytes.")
    train.add_argument("--adam_beta1", type=float, default=0.9)
    train.add_argument("--adam_beta2", type=float, default=0.999)
    train.add_argument("--adam_weight_decay", type=float, default=1e-2)
    train.add_argument("--adam_epsilon", type=float, default=1e-8)
    train.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm.")
    train.add_argument(
        "--snr_gamma", type=float, default=None, help="Min-SNR loss weighting gamma (5.0 is the recommended value)."
    )
    train.add_argument("--noise_offset", type=float, default=0.0, help="Scale of the noise offset.")
    train.add_argument(
        "--prediction_type",
        type=str,
        default=None,
        choices=["epsilon", "v_prediction"],
        help="Training target (default: the model scheduler's prediction type).",
    )
    train.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Frozen weights in this dtype, tuner weights in fp32 (default: accelerate's config).",
    )
    train.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere+ GPUs.")
    train.add_argument(
        "--enable_xformers_memory_efficient_attention",
        action="store_true",
        help="Run the frozen attention with xformers.",
    )

    add_flow_matching_arguments(parser)

    ckpt = parser.add_argument_group("checkpoints")
    ckpt.add_argument(
        "--checkpointing_steps", type=int, default=500, help="Save the training state every X optimizer steps."
    )
    ckpt.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    ckpt.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help="'latest' (the newest checkpoint in --output_dir) or a checkpoint folder.",
    )
    ckpt.add_argument(
        "--allow_inexact_resume",
        action="store_true",
        help="Resume even when the checkpoint's random states (random_states_<process>.pkl) are missing or "
        "unreadable; the run then continues with fresh random states and no longer equals an uninterrupted one "
        "(a loud warning says so). Without it such a checkpoint is refused.",
    )

    val = parser.add_argument_group("validation and logging")
    val.add_argument(
        "--validation_prompt",
        type=str,
        default=None,
        help="Prompt generated at intervals (PNG grids under output_dir/validation).",
    )
    val.add_argument("--num_validation_images", type=int, default=4)
    val.add_argument(
        "--validation_steps",
        type=int,
        default=None,
        help="Validate every X optimizer steps (instead of --validation_epochs).",
    )
    val.add_argument(
        "--validation_epochs", type=int, default=defaults["validation_epochs"], help="Validate every X epochs."
    )
    val.add_argument("--validation_inference_steps", type=int, default=25, help="Sampling steps of validation images.")
    val.add_argument("--report_to", type=str, default="tensorboard", help="tensorboard, wandb, all, or none.")
    val.add_argument("--logging_dir", type=str, default="logs", help="Logs folder, relative to --output_dir.")
    val.add_argument(
        "--tracker_project_name", type=str, default=f"res-tuner-{task}", help="Project name of the trackers."
    )
    add_user_flags(parser)
    return parser


def add_flow_matching_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of rectified-flow training (SD3, Flux), with the names and meanings of diffusers'
    ``train_dreambooth_lora_sd3.py`` / ``train_dreambooth_lora_flux.py``. Their defaults are ``None``: an unset flag
    takes the family's default (given in the help), and a flag given for a UNet model is refused."""
    flow = parser.add_argument_group("diffusion transformers (SD3, Flux): rectified flow")
    flow.add_argument(
        "--weighting_scheme",
        type=str,
        default=None,
        choices=["sigma_sqrt", "logit_normal", "mode", "cosmap", "none"],
        help="How training timesteps are sampled (logit_normal, mode) or the loss weighted (sigma_sqrt, cosmap); "
        "default logit_normal for SD3, none (uniform) for Flux.",
    )
    flow.add_argument(
        "--logit_mean", type=float, default=None, help="Mean of --weighting_scheme logit_normal (default 0.0)."
    )
    flow.add_argument(
        "--logit_std",
        type=float,
        default=None,
        help="Standard deviation of --weighting_scheme logit_normal (default 1.0).",
    )
    flow.add_argument(
        "--mode_scale", type=float, default=None, help="Scale of --weighting_scheme mode (default 1.29)."
    )
    flow.add_argument(
        "--precondition_outputs",
        action="store_true",
        help="SD3's EDM-style preconditioning: the loss compares x_t - sigma * prediction with the latents instead of "
        "the prediction with noise - latents (off by default here, on in diffusers' SD3 script).",
    )
    flow.add_argument(
        "--guidance_scale",
        type=float,
        default=None,
        help="Flux only: the value of the guidance embedding of a guidance-distilled model (FLUX.1-dev) in training "
        "and validation (default 3.5).",
    )
    flow.add_argument(
        "--max_sequence_length",
        type=int,
        default=None,
        help="T5 tokens of the prompt (default 77 for SD3, 512 for Flux, as diffusers' scripts).",
    )


def parse_args(task: Task, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the flags of one script; a bad combination exits with a message saying what to do."""
    parser = build_parser(task)
    args = parser.parse_args(argv)
    args.task = task
    check_args(parser, args)
    return args


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The checks of :func:`parse_args` on parsed ``args`` (for a parser that extends :func:`build_parser`)."""
    task = args.task
    check_finite_flags(parser, args)
    check_mixed_precision(parser, args)
    try:
        config = tuner_config_from_args(args)
        check_tuner_fits_model(args, config)
    except (ConfigError, ResTunerError, OSError) as err:
        parser.error(f"bad tuner settings: {err}")
    if getattr(config, "scale", None) == 0:
        parser.error(
            "the tuner's scale is 0 (--tuner_scale or the config's scale): its branch would add nothing, so no "
            "gradient would reach it and the run would train nothing; use a scale that is not 0 (1.0 is the default)"
        )
    check_flag_bounds(parser, args)
    if args.logit_std is not None and args.logit_std <= 0:
        parser.error(f"--logit_std must be positive, got {args.logit_std}")
    if args.max_sequence_length is not None and args.max_sequence_length < 1:
        parser.error(f"--max_sequence_length must be at least 1, got {args.max_sequence_length}")
    if args.learning_rate <= 0:
        parser.error(f"--learning_rate must be positive, got {args.learning_rate}")
    if task == "dreambooth":
        if args.with_prior_preservation:
            if args.class_data_dir is None or args.class_prompt is None:
                parser.error("--with_prior_preservation needs --class_data_dir and --class_prompt")
            if args.num_class_images < 1:
                parser.error(f"--num_class_images must be at least 1, got {args.num_class_images}")
    else:
        if (args.dataset_name is None) == (args.train_data_dir is None):
            parser.error(
                "give exactly one of --dataset_name (a datasets name or path) or --train_data_dir (a folder of images)"
            )
        if not 0.0 <= args.caption_dropout <= 1.0:
            parser.error(f"--caption_dropout is a probability in [0, 1], got {args.caption_dropout}")
    check_user_flags(parser, args)
    report_to = [name.strip() for name in args.report_to.split(",")]
    unknown = set(report_to) - {"tensorboard", "wandb", "comet_ml", "all", "none"}
    if unknown:
        parser.error(
            f"--report_to {args.report_to!r}: unknown tracker(s) {sorted(unknown)}; use tensorboard, wandb, all or "
            "none"
        )


#: counts and sizes that must be at least 1
_COUNT_FLAGS = (
    "train_batch_size",
    "gradient_accumulation_steps",
    "num_train_epochs",
    "checkpointing_steps",
    "num_validation_images",
    "max_train_steps",
    "resolution",
    "checkpoints_total_limit",
    "validation_steps",
    "validation_epochs",
)
#: flag -> (lowest allowed value, whether the lowest is allowed, why): the counts above, and the numbers whose wrong
#: sign would not fail but train wrongly (gradient ascent) or fail only after the models have loaded (torch's and
#: numpy's raw errors)
_FLAG_BOUNDS: dict[str, tuple[float, bool, str]] = {
    **{name: (1, True, "a count") for name in _COUNT_FLAGS},
    "max_grad_norm": (0, True, "0 turns clipping off; a negative norm flips every gradient's sign in clip_grad_norm_"),
    "snr_gamma": (0, False, "min(SNR, gamma) / SNR weights the loss: 0 weights every step by 0, below 0 climbs it"),
    "prior_loss_weight": (0, True, "a negative weight would push the model away from the class examples"),
    "adam_weight_decay": (0, True, "torch's AdamW refuses it"),
    "adam_epsilon": (0, True, "torch's AdamW refuses it"),
    "lr_warmup_steps": (0, True, "a step count"),
    "lr_power": (0, True, "the polynomial schedule divides by zero at the last step"),
    "dataloader_num_workers": (0, True, "a process count (0: load in the main process)"),
    "sample_batch_size": (1, True, "class images are generated in batches of this size"),
    "validation_inference_steps": (1, True, "validation would fail only after the first training steps"),
    "max_train_samples": (1, True, "a count of examples: -1 kept all but one of them, as a slice does"),
    "seed": (0, True, "numpy's generator refuses it"),
}


def check_flag_bounds(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Counts below 1 and numbers that parse but cannot train: refused before any model loads or is written."""
    for name, (least, inclusive, why) in _FLAG_BOUNDS.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        if value < least or (value == least and not inclusive):
            relation = ">=" if inclusive else ">"
            parser.error(f"--{name} must be {relation} {least:g}, got {value:g} ({why})")
    for name in ("adam_beta1", "adam_beta2"):
        value = getattr(args, name, None)
        if value is not None and not 0.0 <= value < 1.0:
            parser.error(f"--{name} must be in [0, 1), got {value:g} (a moving average's decay; torch refuses it)")
    if getattr(args, "seed", None) is not None and args.seed > MAX_NUMPY_SEED:
        parser.error(
            f"--seed must be at most 2**32 - 1 = {MAX_NUMPY_SEED}, got {args.seed} (numpy's generator refuses it)"
        )


def check_finite_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every number flag is finite: ``--learning_rate nan`` would train on NaN and fail later, blaming the model."""
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if action.type is float and isinstance(value, float) and not math.isfinite(value):
            parser.error(f"{action.option_strings[0]} must be a finite number, got {value}")


def fp16_device_available() -> bool:
    """Whether this machine has an accelerator that runs float16 (CUDA/ROCm, XPU or Apple MPS)."""
    xpu = getattr(torch, "xpu", None)
    mps = getattr(torch.backends, "mps", None)
    return bool(
        torch.cuda.is_available()
        or (xpu is not None and xpu.is_available())
        or (mps is not None and mps.is_available())
    )


#: Why fp16 is refused on a CPU, in one place for the flag check and the training loop (accelerate's own config).
FP16_ON_CPU = (
    "mixed precision fp16 needs a GPU, and this machine has none: on a CPU float16 weights meet the float32 inputs "
    "of the tuners and training fails. Use --mixed_precision bf16 (the CPU's half precision) or --mixed_precision no"
)


def check_mixed_precision(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.mixed_precision == "fp16" and not fp16_device_available():
        parser.error(FP16_ON_CPU)


def check_tuner_fits_model(args: argparse.Namespace, config: ResTunerConfig) -> None:
    """Refuse a tuner bigger than its model before anything is loaded (``--rank 1000000``): the UNet of a local
    model folder is built from its ``unet/config.json`` on the meta device (no weights read), and the tuner is
    planned on it there. A Hub id is checked the same way once the UNet is loaded, still before allocation."""
    config_file = Path(args.pretrained_model_name_or_path) / "unet" / "config.json"
    if not config_file.is_file():
        return
    from diffusers import UNet2DConditionModel

    from ..integration.plan import check_tuner_size

    unet_config = UNet2DConditionModel.load_config(str(config_file.parent))
    if unet_config.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        return  # another model family: its own loader checks it
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
    check_tuner_size(unet, config)


# --- the tuner config ------------------------------------------------------------------------------------------
def tuner_config_from_args(args: argparse.Namespace) -> ResTunerConfig:
    """The :class:`ResTunerConfig` the flags describe (validated; raises ConfigError naming the allowed values)."""
    if args.tuner_config is not None:
        base = ResTunerConfig.load(args.tuner_config)
        if args.tuner is not None and args.tuner != base.tuner:
            raise ConfigError(
                f"--tuner {args.tuner} conflicts with --tuner_config {args.tuner_config} (a {base.tuner} config); "
                "drop one of them"
            )
        data = base.to_dict()
        hyperparameters = data.pop("hyperparameters")
    else:
        data = {"tuner": args.tuner or "res_attn"}
        hyperparameters = {}

    flag_fields = [
        ("targets", "targets"),
        ("blocks", "blocks"),
        ("projections", "projections"),
        ("placement", "placement"),
    ]
    for flag, field in [*flag_fields, ("tuner_scale", "scale")]:
        value = getattr(args, flag)
        if value is not None:
            data[field] = value
    for flag in ("rank", "heads"):
        if getattr(args, flag) is not None:
            hyperparameters[flag] = getattr(args, flag)
    own_flags = {
        "targets": "--targets",
        "blocks": "--blocks",
        "projections": "--projections",
        "placement": "--placement",
        "scale": "--tuner_scale",
    }
    for item in args.tuner_arg or []:
        key, value = _split_key_value(item)
        if key in own_flags:
            raise ConfigError(f"--tuner_arg {item!r}: {key} is not a hyperparameter; use {own_flags[key]}")
        hyperparameters[key] = _parse_hyperparameter(data["tuner"], key, value)
    return ResTunerConfig(**data, **hyperparameters)


def _split_key_value(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--tuner_arg {item!r} is not KEY=VALUE, e.g. --tuner_arg rank=8")
    return key.strip(), value.strip()


def _parse_hyperparameter(tuner: str, key: str, text: str) -> Any:
    """Turn ``text`` into the type the tuner's hyperparameter dataclass declares for ``key``.

    Unknown keys are passed through as strings: the tuner's own validation then names its hyperparameters.
    """
    params_cls = get_tuner_spec(tuner).params_cls
    try:
        hints = typing.get_type_hints(params_cls)
    except Exception:  # unresolvable annotations: fall back to JSON-or-string below
        hints = {}
    kind = hints.get(key)
    if key not in getattr(params_cls, "__dataclass_fields__", {}):
        return text
    if kind is bool:
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--tuner_arg {key}={text}: {key} is a boolean; use true or false")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"--tuner_arg {key}={text}: {key} is an integer") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"--tuner_arg {key}={text}: {key} is a number") from None
    if kind is str:
        return text
    try:  # structured values (dicts, lists) are given as JSON
        return json.loads(text)
    except json.JSONDecodeError:
        if kind is None:
            return text
        raise ConfigError(
            f'--tuner_arg {key}={text}: {key} is {kind}; give it as JSON, e.g. {key}=\'{{"a": "b"}}\''
        ) from None


def args_to_json(args: argparse.Namespace) -> dict[str, Any]:
    """The run's arguments as plain JSON values (written to ``output_dir/args.json``)."""
    return {
        key: value
        for key, value in sorted(vars(args).items())
        if isinstance(value, (str, int, float, bool, list, type(None))) and key not in SECRET_FLAGS
    }
