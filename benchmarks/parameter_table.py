"""The README's parameter table: every tuner at its defaults on the SD 1.5 UNet, and peft LoRA r=4 beside them.

python -m benchmarks.parameter_table
"""

from __future__ import annotations

from benchmarks.perf.peers import lora_parameter_count
from resattn_diffusion.parameter_table import parameter_table
from resattn_diffusion.testing import SD15_UNET_CONFIG, unet_from_config


def peft_lora_row(unet_config: dict, rank: int = 4) -> tuple[str, str, str, str, int]:
    """diffusers/peft LoRA of ``rank`` on the attention projections: the standard the tuners are compared with."""
    count = lora_parameter_count(unet_from_config(unet_config), rank)
    return ("peft LoRA (diffusers)", "B A x", f"r={rank}", "attn1+attn2 (q,k,v,out)", count)


def readme_table(unet_config: dict = SD15_UNET_CONFIG) -> str:
    return parameter_table(unet_config, extra_rows=[peft_lora_row(unet_config)])


if __name__ == "__main__":
    print(readme_table())
