"""The mutation-testing driver's own logic (``scripts/mutate.py``): scope, sampling, jobs, the score. mutmut itself
is not run here (minutes); ``bash scripts/dev.sh mutate`` is."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mutate():
    spec = importlib.util.spec_from_file_location("mutate_script", REPO / "scripts" / "mutate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_every_module_in_scope_exists_and_has_existing_pinning_tests(mutate) -> None:
    groups = {m.group for m in mutate.MODULES}
    assert groups == {"tuners", "integration", "loss", "metrics"}
    for module in mutate.MODULES:
        assert (REPO / module.path).is_file(), module.path
        tests = mutate.pinning_tests(module)
        assert tests, module.path
        for test in tests:
            assert (REPO / test.split("::")[0]).is_file(), test
    # every file of the tuners and the integration is in scope
    for folder in ("tuners", "integration"):
        files = {str(p.relative_to(REPO)) for p in (REPO / "resattn_diffusion" / folder).rglob("*.py")}
        files = {f for f in files if not f.endswith("__init__.py")}
        assert files <= {m.path for m in mutate.MODULES}, files - {m.path for m in mutate.MODULES}


def test_function_scope_selects_only_those_mutants(mutate) -> None:
    loop = next(m for m in mutate.MODULES if m.path.endswith("training/loop.py"))
    models = next(m for m in mutate.MODULES if m.path.endswith("training/models.py"))
    names = [
        "resattn_diffusion.training.loop.x_diffusion_loss__mutmut_3",
        "resattn_diffusion.training.loop.x_diffusion_loss_extra__mutmut_1",
        "resattn_diffusion.training.loop.x_train__mutmut_1",
    ]
    assert mutate.in_scope(loop, names) == names[:1]
    method = "resattn_diffusion.training.models.xǁStableDiffusionBaseǁper_example_loss__mutmut_7"
    assert mutate.in_scope(
        models, [method, "resattn_diffusion.training.models.xǁStableDiffusionBaseǁload__mutmut_1"]
    ) == [method]


def test_sampling_is_a_fixed_share(mutate) -> None:
    names = [f"m.x_f__mutmut_{i}" for i in range(2000)]
    half = mutate.sampled(names, 0.5)
    assert 900 < len(half) < 1100 and half == mutate.sampled(names, 0.5)
    assert set(mutate.sampled(names, 0.2)) <= set(half)  # a smaller share is a subset: reruns resume
    assert mutate.sampled(names, 1.0) == names
    # another seed draws another sample of about the same size
    other = mutate.sampled(names, 0.5, seed="dev")
    assert 900 < len(other) < 1100 and len(set(other) & set(half)) < 0.7 * len(half)


def test_wilson_interval_matches_the_normal_approximation_on_large_samples(mutate) -> None:
    low, high = mutate.wilson_interval(900, 1000)
    half = 1.96 * (0.9 * 0.1 / 1000) ** 0.5
    assert abs(low - (0.9 - half)) < 2e-3 and abs(high - (0.9 + half)) < 2e-3
    assert mutate.wilson_interval(10, 10)[1] == 1.0 and mutate.wilson_interval(10, 10)[0] < 1.0


def test_summary_counts_only_this_runs_sample(mutate, monkeypatch, tmp_path) -> None:
    module = next(m for m in mutate.MODULES if m.path.endswith("tuners/lora.py"))
    names = [f"resattn_diffusion.tuners.lora.x_f__mutmut_{i}" for i in range(400)]
    chosen = set(mutate.sampled(names, 0.25, "0"))  # a seed given explicitly
    # verdicts from another seed's run: killed outside this sample, survived inside it
    codes = {n: (0 if n in chosen else 1) for n in names}
    monkeypatch.setattr(mutate, "_meta", lambda work, m: {"exit_code_by_key": codes})
    monkeypatch.setattr(mutate, "_diff", lambda work, name, python: "")
    row = mutate.summarize(module, tmp_path, "python", 0.0, 0.25, "0")
    assert row["killed"] == 0 and row["survived"] == len(chosen) and row["total"] == 400
    assert row["not_checked"] == 400 - len(chosen)


def test_fastest_first_hook_orders_tests_by_recorded_duration(mutate, monkeypatch, tmp_path) -> None:
    import json

    namespace: dict = {}
    exec(mutate.FASTEST_FIRST, namespace)
    (tmp_path / "mutmut-stats.json").write_text(json.dumps({"duration_by_test": {"a": 3.0, "b": 0.1, "c": 1.0}}))
    monkeypatch.chdir(tmp_path)
    items = [type("Item", (), {"nodeid": n})() for n in ("a", "b", "c", "new")]
    namespace["pytest_collection_modifyitems"](None, None, items)
    assert [i.nodeid for i in items] == ["new", "b", "c", "a"]


def test_a_clean_run_lists_its_imports_and_the_fork_server_imports_them(mutate, monkeypatch, tmp_path) -> None:
    """The lazily imported modules (the loss's ``diffusers.training_utils``) are imported once in the fork server,
    not by every mutant: a clean or stats run writes what it imported; a mutant's run leaves the list alone."""
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(mutate.WARM_IMPORTS, namespace)  # nothing listed yet: imports nothing, fails nothing
    listed = tmp_path / "warm-imports.txt"
    assert not listed.exists()

    monkeypatch.setenv("MUTANT_UNDER_TEST", "stats")
    namespace["pytest_sessionfinish"](None, 0)
    names = listed.read_text().split()
    assert "json" in names and "torch" in names
    assert not any(n.startswith(("_pytest", "mutmut", "test_")) for n in names)

    monkeypatch.setenv("MUTANT_UNDER_TEST", "pkg.x_f__mutmut_1")
    listed.write_text("json\n")
    namespace["pytest_sessionfinish"](None, 0)
    assert listed.read_text() == "json\n"  # a mutant's run does not rewrite the list

    listed.write_text("json\nno_such_module_here\nmutate_warm_probe\n")
    (tmp_path / "mutate_warm_probe.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    exec(mutate.WARM_IMPORTS, {})  # a missing module is skipped, the rest imported
    assert "mutate_warm_probe" in sys.modules
    del sys.modules["mutate_warm_probe"]


def test_jobs_group_modules_by_their_tests(mutate) -> None:
    jobs = mutate.jobs_of(mutate.MODULES)
    assert sorted(m.path for job in jobs for m in job) == sorted(m.path for m in mutate.MODULES)
    for job in jobs:
        assert len({tuple(mutate.pinning_tests(m)) for m in job}) == 1
        assert re.fullmatch(r"[\w.+]+", mutate.job_name(job)) and len(mutate.job_name(job)) <= 80


def test_score_counts_timeouts_as_killed_and_says_when_sampled(mutate) -> None:
    row = {"killed": 8, "timeout": 1, "survived": 1, "no_tests": 0, "skipped": 0, "not_checked": 0, "total": 10}
    assert mutate.score([row]) == "9/10 = 90.0%"
    sampled = dict(row, not_checked=5, total=15)
    # a sample carries the 95% Wilson interval of the whole module's score (9 of 10: 0.596 to 0.982, the textbook
    # value)
    assert mutate.score([sampled]) == "9/10 = 90.0% [59.6, 98.2] (10 of 15 run)"
    assert mutate.score([dict(row, killed=0, timeout=0, survived=0, total=0)]) == "no mutants run"


def test_message_lines_are_not_mutated_but_conditions_are(mutate) -> None:
    patterns = [re.compile(p) for p in mutate.DO_NOT_MUTATE_LINES]

    def skipped(line: str) -> bool:
        return any(p.search(line) for p in patterns)

    assert skipped('        raise ConfigError(f"rank must be positive, got {rank}")')
    assert skipped('            "pass --reference DIR or FILE.npz."')
    assert skipped('            f"the model\'s {name!r} is unknown",')
    assert skipped('        logger.warning("%s holds checkpoints", output_dir)')
    assert not skipped('    if prediction_type == "epsilon":')
    assert not skipped("    scale = head_dim**-0.5")


def test_markdown_table_has_a_line_per_module_and_group(mutate) -> None:
    base = {"survived": 1, "timeout": 0, "no_tests": 0, "skipped": 0, "not_checked": 0}
    rows = [
        dict(base, module="resattn_diffusion/tuners/lora.py", group="tuners", killed=9, total=10),
        dict(base, module="resattn_diffusion/evaluation/metrics.py", group="metrics", killed=3, total=4),
    ]
    lines = mutate.markdown_table(rows).splitlines()
    assert lines[2] == "| evaluation/metrics.py | 3 (0) | 1 | 0 | 3/4 = 75.0% |"
    assert lines[3] == "| tuners/lora.py | 9 (0) | 1 | 0 | 9/10 = 90.0% |"
    assert lines[-1] == "| **all of the above** | | | | **12/14 = 85.7%** |"


@pytest.mark.parametrize(
    "name,value,words",
    [
        ("MUTATE_WORKERS", "abc", "not a number"),
        ("MUTATE_WORKERS", "0", "out of range"),
        ("MUTATE_WORKERS", "-3", "out of range"),
        ("MUTATE_SAMPLE", "2", "out of range"),
        ("MUTATE_SAMPLE", "nan", "out of range"),
        ("MUTATE_SAMPLE", "0", "out of range"),
        ("MUTATE_SEED", "../x", "not a short name"),
    ],
)
def test_bad_environment_numbers_are_refused_before_anything_runs(mutate, monkeypatch, tmp_path, name, value, words):
    monkeypatch.setenv(name, value)
    monkeypatch.setenv("MUTATE_OUT", str(tmp_path / "out"))
    with pytest.raises(SystemExit, match=f"{name}=.*{words}"):
        mutate.main([])
    assert not (tmp_path / "out").exists()


def test_environment_numbers_in_range_are_read(mutate, monkeypatch):
    monkeypatch.setenv("MUTATE_SAMPLE", "0.25")
    assert mutate._environment_number("MUTATE_SAMPLE", float, 1e-6, 1.0, "a share") == 0.25
    monkeypatch.setenv("MUTATE_SAMPLE", "")
    assert mutate._environment_number("MUTATE_SAMPLE", float, 1e-6, 1.0, "a share") is None


def test_job_layout_keeps_two_cores_busy_and_splits_many(mutate) -> None:
    assert mutate.job_layout(4, 1) == (1, 1)
    assert mutate.job_layout(4, 2) == (2, 1)
    assert mutate.job_layout(4, 16) == (4, 4)
    assert mutate.job_layout(1, 16) == (1, 16)
    # the largest group (the integration, sorted first) starts first
    assert mutate.jobs_of(mutate.MODULES)[0][0].group == "integration"


def test_top_level_folders_the_tests_import_are_copied_into_the_work_folder(mutate) -> None:
    # test_loader_api imports pipelines: without it the integration's stats run fails at once
    integration = next(m for m in mutate.MODULES if m.group == "integration")
    assert "pipelines" in integration.extra_files
    for module in mutate.MODULES:
        for test in mutate.pinning_tests(module):
            text = (REPO / test.split("::")[0]).read_text()
            for folder in mutate.TOP_LEVEL_IMPORTS:
                if re.search(rf"^(from|import) {folder}\b", text, re.MULTILINE):
                    assert folder in module.extra_files, (module.path, test, folder)


def test_survivors_markdown_lists_each_with_its_diff_on_one_line(mutate) -> None:
    base = {"killed": 1, "survived": 1, "timeout": 0, "no_tests": 1, "skipped": 0, "not_checked": 0, "total": 3}
    survivors = [
        {"name": "resattn_diffusion.tuners.lora.xǁResLoRAǁ__init____mutmut_12", "verdict": "survived",
         "diff": "-        x = nn.Linear(a, b, bias=False)\n+        x = nn.Linear(a, b, bias=None)"},
        {"name": "resattn_diffusion.tuners.lora.x_f__mutmut_1", "verdict": "no_tests", "diff": ""},
    ]  # fmt: skip
    rows = [dict(base, module="resattn_diffusion/tuners/lora.py", group="tuners", survivors=survivors),
            dict(base, module="resattn_diffusion/tuners/prefix.py", group="tuners", survivors=[])]  # fmt: skip
    assert mutate.markdown_survivors(rows).splitlines() == [
        "**tuners/lora.py** (2)",
        "",
        "- `xǁResLoRAǁ__init____mutmut_12`: `- x = nn.Linear(a, b, bias=False) / + x = nn.Linear(a, b, bias=None)`",
        "- `x_f__mutmut_1` [no_tests]",
    ]


def test_the_default_seed_is_one_no_pin_was_written_against(mutate, monkeypatch) -> None:
    names = [f"m.x_f__mutmut_{i}" for i in range(400)]
    assert mutate.DEFAULT_SEED not in ("0", "dev")  # the seeds whose survivors the pins were written against
    assert mutate.sampled(names, 0.5) == mutate.sampled(names, 0.5, mutate.DEFAULT_SEED)
    assert mutate.sampled(names, 0.5) != mutate.sampled(names, 0.5, "0")
