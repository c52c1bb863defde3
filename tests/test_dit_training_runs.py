"""Two-step training runs of both scripts on the tiny SD3 and Flux folders (issue 17's "done when"): the tuner they
save loads into the SD3 / Flux pipelines and changes the images; resume is exact; prior preservation generates
class images with the transformer pipeline; bf16 with gradient checkpointing trains fp32 tuner weights; a GLoRA
supernet trained on SD3 or Flux is searched and its fixed tuner samples.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import train_dreambooth
import train_text2img
from resattn_diffusion.testing import DIT_KINDS, save_tiny_dit_pipeline

PROMPT = "a photo of sks dog"


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps process-wide state (mixed precision, ...); each in-process run starts from scratch."""
    yield
    reset_accelerate()


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def dit_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_dit_runs")
    return {kind: save_tiny_dit_pipeline(kind, root / kind) for kind in DIT_KINDS}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dit_data")
    rng = np.random.default_rng(0)
    (root / "instance").mkdir()
    (root / "text2img").mkdir()
    for index in range(2):
        Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(root / "instance" / f"{index}.png")
    with open(root / "text2img" / "metadata.jsonl", "w", encoding="utf-8") as f:
        for index in range(3):
            Image.fromarray(rng.integers(0, 256, (34, 38, 3), dtype=np.uint8)).save(root / "text2img" / f"{index}.png")
            f.write(json.dumps({"file_name": f"{index}.png", "text": f"a red painting of a dog {index}"}) + "\n")
    return {"instance": root / "instance", "text2img": root / "text2img"}


def common(model: Path, output_dir: Path, steps: int = 2) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(model), "--output_dir", str(output_dir), "--resolution", "32",
        "--train_batch_size", "1", "--max_train_steps", str(steps), "--report_to", "none", "--seed", "0",
        "--learning_rate", "1e-2", "--max_sequence_length", "16",
    ]  # fmt: skip


def run(script: str, model: Path, output_dir: Path, data: dict[str, Path], *extra: str, steps: int = 2) -> Path:
    if script == "dreambooth":
        argv = common(model, output_dir, steps) + [
            "--instance_data_dir",
            str(data["instance"]),
            "--instance_prompt",
            PROMPT,
        ]
        return train_dreambooth.main(argv + list(extra))
    argv = common(model, output_dir, steps) + [
        "--train_data_dir",
        str(data["text2img"]),
        "--caption_dropout",
        "0.3",
        "--random_flip",
    ]
    return train_text2img.main(argv + list(extra))


def tuned_pipeline(kind: str, model: Path):
    from pipelines import ResTunerFluxPipeline, ResTunerStableDiffusion3Pipeline

    pipeline = (ResTunerStableDiffusion3Pipeline if kind == "sd3" else ResTunerFluxPipeline).from_pretrained(model)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def generate(pipeline, **extra) -> np.ndarray:
    call = dict(num_inference_steps=2, height=32, width=32, output_type="np", max_sequence_length=16)
    return pipeline(PROMPT, generator=torch.Generator().manual_seed(0), **call, **extra).images


@pytest.mark.parametrize("script", ["dreambooth", "text2img"])
@pytest.mark.parametrize("kind", DIT_KINDS)
def test_two_step_run_gives_a_tuner_the_pipeline_loads_and_that_changes_images(kind, script, dit_dirs, data, tmp_path):
    extra = ["--validation_prompt", "a dog", "--num_validation_images", "1", "--validation_inference_steps", "2"]
    tuner_file = run(script, dit_dirs[kind], tmp_path / "out", data, *extra)
    assert tuner_file == tmp_path / "out" / "res_tuner.safetensors"
    tensors = load_file(tuner_file)
    assert tensors and all(torch.isfinite(t).all() for t in tensors.values())
    run_args = json.loads((tmp_path / "out" / "args.json").read_text())
    assert run_args["model_type"] == kind
    assert (tmp_path / "out" / "validation" / "final.png").is_file()
    card = (tmp_path / "out" / "README.md").read_text(encoding="utf-8")  # the model card names the right pipeline
    assert (
        "ResTunerStableDiffusion3Pipeline" if kind == "sd3" else "ResTunerFluxPipeline"
    ) in card and "pipe.transformer" in card

    pipeline = tuned_pipeline(kind, dit_dirs[kind])
    base = generate(pipeline)
    name = pipeline.load_res_tuner(tmp_path / "out")
    tuned = generate(pipeline)
    assert np.isfinite(tuned).all() and not np.array_equal(base, tuned), "the trained tuner did not change the images"
    from resattn_diffusion.training import load_tuned_pipeline

    np.testing.assert_array_equal(
        generate(load_tuned_pipeline(dit_dirs[kind], tmp_path / "out")), tuned
    )  # the stock pipeline
    silenced = generate(pipeline, joint_attention_kwargs={"res_tuner_scale": 0.0})
    np.testing.assert_allclose(silenced, base, atol=1e-6)  # scale 0 per call: the base model
    pipeline.unload_res_tuner(name)
    np.testing.assert_array_equal(generate(pipeline), base)


@pytest.mark.parametrize("kind, script", [("sd3", "dreambooth"), ("flux", "text2img")])
def test_resume_is_exact(kind, script, dit_dirs, data, tmp_path):
    """4 steps straight == 2 steps, then ``--resume_from_checkpoint latest`` to 4 (lr warmup across the resume)."""
    extra = ["--checkpointing_steps", "2", "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "3"]
    straight = run(script, dit_dirs[kind], tmp_path / "straight", data, *extra, steps=4)
    reset_accelerate()
    run(script, dit_dirs[kind], tmp_path / "resumed", data, *extra, steps=2)
    reset_accelerate()
    resumed = run(
        script, dit_dirs[kind], tmp_path / "resumed", data, *extra, "--resume_from_checkpoint", "latest", steps=4
    )
    a, b = load_file(straight), load_file(resumed)
    assert a.keys() == b.keys() and any(t.abs().sum() > 0 for t in a.values())
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_flux_prior_preservation_generates_class_images_and_trains(dit_dirs, data, tmp_path):
    class_dir = tmp_path / "class"
    extra = [
        "--with_prior_preservation", "--class_data_dir", str(class_dir), "--class_prompt", "a photo of dog",
        "--num_class_images", "2", "--sample_batch_size", "2",
    ]  # fmt: skip
    tuner_file = run("dreambooth", dit_dirs["flux"], tmp_path / "out", data, *extra)
    images = sorted(class_dir.glob("*.png"))
    assert len(images) == 2 and all(Image.open(path).size == (32, 32) for path in images)
    assert all(torch.isfinite(t).all() for t in load_file(tuner_file).values())


def test_bf16_with_gradient_checkpointing_trains_fp32_tuner_weights(dit_dirs, data, tmp_path, monkeypatch):
    from resattn_diffusion.training import loop

    seen = {}
    original = loop.diffusion_loss

    def recording(args, base, denoiser, *rest):
        frozen = [p for p in base.denoiser.parameters() if not p.requires_grad]
        trainable = [p for p in base.denoiser.parameters() if p.requires_grad]
        seen.update(
            frozen={p.dtype for p in frozen},
            trainable={p.dtype for p in trainable},
            checkpointing=base.denoiser.gradient_checkpointing,
            encoders=len(base.text_encoders),
        )
        return original(args, base, denoiser, *rest)

    monkeypatch.setattr(loop, "diffusion_loss", recording)
    tuner_file = run(
        "dreambooth", dit_dirs["flux"], tmp_path / "out", data, "--mixed_precision", "bf16", "--gradient_checkpointing"
    )
    assert seen == {"frozen": {torch.bfloat16}, "trainable": {torch.float32}, "checkpointing": True, "encoders": 0}
    tensors = load_file(tuner_file)
    assert any(t.abs().sum() > 0 for t in tensors.values())  # gradients reached the tuner through checkpointing


@pytest.mark.parametrize("kind", DIT_KINDS)
def test_a_glora_supernet_trained_on_a_transformer_is_searched_and_its_fixed_tuner_samples(
    kind, dit_dirs, data, tmp_path
):
    """The whole structure-search workflow on a diffusion transformer: train a supernet, search it on held-out
    images, load the fixed tuner the search writes into the SD3 / Flux pipeline (before, the search refused a
    pipeline without a UNet, and export refuses a supernet: the trained supernet was a dead end)."""
    from resattn_diffusion import res_tuner_summary
    from resattn_diffusion.search.cli import main as search_main

    supernet = tmp_path / "supernet"
    run("text2img", dit_dirs[kind], supernet, data, "--tuner", "glora", "--rank", "2", "--tuner_arg", "supernet=true")
    argv = [
        "--pretrained_model_name_or_path", str(dit_dirs[kind]), "--supernet", str(supernet),
        "--data_dir", str(data["text2img"]), "--output_dir", str(tmp_path / "searched"), "--resolution", "32",
        "--population_size", "3", "--iterations", "1", "--timesteps", "2", "--budget", "3k", "--no_progress",
    ]  # fmt: skip
    assert search_main(argv) == 0
    result = json.loads((tmp_path / "searched" / "glora_search.json").read_text())
    assert 0 < result["parameters"] <= 3000
    assert result["settings"]["max_sequence_length"] == 16  # scored on the conditioning it trained on (args.json)
    pipeline = tuned_pipeline(kind, dit_dirs[kind])
    before = generate(pipeline)
    pipeline.load_res_tuner(tmp_path / "searched")
    summary = res_tuner_summary(pipeline.transformer)
    assert summary["tuners"]["default"]["parameters"] == result["parameters"]
    assert np.isfinite(generate(pipeline)).all() and generate(pipeline).shape == before.shape
