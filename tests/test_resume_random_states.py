"""Exact resume with randomness inside the forward pass, and checkpoints whose random states are damaged (issue 12,
part 3). Dropout draws from torch's global RNG, which DataLoader iteration also advances: the training core seeds
it from (seed, process, epoch, batch) before every forward, so an interrupted and resumed run equals the
uninterrupted one bit for bit. A checkpoint whose ``random_states_0.pkl`` is missing or corrupt is refused unless
``--allow_inexact_resume`` accepts an inexact resume, which then warns loudly.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import train_text2img
from resattn_diffusion.testing import reset_accelerate_state
from resattn_diffusion.training import TrainingError


class SimulatedCrash(Exception):
    pass


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    reset_accelerate_state()


@pytest.fixture(scope="module")
def text2img_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("resume_data")
    rng = np.random.default_rng(5)
    with open(folder / "metadata.jsonl", "w", encoding="utf-8") as f:
        for index in range(3):
            Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(folder / f"{index}.png")
            f.write(json.dumps({"file_name": f"{index}.png", "text": f"a painting of a dog {index}"}) + "\n")
    return folder


def run_args(model: Path, output_dir: Path, data: Path, steps: int, extra: list[str] = ()) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(model), "--output_dir", str(output_dir), "--resolution", "32",
        "--train_batch_size", "1", "--max_train_steps", str(steps), "--report_to", "none", "--seed", "0",
        "--learning_rate", "1e-3", "--train_data_dir", str(data), "--checkpointing_steps", "2", *extra,
    ]  # fmt: skip


def crash_after(monkeypatch, batches: int) -> None:
    from resattn_diffusion.training import loop

    original, calls = loop.diffusion_loss, []

    def crashing_loss(*args, **kwargs):
        calls.append(1)
        if len(calls) > batches:
            raise SimulatedCrash
        return original(*args, **kwargs)

    monkeypatch.setattr(loop, "diffusion_loss", crashing_loss)


def interrupted_run(model: Path, output_dir: Path, data: Path, steps: int, extra: list[str], monkeypatch) -> list[str]:
    """A run that dies after its checkpoint at step 2; returns its arguments (to resume with)."""
    args = run_args(model, output_dir, data, steps, extra)
    with monkeypatch.context() as patch:
        crash_after(patch, 2)
        with pytest.raises(SimulatedCrash):
            train_text2img.main(args)
    reset_accelerate_state()
    assert (output_dir / "checkpoint-2" / "random_states_0.pkl").is_file()
    return args


@pytest.mark.parametrize("tuner", ["res_attn", "res_lora"])
def test_resume_with_tuner_dropout_is_exact(tuner, tiny_dirs, text2img_data, tmp_path, monkeypatch):
    extra = ["--tuner", tuner, "--tuner_arg", "dropout=0.1"]
    straight = train_text2img.main(run_args(tiny_dirs["sd1"], tmp_path / "straight", text2img_data, 5, extra))
    reset_accelerate_state()
    args = interrupted_run(tiny_dirs["sd1"], tmp_path / "resumed", text2img_data, 5, extra, monkeypatch)
    resumed = train_text2img.main(args + ["--resume_from_checkpoint", "latest"])
    a, b = load_file(straight), load_file(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "missing", "foreign"])
def test_damaged_random_states_are_refused_unless_an_inexact_resume_is_accepted(
    damage, tiny_dirs, text2img_data, tmp_path, monkeypatch, caplog
):
    args = interrupted_run(tiny_dirs["sd1"], tmp_path / "run", text2img_data, 4, [], monkeypatch)
    states = tmp_path / "run" / "checkpoint-2" / "random_states_0.pkl"
    if damage == "corrupt":
        states.write_bytes(b"\x80\x04not a pickle at all")
    elif damage == "truncated":
        states.write_bytes(states.read_bytes()[:100])
    elif damage == "missing":
        states.unlink()
    else:
        torch.save({"something": 1}, states)
    with pytest.raises(TrainingError, match=r"random_states_0\.pkl.*--allow_inexact_resume"):
        train_text2img.main(args + ["--resume_from_checkpoint", "latest"])
    reset_accelerate_state()
    assert not (tmp_path / "run" / "res_tuner.safetensors").exists()

    with caplog.at_level(logging.WARNING):
        result = train_text2img.main(args + ["--resume_from_checkpoint", "latest", "--allow_inexact_resume"])
    assert result.is_file()
    assert any(
        "INEXACT RESUME" in record.getMessage() and record.levelno >= logging.WARNING for record in caplog.records
    )
