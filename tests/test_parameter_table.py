"""The README's parameter table: the library's tuner rows, and the benchmark's peft LoRA row (which must equal
what peft itself adds)."""

from __future__ import annotations

import pytest

import resattn_diffusion as rd
from benchmarks.parameter_table import peft_lora_row, readme_table
from resattn_diffusion.parameter_table import count_tuner_parameters, parameter_table
from resattn_diffusion.testing import tiny_unet_config, unet_from_config


def test_the_library_table_has_every_tuner_and_no_peer():
    config = tiny_unet_config("sd1")
    table = parameter_table(config)
    assert all(f"`{name}`" in table for name in rd.tuner_names())
    assert "peft" not in table
    count = count_tuner_parameters(config, rd.ResTunerConfig(tuner="res_lora", rank=2))
    unet = unet_from_config(config)
    rd.add_res_tuner(unet, rd.ResTunerConfig(tuner="res_lora", rank=2))
    assert count == sum(p.numel() for p in rd.res_tuner_parameters(unet))


def test_the_peft_lora_row_counts_what_peft_adds():
    from peft import LoraConfig

    config = tiny_unet_config("sd1")
    unet = unet_from_config(config)
    unet.add_adapter(LoraConfig(r=3, lora_alpha=3, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    added = sum(p.numel() for name, p in unet.named_parameters() if "lora_" in name)
    assert peft_lora_row(config, 3)[-1] == added > 0
    assert "| peft LoRA (diffusers) | `B A x` | r=4 |" in readme_table(config)


@pytest.mark.parametrize(
    "change",
    [{"cross_attention_dim": -5}, {"block_out_channels": [3, 5, 7, 9]}, {"down_block_types": ["NoSuchBlock2D"] * 4}],
    ids=["negative width", "groups do not divide", "unknown block"],
)
def test_a_config_that_builds_no_unet_is_a_config_error_naming_it(change):
    """``count_tuner_parameters`` on a crafted config: the project's ConfigError, not diffusers' or torch's raw
    ValueError / RuntimeError from inside the UNet's constructor."""
    from resattn_diffusion.testing import SD15_UNET_CONFIG

    with pytest.raises(rd.ConfigError, match="this config does not build a UNet2DConditionModel"):
        count_tuner_parameters({**SD15_UNET_CONFIG, **change}, rd.ResTunerConfig("res_attn"))
