"""Which tuner a request reaches, and what a request naming no loaded tuner says (issue 18, mutation pins).

The pipeline mixin (``loader_mixin.py``): enabling one tuner leaves the others as they are, saving names the
pipeline's loaded tuners (and writes nothing) when the name is wrong, a per-block mix resets the tuner's global
scale to 1, and a tuner file refuses a ``config=``. The bypass's model-kind functions (``unet_tuners.py``): a name
that is not a loaded bypass, or a UNet without one, is the project's error, naming it; a bypass whose injection
point has no parameters is built in float32 on the CPU.
"""

from __future__ import annotations

import pytest
import torch
from test_pin_integration_files_loader import LORA, _inputs, _out, _Pipe, _pipe_with, _settings
from torch import nn

import resattn_diffusion as rd
from resattn_diffusion.integration.api import set_res_tuner_layer_scales
from resattn_diffusion.integration.state import get_state
from resattn_diffusion.integration.unet_tuners import (
    BANK_ATTR,
    detach_unet_tuner,
    iter_unet_tuner,
    unet_tuner_settings,
)
from resattn_diffusion.testing import frozen_tiny_unet, randomize_tuner, unet_inputs


def test_enabling_one_tuner_leaves_the_other_disabled_ones_off():
    pipe = _pipe_with("a", "b", "c")
    pipe.disable_res_tuner(["a", "b"])
    pipe.enable_res_tuner("a")
    assert {n: s["enabled"] for n, s in _settings(pipe).items()} == {"a": True, "b": False, "c": True}
    pipe.disable_res_tuner()
    pipe.enable_res_tuner(["c", "b"])
    assert {n: s["enabled"] for n, s in _settings(pipe).items()} == {"a": False, "b": True, "c": True}
    with pytest.raises(rd.ResTunerError, match=r"no tuner named 'd' is loaded; loaded tuners \(adapter names\)"):
        pipe.enable_res_tuner(["a", "d"])
    assert {n: s["enabled"] for n, s in _settings(pipe).items()} == {"a": False, "b": True, "c": True}


def test_saving_a_name_that_is_not_loaded_names_the_loaded_ones_and_writes_nothing(tmp_path):
    pipe = _pipe_with("a", "b")
    target = tmp_path / "out.safetensors"
    with pytest.raises(rd.ResTunerError, match=r"no tuner named 'c' is loaded; loaded tuners \(adapter names\): \['a"):
        pipe.save_res_tuner(target, adapter_name="c")
    with pytest.raises(rd.ResTunerError, match="no res tuner is loaded on this pipeline; load one with pipe.load_res"):
        _Pipe(frozen_tiny_unet()).save_res_tuner(target)
    assert list(tmp_path.iterdir()) == []
    assert pipe.save_res_tuner(target, adapter_name="b") == target
    assert get_state(pipe.unet) is not None and sorted(pipe.get_res_tuners()) == ["a", "b"]


def test_a_per_block_mix_resets_the_global_scale_to_one():
    pipe = _pipe_with("a")
    unet = pipe.unet
    inputs = _inputs(unet)
    pipe.set_res_tuner_scale(0.3, "a")
    pipe.set_res_tuners("a", {"down": 0.5, "mid": 1.0, "up": 0.25})
    assert _settings(pipe)["a"]["scale"] == 1.0
    mixed = _out(unet, inputs)
    # by hand: the block scales under a global scale of 1
    rd.set_res_tuner_scale(unet, 1.0, "a")
    set_res_tuner_layer_scales(unet, "a", {"down_blocks": 0.5, "mid_block": 1.0, "up_blocks": 0.25})
    torch.testing.assert_close(_out(unet, inputs), mixed, rtol=0, atol=0)
    # a number after the mix: one scale everywhere again
    pipe.set_res_tuners("a", 0.0)
    rd.set_res_tuner_enabled(unet, False)
    base = _out(unet, inputs)
    rd.set_res_tuner_enabled(unet, True)
    assert torch.equal(_out(unet, inputs), base) and not torch.allclose(mixed, base, atol=1e-6)


def test_a_tuner_file_refuses_a_config_changing_nothing(tmp_path):
    file = _pipe_with("style").save_res_tuner(tmp_path / "w.safetensors", adapter_name="style")
    pipe = _Pipe(frozen_tiny_unet())
    with pytest.raises(rd.ConfigError, match="a tuner file carries its own config: drop config="):
        pipe.load_res_tuner(file, config=LORA)
    with pytest.raises(rd.ConfigError, match="drop config="):
        pipe.load_res_tuner(tmp_path, weight_name="w.safetensors", config=LORA)
    assert pipe.get_res_tuners() == {} and get_state(pipe.unet) is None


# --- the bypass's model-kind functions ------------------------------------------------------------------------
BYPASS = rd.ResTunerConfig("res_bypass")


def test_a_name_that_is_not_a_loaded_bypass_is_the_projects_error_naming_it():
    unet = frozen_tiny_unet("sd1")
    for call in (
        lambda: unet_tuner_settings(unet, "a"),
        lambda: list(iter_unet_tuner(unet, "a")),
        lambda: detach_unet_tuner(unet, "a", None),
    ):
        with pytest.raises(rd.ResTunerError, match="no res_bypass named 'a' on this UNet"):
            call()
    rd.add_res_tuner(unet, BYPASS, "a")
    rd.add_res_tuner(unet, LORA, "lora")  # another tuner on the same UNet is not a bypass
    bank = getattr(unet, BANK_ATTR)
    state = get_state(unet)
    for name in ("b", "lora"):
        for call in (
            lambda name=name: unet_tuner_settings(unet, name),
            lambda name=name: list(iter_unet_tuner(unet, name)),
            lambda name=name: detach_unet_tuner(unet, name, state),
        ):
            with pytest.raises(rd.ResTunerError, match=f"no res_bypass named '{name}' on this UNet"):
                call()
    assert getattr(unet, BANK_ATTR) is bank and list(bank.tuners) == ["a"]
    (setting,) = unet_tuner_settings(unet, "a")
    assert setting is bank.settings["a"] and setting.scale == BYPASS.scale
    assert [path for path, _ in iter_unet_tuner(unet, "a")] == list(bank.source_paths)


def test_a_bypass_before_a_parameter_free_output_norm_is_float32_on_the_cpu():
    unet = frozen_tiny_unet("sd1").to(torch.float64)
    norm = unet.conv_norm_out
    unet.conv_norm_out = nn.GroupNorm(norm.num_groups, norm.num_channels, eps=norm.eps, affine=False).double()
    inputs = {
        k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
        for k, v in unet_inputs(unet, batch_size=1, seed=2).items()
    }
    with torch.no_grad():
        reference = unet(**inputs).sample
    rd.add_res_tuner(unet, BYPASS)
    bank = getattr(unet, BANK_ATTR)
    assert bank.injection_path == "conv_norm_out"
    assert {(p.dtype, p.device.type) for p in bank.tuners["default"].parameters()} == {(torch.float32, "cpu")}
    randomize_tuner(unet, seed=3)
    with torch.no_grad():
        tuned = unet(**inputs).sample
    assert tuned.dtype == torch.float64 and not torch.allclose(tuned, reference)
    rd.remove_res_tuner(unet)
    with torch.no_grad():
        assert torch.equal(unet(**inputs).sample, reference)


def test_the_pipeline_unfuse_refuses_a_changed_weight_unless_accept_changed_weights_is_passed_on():
    pipe = _pipe_with("a")
    pipe.fuse_res_tuner("a")
    linear = pipe.unet.get_submodule(next(p for p, _ in pipe.unet.named_modules() if p.endswith("attn2.to_k")))
    with torch.no_grad():
        linear.weight[0, 0] += 0.5  # someone else's edit while fused
    edited = linear.weight.detach().clone()
    with pytest.raises(rd.ResTunerError, match="accept_changed_weights=True"):
        pipe.unfuse_res_tuner()  # the default refuses
    assert torch.equal(linear.weight, edited) and _settings(pipe)["a"]["fused"]
    pipe.unfuse_res_tuner("a", accept_changed_weights=True)  # passed on: the tuner's delta subtracted, edit kept
    assert not _settings(pipe)["a"]["fused"]
