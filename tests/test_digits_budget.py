"""The digits benchmark's budget: the default method list, the opt-in larger sizes, the honest time estimate, and
the DreamBooth class-image cache (the same pixels however it is filled)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks.digits import run_benchmark
from benchmarks.digits.methods import (
    ALTERNATIVE_SETTINGS,
    LARGER_SETTINGS,
    all_methods,
    default_methods,
    is_opt_in,
    method_by_name,
    select_methods,
)
from benchmarks.digits.plan import (
    DEFAULT_RUN_SECONDS,
    RESULT_VERSION,
    Case,
    estimate_seconds,
    eval_seeds,
    make_plan,
    plan_seconds,
    remaining_summary,
    run_seconds,
)


# --- which methods run by default ------------------------------------------------------------------------------
def test_default_methods_are_the_tuners_at_their_default_size_the_peers_and_full_finetuning():
    import resattn_diffusion

    names = [method.name for method in default_methods()]
    assert names == [method.name for method in select_methods(None)]
    assert names == [*resattn_diffusion.tuner_names(), "peft_lora", "peft_glora", "peft_c3a", "full_finetune"]
    assert not any(is_opt_in(name) for name in names)
    everything = [method.name for method in select_methods(["all"])]
    assert everything == [method.name for method in all_methods()]
    assert {f"{tuner}-large" for tuner in LARGER_SETTINGS} | set(ALTERNATIVE_SETTINGS) == set(everything) - set(names)


def test_alternative_settings_are_opt_in_by_name_and_measured_on_the_headline_seeds():
    assert [m.name for m in select_methods(["res_attn-1head"])] == ["res_attn-1head"]
    assert method_by_name("res_attn-1head").flags == ("--tuner", "res_attn", "--tuner_arg", "heads=1")
    assert method_by_name("res_attn-1head").family == "operation"
    # --with_large adds sizes, not alternatives
    assert [m.name for m in select_methods(["res_attn"], with_large=True)] == ["res_attn", "res_attn-large"]
    # a candidate default is compared with the default on the same seeds
    assert eval_seeds("res_attn-1head", [0, 1, 2, 3], [4, 5]) == eval_seeds("res_attn", [0, 1, 2, 3], [4, 5])


def test_larger_sizes_are_opt_in_by_name_or_flag():
    assert [m.name for m in select_methods(["res_attn-large"])] == ["res_attn-large"]
    assert [m.name for m in select_methods(["res_attn", "peft_lora"], with_large=True)] == [
        "res_attn",
        "res_attn-large",
        "peft_lora",
    ]
    with_large = [m.name for m in select_methods(None, with_large=True)]
    assert with_large == [m.name for m in all_methods() if m.name not in ALTERNATIVE_SETTINGS]
    # surm_circulant has no size hyperparameter: nothing to add
    assert [m.name for m in select_methods(["surm_circulant"], with_large=True)] == ["surm_circulant"]
    # a run names its method: the larger ones resolve whatever the selection
    assert method_by_name("res_attn-large").flags == ("--tuner", "res_attn", "--tuner_arg", "rank=32")
    with pytest.raises(ValueError, match="unknown method"):
        select_methods(["res_attn-huge"])
    args = run_benchmark.parse_args(["--with_large", "--methods", "res_attn"])
    assert args.with_large and run_benchmark.parse_args([]).with_large is False


def test_the_larger_size_gets_its_own_sweep():
    methods = select_methods(["res_attn"], with_large=True)
    plan = make_plan(["dreambooth"], methods, [0, 1, 2, 3], {})
    assert {(task, method) for task, method in plan.sweeps} == {
        ("dreambooth", "res_attn"),
        ("dreambooth", "res_attn-large"),
    }
    assert sum(spec.method == "res_attn-large" and spec.role == "sweep" for spec in plan.pending) == 3


# --- the estimate -----------------------------------------------------------------------------------------------
CASE = Case(samples=4)


def record(task: str, method: str, seed: int, wall: float, lr: float = 1e-3, role: str = "sweep") -> dict:
    return {
        "version": RESULT_VERSION,
        "case": CASE.record(),
        "task": task,
        "method": method,
        "learning_rate": lr,
        "seed": seed,
        "role": role,
        "metrics": {"subject_fidelity": 0.5, "prior_retention": 1.0, "subject_fd": 1.0},
        "wall_seconds": wall,
    }


def test_run_seconds_read_the_fastest_quarter_of_each_methods_runs():
    """Contention only adds time: runs stretched by other jobs must not set the estimate."""
    walls = [26.0, 30.0, 72.0, 206.0, 208.0, 849.0, 250.0, 260.0]  # two quiet runs, six under load
    finished = {f"k{i}": record("dreambooth", "res_attn", i, wall) for i, wall in enumerate(walls)}
    finished["s"] = record("style", "peft_lora", 0, 40.0)
    measured = run_seconds(finished)
    assert measured[("dreambooth", "res_attn")] == pytest.approx(28.0)  # mean of the fastest 8 // 4 = 2
    assert measured[("style", "peft_lora")] == 40.0  # one run: itself
    # fallbacks: another method of a measured task gets the task's median, an unmeasured task the default
    assert estimate_seconds("dreambooth", "glora", measured) == pytest.approx(28.0)
    assert estimate_seconds("style", "glora", measured) == 40.0
    assert estimate_seconds("dreambooth", "glora", {}) == DEFAULT_RUN_SECONDS["dreambooth"]
    # CPU time, where recorded, is what a run costs a core whatever the load: it wins over the wall clock
    loaded = {f"c{i}": {**record("style", "glora", i, 300.0), "cpu_seconds": 35.0 + i} for i in range(4)}
    assert run_seconds(loaded)[("style", "glora")] == 35.0


def test_status_prices_the_whole_plan_from_measured_runs():
    methods = select_methods(["res_attn", "peft_lora"])
    plan = make_plan(["dreambooth"], methods, [0, 1, 2], {})
    finished = {}
    for spec in plan.pending:  # base and both sweeps; every sweep picks its middle rate
        wall = 1000.0 if spec.seed == 0 and spec.lr == 1e-3 else 20.0  # one run under heavy load
        finished[spec.key] = {**record(spec.task, spec.method, spec.seed, wall, spec.lr, spec.role)}
        finished[spec.key]["metrics"]["subject_fidelity"] = 0.9 if spec.lr == 3e-3 else 0.1
    finished = {key: value for key, value in finished.items() if "peft_lora" not in key}  # peft's sweep not done
    plan = make_plan(["dreambooth"], methods, [0, 1, 2], finished, extra_seeds=[3])
    seconds = plan_seconds(plan)
    ready = list(plan.pending)
    assert (
        sorted((spec.method, spec.role) for spec in ready) == [("peft_lora", "sweep")] * 3 + [("res_attn", "eval")] * 3
    )
    assert plan.unresolved == {("dreambooth", "peft_lora"): 3}
    # res_attn's estimate is 20 s (the loaded run is not in its fastest quarter), peft_lora borrows it
    assert seconds["ready"] == pytest.approx(20.0 * len(ready))
    assert seconds["after_sweeps"] == pytest.approx(3 * 20.0)
    assert seconds["total"] == pytest.approx(seconds["finished"] + seconds["ready"] + seconds["after_sweeps"])
    text = remaining_summary(plan, workers=2)
    assert f"{len(ready)} ready to run" in text and "on 2 workers" in text and "whole plan" in text
    # a finished run of a method outside the selection is no part of this plan's cost
    other = record("dreambooth", "res_attn-large", 0, 20.0)
    widened = make_plan(["dreambooth"], methods, [0, 1, 2], {**finished, "other": other}, extra_seeds=[3])
    assert plan_seconds(widened)["finished"] == pytest.approx(seconds["finished"])
    # ... nor of its count: the summary and the report say how many of *this plan's* runs finished
    assert len(widened.selected_finished()) == len(plan.selected_finished()) == len(plan.finished)
    assert remaining_summary(widened).startswith(f"{len(plan.finished)} runs finished")
    in_flight = [ready[0].key]
    assert plan_seconds(plan, in_flight)["ready"] == pytest.approx(seconds["ready"] - 20.0)
    assert plan_seconds(plan, in_flight)["total"] == pytest.approx(seconds["total"])


# --- the class-image cache --------------------------------------------------------------------------------------
def _class_images(root: Path, count: int) -> list[str]:
    from benchmarks.digits.evaluate_base import DEFAULT_BASE_MODEL_DIR
    from benchmarks.digits.single_run import _reset_accelerate, prepare_class_images
    from benchmarks.digits.tasks import make_task

    task = make_task("dreambooth", 9, "rotated", count)
    folders = task.prepare(root)
    prepare_class_images(task, folders, DEFAULT_BASE_MODEL_DIR)
    _reset_accelerate()
    return sorted(path.name for path in folders["class_dir"].glob("*.png"))


def test_cached_class_images_are_bit_identical_to_regenerated_ones(tmp_path):
    """Class image i depends on the base, the class prompt, seed 0 and i only: generated at once in one process
    (1 thread) or one by one, topped up, in another (2 threads), the files are the same. Their names carry a hash
    of the pixels, so equal names are equal pixels."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        at_once = _class_images(tmp_path / "a", 2)
        assert torch.get_num_threads() == 1  # restored after generating
        torch.set_num_threads(2)
        _class_images(tmp_path / "b", 1)
        topped_up = _class_images(tmp_path / "b", 2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert len(at_once) == 2 and at_once == topped_up
    # a full cache is left alone: nothing regenerated, nothing added
    folder = tmp_path / "b" / "class_images_a_photo_of_digit"
    before = {path.name: path.stat().st_mtime_ns for path in folder.glob("*.png")}
    assert _class_images(tmp_path / "b", 2) == topped_up
    assert {path.name: path.stat().st_mtime_ns for path in folder.glob("*.png")} == before
