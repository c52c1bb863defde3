"""One copy of each helper (issue 13): image folders and files, the training transform the search reuses, SDXL's
time ids, the prediction target, the validation grid, and the tuner-file key format with the checks every load
(including a checkpoint's in-place load) goes through."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

import resattn_diffusion as rd
from resattn_diffusion import images as images_io
from resattn_diffusion.evaluation import EvaluationError
from resattn_diffusion.evaluation import list_images as evaluation_list_images
from resattn_diffusion.integration.io import (
    ResTunerFileError,
    load_tuner_tensors,
    tuner_file_key,
    tuner_state_dict,
)
from resattn_diffusion.search.cli import load_image_tensor, read_captioned_images
from resattn_diffusion.testing import frozen_tiny_unet, randomize_tuner
from resattn_diffusion.training import TrainingDataError
from resattn_diffusion.training.checkpoint import load_tuner_weights_in_place
from resattn_diffusion.training.data import ImageTransform, load_image
from resattn_diffusion.training.data import list_images as training_list_images
from resattn_diffusion.training.models import sdxl_time_ids
from resattn_diffusion.training.objective import prediction_target
from resattn_diffusion.training.validation import image_grid


def save_image(path, size=(40, 24), seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def test_one_set_of_image_extensions_with_each_callers_error(tmp_path):
    for name in ("a.png", "b.GIF", "c.tiff", "d.webp"):
        save_image(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    expected = sorted(tmp_path / name for name in ("a.png", "b.GIF", "c.tiff", "d.webp"))
    assert training_list_images(tmp_path, "--instance_data_dir") == expected
    assert evaluation_list_images(tmp_path) == expected
    assert images_io.count_images(tmp_path) == 4 and images_io.count_images(tmp_path / "missing") == 0
    with pytest.raises(TrainingDataError, match="--instance_data_dir .* does not exist"):
        training_list_images(tmp_path / "missing", "--instance_data_dir")
    with pytest.raises(EvaluationError, match="does not exist"):
        evaluation_list_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvaluationError, match="holds no images"):
        evaluation_list_images(tmp_path / "empty")


def test_one_image_reader_with_each_callers_error(tmp_path):
    save_image(tmp_path / "good.png")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    assert load_image(tmp_path / "good.png", "good").size == (40, 24)
    with pytest.raises(TrainingDataError, match="broken.png"):
        load_image(broken, repr(str(broken)))
    with pytest.raises(EvaluationError, match="broken.png"):
        images_io.load_image(broken, None, EvaluationError)
    with pytest.raises(TrainingDataError, match="not an image or an image path"):
        load_image(3.0, "row 0")


def test_the_search_reads_held_out_images_as_training_does(tmp_path):
    save_image(tmp_path / "0.png", size=(40, 24))
    (tmp_path / "0.txt").write_text("a red dog")
    assert read_captioned_images(tmp_path) == [(tmp_path / "0.png", "a red dog")]
    pixels, original, crop = load_image_tensor(tmp_path / "0.png", 16)
    expected = ImageTransform(16, center_crop=True)(load_image(tmp_path / "0.png", "x"), None)
    torch.testing.assert_close(pixels, expected[0], rtol=0, atol=0)
    assert (original, crop) == (expected[1], expected[2]) == ((24, 40), (0, 5))
    (tmp_path / "1.png").write_bytes(b"")
    with pytest.raises(TrainingDataError, match="1.png"):
        read_captioned_images(tmp_path)
    with pytest.raises(TrainingDataError, match="held-out data folder"):
        read_captioned_images(tmp_path / "missing")


def test_sdxl_time_ids():
    ids = sdxl_time_ids(torch.tensor([[24, 40], [32, 32]]), torch.tensor([[0, 3], [1, 2]]), 16)
    assert ids.tolist() == [[24, 40, 0, 3, 16, 16], [32, 32, 1, 2, 16, 16]]


def test_prediction_target_per_type():
    from diffusers import DDPMScheduler

    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    steps = torch.tensor([10, 500])
    for kind, expected in [("epsilon", noise), ("sample", latents)]:
        scheduler = DDPMScheduler(prediction_type=kind)
        assert prediction_target(scheduler, latents, noise, steps) is expected
    scheduler = DDPMScheduler(prediction_type="v_prediction")
    torch.testing.assert_close(
        prediction_target(scheduler, latents, noise, steps), scheduler.get_velocity(latents, noise, steps)
    )
    scheduler.register_to_config(prediction_type="flow")
    with pytest.raises(ValueError, match="unsupported prediction_type 'flow'"):
        prediction_target(scheduler, latents, noise, steps)


@pytest.mark.parametrize("count", [1, 3, 4, 5, 9])
def test_validation_grid_pads_the_last_row_white(count):
    images = [Image.new("RGB", (6, 4), (10 * i, 0, 0)) for i in range(count)]
    grid = image_grid(images)
    columns = min(4, count)
    assert grid.size == (6 * columns, 4 * math.ceil(count / 4))
    for index in range(count):
        assert grid.getpixel(((index % columns) * 6, (index // columns) * 4)) == (10 * index, 0, 0)
    if count % columns:
        assert grid.getpixel((grid.width - 1, grid.height - 1)) == (255, 255, 255)


def tuner_unet():
    unet = frozen_tiny_unet("sd1")
    rd.add_res_tuner(unet, rd.ResTunerConfig(tuner="res_lora", rank=2))
    return unet


def test_tuner_files_spell_keys_one_way():
    unet = tuner_unet()
    randomize_tuner(unet)
    tensors = tuner_state_dict(unet)
    path, tuner = next(iter(rd.integration.api.iter_tuners(unet, "default")))
    key = next(iter(tuner.state_dict()))
    assert tuner_file_key(path, key) == f"{path}.{key}" and tuner_file_key(path, key) in tensors


@pytest.mark.parametrize("damage", ["nan", "shape", "missing", "extra"])
def test_checkpoint_loads_go_through_the_file_checks_and_change_nothing_on_error(damage, tmp_path):
    unet = tuner_unet()
    randomize_tuner(unet, seed=1)
    rd.save_res_tuner(unet, tmp_path)
    before = [p.detach().clone() for p in rd.res_tuner_parameters(unet)]
    _, tensors = rd.integration.io.read_tuner_file(tmp_path)
    randomize_tuner(unet, seed=2)  # what the run has now; a bad file must leave it so
    now = [p.detach().clone() for p in rd.res_tuner_parameters(unet)]
    last_key = sorted(tensors)[-1]
    if damage == "nan":
        tensors[last_key] = torch.full_like(tensors[last_key], float("nan"))
    elif damage == "shape":
        tensors[last_key] = tensors[last_key][..., :1]
    elif damage == "missing":
        del tensors[last_key]
    else:
        tensors["somewhere.else.weight"] = torch.zeros(1)
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    file = tmp_path / "res_tuner.safetensors"
    with safe_open(str(file), framework="pt") as f:
        metadata = f.metadata()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "bad.safetensors"), metadata=metadata)
    with pytest.raises(ResTunerFileError):
        load_tuner_weights_in_place(unet, tmp_path / "bad.safetensors")
    for parameter, kept in zip(rd.res_tuner_parameters(unet), now):
        assert torch.equal(parameter, kept)
    # the good file loads in place: the same parameter objects, the saved values
    objects = [id(p) for p in rd.res_tuner_parameters(unet)]
    load_tuner_weights_in_place(unet, file)
    assert [id(p) for p in rd.res_tuner_parameters(unet)] == objects
    assert all(torch.equal(p, saved) for p, saved in zip(rd.res_tuner_parameters(unet), before))
    assert load_file(str(file)).keys() == tuner_state_dict(unet).keys()


def test_load_tuner_tensors_refuses_before_touching_anything():
    unet = tuner_unet()
    randomize_tuner(unet, seed=3)
    tensors = tuner_state_dict(unet)
    kept = [p.detach().clone() for p in rd.res_tuner_parameters(unet)]
    broken = {key: torch.zeros_like(value) for key, value in tensors.items()}
    last = list(tensors)[-1]  # the last layer loaded: an interleaved check-and-load would have zeroed the others
    broken[last] = torch.full_like(tensors[last], float("inf"))
    with pytest.raises(ResTunerFileError, match="NaN or inf"):
        load_tuner_tensors(unet, "default", broken, "file")
    assert all(torch.equal(p, k) for p, k in zip(rd.res_tuner_parameters(unet), kept))
