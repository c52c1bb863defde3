"""``benchmarks/perf/gpu_profile.py`` (issue 14's third GPU run) on CPU with the tiny UNet: it profiles, attributes
time to the frozen model, the tuner branches, the merged path's folds and the optimizer (backward ops included),
counts the bytes saved for backward per tuner module, and leaves nothing installed behind."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity

import resattn_diffusion as rd
from benchmarks.perf import gpu_profile, peers
from resattn_diffusion.testing import frozen_tiny_unet
from resattn_diffusion.tuners.base import OperationTuner
from resattn_diffusion.tuners.surm import SURMLinear


class _Branch(OperationTuner):
    """A branch of two matmuls beside a frozen linear (the profile must find both, and their backward)."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width, width) / width**0.5)

    def forward(self, x, context=None, frozen=None):
        return (x @ self.weight) @ self.weight


def test_backward_ops_follow_their_forward_op_into_the_branch():
    model = nn.Sequential(nn.Linear(64, 64), _Branch(64))
    x = torch.randn(32, 64, requires_grad=True)
    with gpu_profile.Attribution(model), torch.profiler.profile(activities=[ProfilerActivity.CPU]) as profiler:
        model(x).sum().backward()
    classified = gpu_profile.classify_events(list(profiler.events()))
    backward = {}
    for event, category in classified:
        if event.name.startswith(gpu_profile.BACKWARD_PREFIX):
            backward.setdefault(event.name.split(": ")[-1], []).append(category)
    assert backward["MmBackward0"] == ["branch", "branch"]
    assert set(backward["AddmmBackward0"]) == {"frozen"}
    forward = {category for event, category in classified if event.name == "aten::mm"}
    assert "branch" in forward
    split = gpu_profile.split_time(list(profiler.events()), on_device=False)
    assert split["branch"] > 0 and split["frozen"] > 0 and set(split) == set(gpu_profile.CATEGORIES)
    assert not model[1]._forward_hooks and not model[1]._forward_pre_hooks  # removed on exit
    # The GPU's accounting (kernels per op; none on CPU) runs on the same events without failing.
    on_device = gpu_profile.split_time(list(profiler.events()), on_device=True)
    assert set(on_device) == {*gpu_profile.CATEGORIES, "unattributed"} and not any(on_device.values())
    kernels = gpu_profile.top_kernels(profiler.key_averages(), on_device=True, calls=1)
    assert 0 < len(kernels) <= gpu_profile.TOP_KERNELS


def test_branch_modules_are_our_tuners_and_peft_lora_factors():
    unet = frozen_tiny_unet("sd1")
    rd.add_res_tuner(unet, rd.ResTunerConfig("res_attn"))
    ours = gpu_profile.branch_modules(unet)
    assert ours and all(type(m).__name__ == "ResAttn" for m in ours.values())
    if peers.peft_available():
        lora = frozen_tiny_unet("sd1")
        peers.add_peft_lora(lora, 4)
        found = gpu_profile.branch_modules(lora)
        assert found and all(".lora_" in f".{name}" for name in found)
        assert not any(name.endswith("base_layer") for name in found)


def test_profile_tiny_rows_on_cpu(tmp_path: Path):
    original_fold = SURMLinear.__dict__["fold"]
    result = gpu_profile.run(
        tmp_path, device="cpu", tiny=True, rows=["surm_ldr", "res_attn (unfused)"], paths="fast", budget=600
    )
    assert SURMLinear.__dict__["fold"] is original_fold  # the profiling wrappers are gone
    saved = json.loads((tmp_path / "profile.json").read_text())
    assert (
        [row["name"] for row in saved["rows"]]
        == ["surm_ldr", "res_attn (unfused)"]
        == [row["name"] for row in result["rows"]]
    )
    ldr, sampling = saved["rows"]
    assert "error" not in ldr and "error" not in sampling, (ldr.get("error"), sampling.get("error"))
    # Forced fast: SURM-LDR runs on the merged GEMM, its deltas formed in fold, which keeps nothing n x n for backward:
    # g's spectrum and the skew factor's n + d_in - 1 diagonals, about as many bytes as the float32 parameters.
    assert ldr["split_ms_per_call"]["fold"] > 0 and ldr["split_ms_per_call"]["branch"] == 0
    assert 0 < ldr["saved_for_backward"]["by_category_mb"]["fold"] <= 2 * 4 * ldr["trainable_parameters"] / 2**20
    assert ldr["saved_for_backward"]["by_category_mb"]["frozen"] > 0
    assert 0 < len(ldr["top_kernels"]) <= gpu_profile.TOP_KERNELS
    assert ldr["trainable_parameters"] > 0 and ldr["peak_memory_mb"] > 0
    # Forced fast: Res-Attn's sampling forward runs its branch as extra heads of the frozen attention (one SDPA), so
    # no branch module is called and its work is counted in the frozen attention's time.
    assert sampling["split_ms_per_call"]["branch"] == 0 and sampling["split_ms_per_call"]["frozen"] > 0
    assert "saved_for_backward" not in sampling
    assert sampling["measured_ms_per_call"] > 0 and sampling["wall_ms_per_call"] > 0
    assert sampling["wall_ms_per_call_profiled"] > 0
    markdown = (tmp_path / "profile.md").read_text()
    assert "| surm_ldr (training step) |" in markdown and "## res_attn (unfused): top" in markdown


def test_profile_time_guard_skips_rows(tmp_path: Path):
    result = gpu_profile.run(tmp_path, device="cpu", tiny=True, rows=["floor", "base"], budget=0)
    assert [row["error"] for row in result["rows"]] == ["skipped: time guard"] * 2
    assert json.loads((tmp_path / "profile.json").read_text())["rows"][0]["name"] == "floor"
