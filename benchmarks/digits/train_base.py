"""Train the digits benchmark's base model: a tiny text-conditioned Stable Diffusion pipeline, from scratch, on CPU.

The result is an ordinary diffusers folder (``StableDiffusionPipeline.from_pretrained(folder)`` loads it offline):
a 32x32 AutoencoderKL, a UNet2DConditionModel with text cross-attention (``attn2``) in every transformer block,
a small CLIPTextModel and a generated CLIP BPE tokenizer. It is trained on the digits of the train split except
the held-out one (default 9), with captions naming the digit ("a photo of digit seven").

The recipe, in two stages (see :class:`BaseRecipe` for the numbers):

1. **Autoencoder.** The VAE maps 32x32x3 images to 8x8x4 latents (the digits are 8x8 originally). It is a plain
   convolutional codec (no attention) trained with an MSE reconstruction loss and a light KL term, then frozen.
   Like SD's VAE, which was trained on every kind of image, it is meant to encode anything later tasks show it,
   so it is trained with generic augmentations (flips, quarter turns, polarity inversion, stroke-width changes);
   the *generative* model -- the UNet and the text encoder -- only ever sees plain upright digits 0-8. The held-out
   digit is in neither's training data.
2. **Denoiser.** The UNet and the text encoder are trained jointly with the DDPM epsilon loss (min-SNR-5
   weighting), AdamW with warmup and cosine decay, an EMA of the weights, and 10% caption dropout (empty prompt)
   so that classifier-free guidance works at sampling time. The text encoder is trained with the UNet so that
   the captions' embeddings separate the ten digits (the UNet cannot reshape a frozen random text space).

The saved scheduler is DPM-Solver++ (20 steps and guidance 4 are the evaluation defaults); training scripts can
build a ``DDPMScheduler`` from the same config.

Run (measured: 15 CPU-minutes on one thread; 24 wall-minutes on the shared 2-core machine)::

    .venv/bin/python benchmarks/digits/train_base.py --out benchmarks/digits/assets/base_model --heldout 9 --seed 0

It prints progress, then the classifier's accuracy on samples of each seen digit, and writes a grid of samples
(rows = digits 0-9, including the held-out one) and a JSON record next to the folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.digits.data import (  # noqa: E402
    DEFAULT_CAPTION_TEMPLATE,
    DEFAULT_HELDOUT_DIGIT,
    STYLES,
    base_training_set,
    bold,
    caption_for,
    caption_words,
    check_digit,
    thin,
)
from benchmarks.digits.evaluate_base import (  # noqa: E402
    DEFAULT_BASE_MODEL_DIR,
    evaluate_prompt_following,
    sample_digits,
    save_image_grid,
)


@dataclass
class BaseRecipe:
    """Every number that defines the base model and its training."""

    heldout_digit: int | None = DEFAULT_HELDOUT_DIGIT
    seed: int = 0
    caption_template: str = DEFAULT_CAPTION_TEMPLATE
    model_max_length: int = 16  # room for style prompts such as "a photo of sks digit in bold style"

    # autoencoder: 32x32x3 -> 8x8x4
    vae_channels: tuple[int, ...] = (16, 32, 32)
    latent_channels: int = 4
    vae_steps: int = 1000
    vae_batch_size: int = 32
    vae_learning_rate: float = 1e-3
    vae_kl_weight: float = 1e-4  # per latent element, against the per-pixel MSE

    # text encoder (CLIP, causal), trained jointly with the UNet
    text_hidden_size: int = 64
    text_layers: int = 2
    text_heads: int = 4

    # UNet on 8x8x4 latents: a CrossAttn block at 8x8 and one at 4x4, a cross-attention mid block
    unet_channels: tuple[int, ...] = (32, 64)
    unet_layers_per_block: int = 1
    unet_heads: int = 4

    # denoiser training
    steps: int = 3000
    batch_size: int = 64
    learning_rate: float = 1e-3
    warmup_steps: int = 200
    weight_decay: float = 1e-2
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    min_snr_gamma: float | None = 5.0

    # sampling defaults (evaluation and the grid)
    guidance_scale: float = 4.0
    inference_steps: int = 20

    def validate(self) -> None:
        if self.heldout_digit is not None:
            check_digit(self.heldout_digit)
        if self.model_max_length < 8:
            raise ValueError(
                f"model_max_length must be at least 8 to hold a digit caption, got {self.model_max_length}"
            )
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.steps < 1 or self.vae_steps < 1:
            raise ValueError("steps and vae_steps must be at least 1")


# --- components -------------------------------------------------------------------------------------------------


def make_digits_tokenizer(recipe: BaseRecipe):
    """The generated CLIP BPE tokenizer: caption words, style names and the project's default prompt words."""
    from resattn_diffusion.testing import make_tokenizer

    words = caption_words(recipe.caption_template) + sorted(STYLES) + ["strokes", "mirror", "upside", "down"]
    return make_tokenizer(words, model_max_length=recipe.model_max_length)


def build_components(recipe: BaseRecipe, tokenizer) -> tuple[nn.Module, nn.Module, nn.Module]:
    """Fresh (vae, text_encoder, unet), seeded by ``recipe.seed``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(recipe.seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(recipe.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(recipe.vae_channels),
        block_out_channels=recipe.vae_channels,
        layers_per_block=1,
        latent_channels=recipe.latent_channels,
        norm_num_groups=16,
        sample_size=32,
        mid_block_add_attention=False,
    )
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.text_hidden_size,
        intermediate_size=recipe.text_hidden_size * 4,
        num_hidden_layers=recipe.text_layers,
        num_attention_heads=recipe.text_heads,
        max_position_embeddings=recipe.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text_encoder = CLIPTextModel(text_config)
    levels = len(recipe.unet_channels)
    latent_size = 32 // 2 ** (len(recipe.vae_channels) - 1)
    unet = UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=recipe.latent_channels,
        out_channels=recipe.latent_channels,
        down_block_types=("CrossAttnDownBlock2D",) * levels,
        up_block_types=("CrossAttnUpBlock2D",) * levels,
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=recipe.unet_channels,
        layers_per_block=recipe.unet_layers_per_block,
        attention_head_dim=recipe.unet_heads,  # diffusers' historical name for the number of heads
        cross_attention_dim=recipe.text_hidden_size,
        norm_num_groups=16,
    )
    return vae, text_encoder, unet


def count_parameters(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


# --- stage 1: the autoencoder -----------------------------------------------------------------------------------


def codec_augment(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Generic augmentations for the codec only: quarter turns, flips, stroke width, polarity, contrast."""
    out = np.empty_like(images)
    for index, image in enumerate(images):
        image = np.rot90(image, k=int(rng.integers(4)))
        if rng.random() < 0.5:
            image = image[:, ::-1]
        width_change = rng.random()
        if width_change < 0.2:
            image = bold(image[None])[0]
        elif width_change < 0.3:
            image = thin(image[None])[0]
        image = image * rng.uniform(0.7, 1.0)
        if rng.random() < 0.3:
            image = 1.0 - image
        out[index] = image
    return out


def train_autoencoder(
    vae: nn.Module, images: np.ndarray, recipe: BaseRecipe, log_every: int = 200
) -> dict[str, float]:
    """Train the VAE on ``images`` (grayscale ``(N, 32, 32)`` in [0, 1]) with codec augmentations, then freeze it.

    Sets ``vae.config.scaling_factor`` so that scaled latents have unit standard deviation. Returns metrics:
    reconstruction MSE (pixels in [-1, 1]) on the plain training images, the scaling factor, the seconds taken.
    """
    rng = np.random.default_rng(recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=recipe.vae_learning_rate, total_steps=recipe.vae_steps, pct_start=0.1
    )
    vae.train()
    start = time.perf_counter()
    running = 0.0
    for step in range(1, recipe.vae_steps + 1):
        batch_indices = rng.integers(0, len(images), recipe.vae_batch_size)
        batch = torch.from_numpy(codec_augment(images[batch_indices], rng))[:, None].repeat(1, 3, 1, 1) * 2.0 - 1.0
        posterior = vae.encode(batch).latent_dist
        latents = posterior.sample(generator=generator)
        reconstruction = vae.decode(latents).sample
        kl_per_element = posterior.kl().mean() / latents[0].numel()
        loss = F.mse_loss(reconstruction, batch) + recipe.vae_kl_weight * kl_per_element
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        running += loss.item()
        if step % log_every == 0 or step == recipe.vae_steps:
            elapsed = time.perf_counter() - start
            print(
                f"[vae] step {step}/{recipe.vae_steps}  loss {running / log_every:.5f}  {elapsed:.0f}s "
                f"(eta {elapsed / step * (recipe.vae_steps - step):.0f}s)",
                flush=True,
            )
            running = 0.0
    vae.eval().requires_grad_(False)

    pixels = torch.from_numpy(images)[:, None].repeat(1, 3, 1, 1) * 2.0 - 1.0
    with torch.no_grad():
        means = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in pixels.split(256)])
        reconstruction = torch.cat([vae.decode(chunk).sample for chunk in means.split(256)])
    scaling_factor = float(1.0 / means.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    return {
        "reconstruction_mse": float(F.mse_loss(reconstruction, pixels)),
        "scaling_factor": scaling_factor,
        "seconds": round(time.perf_counter() - start, 1),
    }


# --- stage 2: the denoiser --------------------------------------------------------------------------------------


class ExponentialMovingAverage:
    """EMA of a set of parameters with the usual warm-up ``decay_t = min(decay, (1 + t) / (10 + t))``."""

    def __init__(self, parameters: Iterable[nn.Parameter], decay: float) -> None:
        self.parameters = list(parameters)
        self.shadow = [parameter.detach().clone() for parameter in self.parameters]
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for shadow, parameter in zip(self.shadow, self.parameters):
            shadow.lerp_(parameter.detach(), 1.0 - decay)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange the live weights and the averaged ones (call twice to restore)."""
        for shadow, parameter in zip(self.shadow, self.parameters):
            live = parameter.detach().clone()
            parameter.copy_(shadow)
            shadow.copy_(live)


def make_pipeline(vae, text_encoder, tokenizer, unet, recipe: BaseRecipe):
    """Assemble a ``StableDiffusionPipeline`` (no safety checker) with the DPM-Solver++ sampling scheduler."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    scheduler = DPMSolverMultistepScheduler.from_config(training_noise_scheduler().config)
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def training_noise_scheduler():
    """The DDPM noise schedule of Stable Diffusion 1.x (1000 steps, scaled-linear betas, epsilon prediction)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )


def train_denoiser(
    unet: nn.Module,
    text_encoder: nn.Module,
    tokenizer,
    vae: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    recipe: BaseRecipe,
    log_every: int = 100,
    eval_every: int = 0,
    eval_samples: int = 10,
) -> dict[str, float]:
    """Train the UNet and the text encoder jointly on the frozen VAE's latents; leave the EMA weights in them.

    With ``eval_every`` > 0, the EMA model's prompt following is measured every ``eval_every`` steps on
    ``eval_samples`` samples per seen digit (slow; for finding a recipe).
    """
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import compute_snr

    generator = torch.Generator().manual_seed(recipe.seed + 1)
    noise_scheduler = training_noise_scheduler()

    pixels = torch.from_numpy(images)[:, None].repeat(1, 3, 1, 1) * 2.0 - 1.0
    with torch.no_grad():
        posteriors = [vae.encode(chunk).latent_dist for chunk in pixels.split(256)]
    latent_means = torch.cat([p.mean for p in posteriors])
    latent_stds = torch.cat([p.std for p in posteriors])
    scaling_factor = vae.config.scaling_factor

    captions = [caption_for(label, recipe.caption_template) for label in range(10)]
    caption_ids = tokenizer(
        captions + [""],
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    empty_caption = len(captions)  # row of caption_ids holding the empty prompt (the unconditional branch)
    label_tensor = torch.from_numpy(labels.astype(np.int64))

    trainable = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
    lr_schedule = get_scheduler(
        "cosine", optimizer, num_warmup_steps=recipe.warmup_steps, num_training_steps=recipe.steps
    )
    ema = ExponentialMovingAverage(trainable, recipe.ema_decay)
    unet.train()
    text_encoder.train()

    history: list[dict] = []
    start = time.perf_counter()
    running = 0.0
    for step in range(1, recipe.steps + 1):
        batch_indices = torch.randint(0, len(images), (recipe.batch_size,), generator=generator)
        latents = latent_means[batch_indices] + latent_stds[batch_indices] * torch.randn(
            latent_means[batch_indices].shape, generator=generator
        )
        latents = latents * scaling_factor
        caption_rows = label_tensor[batch_indices].clone()
        dropped = torch.rand(recipe.batch_size, generator=generator) < recipe.caption_dropout
        caption_rows[dropped] = empty_caption
        encoder_hidden_states = text_encoder(caption_ids[caption_rows])[0]

        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(
            0, noise_scheduler.config.num_train_timesteps, (recipe.batch_size,), generator=generator
        )
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(noisy_latents, timesteps, encoder_hidden_states).sample

        if recipe.min_snr_gamma is None:
            loss = F.mse_loss(prediction, noise)
        else:
            # min-SNR weighting (Hang et al., 2023) for epsilon prediction: min(SNR, gamma) / SNR.
            snr = compute_snr(noise_scheduler, timesteps)
            weights = torch.clamp(snr, max=recipe.min_snr_gamma) / snr
            per_sample = F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))
            loss = (per_sample * weights).mean()

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        lr_schedule.step()
        ema.update()
        running += loss.item()

        if step % log_every == 0 or step == recipe.steps:
            elapsed = time.perf_counter() - start
            count = log_every if step % log_every == 0 else step % log_every
            print(
                f"[unet] step {step}/{recipe.steps}  loss {running / count:.4f}  lr "
                f"{lr_schedule.get_last_lr()[0]:.2e}  {elapsed:.0f}s (eta "
                f"{elapsed / step * (recipe.steps - step):.0f}s)",
                flush=True,
            )
            running = 0.0
        if eval_every and (step % eval_every == 0) and step < recipe.steps:
            ema.swap()
            unet.eval()
            text_encoder.eval()
            report = evaluate_prompt_following(
                make_pipeline(vae, text_encoder, tokenizer, unet, recipe),
                heldout_digit=recipe.heldout_digit,
                samples_per_digit=eval_samples,
                template=recipe.caption_template,
                guidance_scale=recipe.guidance_scale,
                num_inference_steps=recipe.inference_steps,
            )
            ema.swap()
            unet.train()
            text_encoder.train()
            history.append({"step": step, "accuracy": report.overall})
            per_digit = " ".join(f"{d}:{a:.2f}" for d, a in report.per_digit.items())
            print(f"[eval] step {step}  seen-digit accuracy {report.overall:.3f}  ({per_digit})", flush=True)

    ema.swap()  # keep the averaged weights
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 1), "seconds_per_step": round(seconds / recipe.steps, 3), "history": history}


# --- the whole build --------------------------------------------------------------------------------------------


def write_slow_tokenizer_files(tokenizer_folder: Path) -> None:
    """Add ``vocab.json`` and ``merges.txt`` beside ``tokenizer.json``.

    transformers 5 saves only ``tokenizer.json``; the Python ``CLIPTokenizer`` of transformers 4.x reads the two
    classic files, so writing them keeps the shipped folder loadable there too.
    """
    model = json.loads((tokenizer_folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    (tokenizer_folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model["merges"]]
    (tokenizer_folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{merge}\n" for merge in merges), encoding="utf-8"
    )


def save_pipeline(pipeline, out: Path) -> int:
    """Save the pipeline folder atomically (a previous pipeline folder at ``out`` is replaced); return its bytes."""
    out = Path(out)
    if out.exists() and not (out / "model_index.json").is_file():
        raise FileExistsError(f"{out} exists and is not a pipeline folder; refusing to replace it")
    staging = out.with_name(out.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    pipeline.save_pretrained(str(staging), safe_serialization=True)
    write_slow_tokenizer_files(staging / "tokenizer")
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return sum(path.stat().st_size for path in out.rglob("*") if path.is_file())


def build_base_model(
    recipe: BaseRecipe,
    out: Path,
    eval_samples: int = 50,
    grid_path: Path | None = None,
    eval_every: int = 0,
    reuse_vae: Path | None = None,
) -> dict:
    """Train the base end to end, save it to ``out``, evaluate it and write the sample grid; return the record.

    ``reuse_vae``: a pipeline folder whose trained autoencoder to take instead of training one (to iterate on the
    denoiser's recipe quickly).
    """
    recipe.validate()
    torch.manual_seed(recipe.seed)
    started = time.perf_counter()
    train = base_training_set(recipe.heldout_digit)
    print(f"training on {len(train)} images of digits {train.digits} (held out: {recipe.heldout_digit})", flush=True)

    tokenizer = make_digits_tokenizer(recipe)
    vae, text_encoder, unet = build_components(recipe, tokenizer)
    parameters = {
        "vae": count_parameters(vae),
        "text_encoder": count_parameters(text_encoder),
        "unet": count_parameters(unet),
    }
    print("parameters: " + ", ".join(f"{name} {count:,}" for name, count in parameters.items()), flush=True)

    if reuse_vae is None:
        vae_metrics = train_autoencoder(vae, train.images, recipe)
    else:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(str(reuse_vae), subfolder="vae", local_files_only=True).eval()
        vae.requires_grad_(False)
        parameters["vae"] = count_parameters(vae)
        vae_metrics = {"reused_from": str(reuse_vae), "scaling_factor": vae.config.scaling_factor}
        print(f"[vae] reusing the autoencoder of {reuse_vae}", flush=True)
    if "reconstruction_mse" in vae_metrics:
        print(
            f"[vae] reconstruction MSE {vae_metrics['reconstruction_mse']:.5f}, scaling factor "
            f"{vae_metrics['scaling_factor']:.4f}",
            flush=True,
        )
    denoiser_metrics = train_denoiser(
        unet, text_encoder, tokenizer, vae, train.images, train.labels, recipe, eval_every=eval_every
    )
    pipeline = make_pipeline(vae, text_encoder, tokenizer, unet, recipe)
    train_seconds = time.perf_counter() - started
    size = save_pipeline(pipeline, out)
    print(f"saved the pipeline to {out} ({size / 1e6:.2f} MB)", flush=True)

    # Evaluate the saved folder, as every user will load it.
    from benchmarks.digits.evaluate_base import load_base_pipeline

    loaded = load_base_pipeline(out)
    report = evaluate_prompt_following(
        loaded,
        heldout_digit=recipe.heldout_digit,
        samples_per_digit=eval_samples,
        template=recipe.caption_template,
        guidance_scale=recipe.guidance_scale,
        num_inference_steps=recipe.inference_steps,
        seed=recipe.seed,
    )
    print(report.table())
    print(
        f"seen-digit accuracy {report.overall:.3f} ({report.samples_per_digit} samples per digit, "
        f"guidance {recipe.guidance_scale}, {recipe.inference_steps} steps)",
        flush=True,
    )

    grid_path = grid_path or out.with_name(out.name + "_samples.png")
    grid_samples = sample_digits(
        loaded, range(10), 10, recipe.caption_template, recipe.guidance_scale, recipe.inference_steps, seed=recipe.seed
    )
    save_image_grid([grid_samples[d] for d in range(10)], grid_path, [str(d) for d in range(10)])
    print(f"sample grid (rows = digits 0-9, held-out {recipe.heldout_digit} included): {grid_path}", flush=True)

    record = {
        "recipe": {f.name: getattr(recipe, f.name) for f in fields(recipe)},
        "parameters": parameters,
        "vae": vae_metrics,
        "denoiser": denoiser_metrics,
        "train_seconds": round(train_seconds, 1),
        "folder_bytes": size,
        "evaluation": report.as_dict(),
        "grid": str(grid_path),
    }
    record_path = out.with_name(out.name + "_report.json")
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return record


def parse_args(argv: Sequence[str] | None = None) -> tuple[BaseRecipe, argparse.Namespace]:
    defaults = BaseRecipe()
    parser = argparse.ArgumentParser(
        description="Train the tiny text-conditioned SD base model of the digits benchmark."
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_BASE_MODEL_DIR, help="pipeline folder to write")
    parser.add_argument(
        "--heldout", type=int, default=defaults.heldout_digit, help="digit left out of training (-1: none)"
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--steps", type=int, default=defaults.steps, help="denoiser training steps")
    parser.add_argument("--vae-steps", type=int, default=defaults.vae_steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--unet-channels", type=int, nargs="+", default=list(defaults.unet_channels))
    parser.add_argument("--unet-layers-per-block", type=int, default=defaults.unet_layers_per_block)
    parser.add_argument("--unet-heads", type=int, default=defaults.unet_heads)
    parser.add_argument("--text-layers", type=int, default=defaults.text_layers)
    parser.add_argument("--caption-dropout", type=float, default=defaults.caption_dropout)
    parser.add_argument(
        "--reuse-vae",
        type=Path,
        default=None,
        help="take the trained autoencoder of this pipeline folder instead of training one",
    )
    parser.add_argument("--guidance", type=float, default=defaults.guidance_scale)
    parser.add_argument("--template", default=defaults.caption_template)
    parser.add_argument("--eval-samples", type=int, default=50, help="samples per seen digit in the final evaluation")
    parser.add_argument("--eval-every", type=int, default=0, help="also evaluate during training (slow)")
    parser.add_argument("--grid", type=Path, default=None, help="sample grid PNG (default: next to --out)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    args = parser.parse_args(argv)
    recipe = BaseRecipe(
        heldout_digit=None if args.heldout < 0 else args.heldout,
        seed=args.seed,
        caption_template=args.template,
        steps=args.steps,
        vae_steps=args.vae_steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        unet_channels=tuple(args.unet_channels),
        unet_layers_per_block=args.unet_layers_per_block,
        unet_heads=args.unet_heads,
        text_layers=args.text_layers,
        caption_dropout=args.caption_dropout,
        guidance_scale=args.guidance,
    )
    return recipe, args


def main(argv: Sequence[str] | None = None) -> None:
    recipe, args = parse_args(argv)
    torch.set_num_threads(args.threads)
    record = build_base_model(
        recipe,
        args.out,
        eval_samples=args.eval_samples,
        grid_path=args.grid,
        eval_every=args.eval_every,
        reuse_vae=args.reuse_vae,
    )
    print(f"total {record['train_seconds']:.0f}s of training; record written next to {args.out}")


if __name__ == "__main__":
    main()
