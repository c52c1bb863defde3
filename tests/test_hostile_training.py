"""The training scripts given crafted files (an attacker's pass): ``--resume_from_checkpoint`` with crafted or
foreign checkpoint folders is refused with a ``TrainingError`` naming the checkpoint, leaving the output folder of the
run it belongs to as it was; a ``--tuner_config`` that is not text is a usage error naming it.

The README's "What is refused and why" table has one row per case.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import train_dreambooth
from resattn_diffusion.testing import reset_accelerate_state
from resattn_diffusion.training import TrainingError


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    reset_accelerate_state()


def _args(model: Path, output_dir: Path, data: Path, steps: int, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(model), "--output_dir", str(output_dir), "--resolution", "32",
        "--train_batch_size", "1", "--max_train_steps", str(steps), "--report_to", "none", "--seed", "0",
        "--learning_rate", "1e-3", "--checkpointing_steps", "1", "--instance_data_dir", str(data),
        "--instance_prompt", "a photo of sks dog", *extra,
    ]  # fmt: skip


def _files(folder: Path) -> dict[str, str]:
    """Every file of an output folder (its logs aside) with a hash of its bytes."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and "logs" not in path.relative_to(folder).parts
    }


@pytest.fixture(scope="module")
def sd2_run(tmp_path_factory: pytest.TempPathFactory, tiny_dirs) -> Path:
    """A finished 1-step DreamBooth run on the tiny SD 2 model, with its checkpoint."""
    root = tmp_path_factory.mktemp("sd2_run")
    data = root / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for index in range(2):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(data / f"{index}.png")
    train_dreambooth.main(_args(tiny_dirs["sd2"], root / "run", data, 1))
    reset_accelerate_state()
    assert (root / "run" / "checkpoint-1" / "training_state.json").is_file()
    return root


def test_a_checkpoint_of_another_base_model_is_refused_and_the_run_folder_kept(sd2_run: Path, tiny_dirs, tmp_path):
    """The SD 2 run's checkpoint resumed with the SD 1 model (same tuner flags): the refusal was the first tensor of
    another shape, and came after ``args.json`` and ``tuner_config.json`` of the SD 2 run had been overwritten with
    the SD 1 run's."""
    run = tmp_path / "run"
    shutil.copytree(sd2_run / "run", run)
    before = _files(run)
    argv = _args(tiny_dirs["sd1"], run, sd2_run / "data", 2, "--resume_from_checkpoint", "checkpoint-1")
    with pytest.raises(TrainingError, match=r"(?s)checkpoint-1.*another base model.*made for"):
        train_dreambooth.main(argv)
    assert _files(run) == before


@pytest.mark.parametrize(
    "state",
    ["{not json", "[1]", '{"seed": 0}', '{"global_step": "3", "seed": 0}', '{"global_step": -1}', "\xff\xfe"],
    ids=["not JSON", "a list", "no global_step", "a string step", "a negative step", "not UTF-8"],
)
def test_a_damaged_training_state_is_refused_naming_it(sd2_run: Path, tiny_dirs, tmp_path, state: str):
    """``training_state.json`` that is not JSON, not an object, or without a whole-number ``global_step`` was a raw
    ``JSONDecodeError``, ``AttributeError`` or ``KeyError`` (the last after the model had loaded and args.json had
    been rewritten)."""
    run = tmp_path / "run"
    shutil.copytree(sd2_run / "run", run)
    (run / "checkpoint-1" / "training_state.json").write_bytes(state.encode("latin-1"))
    before = _files(run)
    argv = _args(tiny_dirs["sd2"], run, sd2_run / "data", 2, "--resume_from_checkpoint", "checkpoint-1")
    with pytest.raises(TrainingError, match=r"checkpoint-1.*training_state\.json"):
        train_dreambooth.main(argv)
    assert _files(run) == before


def test_a_binary_tuner_config_is_a_usage_error_naming_it(tmp_path, capsys):
    """``--tuner_config`` pointing at a binary file (a .safetensors passed by mistake) was a raw
    ``UnicodeDecodeError`` from argument parsing."""
    from resattn_diffusion.training.args import parse_args

    config = tmp_path / "res_tuner.safetensors"
    config.write_bytes(b"\xff\xfe\x00binary")
    (tmp_path / "data").mkdir()
    argv = ["--pretrained_model_name_or_path", str(tmp_path / "model"), "--instance_data_dir", str(tmp_path / "data")]
    with pytest.raises(SystemExit) as exit_info:
        parse_args("dreambooth", [*argv, "--instance_prompt", "a sks dog", "--tuner_config", str(config)])
    assert exit_info.value.code == 2
    assert "res_tuner.safetensors' is not UTF-8 text" in capsys.readouterr().err


@pytest.mark.parametrize(
    "line,needle",
    [
        ('{"file_name": 5, "text": "a dog"}', '"file_name" must be the path'),
        ('{"file_name": ["0.png"], "text": "a dog"}', '"file_name" must be the path'),
        ('{"file_name": "/etc/hostname", "text": "a dog"}', '"file_name" must be the path'),
        ('{"file_name": "../0.png", "text": "a dog"}', '"file_name" must be the path'),
        ('{"file_name": "0.png", "text": ["a dog"]}', 'caption "text" must be a string'),
        ('{"file_name": "0.png", "text": null}', 'caption "text" must be a string'),
    ],
)
def test_a_crafted_metadata_line_is_refused_before_training(tmp_path: Path, line: str, needle: str):
    """``metadata.jsonl`` of ``--train_data_dir``: a file name that is not a string was a raw ``TypeError``, one out
    of the folder was read from there, and a caption that is not a string reached the tokenizer mid-training."""
    from resattn_diffusion.training.data import read_image_folder
    from resattn_diffusion.training.errors import TrainingDataError

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "0.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "0.png", "text": "a cat"}\n' + line + "\n")
    with pytest.raises(TrainingDataError, match=rf"metadata\.jsonl.* line 2: .*{re.escape(needle)}"):
        read_image_folder(tmp_path, "text")


def test_captions_that_are_not_text_are_refused_naming_the_file(tmp_path: Path):
    """A ``.txt`` caption or a ``metadata.jsonl`` in another encoding was a raw ``UnicodeDecodeError``."""
    from resattn_diffusion.training.data import read_image_folder
    from resattn_diffusion.training.errors import TrainingDataError

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "0.png")
    (tmp_path / "0.txt").write_bytes("un chien très mignon".encode("latin-1"))
    with pytest.raises(TrainingDataError, match=r"0\.txt' is not UTF-8"):
        read_image_folder(tmp_path, "text")
    (tmp_path / "metadata.jsonl").write_bytes('{"file_name": "0.png", "text": "très"}'.encode("latin-1"))
    with pytest.raises(TrainingDataError, match=r"metadata\.jsonl' is not UTF-8"):
        read_image_folder(tmp_path, "text")


def test_a_checkpoint_tuner_file_without_a_config_is_refused_naming_it(sd2_run: Path, tiny_dirs, tmp_path):
    """The checkpoint's ``res_tuner.safetensors`` with its ``config`` metadata removed was a raw ``KeyError:
    'config'``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    import resattn_diffusion as rd

    run = tmp_path / "run"
    shutil.copytree(sd2_run / "run", run)
    file = run / "checkpoint-1" / "res_tuner.safetensors"
    with safe_open(str(file), framework="pt") as f:
        metadata = {k: v for k, v in f.metadata().items() if k != "config"}
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    save_file(tensors, str(file), metadata=metadata)
    before = _files(run)
    argv = _args(tiny_dirs["sd2"], run, sd2_run / "data", 2, "--resume_from_checkpoint", "checkpoint-1")
    with pytest.raises(rd.ResTunerFileError, match=r"checkpoint-1/res_tuner\.safetensors.*'config'"):
        train_dreambooth.main(argv)
    assert _files(run) == before


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--max_grad_norm", "-1"], "--max_grad_norm must be >= 0"),  # clip_grad_norm_ flipped every gradient
        (["--snr_gamma", "-5"], "--snr_gamma must be > 0"),  # negative Min-SNR weights: the loss was climbed
        (["--snr_gamma", "0"], "--snr_gamma must be > 0"),  # every step weighted by 0: nothing trained
        (["--prior_loss_weight", "-1", "--with_prior_preservation"], "--prior_loss_weight must be >= 0"),
        (["--tuner_scale", "0"], "the tuner's scale is 0"),  # no gradient reached the tuner: nothing trained
        (["--tuner_config", "SCALE0_CONFIG"], "the tuner's scale is 0"),
        (["--adam_beta1", "1"], "--adam_beta1 must be in [0, 1)"),  # torch's raw ValueError, after loading
        (["--adam_beta2", "-0.5"], "--adam_beta2 must be in [0, 1)"),
        (["--adam_epsilon=-1e-8"], "--adam_epsilon must be >= 0"),
        (["--adam_weight_decay", "-0.01"], "--adam_weight_decay must be >= 0"),
        (["--lr_power", "-1"], "--lr_power must be >= 0"),  # ZeroDivisionError at the last step
        (["--lr_warmup_steps", "-3"], "--lr_warmup_steps must be >= 0"),
        (["--dataloader_num_workers", "-1"], "--dataloader_num_workers must be >= 0"),
        (["--sample_batch_size", "0"], "--sample_batch_size must be >= 1"),
        (["--validation_inference_steps", "0"], "--validation_inference_steps must be >= 1"),
        (["--seed", "-1"], "--seed must be >= 0"),  # numpy's raw ValueError in set_seed, after the run folder
        (["--seed", str(2**32)], "--seed must be at most 2**32 - 1"),
        (["--train_batch_size", "0"], "--train_batch_size must be >= 1"),  # the counts share the one bounds table
    ],
)
def test_numbers_that_parse_but_cannot_train_are_usage_errors(tmp_path, capsys, flags: list[str], needle: str):
    """Each of these trained wrongly without a word (gradient ascent, or no gradient at all) or failed with torch's or
    numpy's raw error once the models had loaded; they are now usage errors before anything is loaded or written."""
    _check_usage_error("dreambooth", tmp_path, capsys, flags, needle)


def test_a_negative_sample_count_is_a_usage_error(tmp_path, capsys):
    """``train_text2img.py --max_train_samples -1`` trained on all examples but one (a slice's -1), silently."""
    _check_usage_error("text2img", tmp_path, capsys, ["--max_train_samples", "-1"], "--max_train_samples must be >= 1")


def _check_usage_error(task: str, tmp_path: Path, capsys, flags: list[str], needle: str) -> None:
    from resattn_diffusion.training.args import parse_args

    (tmp_path / "data").mkdir()
    (tmp_path / "scale0.json").write_text('{"tuner": "res_lora", "scale": 0}')
    flags = [str(tmp_path / "scale0.json") if flag == "SCALE0_CONFIG" else flag for flag in flags]
    data_flag = "--instance_data_dir" if task == "dreambooth" else "--train_data_dir"
    argv = ["--pretrained_model_name_or_path", str(tmp_path / "model"), data_flag, str(tmp_path / "data")]
    if task == "dreambooth":
        argv += ["--instance_prompt", "a sks dog", "--class_data_dir", str(tmp_path / "class"), "--class_prompt", "a"]
    with pytest.raises(SystemExit) as exit_info:
        parse_args(task, [*argv, "--output_dir", str(tmp_path / "out"), *flags])
    assert exit_info.value.code == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
