"""``benchmarks/perf/gpu_run5.sh`` (the fifth GPU run: SDXL training and sampling, compiled sampling) on CPU with
the tiny sizes and the eager compile backend, started as on a lent GPU by ``gpu_device_run.sh OUT 5``: its hard
total time limit holds and it writes its three parts and the summary into OUT/run5."""

from __future__ import annotations

import json
from pathlib import Path

from gpu_run_scripts import run_gpu_script


def test_gpu_run5_keeps_its_total_time_limit_and_writes_every_part(tmp_path: Path) -> None:
    total = 120
    done = run_gpu_script(
        "gpu_device_run.sh",
        [str(tmp_path), "5"],
        5,
        total,
        210,
        GPU_SUITE_ARGS="--tiny --device cpu --compile-backend eager",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("diffusers ")  # already importable here: no wheel installed
    out = tmp_path / "run5"
    took, log = done.took_s, (out / "run.log").read_text()
    assert took < total + 15, took
    assert "train_sdxl: guard 90s" in log
    assert "done in" in log
    compiled = {row["name"]: row for row in json.loads((out / "sampling_compiled.json").read_text())["rows"]}
    assert set(compiled) == {"base", "res_attn (unfused)", "res_attn (unfused) [extra heads]"}
    assert all(row["error"] is None for row in compiled.values()), compiled
    sdxl = {row["name"] for row in json.loads((out / "train_sdxl.json").read_text())["rows"]}
    assert {"floor", "res_attn", "res_bypass"} <= sdxl
    sampled = {row["name"]: row for row in json.loads((out / "sampling_sdxl.json").read_text())["rows"]}
    assert set(sampled) == {"base", "res_attn (unfused)", "res_attn (unfused) [separate branch]"}
    assert all(row["error"] is None and row["forward_s"] > 0 for row in sampled.values()), sampled
    summary = (out / "summary.md").read_text()
    assert "sampling compiled: res_attn unfused, extra heads kept / base compiled" in summary
    assert "SDXL sampling eager: res_attn unfused (separate branch) / base" in summary
    assert len([p for p in out.rglob("*") if p.is_file()]) <= 5


def test_gpu_device_run_refuses_an_unknown_run_before_doing_anything(tmp_path: Path) -> None:
    done = run_gpu_script("gpu_device_run.sh", [str(tmp_path / "out"), "3"], 3, 10, 30)
    assert done.returncode == 2 and "the run is 4 or 5, got '3'" in done.stderr
    assert not (tmp_path / "out").exists()
