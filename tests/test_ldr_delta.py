"""``benchmarks/perf/ldr_delta.py`` (SURM LDR's fast dense delta: FFT convolution against run 3's matmul) at its
tiny size: both forms agree, the rows and the markdown are written, the FFT form dispatches fewer ops."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.perf import ldr_delta
from resattn_diffusion.tuners.structured import LDRMatrix


def test_ldr_delta_smoke(tmp_path: Path) -> None:
    out = tmp_path / "ldr_delta.json"
    result = ldr_delta.main(["--tiny", "--out", str(out)])
    assert json.loads(out.read_text())["benchmark"] == "ldr_delta"
    assert "FFT convolution ms" in out.with_suffix(".md").read_text()
    assert [(row["d_out"], row["d_in"]) for row in result["rows"]] == list(ldr_delta.TINY_SHAPES)
    for row in result["rows"]:
        assert row["fft_ops"] < row["run3_matmul_ops"]
        assert row["fft_ms"] > 0 and row["run3_matmul_ms"] > 0 and row["time_ratio"] > 0
    assert not LDRMatrix.use_strided_matmul  # each call restores the class default


def test_ldr_delta_refuses_zero_repeats_and_a_missing_gpu(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="repeats"):
        ldr_delta.main(["--repeats", "0", "--out", str(tmp_path / "x.json")])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="sees no CUDA device"):
            ldr_delta.main(["--device", "cuda", "--out", str(tmp_path / "x.json")])
    assert not list(tmp_path.iterdir())


def test_ldr_delta_time_guard_writes_what_it_measured(tmp_path: Path) -> None:
    """``--budget`` (gpu_run4.sh passes it with ``--started-at``): no shape starts after it; the file is written."""
    out = tmp_path / "ldr_delta.json"
    result = ldr_delta.main(["--tiny", "--budget", "0", "--started-at", "0", "--out", str(out)])
    assert result["rows"] == [] and json.loads(out.read_text())["rows"] == []
