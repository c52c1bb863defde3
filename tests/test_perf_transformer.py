"""The transformer training-step benchmark (issue 17, performance) runs its tiny CPU version and writes its table."""

from __future__ import annotations

import json

import pytest

from benchmarks.perf import transformer_step


@pytest.mark.filterwarnings("ignore")
def test_tiny_transformer_step_benchmark_writes_ratios_against_peft_lora(tmp_path):
    pytest.importorskip("peft")
    result = transformer_step.main(
        ["--tiny", "--device", "cpu", "--threads", "1", "--out", str(tmp_path), "--tuners", "res_attn", "res_lora"]
    )
    written = json.loads((tmp_path / transformer_step.RESULT_NAME).read_text())
    assert written["shapes"] == json.loads(json.dumps(result["shapes"]))
    assert [table["shape"] for table in written["shapes"]] == ["flux", "sd3"]
    for table in written["shapes"]:
        rows = {row["case"]: row for row in table["rows"]}
        assert set(rows) == {"floor", "res_attn", "res_lora", "peft_lora"}
        assert all(row["step_ms"] > 0 and row["peak_memory_bytes"] > 0 for row in rows.values())
        # peft LoRA sits on exactly the linears res_lora sits on, at the same rank: the same trainable parameters
        assert rows["res_lora"]["trainable_parameters"] == rows["peft_lora"]["trainable_parameters"] > 0
        assert rows["peft_lora"]["time_vs_peft_lora"] == 1.0 and rows["floor"]["trainable_parameters"] == 0
        assert (
            rows["res_attn"]["memory_vs_floor"]
            == rows["res_attn"]["peak_memory_bytes"] / rows["floor"]["peak_memory_bytes"]
        )


def test_the_time_guard_skips_cases_and_says_so(tmp_path):
    result = transformer_step.main(
        [
            "--tiny",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--out",
            str(tmp_path),
            "--tuners",
            "res_attn",
            "--time_limit",
            "0",
        ]
    )
    rows = [row for table in result["shapes"] for row in table["rows"]]
    assert rows and all(row.get("skipped") == "time guard" for row in rows)


def test_cuda_without_a_gpu_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(transformer_step.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device"):
        transformer_step.main(["--device", "cuda", "--out", str(tmp_path)])
