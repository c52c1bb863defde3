"""The training loop's callback interface: a GLoRA supernet samples its subnet through it (not a loop branch),
one subnet per optimizer step, a function of (seed, step) only. Tiny SD1 pipeline, CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import resattn_diffusion as rd
from resattn_diffusion.search.supernet import SubnetSampling, get_subnet, sample_subnet, training_callbacks
from resattn_diffusion.testing import frozen_tiny_unet
from resattn_diffusion.training import TrainingCallback, parse_args, train
from resattn_diffusion.training.data import derive_seed


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_only_a_supernet_brings_a_callback():
    unet = frozen_tiny_unet("sd1")
    rd.add_res_tuner(unet, rd.ResTunerConfig(tuner="glora", rank=2))
    assert training_callbacks(unet, seed=0) == []
    supernet = frozen_tiny_unet("sd1")
    rd.add_res_tuner(supernet, rd.ResTunerConfig(tuner="glora", supernet=True, rank=2))
    (callback,) = training_callbacks(supernet, seed=0)
    assert isinstance(callback, SubnetSampling) and isinstance(callback, TrainingCallback)


def test_subnet_sampling_is_one_subnet_per_step_from_seed_and_step():
    unet = frozen_tiny_unet("sd1")
    rd.add_res_tuner(unet, rd.ResTunerConfig(tuner="glora", supernet=True, rank=2))
    callback = SubnetSampling(seed=5)
    callback.on_step_begin(unet, 3)
    at_three = get_subnet(unet)
    other = sample_subnet(unet, torch.Generator().manual_seed(1))  # something else changes it ...
    assert other != at_three
    callback.on_step_begin(unet, 3)  # ... and a second batch of the same step does not draw again
    assert get_subnet(unet) == other
    fresh = SubnetSampling(seed=5)
    fresh.on_step_begin(unet, 3)
    assert get_subnet(unet) == at_three  # a resumed run draws the same subnet for the same step
    expected = sample_subnet(unet, torch.Generator().manual_seed(derive_seed(5, "glora_subnet", 4)))
    fresh.on_step_begin(unet, 4)
    assert get_subnet(unet) == expected


def test_a_supernet_trains_through_the_callback(tiny_dirs, tmp_path):
    folder = tmp_path / "instance"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(2):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    argv = [
        "--pretrained_model_name_or_path", str(tiny_dirs["sd1"]), "--output_dir", str(tmp_path / "out"),
        "--resolution", "32", "--train_batch_size", "1", "--max_train_steps", "3", "--report_to", "none",
        "--seed", "11", "--instance_data_dir", str(folder), "--instance_prompt", "a photo of sks dog",
        "--tuner", "glora", "--rank", "2", "--tuner_arg", "supernet=true",
    ]  # fmt: skip

    class LastSubnet(TrainingCallback):
        def on_step_begin(self, unet, global_step):
            self.step, self.subnet = global_step, get_subnet(unet)

    seen = LastSubnet()
    train(parse_args("dreambooth", argv), callbacks=[seen])
    reference = frozen_tiny_unet("sd1")
    rd.add_res_tuner(reference, rd.ResTunerConfig(tuner="glora", supernet=True, rank=2))
    expected = sample_subnet(reference, torch.Generator().manual_seed(derive_seed(11, "glora_subnet", 2)))
    # the provider's sampling ran before the caller's callback: the last step saw the subnet of (seed, step 2)
    assert seen.step == 2 and seen.subnet == expected
