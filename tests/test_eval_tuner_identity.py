"""``resattn-eval generate`` keys finished images by the tuner file's content, not its path, and a Hub model that
cannot be reached fails in seconds with the flag to pass (issue 12, part 3)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

import resattn_diffusion as rd
from resattn_diffusion.evaluation import CLIPEncoder, EvaluationError, generate_images, list_images
from resattn_diffusion.evaluation.cli import main
from resattn_diffusion.testing import randomize_tuner, save_tiny_pipeline, tiny_pipeline, tiny_unet


def _tuner(path: Path, seed: int) -> Path:
    unet = tiny_unet("sd1")
    rd.add_res_tuner(unet, rd.ResTunerConfig("res_attn", rank=4, heads=2))
    randomize_tuner(unet, seed=seed, std=0.5)
    return rd.save_res_tuner(unet, path)


def test_replacing_the_tuner_file_at_the_same_path_is_not_mistaken_for_finished_work(tmp_path):
    pipeline = tiny_pipeline("sd1")
    tuner = _tuner(tmp_path / "tuner.safetensors", seed=1)
    settings = dict(seeds=[0, 1], num_inference_steps=2, tuner_path=tuner, progress=False)
    first = generate_images(pipeline, ["a photo of a dog"], tmp_path / "out", **settings)
    assert first.num_generated == 2
    again = generate_images(pipeline, ["a photo of a dog"], tmp_path / "out", **settings)
    assert again.num_reused == 2 and again.num_generated == 0  # same content: the work is kept
    images = {p.name: p.read_bytes() for p in list_images(tmp_path / "out")}

    shutil.copy(_tuner(tmp_path / "other.safetensors", seed=2), tuner)  # another tuner, same path
    with pytest.raises(EvaluationError, match="another tuner file at the same path.*new output folder"):
        generate_images(pipeline, ["a photo of a dog"], tmp_path / "out", **settings)
    assert {p.name: p.read_bytes() for p in list_images(tmp_path / "out")} == images  # nothing mixed in

    fresh = generate_images(pipeline, ["a photo of a dog"], tmp_path / "out2", **settings)
    assert fresh.num_generated == 2
    assert fresh.records[0]["tuner_sha256"] != first.records[0]["tuner_sha256"]


def test_the_cli_refuses_a_replaced_tuner_with_exit_status_2(tmp_path, capsys):
    pipeline_dir = save_tiny_pipeline("sd1", tmp_path / "pipe")
    tuner = _tuner(tmp_path / "run" / "res_tuner.safetensors", seed=1)
    common = [
        "--pipeline",
        str(pipeline_dir),
        "--prompt",
        "a dog",
        "--steps",
        "2",
        "--tuner",
        str(tuner.parent),
        "--out",
        str(tmp_path / "out"),
        "--device",
        "cpu",
        "--no-progress",
        "--seeds",
        "0",
    ]
    assert main(["generate", *common]) == 0
    _tuner(tuner, seed=3)  # retrained into the same output folder
    assert main(["generate", *common]) == 2
    assert "another tuner file at the same path" in capsys.readouterr().err


def test_an_unreachable_hub_model_fails_in_seconds_naming_the_flag(monkeypatch):
    from huggingface_hub import constants

    # offline mode (the test session sets HF_HUB_OFFLINE=1)
    start = time.perf_counter()
    with pytest.raises(EvaluationError, match="--clip-model"):
        CLIPEncoder("openai/clip-vit-large-patch14")
    assert time.perf_counter() - start < 5

    # not declared offline, but no connection: a Hub endpoint where nothing listens
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    start = time.perf_counter()
    with pytest.raises(EvaluationError, match=r"--clip-model .*Hub cannot be reached"):
        CLIPEncoder("openai/clip-vit-large-patch14")
    assert time.perf_counter() - start < 5
