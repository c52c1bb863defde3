"""The digits benchmark's evidence: metrics checked on real data, the statistics, the sweep planner, merging.

Real data must score like real data (real styled digits: the digit and the style recognised, prompts spread as real
digits do) and a collapsed image set must score as collapsed; the planner must widen a sweep whose best rate sits
at an edge and report only seeds other than the one that chose the rate."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from benchmarks.digits.classifier import PLAIN, load_digit_classifier, load_style_classifier, styled_accuracies
from benchmarks.digits.data import STYLES, load_digits_split
from benchmarks.digits.methods import HEADLINE_METHODS, INITIAL_SWEEP, method_by_name
from benchmarks.digits.plan import (
    RESULT_VERSION,
    Case,
    RunSpec,
    eval_seeds,
    ladder_neighbour,
    make_plan,
    read_finished,
    remaining_summary,
    resolve_sweep,
    sweep_score,
)
from benchmarks.digits.report import metric_cell, significance_marks, t_interval, welch_p_value
from benchmarks.digits.tasks import DreamBoothTask, StyleTask, separation_from_real
from resattn_diffusion.evaluation import EvaluationError, label_entropy, per_group_accuracy, prompt_separation


@pytest.fixture(scope="module")
def style_classifier():
    return load_style_classifier()


def per_digit(digits, count: int) -> dict[int, np.ndarray]:
    return {d: digits.only(d).first(count).images for d in digits.digits}


# --- the metrics on real data ----------------------------------------------------------------------------------
def test_style_classifier_recognises_real_digits_in_every_style(style_classifier):
    """Content accuracy on REAL styled test digits >= 0.95 for every style the benchmark offers (outline was 0.40
    with the plain classifier), and the style head names the style."""
    assert set(style_classifier.config.style_names) == set(STYLES)
    accuracies = styled_accuracies(style_classifier, load_digits_split("test"))
    for style in (PLAIN, *STYLES):
        assert accuracies[style]["digit_accuracy"] >= 0.95, (style, accuracies[style])
        assert accuracies[style]["style_accuracy"] >= 0.9, (style, accuracies[style])
    with pytest.raises(ValueError, match="no style head"):
        load_digit_classifier().predict_style(load_digits_split("test").first(2).images)


@pytest.mark.parametrize("style", sorted(STYLES))
def test_real_styled_digits_score_like_real_data(style, style_classifier):
    task = StyleTask(style=style)
    real = load_digits_split("train").without(9).styled(style)  # other images than the test split the metric uses
    metrics = task.score(per_digit(real, 8), style_classifier)
    assert metrics["content_accuracy"] >= 0.9 and metrics["worst_prompt_accuracy"] >= 0.75
    assert metrics["style_accuracy"] >= 0.85 and metrics["styled_content_accuracy"] >= 0.8
    assert metrics["label_entropy"] >= 0.95
    assert 0.6 <= metrics["prompt_separation"] <= 1.6


def test_plain_digits_under_a_style_prompt_score_as_unstyled(style_classifier):
    """A model that ignores the style keeps the digits but fails the style (so content alone cannot reward it)."""
    plain = load_digits_split("train").without(9)
    metrics = StyleTask(style="outline").score(per_digit(plain, 8), style_classifier)
    assert metrics["content_accuracy"] >= 0.9 and metrics["style_accuracy"] <= 0.1
    assert metrics["styled_content_accuracy"] <= 0.1


def test_one_image_for_every_prompt_scores_as_collapsed(style_classifier):
    """The failure the style FD missed: the same styled image whatever digit was asked for."""
    blob = load_digits_split("train").only(3).first(1).styled("mirrored").images
    collapsed = {d: np.repeat(blob, 8, axis=0) for d in range(9)}
    metrics = StyleTask(style="mirrored").score(collapsed, style_classifier)
    assert metrics["label_entropy"] == 0.0 and metrics["prompt_separation"] < 1e-9
    assert metrics["worst_prompt_accuracy"] == 0.0 and metrics["content_accuracy"] <= 1 / 9 + 1e-9
    # one sample per prompt varying a little (noise) is still collapsed
    rng = np.random.default_rng(0)
    noisy = {
        d: np.clip(images + rng.normal(0, 0.03, images.shape), 0, 1).astype(np.float32)
        for d, images in collapsed.items()
    }
    assert StyleTask(style="mirrored").score(noisy, style_classifier)["prompt_separation"] < 0.05


def test_dreambooth_prompt_separation_on_real_and_collapsed_digits():
    classifier = load_digit_classifier()
    train = load_digits_split("train")
    real = separation_from_real(classifier, per_digit(train, 8), load_digits_split("test"))
    assert 0.7 <= real <= 1.4
    nine = train.only(9).first(1).images
    assert (
        separation_from_real(classifier, {d: np.repeat(nine, 4, axis=0) for d in range(10)}, load_digits_split("test"))
        < 1e-9
    )
    assert DreamBoothTask().judge().style_head is None  # DreamBooth (and the demo) keep the plain judge


def test_collapse_scores_pure():
    assert label_entropy([0, 1, 2, 3] * 5, 4) == pytest.approx(1.0)
    assert label_entropy([2] * 20, 9) == 0.0
    assert 0 < label_entropy([0] * 10 + [1] * 10, 9) < 0.5
    features = np.random.default_rng(0).normal(size=(40, 5)) + np.repeat(np.eye(4, 5) * 3, 10, axis=0)
    groups = np.repeat(np.arange(4), 10)
    assert prompt_separation(features, groups, features, groups) == pytest.approx(1.0)
    assert prompt_separation(np.ones_like(features), groups, features, groups) == 0.0
    assert per_group_accuracy([1, 1, 2, 0], [1, 1, 2, 2]) == {1: 1.0, 2: 0.5}
    with pytest.raises(EvaluationError, match="same groups"):
        prompt_separation(features, groups, features, groups % 2)
    with pytest.raises(EvaluationError, match="at least one"):
        label_entropy([], 3)
    with pytest.raises(EvaluationError, match="do not differ"):
        prompt_separation(features, groups, np.ones_like(features), groups)


# --- the statistics -------------------------------------------------------------------------------------------
def test_t_interval_and_welch():
    mean, low, high = t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and high - mean == pytest.approx(4.302653 / np.sqrt(3), rel=1e-5) and low < mean
    assert t_interval([0.5]) == (0.5, 0.5, 0.5)
    assert welch_p_value([0.9, 0.95, 1.0, 0.92], [0.2, 0.3, 0.25, 0.28]) < 0.001
    assert welch_p_value([0.5, 0.7, 0.6], [0.55, 0.65, 0.6]) > 0.5
    assert welch_p_value([1.0, 1.0, 1.0], [0.0, 0.0, 0.0]) == 0.0 and welch_p_value([1.0, 1.0], [1.0, 1.0]) == 1.0
    assert welch_p_value([1.0], [0.0, 0.1]) == 1.0  # one seed claims nothing


def test_significance_marks_follow_the_metric_direction():
    lora = {"peft_lora": [0.5, 0.55, 0.52]}
    assert significance_marks("subject_fidelity", [0.9, 0.95, 0.93], lora) == "▲L"
    assert significance_marks("subject_fd", [0.9, 0.95, 0.93], lora) == "▼L"  # lower is better
    assert significance_marks("subject_fidelity", [0.5, 0.6, 0.45], lora) == ""
    cell = metric_cell("subject_fidelity", [0.9, 0.95, 0.93], lora)
    assert cell.startswith("0.93 [") and cell.endswith("▲L")


# --- the planner ----------------------------------------------------------------------------------------------
CASE = Case(samples=4)


def fake_record(spec: RunSpec, score: float, case: Case = CASE) -> dict:
    metrics = {"subject_fidelity": score, "prior_retention": 1.0, "subject_fd": 1.0}
    return {
        "version": RESULT_VERSION,
        "case": case.record(),
        "task": spec.task,
        "method": spec.method,
        "learning_rate": spec.lr,
        "seed": spec.seed,
        "role": spec.role,
        "metrics": metrics,
        "wall_seconds": 20.0,
        "trainable_parameters": 10,
        "family": "operation",
        "seconds_per_step": 0.05,
        "peak_rss_mb": 500.0,
        "grid": spec.key + ".png",
    }


def test_sweep_widens_while_its_best_rate_is_at_an_edge():
    method = method_by_name("res_attn")
    initial = INITIAL_SWEEP[("operation", "dreambooth")]
    finished = {}
    for rate, score in zip(initial, (0.9, 0.5, 0.1)):  # best at the lowest rate
        spec = RunSpec("dreambooth", "res_attn", rate, 0, "sweep")
        finished[spec.key] = fake_record(spec, score)
    state = resolve_sweep("dreambooth", method, 0, finished)
    assert not state.resolved and state.widened == [ladder_neighbour(min(initial), -1)] == [3e-4]
    spec = RunSpec("dreambooth", "res_attn", 3e-4, 0, "sweep")
    finished[spec.key] = fake_record(spec, 0.7)  # worse than 1e-3: the optimum is inside now
    state = resolve_sweep("dreambooth", method, 0, finished)
    assert state.resolved and state.chosen == 1e-3 and not state.at_edge
    # widening stops after max_widen and the report then flags the edge
    capped = resolve_sweep(
        "dreambooth", method, 0, {k: v for k, v in finished.items() if "lr0.0003" not in k}, max_widen=0
    )
    assert capped.chosen == 1e-3 and capped.at_edge


def test_plan_reports_other_seeds_and_counts_what_remains(tmp_path):
    methods = [method_by_name("res_attn"), method_by_name("res_adapter")]
    plan = make_plan(["dreambooth"], methods, [0, 1, 2, 3], {}, extra_seeds=[4, 5])
    assert {spec.role for spec in plan.pending} == {"base", "sweep"} and plan.unresolved_eval_runs == 5 + 3
    finished = {}
    for spec in plan.pending:
        score = 0.9 if spec.lr == 3e-3 else 0.2  # the middle rate wins
        finished[spec.key] = fake_record(spec, score)
    plan = make_plan(["dreambooth"], methods, [0, 1, 2, 3], finished, extra_seeds=[4, 5])
    evals = [spec for spec in plan.pending if spec.role == "eval"]
    assert {(s.method, s.seed) for s in evals} == {("res_attn", s) for s in (1, 2, 3, 4, 5)} | {
        ("res_adapter", s) for s in (1, 2, 3)
    }
    assert all(spec.lr == 3e-3 for spec in evals) and plan.unresolved_eval_runs == 0
    assert "8 ready to run" in remaining_summary(plan) and "core-minutes" in remaining_summary(plan)
    assert eval_seeds("res_attn", [0, 1, 2, 3], [4]) == [1, 2, 3, 4] and "res_attn" in HEADLINE_METHODS
    assert eval_seeds("glora", [0, 1, 2, 3], [4]) == [1, 2, 3]
    with pytest.raises(ValueError, match="two seeds"):
        make_plan(["dreambooth"], methods, [0], {})


def test_result_files_from_two_machines_merge_by_copying(tmp_path):
    """Each run is one self-contained file: copying two machines' folders together gives the union; files of another
    case or metrics version, and unreadable files, are ignored."""
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir(), there.mkdir()
    for folder, seed in ((here, 1), (there, 2)):
        spec = RunSpec("dreambooth", "res_attn", 3e-3, seed, "eval")
        (folder / f"{spec.key}.json").write_text(json.dumps(fake_record(spec, 0.9)))
    other = RunSpec("dreambooth", "res_attn", 3e-3, 3, "eval")
    (there / f"{other.key}.json").write_text(json.dumps(fake_record(other, 0.9, Case(samples=8))))
    fewer_steps = RunSpec("dreambooth", "res_attn", 3e-3, 6, "eval")  # sampled with 4 steps: another case
    (there / f"{fewer_steps.key}.json").write_text(
        json.dumps(fake_record(fewer_steps, 0.9, Case(samples=4, sampling_steps=4)))
    )
    stale = RunSpec("dreambooth", "res_attn", 3e-3, 4, "eval")  # an older metrics version: not a result of this one
    (there / f"{stale.key}.json").write_text(json.dumps({**fake_record(stale, 0.9), "version": RESULT_VERSION - 1}))
    (there / "dreambooth__res_attn__lr0.003__seed5.json").write_text("{not json")  # half copied
    for path in there.glob("*.json"):
        shutil.copy(path, here / path.name)
    assert sorted(read_finished(here, CASE)) == [
        "dreambooth__res_attn__lr0.003__seed1",
        "dreambooth__res_attn__lr0.003__seed2",
    ]
    # files hold the case without its default sampling steps (those written before the field existed did too)
    assert "sampling_steps" not in CASE.record() and Case(sampling_steps=4).record()["sampling_steps"] == 4
    assert CASE.name.endswith("_class50") and Case(sampling_steps=4).name.endswith("_class50_sampling4")


def test_sweep_score_rewards_the_styled_digit_over_ignoring_the_style():
    learned = {"styled_content_accuracy": 0.8, "content_accuracy": 0.85, "style_accuracy": 0.9, "style_fd": 3.0}
    ignored = {"styled_content_accuracy": 0.0, "content_accuracy": 1.0, "style_accuracy": 0.0, "style_fd": 20.0}
    blob = {"styled_content_accuracy": 0.11, "content_accuracy": 0.11, "style_accuracy": 1.0, "style_fd": 6.0}
    assert sweep_score("style", learned) > max(sweep_score("style", ignored), sweep_score("style", blob))
    assert sweep_score("dreambooth", {"subject_fidelity": 0.9, "prior_retention": 0.9, "subject_fd": 5}) > sweep_score(
        "dreambooth", {"subject_fidelity": 1.0, "prior_retention": 0.5, "subject_fd": 2}
    )


def test_style_classifier_round_trip_keeps_its_style_head(tmp_path, style_classifier):
    from benchmarks.digits.classifier import save_digit_classifier

    save_digit_classifier(style_classifier, tmp_path / "clf")
    reloaded = load_style_classifier(tmp_path / "clf")
    images = load_digits_split("test").first(16).styled("outline").images
    assert reloaded.predict_style(images) == style_classifier.predict_style(images)
    save_digit_classifier(load_digit_classifier(), tmp_path / "plain")
    with pytest.raises(ValueError, match="no style head"):
        load_style_classifier(tmp_path / "plain")
