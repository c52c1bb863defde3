"""LoRA export: the files load in stock diffusers (``pipe.load_lora_weights``) and give our tuner's images."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from resattn_diffusion import ResTunerConfig, ResTunerError, ResTunerFileError, add_res_tuner, save_res_tuner
from resattn_diffusion.integration.export import export_lora, main
from resattn_diffusion.testing import randomize_tuner, save_tiny_pipeline, tiny_pipeline

pytest.importorskip("peft")  # diffusers' load_lora_weights needs it


def _images(pipe):
    return pipe("a photo", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images


def _trained_tuner(kind, tmp_path, tuner, **config):
    pipe = tiny_pipeline(kind)
    cfg = ResTunerConfig(tuner=tuner, targets=("attn1", "attn2", "ff"), scale=0.7, **config)
    add_res_tuner(pipe.unet, cfg)
    randomize_tuner(pipe.unet, std=0.2)
    return pipe, save_res_tuner(pipe.unet, tmp_path / f"{kind}-{tuner}.safetensors")


@pytest.mark.parametrize(
    "kind, tuner, fmt, config",
    [
        ("sd1", "res_lora", "diffusers", {}),
        ("sd1", "res_lora", "kohya", {}),
        ("sd1", "glora", "diffusers", {}),
        ("sd1", "surm_toeplitz", "kohya", {}),
        ("sd1", "res_lora", "diffusers", {"placement": "sequential"}),
        ("sdxl", "res_lora", "kohya", {}),
        ("sdxl", "surm_circulant", "diffusers", {}),
        ("sdxl", "glora", "diffusers", {}),
    ],
)
def test_exported_lora_loads_in_stock_diffusers_with_the_tuners_images(kind, tuner, fmt, config, tmp_path):
    pipe, tuner_file = _trained_tuner(kind, tmp_path, tuner, **config)
    ours = _images(pipe)
    stock = tiny_pipeline(kind)
    base_images = _images(stock)
    report = export_lora(tuner_file, tmp_path / "lora.safetensors", format=fmt, base=stock.unet)
    assert report.max_relative_error == 0.0
    keys = load_file(report.out_file)
    prefix = "unet." if fmt == "diffusers" else "lora_unet_"
    assert keys and all(key.startswith(prefix) for key in keys)
    stock.load_lora_weights(str(report.out_file))
    theirs = _images(stock)
    assert abs(ours - base_images).max() > 1e-2  # the tuner changes the images, so the match below means something
    assert abs(ours - theirs).max() < 1e-4


def test_res_lora_exports_as_a_key_rename_at_its_own_rank(tmp_path):
    pipe, tuner_file = _trained_tuner("sd1", tmp_path, "res_lora", rank=3)
    report = export_lora(tuner_file, tmp_path / "lora.safetensors")
    assert {layer.rank for layer in report.layers} == {3}
    exported = load_file(report.out_file)
    saved = load_file(tuner_file)
    path = report.layers[0].path
    assert torch.equal(exported[f"unet.{path}.lora_A.weight"], saved[f"{path}.lora_A.weight"])
    assert torch.allclose(exported[f"unet.{path}.lora_B.weight"], 0.7 * saved[f"{path}.lora_B.weight"])


def test_truncated_svd_reports_each_layers_true_relative_error(tmp_path):
    _, tuner_file = _trained_tuner("sd1", tmp_path, "surm_circulant")
    exact = export_lora(tuner_file, tmp_path / "exact.safetensors")
    cut = export_lora(tuner_file, tmp_path / "cut.safetensors", rank=4)
    full, low = load_file(exact.out_file), load_file(cut.out_file)
    for layer in cut.layers:
        key = f"unet.{layer.path}"
        dense = full[f"{key}.lora_B.weight"] @ full[f"{key}.lora_A.weight"]
        approx = low[f"{key}.lora_B.weight"] @ low[f"{key}.lora_A.weight"]
        assert layer.rank == 4 and low[f"{key}.lora_A.weight"].shape[0] == 4
        assert layer.relative_error == pytest.approx(float((dense - approx).norm() / dense.norm()), rel=1e-3, abs=1e-6)
        assert 0 < layer.relative_error < 1
    more = export_lora(tuner_file, tmp_path / "more.safetensors", rank=16)
    assert more.max_relative_error < cut.max_relative_error


def test_glora_reads_the_base_from_a_model_folder_and_refuses_without_it(tmp_path):
    _, tuner_file = _trained_tuner("sd1", tmp_path, "glora")
    with pytest.raises(ResTunerError, match="needs the base model's weights"):
        export_lora(tuner_file, tmp_path / "lora.safetensors")
    folder = save_tiny_pipeline("sd1", tmp_path / "base")
    from_folder = export_lora(tuner_file, tmp_path / "a.safetensors", base=folder)
    from_module = export_lora(tuner_file, tmp_path / "b.safetensors", base=tiny_pipeline("sd1").unet)
    a, b = load_file(from_folder.out_file), load_file(from_module.out_file)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ResTunerFileError, match="trained on"):
        export_lora(tuner_file, tmp_path / "c.safetensors", base=tiny_pipeline("sdxl").unet)
    with pytest.raises(ResTunerFileError, match="no base model"):
        export_lora(tuner_file, tmp_path / "c.safetensors", base=tmp_path / "missing")
    assert not (tmp_path / "c.safetensors").exists()


def test_bias_deltas_are_refused_in_kohya_format(tmp_path):
    _, tuner_file = _trained_tuner("sd1", tmp_path, "glora")
    with pytest.raises(ResTunerError, match="kohya LoRA format has no bias"):
        export_lora(tuner_file, tmp_path / "lora.safetensors", format="kohya", base=tiny_pipeline("sd1").unet)
    assert not (tmp_path / "lora.safetensors").exists()


@pytest.mark.parametrize("tuner", ["res_attn", "res_adapter", "res_prefix", "res_prompt", "surm_adapter"])
def test_branch_tuners_are_refused_with_why(tuner, tmp_path):
    pipe = tiny_pipeline("sd1")
    add_res_tuner(pipe.unet, ResTunerConfig(tuner=tuner, targets=("attn2",)))
    tuner_file = save_res_tuner(pipe.unet, tmp_path / "t.safetensors")
    with pytest.raises(ResTunerError, match="no weight delta reproduces"):
        export_lora(tuner_file, tmp_path / "lora.safetensors")
    assert not (tmp_path / "lora.safetensors").exists()


def test_bad_arguments_are_refused_before_reading(tmp_path):
    with pytest.raises(ValueError, match="format"):
        export_lora(tmp_path / "x.safetensors", tmp_path / "o.safetensors", format="comfy")
    with pytest.raises(ValueError, match="rank"):
        export_lora(tmp_path / "x.safetensors", tmp_path / "o.safetensors", rank=0)
    with pytest.raises(ResTunerFileError, match="no tuner file"):
        export_lora(tmp_path / "x.safetensors", tmp_path / "o.safetensors")


def test_command_line_writes_the_file_and_prints_the_table(tmp_path, capsys):
    _, tuner_file = _trained_tuner("sd1", tmp_path, "res_lora")
    out = tmp_path / "kohya.safetensors"
    assert main([str(tuner_file), str(out), "--format", "kohya", "--rank", "2"]) == 0
    printed = capsys.readouterr().out
    assert "relative error" in printed and "kohya" in printed
    assert all(k.startswith("lora_unet_") for k in load_file(out))
    assert main([str(tuner_file), str(out), "--no_overwrite"]) == 2
    assert "exists" in capsys.readouterr().err


def test_a_file_claiming_a_giant_layer_is_refused_before_building_it(tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    _, tuner_file = _trained_tuner("sd1", tmp_path, "surm_circulant")
    with safe_open(str(tuner_file), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    layers = json.loads(metadata["layers"])
    first = next(iter(layers))
    layers[first].update(in_dim=1 << 20, out_dim=1 << 20)
    save_file(tensors, str(tmp_path / "giant.safetensors"), metadata={**metadata, "layers": json.dumps(layers)})
    with pytest.raises(ResTunerFileError, match="elements"):
        export_lora(tmp_path / "giant.safetensors", tmp_path / "lora.safetensors")
