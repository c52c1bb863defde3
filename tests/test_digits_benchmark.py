"""The digits benchmark end to end at a tiny budget (the real benchmark is `python -m benchmarks.digits.run_benchmark`)
and the README's demo at a tiny budget. The shipped base and classifier are used; the budgets here only check that
every piece runs and writes what it promises, not that anything is learned."""

from __future__ import annotations

import json

import pytest
from PIL import Image

import resattn_diffusion
from benchmarks.digits import demo, run_benchmark
from benchmarks.digits.classifier import load_style_classifier
from benchmarks.digits.data import load_digits_split
from benchmarks.digits.methods import INITIAL_SWEEP, MATCHED_LORA_RANK, all_methods, select_methods
from benchmarks.digits.tasks import StyleTask, classifier_frechet_distance


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_methods_cover_every_tuner_the_peers_and_full_finetuning():
    names = [method.name for method in all_methods()]
    for tuner in resattn_diffusion.tuner_names():
        assert tuner in names
    assert {"peft_lora", "peft_glora", "peft_c3a", "full_finetune"} <= set(names)
    assert ("--peft_rank", str(MATCHED_LORA_RANK)) == select_methods(["peft_lora"])[0].flags[2:]
    with pytest.raises(ValueError, match="unknown method"):
        select_methods(["no_such_method"])


def test_every_method_has_an_initial_sweep_on_every_task():
    for method in all_methods():
        for task in ("dreambooth", "style"):
            assert len(INITIAL_SWEEP[(method.family, task)]) >= 3


def test_style_fd_sees_the_style():
    digits = load_digits_split("test").without(9).first(40)
    classifier = load_style_classifier()
    plain_to_mirrored = classifier_frechet_distance(classifier, digits.images, digits.styled("mirrored").images)
    mirrored_to_mirrored = classifier_frechet_distance(
        classifier,
        load_digits_split("train").without(9).first(40).styled("mirrored").images,
        digits.styled("mirrored").images,
    )
    assert mirrored_to_mirrored < plain_to_mirrored
    with pytest.raises(ValueError, match="unknown style"):
        StyleTask(style="wavy")


def test_benchmark_quick_mode_end_to_end(tmp_path, capsys):
    """--quick: every piece at a tiny budget, in this process: sweep seed, reported seed, base, report, grids."""
    argv = ["--quick", "--workers", "0", "--methods", "peft_lora", "full_finetune", "--results", str(tmp_path)]
    run_benchmark.main(argv)
    runs = next((tmp_path / "runs").iterdir())
    records = {path.stem: json.loads(path.read_text()) for path in runs.glob("*.json")}
    # per task: the base, one sweep run (seed 0) and one reported run (seed 1) per method
    assert len(records) == 2 * (1 + 2 * 2)
    for key, record in records.items():
        assert (runs / record["grid"]).is_file() and record["grid"] == key + ".png"
        assert record["case"]["samples"] == 4 and record["role"] in ("base", "sweep", "eval")
    lora = records["dreambooth__peft_lora__lr0.001__seed1"]
    assert lora["trainable_parameters"] == 23_296 and lora["peak_rss_mb"] > 0 and lora["seconds_per_step"] > 0
    assert 0 < lora["cpu_seconds"] <= 1.5 * lora["wall_seconds"]  # one thread (plus a little of torch's helpers)
    assert set(lora["metrics"]) >= {
        "subject_fidelity",
        "prior_retention",
        "subject_fd",
        "class_leak",
        "prompt_separation",
    }
    style = records["style__full_finetune__lr0.0001__seed1"]
    assert set(style["metrics"]) >= {"styled_content_accuracy", "content_accuracy", "style_accuracy", "label_entropy"}
    with Image.open(runs / lora["grid"]) as grid:
        assert grid.size[1] >= 11 * 32  # identifier, class prompt, nine seen digits
    report = (tmp_path / "benchmark.md").read_text()
    for text in (
        "base (no tuning)",
        "`peft_lora`",
        "`full_finetune`",
        "23,296",
        "1,077,572",
        "Learning-rate sweeps",
        "styled content",
        "class-prompt leak",
        "[s1](runs/",
        "0 to go",
    ):
        assert text in report, text
    with Image.open(tmp_path / "quality_vs_params.png") as plot:
        assert plot.size[0] > 500 and plot.size[1] > 300

    capsys.readouterr()
    run_benchmark.main(argv)  # resumable: everything is done, nothing runs again
    assert "[running]" not in capsys.readouterr().out
    run_benchmark.main(argv + ["--status"])
    assert "0 ready to run" in capsys.readouterr().out


def test_benchmark_runs_in_worker_processes_and_reports_remaining(tmp_path, capsys):
    argv = ["--quick", "--workers", "1", "--tasks", "dreambooth", "--methods", "res_attn", "--results", str(tmp_path)]
    run_benchmark.main(argv + ["--status"])
    before = capsys.readouterr().out
    assert "2 ready to run" in before and "1 evaluation runs after the 1 open sweeps" in before
    run_benchmark.main(argv)
    output = capsys.readouterr().out
    assert output.count("[done]") == 3 and "failed" not in output
    runs = next((tmp_path / "runs").iterdir())
    assert len(list(runs.glob("*.json"))) == 3 and len(list(runs.glob("*.log"))) == 3
    assert not (tmp_path / "scratch").exists() or not any((tmp_path / "scratch").rglob("*.safetensors"))


def test_demo_tiny_budget_writes_grid_and_metrics(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["--out", str(out), "--steps", "2", "--samples", "4", "--class_images", "2", "--sampling_steps", "4"]
    demo.main(argv + ["--threads", "1"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["trainable_parameters"] == 24_064 and metrics["steps"] == 2
    for model in ("base", "tuned"):
        assert set(metrics[model]) >= {"subject_fidelity", "prior_retention", "subject_fd"}
    with Image.open(out / "grid.png") as grid:
        assert grid.size[1] > 5 * 32  # five rows of 32-pixel images, enlarged
    assert (out / "tuner" / "res_tuner.safetensors").is_file()
    assert "subject fidelity" in capsys.readouterr().out

    with pytest.raises(SystemExit, match="--overwrite"):
        demo.main(["--out", str(out), "--steps", "2", "--samples", "4", "--class_images", "2"])
