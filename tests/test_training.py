"""The training scripts and their core (resattn_diffusion.training) on the tiny offline pipelines, on CPU.

The scripts' ``main(argv)`` runs in-process; only the two-process DDP run goes through ``accelerate launch``.
Every registered tuner is trained by both scripts on the SD1-like and the SDXL-like tiny pipeline.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import resattn_diffusion as rd
import train_dreambooth
import train_text2img
from resattn_diffusion.testing import tiny_unet, unet_inputs
from resattn_diffusion.training import NonFiniteLossError, TrainingDataError, TrainingError, run_script
from resattn_diffusion.training.args import parse_args, tuner_config_from_args
from resattn_diffusion.training.data import EpochShuffleSampler, FolderSource, ImageTransform, TextImageDataset
from resattn_diffusion.training.trainable import prepare_unet_for_training

REPO_ROOT = Path(__file__).resolve().parents[1]
TUNERS = rd.tuner_names()
KINDS = ["sd1", "sdxl"]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps process-wide state (mixed precision, ...); each in-process run starts from scratch."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def save_random_images(folder: Path, count: int, size: tuple[int, int], seed: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        path = folder / f"{index:03d}.png"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small image fixtures: a DreamBooth instance folder and a metadata.jsonl text-to-image folder."""
    root = tmp_path_factory.mktemp("training_data")
    save_random_images(root / "instance", 3, (40, 48), seed=1)  # not square: resize + crop are exercised
    paths = save_random_images(root / "text2img", 4, (36, 44), seed=2)
    with open(root / "text2img" / "metadata.jsonl", "w", encoding="utf-8") as f:
        for index, path in enumerate(paths):
            f.write(json.dumps({"file_name": path.name, "text": f"a red painting of a dog {index}"}) + "\n")
    return {"instance": root / "instance", "text2img": root / "text2img"}


def common_args(model: Path, output_dir: Path, steps: int = 2, batch: int = 1) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(model), "--output_dir", str(output_dir), "--resolution", "32",
        "--train_batch_size", str(batch), "--max_train_steps", str(steps), "--report_to", "none", "--seed", "0",
        "--learning_rate", "1e-3",
    ]  # fmt: skip


def dreambooth_args(model: Path, output_dir: Path, data: dict[str, Path], **kwargs) -> list[str]:
    return common_args(model, output_dir, **kwargs) + [
        "--instance_data_dir",
        str(data["instance"]),
        "--instance_prompt",
        "a photo of sks dog",
    ]


def text2img_args(model: Path, output_dir: Path, data: dict[str, Path], **kwargs) -> list[str]:
    return common_args(model, output_dir, **kwargs) + ["--train_data_dir", str(data["text2img"])]


def assert_trained_tuner_generates(model: Path, output_dir: Path) -> None:
    """The saved tuner loads into a stock pipeline, is no longer the no-op it started as, and generates."""
    from diffusers import DiffusionPipeline

    tensors = load_file(output_dir / "res_tuner.safetensors")
    assert tensors and all(torch.isfinite(t).all() for t in tensors.values())
    pipe = DiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    rd.load_res_tuner(pipe.unet, output_dir)
    inputs = unet_inputs(pipe.unet, batch_size=1)
    with torch.no_grad():
        tuned = pipe.unet(**inputs).sample
        rd.set_res_tuner_enabled(pipe.unet, False)
        frozen = pipe.unet(**inputs).sample
        rd.set_res_tuner_enabled(pipe.unet, True)
    assert not torch.equal(tuned, frozen), "training left the tuner at its zero (no-op) initialisation"
    images = pipe("a photo of sks dog", num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()


@pytest.fixture
def losses(monkeypatch) -> list[float]:
    """The loss of every batch the training core computes (recorded around its ``diffusion_loss``)."""
    from resattn_diffusion.training import loop

    recorded: list[float] = []
    original = loop.diffusion_loss

    def recording_loss(*args, **kwargs):
        loss = original(*args, **kwargs)
        recorded.append(loss.item())
        return loss

    monkeypatch.setattr(loop, "diffusion_loss", recording_loss)
    return recorded


# --- every tuner, both scripts, SD1 and SDXL -----------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tuner", TUNERS)
def test_dreambooth_trains_every_tuner(tuner, kind, tiny_dirs, data, tmp_path, losses):
    out = tmp_path / "out"
    saved = train_dreambooth.main(dreambooth_args(tiny_dirs[kind], out, data) + ["--tuner", tuner])
    assert saved == out / "res_tuner.safetensors"
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert_trained_tuner_generates(tiny_dirs[kind], out)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tuner", TUNERS)
def test_text2img_trains_every_tuner(tuner, kind, tiny_dirs, data, tmp_path, losses):
    out = tmp_path / "out"
    train_text2img.main(
        text2img_args(tiny_dirs[kind], out, data, batch=2)
        + ["--tuner", tuner, "--random_flip", "--caption_dropout", "0.2"]
    )
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert_trained_tuner_generates(tiny_dirs[kind], out)
    run = json.loads((out / "args.json").read_text())
    assert run["tuner"] == tuner and run["seed"] == 0 and run["model_type"] == ("sdxl" if kind == "sdxl" else "sd")
    assert rd.ResTunerConfig.load(str(out / "tuner_config.json")).tuner == tuner


# --- resume, distributed, precision --------------------------------------------------------------------------
class SimulatedCrash(Exception):
    pass


@pytest.mark.parametrize("first, total, accumulation", [(3, 6, 1), (5, 7, 1), (3, 5, 2)])
def test_resume_after_a_crash_is_exact(first, total, accumulation, tiny_dirs, data, tmp_path, monkeypatch):
    """A run that dies after checkpoint ``first`` and is resumed with the same flags ends bit for bit where the
    uninterrupted run ends (data order, augmentation, caption dropout, noise, optimizer, lr schedule). With 4
    examples at batch 1 the resume lands inside an epoch or after an epoch boundary; with accumulation 2,
    batches are skipped in pairs."""
    from resattn_diffusion.training import loop

    args = text2img_args(tiny_dirs["sd1"], tmp_path / "straight", data, steps=total) + [
        "--lr_scheduler", "cosine", "--lr_warmup_steps", "2", "--random_flip", "--caption_dropout", "0.3",
        "--gradient_accumulation_steps", str(accumulation), "--checkpointing_steps", str(first),
    ]  # fmt: skip
    straight = train_text2img.main(args)
    fresh_accelerate_state_between_runs()

    args[args.index("--output_dir") + 1] = str(tmp_path / "resumed")
    original, calls = loop.diffusion_loss, []

    def crashing_loss(*loss_args, **loss_kwargs):
        calls.append(1)
        if len(calls) > first * accumulation:
            raise SimulatedCrash
        return original(*loss_args, **loss_kwargs)

    monkeypatch.setattr(loop, "diffusion_loss", crashing_loss)
    with pytest.raises(SimulatedCrash):
        train_text2img.main(args)
    monkeypatch.setattr(loop, "diffusion_loss", original)
    fresh_accelerate_state_between_runs()
    assert [p.name for p in (tmp_path / "resumed").glob("checkpoint-*")] == [f"checkpoint-{first}"]
    assert not (tmp_path / "resumed" / "res_tuner.safetensors").exists()

    with pytest.raises(TrainingError, match="same tuner flags"):
        train_text2img.main(args + ["--resume_from_checkpoint", "latest", "--tuner", "res_adapter"])
    resumed = train_text2img.main(args + ["--resume_from_checkpoint", "latest"])
    a, b = load_file(straight), load_file(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_for_more_steps_is_exact(tiny_dirs, data, tmp_path):
    """6 steps straight == 3 steps, then ``--resume_from_checkpoint latest`` with ``--max_train_steps 6``. The
    warmup (4 steps) runs across the resume, so the scheduler's state must be restored too."""
    extra = [
        "--lr_scheduler",
        "constant_with_warmup",
        "--lr_warmup_steps",
        "4",
        "--random_flip",
        "--caption_dropout",
        "0.3",
    ]
    extra += ["--checkpointing_steps", "3"]
    straight = train_text2img.main(text2img_args(tiny_dirs["sd1"], tmp_path / "straight", data, steps=6) + extra)
    fresh_accelerate_state_between_runs()
    train_text2img.main(text2img_args(tiny_dirs["sd1"], tmp_path / "resumed", data, steps=3) + extra)
    fresh_accelerate_state_between_runs()
    resumed = train_text2img.main(
        text2img_args(tiny_dirs["sd1"], tmp_path / "resumed", data, steps=6)
        + extra
        + ["--resume_from_checkpoint", "latest"],
    )
    a, b = load_file(straight), load_file(resumed)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resumed_lr_follows_the_new_schedule():
    """A 3-step cosine run resumed to 6 steps continues the 6-step cosine, not the lr the 3-step one ended at (0)."""
    from diffusers.optimization import get_scheduler

    from resattn_diffusion.training.loop import continue_lr_schedule

    weight = torch.nn.Parameter(torch.zeros(1))
    short = get_scheduler("cosine", torch.optim.AdamW([weight], lr=1.0), num_warmup_steps=0, num_training_steps=3)
    for _ in range(3):
        short.optimizer.step()
        short.step()
    assert short.optimizer.param_groups[0]["lr"] == pytest.approx(0.0)
    optimizer = torch.optim.AdamW([weight], lr=1.0)
    optimizer.load_state_dict(short.optimizer.state_dict())
    long = get_scheduler("cosine", optimizer, num_warmup_steps=0, num_training_steps=6)
    long.load_state_dict(short.state_dict())
    continue_lr_schedule(long)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5)  # cosine half way: (1 + cos(pi/2)) / 2


def fresh_accelerate_state_between_runs() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_launch_two_processes(tiny_dirs, data, tmp_path):
    """DDP over gloo with two CPU processes, launched by accelerate (torchrun underneath); one tuner file.

    accelerate 1.x's ``--cpu`` flag runs multi-CPU jobs only through mpirun, so the two processes come from
    ``--multi_gpu`` with ``ACCELERATE_USE_CPU=1`` (which selects the CPU / gloo backend in each process)."""
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()),
        str(REPO_ROOT / "train_text2img.py"), *text2img_args(tiny_dirs["sd1"], out, data),
        "--checkpointing_steps", "2",
    ]  # fmt: skip
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "1",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(REPO_ROOT),
    }
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x 2 process(es)" in result.stderr
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("res_tuner.safetensors")) == [
        "checkpoint-2/res_tuner.safetensors",
        "res_tuner.safetensors",
    ]
    assert sorted(p.name for p in (out / "checkpoint-2").glob("random_states_*.pkl")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    assert_trained_tuner_generates(tiny_dirs["sd1"], out)


@pytest.mark.parametrize("tuner", ["res_attn", "res_lora"])
def test_bf16_mixed_precision_runs_on_cpu(tuner, tiny_dirs, data, tmp_path):
    out = tmp_path / "out"
    train_text2img.main(text2img_args(tiny_dirs["sdxl"], out, data) + ["--mixed_precision", "bf16", "--tuner", tuner])
    assert all(t.dtype == torch.float32 for t in load_file(out / "res_tuner.safetensors").values())
    assert_trained_tuner_generates(tiny_dirs["sdxl"], out)


@pytest.mark.parametrize("tuner", TUNERS)
def test_fp16_keeps_tuner_parameters_fp32(tuner):
    """Under fp16 the frozen UNet is fp16 and the tuner fp32, so the gradient scaler can unscale its gradients.
    (accelerate refuses fp16 on CPU, so the fp16 step runs here with torch's CPU autocast and GradScaler.)"""
    unet = tiny_unet("sd1")
    parameters = prepare_unet_for_training(unet, rd.ResTunerConfig(tuner=tuner), torch.float16)
    assert parameters and all(p.dtype == torch.float32 and p.requires_grad for p in parameters)
    trainable = {id(p) for p in parameters}
    assert all(p.dtype == torch.float16 and not p.requires_grad for p in unet.parameters() if id(p) not in trainable)

    optimizer = torch.optim.AdamW(parameters, lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")
    with torch.autocast("cpu", dtype=torch.float16):
        loss = unet(**unet_inputs(unet)).sample.float().square().mean()
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)  # raises "Attempting to unscale FP16 gradients." for fp16 parameters
    scaler.step(optimizer)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in parameters)


def test_fp16_tuner_parameters_would_fail_to_unscale():
    """The failure the fp32 cast prevents (a control for the test above)."""
    unet = tiny_unet("sd1").to(torch.float16)
    unet.requires_grad_(False)
    rd.add_res_tuner(unet, rd.ResTunerConfig(tuner="res_attn"))
    parameters = rd.res_tuner_parameters(unet)
    optimizer = torch.optim.AdamW(parameters, lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")
    with torch.autocast("cpu", dtype=torch.float16):
        loss = unet(**unet_inputs(unet)).sample.float().square().mean()
    scaler.scale(loss).backward()
    with pytest.raises(ValueError, match="unscale FP16 gradients"):
        scaler.unscale_(optimizer)


# --- bad input -------------------------------------------------------------------------------------------------
def test_missing_or_empty_image_folder(tiny_dirs, data, tmp_path):
    missing = dreambooth_args(tiny_dirs["sd1"], tmp_path / "a", data)
    missing[missing.index("--instance_data_dir") + 1] = str(tmp_path / "nowhere")
    with pytest.raises(TrainingDataError, match="does not exist"):
        train_dreambooth.main(missing)

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    empty = dreambooth_args(tiny_dirs["sd1"], tmp_path / "b", data)
    empty[empty.index("--instance_data_dir") + 1] = str(tmp_path / "empty")
    with pytest.raises(TrainingDataError, match="holds no images"):
        train_dreambooth.main(empty)
    with pytest.raises(TrainingDataError, match="holds no images"):
        train_text2img.main(
            common_args(tiny_dirs["sd1"], tmp_path / "c") + ["--train_data_dir", str(tmp_path / "empty")]
        )


def test_unreadable_image_is_named(tiny_dirs, data, tmp_path):
    folder = tmp_path / "instance"
    save_random_images(folder, 2, (32, 32), seed=3)
    (folder / "broken.png").write_bytes(b"this is not a png")
    args = dreambooth_args(tiny_dirs["sd1"], tmp_path / "out", data)
    args[args.index("--instance_data_dir") + 1] = str(folder)
    with pytest.raises(TrainingDataError, match="broken.png"):
        train_dreambooth.main(args)

    # a file that passes the header check but is cut short fails when decoded, also by name
    truncated = tmp_path / "truncated"
    (good,) = save_random_images(truncated, 1, (32, 32), seed=4)
    good.write_bytes(good.read_bytes()[:200])
    from resattn_diffusion.training.data import load_image

    with pytest.raises(TrainingDataError, match="000.png"):
        load_image(good, repr(str(good)))


def test_missing_caption_column_lists_columns(tiny_dirs, data, tmp_path):
    args = text2img_args(tiny_dirs["sd1"], tmp_path / "out", data) + ["--caption_column", "caption"]
    with pytest.raises(TrainingDataError, match=r"no caption column 'caption'.*\['file_name', 'text'\]"):
        train_text2img.main(args)


def test_dataset_name_local_path_and_missing_column(tiny_dirs, data, tmp_path):
    """--dataset_name with a save_to_disk folder: lists of captions train; a wrong column lists the real ones."""
    import datasets

    images = [Image.open(p).convert("RGB") for p in sorted(data["text2img"].glob("*.png"))]
    captions = [["a dog", "a red dog"] for _ in images]
    dataset = datasets.Dataset.from_dict({"picture": images, "caption": captions}).cast_column(
        "picture", datasets.Image()
    )
    dataset.save_to_disk(str(tmp_path / "dataset"))
    base = common_args(tiny_dirs["sd1"], tmp_path / "out") + ["--dataset_name", str(tmp_path / "dataset")]
    with pytest.raises(TrainingDataError, match=r"no column 'text'.*\['picture', 'caption'\]"):
        train_text2img.main(base + ["--image_column", "picture"])
    fresh_accelerate_state_between_runs()
    train_text2img.main(base + ["--image_column", "picture", "--caption_column", "caption"])
    assert (tmp_path / "out" / "res_tuner.safetensors").is_file()


def test_txt_caption_folder(tiny_dirs, tmp_path):
    folder = tmp_path / "captioned"
    paths = save_random_images(folder, 2, (32, 32), seed=5)
    paths[0].with_suffix(".txt").write_text("a photo of a dog\n")
    args = common_args(tiny_dirs["sd1"], tmp_path / "out") + ["--train_data_dir", str(folder)]
    with pytest.raises(TrainingDataError, match=r"001.png \(expected 001.txt\)"):
        train_text2img.main(args)
    fresh_accelerate_state_between_runs()
    paths[1].with_suffix(".txt").write_text("a photo of a cat")
    train_text2img.main(args)
    assert (tmp_path / "out" / "res_tuner.safetensors").is_file()


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tiny_dirs, data, tmp_path):
    """An absurd learning rate blows the tuner up after step 1: step 2's loss is NaN. Training stops with a
    message naming the last checkpoint; no tuner is saved."""
    out = tmp_path / "out"
    args = text2img_args(tiny_dirs["sd1"], out, data, steps=4) + [
        "--learning_rate",
        "1e30",
        "--checkpointing_steps",
        "1",
    ]
    with pytest.raises(NonFiniteLossError, match=r"at step 2.*checkpoint-1"):
        train_text2img.main(args)
    assert not (out / "res_tuner.safetensors").exists()
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-1"]
    assert all(torch.isfinite(t).all() for t in load_file(out / "checkpoint-1" / "res_tuner.safetensors").values())


def test_existing_tuner_is_not_overwritten(tiny_dirs, data, tmp_path):
    out = tmp_path / "out"
    args = text2img_args(tiny_dirs["sd1"], out, data, steps=1)
    train_text2img.main(args)
    fresh_accelerate_state_between_runs()
    before = (out / "res_tuner.safetensors").read_bytes()
    fresh_accelerate_state_between_runs()
    with pytest.raises(TrainingError, match="--overwrite_output"):
        train_text2img.main(args + ["--tuner", "res_adapter"])
    assert (out / "res_tuner.safetensors").read_bytes() == before
    fresh_accelerate_state_between_runs()
    train_text2img.main(args + ["--tuner", "res_adapter", "--overwrite_output"])
    assert rd.get_res_tuner_configs(_loaded_unet(tiny_dirs["sd1"], out))["default"].tuner == "res_adapter"


def _loaded_unet(model: Path, output_dir: Path) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    rd.load_res_tuner(unet, output_dir)
    return unet


def test_missing_optional_packages_are_clear_errors(tiny_dirs, data, tmp_path):
    import importlib.util

    args = text2img_args(tiny_dirs["sd1"], tmp_path / "out", data)
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(TrainingError, match="pip install bitsandbytes"):
            train_text2img.main(args + ["--use_8bit_adam"])
    from diffusers.utils.import_utils import is_xformers_available

    if not is_xformers_available():
        with pytest.raises(TrainingError, match="pip install xformers"):
            train_text2img.main(args + ["--enable_xformers_memory_efficient_attention"])


def test_run_script_turns_errors_into_a_message(capsys):
    def failing_main():
        raise TrainingDataError("cannot read image 'x.png'")

    with pytest.raises(SystemExit) as exit_info:
        run_script(failing_main)
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip() == "error: cannot read image 'x.png'"


# --- DreamBooth prior preservation, validation, gradient checkpointing ------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_prior_preservation_generates_class_images(kind, tiny_dirs, data, tmp_path):
    class_dir = tmp_path / "class"
    args = dreambooth_args(tiny_dirs[kind], tmp_path / "out", data) + [
        "--with_prior_preservation", "--class_data_dir", str(class_dir), "--class_prompt", "a photo of dog",
        "--num_class_images", "2", "--sample_batch_size", "2", "--prior_loss_weight", "0.5",
    ]  # fmt: skip
    train_dreambooth.main(args)
    generated = sorted(class_dir.glob("*.png"))
    assert len(generated) == 2 and all(Image.open(p).size == (32, 32) for p in generated)
    assert (tmp_path / "out" / "res_tuner.safetensors").is_file()
    # a second run finds the class images complete and generates none
    fresh_accelerate_state_between_runs()
    train_dreambooth.main(args + ["--overwrite_output"])
    assert sorted(class_dir.glob("*.png")) == generated


def test_validation_images_and_tensorboard(tiny_dirs, data, tmp_path):
    out = tmp_path / "out"
    args = text2img_args(tiny_dirs["sdxl"], out, data, steps=2) + [
        "--report_to", "tensorboard", "--validation_prompt", "a red dog", "--num_validation_images", "2",
        "--validation_steps", "1", "--validation_inference_steps", "2",
    ]  # fmt: skip
    train_text2img.main(args)
    grids = sorted(p.name for p in (out / "validation").glob("*.png"))
    assert grids == ["final.png", "step_000001.png"]
    assert Image.open(out / "validation" / "final.png").size == (64, 32)  # two 32x32 images side by side
    assert list((out / "logs").rglob("events.out.tfevents.*"))


def test_gradient_checkpointing_gives_the_same_tuner(tiny_dirs, data, tmp_path):
    plain = train_text2img.main(text2img_args(tiny_dirs["sd1"], tmp_path / "plain", data))
    fresh_accelerate_state_between_runs()
    checkpointed = train_text2img.main(
        text2img_args(tiny_dirs["sd1"], tmp_path / "ckpt", data) + ["--gradient_checkpointing"]
    )
    a, b = load_file(plain), load_file(checkpointed)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_sd2_v_prediction_with_accumulation_snr_and_noise_offset(tiny_dirs, data, tmp_path, losses):
    """The SD 2-like tiny model predicts v; Min-SNR weighting then divides by SNR + 1."""
    out = tmp_path / "out"
    flags = ["--gradient_accumulation_steps", "2", "--snr_gamma", "5.0", "--noise_offset", "0.05"]
    train_dreambooth.main(dreambooth_args(tiny_dirs["sd2"], out, data, steps=2) + flags)
    # 3 instance images at batch 1: step 1 accumulates 2 batches, step 2 the epoch's last one
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert json.loads((out / "args.json").read_text())["gradient_accumulation_steps"] == 2
    assert_trained_tuner_generates(tiny_dirs["sd2"], out)


# --- flags and data pipeline (no training) -------------------------------------------------------------------
def _args(*flags: str, task: str = "text2img"):
    return parse_args(task, ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", *flags])


def test_tuner_flags_build_the_config(tmp_path):
    config = tuner_config_from_args(
        _args(
            "--tuner",
            "res_adapter",
            "--tuner_arg",
            "activation=relu",
            "rank=12",
            "--targets",
            "ff",
            "--placement",
            "sequential",
        ),
    )
    assert (config.tuner, config.targets, config.placement) == ("res_adapter", ("ff",), "sequential")
    assert config.hyperparameters["rank"] == 12 and config.hyperparameters["activation"] == "relu"

    default = tuner_config_from_args(_args())
    assert default == rd.ResTunerConfig()

    saved = tmp_path / "tuner.json"
    rd.ResTunerConfig(tuner="res_attn", rank=4, heads=4, blocks=["up_blocks.*"]).save(str(saved))
    from_file = tuner_config_from_args(_args("--tuner_config", str(saved), "--rank", "16", "--tuner_scale", "0.5"))
    assert from_file.hyperparameters["rank"] == 16 and from_file.hyperparameters["heads"] == 4
    assert from_file.blocks == ("up_blocks.*",) and from_file.scale == 0.5


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--tuner", "res_prefix", "--rank", "4"], "hyperparameters are"),  # res_prefix has no rank
        (["--tuner", "no_such_tuner"], "registered tuners"),
        (["--tuner_arg", "rank"], "KEY=VALUE"),
        (["--tuner_arg", "rank=eight"], "rank is an integer"),
        (["--tuner_arg", "placement=sequential"], "use --placement"),
        (["--tuner", "res_adapter", "--tuner_arg", "activation=swish"], "activation"),
    ],
)
def test_bad_tuner_flags_exit_with_the_allowed_values(flags, message, capsys):
    with pytest.raises(SystemExit):
        _args(*flags)
    assert message in capsys.readouterr().err


def test_caption_dropout_and_seeded_augmentation(data):
    source = FolderSource([(p, "a caption") for p in sorted(data["text2img"].glob("*.png"))])
    transform = ImageTransform(32, center_crop=False, random_flip=True)
    always = TextImageDataset(source, transform, seed=0, caption_dropout=1.0)
    assert {always[i]["caption"] for i in range(len(always))} == {""}
    never = TextImageDataset(source, transform, seed=0, caption_dropout=0.0)
    assert {never[i]["caption"] for i in range(len(never))} == {"a caption"}

    dataset = TextImageDataset(source, transform, seed=0, caption_dropout=0.5)
    first = [dataset[i] for i in range(len(dataset))]
    again = [dataset[i] for i in range(len(dataset))]
    assert all(
        torch.equal(a["pixel_values"], b["pixel_values"]) and a["caption"] == b["caption"]
        for a, b in zip(first, again)
    )
    assert first[0]["pixel_values"].shape == (3, 32, 32)
    assert -1.0 <= first[0]["pixel_values"].min() and first[0]["pixel_values"].max() <= 1.0
    crops = set()
    for epoch in range(6):
        dataset.set_epoch(epoch)
        crops.add(
            (dataset[0]["crop_top_left"], bool(torch.equal(dataset[0]["pixel_values"], first[0]["pixel_values"])))
        )
    assert len(crops) > 1  # crops / flips change from epoch to epoch

    sampler = EpochShuffleSampler(10, seed=0)
    orders = []
    for epoch in (0, 1, 0):
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
    assert orders[0] == orders[2] != orders[1] and sorted(orders[0]) == list(range(10))
