"""Pins of the training loss (``FlowMatchingBase.per_example_loss`` in ``training/flow.py``,
``StableDiffusionBase.per_example_loss`` in ``training/models.py``) that the reference stubs of
``test_reference_loss.py`` cannot see: prompts not yet cached are encoded with the run's own flags (SD3's
``--max_sequence_length``), arguments without ``precondition_outputs`` train the plain velocity target, and the
VAE gets the pixels in its own dtype (a half-precision VAE is fed float32 batches).
"""

from __future__ import annotations

from argparse import Namespace

import torch
from test_pin_loss import _flow_args, _NoisyVAE
from test_reference_loss import LATENT_SHAPE, fixed_batch, flow_base, unet_base

from resattn_diffusion.training.loop import diffusion_loss


class _RecordingTextPipeline:
    """Stands in for SD3's text pipeline: records the sequence length it is asked for, returns fixed embeddings."""

    def __init__(self) -> None:
        self.lengths: list[int] = []

    def encode_prompt(self, prompt, max_sequence_length, **kwargs):
        self.lengths.append(max_sequence_length)
        count = len(prompt)
        return torch.ones(count, 3, 8), None, torch.zeros(count, 8), None


def _loss(base, args, batch) -> torch.Tensor:
    return diffusion_loss(args, base, base.denoiser, batch, 48, torch.float32, torch.Generator().manual_seed(4))


def test_uncached_prompts_are_encoded_with_the_runs_max_sequence_length() -> None:
    base = flow_base("sd3")
    base.prompt_cache.clear()
    base.text_encoders_freed = False
    pipeline = _RecordingTextPipeline()
    base.text_pipeline = lambda: pipeline  # type: ignore[method-assign]
    args = _flow_args()
    args.max_sequence_length = 7
    assert torch.isfinite(_loss(base, args, fixed_batch(2, 0))).all()
    assert pipeline.lengths == [7]
    args.max_sequence_length = None  # unset: the family's default
    _loss(base, args, fixed_batch(2, 0))
    assert pipeline.lengths == [7, base.default_max_sequence_length]


def test_arguments_without_precondition_outputs_train_the_velocity_target() -> None:
    for kind in ("sd3", "flux"):
        explicit = _flow_args()
        without = Namespace(**{k: v for k, v in vars(explicit).items() if k != "precondition_outputs"})
        preconditioned = Namespace(**dict(vars(explicit), precondition_outputs=True))
        batch = fixed_batch(3, 0)
        plain = _loss(flow_base(kind), explicit, batch)
        torch.testing.assert_close(_loss(flow_base(kind), without, batch), plain, rtol=0, atol=0)
        assert not torch.allclose(_loss(flow_base(kind), preconditioned, batch), plain), kind


class _DtypeCheckingVAE(_NoisyVAE):
    """A VAE held in float64 (as a real one in fp16 / bf16 would be): like its convolutions, it refuses inputs
    of another dtype."""

    dtype = torch.float64

    def encode(self, pixels):
        assert pixels.dtype == torch.float64, f"the VAE got {pixels.dtype} pixels"
        return super().encode(pixels)


def test_the_vae_gets_the_pixels_in_its_own_dtype() -> None:
    unet = unet_base("epsilon", torch.zeros(3, *LATENT_SHAPE))
    unet.vae = _DtypeCheckingVAE(unet.vae.config)
    args = Namespace(noise_offset=0.0, snr_gamma=None, prior_loss_weight=1.0)
    bases = [(unet, args)]
    for kind in ("sd3", "flux"):
        flow = flow_base(kind)
        flow.vae = _DtypeCheckingVAE(flow.vae.config)
        bases.append((flow, _flow_args()))
    for base, base_args in bases:
        loss = _loss(base, base_args, fixed_batch(3, 0))  # float32 pixels in the batch
        assert loss.dim() == 0 and torch.isfinite(loss)


def test_flux_is_trained_at_the_runs_guidance_scale() -> None:
    base = flow_base("flux")  # its stand-in transformer has FLUX.1-dev's guidance embedding and records the guidance
    args = _flow_args()
    args.guidance_scale = 7.0  # not the family's default
    _loss(base, args, fixed_batch(2, 0))
    assert torch.equal(base.denoiser.seen[-1]["guidance"], torch.full((2,), 7.0))
