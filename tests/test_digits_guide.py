"""The claims and the "which tuner when" table are generated from the data and never say more than it: synthetic
finished runs where one method is significantly better (it is named), where intervals overlap ("no significant
difference"), too few seeds (nothing claimed); cost rows from perf result files, cited; the README blocks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.digits import run_benchmark
from benchmarks.digits.guide import (
    Difference,
    check_readme,
    claim_sentence,
    claim_sentences,
    rank_methods,
    readme_blocks,
    replace_marked_block,
    update_readme,
    which_tuner_rows,
    which_tuner_table,
)
from benchmarks.digits.methods import INITIAL_SWEEP, method_by_name
from benchmarks.digits.plan import RESULT_VERSION, Case, RunSpec, make_plan
from benchmarks.digits.report import TASK_METRICS, welch_difference_interval, welch_p_value

CASE = Case(samples=4)
SEEDS = [0, 1, 2, 3, 4, 5]
#: every metric at a neutral value; each test overrides the ones it is about
NEUTRAL = {
    "subject_fidelity": 0.5,
    "prior_retention": 0.9,
    "subject_fd": 5.0,
    "class_leak": 0.1,
    "worst_prior_accuracy": 0.5,
    "prompt_separation": 0.8,
    "styled_content_accuracy": 0.5,
    "content_accuracy": 0.8,
    "style_accuracy": 0.8,
    "worst_prompt_accuracy": 0.5,
    "label_entropy": 0.9,
    "style_fd": 5.0,
}
PARAMETERS = {
    "res_attn": 24_064,
    "peft_lora": 23_296,
    "res_adapter": 22_528,
    "res_bypass": 80_000,
    "full_finetune": 1e6,
}


def _record(spec: RunSpec, metrics: dict, parameters: int) -> dict:
    return {
        "version": RESULT_VERSION,
        "case": CASE.record(),
        "task": spec.task,
        "method": spec.method,
        "learning_rate": spec.lr,
        "seed": spec.seed,
        "role": spec.role,
        "metrics": {**NEUTRAL, **metrics},
        "wall_seconds": 20.0,
        "trainable_parameters": int(parameters),
        "family": method_by_name(spec.method).family,
        "seconds_per_step": 0.05,
        "peak_rss_mb": 500.0,
        "grid": spec.key + ".png",
    }


def synthetic_plan(values: dict[tuple[str, str], dict[str, list[float]]]):
    """A plan whose sweeps are resolved at their middle rate and whose evaluation seeds hold ``values``:
    (task, method) -> metric -> one value per reported seed."""
    finished = {}
    methods = sorted({method for _, method in values}, key=list(PARAMETERS).index)
    tasks = sorted({task for task, _ in values})
    for (task, method), metrics in values.items():
        rates = sorted(INITIAL_SWEEP[(method_by_name(method).family, task)])
        for rate in rates:  # the middle rate wins the sweep
            spec = RunSpec(task, method, rate, 0, "sweep")
            good = rate == rates[1]
            score = {"subject_fidelity": 0.9 if good else 0.1, "styled_content_accuracy": 0.9 if good else 0.1}
            finished[spec.key] = _record(spec, score, PARAMETERS[method])
        count = len(next(iter(metrics.values())))
        for index, seed in enumerate(SEEDS[1 : 1 + count]):
            spec = RunSpec(task, method, rates[1], seed, "eval")
            finished[spec.key] = _record(spec, {m: v[index] for m, v in metrics.items()}, PARAMETERS[method])
    plan = make_plan(tasks, [method_by_name(m) for m in methods], SEEDS[:4], finished, SEEDS[4:])
    return plan, tasks, methods


HIGH = [0.90, 0.95, 0.92, 0.93, 0.94]
LOW = [0.50, 0.55, 0.45, 0.52, 0.48]
SPREAD = [0.30, 0.70, 0.50, 0.60, 0.40]


def test_a_significantly_better_method_is_recommended_alone():
    plan, tasks, methods = synthetic_plan(
        {
            ("dreambooth", "res_attn"): {"subject_fidelity": HIGH, "prior_retention": [0.9] * 5},
            ("dreambooth", "peft_lora"): {"subject_fidelity": LOW},
            ("dreambooth", "res_adapter"): {"subject_fidelity": [0.6, 0.62, 0.58]},
            ("dreambooth", "full_finetune"): {"subject_fidelity": [1.0] * 5},
        }
    )
    ranking = rank_methods(plan, "dreambooth", "subject_fidelity", ["res_attn", "peft_lora", "res_adapter"])
    assert ranking.recommended == ["res_attn"] and ranking.behind == ["res_adapter", "peft_lora"]
    need, pick, evidence = which_tuner_rows(plan, tasks, methods)[0]
    assert need == "a new subject (DreamBooth)"
    assert pick.startswith("`res_attn` (significantly better than each of the 2 other methods")
    assert "`res_attn` 0.93 [" in evidence and "(5 seeds)" in evidence and "prior retention 0.90" in evidence
    assert "next `res_adapter` 0.60 [" in evidence
    # full fine-tuning is the ceiling shown beside the pick, never the pick
    assert "`full_finetune`" not in pick and "the ceiling `full_finetune` 1.00" in evidence
    assert "significantly worse" in evidence.split("the ceiling", 1)[1]


def test_overlapping_intervals_give_no_significant_difference():
    plan, tasks, methods = synthetic_plan(
        {
            ("style", "res_attn"): {"styled_content_accuracy": SPREAD},
            ("style", "peft_lora"): {"styled_content_accuracy": [0.45, 0.65, 0.55, 0.35, 0.60]},
            ("style", "res_adapter"): {"styled_content_accuracy": [0.05, 0.02, 0.04]},
        }
    )
    need, pick, evidence = which_tuner_rows(plan, tasks, methods)[0]
    assert need == "a style"
    assert pick == "no significant difference between `peft_lora`, `res_attn`; significantly behind the best: 1 method"
    ranking = rank_methods(plan, "style", "styled_content_accuracy", methods)
    assert ranking.recommended == [] and ranking.group == ["peft_lora", "res_attn"]  # best mean first


def test_one_seed_is_not_compared_and_nothing_is_claimed():
    plan, tasks, methods = synthetic_plan(
        {
            ("dreambooth", "res_attn"): {"subject_fidelity": [1.0]},
            ("dreambooth", "peft_lora"): {"subject_fidelity": LOW},
        }
    )
    ranking = rank_methods(plan, "dreambooth", "subject_fidelity", methods)
    assert ranking.too_few == ["res_attn"] and ranking.recommended == []
    assert "only method with 2 or more seeds" in ranking.verdict()
    sentence = claim_sentence(
        Difference("dreambooth", "subject_fidelity", "res_attn", "peft_lora", (1.0,), tuple(LOW))
    )
    assert "1 vs 5 seeds, too few to compare" in sentence and "significant" not in sentence
    assert "not measured yet" in claim_sentence(
        Difference("dreambooth", "subject_fidelity", "res_attn", "peft_lora", (), tuple(LOW))
    )


def test_claim_sentences_follow_the_interval():
    better = Difference("dreambooth", "subject_fidelity", "res_attn", "peft_lora", tuple(HIGH), tuple(LOW))
    assert claim_sentence(better).startswith(
        "`res_attn` vs `peft_lora` on DreamBooth subject fidelity (higher is better): +0.43 ["
    )
    assert "significantly better (Welch p = " in claim_sentence(better) and "5 vs 5 seeds" in claim_sentence(better)
    # lower is better: a lower FD is "better", a higher leak "worse"
    fd = Difference("dreambooth", "subject_fd", "res_attn", "peft_lora", (2.0, 2.1, 1.9), (5.0, 5.2, 4.9))
    assert "(lower is better): -3.0 [" in claim_sentence(fd) and "significantly better" in claim_sentence(fd)
    leak = Difference("dreambooth", "class_leak", "res_attn", "peft_lora", tuple(HIGH), tuple(LOW))
    assert "significantly worse" in claim_sentence(leak)
    same = Difference("style", "styled_content_accuracy", "res_attn", "peft_lora", tuple(SPREAD), tuple(SPREAD[::-1]))
    assert "+0.00 [-0." in claim_sentence(same) and "no significant difference (Welch p = 1" in claim_sentence(same)
    plan, tasks, _ = synthetic_plan(
        {
            ("dreambooth", "res_attn"): {"subject_fidelity": HIGH},
            ("dreambooth", "peft_lora"): {"subject_fidelity": LOW},
            ("dreambooth", "full_finetune"): {"subject_fidelity": [0.9, 0.95, 0.91, 0.94, 0.93]},
        }
    )
    sentences = claim_sentences(plan, tasks, ["res_attn"], metrics=[("dreambooth", "subject_fidelity")])
    assert len(sentences) == 2
    assert "vs `peft_lora`" in sentences[0] and "significantly better" in sentences[0]
    assert "vs `full_finetune`" in sentences[1] and "no significant difference" in sentences[1]


def test_the_difference_interval_excludes_zero_exactly_when_welch_is_significant():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(300):
        a = rng.normal(0, 1, rng.integers(2, 7))
        b = rng.normal(rng.uniform(0, 3), rng.uniform(0.2, 2), rng.integers(2, 7))
        _, low, high = welch_difference_interval(a, b)
        significant = welch_p_value(a, b) < 0.05
        assert (low > 0 or high < 0) == significant
        seen.add(significant)
    assert seen == {True, False}
    assert welch_difference_interval([1.0, 1.0], [0.0, 0.0]) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="two values"):
        welch_difference_interval([1.0], [0.0, 0.5])


# --- cost rows -----------------------------------------------------------------------------------------------------
def _perf_dir(tmp_path: Path) -> Path:
    perf = tmp_path / "perf"
    (perf / "gpu_h100_run1").mkdir(parents=True, exist_ok=True)
    memory = [
        {"name": "floor", "peak_memory_mb": 4000.0},
        {"name": "res_bypass", "peak_memory_mb": 400.0},  # cannot bind an identifier
        {"name": "res_attn", "peak_memory_mb": 4040.0},
        {"name": "res_adapter", "peak_memory_mb": 4100.0},  # within 5% of res_attn
        {"name": "peft_lora", "peak_memory_mb": 4400.0},
        {"name": "res_attn (heads=1)", "peak_memory_mb": 10.0},  # a variant, not a benchmark method
    ]
    (perf / "gpu_h100_run1" / "train_sd15.json").write_text(json.dumps({"rows": memory}))
    sampling = [
        {"name": "base", "tuner": None, "mode": "frozen", "vs_base": 1.0},
        {"name": "res_attn (unfused)", "tuner": "res_attn", "mode": "unfused", "vs_base": 1.14},
        {"name": "peft_lora r4 (fused)", "tuner": "peft_lora", "mode": "fused", "vs_base": 1.005},
    ]
    (perf / "sampling.json").write_text(json.dumps({"rows": sampling}))
    (perf / "load_time.json").write_text(json.dumps({"rows": [{"name": "res_adapter", "file_kb": 313.7}]}))
    return perf


def test_cost_rows_come_from_the_measured_files_and_cite_them(tmp_path):
    plan, tasks, methods = synthetic_plan(
        {
            ("dreambooth", "res_attn"): {"subject_fidelity": HIGH},
            ("dreambooth", "peft_lora"): {"subject_fidelity": LOW},
            ("dreambooth", "res_adapter"): {"subject_fidelity": [0.9, 0.93, 0.95]},
            ("dreambooth", "res_bypass"): {"subject_fidelity": [0.0, 0.0, 0.03]},
        }
    )
    rows = {
        need: (pick, evidence) for need, pick, evidence in which_tuner_rows(plan, tasks, methods, _perf_dir(tmp_path))
    }
    pick, evidence = rows["tight GPU memory (training)"]
    assert pick.startswith(
        "lowest peak training memory: `res_bypass` († cannot bind a new identifier); for a new "
        "subject: `res_attn`, `res_adapter`."
    )
    assert "`res_bypass` 400 MB = 0.10x the floor" in evidence and "heads=1" not in evidence
    assert "gpu_h100_run1/train_sd15.json" in evidence
    pick, evidence = rows["zero inference cost"]
    assert "fuses into the base weights: `peft_lora`" in pick and "`res_attn`" not in pick.split(".")[0]
    assert "fused sampling 1.00-1.00x the base" in evidence and "sampling.json" in evidence
    pick, evidence = rows["smallest file"]
    assert pick.startswith("smallest of the 4 methods run: `res_adapter` (22,528 parameters)")
    # res_adapter is also in DreamBooth's top group (no significant difference from res_attn): the smallest there
    assert "smallest not shown worse than the best on DreamBooth: `res_adapter`" in pick
    assert "`res_adapter` 22,528 x 4 B = 88.0 kB" in evidence and "`res_adapter` 314 kB" in evidence
    assert "load_time.json" in evidence
    table = which_tuner_table(plan, tasks, methods, _perf_dir(tmp_path))
    assert table.count("\n| ") == 4  # one line per row (no style task here), after the header


def test_rows_without_measurements_are_left_out_not_invented(tmp_path):
    plan, tasks, methods = synthetic_plan({("style", "res_attn"): {"styled_content_accuracy": SPREAD}})
    needs = [need for need, _, _ in which_tuner_rows(plan, tasks, methods, tmp_path / "empty")]
    assert needs == ["a style", "smallest file"]


# --- the README ---------------------------------------------------------------------------------------------------
README = """# x
intro
<!-- digits-claims:begin -->
old claims
<!-- digits-claims:end -->
middle
<!-- digits-which-tuner:begin -->
old table
<!-- digits-which-tuner:end -->
end
"""


def test_readme_blocks_are_rewritten_between_their_markers_only(tmp_path):
    plan, tasks, methods = synthetic_plan(
        {
            ("dreambooth", "res_attn"): {"subject_fidelity": HIGH},
            ("dreambooth", "peft_lora"): {"subject_fidelity": LOW},
        }
    )
    readme = tmp_path / "README.md"
    readme.write_text(README)
    check_readme(readme)
    update_readme(readme, readme_blocks(plan, tasks, methods, tmp_path))
    text = readme.read_text()
    assert text.startswith("# x\nintro\n<!-- digits-claims:begin -->\n") and text.endswith("end\n")
    assert "old claims" not in text and "old table" not in text and "\nmiddle\n" in text
    assert "`res_attn` vs `peft_lora` on DreamBooth subject fidelity" in text and "| a new subject" in text
    update_readme(readme, readme_blocks(plan, tasks, methods, tmp_path))
    assert readme.read_text() == text  # regenerating is stable


def test_a_readme_without_markers_is_refused_before_anything_changes(tmp_path):
    readme = tmp_path / "README.md"
    broken = README.replace("<!-- digits-which-tuner:end -->\n", "")
    readme.write_text(broken)
    with pytest.raises(ValueError, match="digits-which-tuner:end"):
        check_readme(readme)
    with pytest.raises(ValueError, match="exactly one"):
        update_readme(readme, {"digits-claims": "new", "digits-which-tuner": "new"})
    assert readme.read_text() == broken  # the first block was fine, but nothing was written
    with pytest.raises(ValueError, match="exactly one"):
        replace_marked_block(README + README, "digits-claims", "x")
    with pytest.raises(SystemExit, match="digits-which-tuner"):
        run_benchmark.parse_args(["--report_only", "--readme", str(readme)])
    with pytest.raises(SystemExit, match="not a file"):
        run_benchmark.parse_args(["--report_only", "--readme", str(tmp_path / "missing.md")])


def test_task_metrics_cover_the_guides_rows():
    from benchmarks.digits.guide import QUALITY_ROWS

    for task, metric, secondary in QUALITY_ROWS.values():
        assert metric in TASK_METRICS[task] and secondary in TASK_METRICS[task]


def test_unmeasured_methods_make_a_pick_provisional():
    plan, tasks, methods = synthetic_plan(
        {
            ("dreambooth", "res_attn"): {"subject_fidelity": HIGH},
            ("dreambooth", "peft_lora"): {"subject_fidelity": LOW},
        }
    )
    ranking = rank_methods(plan, "dreambooth", "subject_fidelity", ["res_attn", "peft_lora", "res_adapter"])
    assert ranking.unmeasured == ["res_adapter"] and ranking.recommended == ["res_attn"]
    assert ranking.verdict().endswith("(so far: 1 of the methods have fewer than 2 seeds)")
    _, pick, evidence = which_tuner_rows(plan, tasks, [*methods, "res_adapter"])[0]
    assert "so far" in pick and "not measured yet: `res_adapter`" in evidence


def test_the_report_carries_the_guide_and_links_the_perf_files_from_where_it_is_written(tmp_path):
    import argparse

    from benchmarks.digits.guide import PERF_RESULTS_DIR, REPO_ROOT
    from benchmarks.digits.report import write_report

    plan, tasks, methods = synthetic_plan(
        {
            ("dreambooth", "res_attn"): {"subject_fidelity": HIGH},
            ("dreambooth", "peft_lora"): {"subject_fidelity": LOW},
        }
    )
    rows = which_tuner_rows(plan, tasks, methods, PERF_RESULTS_DIR, REPO_ROOT / "benchmarks" / "digits" / "results")
    memory = dict((need, evidence) for need, _, evidence in rows)["tight GPU memory (training)"]
    assert "](../../perf/results/gpu_h100_run1/train_sd15.json)" in memory  # the shipped perf results, linked
    readme = tmp_path / "README.md"
    readme.write_text(README)
    args = argparse.Namespace(
        tasks=tasks,
        methods=methods,
        with_large=False,
        seeds=SEEDS[:4],
        extra_seeds=SEEDS[4:],
        max_widen=2,
        readme=readme,
    )
    report = write_report(plan, CASE, args, tmp_path, tmp_path / "runs").read_text()
    assert "## Which tuner when" in report and "| a new subject (DreamBooth) | `res_attn`" in report
    assert "## Claims against peft LoRA and full fine-tuning" in report
    assert "- `res_attn` vs `peft_lora` on DreamBooth subject fidelity" in report
    assert "`res_attn` vs `peft_lora` on DreamBooth prior retention" in readme.read_text()  # the README's fuller list
