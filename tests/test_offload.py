"""Tuners under accelerate's sequential CPU offload (``pipe.enable_sequential_cpu_offload()`` runs
``accelerate.cpu_offload`` on each component): every module's weights sit on the meta device except inside the
module's own call. Our fused GEMMs, merged deltas and the frozen ``W_o`` read weights without calling their modules:
Res-Attn and Res-Prefix gave wrong numbers silently (NaN for Res-Prefix), and every linear tuner's merged path (the
CUDA default) raised. Here on CPU, the offload's execution device."""

from __future__ import annotations

import pytest
import torch
from accelerate import cpu_offload

import resattn_diffusion as rd
from resattn_diffusion.testing import frozen_tiny_unet, randomize_tuner, unet_inputs
from resattn_diffusion.tuners.fast_paths import forced_paths

TUNERS = [name for name in rd.tuner_names() if name != "res_bypass"]


@pytest.mark.parametrize("path", ["reference", "fast"])
@pytest.mark.parametrize("tuner", TUNERS)
def test_sequential_cpu_offload_changes_no_output(tuner, path):
    unet = frozen_tiny_unet("sd1")
    rd.add_res_tuner(unet, rd.ResTunerConfig(tuner, targets=["attn1", "attn2", "ff"] if tuner == "res_attn" else None))
    randomize_tuner(unet, std=0.2)
    inputs = unet_inputs(unet)
    with forced_paths(path), torch.no_grad():
        expected = unet(**inputs).sample
    cpu_offload(unet, execution_device=torch.device("cpu"))
    assert {p.device.type for p in rd.res_tuner_parameters(unet)} == {"meta"}  # offloaded, tuners included
    with forced_paths(path), torch.no_grad():
        torch.testing.assert_close(unet(**inputs).sample, expected, rtol=1e-5, atol=1e-5)


def test_the_bypass_under_sequential_cpu_offload():
    """The UNet-level bypass reads the decoder's outputs through hooks on the UNet's blocks."""
    unet = frozen_tiny_unet("sd1")
    rd.add_res_tuner(unet, rd.ResTunerConfig("res_bypass"))
    randomize_tuner(unet, std=0.2)
    inputs = unet_inputs(unet)
    with torch.no_grad():
        expected = unet(**inputs).sample
    cpu_offload(unet, execution_device=torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(unet(**inputs).sample, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tuner", ["res_attn", "res_prefix", "res_prompt", "res_lora", "glora"])
def test_a_flux_transformer_under_sequential_cpu_offload(tuner):
    """The joint processor's branches (and Flux's single blocks, which have no output projection) likewise."""
    from resattn_diffusion.testing import flux_transformer_inputs, frozen_tiny_model

    model = frozen_tiny_model("flux")
    rd.add_res_tuner(model, rd.ResTunerConfig(tuner))
    randomize_tuner(model, std=0.2)
    inputs = flux_transformer_inputs(model)
    with forced_paths("fast"), torch.no_grad():
        expected = model(**inputs).sample
    cpu_offload(model, execution_device=torch.device("cpu"))
    assert {p.device.type for p in rd.res_tuner_parameters(model)} == {"meta"}
    with forced_paths("fast"), torch.no_grad():
        torch.testing.assert_close(model(**inputs).sample, expected, rtol=1e-5, atol=1e-5)
