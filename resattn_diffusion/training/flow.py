"""The diffusion-transformer families of the training core: SD3 (MMDiT) and Flux, trained with rectified flow.

What both share (:class:`FlowMatchingBase`), as diffusers' ``train_dreambooth_lora_sd3.py`` /
``train_dreambooth_lora_flux.py`` do it:

* latents ``x0 = (vae.encode(x).sample() - shift_factor) * scaling_factor``;
* a training position ``u`` in [0, 1) per example from ``compute_density_for_timestep_sampling``
  (``--weighting_scheme logit_normal`` with ``--logit_mean/--logit_std``, ``mode`` with ``--mode_scale``, or uniform),
  the index ``floor(u * num_train_timesteps)`` into the model scheduler's training ``timesteps`` and ``sigmas``
  (``FlowMatchEulerDiscreteScheduler``: shifted for SD3, unshifted for Flux, whose shift is dynamic at sampling);
* the interpolation ``x_t = (1 - sigma) x0 + sigma noise`` and the flow-matching target ``noise - x0`` (the
  velocity the pipelines integrate), or with ``--precondition_outputs`` (SD3's EDM-style option) the denoised
  estimate ``x_t - sigma v`` against ``x0``;
* per-example loss ``mean(w(sigma) (prediction - target)^2)`` with ``w`` from ``compute_loss_weighting_for_sd3``
  (``sigma_sqrt``: ``sigma^-2``, ``cosmap``: ``2 / (pi (1 - 2 sigma + 2 sigma^2))``, otherwise 1).

What differs (:class:`SD3Base`, :class:`FluxBase`) is how the transformer is called: SD3 takes the latents as an
image and timesteps in [0, 1000); Flux takes 2x2-packed latent tokens with their position ids, timesteps in [0, 1]
and, for guidance-distilled models (FLUX.1-dev), ``--guidance_scale`` through its guidance embedding.

Text conditioning is the pipeline's own ``encode_prompt`` (CLIP penultimate states + T5 for SD3, CLIP pooled +
T5 for Flux), so training and sampling condition identically. :meth:`FlowMatchingBase.cache_prompts` encodes the
prompts a run knows in advance (DreamBooth's instance and class prompts, the validation prompt) once and frees the
text encoders (T5-XXL alone is 4.7B parameters); text-to-image runs, whose captions vary, keep the encoders and
encode each batch.
"""

from __future__ import annotations

import gc
import importlib
import logging
from abc import ABC, abstractmethod
from argparse import Namespace
from typing import Any

import torch
from torch import nn

from .errors import TrainingError
from .models import FrozenPipelineParts, read_model_index

logger = logging.getLogger(__name__)

#: ``--weighting_scheme`` values (diffusers' names).
WEIGHTING_SCHEMES: tuple[str, ...] = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none")
#: Defaults of the flow-matching flags where the flag was not given (diffusers' values).
FLOW_DEFAULTS: dict[str, Any] = {"logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29, "guidance_scale": 3.5}
#: Flags of the UNet objective that have no meaning under rectified flow: refused on these families.
UNET_ONLY_FLAGS: dict[str, Any] = {"snr_gamma": None, "prediction_type": None, "noise_offset": 0.0}


def _flag_value(args: Namespace, name: str) -> Any:
    value = getattr(args, name, None)
    return FLOW_DEFAULTS.get(name) if value is None else value


class FlowMatchingBase(FrozenPipelineParts, ABC):
    """A frozen SD3 or Flux pipeline's parts and its rectified-flow objective (see the module docstring).

    Subclasses name their pipeline class, their text encoders and their defaults, and implement
    :meth:`encode_with_pipeline` and :meth:`predict`.
    """

    #: ``model_type`` in args.json; also what error messages call the family
    name: str = ""
    pipeline_class_name: str = ""
    transformer_class_name: str = ""
    #: text encoder / tokenizer subfolders, in the pipeline's order, and those a model may leave out
    text_components: tuple[str, ...] = ()
    optional_text_components: tuple[str, ...] = ()
    #: diffusers' defaults of the two scripts
    default_weighting_scheme: str = "none"
    default_max_sequence_length: int = 512

    def __init__(
        self,
        path: str,
        model_index: dict[str, Any],
        components: dict[str, Any],
        noise_scheduler: Any,
        inference_scheduler: Any,
    ):
        self.path = path
        self.model_index = model_index
        self.vae = components["vae"]
        self.denoiser: nn.Module = components["transformer"]
        self.text_modules: dict[str, Any] = {name: components.get(name) for name in self._text_names()}
        self.noise_scheduler = noise_scheduler
        self.inference_scheduler = inference_scheduler
        self.prompt_cache: dict[str, tuple[torch.Tensor, ...]] = {}
        self.text_encoders_freed = False
        self._text_pipeline: Any = None

    # --- which family ------------------------------------------------------------------------------------------
    @classmethod
    def matches(cls, model_index: dict[str, Any]) -> bool:
        entry = model_index.get("transformer")
        return bool(entry) and entry[1] == cls.transformer_class_name

    @classmethod
    def _text_names(cls) -> list[str]:
        names = []
        for suffix in cls.text_components:
            names += [f"text_encoder{suffix}", f"tokenizer{suffix}"]
        return names

    @classmethod
    def check_args(cls, args: Namespace) -> None:
        """Refuse flags that have no meaning for this family, before anything loads."""
        for flag, neutral in UNET_ONLY_FLAGS.items():
            if getattr(args, flag, neutral) not in (neutral, None):
                raise TrainingError(
                    f"--{flag} belongs to the UNet's noise-prediction objective; {cls.name} trains with rectified "
                    "flow. Drop it (use --weighting_scheme to weight timesteps)"
                )
        if getattr(args, "enable_xformers_memory_efficient_attention", False):
            raise TrainingError(
                f"--enable_xformers_memory_efficient_attention is for UNets; {cls.name}'s joint attention runs "
                "PyTorch SDPA (drop the flag)"
            )
        length = getattr(args, "max_sequence_length", None)
        if length is not None and not 1 <= length <= 512:
            raise TrainingError(f"--max_sequence_length {length}: T5 takes 1 to 512 tokens in the {cls.name} pipeline")

    @classmethod
    def native_resolution(cls, args: Namespace) -> int:
        from diffusers import AutoencoderKL

        vae_config = AutoencoderKL.load_config(
            args.pretrained_model_name_or_path, subfolder="vae", revision=args.revision, cache_dir=args.cache_dir
        )
        return cls.default_sample_size(args) * 2 ** (len(vae_config["block_out_channels"]) - 1)

    @classmethod
    def default_sample_size(cls, args: Namespace) -> int:
        return 128  # the pipelines' default latent size without a transformer config that says otherwise

    # --- loading -----------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, args: Namespace, weight_dtype: torch.dtype | None = None) -> FlowMatchingBase:
        """Load every component from ``args.pretrained_model_name_or_path`` (revision, variant, VAE override); the
        transformer and text encoders directly in ``weight_dtype``, so a bf16 run never holds Flux's 12B parameters
        (or T5-XXL's 4.7B) in float32."""
        import diffusers
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

        path, revision, variant, cache_dir = (
            args.pretrained_model_name_or_path,
            args.revision,
            args.variant,
            args.cache_dir,
        )
        model_index = read_model_index(path, revision, cache_dir)
        components: dict[str, Any] = {}
        for name in ["transformer", *cls._text_names()]:
            entry = model_index.get(name)
            if not entry or entry[1] is None:
                if not any(name.endswith(suffix) and suffix for suffix in cls.optional_text_components):
                    raise TrainingError(
                        f"{path}: model_index.json has no {name}; pass the folder of a whole {cls.name} pipeline"
                    )
                components[name] = None  # SD3 runs without T5 (zeros in its place), as its pipeline does
                continue
            library, class_name = entry
            component_class = getattr(importlib.import_module(library), class_name)
            kwargs: dict[str, Any] = {"subfolder": name, "revision": revision, "cache_dir": cache_dir}
            if not name.startswith("tokenizer"):
                kwargs.update(variant=variant, torch_dtype=weight_dtype)
            components[name] = component_class.from_pretrained(path, **kwargs)
        if args.pretrained_vae_model_name_or_path is not None:
            components["vae"] = AutoencoderKL.from_pretrained(
                args.pretrained_vae_model_name_or_path, cache_dir=cache_dir
            )
        else:
            components["vae"] = AutoencoderKL.from_pretrained(
                path, subfolder="vae", revision=revision, variant=variant, cache_dir=cache_dir
            )
        noise_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(
            path, subfolder="scheduler", revision=revision, cache_dir=cache_dir
        )
        inference_scheduler = getattr(diffusers, model_index["scheduler"][1]).from_pretrained(
            path, subfolder="scheduler", revision=revision, cache_dir=cache_dir
        )
        for module in [components["vae"], components["transformer"], *cls._encoders(components)]:
            module.requires_grad_(False)
        base = cls(path, model_index, components, noise_scheduler, inference_scheduler)
        base.check_loaded(args)
        return base

    @classmethod
    def _encoders(cls, components: dict[str, Any]) -> list[nn.Module]:
        return [
            components[name]
            for name in cls._text_names()
            if name.startswith("text_encoder") and components.get(name) is not None
        ]

    def check_loaded(self, args: Namespace) -> None:
        """Checks that need the loaded models (a subclass adds its own)."""
        latent_channels = self.vae.config.latent_channels
        expected = self.latent_channels_expected()
        if latent_channels != expected:
            raise TrainingError(
                f"{self.path}: the VAE has {latent_channels} latent channels but the transformer takes {expected}"
            )

    def latent_channels_expected(self) -> int:
        return self.denoiser.config.in_channels

    @property
    def text_encoders(self) -> list[nn.Module]:
        return [
            module
            for name, module in self.text_modules.items()
            if name.startswith("text_encoder") and module is not None
        ]

    @property
    def resolution_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE factor times the 2x2 patches of both transformers."""
        return self.vae_scale_factor * 2

    def max_sequence_length(self, args: Namespace) -> int:
        value = getattr(args, "max_sequence_length", None)
        return self.default_max_sequence_length if value is None else value

    def weighting_scheme(self, args: Namespace) -> str:
        return getattr(args, "weighting_scheme", None) or self.default_weighting_scheme

    # --- text -------------------------------------------------------------------------------------------------
    def text_pipeline(self) -> Any:
        """The family's diffusers pipeline holding only the text encoders and tokenizers, for ``encode_prompt``."""
        import diffusers

        if self._text_pipeline is None:
            pipeline_class = getattr(diffusers, self.pipeline_class_name)
            # the transformer only lends its config (SD3 without T5 pads with zeros of its context width)
            self._text_pipeline = pipeline_class(
                transformer=self.denoiser, scheduler=None, vae=None, **self.text_modules
            )
        return self._text_pipeline

    @abstractmethod
    def encode_with_pipeline(
        self, pipeline: Any, prompts: list[str], device: torch.device, args: Namespace
    ) -> tuple[torch.Tensor, ...]:
        """``(context, pooled)`` of ``prompts`` from the pipeline's own ``encode_prompt``."""

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device: torch.device, args: Namespace) -> tuple[torch.Tensor, ...]:
        """The text conditioning of ``prompts`` (one row each): from the cache if it holds them all, else from
        the text encoders."""
        if all(prompt in self.prompt_cache for prompt in prompts):
            rows = [self.prompt_cache[prompt] for prompt in prompts]
            return tuple(torch.cat(parts, dim=0).to(device) for parts in zip(*rows))
        if self.text_encoders_freed:
            missing = next(prompt for prompt in prompts if prompt not in self.prompt_cache)
            raise TrainingError(f"prompt {missing!r} was not encoded before the text encoders were freed")
        return self.encode_with_pipeline(self.text_pipeline(), list(prompts), device, args)

    @torch.no_grad()
    def cache_prompts(self, prompts: list[str], device: torch.device, args: Namespace) -> None:
        """Encode ``prompts`` once, keep the embeddings, and free the text encoders (they are not trained)."""
        todo = [prompt for prompt in dict.fromkeys(prompts) if prompt not in self.prompt_cache]
        if todo:
            encoded = self.encode_with_pipeline(self.text_pipeline(), todo, device, args)
            for prompt, row in zip(todo, zip(*encoded)):
                self.prompt_cache[prompt] = tuple(part.unsqueeze(0) for part in row)
        for name in self.text_modules:
            if name.startswith("text_encoder"):
                self.text_modules[name] = None
        self._text_pipeline = None
        self.text_encoders_freed = True
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        logger.info("%d prompt(s) encoded once; the text encoders are freed", len(self.prompt_cache))

    # --- the objective ------------------------------------------------------------------------------------------
    def per_example_loss(
        self,
        args: Namespace,
        denoiser: nn.Module,
        batch: dict[str, Any],
        resolution: int,
        weight_dtype: torch.dtype,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """The rectified-flow loss of each example of ``batch`` (shape (N,)); see the module docstring."""
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        device = generator.device
        with torch.no_grad():
            pixels = batch["pixel_values"].to(device, dtype=self.vae.dtype)
            latents = self.vae.encode(pixels).latent_dist.sample(generator=generator)
            shift = self.vae.config.get("shift_factor") or 0.0
            latents = ((latents - shift) * self.vae.config.scaling_factor).to(weight_dtype)
            conditioning = [part.to(weight_dtype) for part in self.encode_prompts(batch["captions"], device, args)]

        noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
        scheme = self.weighting_scheme(args)
        timesteps, sigmas = self.sample_timesteps(args, latents.shape[0], generator)
        sigmas = sigmas.to(latents.dtype).view(-1, 1, 1, 1)
        noisy = (1.0 - sigmas) * latents + sigmas * noise

        prediction = self.predict(denoiser, noisy, timesteps, conditioning, args).float()
        if getattr(args, "precondition_outputs", False):
            prediction = noisy.float() - sigmas.float() * prediction  # the denoised estimate x_t - sigma v
            target = latents.float()
        else:
            target = (noise - latents).float()
        weighting = compute_loss_weighting_for_sd3(weighting_scheme=scheme, sigmas=sigmas).float()
        return (weighting * (prediction - target) ** 2).reshape(latents.shape[0], -1).mean(dim=1)

    def sample_timesteps(
        self, args: Namespace, batch_size: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training ``(timesteps, sigmas)`` of shape (N,): ``u`` from ``--weighting_scheme``'s density, then the
        scheduler's training schedule at index ``floor(u * num_train_timesteps)``."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        device = generator.device
        u = compute_density_for_timestep_sampling(
            weighting_scheme=self.weighting_scheme(args),
            batch_size=batch_size,
            logit_mean=_flag_value(args, "logit_mean"),
            logit_std=_flag_value(args, "logit_std"),
            mode_scale=_flag_value(args, "mode_scale"),
            device=device,
            generator=generator,
        )
        scheduler = self.noise_scheduler
        count = scheduler.config.num_train_timesteps
        indices = (u * count).long().clamp(0, count - 1).cpu()  # a logit-normal u can round to 1.0 in float32
        return scheduler.timesteps[indices].to(device), scheduler.sigmas[indices].to(device)

    @abstractmethod
    def predict(
        self,
        denoiser: nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        conditioning: list[torch.Tensor],
        args: Namespace,
    ) -> torch.Tensor:
        """The transformer's velocity for ``noisy`` latents (B, C, H, W), in the same layout."""

    # --- sampling ------------------------------------------------------------------------------------------------
    def inference_pipeline(self, denoiser: nn.Module) -> Any:
        """The stock pipeline around the frozen parts and ``denoiser`` (text encoders absent once freed)."""
        import diffusers

        pipeline_class = getattr(diffusers, self.pipeline_class_name)
        pipeline = pipeline_class(
            transformer=denoiser, scheduler=self.inference_scheduler, vae=self.vae, **self.text_modules
        )
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def validation_kwargs(self, args: Namespace, device: torch.device) -> dict[str, Any]:
        """Pipeline call arguments for ``args.validation_prompt``: cached embeddings once the encoders are freed."""
        kwargs: dict[str, Any] = {"max_sequence_length": self.max_sequence_length(args)}
        if not self.text_encoders_freed:
            return {**kwargs, "prompt": args.validation_prompt}
        return {**kwargs, **self.embedding_kwargs(args.validation_prompt, device, args)}

    def validation_prompts(self, args: Namespace) -> list[str]:
        """Prompts validation needs encoded when the text encoders are freed."""
        return [args.validation_prompt] if args.validation_prompt else []

    @abstractmethod
    def embedding_kwargs(self, prompt: str, device: torch.device, args: Namespace) -> dict[str, Any]:
        """Pipeline call arguments that give ``prompt`` as cached embeddings."""


class SD3Base(FlowMatchingBase):
    """Stable Diffusion 3 / 3.5: ``SD3Transformer2DModel``, CLIP-L + CLIP-G + T5 (optional) text encoders."""

    name = "sd3"
    pipeline_class_name = "StableDiffusion3Pipeline"
    transformer_class_name = "SD3Transformer2DModel"
    text_components = ("", "_2", "_3")
    optional_text_components = ("_3",)  # SD3 without T5, as its pipeline allows
    default_weighting_scheme = "logit_normal"  # train_dreambooth_lora_sd3.py's default
    default_max_sequence_length = 77  # train_dreambooth_lora_sd3.py's default

    @classmethod
    def check_args(cls, args: Namespace) -> None:
        super().check_args(args)
        if getattr(args, "guidance_scale", None) is not None:
            raise TrainingError("--guidance_scale feeds Flux's guidance embedding; SD3 has none (drop the flag)")

    @classmethod
    def default_sample_size(cls, args: Namespace) -> int:
        from diffusers import SD3Transformer2DModel

        config = SD3Transformer2DModel.load_config(
            args.pretrained_model_name_or_path,
            subfolder="transformer",
            revision=args.revision,
            cache_dir=args.cache_dir,
        )
        return int(config["sample_size"])

    @property
    def resolution_multiple(self) -> int:
        return self.vae_scale_factor * self.denoiser.config.patch_size

    def encode_with_pipeline(
        self, pipeline: Any, prompts: list[str], device: torch.device, args: Namespace
    ) -> tuple[torch.Tensor, ...]:
        context, _, pooled, _ = pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length(args),
        )
        return context, pooled

    def predict(
        self,
        denoiser: nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        conditioning: list[torch.Tensor],
        args: Namespace,
    ) -> torch.Tensor:
        context, pooled = conditioning
        return denoiser(
            hidden_states=noisy,
            timestep=timesteps,
            encoder_hidden_states=context,
            pooled_projections=pooled,
            return_dict=False,
        )[0]

    def validation_prompts(self, args: Namespace) -> list[str]:
        return super().validation_prompts(args) + (
            [""] if args.validation_prompt else []
        )  # "" for classifier-free guidance

    def embedding_kwargs(self, prompt: str, device: torch.device, args: Namespace) -> dict[str, Any]:
        context, pooled = self.encode_prompts([prompt], device, args)
        negative, negative_pooled = self.encode_prompts([""], device, args)
        return {
            "prompt_embeds": context,
            "pooled_prompt_embeds": pooled,
            "negative_prompt_embeds": negative,
            "negative_pooled_prompt_embeds": negative_pooled,
        }


class FluxBase(FlowMatchingBase):
    """Flux: ``FluxTransformer2DModel`` on 2x2-packed latents, CLIP (pooled) + T5 text encoders, guidance embedding."""

    name = "flux"
    pipeline_class_name = "FluxPipeline"
    transformer_class_name = "FluxTransformer2DModel"
    text_components = ("", "_2")
    default_weighting_scheme = "none"  # train_dreambooth_lora_flux.py's default
    default_max_sequence_length = 512

    def check_loaded(self, args: Namespace) -> None:
        super().check_loaded(args)
        if getattr(args, "guidance_scale", None) is not None and not self.denoiser.config.guidance_embeds:
            raise TrainingError(
                f"--guidance_scale: {self.path}'s transformer has no guidance embedding (FLUX.1-schnell-like); drop "
                "the flag"
            )

    def latent_channels_expected(self) -> int:
        return self.denoiser.config.in_channels // 4  # 2x2 patches are packed into channels

    def guidance(self, args: Namespace) -> float:
        return float(_flag_value(args, "guidance_scale"))

    def encode_with_pipeline(
        self, pipeline: Any, prompts: list[str], device: torch.device, args: Namespace
    ) -> tuple[torch.Tensor, ...]:
        context, pooled, _ = pipeline.encode_prompt(
            prompt=prompts, prompt_2=None, device=device, max_sequence_length=self.max_sequence_length(args)
        )
        return context, pooled

    def predict(
        self,
        denoiser: nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        conditioning: list[torch.Tensor],
        args: Namespace,
    ) -> torch.Tensor:
        from diffusers import FluxPipeline

        context, pooled = conditioning
        batch, channels, height, width = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, batch, channels, height, width)
        # position ids and text ids exactly as FluxPipeline builds them for sampling
        image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, noisy.device, noisy.dtype)
        text_ids = torch.zeros(context.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        guidance = None
        if self.denoiser.config.guidance_embeds:  # self.denoiser: ``denoiser`` may be wrapped by accelerate
            guidance = torch.full((batch,), self.guidance(args), device=noisy.device, dtype=torch.float32)
        velocity = denoiser(
            hidden_states=packed,
            timestep=timesteps / 1000,  # Flux's transformer scales timesteps by 1000 itself
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=context,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        return FluxPipeline._unpack_latents(
            velocity, height * self.vae_scale_factor, width * self.vae_scale_factor, self.vae_scale_factor
        )

    def validation_kwargs(self, args: Namespace, device: torch.device) -> dict[str, Any]:
        kwargs = super().validation_kwargs(args, device)
        if self.denoiser.config.guidance_embeds:
            kwargs["guidance_scale"] = self.guidance(args)
        return kwargs

    def embedding_kwargs(self, prompt: str, device: torch.device, args: Namespace) -> dict[str, Any]:
        context, pooled = self.encode_prompts([prompt], device, args)
        return {"prompt_embeds": context, "pooled_prompt_embeds": pooled}
