"""The tiny SD3 / SD3.5 / Flux transformers of resattn_diffusion.testing: the structure the tuners attach to."""

import torch

from resattn_diffusion.testing import (
    flux_transformer_inputs,
    sd3_transformer_inputs,
    tiny_flux_transformer,
    tiny_sd3_transformer,
)


def test_tiny_sd3_and_sd35_have_joint_blocks_and_attn2_only_on_sd35():
    sd3, sd35 = tiny_sd3_transformer(), tiny_sd3_transformer(dual_attention=True)
    assert all(block.attn2 is None for block in sd3.transformer_blocks)
    assert sd35.transformer_blocks[0].attn2 is not None and sd35.transformer_blocks[1].attn2 is None
    assert sd3.transformer_blocks[-1].ff_context is None  # the last block is context_pre_only, as in SD3
    with torch.no_grad():
        out = sd35(**sd3_transformer_inputs(sd35)).sample
    assert out.shape == (2, 16, 8, 8) and torch.isfinite(out).all()


def test_tiny_flux_has_double_and_single_blocks_and_is_seeded():
    flux = tiny_flux_transformer()
    assert len(flux.transformer_blocks) == 1 and len(flux.single_transformer_blocks) == 2
    inputs = flux_transformer_inputs(flux)
    with torch.no_grad():
        out = flux(**inputs).sample
        again = tiny_flux_transformer()(**inputs).sample
        other = tiny_flux_transformer(seed=1)(**inputs).sample
    assert out.shape == (2, 16, 16) and torch.equal(out, again) and not torch.equal(out, other)
