"""The peers (benchmarks.peers): peft LoRA / GLoRA / C3A and full fine-tuning as training providers, trained by the
same training core as the res tuners, saved, and loaded back for evaluation; and the provider interface itself.
Tiny SD1 pipeline, CPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train_dreambooth
from benchmarks.peers import train as peers_train
from benchmarks.peers.trainables import PEFT_FOLDER, PEFT_WEIGHTS_NAME, default_c3a_block_size, load_tuned_pipeline
from resattn_diffusion.testing import unet_inputs


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("peer_data")
    rng = np.random.default_rng(0)
    (root / "instance").mkdir()
    (root / "captioned").mkdir()
    lines = []
    for index in range(3):
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "instance" / f"{index}.png")
        Image.fromarray(pixels).save(root / "captioned" / f"{index}.png")
        lines.append(json.dumps({"file_name": f"{index}.png", "text": f"a red dog {index}"}))
    (root / "captioned" / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return {"instance": root / "instance", "captioned": root / "captioned"}


def dreambooth_argv(model: Path, out: Path, images: dict[str, Path], *method: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(model), "--output_dir", str(out), "--resolution", "32",
        "--train_batch_size", "1", "--max_train_steps", "2", "--report_to", "none", "--seed", "0",
        "--learning_rate", "1e-2", "--instance_data_dir", str(images["instance"]),
        "--instance_prompt", "a photo of sks dog",
        *method,
    ]  # fmt: skip


def unet_output(pipe) -> torch.Tensor:
    with torch.no_grad():
        return pipe.unet(**unet_inputs(pipe.unet, batch_size=1, seed=0)).sample


@pytest.mark.parametrize(
    "method, expected_folder",
    [
        (["--peft_method", "lora", "--peft_rank", "2"], PEFT_FOLDER),
        (["--peft_method", "glora", "--peft_rank", "2"], PEFT_FOLDER),
        (["--peft_method", "c3a"], PEFT_FOLDER),
        (["--full_finetune"], "unet"),
    ],
)
def test_peers_train_save_and_load(method, expected_folder, tiny_dirs, images, tmp_path):
    from diffusers import DiffusionPipeline

    out = tmp_path / "out"
    saved = peers_train.main(["dreambooth", *dreambooth_argv(tiny_dirs["sd1"], out, images, *method)])
    assert saved == out / expected_folder and saved.is_dir()
    stats = json.loads((out / "train_stats.json").read_text())
    assert stats["steps"] == 2 and stats["seconds_per_step"] > 0 and stats["trainable_parameters"] > 0
    assert not (out / "tuner_config.json").exists()  # no res tuner was trained

    base = DiffusionPipeline.from_pretrained(str(tiny_dirs["sd1"]))
    tuned = load_tuned_pipeline(tiny_dirs["sd1"], out)
    before, after = unet_output(base), unet_output(tuned)
    assert torch.isfinite(after).all()
    assert not torch.allclose(before, after), "the loaded result is still the base model"
    if method[0] == "--peft_method":
        added = sum(p.numel() for p in tuned.unet.parameters()) - sum(p.numel() for p in base.unet.parameters())
        assert added == stats["trainable_parameters"]  # the adapter, and only it, was trained
        assert (saved / PEFT_WEIGHTS_NAME).is_file() and (saved / "adapter_config.json").is_file()
    else:
        assert stats["trainable_parameters"] == sum(p.numel() for p in base.unet.parameters())
    image = tuned("a photo of sks dog", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()


def test_peft_text2img_and_adapter_starts_as_a_no_op(tiny_dirs, images, tmp_path):
    """Every peer starts from the base: one step at learning rate ~0 leaves the UNet's output as it was."""
    from diffusers import DiffusionPipeline

    out = tmp_path / "out"
    argv = [
        "--pretrained_model_name_or_path", str(tiny_dirs["sd1"]), "--output_dir", str(out), "--resolution", "32",
        "--train_batch_size", "1", "--max_train_steps", "1", "--report_to", "none", "--seed", "0",
        "--learning_rate", "1e-30", "--train_data_dir", str(images["captioned"]), "--peft_method", "c3a",
    ]  # fmt: skip
    peers_train.main(["text2img", *argv])
    base = DiffusionPipeline.from_pretrained(str(tiny_dirs["sd1"]))
    tuned = load_tuned_pipeline(tiny_dirs["sd1"], out)
    torch.testing.assert_close(unet_output(tuned), unet_output(base), atol=1e-5, rtol=0)
    config = json.loads((out / PEFT_FOLDER / "adapter_config.json").read_text())
    assert config["block_size"] == default_c3a_block_size(base.unet)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--peft_method", "lora", "--tuner", "res_attn"], "--tuner"),
        (["--full_finetune", "--rank", "4"], "--rank"),
        (["--peft_method", "lora", "--full_finetune"], "exclude each other"),
        (["--peft_method", "lora", "--peft_block_size", "8"], "c3a setting"),
        (["--peft_method", "c3a", "--peft_rank", "8"], "no rank"),
        (["--peft_rank", "8"], "needs --peft_method"),
        (["--peft_method", "lora", "--peft_rank", "0"], "at least 1"),
    ],
)
def test_bad_peer_flags_exit_with_a_message(flags, message, tiny_dirs, images, tmp_path, capsys):
    with pytest.raises(SystemExit):
        peers_train.main(["dreambooth", *dreambooth_argv(tiny_dirs["sd1"], tmp_path / "out", images, *flags)])
    assert message in capsys.readouterr().err


def test_c3a_block_size_must_divide_the_projections(tiny_dirs, images, tmp_path):
    from resattn_diffusion.training import TrainingError

    with pytest.raises(TrainingError, match="does not divide"):
        peers_train.main(
            [
                "dreambooth",
                *dreambooth_argv(
                    tiny_dirs["sd1"], tmp_path / "out", images, "--peft_method", "c3a", "--peft_block_size", "7"
                ),
            ],
        )


def test_the_route_needs_a_task_first(capsys):
    with pytest.raises(SystemExit):
        peers_train.main(["--peft_method", "lora"])
    assert "dreambooth" in capsys.readouterr().err


def test_the_library_scripts_know_no_peer_flags(tiny_dirs, images, tmp_path, capsys):
    """The peers live in benchmarks/: the library's scripts refuse their flags and write no train_stats.json."""
    with pytest.raises(SystemExit):
        train_dreambooth.main(dreambooth_argv(tiny_dirs["sd1"], tmp_path / "out", images, "--peft_method", "lora"))
    assert "--peft_method" in capsys.readouterr().err


def test_a_res_tuner_through_the_peer_route_writes_stats(tiny_dirs, images, tmp_path):
    out = tmp_path / "out"
    saved = peers_train.main(
        ["dreambooth", *dreambooth_argv(tiny_dirs["sd1"], out, images, "--tuner", "res_lora", "--rank", "2")]
    )
    assert saved == out / "res_tuner.safetensors"
    stats = json.loads((out / "train_stats.json").read_text())
    assert stats["method"] == "res_tuner" and stats["steps"] == 2 and stats["trainable_parameters"] > 0


class BiasOnly:
    """A provider written against the interface alone: trains the UNet's output bias, saves it as a tensor."""

    name = "conv_out_bias"

    def __init__(self):
        self.steps_seen: list[int] = []

    def result_path(self, output_dir):
        return Path(output_dir) / "bias.pt"

    def prepare(self, unet, weight_dtype):
        unet.requires_grad_(False)
        unet.conv_out.bias.requires_grad_(True)
        return [unet.conv_out.bias]

    def describe(self, unet, parameters):
        return "conv_out bias"

    def save(self, unet, output_dir):
        torch.save(unet.conv_out.bias.detach().clone(), self.result_path(output_dir))
        return self.result_path(output_dir)


def test_any_provider_trains_through_the_core(tiny_dirs, images, tmp_path):
    from resattn_diffusion.training import TrainableProvider, TrainingCallback, parse_args, train

    class Provider(BiasOnly, TrainableProvider):
        pass

    class Recorder(TrainingCallback):
        def __init__(self):
            self.steps, self.summary = [], None

        def on_step_begin(self, unet, global_step):
            self.steps.append(global_step)

        def on_train_end(self, summary):
            self.summary = summary

    out = tmp_path / "out"
    recorder = Recorder()
    args = parse_args("dreambooth", dreambooth_argv(tiny_dirs["sd1"], out, images))
    saved = train(args, Provider(), callbacks=[recorder])
    assert saved == out / "bias.pt" and saved.is_file()
    assert not (out / "tuner_config.json").exists() and not (out / "train_stats.json").exists()
    assert recorder.steps == [0, 1] and recorder.summary.steps == 2 and recorder.summary.result == saved
    assert recorder.summary.trainable_parameters == torch.load(saved).numel()
    with pytest.raises(TypeError):  # the four required methods are abstract
        type("Incomplete", (TrainableProvider,), {"name": "x"})()
