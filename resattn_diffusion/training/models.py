"""The frozen base model of the UNet family: loading SD 1.x / 2.x / SDXL components, text conditioning, the
noise-prediction objective, and the UNet with its tuner.

SDXL is recognised from the model folder (a second text encoder in ``model_index.json``). Its UNet then gets the
concatenated penultimate hidden states of both text encoders as context, and ``added_cond_kwargs`` with the
pooled embedding of the second encoder and the six size/crop ``time_ids`` of each image.

Every model family the training core knows (this one, and SD3 / Flux in :mod:`.flow`) has the shape of
:class:`DenoiserFamily`; :mod:`.families` picks one from the model folder.
"""

from __future__ import annotations

from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from .errors import TrainingError
from .objective import prediction_target

#: Flags of the rectified-flow objective (SD3 / Flux); refused on the UNet family when given.
FLOW_ONLY_FLAGS: tuple[str, ...] = (
    "weighting_scheme",
    "logit_mean",
    "logit_std",
    "mode_scale",
    "guidance_scale",
    "max_sequence_length",
    "precondition_outputs",
)


class DenoiserFamily(Protocol):
    """What the training core needs of a model family (SD 1.x/2.x/XL UNets here, SD3 and Flux transformers in
    :mod:`.flow`): the loaded frozen parts, their text conditioning, the training objective and a sampling pipeline.

    The loop never asks which family it has: it calls these. Class-level methods work before anything loads.
    """

    #: "sd", "sdxl", "sd3", "flux": written to args.json as ``model_type``
    name: str
    path: str
    #: the network the tuner goes on (a UNet2DConditionModel or a diffusion transformer)
    denoiser: nn.Module
    vae: nn.Module

    @classmethod
    def matches(cls, model_index: dict[str, Any]) -> bool:
        """Whether a pipeline's ``model_index.json`` belongs to this family."""

    @classmethod
    def check_args(cls, args: Namespace) -> None:
        """Refuse flags without meaning for this family (TrainingError), before anything loads."""

    @classmethod
    def native_resolution(cls, args: Namespace) -> int:
        """The image size the model was trained at, from its configs only."""

    @classmethod
    def load(cls, args: Namespace, weight_dtype: torch.dtype | None = None) -> DenoiserFamily:
        """Load the frozen components (``requires_grad`` off) from ``args.pretrained_model_name_or_path``; the
        denoiser and text encoders directly in ``weight_dtype`` (no full-precision copy of a 12B model in memory)."""

    @property
    def resolution_multiple(self) -> int:
        """Training image sides must be multiples of this."""

    def to(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        """Move the frozen parts to ``device`` in the training precision."""

    def cache_prompts(self, prompts: list[str], device: torch.device, args: Namespace) -> None:
        """A run whose prompts are all known (DreamBooth): encode them now; a family may then free its text
        encoders."""

    def validation_prompts(self, args: Namespace) -> list[str]:
        """The prompts validation will need encoded."""

    def per_example_loss(
        self,
        args: Namespace,
        denoiser: nn.Module,
        batch: dict[str, Any],
        resolution: int,
        weight_dtype: torch.dtype,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """The training loss of each example of ``batch`` (N,), all randomness from ``generator``."""

    def inference_pipeline(self, denoiser: nn.Module) -> Any:
        """A stock diffusers pipeline around the frozen parts and ``denoiser`` (for validation images)."""

    def validation_kwargs(self, args: Namespace, device: torch.device) -> dict[str, Any]:
        """The pipeline call arguments that give ``args.validation_prompt``."""


def read_model_index(path: str, revision: str | None = None, cache_dir: str | None = None) -> dict[str, Any]:
    """The pipeline's ``model_index.json`` (component classes); a clear error if there is none."""
    from diffusers import DiffusionPipeline

    if Path(path).is_dir() and not (Path(path) / "model_index.json").is_file():
        raise TrainingError(
            f"--pretrained_model_name_or_path {path!r} is a folder without model_index.json; pass the folder of a "
            "whole diffusers pipeline (with unet/, vae/, text_encoder/, tokenizer/, scheduler/)"
        )
    try:
        return dict(DiffusionPipeline.load_config(path, revision=revision, cache_dir=cache_dir))
    except (OSError, ValueError) as err:
        raise TrainingError(
            f"cannot read the base model {path!r}: {err}. Pass a local diffusers pipeline folder, or a hub id on a "
            "machine that can reach the hub"
        ) from None


def unet_native_resolution(args: Any) -> int:
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


class FrozenPipelineParts:
    """What every training family does alike with its frozen VAE, text encoders and denoiser (a subclass provides
    ``vae``, ``text_encoders`` and ``denoiser``)."""

    vae: nn.Module
    text_encoders: list[nn.Module]
    denoiser: nn.Module

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def to(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        """Move the frozen parts; the VAE stays fp32 under fp16 when its config asks (SDXL's overflows in fp16)."""
        vae_dtype = (
            torch.float32
            if weight_dtype == torch.float16 and self.vae.config.get("force_upcast", True)
            else weight_dtype
        )
        move(self.vae, device, vae_dtype)
        for encoder in self.text_encoders:
            move(encoder, device, weight_dtype)
        move(self.denoiser, device, weight_dtype)


@dataclass
class StableDiffusionBase(FrozenPipelineParts):
    """The frozen components of a Stable Diffusion 1.x / 2.x / SDXL pipeline that training needs (the UNet family
    of :class:`DenoiserFamily`), trained on noise (or velocity) prediction."""

    path: str
    model_index: dict[str, Any]
    sdxl: bool
    tokenizers: list[Any]
    text_encoders: list[nn.Module]
    vae: nn.Module
    denoiser: nn.Module
    noise_scheduler: Any
    #: the model's own sampling scheduler (for validation images)
    inference_scheduler: Any

    @property
    def name(self) -> str:
        return "sdxl" if self.sdxl else "sd"

    @property
    def unet(self) -> nn.Module:
        return self.denoiser

    @classmethod
    def matches(cls, model_index: dict[str, Any]) -> bool:
        entry = model_index.get("unet")
        return bool(entry) and entry[0] is not None

    @classmethod
    def check_args(cls, args: Namespace) -> None:
        # "is not": a given 0.0 (--logit_mean 0) is a given flag, though it equals False
        given = [
            flag
            for flag in FLOW_ONLY_FLAGS
            if getattr(args, flag, None) is not None and getattr(args, flag) is not False
        ]
        if given:
            raise TrainingError(
                f"--{given[0]} belongs to rectified-flow training of SD3 / Flux; {args.pretrained_model_name_or_path} "
                "is a UNet model trained on noise prediction (drop the flag; --snr_gamma weights its timesteps)"
            )

    @classmethod
    def native_resolution(cls, args: Namespace) -> int:
        return unet_native_resolution(args)

    @property
    def resolution_multiple(self) -> int:
        return self.vae_scale_factor

    def cache_prompts(self, prompts: list[str], device: torch.device, args: Namespace) -> None:
        """Nothing: SD's text encoders are small next to the UNet and stay loaded; each batch is encoded."""

    def validation_prompts(self, args: Namespace) -> list[str]:
        return [args.validation_prompt] if args.validation_prompt else []

    @classmethod
    def load(cls, args: Any, weight_dtype: torch.dtype | None = None) -> StableDiffusionBase:
        """Load every component from ``args.pretrained_model_name_or_path`` (+ revision, variant, VAE override); the
        UNet and text encoders in ``weight_dtype`` (default: as saved, float32 for these models)."""
        import diffusers
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer

        path, revision, variant, cache_dir = (
            args.pretrained_model_name_or_path,
            args.revision,
            args.variant,
            args.cache_dir,
        )
        model_index = read_model_index(path, revision, cache_dir)
        sdxl = is_sdxl(model_index)
        suffixes = ["", "_2"] if sdxl else [""]
        tokenizers = [
            AutoTokenizer.from_pretrained(path, subfolder=f"tokenizer{s}", revision=revision, cache_dir=cache_dir)
            for s in suffixes
        ]
        text_encoders = [
            _text_encoder_class(path, f"text_encoder{s}", revision, cache_dir).from_pretrained(
                path,
                subfolder=f"text_encoder{s}",
                revision=revision,
                variant=variant,
                cache_dir=cache_dir,
                torch_dtype=weight_dtype,
            )
            for s in suffixes
        ]
        if args.pretrained_vae_model_name_or_path is not None:
            vae = AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path, cache_dir=cache_dir)
        else:
            vae = AutoencoderKL.from_pretrained(
                path, subfolder="vae", revision=revision, variant=variant, cache_dir=cache_dir
            )
        unet = UNet2DConditionModel.from_pretrained(
            path, subfolder="unet", revision=revision, variant=variant, cache_dir=cache_dir, torch_dtype=weight_dtype
        )
        noise_scheduler = DDPMScheduler.from_pretrained(
            path, subfolder="scheduler", revision=revision, cache_dir=cache_dir
        )
        inference_scheduler_class = getattr(diffusers, model_index["scheduler"][1])
        inference_scheduler = inference_scheduler_class.from_pretrained(
            path, subfolder="scheduler", revision=revision, cache_dir=cache_dir
        )
        if args.prediction_type is not None:
            noise_scheduler.register_to_config(prediction_type=args.prediction_type)
            inference_scheduler.register_to_config(prediction_type=args.prediction_type)
        if sdxl != (unet.config.addition_embed_type == "text_time"):
            raise TrainingError(f"{path}: the UNet's added conditioning does not match the pipeline's text encoders")
        for module in [vae, unet, *text_encoders]:
            module.requires_grad_(False)
        return cls(path, model_index, sdxl, tokenizers, text_encoders, vae, unet, noise_scheduler, inference_scheduler)

    @torch.no_grad()
    def encode_prompts(self, captions: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text conditioning of ``captions``: the UNet's context, and SDXL's pooled embedding (None otherwise)."""
        contexts = []
        pooled = None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            ids = tokenizer(
                captions,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
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

    def per_example_loss(
        self,
        args: Namespace,
        denoiser: nn.Module,
        batch: dict[str, Any],
        resolution: int,
        weight_dtype: torch.dtype,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """The denoising loss of each example (MSE against the noise or velocity; Min-SNR weighted with
        ``--snr_gamma``)."""
        import torch.nn.functional as F

        device = generator.device
        scheduler = self.noise_scheduler
        with torch.no_grad():
            pixels = batch["pixel_values"].to(device, dtype=self.vae.dtype)
            latents = self.vae.encode(pixels).latent_dist.sample(generator=generator)
            latents = (latents * self.vae.config.scaling_factor).to(weight_dtype)
            context, pooled = self.encode_prompts(batch["captions"], device)
        context = context.to(weight_dtype)
        added_conditions = self.added_conditions(pooled, batch, resolution, weight_dtype)

        noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
        if args.noise_offset:
            offset = torch.randn(
                (latents.shape[0], latents.shape[1], 1, 1), generator=generator, device=device, dtype=latents.dtype
            )
            noise = noise + args.noise_offset * offset
        timesteps = torch.randint(
            0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator, device=device
        )
        noisy_latents = scheduler.add_noise(latents, noise, timesteps)
        prediction_type = scheduler.config.prediction_type
        if prediction_type not in ("epsilon", "v_prediction"):  # Min-SNR weighting below knows these two
            raise TrainingError(
                f"the model's scheduler predicts {prediction_type!r}; pass --prediction_type epsilon or v_prediction"
            )
        target = prediction_target(scheduler, latents, noise, timesteps)

        prediction = denoiser(
            noisy_latents, timesteps, context, added_cond_kwargs=added_conditions, return_dict=False
        )[0]
        per_example = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if args.snr_gamma is not None:
            from diffusers.training_utils import compute_snr

            snr = compute_snr(scheduler, timesteps)
            clipped = torch.clamp(snr, max=args.snr_gamma)  # min(SNR, gamma)
            if prediction_type == "epsilon":
                # min(SNR, gamma) / SNR -> 1 as SNR -> 0: the last timestep of a zero-terminal-SNR schedule
                # (rescale_betas_zero_snr) gets that limit, not 0 / 0 = NaN
                safe = snr.clamp(min=torch.finfo(snr.dtype).tiny)
                weights = torch.where(snr > 0, clipped / safe, torch.ones_like(snr))
            else:
                weights = clipped / (snr + 1)
            per_example = per_example * weights
        return per_example

    def inference_pipeline(self, denoiser: nn.Module) -> Any:
        """A stock SD / SDXL pipeline around the frozen components and ``denoiser`` (with its tuner), using the
        model's own inference scheduler. No safety checker is loaded for validation images."""
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        scheduler = self.inference_scheduler
        if self.sdxl:
            pipeline = StableDiffusionXLPipeline(
                vae=self.vae,
                text_encoder=self.text_encoders[0],
                text_encoder_2=self.text_encoders[1],
                tokenizer=self.tokenizers[0],
                tokenizer_2=self.tokenizers[1],
                unet=denoiser,
                scheduler=scheduler,
            )
        else:
            pipeline = StableDiffusionPipeline(
                vae=self.vae,
                text_encoder=self.text_encoders[0],
                tokenizer=self.tokenizers[0],
                unet=denoiser,
                scheduler=scheduler,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def validation_kwargs(self, args: Namespace, device: torch.device) -> dict[str, Any]:
        return {"prompt": args.validation_prompt}


#: The name this class had before the transformer families arrived.
BaseModel = StableDiffusionBase


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
