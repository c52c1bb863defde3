"""Pins of the UNet training loss by hand: ``StableDiffusionBase.per_example_loss`` on stub parts (a VAE whose
latents are given, a recording denoiser, diffusers' real DDPM scheduler), replaying the same random draws, for
epsilon and v-prediction, noise offset and Min-SNR weighting; ``diffusion_loss``'s prior weighting; the targets.

Written to kill the surviving mutants of ``scripts/dev.sh mutate`` (README, "Mutation score").
"""

from __future__ import annotations

from argparse import Namespace
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler

from resattn_diffusion.training.errors import TrainingError
from resattn_diffusion.training.loop import diffusion_loss
from resattn_diffusion.training.models import StableDiffusionBase
from resattn_diffusion.training.objective import prediction_target

B, C, H = 3, 2, 4
SCALING = 0.5


class _Vae(torch.nn.Module):
    dtype = torch.float32
    config = SimpleNamespace(scaling_factor=SCALING)

    def __init__(self, latents: torch.Tensor):
        super().__init__()
        self.latents = latents

    def encode(self, pixels: torch.Tensor):
        return SimpleNamespace(latent_dist=SimpleNamespace(sample=lambda generator: self.latents.clone()))


class _Denoiser(torch.nn.Module):
    """A fixed, input-dependent prediction: ``0.3 noisy + 0.001 t`` (per sample), recording what it was given."""

    def forward(self, noisy, timesteps, context, added_cond_kwargs=None, return_dict=False):
        self.seen = (noisy.clone(), timesteps.clone(), context.clone(), added_cond_kwargs)
        return (0.3 * noisy + 0.001 * timesteps.float().view(-1, 1, 1, 1),)


def _base(prediction_type: str, latents: torch.Tensor, context: torch.Tensor) -> StableDiffusionBase:
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    base = StableDiffusionBase("stub", {}, False, [], [], _Vae(latents), _Denoiser(), scheduler, scheduler)
    base.encode_prompts = lambda captions, device: (context, None)  # type: ignore[method-assign]
    return base


def _by_hand(prediction_type: str, noise_offset: float, snr_gamma: float | None, seed: int):
    torch.manual_seed(11)
    raw_latents, context = torch.randn(B, C, H, H), torch.randn(B, 5, 6)
    base = _base(prediction_type, raw_latents, context)
    args = Namespace(noise_offset=noise_offset, snr_gamma=snr_gamma)
    batch = {"pixel_values": torch.zeros(B, 3, 8, 8), "captions": ["a"] * B}
    loss = base.per_example_loss(args, base.denoiser, batch, 8, torch.float32, torch.Generator().manual_seed(seed))

    g = torch.Generator().manual_seed(seed)  # the same draws, in the same order
    latents = raw_latents * SCALING
    noise = torch.randn(latents.shape, generator=g)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((B, C, 1, 1), generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    abar = base.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise
    target = noise if prediction_type == "epsilon" else abar.sqrt() * noise - (1 - abar).sqrt() * latents
    prediction = 0.3 * noisy + 0.001 * t.float().view(-1, 1, 1, 1)
    expected = ((prediction - target) ** 2).mean(dim=(1, 2, 3))
    if snr_gamma is not None:
        snr = (abar / (1 - abar)).flatten()
        clipped = torch.minimum(snr, torch.full_like(snr, snr_gamma))
        expected = expected * (clipped / snr if prediction_type == "epsilon" else clipped / (snr + 1))
    seen_noisy, seen_t, seen_context, added = base.denoiser.seen
    torch.testing.assert_close(seen_noisy, noisy, atol=1e-5, rtol=1e-5)
    assert torch.equal(seen_t, t) and torch.equal(seen_context, context) and added is None
    return loss, expected


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("noise_offset", [0.0, 0.4])
@pytest.mark.parametrize("snr_gamma", [None, 2.0])
def test_per_example_loss_equals_the_loss_by_hand(prediction_type: str, noise_offset: float, snr_gamma) -> None:
    loss, expected = _by_hand(prediction_type, noise_offset, snr_gamma, seed=5)
    assert loss.shape == (B,)
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-5)


def test_min_snr_weighting_changes_the_loss_where_snr_exceeds_gamma() -> None:
    plain, _ = _by_hand("epsilon", 0.0, None, seed=5)
    weighted, _ = _by_hand("epsilon", 0.0, 1e-3, seed=5)
    assert not torch.allclose(plain, weighted)


def test_per_example_loss_refuses_a_sample_predicting_scheduler() -> None:
    base = _base("sample", torch.randn(B, C, H, H), torch.randn(B, 5, 6))
    args = Namespace(noise_offset=0.0, snr_gamma=None)
    batch = {"pixel_values": torch.zeros(B, 3, 8, 8), "captions": ["a"] * B}
    with pytest.raises(TrainingError, match="predicts 'sample'"):
        base.per_example_loss(args, base.denoiser, batch, 8, torch.float32, torch.Generator().manual_seed(0))


class _Family:
    def __init__(self, per_example: torch.Tensor):
        self.per_example = per_example

    def per_example_loss(self, args, denoiser, batch, resolution, weight_dtype, generator):
        return self.per_example


def test_diffusion_loss_weights_the_prior_examples() -> None:
    per_example = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0])
    is_prior = torch.tensor([False, True, False, True, True])
    args = Namespace(prior_loss_weight=0.25)
    loss = diffusion_loss(args, _Family(per_example), None, {"is_prior": is_prior}, 8, torch.float32, None)
    assert loss.item() == pytest.approx((1.0 + 4.0) / 2 + 0.25 * (2.0 + 8.0 + 16.0) / 3)
    no_prior = torch.zeros(5, dtype=torch.bool)
    loss = diffusion_loss(args, _Family(per_example), None, {"is_prior": no_prior}, 8, torch.float32, None)
    assert loss.item() == pytest.approx(31.0 / 5)


def test_prediction_targets() -> None:
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    latents, noise, t = torch.randn(2, 2, 3, 3), torch.randn(2, 2, 3, 3), torch.tensor([10, 900])
    assert prediction_target(scheduler, latents, noise, t) is noise
    scheduler.register_to_config(prediction_type="sample")
    assert prediction_target(scheduler, latents, noise, t) is latents
    scheduler.register_to_config(prediction_type="v_prediction")
    abar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    v = abar.sqrt() * noise - (1 - abar).sqrt() * latents
    torch.testing.assert_close(prediction_target(scheduler, latents, noise, t), v)
    scheduler.register_to_config(prediction_type="flow")
    with pytest.raises(ValueError, match="unsupported prediction_type 'flow'; use one of epsilon, v_prediction"):
        prediction_target(scheduler, latents, noise, t)


# --- what the reference stubs cannot see: the generator of the VAE draw, a missing shift factor, weight dtypes --
class _NoisyVAE:
    """``sample(generator)`` draws: latents = pixels + 0.3 noise from the training generator (as a real VAE's
    posterior does); a draw from the global RNG instead would make the loss depend on unrelated seeding."""

    dtype = torch.float32

    def __init__(self, config):
        self.config = config

    def encode(self, pixels):
        def sample(generator=None):
            return pixels + 0.3 * torch.randn(pixels.shape, generator=generator)

        return SimpleNamespace(latent_dist=SimpleNamespace(sample=sample))


def _flow_args():
    return Namespace(weighting_scheme="none", precondition_outputs=False, prior_loss_weight=1.0, guidance_scale=None,
                     max_sequence_length=None, logit_mean=None, logit_std=None, mode_scale=None)  # fmt: skip


def _loss_twice(base, args, batch, dtype=torch.float32) -> list[torch.Tensor]:
    losses = []
    for global_seed in (1, 2):  # only the global RNG differs between the two calls
        torch.manual_seed(global_seed)
        losses.append(diffusion_loss(args, base, base.denoiser, batch, 48, dtype, torch.Generator().manual_seed(4)))
    return losses


def test_vae_draws_and_noise_come_from_the_training_generator_only() -> None:
    import test_reference_loss as ref

    unet = ref.unet_base("epsilon", torch.zeros(3, *ref.LATENT_SHAPE))
    unet.vae = _NoisyVAE(unet.vae.config)
    batch = ref.fixed_batch(3, 0)
    first, second = _loss_twice(unet, Namespace(noise_offset=0.1, snr_gamma=None, prior_loss_weight=1.0), batch)
    assert first == second
    for kind in ("sd3", "flux"):
        flow = ref.flow_base(kind)
        flow.vae = _NoisyVAE(flow.vae.config)
        first, second = _loss_twice(flow, _flow_args(), ref.fixed_batch(3, 0))
        assert first == second, kind


def test_flow_without_a_shift_factor_shifts_by_zero() -> None:
    import test_reference_loss as ref

    batch = ref.fixed_batch(3, 0)
    without = ref.flow_base("sd3")
    without.vae.config["shift_factor"] = None
    with_half = ref.flow_base("sd3")
    with_half.vae.config["shift_factor"] = 0.5
    shifted = dict(batch, pixel_values=batch["pixel_values"] + 0.5)  # (x + 0.5) - 0.5 = x - 0
    (a, _), (b, _) = _loss_twice(without, _flow_args(), batch), _loss_twice(with_half, _flow_args(), shifted)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_the_denoiser_gets_the_weight_dtype(dtype: torch.dtype) -> None:
    import test_reference_loss as ref

    seen = {}

    class Recording(ref.KnownTransformer):
        def forward(self, hidden_states, timestep, **kwargs):
            seen["dtypes"] = [hidden_states.dtype] + [v.dtype for v in kwargs.values() if torch.is_tensor(v)
                                                      and v.is_floating_point() and v.dim() > 1]  # fmt: skip
            return super().forward(hidden_states, timestep, **kwargs)

    for kind in ("sd3", "flux"):
        flow = ref.flow_base(kind)
        flow.denoiser = Recording(guidance_embeds=kind == "flux")
        loss = diffusion_loss(_flow_args(), flow, flow.denoiser, ref.fixed_batch(2, 0), 48,
                              dtype, torch.Generator().manual_seed(0))  # fmt: skip
        assert loss.dtype == torch.float32  # the loss itself in float32, whatever the weights
        assert seen["dtypes"] and set(seen["dtypes"]) == {dtype}, (kind, seen)


def test_the_unet_gets_the_weight_dtype() -> None:
    import test_reference_loss as ref

    seen = {}

    class Recording(ref.KnownUNet):
        def forward(self, noisy, timesteps, context, added_cond_kwargs=None, return_dict=False):
            seen["dtypes"] = (noisy.dtype, context.dtype)
            return super().forward(noisy, timesteps, context, added_cond_kwargs, return_dict)

    unet = ref.unet_base("epsilon", torch.zeros(2, *ref.LATENT_SHAPE))
    unet.denoiser = Recording(torch.zeros(2, *ref.LATENT_SHAPE))
    args = Namespace(noise_offset=0.0, snr_gamma=None, prior_loss_weight=1.0)
    loss = diffusion_loss(args, unet, unet.denoiser, ref.fixed_batch(2, 0), 48, torch.float64, torch.Generator())
    assert loss.dtype == torch.float32 and seen["dtypes"] == (torch.float64, torch.float64)


def test_sdxl_gets_its_size_conditions_at_the_training_resolution() -> None:
    torch.manual_seed(3)
    base = _base("epsilon", torch.randn(2, C, H, H), torch.randn(2, 5, 6))
    base.sdxl = True
    pooled = torch.randn(2, 7)
    base.encode_prompts = lambda captions, device: (torch.randn(2, 5, 6), pooled)  # type: ignore[method-assign]
    batch = {"pixel_values": torch.zeros(2, 3, 8, 8), "captions": ["a", "b"], "is_prior": torch.zeros(2, dtype=bool)}
    batch.update(original_sizes=torch.tensor([[40, 30], [64, 64]]), crop_top_lefts=torch.tensor([[2, 0], [0, 5]]))
    args = Namespace(noise_offset=0.0, snr_gamma=None, prior_loss_weight=1.0)
    diffusion_loss(args, base, base.denoiser, batch, 24, torch.float32, torch.Generator().manual_seed(0))
    added = base.denoiser.seen[3]
    torch.testing.assert_close(added["text_embeds"], pooled)
    expected = torch.tensor([[40, 30, 2, 0, 24, 24], [64, 64, 0, 5, 24, 24]], dtype=torch.float32)
    torch.testing.assert_close(added["time_ids"], expected)


def test_flow_timesteps_clamp_u_of_one_to_the_last_index(monkeypatch: pytest.MonkeyPatch) -> None:
    import diffusers.training_utils as training_utils
    import test_reference_loss as ref

    flow = ref.flow_base("sd3")
    monkeypatch.setattr(training_utils, "compute_density_for_timestep_sampling",
                        lambda **kwargs: torch.tensor([1.0, 0.0, 0.5]))  # fmt: skip
    timesteps, sigmas = flow.sample_timesteps(_flow_args(), 3, torch.Generator())
    scheduler, count = flow.noise_scheduler, flow.noise_scheduler.config.num_train_timesteps
    indices = torch.tensor([count - 1, 0, count // 2])
    torch.testing.assert_close(timesteps, scheduler.timesteps[indices])
    torch.testing.assert_close(sigmas, scheduler.sigmas[indices])


def test_the_unet_gets_bf16_inputs_with_a_noise_offset() -> None:
    import test_reference_loss as ref

    seen = {}

    class Recording(ref.KnownUNet):
        def forward(self, noisy, timesteps, context, added_cond_kwargs=None, return_dict=False):
            seen["dtype"] = noisy.dtype
            return super().forward(noisy, timesteps, context, added_cond_kwargs, return_dict)

    unet = ref.unet_base("epsilon", torch.zeros(2, *ref.LATENT_SHAPE))
    unet.denoiser = Recording(torch.zeros(2, *ref.LATENT_SHAPE))
    args = Namespace(noise_offset=0.2, snr_gamma=None, prior_loss_weight=1.0)
    diffusion_loss(args, unet, unet.denoiser, ref.fixed_batch(2, 0), 48, torch.bfloat16, torch.Generator())
    assert seen["dtype"] == torch.bfloat16
