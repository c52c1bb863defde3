"""``benchmarks/perf/gpu_run3.sh`` (the third GPU run: profile, then SURM/Res-Attn training rows, then sampling) on
CPU with the tiny sizes: its hard total time limit holds -- a part gets at most what is left, the rest are skipped
and said so -- and it leaves the profile and few files in OUT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_run3_keeps_its_total_time_limit(tmp_path: Path) -> None:
    out = tmp_path / "out"
    total = 27
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        GPU_SUITE_ARGS="--tiny --device cpu",
        PROFILE_ARGS="--tiny --device cpu --rows base",
        GPU_RUN3_TOTAL_S=str(total),
    )
    start = time.monotonic()
    subprocess.run(["bash", "benchmarks/perf/gpu_run3.sh", str(out)], cwd=ROOT, env=env, check=True, timeout=120)
    took = time.monotonic() - start
    log = (out / "run.log").read_text()
    assert took < total + 15, took  # the hard total, plus bash's bookkeeping and slow starts on a loaded CI machine
    assert f"profile: guard {total - 10}s" in log  # 110 s wanted, clipped to what the total leaves
    assert "skipped, time is up" in log and "done in" in log
    profile = json.loads((out / "profile.json").read_text())
    assert profile["benchmark"] == "gpu_profile"  # written before the first row: there even if it was killed
    assert [row["name"] for row in profile["rows"]] in ([], ["base"])  # on loaded cores the row may not finish
    assert len([p for p in out.rglob("*") if p.is_file()]) <= 6


def test_train_part_with_chosen_peers_and_no_extra_rows(tmp_path: Path) -> None:
    """What run 3's train_sd15 part asks for: our rows, the floor and the named peers only."""
    import pytest

    from benchmarks.perf import gpu_suite

    result = gpu_suite.run_part(
        "train_sd15",
        tmp_path,
        "cpu",
        tiny=True,
        budget=600,
        tuners=["res_attn", "surm_ldr"],
        peer_rows=["peft_lora"],
        extra_rows=False,
        run2_dense_rows=["surm_ldr"],
    )
    names = [row["name"] for row in result["rows"]]
    expected = ["floor", "res_attn", "surm_ldr", "surm_ldr [run-2 dense]"]
    assert names == expected + (["peft_lora"] if gpu_suite.train_step.peers.peft_available() else [])
    assert all(row["step_s"] for row in result["rows"]), result["rows"]
    assert gpu_suite.StructuredMatrix.recompute_dense  # the row's context restored the default
    with pytest.raises(SystemExit, match="peer-rows"):
        gpu_suite.run_part("train_sd15", tmp_path, "cpu", True, 600, tuners=["res_attn"], peer_rows=["peft_ia3"])
    with pytest.raises(SystemExit, match="run2-dense-rows"):
        gpu_suite.run_part("train_sd15", tmp_path, "cpu", True, 600, tuners=["res_attn"], run2_dense_rows=["res_attn"])


def test_run2_dense_context_forms_the_delta_as_before_and_restores_the_defaults() -> None:
    import torch

    from benchmarks.perf import gpu_suite
    from resattn_diffusion.tuners.fast_paths import forced_paths
    from resattn_diffusion.tuners.structured import LDRMatrix

    matrix = LDRMatrix(12, 20)
    saved = []
    with forced_paths("fast"), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        strided = matrix.dense_matrix()
        assert not saved  # the strided product is recomputed in backward: nothing kept
        with gpu_suite.run2_dense():
            fft = matrix.dense_matrix()
    assert saved and any(t.is_complex() for t in saved)  # run 2's FFT form kept its spectra
    assert LDRMatrix.use_strided_dense and LDRMatrix.recompute_dense
    torch.testing.assert_close(strided, fft)
