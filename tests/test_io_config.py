"""The tuner file format and the config: round trips, and clear errors that change nothing (issue 2)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import resattn_diffusion as rd
from resattn_diffusion.integration import io as tuner_io
from resattn_diffusion.testing import tiny_unet


def _trained(kind="sd1", tuner="res_attn", **kw):
    unet = tiny_unet(kind)
    unet.requires_grad_(False)
    rd.add_res_tuner(unet, rd.ResTunerConfig(tuner=tuner, **kw))
    with torch.no_grad():
        for p in rd.res_tuner_parameters(unet):
            p.add_(0.05 * torch.randn_like(p))
    return unet


def _processors(unet):
    return {k: type(v).__name__ for k, v in unet.attn_processors.items()}


# --- config --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tuner", [n for n in rd.tuner_names()])
def test_every_tuner_works_with_just_its_name_and_round_trips_json(tuner):
    config = rd.ResTunerConfig(tuner=tuner)
    again = rd.ResTunerConfig.from_json(config.to_json())
    assert again == config and again.hyperparameters == config.hyperparameters


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (
            {"tuner": "res_attn", "rank": 6, "heads": 4},
            r"not divisible by heads=4; with rank 6 use heads in \[1, 2, 3, 6\]",
        ),
        ({"tuner": "lora_xl"}, r"unknown tuner 'lora_xl'; registered tuners: \["),
        (
            {"tuner": "res_attn", "targets": ["attn3"]},
            r"target='attn3' is not allowed; choose one of \[.*'attn1', 'attn2', 'ff'",
        ),
        ({"tuner": "res_attn", "placement": "serial"}, r"placement='serial' is not allowed"),
        ({"tuner": "res_adapter", "rank": 0}, r"rank must be a positive number"),
        ({"tuner": "res_adapter", "activation": "swish"}, r"unknown activation 'swish'; allowed: \["),
        ({"tuner": "res_attn", "dropout": 1.5}, r"dropout must be in \[0, 1\)"),
        (
            {"tuner": "res_attn", "prefix_length": 4},
            r"has no hyperparameter\(s\) \['prefix_length'\]; its hyperparameters are",
        ),
        ({"tuner": "res_lora", "projections": ["to_x"]}, r"projection='to_x' is not allowed"),
    ],
)
def test_impossible_configs_say_what_is_allowed(kwargs, match):
    with pytest.raises(rd.ConfigError, match=match):
        rd.ResTunerConfig(**kwargs)


def test_config_from_bad_json():
    with pytest.raises(rd.ConfigError, match="not valid JSON"):
        rd.ResTunerConfig.from_json("{tuner: res_attn")
    with pytest.raises(rd.ConfigError, match="unknown config key"):
        rd.ResTunerConfig.from_dict({"tuner": "res_attn", "rnak": 4})


# --- file format ---------------------------------------------------------------------------------------------
def test_file_holds_weights_config_version_and_fingerprint(tmp_path):
    unet = _trained(rank=4, heads=2, targets=["attn2"])
    path = rd.save_res_tuner(unet, tmp_path)  # a folder gets res_tuner.safetensors
    assert path.name == tuner_io.WEIGHT_NAME
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["format"] == "resattn-diffusion" and meta["format_version"] == "1"
    assert rd.ResTunerConfig.from_json(meta["config"]) == rd.get_res_tuner_configs(unet)["default"]
    layers = json.loads(meta["layers"])
    assert all(p.endswith(".attn2") for p in layers) and all("context_dim" in s for s in layers.values())
    assert any(k.endswith("attn2.q_proj.weight") for k in keys)
    # the file never pickles: it is plain safetensors
    assert path.read_bytes()[8:9] == b"{"


def test_sd1_tuner_into_sdxl_unet_is_a_clear_error_and_changes_nothing(tmp_path):
    path = rd.save_res_tuner(_trained("sd1"), tmp_path / "sd1.safetensors")
    target = tiny_unet("sdxl")
    before = _processors(target)
    with pytest.raises(rd.ResTunerFileError) as err:
        rd.load_res_tuner(target, path)
    message = str(err.value)
    assert (
        "does not fit this UNet" in message
        and "cross_attention_dim=32" in message
        and "cross_attention_dim=96" in message
    )
    assert "layer" in message and "base model it was trained on" in message
    assert _processors(target) == before and rd.get_res_tuner_configs(target) == {}


def test_truncated_and_corrupt_files_are_clear_errors(tmp_path):
    path = rd.save_res_tuner(_trained(), tmp_path / "t.safetensors")
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 64)
    for bad in (truncated, corrupt):
        target = tiny_unet("sd1")
        with pytest.raises(rd.ResTunerFileError, match="not a readable safetensors file"):
            rd.load_res_tuner(target, bad)
        assert rd.get_res_tuner_configs(target) == {}


def test_missing_file_empty_folder_and_foreign_safetensors(tmp_path):
    from safetensors.torch import save_file

    unet = tiny_unet("sd1")
    with pytest.raises(rd.ResTunerFileError, match="no tuner file at"):
        rd.load_res_tuner(unet, tmp_path / "nope.safetensors")
    with pytest.raises(rd.ResTunerFileError, match="has no tuner file 'res_tuner.safetensors'"):
        rd.load_res_tuner(unet, tmp_path)
    save_file({"w": torch.zeros(2)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(rd.ResTunerFileError, match="not a resattn-diffusion tuner"):
        rd.load_res_tuner(unet, tmp_path / "lora.safetensors")
    assert rd.get_res_tuner_configs(unet) == {}


def test_nan_weights_in_a_file_are_refused(tmp_path):
    unet = _trained()
    with torch.no_grad():
        rd.res_tuner_parameters(unet)[0].fill_(float("nan"))
    path = rd.save_res_tuner(unet, tmp_path / "nan.safetensors")
    target = tiny_unet("sd1")
    with pytest.raises(rd.ResTunerFileError, match="NaN"):
        rd.load_res_tuner(target, path)
    assert rd.get_res_tuner_configs(target) == {}
    assert all(v == "AttnProcessor2_0" for v in _processors(target).values())


def test_save_is_atomic_a_crash_leaves_the_old_file(tmp_path, monkeypatch):
    import safetensors.torch

    unet = _trained()
    path = rd.save_res_tuner(unet, tmp_path / "t.safetensors")
    old = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        rd.save_res_tuner(unet, path)
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]  # no temp file left behind
    assert path.stat().st_mode & 0o044  # readable by others, like any file open() creates (not mkstemp's 0600)


def test_no_overwrite_unless_asked(tmp_path):
    unet = _trained()
    path = rd.save_res_tuner(unet, tmp_path / "t.safetensors")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        rd.save_res_tuner(unet, path, overwrite=False)


def test_load_under_another_name_and_dtype(tmp_path):
    unet = _trained("sd2", tuner="res_prompt")
    path = rd.save_res_tuner(unet, tmp_path / "p.safetensors")
    target = tiny_unet("sd2").to(torch.bfloat16)
    assert rd.load_res_tuner(target, path, adapter_name="style") == "style"
    assert all(p.dtype == torch.bfloat16 for p in rd.res_tuner_parameters(target))
    with pytest.raises(rd.ResTunerError, match="already loaded"):
        rd.load_res_tuner(target, path, adapter_name="style")


def test_sd15_parameter_table_from_config_without_weights():
    from resattn_diffusion.testing import SD15_UNET_CONFIG, unet_from_config

    unet = unet_from_config(SD15_UNET_CONFIG)  # meta device: no memory, no download
    rd.add_res_tuner(unet, rd.ResTunerConfig(tuner="res_attn", rank=8, heads=2))
    count = rd.res_tuner_summary(unet)["tuners"]["default"]["parameters"]
    # 16 transformer blocks; attn1: r(3d + d), attn2: r(d + 2*768 + d)
    dims = [320] * 2 + [640] * 2 + [1280] * 2 + [1280] + [1280] * 3 + [640] * 3 + [320] * 3
    expected = sum(8 * (4 * d) + 8 * (2 * d + 2 * 768) for d in dims)
    assert count == expected
