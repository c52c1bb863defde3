"""``--peft_method lora`` (benchmarks.peers) saves a LoRA that a stock diffusers pipeline loads with
``load_lora_weights``: diffusers' layout (``unet.``-prefixed keys in ``pytorch_lora_weights.safetensors``), which it
picks from the folder, and the images change exactly as with the project's own loader (issue 12, part 3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from benchmarks.peers import train as peers_train
from benchmarks.peers.trainables import load_tuned_pipeline
from resattn_diffusion.testing import unet_inputs


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_a_trained_peft_lora_loads_into_a_stock_pipeline(kind, tiny_dirs, tmp_path):
    from diffusers import DiffusionPipeline

    rng = np.random.default_rng(0)
    (tmp_path / "instance").mkdir()
    for index in range(2):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "instance" / f"{index}.png")
    saved = peers_train.main([
        "dreambooth", "--pretrained_model_name_or_path", str(tiny_dirs[kind]), "--output_dir", str(tmp_path / "out"),
        "--resolution", "32", "--train_batch_size", "1", "--max_train_steps", "2", "--report_to", "none",
        "--seed", "0", "--learning_rate", "5e-2", "--instance_data_dir", str(tmp_path / "instance"),
        "--instance_prompt", "a sks dog",
        "--peft_method", "lora", "--peft_rank", "2",
    ])  # fmt: skip
    keys = list(load_file(saved / "pytorch_lora_weights.safetensors"))
    assert keys and all(key.startswith("unet.") for key in keys)

    def images(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe(
            "a sks dog", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt"
        ).images

    base = DiffusionPipeline.from_pretrained(str(tiny_dirs[kind]))
    before = images(base)
    base.load_lora_weights(str(saved))  # a stock pipeline, the folder as the run wrote it, no weight_name
    after = images(base)
    assert (after - before).abs().max() > 1e-3, "load_lora_weights ignored the trained LoRA"
    ours = load_tuned_pipeline(tiny_dirs[kind], tmp_path / "out")
    with torch.no_grad():
        inputs = unet_inputs(base.unet, batch_size=1, seed=0)
        torch.testing.assert_close(base.unet(**inputs).sample, ours.unet(**inputs).sample, rtol=1e-5, atol=1e-6)
