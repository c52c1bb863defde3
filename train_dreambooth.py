#!/usr/bin/env python
"""DreamBooth with a res tuner: teach a frozen SD 1.x / 2.x / SDXL, SD3 or Flux model a subject from a few images.

    accelerate launch train_dreambooth.py \\
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --instance_data_dir ./dog --instance_prompt "a photo of sks dog" \\
        --with_prior_preservation --class_data_dir ./dog_class --class_prompt "a photo of dog" \\
        --tuner res_attn --rank 8 --heads 2 --output_dir ./sks-dog --max_train_steps 500

Flags follow diffusers' train_dreambooth_lora.py; the tuner flags are --tuner, --rank, --heads, --tuner_arg
KEY=VALUE, --targets, --blocks, --projections, --placement, --tuner_scale and --tuner_config (see --help).
SD3 and Flux folders are detected and trained with rectified flow as diffusers' train_dreambooth_lora_sd3.py /
_flux.py (--weighting_scheme, --guidance_scale, --max_sequence_length, ...).
The result, output_dir/res_tuner.safetensors, loads with pipe.load_res_tuner(output_dir) on the pipelines/ classes,
or resattn_diffusion.load_res_tuner(pipe.unet or pipe.transformer, output_dir).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from resattn_diffusion.training import parse_args, run_script, train


def main(argv: Sequence[str] | None = None) -> Path:
    """Parse the flags (``argv``, default ``sys.argv[1:]``) and train; returns the saved tuner file."""
    args = parse_args("dreambooth", argv)
    return train(args)


if __name__ == "__main__":
    run_script(main)
