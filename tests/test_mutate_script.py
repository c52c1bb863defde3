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
    assert mutate.score([sampled]) == "9/10 = 90.0% (10 of 15 run)"
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
    assert lines[2] == "| evaluation/metrics.py | 3 | 1 | 0 | 3/4 = 75.0% |"
    assert lines[3] == "| tuners/lora.py | 9 | 1 | 0 | 9/10 = 90.0% |"
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
