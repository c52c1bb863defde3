#!/usr/bin/env python
"""Text-to-image fine-tuning with a res tuner: a style or domain from captioned images, on a frozen SD 1.x / 2.x /
SDXL, SD3 or Flux model (SD3 and Flux are detected from the folder and trained with rectified flow).

    accelerate launch train_text2img.py \\
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --train_data_dir ./paintings --caption_dropout 0.1 --random_flip \\
        --tuner res_attn --rank 8 --heads 2 --output_dir ./painting-style --max_train_steps 2000

Data: --train_data_dir (images + metadata.jsonl with "file_name" and a caption column, or same-named .txt
captions) or --dataset_name (a `datasets` name or local path) with --image_column / --caption_column.
Flags follow diffusers' train_text_to_image_lora.py; see --help for the tuner flags. The result,
output_dir/res_tuner.safetensors, loads with pipe.load_res_tuner(output_dir) on the pipelines/ classes, or
resattn_diffusion.load_res_tuner(pipe.unet or pipe.transformer, output_dir).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from resattn_diffusion.training import parse_args, run_script, train


def main(argv: Sequence[str] | None = None) -> Path:
    """Parse the flags (``argv``, default ``sys.argv[1:]``) and train; returns the saved tuner file."""
    args = parse_args("text2img", argv)
    return train(args)


if __name__ == "__main__":
    run_script(main)
