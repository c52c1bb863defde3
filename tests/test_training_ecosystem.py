"""Training flags diffusers users rely on, the model card and Hub upload (huggingface_hub monkeypatched: no
network), the quiet console, and offline-fast model lookups."""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train_dreambooth
from resattn_diffusion.hub import ModelSourceError, check_pretrained_source
from resattn_diffusion.training import TrainingError
from resattn_diffusion.training.args import args_to_json, parse_args
from resattn_diffusion.training.data import ImageTransform
from resattn_diffusion.training.user_flags import INTERPOLATION_MODES, make_optimizer


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("instance")
    rng = np.random.default_rng(0)
    for index in range(2):
        Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    return folder


def _argv(model, out, instance_dir, *extra):
    return [
        "--pretrained_model_name_or_path", str(model), "--output_dir", str(out), "--resolution", "32",
        "--train_batch_size", "1", "--max_train_steps", "2", "--report_to", "none", "--seed", "0",
        "--instance_data_dir", str(instance_dir), "--instance_prompt", "a photo of sks dog", *extra,
    ]  # fmt: skip


def _parse(*flags):
    return parse_args(
        "dreambooth",
        ["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d", "--instance_prompt", "p", *flags],
    )


# --- flags -------------------------------------------------------------------------------------------------------
def test_prodigy_flags_reach_the_optimizer():
    pytest.importorskip("prodigyopt")
    args = _parse(
        "--optimizer", "Prodigy", "--learning_rate", "1.0", "--prodigy_beta3", "0.9", "--prodigy_decouple", "false",
        "--prodigy_use_bias_correction", "true", "--prodigy_safeguard_warmup", "False", "--adam_weight_decay", "0.01",
    )  # fmt: skip
    optimizer = make_optimizer(args, [torch.nn.Parameter(torch.zeros(3))], args.learning_rate)
    group = optimizer.param_groups[0]
    assert type(optimizer).__name__ == "Prodigy"
    assert (group["beta3"], group["decouple"], group["use_bias_correction"], group["safeguard_warmup"]) == (
        0.9,
        False,
        True,
        False,
    )
    assert group["weight_decay"] == 0.01 and group["lr"] == 1.0
    adamw = make_optimizer(_parse(), [torch.nn.Parameter(torch.zeros(3))], 1e-4)
    assert isinstance(adamw, torch.optim.AdamW)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--repeats", "0"], "--repeats must be at least 1"),
        (["--optimizer", "prodigy", "--use_8bit_adam"], "no 8-bit variant"),
        (["--push_checkpoints_to_hub"], "add --push_to_hub"),
        (["--push_to_hub", "--hub_token", "secret", "--report_to", "wandb"], "expose the token"),
        (["--export_lora_rank", "4"], "add --export_lora"),
        (["--prodigy_decouple", "maybe"], "expected true or false"),
        (["--image_interpolation_mode", "cubic"], "invalid choice"),
    ],
)
def test_bad_flag_combinations_exit_with_what_to_do(flags, message, capsys):
    with pytest.raises(SystemExit):
        _parse(*flags)
    assert message in capsys.readouterr().err


def test_local_rank_is_accepted_and_the_environment_wins(monkeypatch):
    assert _parse("--local_rank", "3").local_rank == 3
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert _parse("--local_rank", "0").local_rank == 1


def test_hub_token_never_reaches_args_json():
    assert "hub_token" not in args_to_json(_parse("--push_to_hub", "--hub_token", "hf_secret"))


def test_repeats_and_interpolation_shape_the_dataset(instance_dir):
    from resattn_diffusion.training.data import list_images
    from resattn_diffusion.training.loop import make_dataset

    args = _parse("--repeats", "3", "--image_interpolation_mode", "lanczos")
    dataset = make_dataset(args, list_images(instance_dir, "x"), 32, seed=0)
    assert len(dataset) == 3 * 2 and dataset.transform.interpolation == Image.Resampling.LANCZOS
    image = Image.open(next(instance_dir.iterdir())).convert("RGB")
    lanczos = dataset.transform(image, random.Random(0))[0]
    bilinear = ImageTransform(32, interpolation=INTERPOLATION_MODES["bilinear"])(image, random.Random(0))[0]
    assert not torch.equal(lanczos, bilinear)


# --- model card, export, upload, quiet console ------------------------------------------------------------------
class FakeHub:
    """Records huggingface_hub.create_repo / upload_folder calls; uploads fail when ``fail`` is set."""

    def __init__(self, monkeypatch, fail: bool = False):
        import huggingface_hub

        self.created, self.uploads, self.fail = [], [], fail
        monkeypatch.setattr(huggingface_hub, "create_repo", self.create_repo)
        monkeypatch.setattr(huggingface_hub, "upload_folder", self.upload_folder)

    def create_repo(self, repo_id, token=None, private=False, exist_ok=False, **kwargs):
        self.created.append((repo_id, token, private))
        return type("RepoUrl", (), {"repo_id": f"someone/{repo_id}"})()

    def upload_folder(self, repo_id, folder_path, commit_message, token=None, ignore_patterns=None, **kwargs):
        self.uploads.append((repo_id, commit_message, sorted(p.name for p in Path(folder_path).iterdir())))
        if self.fail:
            raise ConnectionError("the Hub is down")


def test_training_writes_a_model_card_exports_and_uploads_quietly(
    tiny_dirs, instance_dir, tmp_path, monkeypatch, capfd
):
    hub = FakeHub(monkeypatch)
    out = tmp_path / "sks-dog"
    train_dreambooth.main(
        _argv(
            tiny_dirs["sd1"], out, instance_dir, "--tuner", "glora", "--checkpointing_steps", "1",
            "--validation_prompt", "a dog", "--num_validation_images", "1", "--validation_inference_steps", "2",
            "--export_lora", "diffusers", "--push_to_hub", "--push_checkpoints_to_hub", "--hub_token", "hf_secret",
        )
    )  # fmt: skip
    console = capfd.readouterr().err
    card = (out / "README.md").read_text()
    # the card: base model, tuner config, flags, validation image, how to load (tuner and LoRA), diffusers metadata
    assert f"base_model: {tiny_dirs['sd1']}" in card and "library_name: diffusers" in card
    assert "- glora" in card and '"tuner": "glora"' in card and "| `--max_train_steps` | `2` |" in card
    assert "validation/final.png" in card and (out / "validation" / "final.png").exists()
    assert 'pipe.load_res_tuner("someone/sks-dog")' in card and 'weight_name="lora_diffusers.safetensors"' in card
    assert "hf_secret" not in card and "hf_secret" not in (out / "args.json").read_text()
    # the upload: repo created before training, each checkpoint, then the end with the card and the LoRA
    assert hub.created == [("sks-dog", "hf_secret", False)]
    assert [message for _, message, _ in hub.uploads] == ["checkpoint 1", "checkpoint 2", "End of training"]
    assert {"README.md", "res_tuner.safetensors", "lora_diffusers.safetensors"} <= set(hub.uploads[-1][2])
    # the console: our messages only; library chatter is in the log file
    for chatter in ("accelerate", "Loading weights", "torchvision", "INFO", "FutureWarning", "Saving current state"):
        assert chatter not in console, chatter
    assert "saved checkpoint" in console and "model card" in console
    assert "Saving current state" in (out / "logs" / "train.log").read_text()


def test_a_failed_upload_is_an_error_that_keeps_everything_on_disk(tiny_dirs, instance_dir, tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch, fail=True)
    out = tmp_path / "out"
    with pytest.raises(TrainingError, match="Everything is still in"):
        train_dreambooth.main(
            _argv(
                tiny_dirs["sd1"],
                out,
                instance_dir,
                "--checkpointing_steps",
                "1",
                "--push_to_hub",
                "--push_checkpoints_to_hub",
            )
        )
    assert len(hub.uploads) == 3  # a failed checkpoint upload does not stop training; the final one raises
    assert (
        (out / "res_tuner.safetensors").exists() and (out / "README.md").exists() and (out / "checkpoint-2").is_dir()
    )


def test_export_lora_is_refused_before_training_for_a_branch_tuner(tiny_dirs, instance_dir, tmp_path):
    start = time.perf_counter()
    with pytest.raises(TrainingError, match="not a weight-space tuner"):
        train_dreambooth.main(
            _argv(tiny_dirs["sd1"], tmp_path / "o", instance_dir, "--tuner", "res_attn", "--export_lora", "kohya")
        )
    assert time.perf_counter() - start < 5 and not (tmp_path / "o" / "res_tuner.safetensors").exists()


# --- offline-fast lookups ----------------------------------------------------------------------------------------
def test_a_missing_repo_id_fails_in_seconds_offline_with_what_to_pass(tiny_dirs, instance_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(ModelSourceError, match="Pass a local folder") as error:
        train_dreambooth.main(
            ["--pretrained_model_name_or_path", "someone/not-here"]
            + _argv(tiny_dirs["sd1"], tmp_path / "o", instance_dir)[2:]
        )
    assert time.perf_counter() - start < 5
    assert "HF_HUB_OFFLINE" in str(error.value) and "hf download someone/not-here" in str(error.value)
    with pytest.raises(ModelSourceError, match="no such file or folder"):
        check_pretrained_source("./models/../sd-1.5", "--pretrained_model_name_or_path")
    check_pretrained_source(tiny_dirs["sd1"], "--pretrained_model_name_or_path")  # a local folder passes


@pytest.mark.parametrize("name", ["./sd-1.5-", "user/model.", "user/a--b", "a" * 97, "user/.model", "u/" + "b" * 97])
def test_a_missing_path_the_hub_would_refuse_as_a_repo_id_is_a_missing_path(name, tmp_path, monkeypatch):
    """A path typo shaped almost like a repo id (a trailing ``-`` or ``.``, ``--``, over 96 characters) was passed to
    huggingface_hub, whose raw ``HFValidationError`` came out of training, evaluation, search and load_res_tuner."""
    from pipelines import ResTunerStableDiffusionPipeline
    from resattn_diffusion.integration.io import ResTunerFileError
    from resattn_diffusion.testing import tiny_pipeline

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelSourceError, match="no such file or folder"):
        check_pretrained_source(name, "--pretrained_model_name_or_path")
    pipe = ResTunerStableDiffusionPipeline(**tiny_pipeline("sd1").components)
    with pytest.raises(ResTunerFileError, match="the path does not exist"):
        pipe.load_res_tuner(name)


@pytest.mark.parametrize(
    "raised, reason",
    [(ConnectionError("no route"), "cannot be reached"), ("missing", "no such repo"), ("gated", "gated")],
)
def test_hub_lookup_reasons_without_network(raised, reason, monkeypatch):
    import huggingface_hub
    import huggingface_hub.constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    from resattn_diffusion import hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    hub._probe.cache_clear()
    response = type("Response", (), {"status_code": 404, "headers": {}, "request": None, "url": "u", "text": ""})()
    errors = {"missing": RepositoryNotFoundError, "gated": GatedRepoError}

    def model_info(self, repo_id, **kwargs):
        if isinstance(raised, Exception):
            raise raised
        raise errors[raised]("nope", response=response)

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(hub, "hub_unreachable_reason", lambda: None)  # a connection: the request decides
    with pytest.raises(ModelSourceError, match=reason):
        check_pretrained_source("someone/model", "--pipeline")
    hub._probe.cache_clear()


def test_quiet_libraries_sends_library_records_to_the_file_and_ours_to_the_console(tmp_path, capfd):
    from resattn_diffusion.quiet import quiet_libraries

    quiet_libraries(tmp_path / "run.log")
    logging.getLogger("transformers.modeling_utils").warning("library chatter")
    logging.getLogger("accelerate.checkpointing").info("Saving current state")
    logging.getLogger("resattn_diffusion.training.loop").info("our message")
    err = capfd.readouterr().err
    assert "our message" in err and "library chatter" not in err and "Saving current state" not in err
    text = (tmp_path / "run.log").read_text()
    assert "library chatter" in text and "Saving current state" in text and "our message" in text
    quiet_libraries(None)  # detach the file again
