"""Hostile call orders and argument forms (an attacker's pass): each test is a sequence of valid-looking calls that
used to leave a saved file unloadable, a model half-changed, or end in a raw Python error instead of our own.

The README's "What is refused and why" table has one row per case.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import resattn_diffusion as rd
from pipelines import ResTunerStableDiffusionPipeline
from resattn_diffusion.integration.api import res_tuner_settings
from resattn_diffusion.testing import (
    frozen_tiny_model,
    frozen_tiny_unet,
    model_inputs,
    randomize_tuner,
    tiny_pipeline,
    unet_inputs,
)

#: GLoRA whose only term is ``W0 C``: fusing it adds a bias to the bias-free ``to_q`` / ``to_k`` / ``to_v``.
GLORA_BIAS_ONLY = rd.ResTunerConfig(tuner="glora", config="A=none,B=none,C=vector,D=none,E=none")


def _out(unet: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return unet(**unet_inputs(unet)).sample


def _run_model(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs)[0]


def _tuner_file(tmp_path: Path, name: str, config: rd.ResTunerConfig, seed: int = 0) -> Path:
    unet = frozen_tiny_unet("sd1")
    rd.add_res_tuner(unet, config)
    randomize_tuner(unet, seed=seed, std=0.2)
    return rd.save_res_tuner(unet, tmp_path / f"{name}.safetensors")


@pytest.fixture
def pipe() -> ResTunerStableDiffusionPipeline:
    pipe = ResTunerStableDiffusionPipeline(**tiny_pipeline("sd1").components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- a tuner saved while a GLoRA that added a bias is fused --------------------------------------------------------
def test_a_glora_saved_while_fused_loads_into_the_base_model(tmp_path: Path):
    """Fusing GLoRA's ``W0 C`` gives the bias-free ``to_q`` a bias; the file saved then recorded ``has_bias: True``
    for those layers and was refused by the very base model it was trained on."""
    unet = frozen_tiny_unet("sd1")
    rd.add_res_tuner(unet, GLORA_BIAS_ONLY, "g")
    randomize_tuner(unet, "g", seed=1, std=0.2)
    unfused_file = rd.save_res_tuner(unet, tmp_path / "unfused.safetensors", "g")
    rd.fuse_res_tuner(unet, "g")
    fused_file = rd.save_res_tuner(unet, tmp_path / "fused.safetensors", "g")
    fresh = frozen_tiny_unet("sd1")
    rd.load_res_tuner(fresh, fused_file)
    torch.testing.assert_close(_out(fresh), _out(unet))
    with safe_open(str(unfused_file), framework="pt") as unfused, safe_open(str(fused_file), framework="pt") as fused:
        assert fused.metadata()["layers"] == unfused.metadata()["layers"]


def test_a_tuner_loads_beside_a_fused_glora_that_added_a_bias(tmp_path: Path):
    """The same fingerprint decides whether a file fits: a valid res_lora file was refused ("does not fit this
    UNet", has_bias) while a GLoRA that added a bias was fused, and a tuner added then was built for a bias the
    base model does not have."""
    lora_file = _tuner_file(tmp_path, "lora", rd.ResTunerConfig(tuner="res_lora"), seed=2)
    unet = frozen_tiny_unet("sd1")
    rd.add_res_tuner(unet, GLORA_BIAS_ONLY, "g")
    randomize_tuner(unet, "g", seed=1, std=0.2)
    rd.fuse_res_tuner(unet, "g")
    rd.load_res_tuner(unet, lora_file, adapter_name="lora")
    rd.add_res_tuner(unet, GLORA_BIAS_ONLY, "g2")
    saved = rd.save_res_tuner(unet, tmp_path / "g2.safetensors", "g2")
    rd.load_res_tuner(frozen_tiny_unet("sd1"), saved)  # fits the base model: no bias term on bias-free layers


# --- set_res_tuners: one weight for every name, and per-block weights checked before anything changes ------------
@pytest.mark.parametrize("weight", [np.float32(0.5), np.int64(1), np.float64(0.25)], ids=str)
def test_set_res_tuners_takes_a_numpy_number_as_one_weight_for_every_name(
    pipe: ResTunerStableDiffusionPipeline, tmp_path: Path, weight
):
    """A numpy float32/int64 scalar (what ``np.linspace`` gives) used to end in ``TypeError: object of type
    'numpy.float32' has no len()``; it is a real number like any other."""
    lora_file = _tuner_file(tmp_path, "lora", rd.ResTunerConfig(tuner="res_lora"))
    pipe.load_res_tuner(lora_file, adapter_name="a")
    pipe.load_res_tuner(lora_file, adapter_name="b")
    pipe.set_res_tuners(["a", "b"], weight)
    assert {name: s["scale"] for name, s in res_tuner_settings(pipe.unet).items()} == {"a": weight, "b": weight}


@pytest.mark.parametrize("weight", [torch.tensor(0.5), "0.5", b"05"], ids=repr)
def test_set_res_tuners_refuses_a_single_weight_that_is_not_a_number(
    pipe: ResTunerStableDiffusionPipeline, tmp_path: Path, weight
):
    """A 0-d tensor was a raw ``TypeError: len() of a 0-d tensor``; a string was taken apart into one weight per
    character (a "2 scale weight(s) 05" count error, or, as long as the names list, each character as a scale)."""
    pipe.load_res_tuner(_tuner_file(tmp_path, "lora", rd.ResTunerConfig(tuner="res_lora")), adapter_name="a")
    before = res_tuner_settings(pipe.unet)
    with pytest.raises(rd.ConfigError, match="scale must be a number"):
        pipe.set_res_tuners(["a"], weight)
    assert res_tuner_settings(pipe.unet) == before


def test_set_res_tuners_refuses_per_block_weights_for_a_bypass_before_changing_any_tuner(
    pipe: ResTunerStableDiffusionPipeline, tmp_path: Path
):
    """Per-block weights for the bypass (one side network, one scale) were refused only when its turn came, after
    the tuners named before it had their new scales: the pipeline was left half-mixed."""
    pipe.load_res_tuner(_tuner_file(tmp_path, "lora", rd.ResTunerConfig(tuner="res_lora")), adapter_name="a")
    pipe.load_res_tuner(_tuner_file(tmp_path, "bypass", rd.ResTunerConfig(tuner="res_bypass")), adapter_name="b")
    pipe.set_res_tuner_scale(0.8, "a")
    pipe.disable_res_tuner("b")
    before = res_tuner_settings(pipe.unet)
    with pytest.raises(rd.ResTunerError, match="'b' is a side network"):
        pipe.set_res_tuners(["a", "b"], [0.3, {"down": 0.5}])
    assert res_tuner_settings(pipe.unet) == before


# --- saving to paths that are not a plain new file -----------------------------------------------------------------
@pytest.fixture
def tuned_unet() -> torch.nn.Module:
    unet = frozen_tiny_unet("sd1")
    rd.add_res_tuner(unet, rd.ResTunerConfig(tuner="res_lora"), "a")
    randomize_tuner(unet, "a", seed=3, std=0.2)
    return unet


def test_saving_to_a_folder_named_like_a_tuner_file_writes_the_file_in_it(tuned_unet, tmp_path: Path):
    """``out.safetensors`` that is an existing folder: the save ended in a raw ``IsADirectoryError`` from the final
    rename; now it is a folder like any other, as ``load_res_tuner(folder)`` reads it."""
    folder = tmp_path / "out.safetensors"
    folder.mkdir()
    (folder / "notes.txt").write_text("kept")
    written = rd.save_res_tuner(tuned_unet, folder, "a")
    assert written == folder / "res_tuner.safetensors"
    assert (folder / "notes.txt").read_text() == "kept"
    fresh = frozen_tiny_unet("sd1")
    rd.load_res_tuner(fresh, folder)
    torch.testing.assert_close(_out(fresh), _out(tuned_unet))


def test_saving_under_a_file_or_to_an_empty_path_is_refused(tuned_unet, tmp_path: Path, monkeypatch):
    """A parent that is a file was a raw ``FileExistsError`` from ``mkdir``, a NUL byte a raw ``ValueError``; ``""``
    wrote ``res_tuner.safetensors`` into the working directory."""
    blocker = tmp_path / "a_file"
    blocker.write_text("untouched")
    for target in (blocker / "x.safetensors", blocker):
        with pytest.raises(rd.ResTunerFileError, match="cannot create its folder"):
            rd.save_res_tuner(tuned_unet, target, "a")
    assert blocker.read_text() == "untouched"
    with pytest.raises(rd.ResTunerFileError, match="NUL byte"):  # was a raw "ValueError: embedded null byte"
        rd.save_res_tuner(tuned_unet, str(tmp_path / "a\x00b.safetensors"), "a")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(rd.ResTunerFileError, match="path is empty"):
        rd.save_res_tuner(tuned_unet, "", "a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_a_long_valid_file_name_saves(tuned_unet, tmp_path: Path):
    """A 240-character name is a valid file name, but the temporary beside it (name + host, pid, random part) was
    over the 255-byte limit: a raw ``OSError: File name too long``. One over the limit itself is our error."""
    names = ["t" * 228 + ".safetensors", "\u6a21" * 76 + ".safetensors"]  # 240 bytes each (3 per CJK character)
    for name in names:
        written = rd.save_res_tuner(tuned_unet, tmp_path / name, "a")
        assert written.name == name
        rd.load_res_tuner(frozen_tiny_unet("sd1"), written)
    with pytest.raises(rd.ResTunerFileError, match="too long"):
        rd.save_res_tuner(tuned_unet, tmp_path / ("t" * 300 + ".safetensors"), "a")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)


# --- a per-call scale that would change a fused tuner ----------------------------------------------------------------
def test_a_per_call_scale_for_a_fused_tuner_is_refused_not_ignored(tmp_path: Path):
    """``cross_attention_kwargs={"res_tuner_scale": 0.0}`` on a UNet whose tuner is fused gave the fused output: the
    per-call scale cannot reach the weights, and was dropped without a word. Scales that agree with the fused one,
    and scales for the unfused tuners only, still run."""
    unet = frozen_tiny_unet("sd1")
    reference = _out(unet)
    rd.add_res_tuner(unet, rd.ResTunerConfig(tuner="res_lora", scale=0.5), "fused")
    rd.add_res_tuner(unet, rd.ResTunerConfig(tuner="res_attn"), "branch")
    randomize_tuner(unet, "fused", seed=4, std=0.2)
    randomize_tuner(unet, "branch", seed=5, std=0.2)
    rd.fuse_res_tuner(unet, "fused")
    fused = _out(unet)
    inputs = unet_inputs(unet)
    for scale in (0.0, 1.0, {"fused": 0.0}, {"branch": 1.0, "fused": 2.0}):
        with pytest.raises(rd.ResTunerError, match="'fused' is fused into the weights at scale 0.5"), torch.no_grad():
            unet(**inputs, cross_attention_kwargs={rd.SCALE_KWARG: scale})
    assert torch.equal(_out(unet), fused)  # a refused call leaves no per-call scale behind
    with torch.no_grad():
        same = unet(**inputs, cross_attention_kwargs={rd.SCALE_KWARG: 0.5}).sample
        no_branch = unet(**inputs, cross_attention_kwargs={rd.SCALE_KWARG: {"branch": 0.0}}).sample
    rd.set_res_tuner_scale(unet, 0.5, "branch")  # 0.5 for every tuner: the fused one's own scale, branch's new one
    torch.testing.assert_close(same, _out(unet))
    rd.remove_res_tuner(unet, "branch")
    torch.testing.assert_close(no_branch, _out(unet))
    rd.remove_res_tuner(unet, "fused")
    assert torch.equal(_out(unet), reference)


def test_a_per_call_scale_that_is_not_a_dict_is_refused_before_the_call():
    """The banks read a per-call ``{name: scale}`` as a dict; a read-only mapping passed the check and then failed
    mid-forward with a raw ``TypeError`` (a mapping times a tensor)."""
    import types

    unet = frozen_tiny_unet("sd1")
    rd.add_res_tuner(unet, rd.ResTunerConfig(tuner="res_attn"), "a")
    randomize_tuner(unet, "a", seed=2, std=0.2)
    tuned = _out(unet)
    with pytest.raises(rd.ConfigError, match=r"res_tuner_scale must be one number or a dict"), torch.no_grad():
        unet(**unet_inputs(unet), cross_attention_kwargs={rd.SCALE_KWARG: types.MappingProxyType({"a": 0.5})})
    assert torch.equal(_out(unet), tuned)


# --- a diverged tuner, fused ---------------------------------------------------------------------------------------
def test_a_fused_tuner_with_nan_weights_unfuses_to_the_exact_original_weights():
    """A tuner whose training diverged (NaN weights) and was fused without ``safe_fusing`` wrote NaN into the
    weights; unfusing then found the weight "changed by something else" (NaN != NaN) and refused, and the only way
    out, ``accept_changed_weights=True``, left the NaN in the model for good, though the bank held W0 exactly."""
    unet = frozen_tiny_unet("sd1")
    original = {key: value.clone() for key, value in unet.state_dict().items()}
    rd.add_res_tuner(unet, rd.ResTunerConfig(tuner="res_lora"), "diverged")
    randomize_tuner(unet, "diverged", seed=6, std=0.2)
    with torch.no_grad():
        rd.res_tuner_parameters(unet, "diverged")[0].view(-1)[0] = float("nan")
    rd.fuse_res_tuner(unet, "diverged")
    assert any(value.isnan().any() for value in unet.state_dict().values() if value.is_floating_point())
    rd.unfuse_res_tuner(unet, "diverged")
    rd.remove_res_tuner(unet, "diverged")
    state = unet.state_dict()
    assert state.keys() == original.keys()
    assert all(torch.equal(state[key], original[key]) for key in original)


# --- diffusers' save_pretrained of a model that carries tuners ----------------------------------------------------
@pytest.fixture
def no_hub(monkeypatch) -> None:
    """``push_to_hub`` creates the Hub repo before it saves: a refusal must come before that."""
    import diffusers.utils.hub_utils

    def create_repo(*args, **kwargs):
        raise AssertionError("push_to_hub reached the Hub")

    monkeypatch.setattr(diffusers.utils.hub_utils, "create_repo", create_repo)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("kind", ["sd1", "sd3", "flux"])
def test_save_pretrained_of_a_model_with_tuners_is_refused_until_they_are_removed(kind, fused, tmp_path: Path, no_hub):
    """``unet.save_pretrained`` / ``transformer.save_pretrained`` wrote the tuners into the model's file, where
    ``from_pretrained`` drops them; a fused GLoRA that gave ``to_q`` a bias was saved as a base weight and its bias
    lost on reload, silently. Only our pipelines' ``save_pretrained`` refused."""
    model = frozen_tiny_model(kind)
    inputs = model_inputs(model, seed=3)
    base = _run_model(model, inputs)
    rd.add_res_tuner(model, GLORA_BIAS_ONLY, "g")
    rd.add_res_tuner(model, rd.ResTunerConfig(tuner="res_attn"), "a")
    randomize_tuner(model, "g", seed=1, std=0.2)
    if fused:
        rd.fuse_res_tuner(model, "g")
    folder = tmp_path / "saved"
    with pytest.raises(rd.ResTunerError, match=r"res tuner\(s\) \['g', 'a'\] are loaded; save_pretrained .*save_res"):
        model.save_pretrained(folder, safe_serialization=True)
    with pytest.raises(rd.ResTunerError, match=r"are loaded; push_to_hub would write them"):
        model.push_to_hub("user/model")
    assert not folder.exists()
    rd.remove_res_tuner(model)
    assert "save_pretrained" not in vars(model) and "push_to_hub" not in vars(model)  # gone with the last tuner
    model.save_pretrained(folder)
    assert torch.equal(_run_model(type(model).from_pretrained(folder), inputs), base)


def test_a_stock_pipeline_does_not_save_a_unet_with_tuners(tmp_path: Path, no_hub):
    """A stock diffusers pipeline calls each component's ``save_pretrained``: the UNet's guard refuses it (the
    components diffusers saves before the UNet are written by then; ours checks first and writes nothing)."""
    stock = tiny_pipeline("sd1")
    rd.add_res_tuner(stock.unet, rd.ResTunerConfig(tuner="res_lora"))
    with pytest.raises(rd.ResTunerError, match=r"\['default'\] are loaded; save_pretrained"):
        stock.save_pretrained(tmp_path / "stock")
    assert not (tmp_path / "stock" / "unet").exists()
    ours = ResTunerStableDiffusionPipeline(**stock.components)
    rd.fuse_res_tuner(stock.unet)
    with pytest.raises(rd.ResTunerError, match=r"\['default'\] are loaded; save_pretrained"):
        ours.save_pretrained(tmp_path / "ours")
    with pytest.raises(rd.ResTunerError, match=r"\['default'\] are loaded; push_to_hub"):
        ours.push_to_hub("user/pipe")
    assert not (tmp_path / "ours").exists()
    ours.unload_res_tuner()
    ours.save_pretrained(tmp_path / "ours")
    assert (tmp_path / "ours" / "unet").is_dir()


# --- a per-call scale passed positionally --------------------------------------------------------------------------
@pytest.mark.parametrize("tuner", ["res_lora", "res_attn"])
@pytest.mark.parametrize("kind", ["sd1", "sd3", "flux"])
def test_a_per_call_scale_passed_positionally_is_the_keyword_one(kind, tuner):
    """``unet(sample, t, ehs, None, None, None, {"res_tuner_scale": 0.5})``: the model's hook read the scale from the
    keyword only, so linear tuners ran at their own scale, silently, and the scale went unchecked."""
    model = frozen_tiny_model(kind)
    rd.add_res_tuner(model, rd.ResTunerConfig(tuner=tuner))
    randomize_tuner(model, std=0.2)
    inputs = model_inputs(model, seed=5)
    key = "cross_attention_kwargs" if kind == "sd1" else "joint_attention_kwargs"
    names = list(inspect.signature(type(model).forward).parameters)[1:]
    before = [inputs.pop(name, None) for name in names[: names.index(key)]]  # every argument up to it, positionally

    def run(*args, **kwargs) -> torch.Tensor:
        with torch.no_grad():
            return model(*before, *args, **inputs, **kwargs)[0]

    keyword = run(**{key: {"res_tuner_scale": 0.5}})
    assert not torch.equal(keyword, run())  # the scale matters here
    assert torch.equal(run({"res_tuner_scale": 0.5}), keyword)
    assert torch.equal(run({"res_tuner_scale": {"default": 0.5}}), keyword)
    with pytest.raises(ValueError, match="finite"):  # checked like the keyword one, before the call
        run({"res_tuner_scale": float("nan")})
