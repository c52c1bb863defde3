"""What training updates, and how the result is saved and loaded: the one place that decides.

Three methods, chosen by the flags (:func:`training_method`):

* ``"res_tuner"`` (the default): a res tuner from ``--tuner`` and its flags, saved as ``res_tuner.safetensors``;
* ``"peft"`` (``--peft_method lora|glora|c3a``): a peft adapter on the attention projections
  :data:`PEFT_TARGET_MODULES` of every ``attn1``/``attn2`` -- the peers users would pick instead of a res tuner.
  Saved as ``peft_adapter/adapter_model.safetensors`` + ``peft_adapter/adapter_config.json``;
* ``"full"`` (``--full_finetune``): every UNet weight, saved with ``save_pretrained`` as ``unet/``.

Trainable parameters are kept in fp32 under mixed precision (the frozen weights run in fp16/bf16). Every adapter
starts as a no-op, so a run starts from the base model: peft's C3A is created with zero kernels
(``init_weights=True``) for that reason (its own default is a random, non-zero init).

:func:`load_trained_unet` puts a training result back on a base UNet and :func:`load_tuned_pipeline` builds the
tuned pipeline for evaluation::

    pipe = load_tuned_pipeline("base_model_folder", "output_dir")   # any of the three methods
"""

from __future__ import annotations

import math
from argparse import Namespace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..integration.io import WEIGHT_NAME, load_res_tuner, save_res_tuner
from .errors import TrainingError

TrainingMethod = Literal["res_tuner", "peft", "full"]
PEFT_METHODS: tuple[str, ...] = ("lora", "glora", "c3a")
#: The attention projections a peft adapter goes on (in every attn1 and attn2 of the UNet).
PEFT_TARGET_MODULES: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
PEFT_ADAPTER_NAME = "default"
PEFT_FOLDER = "peft_adapter"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
FULL_UNET_FOLDER = "unet"


def training_method(args: Namespace) -> TrainingMethod:
    """Which method the flags ask for (flags are checked by ``parse_args``)."""
    if getattr(args, "full_finetune", False):
        return "full"
    if getattr(args, "peft_method", None) is not None:
        return "peft"
    return "res_tuner"


def result_path(output_dir: str | Path, method: TrainingMethod) -> Path:
    """Where a run of ``method`` saves its result inside ``output_dir`` (a file or a folder)."""
    output_dir = Path(output_dir)
    return {"res_tuner": output_dir / WEIGHT_NAME, "peft": output_dir / PEFT_FOLDER, "full": output_dir / FULL_UNET_FOLDER}[method]


def saved_method(output_dir: str | Path) -> TrainingMethod:
    """Which method's result ``output_dir`` holds; a clear error if none."""
    output_dir = Path(output_dir)
    for method in ("res_tuner", "peft", "full"):
        if result_path(output_dir, method).exists():
            return method
    raise TrainingError(
        f"{str(output_dir)!r} holds no training result (expected {WEIGHT_NAME}, {PEFT_FOLDER}/ or {FULL_UNET_FOLDER}/); "
        "pass the --output_dir of a finished run"
    )


# --- peft ------------------------------------------------------------------------------------------------------
def attention_projections(unet: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The linear layers a peft adapter targets: :data:`PEFT_TARGET_MODULES` of the UNet's attention."""
    found = []
    for name, module in unet.named_modules():
        if isinstance(module, nn.Linear) and any(name.endswith("." + target) for target in PEFT_TARGET_MODULES):
            found.append((name, module))
    if not found:
        raise TrainingError(f"the UNet has no attention projections {PEFT_TARGET_MODULES} for a peft adapter")
    return found


def default_c3a_block_size(unet: nn.Module) -> int:
    """peft's advice for C3A: the greatest common divisor of every targeted layer's input and output size."""
    sizes = [size for _, layer in attention_projections(unet) for size in (layer.in_features, layer.out_features)]
    return math.gcd(*sizes)


def peft_config_from_args(args: Namespace, unet: nn.Module) -> Any:
    """The peft config of ``--peft_method`` with ``--peft_rank`` (LoRA, GLoRA) or ``--peft_block_size`` (C3A)."""
    targets = list(PEFT_TARGET_MODULES)
    if args.peft_method == "lora":
        from peft import LoraConfig

        # alpha = rank: the update is B A unscaled, so learning rates compare across ranks
        return LoraConfig(r=args.peft_rank, lora_alpha=args.peft_rank, target_modules=targets, init_lora_weights=True)
    if args.peft_method == "glora":
        from peft.tuners.glora import GloraConfig

        return GloraConfig(r=args.peft_rank, target_modules=targets)
    if args.peft_method == "c3a":
        from peft.tuners.c3a import C3AConfig

        block_size = args.peft_block_size or default_c3a_block_size(unet)
        bad = [name for name, layer in attention_projections(unet) if layer.in_features % block_size or layer.out_features % block_size]
        if bad:
            raise TrainingError(
                f"--peft_block_size {block_size} does not divide the input and output sizes of {bad[0]} (and {len(bad) - 1} "
                f"more); use a divisor of {default_c3a_block_size(unet)}"
            )
        return C3AConfig(block_size=block_size, target_modules=targets, init_weights=True)
    raise TrainingError(f"--peft_method {args.peft_method!r} is not one of {PEFT_METHODS}")


def add_peft_adapter(unet: nn.Module, peft_config: Any) -> None:
    from peft import inject_adapter_in_model

    inject_adapter_in_model(peft_config, unet, adapter_name=PEFT_ADAPTER_NAME)


# --- what the optimizer gets -----------------------------------------------------------------------------------
def prepare_trainable(unet: nn.Module, args: Namespace, weight_dtype: torch.dtype) -> list[nn.Parameter]:
    """Make ``unet`` trainable as the flags ask and return its trainable parameters (fp32).

    res tuner / peft: the UNet is frozen in ``weight_dtype`` and the added weights are kept in fp32. Full
    fine-tuning: the whole UNet is trainable and kept in fp32 (mixed precision then runs it under autocast).
    """
    from diffusers.training_utils import cast_training_params

    from .args import tuner_config_from_args
    from .models import move, prepare_unet_for_training

    method = training_method(args)
    if method == "res_tuner":
        return prepare_unet_for_training(unet, tuner_config_from_args(args), weight_dtype)
    if method == "full":
        move(unet, None, torch.float32)
        unet.requires_grad_(True)
        return [p for p in unet.parameters()]
    unet.requires_grad_(False)
    move(unet, None, weight_dtype)
    add_peft_adapter(unet, peft_config_from_args(args, unet))
    cast_training_params(unet, dtype=torch.float32)
    return [p for p in unet.parameters() if p.requires_grad]


def parameters_are_finite(parameters: list[nn.Parameter]) -> bool:
    return all(torch.isfinite(p).all() for p in parameters)


def describe_trainable(unet: nn.Module, args: Namespace, parameters: list[nn.Parameter]) -> str:
    """One log line: the method and its number of trainable parameters."""
    count = sum(p.numel() for p in parameters)
    method = training_method(args)
    if method == "peft":
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = sum(isinstance(module, BaseTunerLayer) for module in unet.modules())
        detail = f"peft {args.peft_method} on {', '.join(PEFT_TARGET_MODULES)} ({layers} layers)"
    elif method == "full":
        detail = "full UNet fine-tuning"
    else:
        detail = "res tuner"
    return f"{detail}: {count:,} trainable parameters"


# --- saving and loading ----------------------------------------------------------------------------------------
def save_trained(unet: nn.Module, output_dir: str | Path, args: Namespace) -> Path:
    """Save what was trained into ``output_dir``; returns :func:`result_path`."""
    method = training_method(args)
    path = result_path(output_dir, method)
    if method == "res_tuner":
        save_res_tuner(unet, output_dir)
    elif method == "full":
        unet.save_pretrained(str(path))
    else:
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        path.mkdir(parents=True, exist_ok=True)
        state = get_peft_model_state_dict(unet, adapter_name=PEFT_ADAPTER_NAME)
        save_file({key: value.detach().contiguous() for key, value in state.items()}, str(path / PEFT_WEIGHTS_NAME))
        unet.peft_config[PEFT_ADAPTER_NAME].save_pretrained(str(path))
    return path


def load_trained_unet(unet: nn.Module, output_dir: str | Path) -> nn.Module:
    """Put the result of a training run (any method) on a base ``unet``; returns the UNet to use.

    A res tuner or peft adapter is added to ``unet`` in place (and ``unet`` is returned); a fully fine-tuned UNet
    is loaded from ``output_dir/unet`` and returned in ``unet``'s dtype and device (``unet`` is left unchanged).
    """
    method = saved_method(output_dir)
    path = result_path(output_dir, method)
    if method == "res_tuner":
        load_res_tuner(unet, output_dir)
        return unet
    if method == "full":
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel.from_pretrained(str(path)).to(device=unet.device, dtype=unet.dtype)
    from peft import PeftConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    config = PeftConfig.from_pretrained(str(path))
    add_peft_adapter(unet, config)
    result = set_peft_model_state_dict(unet, load_file(str(path / PEFT_WEIGHTS_NAME)), adapter_name=PEFT_ADAPTER_NAME)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise TrainingError(f"{str(path)!r} holds weights this UNet has no place for, e.g. {unexpected[0]}")
    return unet


def load_tuned_pipeline(base_model: str | Path, output_dir: str | Path, device: str | torch.device = "cpu") -> Any:
    """The base diffusers pipeline in ``base_model`` with the result of the run in ``output_dir`` on its denoiser
    (``pipeline.unet``, or ``pipeline.transformer`` of SD3 / Flux)."""
    from diffusers import DiffusionPipeline

    from ..integration.loader_mixin import denoiser_attribute

    pipeline = DiffusionPipeline.from_pretrained(str(base_model))
    attribute = denoiser_attribute(pipeline)
    setattr(pipeline, attribute, load_trained_unet(getattr(pipeline, attribute), output_dir))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)
