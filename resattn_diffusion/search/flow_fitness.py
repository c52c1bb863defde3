"""The search's fitness on a diffusion transformer (SD3, Flux): the held-out rectified-flow loss at fixed timesteps
and noise, the counterpart of :class:`~.evolution.DenoisingFitness` for a UNet.

For held-out latents ``x`` (the VAE posterior mean, shifted and scaled as in training), noise ``n`` drawn once from
the seed and the training schedule's sigmas ``s`` at evenly spread (or given) timesteps -- timesteps in [0, 1000)
as on a UNet, each taken at the schedule's nearest entry --, the fitness of the active
configuration is ``mean over (sample, timestep) of || v(x_s, t) - (n - x) ||^2`` with ``x_s = (1 - s) x + s n``:
the training objective without its timestep weighting (the same for every configuration) and without randomness,
so one configuration always scores the same. The transformer is called as the training scripts call it (the
family's :meth:`~resattn_diffusion.training.flow.FlowMatchingBase.predict`: Flux's packed latents, position ids and
guidance).
"""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Sequence
from typing import Any

import torch

from ..training.flow import FlowMatchingBase
from .evolution import DenoisingFitness, check_search_settings, held_out_mean_squared_error


class FlowMatchingFitness:
    """Held-out rectified-flow loss of ``base.denoiser`` (a loaded SD3 / Flux family) at fixed timesteps and noise.

    ``latents`` (N, C, H, W) and ``conditioning`` (the family's text conditioning, one row per latent) are the
    held-out set, encoded once; ``args`` carries the family's flags (Flux's guidance, T5's sequence length).
    """

    def __init__(
        self,
        base: FlowMatchingBase,
        args: Namespace,
        latents: torch.Tensor,
        conditioning: Sequence[torch.Tensor],
        *,
        timesteps: int | Sequence[int] = 4,
        seed: int = 0,
        batch_size: int = 8,
    ):
        check_search_settings(timesteps=timesteps, seed=seed, batch_size=batch_size)
        count = latents.shape[0]
        for part in conditioning:
            if part.shape[0] != count:
                raise ValueError(f"{count} latents but conditioning with {part.shape[0]} rows; give one per latent")
        self.base, self.args, self.batch_size = base, args, int(batch_size)
        scheduler = base.noise_scheduler
        self.timesteps = DenoisingFitness.fixed_timesteps(timesteps, scheduler.config.num_train_timesteps)
        # every (sample, timestep) pair, sample-major, with its own noise drawn once from the seed
        pairs = len(self.timesteps)
        clean = latents.detach().float().cpu().repeat_interleave(pairs, dim=0)
        noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float32)
        # a timestep t means the same as on a UNet (the noise level grows with t in [0, 1000)): the training
        # schedule's entry nearest t (the flow schedule runs downwards from 1000 and, shifted, is not linear)
        schedule = scheduler.timesteps.float()
        nearest = [int((schedule - t).abs().argmin()) for t in self.timesteps]
        indices = torch.tensor(nearest, dtype=torch.long).repeat(count)
        sigmas = scheduler.sigmas[indices].float().view(-1, 1, 1, 1)
        self.noisy = (1.0 - sigmas) * clean + sigmas * noise
        self.targets = noise - clean
        self.steps = scheduler.timesteps[indices].float()
        self.conditioning = [part.detach().cpu().repeat_interleave(pairs, dim=0) for part in conditioning]

    def __len__(self) -> int:
        return self.noisy.shape[0]

    def __call__(self) -> float:
        def predict(start: int, stop: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
            return self.base.predict(
                self.base.denoiser,
                self.noisy[start:stop].to(device=device, dtype=dtype),
                self.steps[start:stop].to(device),
                [part[start:stop].to(device=device, dtype=dtype) for part in self.conditioning],
                self.args,
            )

        return held_out_mean_squared_error(self.base.denoiser, predict, self.targets, self.batch_size)


def flow_flags(pretrained_model_name_or_path: str, **flags: Any) -> Namespace:
    """The training flags a flow family's ``load``, ``predict`` and text encoding read, at the training scripts'
    defaults (T5's sequence length, Flux's guidance, ...), ``flags`` overriding them."""
    defaults = dict(
        revision=None,
        variant=None,
        cache_dir=None,
        pretrained_vae_model_name_or_path=None,
        max_sequence_length=None,
        guidance_scale=None,
        weighting_scheme=None,
    )
    return Namespace(pretrained_model_name_or_path=pretrained_model_name_or_path, **{**defaults, **flags})


@torch.no_grad()
def encode_flow_held_out(
    base: FlowMatchingBase,
    args: Namespace,
    pixels: torch.Tensor,
    captions: Sequence[str],
    device: torch.device,
    batch_size: int,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Latents (the VAE posterior mean, ``(mean - shift) * scale`` as training scales its samples: deterministic)
    of ``pixels`` (N, 3, H, W in [-1, 1]) and the family's text conditioning of ``captions``, on the CPU. The
    captions are encoded once and the text encoders freed (``cache_prompts``, as DreamBooth training does): the
    search never needs them again."""
    vae = base.vae
    shift = vae.config.get("shift_factor") or 0.0
    latents = []
    for start in range(0, pixels.shape[0], batch_size):
        batch = pixels[start : start + batch_size].to(device=device, dtype=vae.dtype)
        mean = vae.encode(batch).latent_dist.mean.float()
        latents.append(((mean - shift) * vae.config.scaling_factor).cpu())
    base.cache_prompts(list(captions), device, args)
    conditioning = base.encode_prompts(list(captions), device, args)
    return torch.cat(latents), [part.float().cpu() for part in conditioning]
