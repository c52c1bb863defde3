"""The digits benchmark end to end at a tiny budget (the real benchmark is `python -m benchmarks.digits.run_benchmark`)
and the README's demo at a tiny budget. The shipped base and classifier are used; the budgets here only check that
every piece runs and writes what it promises, not that anything is learned."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.digits import demo, run_benchmark
from benchmarks.digits.methods import MATCHED_LORA_RANK, all_methods, select_methods
from benchmarks.digits.report import sweep_score
from benchmarks.digits.tasks import UNDO_STYLE, StyleTask, classifier_frechet_distance
from benchmarks.digits.data import STYLES, load_digits_split
from benchmarks.digits.classifier import load_digit_classifier

import resattn_diffusion


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


def test_every_style_can_be_undone_and_scored():
    """The style task's content judge undoes each geometric style exactly; real styled digits score as styled."""
    digits = load_digits_split("test").without(9).first(40)
    classifier = load_digit_classifier()
    for style in STYLES:
        undone = UNDO_STYLE[style](digits.styled(style).images)
        accuracy = float((classifier.predict(undone).numpy() == digits.labels).mean())
        if style in ("mirrored", "rotated", "inverted"):
            np.testing.assert_allclose(undone, digits.images, atol=1e-6)
            assert accuracy > 0.9
    plain_to_mirrored = classifier_frechet_distance(classifier, digits.images, digits.styled("mirrored").images)
    mirrored_to_mirrored = classifier_frechet_distance(
        classifier, load_digits_split("train").without(9).first(40).styled("mirrored").images, digits.styled("mirrored").images
    )
    assert mirrored_to_mirrored < plain_to_mirrored  # the style Frechet distance sees the style
    with pytest.raises(ValueError, match="unknown style"):
        StyleTask(style="wavy")


def test_sweep_score_prefers_learning_without_forgetting():
    assert sweep_score("dreambooth", {"subject_fidelity": 0.9, "prior_retention": 0.9}) > sweep_score(
        "dreambooth", {"subject_fidelity": 1.0, "prior_retention": 0.5}
    )
    base = {"style_fd": 20.0}
    kept = {"style_fd": 8.0, "content_accuracy": 0.9}
    drowned = {"style_fd": 5.0, "content_accuracy": 0.2}
    unlearned = {"style_fd": 19.0, "content_accuracy": 0.95}
    assert sweep_score("style", kept, base) > max(sweep_score("style", drowned, base), sweep_score("style", unlearned, base))


def test_benchmark_end_to_end_tiny_budget(tmp_path, capsys):
    argv = [
        "--steps", "2", "--samples", "4", "--seeds", "0", "--class_images", "2", "--in_process",
        "--methods", "peft_lora", "full_finetune", "--lrs", "peft=1e-3", "full=1e-4",
        "--results", str(tmp_path),
    ]  # fmt: skip
    run_benchmark.main(argv)
    report = (tmp_path / "benchmark.md").read_text()
    for row in ("base (no tuning)", "`peft_lora`", "`full_finetune`", "23,296", "1,077,572"):
        assert row in report
    assert "Learning-rate sweep" in report and "subject fidelity" in report and "style FD" in report
    with Image.open(tmp_path / "quality_vs_params.png") as plot:
        assert plot.size[0] > 500 and plot.size[1] > 300
    results = sorted(tmp_path.glob("runs/*/*/*/*/result.json"))
    # each method is its family's sweep representative, so the sweep's runs are the results: 2 per task
    assert len(results) == 4
    record = json.loads(next(p for p in results if "peft_lora" in str(p) and "dreambooth" in str(p)).read_text())
    assert record["trainable_parameters"] == 23_296
    assert record["seconds_per_step"] > 0 and record["peak_rss_mb"] > 0
    assert 0.0 <= record["metrics"]["subject_fidelity"] <= 1.0 and np.isfinite(record["metrics"]["subject_fd"])

    capsys.readouterr()
    run_benchmark.main(argv)  # resumable: everything is done, nothing runs again
    output = capsys.readouterr().out
    assert "[running]" not in output and output.count("[done]") == 8  # sweep + table lookups, 4 per task


def test_demo_tiny_budget_writes_grid_and_metrics(tmp_path, capsys):
    out = tmp_path / "demo"
    demo.main(["--out", str(out), "--steps", "2", "--samples", "4", "--class_images", "2", "--threads", "1"])
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
