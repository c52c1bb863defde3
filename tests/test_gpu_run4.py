"""``benchmarks/perf/gpu_run4.sh`` (the fourth GPU run: host overhead, then SD 1.5 sampling and training of Res-Attn)
on CPU with the tiny sizes: its hard total time limit holds and it leaves the host-overhead results in OUT; and the
host-overhead benchmark's rows, op counts and ratios."""

from __future__ import annotations

import json
from pathlib import Path

from gpu_run_scripts import run_gpu_script


def test_gpu_run4_keeps_its_total_time_limit(tmp_path: Path) -> None:
    out = tmp_path / "out"
    total = 40
    done = run_gpu_script(
        "gpu_run4.sh",
        [str(out)],
        4,
        total,
        120,
        HOST_ARGS="--tiny --device cpu --no-peers",
        LDR_ARGS="--tiny --device cpu",
        GPU_SUITE_ARGS="--tiny --device cpu",
    )
    assert done.returncode == 0, done.stderr
    took, log = done.took_s, (out / "run.log").read_text()
    assert took < total + 15, took  # the hard total, plus bash's bookkeeping and slow starts on a loaded CI machine
    assert "host_overhead: guard 30s" in log  # 60 s wanted, clipped to what the total leaves
    assert "done in" in log
    assert len([p for p in out.rglob("*") if p.is_file()]) <= 8


def test_host_overhead_rows_and_counts(tmp_path: Path) -> None:
    from benchmarks.perf import host_overhead

    out = tmp_path / "host_overhead.json"
    result = host_overhead.main(["--tiny", "--out", str(out), "--no-peers"])
    assert json.loads(out.read_text())["benchmark"] == "host_overhead" and out.with_suffix(".md").exists()
    rows = {(row["mode"], row["name"]): row for row in result["rows"]}
    for mode in host_overhead.MODES:
        expected = ["base", "res_attn", "res_attn [reference]"]
        expected += ["res_attn [extra heads]"] if mode == "training" else ["res_attn [fast]"]
        expected += ["res_lora", "glora", "surm_ldr"]  # the peft GLoRA pair only with peers
        expected += ["surm_ldr [run-3 dense]"] if mode == "training" else []
        assert [name for m, name in rows if m == mode] == expected
        base = rows[(mode, "base")]
        assert base["ops"] > 0 and base["ops_vs_base"] == 1.0 and base["extra_ops_per_attention"] == 0.0
        for name in expected[1:]:
            if name != "res_attn [fast]":
                assert rows[(mode, name)]["ops"] > base["ops"]  # on CPU (reference paths) every branch adds ops
            assert rows[(mode, name)]["wall_ms"] > 0
    # On CPU the automatic choice is the reference path; on the CUDA paths Res-Attn's sampling forward takes the
    # extra heads (fewer ops than the base), and so does its training step with extra_heads_training.
    sampling = rows[("sampling", "res_attn")]
    assert sampling["ops"] == rows[("sampling", "res_attn [reference]")]["ops"]
    assert sampling["ops_cuda_paths"] < rows[("sampling", "base")]["ops"] < sampling["ops"]
    assert rows[("sampling", "res_attn [reference]")]["ops_cuda_paths"] == sampling["ops"]
    assert rows[("sampling", "res_attn [fast]")]["ops"] == sampling["ops_cuda_paths"]
    training = rows[("training", "res_attn")]
    extra_heads = rows[("training", "res_attn [extra heads]")]
    assert extra_heads["ops"] == extra_heads["ops_cuda_paths"] < training["ops_cuda_paths"]
    assert not host_overhead.gpu_suite.ResTunerAttnProcessor.extra_heads_training  # the row's context restored it
    # GLoRA: the forced merged path (one GEMM per linear) dispatches fewer ops than its branch
    for mode in host_overhead.MODES:
        assert rows[(mode, "glora")]["ops_cuda_paths"] < rows[(mode, "glora")]["ops"]
    # SURM LDR on the CUDA paths: its FFT-convolution delta dispatches fewer ops per step than run 3's matmul form
    ldr, run3 = rows[("training", "surm_ldr")], rows[("training", "surm_ldr [run-3 dense]")]
    assert ldr["ops"] == run3["ops"]  # the CPU default materialises M by a gather either way
    assert ldr["ops_cuda_paths"] < run3["ops_cuda_paths"]
    assert not host_overhead.gpu_suite.LDRMatrix.use_strided_matmul
    assert result["attentions"] == 8  # the tiny SD1 UNet: attn1 and attn2 of its 4 transformer blocks
