"""Pins of the pipeline face of the tuner files (``loader_mixin.py``), of hotswap (``hotswap.py``) and of the size
plan (``plan.py``): which tuners each call touches, what a refused call says, and that it changes nothing
(issue 18, part 4). A bare object with ``unet`` (or ``transformer``) stands in for a pipeline: the mixin only
reads that attribute, and a tiny UNet keeps each test well under a second."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import resattn_diffusion as rd
from resattn_diffusion.integration import io as tuner_io
from resattn_diffusion.integration.api import set_res_tuner_layer_scales
from resattn_diffusion.integration.loader_mixin import (
    ResTunerLoaderMixin,
    denoiser_attribute,
    denoiser_of,
    resolve_tuner_source,
)
from resattn_diffusion.integration.plan import check_tuner_size, own_parameter_count, planned_tensor_shapes
from resattn_diffusion.testing import frozen_tiny_unet, randomize_tuner

LORA = rd.ResTunerConfig(tuner="res_lora", rank=2, targets=["attn2"])


class _Base:
    """What the mixin's guards hand on to: records the calls diffusers would have done."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def save_pretrained(self, *args, **kwargs) -> None:
        self.calls.append(("save_pretrained", args, kwargs))

    def fuse_qkv_projections(self, *args, **kwargs) -> None:
        self.calls.append(("fuse_qkv_projections", args, kwargs))


class _Pipe(ResTunerLoaderMixin, _Base):
    def __init__(self, unet: nn.Module | None = None, attribute: str = "unet") -> None:
        super().__init__()
        if unet is not None:
            setattr(self, attribute, unet)


def _pipe_with(*names: str, config: rd.ResTunerConfig = LORA) -> _Pipe:
    unet = frozen_tiny_unet()
    for seed, name in enumerate(names):
        rd.add_res_tuner(unet, config, name)
        randomize_tuner(unet, name, seed=seed, std=0.2)
    return _Pipe(unet)


def _settings(pipe: _Pipe) -> dict:
    return {name: {k: v for k, v in s.items() if k != "config"} for name, s in pipe.get_res_tuners().items()}


def _weights(pipe: _Pipe, name: str) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in pipe.res_tuner_state_dict(name).items()}


def _base_weights(unet: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in unet.state_dict().items() if "res_tuner" not in k and ".bank." not in k}


# --- the denoiser ----------------------------------------------------------------------------------------------
def test_the_denoiser_is_the_unet_else_the_transformer_else_an_error():
    unet, other = frozen_tiny_unet(), nn.Linear(2, 2)
    pipe = _Pipe(unet)
    pipe.transformer = other
    assert denoiser_attribute(pipe) == "unet" and denoiser_of(pipe) is unet
    dit = _Pipe(other, attribute="transformer")
    dit.unet = "not a model"
    assert denoiser_attribute(dit) == "transformer" and denoiser_of(dit) is other
    with pytest.raises(rd.ResTunerError, match="_Pipe has no denoiser"):
        denoiser_of(_Pipe())


def test_the_diffusers_methods_run_without_tuners_and_are_refused_naming_them():
    pipe = _Pipe(frozen_tiny_unet())
    pipe.save_pretrained("folder", safe_serialization=True)
    pipe.fuse_qkv_projections(1)
    bare = _Pipe()  # no denoiser yet (a pipeline being built): nothing is loaded
    bare.save_pretrained("x")
    assert pipe.calls == [
        ("save_pretrained", ("folder",), {"safe_serialization": True}),
        ("fuse_qkv_projections", (1,), {}),
    ]
    assert bare.calls == [("save_pretrained", ("x",), {})]
    loaded = _pipe_with("a", "b")
    with pytest.raises(rd.ResTunerError, match=r"res tuner\(s\) \['a', 'b'\] are loaded; save_pretrained"):
        loaded.save_pretrained("folder")
    with pytest.raises(rd.ResTunerError, match=r"while res tuners \['a', 'b'\] are loaded"):
        loaded.fuse_qkv_projections()
    assert loaded.calls == []


# --- finding the file ------------------------------------------------------------------------------------------
def test_a_local_path_is_used_as_it_is_with_its_subfolder(tmp_path):
    (tmp_path / "sub").mkdir()
    assert resolve_tuner_source(tmp_path, "w.safetensors") == (str(tmp_path), "w.safetensors")
    assert resolve_tuner_source(str(tmp_path), subfolder="sub") == (os.path.join(str(tmp_path), "sub"), None)
    assert resolve_tuner_source(tmp_path, subfolder="") == (str(tmp_path), None)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['bogus'\]"):
        resolve_tuner_source(tmp_path, bogus=1)
    with pytest.raises(rd.ResTunerFileError, match="takes a path .* got int"):
        resolve_tuner_source(3)
    with pytest.raises(rd.ResTunerFileError, match="no tuner file or folder at .*the path does not exist"):
        resolve_tuner_source(tmp_path / "user" / "nothing")
    with pytest.raises(rd.ResTunerFileError, match="no tuner file or folder at 'not a repo'"):
        resolve_tuner_source("not a repo")


def test_a_repo_id_that_the_offline_hub_cannot_provide_is_a_file_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(rd.ResTunerFileError, match="'user/no-such-tuner' does not exist as a local file") as err:
        resolve_tuner_source("user/no-such-tuner")
    assert str(tmp_path) in str(err.value)
    with pytest.raises(rd.ResTunerFileError, match="fetching 'w.safetensors' from the Hugging Face Hub repo") as err:
        resolve_tuner_source("user/no-such-tuner", "w.safetensors", local_files_only=True, cache_dir=str(tmp_path))
    assert "not in the local Hub cache" in str(err.value)


def _fake_hub(monkeypatch, result=None, error=None):
    """The Hub as far as the loader sees it: the source check and the download, recording what was asked."""
    import huggingface_hub

    from resattn_diffusion.integration import loader_mixin

    asked = {}

    def check(name, flag, filename, cache_dir=None, revision=None, token=None):
        asked["check"] = (name, flag, filename, cache_dir, revision, token)

    def download(repo, filename, **kwargs):
        asked["download"] = (repo, filename, kwargs)
        if error is not None:
            raise error
        return result

    monkeypatch.setattr(loader_mixin, "check_pretrained_source", check)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    return asked


def test_a_repo_id_is_downloaded_with_the_weight_name_subfolder_and_hub_options(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    asked = _fake_hub(monkeypatch, result="/cache/file.safetensors")
    got = resolve_tuner_source("user/tuner", subfolder="sub", revision="v1", token="t", cache_dir="c")
    assert got == ("/cache/file.safetensors", None)
    assert asked["check"] == ("user/tuner", "load_res_tuner", "sub/res_tuner.safetensors", "c", "v1", "t")
    assert asked["download"] == (
        "user/tuner",
        "res_tuner.safetensors",
        {"subfolder": "sub", "revision": "v1", "token": "t", "cache_dir": "c"},
    )
    asked = _fake_hub(monkeypatch, result="/cache/w.safetensors")
    assert resolve_tuner_source("user/tuner", "w.safetensors") == ("/cache/w.safetensors", None)
    assert asked["check"] == ("user/tuner", "load_res_tuner", "w.safetensors", None, None, None)
    assert asked["download"] == ("user/tuner", "w.safetensors", {})
    asked = _fake_hub(monkeypatch, result="/cache/w.safetensors")
    resolve_tuner_source("user/tuner", local_files_only=True)  # the cache only: no reachability check
    assert "check" not in asked and asked["download"][2] == {"local_files_only": True}


def test_a_failed_download_names_the_repo_the_file_and_the_first_line_of_the_reason(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    class EntryNotFoundError(Exception):
        pass

    _fake_hub(monkeypatch, error=EntryNotFoundError("404: no such file\nrequest id 123"))
    with pytest.raises(rd.ResTunerFileError) as err:
        resolve_tuner_source("user/tuner", "w.safetensors")
    message = str(err.value)
    assert "fetching 'w.safetensors' from the Hugging Face Hub repo 'user/tuner' failed: " in message
    assert "EntryNotFoundError: 404: no such file. Pass a local path" in message and "request id" not in message
    _fake_hub(monkeypatch, error=EntryNotFoundError(""))
    with pytest.raises(rd.ResTunerFileError, match="failed: EntryNotFoundError: . Pass a local path"):
        resolve_tuner_source("user/tuner")

    class LocalEntryNotFoundError(Exception):
        pass

    class OfflineModeIsEnabled(Exception):  # huggingface_hub's, raised when its offline mode is on
        pass

    for error in (LocalEntryNotFoundError("x"), OfflineModeIsEnabled("y")):
        _fake_hub(monkeypatch, error=error)
        with pytest.raises(rd.ResTunerFileError, match="the Hub cannot be reached .* not in the local Hub cache"):
            resolve_tuner_source("user/tuner")


def test_a_pipeline_loads_a_folder_with_a_weight_name_and_a_state_dict(tmp_path):
    source = _pipe_with("style")
    file = source.save_res_tuner(tmp_path / "w.safetensors", adapter_name="style")
    assert file == tmp_path / "w.safetensors"
    pipe = _Pipe(frozen_tiny_unet())
    assert pipe.load_res_tuner(tmp_path, weight_name="w.safetensors") == "style"
    assert pipe.load_res_tuner(source.res_tuner_state_dict("style"), adapter_name="copy", config=LORA) == "copy"
    for name in ("style", "copy"):
        assert all(torch.equal(_weights(pipe, name)[k], v) for k, v in _weights(source, "style").items())
    with pytest.raises(TypeError, match="weight_name and Hub options do not apply"):
        pipe.load_res_tuner(source.res_tuner_state_dict("style"), adapter_name="x", config=LORA, revision="main")
    with pytest.raises(TypeError, match="weight_name and Hub options do not apply"):
        pipe.load_res_tuner(source.res_tuner_state_dict("style"), adapter_name="x", config=LORA, weight_name="w")
    assert list(pipe.get_res_tuners()) == ["style", "copy"]


def test_loading_onto_meta_weights_or_fused_projections_is_refused(tmp_path):
    file = _pipe_with("style").save_res_tuner(tmp_path / "w.safetensors", adapter_name="style")
    meta = _Pipe(frozen_tiny_unet().to("meta"))
    with pytest.raises(rd.ResTunerError, match="on the 'meta' device"):
        meta.load_res_tuner(file)
    unet = frozen_tiny_unet()
    unet.fuse_qkv_projections()
    with pytest.raises(rd.ResTunerError, match="fused .*unfuse_qkv_projections"):
        _Pipe(unet).load_res_tuner(file)
    assert rd.get_res_tuner_configs(unet) == {}


# --- which tuners a call touches --------------------------------------------------------------------------------
def test_names_are_checked_and_a_refused_request_names_what_is_loaded():
    pipe = _pipe_with("a", "b")
    with pytest.raises(
        rd.ResTunerError, match=r"no tuner named 'c' is loaded; loaded tuners \(adapter names\): \['a'"
    ):
        pipe.set_res_tuner_scale(0.5, ["a", "c"])
    for bad in ([], 3, [1], ("a", None)):
        with pytest.raises(rd.ResTunerError, match="a non-empty list of names or None"):
            pipe.disable_res_tuner(bad)
    with pytest.raises(rd.ResTunerError, match="no res tuner is loaded on this pipeline"):
        _Pipe(frozen_tiny_unet()).set_res_tuner_scale(0.5)
    assert _settings(pipe) == {n: {"scale": 1.0, "enabled": True, "fused": False} for n in ("a", "b")}
    pipe.set_res_tuner_scale(0.25, ("b",))
    pipe.disable_res_tuner("a")
    assert _settings(pipe) == {
        "a": {"scale": 1.0, "enabled": False, "fused": False},
        "b": {"scale": 0.25, "enabled": True, "fused": False},
    }
    pipe.set_res_tuner_scale(0.5)  # None: all
    pipe.enable_res_tuner()
    assert _settings(pipe) == {n: {"scale": 0.5, "enabled": True, "fused": False} for n in ("a", "b")}


def test_unload_removes_the_named_ones_or_all_and_is_a_no_op_without_tuners():
    pipe = _pipe_with("a", "b", "c")
    pipe.unload_res_tuner(["a", "c"])
    assert list(pipe.get_res_tuners()) == ["b"]
    with pytest.raises(rd.ResTunerError, match="no tuner named 'a'"):
        pipe.unload_res_tuner("a")
    pipe.unload_res_tuner()
    assert pipe.get_res_tuners() == {}
    pipe.unload_res_tuner()  # nothing loaded: nothing to do
    pipe.unfuse_res_tuner()
    assert pipe.get_res_tuners() == {}


def test_set_res_tuners_mixes_the_named_ones_and_disables_the_rest():
    pipe = _pipe_with("a", "b", "c")
    pipe.set_res_tuners(["c", "a"], [0.25, 0.75])
    assert _settings(pipe) == {
        "a": {"scale": 0.75, "enabled": True, "fused": False},
        "b": {"scale": 1.0, "enabled": False, "fused": False},
        "c": {"scale": 0.25, "enabled": True, "fused": False},
    }
    pipe.set_res_tuners("b", 0.5)  # one name, one number
    assert {n: (s["scale"], s["enabled"]) for n, s in _settings(pipe).items()} == {
        "a": (0.75, False),
        "b": (0.5, True),
        "c": (0.25, False),
    }
    pipe.set_res_tuners(["a", "b"])  # no weights: 1.0 each
    assert {n: (s["scale"], s["enabled"]) for n, s in _settings(pipe).items()} == {
        "a": (1.0, True),
        "b": (1.0, True),
        "c": (0.25, False),
    }
    before = _settings(pipe)
    for names, weights, match in (
        (["a", "a"], None, "duplicates"),
        (["a", "b"], [0.5], r"2 adapter name\(s\) \['a', 'b'\] but 1 scale weight"),
        (["a", "b"], [0.5, float("nan")], "scale"),
        (["a"], [{"left": 1.0}], r"unknown key\(s\) \['left'\]"),
        (["a"], [{"up": {"block_1": [1.0, 2.0, 3.0]}}], "Expected 2 scales for up.block_1, got 3"),
        (["a"], [{"down": float("inf")}], "finite"),
    ):
        with pytest.raises(rd.ConfigError, match=match):
            pipe.set_res_tuners(names, weights)
        assert _settings(pipe) == before


def test_per_block_weights_scale_the_named_blocks_and_reset_the_global_scale():
    pipe = _pipe_with("a", "b")
    unet = pipe.unet
    inputs = _inputs(unet)
    pipe.set_res_tuner_scale(0.3, "a")
    pipe.set_res_tuners(["a", "b"], [{"down": 0.0, "mid": 0.0, "up": 0.0}, 0.0])
    rd.set_res_tuner_enabled(unet, False)
    base = _out(unet, inputs)
    rd.set_res_tuner_enabled(unet, True)
    torch.testing.assert_close(_out(unet, inputs), base, rtol=0, atol=0)
    pipe.set_res_tuners(["a", "b"], [{"down": 1.0, "mid": 0.0, "up": 0.0}, 0.0])
    down_only = _out(unet, inputs)
    assert not torch.equal(down_only, base)
    # the same by hand: tuner a alone at scale 1 on the down blocks, 0 elsewhere
    rd.set_res_tuner_scale(unet, 1.0, "a")
    set_res_tuner_layer_scales(unet, "a", {"down_blocks": 1.0, "mid_block": 0.0, "up_blocks": 0.0})
    torch.testing.assert_close(_out(unet, inputs), down_only, rtol=0, atol=0)
    # a number after a dict: every block at that number again
    pipe.set_res_tuners(["a", "b"], [0.0, 0.0])
    torch.testing.assert_close(_out(unet, inputs), base, rtol=0, atol=0)


def test_fused_tuners_refuse_a_new_scale_disabling_and_mixing_but_take_their_own_scale():
    pipe = _pipe_with("a", "b")
    pipe.set_res_tuner_scale(0.5, "a")
    pipe.fuse_res_tuner("a")
    before, weights = _settings(pipe), _base_weights(pipe.unet)
    pipe.set_res_tuner_scale(0.5, "a")  # the scale it is fused at: nothing to change
    pipe.set_res_tuner_scale(0.25, "b")  # another tuner, not fused
    before["b"]["scale"] = 0.25
    with pytest.raises(rd.ResTunerError, match=r"tuner\(s\) \['a'\] are fused .* before changing its scale"):
        pipe.set_res_tuner_scale(0.75)
    with pytest.raises(rd.ResTunerError, match=r"\['a'\] are fused .* before disabling it"):
        pipe.disable_res_tuner(["b", "a"])
    with pytest.raises(rd.ResTunerError, match=r"\['a'\] are fused .* before mixing tuners"):
        pipe.set_res_tuners("b")
    assert _settings(pipe) == before
    assert all(torch.equal(v, weights[k]) for k, v in _base_weights(pipe.unet).items())
    pipe.disable_res_tuner("b")
    assert _settings(pipe)["b"]["enabled"] is False


def test_fuse_takes_every_enabled_tuner_or_the_named_ones_and_refuses_disabled_ones():
    pipe = _pipe_with("a", "b", "c")
    pipe.disable_res_tuner("b")
    with pytest.raises(rd.ResTunerError, match=r"tuner\(s\) \['b'\] are disabled; enable_res_tuner\(\['b'\]\)"):
        pipe.fuse_res_tuner(["a", "b"])
    assert not any(s["fused"] for s in _settings(pipe).values())
    pipe.fuse_res_tuner("c")
    assert {n: s["fused"] for n, s in _settings(pipe).items()} == {"a": False, "b": False, "c": True}
    pipe.unfuse_res_tuner()
    pipe.fuse_res_tuner()  # None: the enabled ones
    assert {n: s["fused"] for n, s in _settings(pipe).items()} == {"a": True, "b": False, "c": True}
    pipe.unfuse_res_tuner("a")
    assert {n: s["fused"] for n, s in _settings(pipe).items()} == {"a": False, "b": False, "c": True}
    pipe.unfuse_res_tuner()
    pipe.disable_res_tuner()
    weights = _base_weights(pipe.unet)
    pipe.fuse_res_tuner()  # nothing enabled: nothing fused
    assert not any(s["fused"] for s in _settings(pipe).values())
    assert all(torch.equal(v, weights[k]) for k, v in _base_weights(pipe.unet).items())
    with pytest.raises(rd.ResTunerError, match="no res tuner is loaded on this pipeline"):
        _Pipe(frozen_tiny_unet()).fuse_res_tuner()


def test_get_res_tuners_gives_each_config_with_its_settings():
    pipe = _pipe_with("a")
    rd.add_res_tuner(pipe.unet, rd.ResTunerConfig(tuner="res_lora", rank=4, targets=["attn1"]), "b")
    tuners = pipe.get_res_tuners()
    assert list(tuners) == ["a", "b"]
    assert tuners["a"]["config"] == LORA and tuners["b"]["config"].hyperparameters["rank"] == 4
    assert set(tuners["b"]) == {"config", "scale", "enabled", "fused"}


# --- hotswap ---------------------------------------------------------------------------------------------------
def test_hotswap_copies_into_the_same_parameters_and_takes_the_new_scale(tmp_path):
    target = _pipe_with("style")
    params = [p for n, p in target.unet.named_parameters() if "res_tuner" in n or ".bank." in n]
    source = _pipe_with("x", "y", config=rd.ResTunerConfig(tuner="res_lora", rank=2, targets=["attn2"], scale=0.5))
    new = _weights(source, "y")
    assert (
        target.load_res_tuner(
            source.res_tuner_state_dict("y"),
            adapter_name="style",
            hotswap=True,
            config=source.get_res_tuners()["y"]["config"],
        )
        == "style"
    )
    assert all(torch.equal(_weights(target, "style")[k], v) for k, v in new.items())
    assert _settings(target)["style"]["scale"] == 0.5
    assert [p for n, p in target.unet.named_parameters() if "res_tuner" in n or ".bank." in n] == params
    # a state dict with hotswap and no config: the loaded tuner's config, its scale kept
    target.load_res_tuner(source.res_tuner_state_dict("x"), adapter_name="style", hotswap=True)
    assert all(torch.equal(_weights(target, "style")[k], v) for k, v in _weights(source, "x").items())
    assert _settings(target)["style"]["scale"] == 0.5


def test_hotswap_refuses_unknown_names_other_structures_and_fused_tuners(tmp_path):
    target = _pipe_with("style")
    before = _weights(target, "style")
    other = rd.ResTunerConfig(tuner="res_lora", rank=4, targets=["attn2"])
    state = _pipe_with("x", config=other).res_tuner_state_dict("x")
    with pytest.raises(rd.ResTunerError, match=r"none is named 'nope' \(loaded: \['style'\]\)"):
        target.load_res_tuner(state, adapter_name="nope", hotswap=True, config=other)
    with pytest.raises(rd.ResTunerError, match="hotswap=True needs adapter_name="):
        target.load_res_tuner(state, hotswap=True, config=other)
    with pytest.raises(rd.ResTunerFileError, match=r"configs differ in \['hyperparameters'\]"):
        target.load_res_tuner(state, adapter_name="style", hotswap=True, config=other)
    target.fuse_res_tuner("style")
    with pytest.raises(rd.ResTunerError, match="is fused into the weights; unfuse it before hotswapping"):
        target.load_res_tuner(_pipe_with("z").res_tuner_state_dict("z"), adapter_name="style", hotswap=True)
    target.unfuse_res_tuner()
    assert all(torch.equal(_weights(target, "style")[k], v) for k, v in before.items())
    with pytest.raises(rd.ResTunerError, match="hotswap=True replaces a loaded tuner"):
        tuner_io.load_res_tuner(frozen_tiny_unet(), state, adapter_name="style", hotswap=True, config=other)


# --- the size plan ---------------------------------------------------------------------------------------------
def test_the_plan_lists_every_tensor_with_its_shape_and_the_size_check_compares_with_the_model():
    unet = frozen_tiny_unet()
    planned = planned_tensor_shapes(unet, LORA)
    rd.add_res_tuner(unet, LORA)
    assert planned == {k: tuple(v.shape) for k, v in tuner_io.res_tuner_state_dict(unet).items()}
    own = own_parameter_count(unet)
    assert own == sum(p.numel() for p in frozen_tiny_unet().parameters())
    check_tuner_size(unet, LORA)
    check_tuner_size(unet, LORA, {"w": (own,)})  # exactly the model's size: allowed
    with pytest.raises(rd.ResTunerError, match=f"would have {own + 1:,} parameters, more than the {own:,}"):
        check_tuner_size(unet, LORA, {"w": (own + 1,)})
    with pytest.raises(rd.ResTunerError, match="more than the"):
        check_tuner_size(unet, LORA, {"a": (2, own // 2 + 1), "b": (1,)})


def _inputs(unet):
    from resattn_diffusion.testing import unet_inputs

    return unet_inputs(unet)


def _out(unet, inputs):
    with torch.no_grad():
        return unet(**inputs).sample


# --- the model's state: names and hooks ----------------------------------------------------------------------
def _hooks(model: nn.Module) -> dict[str, int]:
    """Every hook table of every module, by size: what adding tuners adds and removing them must take away."""
    tables = (
        "_forward_pre_hooks",
        "_forward_pre_hooks_with_kwargs",
        "_forward_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_hooks_always_called",
    )
    return {f"{name}:{table}": len(getattr(m, table)) for name, m in model.named_modules() for table in tables}


@pytest.mark.parametrize("copy_first", [False, True])
def test_removing_every_tuner_removes_every_hook_also_on_a_deep_copy(copy_first):
    import copy

    unet = frozen_tiny_unet()
    before = _hooks(unet)
    rd.add_res_tuner(unet, rd.ResTunerConfig(tuner="res_adapter", targets=["ff"]), "ff")
    rd.add_res_tuner(unet, LORA, "lora")
    assert _hooks(unet) != before
    if copy_first:  # hooks are found by identity of the function, not by handles kept on the original
        unet = copy.deepcopy(unet)
    rd.remove_res_tuner(unet, "ff")
    assert list(rd.get_res_tuner_configs(unet)) == ["lora"]
    rd.remove_res_tuner(unet)
    assert _hooks(unet) == before


def test_a_name_that_is_not_a_loaded_tuner_is_refused_naming_the_loaded_ones():
    unet = _pipe_with("a", "b").unet
    with pytest.raises(rd.ResTunerError, match=r"adapter_name must be a tuner's name \(a string\), got int 3"):
        tuner_io.res_tuner_state_dict(unet, 3)
    with pytest.raises(rd.ResTunerError, match=r"no tuner named 'c' on this model; loaded tuners .*\['a', 'b'\]"):
        tuner_io.res_tuner_state_dict(unet, "c")
    assert {name: s["scale"] for name, s in _Pipe(unet).get_res_tuners().items()} == {"a": 1.0, "b": 1.0}
