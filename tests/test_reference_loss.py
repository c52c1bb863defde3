"""The training loss against the loss written out by hand (issue 18, part 2).

``loop.diffusion_loss`` (through the families' ``per_example_loss``) on a fixed batch must equal what plain torch
computes from the definitions: the DDPM forward process ``x_t = alpha_t x0 + sigma_t eps`` with
``alpha_t^2 = prod_{s <= t} (1 - beta_s)`` of SD's scaled-linear schedule, the epsilon target ``eps`` or the
velocity ``v = alpha_t eps - sigma_t x0``, the per-example MSE, Min-SNR-gamma weights ``min(SNR, gamma) / SNR``
(epsilon) or ``min(SNR, gamma) / (SNR + 1)`` (v-prediction) with ``SNR = alpha_t^2 / sigma_t^2`` (as diffusers'
``train_text_to_image.py``; applied to every example, class examples included), DreamBooth's
``mean(instance) + w mean(class)``, the noise offset ``eps + o * n`` with one ``n`` per (example, channel), and the
rectified flow of SD3 / Flux (``x_t = (1 - sigma) x0 + sigma eps``, target ``eps - x0``, shifted sigmas, the
timestep densities and loss weightings of diffusers' SD3 script).

Nothing here imports a helper of the implementation (no ``compute_snr``, ``get_velocity``, ``add_noise``, no
scheduler tables): the schedule is written out. The VAE, text encoders and denoiser are stubs with a known output
(the denoiser returns ``known + 0.5 x_t``, so the noisy input it is given is checked too), so the loss is what
is checked, not a UNet. Random draws are replayed in the order the training core documents: noise, the noise
offset, then timesteps (UNet); noise, then the timestep density (flow).
"""

from __future__ import annotations

import math
from argparse import Namespace
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from resattn_diffusion.training.flow import FluxBase, SD3Base
from resattn_diffusion.training.loop import diffusion_loss
from resattn_diffusion.training.models import StableDiffusionBase

# SD 1.x/2.x's noise schedule (scheduler_config.json of the released models)
NUM_TIMESTEPS = 1000
BETA_START, BETA_END = 0.00085, 0.012
SD_SCALING = 0.18215
SD3_SCALING, SD3_SHIFT_FACTOR, SD3_SCHEDULE_SHIFT = 1.5305, 0.0609, 3.0
FLUX_SCALING, FLUX_SHIFT_FACTOR = 0.3611, 0.1159
LATENT_SHAPE = (4, 6, 6)
CAPTIONS = ["a photo of sks dog", "a sks dog on a beach", "a sks dog, oil painting", "sks dog"]
CLASS_CAPTION = "a photo of a dog"


# --- stubs with known outputs ------------------------------------------------------------------------------------
class AttributeDict(dict):
    """A config that answers ``config.name`` and ``config.get(name)``, as diffusers' FrozenDict does."""

    __getattr__ = dict.__getitem__


class IdentityVAE:
    """``encode(x).latent_dist.sample()`` is ``x``: the batch's pixel values are the latents before scaling."""

    dtype = torch.float32

    def __init__(self, scaling_factor: float, shift_factor: float | None = None):
        self.config = AttributeDict(
            scaling_factor=scaling_factor,
            shift_factor=shift_factor,
            block_out_channels=[8, 8, 8, 8],
            force_upcast=False,
        )

    def encode(self, pixels: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(latent_dist=SimpleNamespace(sample=lambda generator=None: pixels.clone()))


class CountingTokenizer:
    model_max_length = 3

    def __call__(self, captions, **kwargs) -> SimpleNamespace:
        return SimpleNamespace(input_ids=torch.tensor([[len(c), c.count(" "), 7] for c in captions]))


class EmbeddingEncoder:
    def __call__(self, ids: torch.Tensor, output_hidden_states: bool = False) -> SimpleNamespace:
        return SimpleNamespace(last_hidden_state=ids.float().unsqueeze(-1).expand(-1, -1, 5))


class KnownUNet(nn.Module):
    """Predicts ``known + 0.5 x_t`` and records the noisy latents and timesteps it was given."""

    def __init__(self, known: torch.Tensor):
        super().__init__()
        self.known = known
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, noisy, timesteps, context, added_cond_kwargs=None, return_dict=False):
        self.seen.append((noisy.detach().clone(), timesteps.detach().clone()))
        return (self.known + 0.5 * noisy,)


class KnownTransformer(nn.Module):
    """SD3 / Flux stand-in: ``0.5 hidden_states - 0.25`` in whatever layout it is given (so Flux's 2x2 packing
    round-trips to ``0.5 x_t - 0.25``); records timesteps and guidance."""

    def __init__(self, guidance_embeds: bool = False):
        super().__init__()
        self.config = AttributeDict(guidance_embeds=guidance_embeds, in_channels=16)
        self.seen: list[dict] = []

    def forward(self, hidden_states, timestep, **kwargs):
        self.seen.append({"timestep": timestep.detach().clone(), "guidance": kwargs.get("guidance")})
        return (0.5 * hidden_states - 0.25,)


# --- the schedule and the loss written out -------------------------------------------------------------------------
def hand_alphas_cumprod(num_timesteps: int = NUM_TIMESTEPS, zero_terminal_snr: bool = False) -> torch.Tensor:
    """``prod_{s<=t} (1 - beta_s)`` with SD's scaled-linear betas ``linspace(sqrt(b0), sqrt(b1), T)^2``, float64.

    ``zero_terminal_snr``: Lin et al. 2023's rescaling (diffusers' ``rescale_betas_zero_snr``): ``sqrt(alpha_bar)``
    shifted to end at 0 and scaled to keep its first value."""
    betas = torch.linspace(BETA_START**0.5, BETA_END**0.5, num_timesteps, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1.0 - betas, dim=0)
    if zero_terminal_snr:
        root = alpha_bar.sqrt()
        first, last = root[0].item(), root[-1].item()
        alpha_bar = ((root - last) * first / (first - last)) ** 2
    return alpha_bar


def hand_unet_loss(
    latents: torch.Tensor,
    known: torch.Tensor,
    is_prior: torch.Tensor,
    seed: int,
    prediction_type: str = "epsilon",
    snr_gamma: float | None = None,
    prior_loss_weight: float = 1.0,
    noise_offset: float = 0.0,
    num_timesteps: int = NUM_TIMESTEPS,
    zero_terminal_snr: bool = False,
) -> dict[str, torch.Tensor]:
    """The UNet objective from the definitions, float64, with the training core's draws (noise, offset, t)."""
    generator = torch.Generator().manual_seed(seed)
    batch, channels = latents.shape[:2]
    noise = torch.randn(latents.shape, generator=generator)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((batch, channels, 1, 1), generator=generator)
    timesteps = torch.randint(0, num_timesteps, (batch,), generator=generator)

    x0, eps = latents.double(), noise.double()
    alpha_bar = hand_alphas_cumprod(num_timesteps, zero_terminal_snr)[timesteps].view(-1, 1, 1, 1)
    alpha, sigma = alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt()
    noisy = alpha * x0 + sigma * eps
    prediction = known.double() + 0.5 * noisy
    target = eps if prediction_type == "epsilon" else alpha * eps - sigma * x0
    per_example = ((prediction - target) ** 2).mean(dim=(1, 2, 3))
    snr = (alpha**2 / sigma**2).flatten()
    if snr_gamma is not None:
        clipped = torch.minimum(snr, torch.full_like(snr, snr_gamma))
        if prediction_type == "epsilon":  # min(SNR, gamma) / SNR, and its limit 1 at SNR = 0
            weights = torch.where(snr > 0, clipped / snr, torch.ones_like(snr))
        else:
            weights = clipped / (snr + 1.0)
        per_example = per_example * weights
    loss = per_example[~is_prior].mean()
    if is_prior.any():
        loss = loss + prior_loss_weight * per_example[is_prior].mean()
    return {"loss": loss, "per_example": per_example, "noisy": noisy, "timesteps": timesteps, "snr": snr}


def unet_base(
    prediction_type: str, known: torch.Tensor, num_timesteps: int = NUM_TIMESTEPS, zero_terminal_snr: bool = False
) -> StableDiffusionBase:
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(
        num_train_timesteps=num_timesteps,
        beta_start=BETA_START,
        beta_end=BETA_END,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        rescale_betas_zero_snr=zero_terminal_snr,
    )
    return StableDiffusionBase(
        path="stub",
        model_index={},
        sdxl=False,
        tokenizers=[CountingTokenizer()],
        text_encoders=[EmbeddingEncoder()],
        vae=IdentityVAE(SD_SCALING),
        denoiser=KnownUNet(known),
        noise_scheduler=scheduler,
        inference_scheduler=scheduler,
    )


def fixed_batch(num_instance: int, num_class: int, seed: int = 11) -> dict:
    generator = torch.Generator().manual_seed(seed)
    count = num_instance + num_class
    return {
        "pixel_values": 3.0 * torch.randn((count, *LATENT_SHAPE), generator=generator),
        "captions": [CAPTIONS[i % len(CAPTIONS)] for i in range(num_instance)] + [CLASS_CAPTION] * num_class,
        "is_prior": torch.tensor([False] * num_instance + [True] * num_class),
    }


def run_unet_case(
    prediction_type: str,
    num_instance: int = 6,
    num_class: int = 0,
    seed: int = 5,
    snr_gamma: float | None = None,
    prior_loss_weight: float = 1.0,
    noise_offset: float = 0.0,
    num_timesteps: int = NUM_TIMESTEPS,
    zero_terminal_snr: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], StableDiffusionBase]:
    batch = fixed_batch(num_instance, num_class)
    known = torch.randn((num_instance + num_class, *LATENT_SHAPE), generator=torch.Generator().manual_seed(2))
    base = unet_base(prediction_type, known, num_timesteps, zero_terminal_snr)
    args = Namespace(noise_offset=noise_offset, snr_gamma=snr_gamma, prior_loss_weight=prior_loss_weight)
    generator = torch.Generator().manual_seed(seed)
    ours = diffusion_loss(args, base, base.denoiser, batch, 48, torch.float32, generator)
    reference = hand_unet_loss(
        batch["pixel_values"] * SD_SCALING,
        known,
        batch["is_prior"],
        seed,
        prediction_type,
        snr_gamma,
        prior_loss_weight,
        noise_offset,
        num_timesteps,
        zero_terminal_snr,
    )
    return ours, reference, base


def assert_same_loss(ours: torch.Tensor, reference: dict[str, torch.Tensor], base) -> None:
    noisy, timesteps = base.denoiser.seen[-1]
    assert torch.equal(timesteps, reference["timesteps"]), "timesteps differ from the seed's draws"
    torch.testing.assert_close(noisy.double(), reference["noisy"], rtol=1e-5, atol=1e-5)
    assert ours.dim() == 0 and ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), reference["loss"], rtol=1e-5, atol=0)


# --- the UNet objective -----------------------------------------------------------------------------------------
def test_the_stub_scheduler_is_sds_schedule_written_out():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_start=BETA_START, beta_end=BETA_END, beta_schedule="scaled_linear")
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), hand_alphas_cumprod(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_plain_mse_equals_the_loss_by_hand(prediction_type):
    ours, reference, base = run_unet_case(prediction_type)
    assert_same_loss(ours, reference, base)


def test_v_prediction_and_epsilon_targets_differ_on_this_batch():
    """The two targets give clearly different losses here, so a wrong target cannot pass the test above."""
    epsilon, _, _ = run_unet_case("epsilon")
    velocity, _, _ = run_unet_case("v_prediction")
    assert abs(epsilon.item() - velocity.item()) > 0.05 * epsilon.item()


def test_prior_preservation_adds_the_class_half_times_its_weight():
    ours, reference, base = run_unet_case("epsilon", num_instance=3, num_class=3, prior_loss_weight=0.37)
    assert_same_loss(ours, reference, base)
    per_example = reference["per_example"]
    instance, prior = per_example[:3].mean(), per_example[3:].mean()
    torch.testing.assert_close(ours.double(), instance + 0.37 * prior, rtol=1e-5, atol=0)
    # the weight is visible: 0.37 vs 1 changes the loss by far more than the tolerance
    assert abs((instance + prior - ours.double()).item()) > 0.1 * ours.item()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weighting_equals_the_weights_by_hand(prediction_type):
    gamma = 1.0
    ours, reference, base = run_unet_case(prediction_type, num_instance=8, snr_gamma=gamma)
    # the draws straddle gamma, so both the clipped and the unclipped branch are exercised
    assert (reference["snr"] > gamma).any() and (reference["snr"] < gamma).any()
    assert_same_loss(ours, reference, base)
    unweighted, _, _ = run_unet_case(prediction_type, num_instance=8)
    assert abs(ours.item() - unweighted.item()) > 0.05 * unweighted.item()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_on_a_zero_terminal_snr_schedule_takes_the_limit_at_snr_0(prediction_type):
    """SNR = 0 at the last timestep of a rescaled schedule: the epsilon weight min(SNR, gamma) / SNR is taken as
    its limit 1 there (0 / 0 would make the loss NaN), the v weight min(SNR, gamma) / (SNR + 1) is 0."""
    from diffusers import DDPMScheduler

    zero_snr = DDPMScheduler(
        num_train_timesteps=8,
        beta_start=BETA_START,
        beta_end=BETA_END,
        beta_schedule="scaled_linear",
        rescale_betas_zero_snr=True,
    )
    torch.testing.assert_close(
        zero_snr.alphas_cumprod.double(), hand_alphas_cumprod(8, zero_terminal_snr=True), rtol=1e-5, atol=1e-7
    )
    ours, reference, base = run_unet_case(
        prediction_type, num_instance=8, seed=0, snr_gamma=1.0, num_timesteps=8, zero_terminal_snr=True
    )
    assert (reference["timesteps"] == 7).any() and (reference["snr"] == 0).any()
    assert (reference["snr"] > 1.0).any() and ((reference["snr"] > 0) & (reference["snr"] < 1.0)).any()
    assert torch.isfinite(ours)
    assert_same_loss(ours, reference, base)


def test_noise_offset_adds_one_draw_per_example_and_channel():
    ours, reference, base = run_unet_case("epsilon", noise_offset=0.3)
    assert_same_loss(ours, reference, base)
    without = hand_unet_loss(
        fixed_batch(6, 0)["pixel_values"] * SD_SCALING,
        base.denoiser.known,
        torch.zeros(6, dtype=torch.bool),
        5,
    )
    assert abs(ours.item() - without["loss"].item()) > 0.01 * ours.item()


def test_everything_at_once_v_prediction_prior_min_snr_and_offset():
    ours, reference, base = run_unet_case(
        "v_prediction", num_instance=4, num_class=4, snr_gamma=2.0, prior_loss_weight=0.6, noise_offset=0.1
    )
    assert_same_loss(ours, reference, base)


# --- the rectified-flow objective (SD3, Flux) ----------------------------------------------------------------------
def hand_flow_sigmas(indices: torch.Tensor, shift: float) -> torch.Tensor:
    """FlowMatchEulerDiscreteScheduler's training sigmas written out: at index ``i``, ``s_i = (T - i) / T`` with
    the static shift ``shift s_i / (1 + (shift - 1) s_i)`` (SD3: 3; Flux: 1, its shift is dynamic at sampling)."""
    unshifted = (NUM_TIMESTEPS - indices.double()) / NUM_TIMESTEPS
    return shift * unshifted / (1.0 + (shift - 1.0) * unshifted)


def hand_flow_loss(
    pixels: torch.Tensor,
    seed: int,
    scheme: str,
    scaling: float,
    shift_factor: float,
    schedule_shift: float,
    precondition: bool = False,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    latents = ((pixels - shift_factor) * scaling).double()
    batch = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator).double()
    if scheme == "logit_normal":
        u = torch.sigmoid(torch.normal(logit_mean, logit_std, (batch,), generator=generator))
    elif scheme == "mode":
        r = torch.rand((batch,), generator=generator)
        u = 1 - r - mode_scale * (torch.cos(math.pi * r / 2) ** 2 - 1 + r)
    else:
        u = torch.rand((batch,), generator=generator)
    indices = (u * NUM_TIMESTEPS).long().clamp(0, NUM_TIMESTEPS - 1)
    sigma = hand_flow_sigmas(indices, schedule_shift).view(-1, 1, 1, 1)
    noisy = (1.0 - sigma) * latents + sigma * noise
    velocity = 0.5 * noisy - 0.25  # KnownTransformer
    if precondition:
        prediction, target = noisy - sigma * velocity, latents
    else:
        prediction, target = velocity, noise - latents
    if scheme == "sigma_sqrt":
        weight = sigma**-2.0
    elif scheme == "cosmap":
        weight = 2.0 / (math.pi * (1.0 - 2.0 * sigma + 2.0 * sigma**2))
    else:
        weight = torch.ones_like(sigma)
    per_example = (weight * (prediction - target) ** 2).reshape(batch, -1).mean(dim=1)
    return {"per_example": per_example, "timesteps": sigma.flatten() * NUM_TIMESTEPS, "sigma": sigma.flatten()}


def flow_base(kind: str) -> SD3Base | FluxBase:
    from diffusers import FlowMatchEulerDiscreteScheduler

    if kind == "sd3":
        family, vae, shift = SD3Base, IdentityVAE(SD3_SCALING, SD3_SHIFT_FACTOR), SD3_SCHEDULE_SHIFT
        transformer = KnownTransformer()
    else:
        family, vae, shift = FluxBase, IdentityVAE(FLUX_SCALING, FLUX_SHIFT_FACTOR), 1.0
        transformer = KnownTransformer(guidance_embeds=True)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TIMESTEPS, shift=shift)
    base = family("stub", {}, {"vae": vae, "transformer": transformer}, scheduler, scheduler)
    # encoded prompts, as cache_prompts leaves them: the text encoders are never needed
    for index, caption in enumerate([*CAPTIONS, CLASS_CAPTION]):
        base.prompt_cache[caption] = (torch.full((1, 3, 8), float(index)), torch.full((1, 8), -float(index)))
    base.text_encoders_freed = True
    return base


FLOW_CASES = [
    ("sd3", "logit_normal", False, {}),
    ("sd3", "logit_normal", False, {"logit_mean": 0.7, "logit_std": 0.4}),
    ("sd3", "mode", False, {"mode_scale": 0.8}),
    ("sd3", "cosmap", False, {}),
    ("sd3", "sigma_sqrt", False, {}),
    ("sd3", "none", True, {}),
    ("flux", "none", False, {}),
    ("flux", "sigma_sqrt", True, {}),
]


@pytest.mark.parametrize("kind, scheme, precondition, density", FLOW_CASES)
def test_flow_matching_loss_equals_the_loss_by_hand(kind, scheme, precondition, density):
    seed = 9
    base = flow_base(kind)
    batch = fixed_batch(3, 2)
    args = Namespace(
        weighting_scheme=scheme,
        precondition_outputs=precondition,
        prior_loss_weight=0.45,
        guidance_scale=None,
        max_sequence_length=None,
        logit_mean=density.get("logit_mean"),
        logit_std=density.get("logit_std"),
        mode_scale=density.get("mode_scale"),
    )
    ours = diffusion_loss(args, base, base.denoiser, batch, 48, torch.float32, torch.Generator().manual_seed(seed))
    scaling, shift_factor, schedule_shift = (
        (SD3_SCALING, SD3_SHIFT_FACTOR, SD3_SCHEDULE_SHIFT)
        if kind == "sd3"
        else (FLUX_SCALING, FLUX_SHIFT_FACTOR, 1.0)
    )
    reference = hand_flow_loss(
        batch["pixel_values"], seed, scheme, scaling, shift_factor, schedule_shift, precondition, **density
    )
    seen = base.denoiser.seen[-1]
    timestep_scale = 1000.0 if kind == "flux" else 1.0  # Flux's transformer is given t / 1000
    torch.testing.assert_close(
        seen["timestep"].double() * timestep_scale, reference["timesteps"], rtol=1e-5, atol=1e-3
    )
    if kind == "flux":
        torch.testing.assert_close(seen["guidance"], torch.full((5,), 3.5))
    per_example = reference["per_example"]
    expected = per_example[:3].mean() + 0.45 * per_example[3:].mean()
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=0)


def test_flow_weightings_and_densities_change_the_loss():
    """Each scheme gives a different loss on this batch, so dropping a weighting cannot pass the test above."""
    batch = fixed_batch(3, 2)
    losses = {}
    for scheme in ["none", "logit_normal", "cosmap", "sigma_sqrt"]:
        base = flow_base("sd3")
        args = Namespace(weighting_scheme=scheme, precondition_outputs=False, prior_loss_weight=1.0)
        losses[scheme] = diffusion_loss(
            args, base, base.denoiser, batch, 48, torch.float32, torch.Generator().manual_seed(9)
        ).item()
    values = sorted(losses.values())
    assert all(b - a > 1e-3 * b for a, b in zip(values, values[1:])), losses
