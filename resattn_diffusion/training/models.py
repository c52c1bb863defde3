"""The frozen base model: loading SD 1.x / 2.x / SDXL components, text conditioning, and the UNet with its tuner.

SDXL is recognised from the model folder (a second text encoder in ``model_index.json``). Its UNet then gets the
concatenated penultimate hidden states of both text encoders as context, and ``added_cond_kwargs`` with the
pooled embedding of the second encoder and the six size/crop ``time_ids`` of each image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import TrainingError


def read_model_index(path: str, revision: str | None = None, cache_dir: str | None = None) -> dict[str, Any]:
    """The pipeline's ``model_index.json`` (component classes); a clear error if there is none."""
    from diffusers import DiffusionPipeline

    if Path(path).is_dir() and not (Path(path) / "model_index.json").is_file():
        raise TrainingError(
            f"--pretrained_model_name_or_path {path!r} is a folder without model_index.json; pass the folder of a whole "
            "diffusers pipeline (with unet/, vae/, text_encoder/, tokenizer/, scheduler/)"
        )
    try:
        return dict(DiffusionPipeline.load_config(path, revision=revision, cache_dir=cache_dir))
    except (OSError, ValueError) as err:
        raise TrainingError(
            f"cannot read the base model {path!r}: {err}. Pass a local diffusers pipeline folder, or a hub id on a machine "
            "that can reach the hub"
        ) from None


def native_resolution(args: Any) -> int:
    """The image size the base UNet was trained at (512 for SD 1.5, 1024 for SDXL), read from the configs only."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    path, revision, cache_dir = args.pretrained_model_name_or_path, args.revision, args.cache_dir
    read_model_index(path, revision, cache_dir)  # a clear error first if this is no pipeline
    unet_config = UNet2DConditionModel.load_config(path, subfolder="unet", revision=revision, cache_dir=cache_dir)
    if args.pretrained_vae_model_name_or_path is not None:
        vae_config = AutoencoderKL.load_config(args.pretrained_vae_model_name_or_path, cache_dir=cache_dir)
    else:
        vae_config = AutoencoderKL.load_config(path, subfolder="vae", revision=revision, cache_dir=cache_dir)
    return int(unet_config["sample_size"]) * 2 ** (len(vae_config["block_out_channels"]) - 1)


def is_sdxl(model_index: dict[str, Any]) -> bool:
    """Whether a pipeline has SDXL's second text encoder."""
    entry = model_index.get("text_encoder_2")
    return bool(entry) and entry[0] is not None


def _text_encoder_class(path: str, subfolder: str, revision: str | None, cache_dir: str | None) -> type:
    """The text encoder class its config names (CLIPTextModel, CLIPTextModelWithProjection, ...)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(path, subfolder=subfolder, revision=revision, cache_dir=cache_dir)
    name = (config.architectures or ["CLIPTextModel"])[0]
    if not hasattr(transformers, name):
        raise TrainingError(f"{path}/{subfolder} is a {name}, which this transformers version does not have")
    return getattr(transformers, name)


@dataclass
class BaseModel:
    """The frozen components of a Stable Diffusion pipeline that training needs."""

    path: str
    model_index: dict[str, Any]
    sdxl: bool
    tokenizers: list[Any]
    text_encoders: list[nn.Module]
    vae: nn.Module
    unet: nn.Module
    noise_scheduler: Any
    #: the model's own sampling scheduler (for validation images)
    inference_scheduler: Any

    @classmethod
    def load(cls, args: Any) -> BaseModel:
        """Load every component from ``args.pretrained_model_name_or_path`` (+ revision, variant, VAE override)."""
        import diffusers
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer

        path, revision, variant, cache_dir = args.pretrained_model_name_or_path, args.revision, args.variant, args.cache_dir
        model_index = read_model_index(path, revision, cache_dir)
        sdxl = is_sdxl(model_index)
        suffixes = ["", "_2"] if sdxl else [""]
        tokenizers = [
            AutoTokenizer.from_pretrained(path, subfolder=f"tokenizer{s}", revision=revision, cache_dir=cache_dir) for s in suffixes
        ]
        text_encoders = [
            _text_encoder_class(path, f"text_encoder{s}", revision, cache_dir).from_pretrained(
                path, subfolder=f"text_encoder{s}", revision=revision, variant=variant, cache_dir=cache_dir
            )
            for s in suffixes
        ]
        if args.pretrained_vae_model_name_or_path is not None:
            vae = AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path, cache_dir=cache_dir)
        else:
            vae = AutoencoderKL.from_pretrained(path, subfolder="vae", revision=revision, variant=variant, cache_dir=cache_dir)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", revision=revision, variant=variant, cache_dir=cache_dir)
        noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", revision=revision, cache_dir=cache_dir)
        inference_scheduler_class = getattr(diffusers, model_index["scheduler"][1])
        inference_scheduler = inference_scheduler_class.from_pretrained(path, subfolder="scheduler", revision=revision, cache_dir=cache_dir)
        if args.prediction_type is not None:
            noise_scheduler.register_to_config(prediction_type=args.prediction_type)
            inference_scheduler.register_to_config(prediction_type=args.prediction_type)
        if sdxl != (unet.config.addition_embed_type == "text_time"):
            raise TrainingError(f"{path}: the UNet's added conditioning does not match the pipeline's text encoders")
        for module in [vae, unet, *text_encoders]:
            module.requires_grad_(False)
        return cls(path, model_index, sdxl, tokenizers, text_encoders, vae, unet, noise_scheduler, inference_scheduler)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def to(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        """Move the frozen parts; the VAE stays fp32 under fp16 when its config asks (SDXL's overflows in fp16)."""
        vae_dtype = torch.float32 if weight_dtype == torch.float16 and self.vae.config.get("force_upcast", True) else weight_dtype
        move(self.vae, device, vae_dtype)
        for encoder in self.text_encoders:
            move(encoder, device, weight_dtype)
        move(self.unet, device, weight_dtype)

    @torch.no_grad()
    def encode_prompts(self, captions: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text conditioning of ``captions``: the UNet's context, and SDXL's pooled embedding (None otherwise)."""
        contexts = []
        pooled = None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            ids = tokenizer(
                captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
            ).input_ids.to(device)
            output = encoder(ids, output_hidden_states=self.sdxl)
            if self.sdxl:
                contexts.append(output.hidden_states[-2])  # SDXL reads the penultimate layer of both encoders
                pooled = output[0]  # the projected pooled embedding of the (last) encoder with projection
            else:
                contexts.append(output.last_hidden_state)
        return torch.cat(contexts, dim=-1), pooled

    def added_conditions(
        self, pooled: torch.Tensor | None, batch: dict[str, Any], resolution: int, dtype: torch.dtype
    ) -> dict[str, torch.Tensor] | None:
        """SDXL's ``added_cond_kwargs``: pooled text embedding and (original size, crop top-left, target size)."""
        if not self.sdxl:
            return None
        time_ids = sdxl_time_ids(batch["original_sizes"], batch["crop_top_lefts"], resolution)
        return {"text_embeds": pooled.to(dtype), "time_ids": time_ids.to(device=pooled.device, dtype=dtype)}


def sdxl_time_ids(original_sizes: torch.Tensor, crop_top_lefts: torch.Tensor, resolution: int) -> torch.Tensor:
    """SDXL's six size/crop conditions per image, (batch, 6) on the CPU: original (height, width), the crop's
    top-left (top, left), and the target size (``resolution``, ``resolution``)."""
    target = torch.tensor([resolution, resolution]).expand(len(original_sizes), 2)
    return torch.cat([original_sizes.cpu(), crop_top_lefts.cpu(), target.to(original_sizes.dtype)], dim=1)


def move(module: nn.Module, device: torch.device | None, dtype: torch.dtype) -> None:
    """``module.to(device, dtype)``, passing the dtype only when it changes (diffusers warns on every dtype cast)."""
    if module.dtype != dtype:
        module.to(device, dtype=dtype)
    elif device is not None:
        module.to(device)
