"""The core API's contract, call by call, on the tiny SD1 UNet (issue 18, mutation score): what each of
``add / remove / scale / enable / fuse / unfuse / layer scales / settings / summary`` returns, refuses, and the
exact state it leaves behind (configs, per-layer settings, hooks, guards)."""

from __future__ import annotations

import pytest
import torch

import resattn_diffusion as rd
from resattn_diffusion.integration import api
from resattn_diffusion.integration.state import STATE_ATTR, get_state
from resattn_diffusion.testing import frozen_tiny_model, frozen_tiny_unet, randomize_tuner, unet_inputs


def _out(unet, inputs, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return unet(**inputs, **kwargs).sample


def _layer_scales(unet, name: str) -> dict[str, float]:
    """Layer path -> the scale of tuner ``name`` there."""
    return {bank.layer_path: bank.settings[name].scale for bank, _ in get_state(unet).banks if name in bank.settings}


def _hook_count(unet) -> tuple[int, int]:
    return len(unet._forward_pre_hooks), len(unet._forward_hooks)


@pytest.fixture
def unet():
    return frozen_tiny_unet("sd1")


@pytest.fixture
def inputs(unet):
    return unet_inputs(unet, batch_size=1, seed=3)


def _lora(**kw) -> rd.ResTunerConfig:
    return rd.ResTunerConfig("res_lora", rank=2, **kw)


# --- find_layers / expected_fingerprint / add ------------------------------------------------------------------
def test_find_layers_lists_the_selected_operations_in_module_order(unet):
    config = rd.ResTunerConfig("res_attn", rank=4, targets=["attn2"], blocks=["up_blocks.*"])
    layers = api.find_layers(unet, config)
    paths = [layer.path for layer in layers]
    assert paths and all(p.startswith("up_blocks.") and p.endswith(".attn2") for p in paths)
    module_order = [name for name, _ in unet.named_modules() if name in paths]
    assert paths == module_order
    assert all(layer.module is unet.get_submodule(layer.path) for layer in layers)
    assert [layer.shape.context_dim for layer in layers] == [unet.config.cross_attention_dim] * len(layers)
    # what add_res_tuner installs is exactly these layers, and the fingerprint names them
    added = rd.add_res_tuner(unet, config)
    assert added == paths
    assert set(api.expected_fingerprint(unet, config)) == set(paths)


def test_find_layers_refuses_a_model_level_tuner_and_a_kind_the_family_cannot_take(unet):
    with pytest.raises(rd.ResTunerError, match="not attached per layer"):
        api.find_layers(unet, rd.ResTunerConfig("res_bypass"))
    sd3 = frozen_tiny_model("sd3")
    with pytest.raises(rd.ResTunerError, match=r"cannot sit on a SD3 transformer; tuners that can: \[") as info:
        api.expected_fingerprint(sd3, rd.ResTunerConfig("res_bypass"))
    assert "res_bypass" not in str(info.value).split("tuners that can:")[1]
    assert "res_attn" in str(info.value) and "res_lora" in str(info.value)
    assert get_state(sd3) is None


def test_add_returns_the_paths_and_refuses_bad_input_before_anything_changes(unet, inputs):
    reference = _out(unet, inputs)
    hooks = _hook_count(unet)
    with pytest.raises(rd.ConfigError, match="must be a ResTunerConfig"):
        rd.add_res_tuner(unet, {"tuner": "res_lora"})
    with pytest.raises(rd.ConfigError, match="block pattern 'nowhere.*' matches no transformer block of this UNet"):
        rd.add_res_tuner(unet, rd.ResTunerConfig("res_attn", rank=4, targets=["attn1"], blocks=["nowhere.*"]))
    assert get_state(unet) is None and _hook_count(unet) == hooks
    paths = rd.add_res_tuner(unet, _lora(targets=["attn1"]), "a")
    assert paths == [layer.path for layer in api.find_layers(unet, _lora(targets=["attn1"]))]
    assert all(p.requires_grad for p in rd.res_tuner_parameters(unet, "a"))
    assert _hook_count(unet) == (hooks[0] + 1, hooks[1] + 1)  # the per-call scale hooks, once
    with pytest.raises(rd.ResTunerError, match="already on this UNet"):
        rd.add_res_tuner(unet, _lora(), "a")
    rd.add_res_tuner(unet, _lora(targets=["attn2"]), "b")
    assert _hook_count(unet) == (hooks[0] + 1, hooks[1] + 1)  # a second tuner adds no second pair of hooks
    assert list(rd.get_res_tuner_configs(unet)) == ["a", "b"]
    assert torch.equal(_out(unet, inputs), reference)  # zero-initialised branches


def test_a_first_tuner_that_fails_to_build_leaves_no_state_and_no_hooks(unet, monkeypatch):
    from resattn_diffusion.integration.kinds import kind_of

    config = _lora()
    kind = kind_of(config)
    hooks = _hook_count(unet)

    def broken_attach(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(type(kind), "attach", broken_attach)
    with pytest.raises(RuntimeError, match="out of memory"):
        rd.add_res_tuner(unet, config)
    assert get_state(unet) is None and _hook_count(unet) == hooks
    assert "set_default_attn_processor" not in unet.__dict__
    monkeypatch.undo()
    rd.add_res_tuner(unet, config, "first")
    monkeypatch.setattr(type(kind), "attach", broken_attach)
    with pytest.raises(RuntimeError):
        rd.add_res_tuner(unet, config, "second")
    assert list(get_state(unet).configs) == ["first"]  # the first tuner's state stays


# --- state required ------------------------------------------------------------------------------------------
def test_calls_on_a_model_without_tuners_name_the_model_and_what_to_do(unet):
    for call in (
        lambda: rd.remove_res_tuner(unet),
        lambda: rd.fuse_res_tuner(unet),
        lambda: rd.unfuse_res_tuner(unet),
        lambda: rd.set_res_tuner_scale(unet, 0.5),
        lambda: rd.res_tuner_parameters(unet),
    ):
        with pytest.raises(rd.ResTunerError, match="this UNet has no res tuner; add one with add_res_tuner"):
            call()
    sd3 = frozen_tiny_model("sd3")
    with pytest.raises(rd.ResTunerError, match="this SD3 transformer has no res tuner"):
        rd.set_res_tuner_enabled(sd3, False)
    # a state whose last tuner is gone counts as none
    rd.add_res_tuner(unet, _lora())
    rd.remove_res_tuner(unet)
    with pytest.raises(rd.ResTunerError, match="has no res tuner"):
        rd.res_tuner_parameters(unet)
    assert api.res_tuner_settings(unet) == {}


def test_adapter_name_selection(unet):
    rd.add_res_tuner(unet, _lora(targets=["attn1"]), "a")
    rd.add_res_tuner(unet, _lora(targets=["attn2"]), "b")
    for bad in ([], (), 3, ["a", 3]):
        with pytest.raises(rd.ResTunerError, match="adapter_name"):
            rd.set_res_tuner_scale(unet, 0.5, bad)
    with pytest.raises(rd.ResTunerError, match=r"no tuner named 'c' on this model; loaded tuners \(adapter names\)"):
        rd.set_res_tuner_scale(unet, 0.5, ["a", "c"])
    assert api.res_tuner_settings(unet)["a"]["scale"] == 1.0  # nothing changed by the refused call
    rd.set_res_tuner_scale(unet, 0.5, ("b",))
    assert {n: s["scale"] for n, s in api.res_tuner_settings(unet).items()} == {"a": 1.0, "b": 0.5}
    rd.set_res_tuner_scale(unet, 0.25)
    assert {n: s["scale"] for n, s in api.res_tuner_settings(unet).items()} == {"a": 0.25, "b": 0.25}
    assert {n: c.scale for n, c in rd.get_res_tuner_configs(unet).items()} == {"a": 0.25, "b": 0.25}


def test_iter_tuners_and_parameters_are_per_name_and_in_module_order(unet):
    paths_a = rd.add_res_tuner(unet, _lora(targets=["attn1"]), "a")
    rd.add_res_tuner(unet, rd.ResTunerConfig("res_attn", rank=4, targets=["attn2"]), "b")
    assert [path for path, _ in api.iter_tuners(unet, "a")] == paths_a
    with pytest.raises(rd.ResTunerError, match="no tuner named 'c'"):
        list(api.iter_tuners(unet, "c"))
    a = rd.res_tuner_parameters(unet, "a")
    b = rd.res_tuner_parameters(unet, "b")
    assert a and b and not {id(p) for p in a} & {id(p) for p in b}
    assert [id(p) for p in rd.res_tuner_parameters(unet)] == [id(p) for p in a + b]
    assert [id(p) for p in a] == [id(p) for _, t in api.iter_tuners(unet, "a") for p in t.parameters()]
    configs = rd.get_res_tuner_configs(unet)
    configs.pop("a")  # a copy: the model's tuners are not changed through it
    assert list(rd.get_res_tuner_configs(unet)) == ["a", "b"]


# --- per-call scale --------------------------------------------------------------------------------------------
def test_per_call_scale_applies_to_that_call_only_and_leaves_the_callers_dict(unet, inputs):
    reference = _out(unet, inputs)
    rd.add_res_tuner(unet, _lora())
    randomize_tuner(unet, seed=1)
    tuned = _out(unet, inputs)
    assert not torch.allclose(tuned, reference)
    call_kwargs = {rd.SCALE_KWARG: 0.0}
    assert torch.equal(_out(unet, inputs, cross_attention_kwargs=call_kwargs), reference)
    assert call_kwargs == {rd.SCALE_KWARG: 0.0}  # the caller's dict is not emptied
    assert torch.equal(_out(unet, inputs), tuned)  # the next call is back at the set scale
    assert torch.equal(_out(unet, inputs, cross_attention_kwargs={rd.SCALE_KWARG: None}), tuned)
    rd.set_res_tuner_scale(unet, 0.5)
    half = _out(unet, inputs)
    assert torch.allclose(_out(unet, inputs, cross_attention_kwargs={rd.SCALE_KWARG: 0.5}), half, atol=1e-6)
    assert torch.allclose(_out(unet, inputs, cross_attention_kwargs={rd.SCALE_KWARG: 1.0}), tuned, atol=1e-6)
    with pytest.raises(rd.ConfigError):
        _out(unet, inputs, cross_attention_kwargs={rd.SCALE_KWARG: float("nan")})
    assert torch.equal(_out(unet, inputs), half)  # a refused call leaves no per-call scale behind
    with pytest.raises(rd.ConfigError, match="typo"):  # a name no tuner has: refused, not silently ignored
        _out(unet, inputs, cross_attention_kwargs={rd.SCALE_KWARG: {"typo": 0.0}})


def test_the_per_call_scale_leaves_the_other_call_kwargs_to_diffusers(unet, inputs):
    # diffusers reads a LoRA's per-call "scale" from the same dict: taking our key out must keep it
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=["to_q"]), "lora")
    rd.add_res_tuner(unet, _lora(targets=["attn2"]))
    randomize_tuner(unet, seed=1)
    unet.disable_adapters()
    tuner_only = _out(unet, inputs)
    unet.enable_adapters()
    assert not torch.allclose(_out(unet, inputs), tuner_only)  # the LoRA matters
    both = {"scale": 0.0, rd.SCALE_KWARG: 1.0}
    torch.testing.assert_close(_out(unet, inputs, cross_attention_kwargs=both), tuner_only, rtol=0, atol=1e-6)


# --- settings, enable ------------------------------------------------------------------------------------------
def test_settings_report_each_tuners_scale_enabled_and_fused(unet):
    rd.add_res_tuner(unet, _lora(targets=["attn1"], scale=0.5), "a")
    rd.add_res_tuner(unet, rd.ResTunerConfig("res_attn", rank=4, targets=["attn2"]), "b")
    rd.add_res_tuner(unet, rd.ResTunerConfig("glora", targets=["attn2"], projections=["to_q"]), "c")
    assert api.res_tuner_settings(unet) == {
        "a": {"scale": 0.5, "enabled": True, "fused": False},
        "b": {"scale": 1.0, "enabled": True, "fused": False},
        "c": {"scale": 1.0, "enabled": True, "fused": False},
    }
    rd.set_res_tuner_enabled(unet, False, "b")
    rd.fuse_res_tuner(unet, "a")
    assert api.res_tuner_settings(unet) == {
        "a": {"scale": 0.5, "enabled": True, "fused": True},
        "b": {"scale": 1.0, "enabled": False, "fused": False},
        "c": {"scale": 1.0, "enabled": True, "fused": False},
    }
    # a tuner that is on at any of its layers counts as enabled
    bank = next(bank for bank, _ in get_state(unet).banks if "b" in bank.settings)
    bank.settings["b"].enabled = True
    assert api.res_tuner_settings(unet)["b"]["enabled"] is True


def test_enable_and_disable_refuse_a_fused_tuner_changing_nothing(unet, inputs):
    rd.add_res_tuner(unet, _lora(targets=["attn1"]), "a")
    rd.add_res_tuner(unet, _lora(targets=["attn2"]), "b")
    randomize_tuner(unet, "a", seed=1)
    randomize_tuner(unet, "b", seed=2)
    tuned = _out(unet, inputs)
    rd.fuse_res_tuner(unet, "b")
    with pytest.raises(rd.ResTunerError, match="tuner 'b' is fused into the weights; unfuse it before disabling"):
        rd.set_res_tuner_enabled(unet, False)
    assert all(s["enabled"] for s in api.res_tuner_settings(unet).values())  # 'a' was not switched off either
    rd.set_res_tuner_enabled(unet, True)  # enabling a fused tuner is fine
    rd.set_res_tuner_enabled(unet, False, "a")
    assert {n: s["enabled"] for n, s in api.res_tuner_settings(unet).items()} == {"a": False, "b": True}
    rd.set_res_tuner_enabled(unet, True, "a")
    assert torch.allclose(_out(unet, inputs), tuned, atol=1e-5)
    with pytest.raises(rd.ConfigError):
        rd.set_res_tuner_enabled(unet, "no", "a")


def test_scale_of_a_fused_tuner_may_only_stay_the_same(unet):
    rd.add_res_tuner(unet, _lora(targets=["attn1"], scale=0.5), "a")
    rd.add_res_tuner(unet, _lora(targets=["attn2"]), "b")
    rd.fuse_res_tuner(unet, "a")
    with pytest.raises(rd.ResTunerError, match="tuner 'a' is fused into the weights; unfuse it before changing"):
        rd.set_res_tuner_scale(unet, 0.75)
    assert {n: s["scale"] for n, s in api.res_tuner_settings(unet).items()} == {"a": 0.5, "b": 1.0}
    assert rd.get_res_tuner_configs(unet)["b"].scale == 1.0
    rd.set_res_tuner_scale(unet, 0.5)  # the fused scale itself: allowed, and reaches 'b'
    assert {n: s["scale"] for n, s in api.res_tuner_settings(unet).items()} == {"a": 0.5, "b": 0.5}


# --- fuse / unfuse ---------------------------------------------------------------------------------------------
def test_fuse_refuses_branch_tuners_and_disabled_ones_before_changing_anything(unet, inputs):
    rd.add_res_tuner(unet, _lora(targets=["attn1"]), "lora")
    rd.add_res_tuner(unet, rd.ResTunerConfig("res_attn", rank=4, targets=["attn2"]), "attn")
    randomize_tuner(unet, "lora", seed=1)
    weights = {k: v.clone() for k, v in unet.state_dict().items()}
    with pytest.raises(rd.ResTunerError, match=r"tuner\(s\) \['attn'\] \(res_attn\) add a branch that does not fold"):
        rd.fuse_res_tuner(unet)
    rd.set_res_tuner_enabled(unet, False, "lora")
    with pytest.raises(rd.ResTunerError, match=r"tuner\(s\) \['lora'\] are disabled, so there is nothing to fuse"):
        rd.fuse_res_tuner(unet, "lora")
    assert all(torch.equal(v, weights[k]) for k, v in unet.state_dict().items())
    assert not any(s["fused"] for s in api.res_tuner_settings(unet).values())


def test_fuse_folds_several_kinds_at_once_and_unfuse_restores_only_those_named(unet, inputs):
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    rd.add_res_tuner(unet, _lora(targets=["attn1"]), "lora")
    rd.add_res_tuner(unet, rd.ResTunerConfig("glora", targets=["attn2"], projections=["to_q", "to_v"]), "glora")
    rd.add_res_tuner(unet, rd.ResTunerConfig("surm_circulant", targets=["attn2"], projections=["to_k"]), "surm")
    for seed, name in enumerate(("lora", "glora", "surm")):
        randomize_tuner(unet, name, seed=seed)
    tuned = _out(unet, inputs)
    rd.fuse_res_tuner(unet)
    assert all(s["fused"] for s in api.res_tuner_settings(unet).values())
    assert torch.allclose(_out(unet, inputs), tuned, atol=1e-5)
    changed = [k for k, v in unet.state_dict().items() if k in base and not torch.equal(v, base[k])]
    assert any(".attn1.to_q" in k for k in changed) and any(".attn2.to_q" in k for k in changed)
    assert any(".attn2.to_k" in k for k in changed)
    rd.unfuse_res_tuner(unet, ["glora"])
    assert {n: s["fused"] for n, s in api.res_tuner_settings(unet).items()} == {
        "lora": True,
        "glora": False,
        "surm": True,
    }
    assert torch.allclose(_out(unet, inputs), tuned, atol=1e-5)
    rd.unfuse_res_tuner(unet)
    assert not any(s["fused"] for s in api.res_tuner_settings(unet).values())
    assert all(torch.equal(v, base[k]) for k, v in unet.state_dict().items() if k in base)
    with pytest.raises(rd.ConfigError, match="accept_changed_weights"):
        rd.unfuse_res_tuner(unet, accept_changed_weights="yes")


# --- remove ----------------------------------------------------------------------------------------------------
def test_remove_one_keeps_the_other_and_remove_all_restores_the_model_exactly(unet, inputs):
    reference = _out(unet, inputs)
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    hooks = _hook_count(unet)
    processors = {k: type(v) for k, v in unet.attn_processors.items()}
    rd.add_res_tuner(unet, _lora(targets=["attn1"]), "a")
    rd.add_res_tuner(unet, rd.ResTunerConfig("res_attn", rank=4, targets=["attn2"]), "b")
    randomize_tuner(unet, "a", seed=1)
    randomize_tuner(unet, "b", seed=2)
    rd.set_res_tuner_enabled(unet, False, "a")
    only_b = _out(unet, inputs)
    rd.set_res_tuner_enabled(unet, True, "a")
    rd.fuse_res_tuner(unet, "a")
    rd.remove_res_tuner(unet, "a")  # fused: unfused first, then removed
    assert list(rd.get_res_tuner_configs(unet)) == ["b"]
    assert torch.allclose(_out(unet, inputs), only_b, atol=1e-6)
    assert all(torch.equal(v, base[k]) for k, v in unet.state_dict().items() if k in base)
    with pytest.raises(rd.ResTunerError, match="no tuner named 'a'"):
        rd.remove_res_tuner(unet, "a")
    rd.remove_res_tuner(unet)
    assert not hasattr(unet, STATE_ATTR) and rd.get_res_tuner_configs(unet) == {}
    assert _hook_count(unet) == hooks
    assert "set_default_attn_processor" not in unet.__dict__
    assert {k: type(v) for k, v in unet.attn_processors.items()} == processors
    assert torch.equal(_out(unet, inputs), reference)
    assert set(unet.state_dict()) == set(base)


def test_remove_all_with_several_fused_tuners(unet, inputs):
    reference = _out(unet, inputs)
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    rd.add_res_tuner(unet, _lora(targets=["attn1"]), "a")
    rd.add_res_tuner(unet, rd.ResTunerConfig("glora", targets=["attn2"], projections=["to_q"]), "b")
    randomize_tuner(unet, "a", seed=1)
    randomize_tuner(unet, "b", seed=2)
    rd.fuse_res_tuner(unet)
    rd.remove_res_tuner(unet)
    assert all(torch.equal(v, base[k]) for k, v in unet.state_dict().items())
    assert torch.equal(_out(unet, inputs), reference)


def test_fusing_checks_for_non_finite_weights_only_when_asked_like_diffusers(unet):
    rd.add_res_tuner(unet, _lora(targets=["attn1"]), "a")
    with torch.no_grad():
        rd.res_tuner_parameters(unet, "a")[-1][0] = float("inf")
    with pytest.raises(rd.ResTunerError, match="NaN or inf"):
        rd.fuse_res_tuner(unet, safe_fusing=True)
    rd.fuse_res_tuner(unet)  # diffusers' default (fuse_lora's safe_fusing=False): no pass over every fused weight
    assert api.res_tuner_settings(unet)["a"]["fused"]


def test_unfuse_reaches_the_fusing_kind_whatever_kind_was_added_last(unet, inputs):
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    rd.add_res_tuner(unet, _lora(targets=["attn1"]), "lora")
    randomize_tuner(unet, "lora", seed=1)
    rd.fuse_res_tuner(unet)
    rd.add_res_tuner(unet, rd.ResTunerConfig("res_attn", rank=4, targets=["attn2"]), "attn")  # a kind that never fuses
    rd.unfuse_res_tuner(unet)
    assert not api.res_tuner_settings(unet)["lora"]["fused"]
    assert all(torch.equal(v, base[k]) for k, v in unet.state_dict().items() if k in base)


def test_remove_takes_a_list_of_names_and_removes_each_once(unet, inputs):
    reference = _out(unet, inputs)
    for name in ("a", "b", "c"):
        rd.add_res_tuner(unet, _lora(targets=["attn1"]), name)
    rd.fuse_res_tuner(unet, "b")
    rd.remove_res_tuner(unet, ["b", "a", "b"])
    assert list(rd.get_res_tuner_configs(unet)) == ["c"]
    with pytest.raises(rd.ResTunerError, match="no tuner named 'a'"):
        rd.remove_res_tuner(unet, ["c", "a"])
    assert list(rd.get_res_tuner_configs(unet)) == ["c"]
    rd.remove_res_tuner(unet, ["c"])
    assert not hasattr(unet, STATE_ATTR) and torch.equal(_out(unet, inputs), reference)


# --- per-layer scales -----------------------------------------------------------------------------------------
def test_layer_scales_longest_prefix_wins_and_only_whole_path_parts_match(unet):
    paths = rd.add_res_tuner(unet, _lora(targets=["attn1", "attn2"]), "a")
    rd.add_res_tuner(unet, _lora(targets=["attn1"]), "other")
    up = [p for p in paths if p.startswith("up_blocks.1.")]
    assert up
    one = up[0]
    block = one.rsplit(".", 1)[0]  # ...transformer_blocks.0
    api.set_res_tuner_layer_scales(
        unet, "a", {"up_blocks": 0.5, "up_blocks.1": 0.25, one: 0.125, block + ".attn": 0.0, "mid_bl": 0.0}
    )
    scales = _layer_scales(unet, "a")
    expected = {}
    for path in paths:
        if path == one:
            expected[path] = 0.125
        elif path.startswith("up_blocks.1."):
            expected[path] = 0.25
        elif path.startswith("up_blocks."):
            expected[path] = 0.5
        else:
            expected[path] = 1.0  # "mid_bl" and "<block>.attn" are string prefixes, not module paths: no match
    assert scales == expected
    assert set(_layer_scales(unet, "other").values()) == {1.0}  # the other tuner keeps its scales


def test_layer_scales_refusals_change_nothing(unet):
    paths = rd.add_res_tuner(unet, _lora(targets=["attn1"]), "a")
    rd.add_res_tuner(unet, rd.ResTunerConfig("res_bypass"), "bypass")
    with pytest.raises(rd.ResTunerError, match="side network over the whole model; it has one scale"):
        api.set_res_tuner_layer_scales(unet, "bypass", {"up_blocks": 0.5})
    with pytest.raises(rd.ConfigError, match="scales must map module path prefixes to numbers, got list"):
        api.set_res_tuner_layer_scales(unet, "a", [("up_blocks", 0.5)])
    with pytest.raises(rd.ConfigError, match="up_blocks"):
        api.set_res_tuner_layer_scales(unet, "a", {"down_blocks": 0.5, "up_blocks": float("inf")})
    with pytest.raises(rd.ResTunerError, match="no tuner named 'b'"):
        api.set_res_tuner_layer_scales(unet, "b", {"up_blocks": 0.5})
    assert set(_layer_scales(unet, "a").values()) == {1.0}
    rd.fuse_res_tuner(unet, "a")
    fused_scale_kept = {p.split(".")[0]: 1.0 for p in paths}
    api.set_res_tuner_layer_scales(unet, "a", fused_scale_kept)  # the fused scale itself: fine
    with pytest.raises(rd.ResTunerError, match="tuner 'a' is fused into the weights; unfuse it before"):
        api.set_res_tuner_layer_scales(unet, "a", {"down_blocks": 1.0, "up_blocks": 0.5})
    assert set(_layer_scales(unet, "a").values()) == {1.0}


# --- summary ---------------------------------------------------------------------------------------------------
def test_summary_counts_each_tuners_layers_and_parameters(unet):
    from resattn_diffusion.integration.plan import own_parameter_count

    own = own_parameter_count(unet)
    assert own == sum(p.numel() for p in unet.parameters())
    assert rd.res_tuner_summary(unet) == {"unet_parameters": own, "tuners": {}}
    paths_a = rd.add_res_tuner(unet, _lora(), "a")
    sequential = rd.ResTunerConfig("res_attn", rank=4, targets=["attn2"], placement="sequential")
    paths_b = rd.add_res_tuner(unet, sequential, "b")
    summary = rd.res_tuner_summary(unet)
    assert summary["unet_parameters"] == own  # the tuners' own parameters are not the model's
    count_a = sum(p.numel() for p in rd.res_tuner_parameters(unet, "a"))
    count_b = sum(p.numel() for p in rd.res_tuner_parameters(unet, "b"))
    assert summary["tuners"] == {
        "a": {
            "tuner": "res_lora",
            "targets": ["attn1", "attn2"],
            "placement": "parallel",
            "layers": len(paths_a),
            "parameters": count_a,
            "percent_of_unet": 100.0 * count_a / own,
        },
        "b": {
            "tuner": "res_attn",
            "targets": ["attn2"],
            "placement": "sequential",
            "layers": len(paths_b),
            "parameters": count_b,
            "percent_of_unet": 100.0 * count_b / own,
        },
    }
    assert count_a > 0 and count_b > 0


def test_format_summary_is_one_row_per_tuner():
    summary = {
        "unet_parameters": 1234567,
        "tuners": {
            "a": {"tuner": "res_lora", "targets": ["attn1", "attn2"], "layers": 4, "parameters": 12345,
                  "percent_of_unet": 1.23456},
            "b": {"tuner": "res_attn", "targets": ["ff"], "layers": 1, "parameters": 7, "percent_of_unet": 0.0004},
        },
    }  # fmt: skip
    assert rd.format_summary(summary) == (
        "| adapter | tuner | targets | layers | parameters | % of model |\n"
        "|---|---|---|---|---|---|\n"
        "| a | res_lora | attn1,attn2 | 4 | 12,345 | 1.235 |\n"
        "| b | res_attn | ff | 1 | 7 | 0.000 |\n"
        "\n"
        "Model parameters (frozen): 1,234,567"
    )


def test_a_call_that_fails_after_the_per_call_scale_is_set_leaves_no_scale_behind(unet, inputs):
    rd.add_res_tuner(unet, _lora())
    randomize_tuner(unet, seed=1)
    tuned = _out(unet, inputs)
    bad = {**inputs, "encoder_hidden_states": inputs["encoder_hidden_states"][..., :-1]}  # the wrong width
    with pytest.raises(RuntimeError):
        _out(unet, bad, cross_attention_kwargs={rd.SCALE_KWARG: 0.0})
    assert torch.equal(_out(unet, inputs), tuned)  # not stuck at 0 for the calls after it


def test_a_pipeline_is_refused_by_the_core_calls_with_what_to_pass_instead():
    from resattn_diffusion.testing import tiny_pipeline

    pipe = tiny_pipeline("sd1")
    rd.add_res_tuner(pipe.unet, _lora())
    for call in (lambda: rd.fuse_res_tuner(pipe), lambda: rd.res_tuner_parameters(pipe)):
        with pytest.raises(rd.ConfigError, match="pass the pipeline's denoiser: pipe.unet"):
            call()
    with pytest.raises(rd.ConfigError, match="pass the pipeline's denoiser: pipe.unet"):
        rd.add_res_tuner(pipe, _lora(), "other")
    assert list(rd.get_res_tuner_configs(pipe.unet)) == ["default"]


def test_removing_one_fused_tuner_leaves_the_other_fused(unet, inputs):
    rd.add_res_tuner(unet, _lora(targets=["attn1"]), "a")
    rd.add_res_tuner(unet, _lora(targets=["attn2"]), "b")
    randomize_tuner(unet, "a", seed=1)
    randomize_tuner(unet, "b", seed=2)
    rd.set_res_tuner_enabled(unet, False, "a")
    only_b = _out(unet, inputs)
    rd.set_res_tuner_enabled(unet, True, "a")
    rd.fuse_res_tuner(unet)
    rd.remove_res_tuner(unet, "a")
    assert api.res_tuner_settings(unet) == {"b": {"scale": 1.0, "enabled": True, "fused": True}}
    assert torch.allclose(_out(unet, inputs), only_b, atol=1e-5)
