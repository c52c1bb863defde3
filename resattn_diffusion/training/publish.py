"""After training: the model card (``output_dir/README.md``, built with diffusers' model-card utilities), the LoRA
export of a weight-space tuner (``--export_lora``), and the Hub upload (``--push_to_hub``).

A failed upload raises :class:`~resattn_diffusion.training.errors.TrainingError` naming the folder, which stays on
disk with everything in it (tuner, card, images) for an upload by hand; a failed upload at a checkpoint
(``--push_checkpoints_to_hub``) is a warning, so hours of training are not lost to a network hiccup.
"""

from __future__ import annotations

import logging
from argparse import Namespace
from pathlib import Path
from typing import Any
from unittest import mock

from ..config import ResTunerConfig
from .errors import TrainingError

logger = logging.getLogger(__name__)

CARD_NAME = "README.md"
#: Flags worth a line in the card (the rest is in args.json).
_CARD_FLAGS = (
    "task", "max_train_steps", "num_train_epochs", "train_batch_size", "gradient_accumulation_steps", "learning_rate",
    "lr_scheduler", "optimizer", "resolution", "mixed_precision", "snr_gamma", "with_prior_preservation",
    "instance_prompt", "class_prompt", "repeats", "image_interpolation_mode",
)  # fmt: skip
#: Folders an upload leaves out: intermediate validation grids are in validation/, not here; logs stay local.
_UPLOAD_IGNORE = ["logs/*", "*.tmp", ".*"]


def hub_repo_id(args: Namespace) -> str:
    """``--hub_model_id``, else the output folder's name (diffusers' rule); the Hub adds the user namespace."""
    return args.hub_model_id or Path(args.output_dir).resolve().name


def create_hub_repo(args: Namespace) -> str:
    """Create (or find) the Hub repo before training starts, so a bad token or an unreachable Hub fails in the
    first seconds, not after the run; returns the full repo id."""
    import huggingface_hub

    repo_id = hub_repo_id(args)
    try:
        url = huggingface_hub.create_repo(repo_id, token=args.hub_token, private=args.hub_private, exist_ok=True)
    except Exception as err:  # HTTP, auth, offline: huggingface_hub raises many kinds
        raise TrainingError(
            f"--push_to_hub: cannot create or reach the Hub repo {repo_id!r}: {type(err).__name__}: "
            f"{_first_line(err)}. Log in with `hf auth login` (or pass --hub_token), check --hub_model_id, or drop "
            "--push_to_hub and upload output_dir later with `hf upload`"
        ) from None
    return getattr(url, "repo_id", None) or repo_id


def push_output_dir(repo_id: str, output_dir: Path, token: str | None, message: str, required: bool = True) -> bool:
    """Upload ``output_dir`` to ``repo_id``. A failure raises (``required``) or logs a warning; either way every
    file stays on disk. Returns whether the upload succeeded."""
    import huggingface_hub

    try:
        huggingface_hub.upload_folder(
            repo_id=repo_id,
            folder_path=str(output_dir),
            commit_message=message,
            token=token,
            ignore_patterns=_UPLOAD_IGNORE,
        )
    except Exception as err:
        text = (
            f"uploading {str(output_dir)!r} to the Hub repo {repo_id!r} failed: {type(err).__name__}: "
            f"{_first_line(err)}. Everything is still in {str(output_dir)!r}; upload it later with `hf upload "
            f"{repo_id} {output_dir}`"
        )
        if required:
            raise TrainingError(text) from None
        logger.warning("%s (training continues)", text)
        return False
    logger.info("uploaded %s to https://huggingface.co/%s", output_dir, repo_id)
    return True


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else ""


def export_trained_lora(args: Namespace, output_dir: Path, result: Path, unet: Any) -> Path | None:
    """``--export_lora FORMAT``: the trained tuner as a LoRA file beside it (``lora_<format>.safetensors``)."""
    fmt = getattr(args, "export_lora", None)
    if not fmt:
        return None
    from ..integration.export import export_lora

    out = output_dir / f"lora_{fmt}.safetensors"
    report = export_lora(result, out, format=fmt, rank=getattr(args, "export_lora_rank", None), base=unet)
    logger.info("exported a %s LoRA to %s (largest relative error %.2e)", fmt, out, report.max_relative_error)
    return out


def check_export_flags(args: Namespace, config: ResTunerConfig | None) -> None:
    """Before any model loads: ``--export_lora`` needs a weight-space tuner."""
    if getattr(args, "export_lora", None) and (config is None or config.spec.kind != "linear"):
        name = config.tuner if config is not None else "this trainable"
        raise TrainingError(
            f"--export_lora: {name} is not a weight-space tuner, so no LoRA file can hold it; only res_lora, glora "
            "and surm_circulant/toeplitz/kronecker/ldr export. Drop --export_lora"
        )


#: Per model family (``args.json``'s ``model_type``): the pipelines/ class that loads the tuner, the card's tag, and
#: the pipeline attribute the tuner sits on.
CARD_MODELS: dict[str, tuple[str, str, str]] = {
    "sd": ("ResTunerStableDiffusionPipeline", "stable-diffusion", "unet"),
    "sdxl": ("ResTunerStableDiffusionXLPipeline", "stable-diffusion-xl", "unet"),
    "sd3": ("ResTunerStableDiffusion3Pipeline", "sd3", "transformer"),
    "flux": ("ResTunerFluxPipeline", "flux", "transformer"),
}


def validation_images(output_dir: Path) -> list[Path]:
    """The validation grids the run wrote, oldest first (``validation/*.png``)."""
    return sorted((output_dir / "validation").glob("*.png"), key=lambda p: p.stat().st_mtime)


def _card_description(
    args: Namespace,
    config: ResTunerConfig | None,
    result: Path,
    lora: Path | None,
    model_type: str,
    images: list[Path],
    source: str,
) -> str:
    output_dir = Path(args.output_dir)
    base = args.pretrained_model_name_or_path
    what = f"a `{config.tuner}` tuner" if config is not None else "a tuned model"
    pipeline, _, denoiser = CARD_MODELS[model_type]
    lines = [
        f"# {what} for {base}",
        "",
        f"{what[0].upper()}{what[1:]} trained with resattn-diffusion "
        f"({args.task} training) on top of the frozen base model `{base}`. The base weights are unchanged; the "
        f"tuner adds small branches beside them (`{result.name}`).",
        "",
    ]
    if config is not None:
        lines += ["## Tuner", "", f"`{config.spec.summary}`", "", "```json", config.to_json(indent=2), "```", ""]
    flags = {name: getattr(args, name) for name in _CARD_FLAGS if getattr(args, name, None) not in (None, False)}
    lines += ["## Training", "", "| flag | value |", "|---|---|"]
    lines += [f"| `--{name}` | `{value}` |" for name, value in flags.items()]
    lines += ["", "Every flag of the run is in `args.json`.", ""]
    if images:
        lines += ["## Validation images", "", f"Prompt: `{args.validation_prompt}`", ""]
        lines += [f"![{image.stem}]({image.relative_to(output_dir).as_posix()})" for image in images[-4:]]
        lines += [""]
    lines += [
        "## How to use",
        "",
        "With resattn-diffusion installed (its `pipelines/` are diffusers' pipelines with the tuner loader added):",
        "",
        "```python",
        "import torch",
        f"from pipelines import {pipeline}",
        "",
        f'pipe = {pipeline}.from_pretrained("{base}")',
        f'pipe.load_res_tuner("{source}")',
        f'image = pipe("{args.validation_prompt or getattr(args, "instance_prompt", None) or "a photo"}").images[0]',
        "```",
        "",
        f"or on any pipeline's {denoiser}: `resattn_diffusion.load_res_tuner(pipe.{denoiser}, path)`.",
        "",
    ]
    if lora is not None:
        lines += [
            f"The same weights as a plain LoRA (`{lora.name}`), for diffusers, ComfyUI, A1111 and kohya tools:",
            "",
            "```python",
            f'pipe.load_lora_weights("{source}", weight_name="{lora.name}")',
            "```",
            "",
        ]
    return "\n".join(lines)


def write_model_card(
    args: Namespace,
    config: ResTunerConfig | None,
    result: Path,
    model_type: str,
    lora: Path | None = None,
    repo_id: str | None = None,
) -> Path:
    """``output_dir/README.md``: diffusers' training model card (``load_or_create_model_card`` +
    ``populate_model_card``) with the base model, the tuner and its config, the training flags, the validation
    images and how to load the result. Never reads the Hub (the card describes this run)."""
    import huggingface_hub.constants as hub_constants
    from diffusers.utils.hub_utils import load_or_create_model_card, populate_model_card

    output_dir = Path(args.output_dir)
    images = validation_images(output_dir)
    widget = []
    if images and args.validation_prompt:
        widget = [{"text": args.validation_prompt, "output": {"url": images[-1].relative_to(output_dir).as_posix()}}]
    # diffusers first looks for an existing card on the Hub; this card is new, so that lookup is switched off
    with mock.patch.object(hub_constants, "HF_HUB_OFFLINE", True):
        card = load_or_create_model_card(
            repo_id or hub_repo_id(args),
            from_training=True,
            base_model=str(args.pretrained_model_name_or_path),
            prompt=getattr(args, "instance_prompt", None),
            model_description=_card_description(
                args, config, result, lora, model_type, images, repo_id or str(output_dir)
            ),
            widget=widget or None,
            inference=True,
        )
    tags = ["resattn-diffusion", "res-tuner", "diffusers-training", "text-to-image", "diffusers"]
    tags += [CARD_MODELS[model_type][1]]
    if config is not None:
        tags.append(config.tuner)
    if lora is not None:
        tags.append("lora")
    card = populate_model_card(card, tags=tags)
    path = output_dir / CARD_NAME
    card.save(str(path))
    return path


def finish_run(args: Namespace, trainable: Any, result: Path, unet: Any, model_type: str, repo_id: str | None) -> None:
    """On the main process after the result is saved: export, card, upload (in that order: the upload carries both)."""
    output_dir = Path(args.output_dir)
    config = getattr(trainable, "config", None)
    lora = export_trained_lora(args, output_dir, result, unet)
    card = write_model_card(
        args, config if isinstance(config, ResTunerConfig) else None, result, model_type, lora, repo_id
    )
    logger.info("model card: %s", card)
    if repo_id is not None:
        push_output_dir(repo_id, output_dir, args.hub_token, "End of training", required=True)


__all__ = [
    "CARD_MODELS",
    "CARD_NAME",
    "check_export_flags",
    "create_hub_repo",
    "export_trained_lora",
    "finish_run",
    "hub_repo_id",
    "push_output_dir",
    "write_model_card",
]
