"""The peers as training providers, and loading their results back.

* :class:`PeftTrainable` (``--peft_method lora|glora|c3a``): a peft adapter on the attention projections
  :data:`~benchmarks.perf.peers.PEER_TARGET_MODULES` of every ``attn1``/``attn2`` -- the peers users would pick
  instead of a res tuner. Saved as ``peft_adapter/adapter_model.safetensors`` + ``peft_adapter/adapter_config.json``;
* :class:`FullFinetuneTrainable` (``--full_finetune``): every UNet weight, saved with ``save_pretrained`` as ``unet/``.

Every adapter starts as a no-op, so a run starts from the base model: peft's C3A is created with zero kernels
(``init_weights=True``) for that reason (its own default is a random, non-zero init).

:func:`load_trained_unet` puts the result of any run (res tuner, peft adapter, full fine-tuning) on a base UNet
and :func:`load_tuned_pipeline` builds the tuned pipeline for evaluation::

    pipe = load_tuned_pipeline("base_model_folder", "output_dir")   # any of the three methods
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from benchmarks.perf.peers import PEER_TARGET_MODULES, attention_linears
from resattn_diffusion.integration.io import WEIGHT_NAME
from resattn_diffusion.training import TrainingError
from resattn_diffusion.training import trainable as library
from resattn_diffusion.training.models import move
from resattn_diffusion.training.trainable import TrainableProvider

TrainingMethod = Literal["res_tuner", "peft", "full"]
PEFT_METHODS: tuple[str, ...] = ("lora", "glora", "c3a")
PEFT_ADAPTER_NAME = "default"
PEFT_FOLDER = "peft_adapter"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
FULL_UNET_FOLDER = "unet"


def result_path(output_dir: str | Path, method: TrainingMethod) -> Path:
    """Where a run of ``method`` saves its result inside ``output_dir`` (a file or a folder)."""
    output_dir = Path(output_dir)
    return {
        "res_tuner": output_dir / WEIGHT_NAME,
        "peft": output_dir / PEFT_FOLDER,
        "full": output_dir / FULL_UNET_FOLDER,
    }[method]


def saved_method(output_dir: str | Path) -> TrainingMethod:
    """Which method's result ``output_dir`` holds; a clear error if none."""
    output_dir = Path(output_dir)
    for method in ("res_tuner", "peft", "full"):
        if result_path(output_dir, method).exists():
            return method
    raise TrainingError(
        f"{str(output_dir)!r} holds no training result (expected {WEIGHT_NAME}, {PEFT_FOLDER}/ or "
        f"{FULL_UNET_FOLDER}/); pass the --output_dir of a finished run"
    )


# --- peft ------------------------------------------------------------------------------------------------------
def default_c3a_block_size(unet: nn.Module) -> int:
    """peft's advice for C3A: the greatest common divisor of every targeted layer's input and output size."""
    sizes = [size for layer in attention_linears(unet).values() for size in (layer.in_features, layer.out_features)]
    return math.gcd(*sizes)


def peft_config(method: str, rank: int | None, block_size: int | None, unet: nn.Module) -> Any:
    """The peft config of ``--peft_method`` with ``--peft_rank`` (LoRA, GLoRA) or ``--peft_block_size`` (C3A)."""
    targets = list(PEER_TARGET_MODULES)
    if method == "lora":
        from peft import LoraConfig

        # alpha = rank: the update is B A unscaled, so learning rates compare across ranks
        return LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=True)
    if method == "glora":
        from peft.tuners.glora import GloraConfig

        return GloraConfig(r=rank, target_modules=targets)
    if method == "c3a":
        from peft.tuners.c3a import C3AConfig

        block_size = block_size or default_c3a_block_size(unet)
        bad = [
            name
            for name, layer in attention_linears(unet).items()
            if layer.in_features % block_size or layer.out_features % block_size
        ]
        if bad:
            raise TrainingError(
                f"--peft_block_size {block_size} does not divide the input and output sizes of {bad[0]} (and "
                f"{len(bad) - 1} more); use a divisor of {default_c3a_block_size(unet)}"
            )
        return C3AConfig(block_size=block_size, target_modules=targets, init_weights=True)
    raise TrainingError(f"--peft_method {method!r} is not one of {PEFT_METHODS}")


def add_peft_adapter(unet: nn.Module, config: Any) -> None:
    from peft import inject_adapter_in_model

    inject_adapter_in_model(config, unet, adapter_name=PEFT_ADAPTER_NAME)


def save_peft_adapter(unet: nn.Module, path: Path) -> None:
    """The adapter's weights and peft config into the folder ``path``; a LoRA also in diffusers' layout
    (``pytorch_lora_weights.safetensors``, keys ``unet.<module>.lora_A.weight``): the file ``pipe.load_lora_weights``
    picks from the folder. (peft's own keys lack the ``unet.`` prefix, so diffusers would skip them silently.)"""
    from peft import LoraConfig, get_peft_model_state_dict
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(unet, adapter_name=PEFT_ADAPTER_NAME)
    save_file({key: value.detach().contiguous() for key, value in state.items()}, str(path / PEFT_WEIGHTS_NAME))
    config = unet.peft_config[PEFT_ADAPTER_NAME]
    config.save_pretrained(str(path))
    if isinstance(config, LoraConfig):
        from diffusers.loaders import StableDiffusionLoraLoaderMixin
        from diffusers.utils import convert_state_dict_to_diffusers

        StableDiffusionLoraLoaderMixin.save_lora_weights(
            str(path),
            unet_lora_layers=convert_state_dict_to_diffusers(state),
            unet_lora_adapter_metadata=config.to_dict(),  # rank and alpha, so diffusers scales it as trained
            safe_serialization=True,
        )


def load_peft_adapter(unet: nn.Module, path: Path) -> None:
    """Add the adapter saved in the folder ``path`` to ``unet`` (in place)."""
    from peft import PeftConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    config = PeftConfig.from_pretrained(str(path))
    add_peft_adapter(unet, config)
    result = set_peft_model_state_dict(unet, load_file(str(path / PEFT_WEIGHTS_NAME)), adapter_name=PEFT_ADAPTER_NAME)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise TrainingError(f"{str(path)!r} holds weights this UNet has no place for, e.g. {unexpected[0]}")


class PeftTrainable(TrainableProvider):
    """A peft adapter (``method``: lora, glora or c3a) on the attention projections, the UNet frozen."""

    name = "peft"

    def __init__(self, method: str, rank: int | None = None, block_size: int | None = None):
        self.method, self.rank, self.block_size = method, rank, block_size

    def result_path(self, output_dir: Path) -> Path:
        return result_path(output_dir, "peft")

    def prepare(self, unet: nn.Module, weight_dtype: torch.dtype) -> list[nn.Parameter]:
        from diffusers.training_utils import cast_training_params

        config = peft_config(self.method, self.rank, self.block_size, unet)
        unet.requires_grad_(False)
        move(unet, None, weight_dtype)
        add_peft_adapter(unet, config)
        cast_training_params(unet, dtype=torch.float32)
        return [p for p in unet.parameters() if p.requires_grad]

    def describe(self, unet: nn.Module, parameters: list[nn.Parameter]) -> str:
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = sum(isinstance(module, BaseTunerLayer) for module in unet.modules())
        count = sum(p.numel() for p in parameters)
        return (
            f"peft {self.method} on {', '.join(PEER_TARGET_MODULES)} ({layers} layers): {count:,} trainable parameters"
        )

    def save(self, unet: nn.Module, output_dir: Path) -> Path:
        path = self.result_path(output_dir)
        save_peft_adapter(unet, path)
        return path


class FullFinetuneTrainable(TrainableProvider):
    """Every UNet weight, trainable and kept in fp32 (mixed precision then runs it under autocast): the ceiling."""

    name = "full"

    def result_path(self, output_dir: Path) -> Path:
        return result_path(output_dir, "full")

    def prepare(self, unet: nn.Module, weight_dtype: torch.dtype) -> list[nn.Parameter]:
        move(unet, None, torch.float32)
        unet.requires_grad_(True)
        return list(unet.parameters())

    def describe(self, unet: nn.Module, parameters: list[nn.Parameter]) -> str:
        return f"full UNet fine-tuning: {sum(p.numel() for p in parameters):,} trainable parameters"

    def save(self, unet: nn.Module, output_dir: Path) -> Path:
        path = self.result_path(output_dir)
        unet.save_pretrained(str(path))
        return path


# --- loading any result back -----------------------------------------------------------------------------------
def load_trained_unet(unet: nn.Module, output_dir: str | Path) -> nn.Module:
    """Put the result of a training run (any method) on a base ``unet``; returns the UNet to use.

    A res tuner or peft adapter is added to ``unet`` in place (and ``unet`` is returned); a fully fine-tuned UNet
    is loaded from ``output_dir/unet`` and returned in ``unet``'s dtype and device (``unet`` is left unchanged).
    """
    method = saved_method(output_dir)
    path = result_path(output_dir, method)
    if method == "res_tuner":
        return library.load_trained_unet(unet, output_dir)
    if method == "full":
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel.from_pretrained(str(path)).to(device=unet.device, dtype=unet.dtype)
    load_peft_adapter(unet, path)
    return unet


def load_tuned_pipeline(base_model: str | Path, output_dir: str | Path, device: str | torch.device = "cpu") -> Any:
    """The base diffusers pipeline in ``base_model`` with the result of the run in ``output_dir`` (any method)."""
    return library.load_tuned_pipeline(base_model, output_dir, device, load_unet=load_trained_unet)
