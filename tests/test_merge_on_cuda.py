"""The measured per-device choice of the merged GEMM (issue 14, H100 run 1): on CUDA, unforced, a layer merges only
when every tuner's merged path measured faster there (``merge_on_cuda``); GLoRA's did not, so it keeps its branch;
``forced_paths("fast")`` still merges it (the benchmark's ``glora [fast]`` row), and the CPU stays on branches."""

from __future__ import annotations

import torch

import resattn_diffusion as rd
from resattn_diffusion.integration import processors
from resattn_diffusion.integration.processors import LinearBank, select_linear_path
from resattn_diffusion.testing import tiny_unet
from resattn_diffusion.tuners.fast_paths import forced_paths


def _bank(*names: str) -> LinearBank:
    unet = tiny_unet("sd1")
    for name in names:
        rd.add_res_tuner(unet, rd.ResTunerConfig(name), adapter_name=name)
    return next(m.res_tuner_bank for m in unet.modules() if isinstance(getattr(m, "res_tuner_bank", None), LinearBank))


def test_glora_keeps_its_branch_on_cuda_unless_forced(monkeypatch) -> None:
    x = torch.zeros(1, 2, 4)
    glora, res_lora, both = _bank("glora"), _bank("res_lora"), _bank("res_lora", "glora")
    assert select_linear_path(glora, x, glora.active()) == "branch"  # CPU: reference
    monkeypatch.setattr(processors, "fast_path_wanted", lambda device_type: True)  # as on CUDA
    assert select_linear_path(res_lora, x, res_lora.active()) == "merged"
    assert select_linear_path(glora, x, glora.active()) == "branch"
    assert select_linear_path(both, x, both.active()) == "branch"  # one unmeasured tuner keeps the layer apart
    with forced_paths("fast"):
        assert select_linear_path(glora, x, glora.active()) == "merged"
    glora.path = "merged"  # a per-bank setting still wins
    assert select_linear_path(glora, x, glora.active()) == "merged"
