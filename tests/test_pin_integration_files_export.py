"""Pins of the LoRA export (``integration/export.py``) on a tiny UNet: each exported layer reproduces the tuner's own
branch ``s T(x)`` (parallel) or ``s T(W0 x + b0)`` (sequential) on random inputs, at the factor shapes the module
docstring promises, with the bias and dtype of the tuner; the report's table; the base weights read from a
module, a single file, a sharded folder; and what is refused (issue 18, part 4)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import resattn_diffusion as rd
from resattn_diffusion.integration.api import iter_tuners
from resattn_diffusion.integration.export import ExportReport, export_lora, load_base_weights, main
from resattn_diffusion.testing import frozen_tiny_unet, randomize_tuner


def _tuner_file(tmp_path, tuner="res_lora", name="t", dtype=torch.float32, **config):
    unet = frozen_tiny_unet().to(dtype)
    rd.add_res_tuner(unet, rd.ResTunerConfig(tuner=tuner, targets=("attn1", "attn2", "ff"), scale=0.7, **config))
    randomize_tuner(unet, std=0.2)
    return unet, rd.save_res_tuner(unet, tmp_path / f"{name}.safetensors")


def _lora_of(exported: dict[str, torch.Tensor], path: str):
    key = f"unet.{path}"
    return exported[f"{key}.lora_A.weight"], exported[f"{key}.lora_B.weight"], exported.get(f"{key}.lora_B.bias")


@torch.no_grad()
def _check_branches(unet, exported, placement: str, scale: float = 0.7) -> None:
    """Each layer's LoRA ``up (down x) + bias`` equals the tuner module's own scaled branch on random x."""
    for path, tuner in iter_tuners(unet, "default"):
        linear = unet.get_submodule(path)
        w0, b0 = linear.weight.float(), None if linear.bias is None else linear.bias.float()
        down, up, bias = _lora_of(exported, path)
        x = torch.randn(3, w0.shape[1])
        inputs = x if placement == "parallel" else x @ w0.T + (0 if b0 is None else b0)
        expected = scale * tuner.float()(inputs, w0, b0)
        got = x @ down.float().T @ up.float().T + (0 if bias is None else bias.float())
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_a_full_rank_delta_is_split_at_the_smaller_side_and_reproduces_the_branch(tmp_path):
    unet, file = _tuner_file(tmp_path, "surm_circulant")
    report = export_lora(file, tmp_path / "lora.safetensors")
    exported = load_file(report.out_file)
    _check_branches(unet, exported, "parallel")
    shapes = {layer.path: layer.shape for layer in report.layers}
    assert len(shapes) == len(list(iter_tuners(unet, "default")))
    assert any(d_out < d_in for d_out, d_in in shapes.values()) and any(
        d_out > d_in for d_out, d_in in shapes.values()
    )
    for layer in report.layers:
        down, up, bias = _lora_of(exported, layer.path)
        d_out, d_in = layer.shape
        assert layer.rank == min(d_out, d_in) and layer.relative_error == 0.0 and not layer.has_bias and bias is None
        if d_out < d_in:  # down = s dW, up = I
            assert down.shape == (d_out, d_in) and torch.equal(up, torch.eye(d_out))
        else:  # down = I, up = s dW
            assert up.shape == (d_out, d_in) and torch.equal(down, torch.eye(d_in))


def test_a_sequential_lora_keeps_its_rank_and_carries_the_bias_it_reads(tmp_path):
    unet, file = _tuner_file(tmp_path, "res_lora", rank=3, placement="sequential")
    report = export_lora(file, tmp_path / "lora.safetensors", base=unet)
    exported = load_file(report.out_file)
    _check_branches(unet, exported, "sequential")
    saved = load_file(file)
    for layer in report.layers:
        linear = unet.get_submodule(layer.path)
        down, up, bias = _lora_of(exported, layer.path)
        a, b = saved[f"{layer.path}.lora_A.weight"], saved[f"{layer.path}.lora_B.weight"]
        assert layer.rank == 3 and layer.relative_error == 0.0
        torch.testing.assert_close(down, a @ linear.weight, rtol=1e-5, atol=1e-6)  # A W0 keeps rank r
        torch.testing.assert_close(up, 0.7 * b)
        assert layer.has_bias == (linear.bias is not None)
        # peft's lora_bias gives every layer a bias: zeros where the base layer has none
        expected_bias = 0.7 * b @ a @ linear.bias if linear.bias is not None else torch.zeros(up.shape[0])
        torch.testing.assert_close(bias, expected_bias, rtol=1e-4, atol=1e-6)
    assert any(layer.has_bias for layer in report.layers) and not all(layer.has_bias for layer in report.layers)
    with pytest.raises(rd.ResTunerError, match="sequential placement composes it with W0"):
        export_lora(file, tmp_path / "other.safetensors")
    with pytest.raises(rd.ResTunerError, match="kohya LoRA format has no bias"):
        export_lora(file, tmp_path / "other.safetensors", format="kohya", base=unet)
    assert not (tmp_path / "other.safetensors").exists()


def test_the_export_keeps_the_tuners_dtype_and_writes_a_plain_file_atomically(tmp_path):
    unet, file = _tuner_file(tmp_path, "res_lora", dtype=torch.float16, rank=2)
    out = tmp_path / "sub" / "lora.safetensors"
    report = export_lora(file, out, format="kohya")
    assert report.out_file == out and report.format == "kohya" and report.tuner == "res_lora"
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "exported_from": "resattn-diffusion", "tuner": "res_lora"}
        keys = list(f.keys())
        assert all(f.get_tensor(k).dtype == torch.float16 for k in keys)
    assert keys and all(k.startswith("lora_unet_") and "." not in k.split(".lora_")[0] for k in keys)
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight")) for k in keys)
    assert oct(out.stat().st_mode & 0o777) == oct(0o644)
    assert sorted(p.name for p in out.parent.iterdir()) == ["lora.safetensors"]  # no temporary left
    before = out.read_bytes()
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        export_lora(file, out, overwrite=False)
    assert out.read_bytes() == before
    export_lora(file, out, format="diffusers")  # overwrite=True by default
    assert all(k.startswith("unet.") for k in load_file(out))


def test_the_report_table_lists_each_layer_and_the_largest_error(tmp_path):
    _, file = _tuner_file(tmp_path, "surm_circulant")
    report = export_lora(file, tmp_path / "lora.safetensors", rank=2)
    table = report.format_table().splitlines()
    assert table[:2] == ["| layer | d_out x d_in | rank | relative error | bias |", "|---|---|---|---|---|"]
    first = report.layers[0]
    assert table[2] == (
        f"| {first.path} | {first.shape[0]} x {first.shape[1]} | 2 | {first.relative_error:.3e} | no |"
    )
    assert len(table) == 2 + len(report.layers) + 2
    assert report.max_relative_error == max(layer.relative_error for layer in report.layers) > 0
    assert table[-1] == (
        f"{len(report.layers)} layer(s) of surm_circulant written to {report.out_file} (diffusers format); "
        f"largest relative error {report.max_relative_error:.3e}"
    )
    assert ExportReport(out_file=report.out_file, format="diffusers", tuner="x").max_relative_error == 0.0


def test_the_base_is_read_alike_from_a_module_a_file_and_a_sharded_folder(tmp_path):
    unet, file = _tuner_file(tmp_path, "glora")
    state = {k: v.contiguous() for k, v in frozen_tiny_unet().state_dict().items()}
    single = tmp_path / "single" / "diffusion_pytorch_model.safetensors"
    single.parent.mkdir()
    save_file(state, str(single))
    sharded = tmp_path / "sharded" / "unet"
    sharded.mkdir(parents=True)
    keys = sorted(state)
    halves = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2 :]}
    for name, part in halves.items():
        save_file({k: state[k] for k in part}, str(sharded / name))
    weight_map = {k: name for name, part in halves.items() for k in part}
    (sharded / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    # a folder holding the plain file and a variant reads the plain one
    variant = tmp_path / "variant"
    variant.mkdir()
    save_file(state, str(variant / "diffusion_pytorch_model.safetensors"))
    save_file(
        {k: torch.zeros_like(v) for k, v in state.items()}, str(variant / "diffusion_pytorch_model.fp16.safetensors")
    )

    results = []
    for base in (unet, single, single.parent, tmp_path / "sharded", variant):
        report = export_lora(file, tmp_path / "out.safetensors", base=base)
        results.append(load_file(report.out_file))
    _check_branches(unet, results[0], "parallel")
    for other in results[1:]:
        assert other.keys() == results[0].keys() and all(torch.equal(other[k], results[0][k]) for k in other)

    reader = load_base_weights(tmp_path / "sharded")
    path = next(p for p, _ in iter_tuners(unet, "default") if unet.get_submodule(p).bias is not None)
    weight, bias = reader(path)
    assert torch.equal(weight, state[f"{path}.weight"]) and torch.equal(bias, state[f"{path}.bias"])
    no_bias = next(p for p, _ in iter_tuners(unet, "default") if unet.get_submodule(p).bias is None)
    assert reader(no_bias)[1] is None
    with pytest.raises(rd.ResTunerFileError, match="have no nowhere.weight"):
        reader("nowhere")
    with pytest.raises(rd.ResTunerFileError, match="the base model has no layer 'nowhere'"):
        load_base_weights(unet)("nowhere")


def test_an_ambiguous_or_missing_base_is_refused_naming_what_was_found(tmp_path):
    _, file = _tuner_file(tmp_path, "glora")
    two = tmp_path / "two"
    two.mkdir()
    for name in ("x.safetensors", "y.safetensors"):
        save_file({"w": torch.zeros(1)}, str(two / name))
    with pytest.raises(rd.ResTunerFileError, match=r"holds 2 safetensors files \['x.safetensors', 'y.safetensors'\]"):
        export_lora(file, tmp_path / "out.safetensors", base=two)
    with pytest.raises(TypeError, match="base must be a path, a pipeline or a UNet module, got int"):
        load_base_weights(3)
    assert not (tmp_path / "out.safetensors").exists()


def test_a_transformer_tuner_exports_with_transformer_keys_and_not_as_kohya(tmp_path):
    from resattn_diffusion.testing import tiny_sd3_transformer

    model = tiny_sd3_transformer()
    rd.add_res_tuner(model, rd.ResTunerConfig(tuner="res_lora", rank=2))
    randomize_tuner(model, std=0.2)
    file = rd.save_res_tuner(model, tmp_path / "t.safetensors")
    report = export_lora(file, tmp_path / "lora.safetensors")
    keys = list(load_file(report.out_file))
    assert keys and all(k.startswith("transformer.") for k in keys)
    with pytest.raises(rd.ResTunerError, match="this tuner sits on a SD3Transformer2DModel"):
        export_lora(file, tmp_path / "kohya.safetensors", format="kohya")
    assert not (tmp_path / "kohya.safetensors").exists()


def test_the_command_reports_errors_on_stderr_with_exit_code_2(tmp_path, capsys, monkeypatch):
    _, file = _tuner_file(tmp_path, "res_lora", placement="sequential")
    out = tmp_path / "o.safetensors"
    assert main([str(file), str(out)]) == 2
    assert "resattn-export: error:" in capsys.readouterr().err and not out.exists()
    assert main([str(file), str(out), "--base", str(tmp_path / "nothing")]) == 2
    assert "no base model at" in capsys.readouterr().err
    assert not out.exists()
    _tuner_file(tmp_path, "res_lora", name="p")
    monkeypatch.chdir(tmp_path)  # relative paths are read from the working folder
    assert main([".", "rel.safetensors", "--weight_name", "p.safetensors", "--rank", "1"]) == 0
    assert "| 1 |" in capsys.readouterr().out and (tmp_path / "rel.safetensors").exists()
    assert main([".", "rel.safetensors", "--weight_name", "p.safetensors", "--no_overwrite"]) == 2
    assert "exists" in capsys.readouterr().err


def test_a_rank_at_least_the_tuners_own_is_exact_and_a_zero_delta_has_no_error(tmp_path):
    unet, file = _tuner_file(tmp_path, "res_lora", rank=3)
    saved = load_file(file)
    for rank in (3, 5):  # the factors as they are, no SVD rounding
        report = export_lora(file, tmp_path / f"r{rank}.safetensors", rank=rank)
        exported = load_file(report.out_file)
        assert {layer.rank for layer in report.layers} == {3} and report.max_relative_error == 0.0
        path = report.layers[0].path
        assert torch.equal(_lora_of(exported, path)[0], saved[f"{path}.lora_A.weight"])
    untrained = frozen_tiny_unet()
    rd.add_res_tuner(untrained, rd.ResTunerConfig(tuner="surm_circulant", targets=("attn2",)))  # zero at init
    zero = rd.save_res_tuner(untrained, tmp_path / "zero.safetensors")
    report = export_lora(zero, tmp_path / "z.safetensors", rank=1)
    assert [layer.relative_error for layer in report.layers] == [0.0] * len(report.layers)


def test_a_glora_supernet_is_refused_until_a_configuration_is_picked(tmp_path):
    _, file = _tuner_file(tmp_path, "glora", supernet=True)
    with pytest.raises(rd.ResTunerError, match="is a GLoRA supernet .* resattn-glora-search first"):
        export_lora(file, tmp_path / "lora.safetensors", base=frozen_tiny_unet())
    assert not (tmp_path / "lora.safetensors").exists()


def test_a_file_without_base_or_layers_metadata(tmp_path):
    unet, file = _tuner_file(tmp_path, "res_lora")
    with safe_open(str(file), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    no_base = tmp_path / "no_base.safetensors"
    save_file(tensors, str(no_base), metadata={k: v for k, v in metadata.items() if k != "base"})
    report = export_lora(no_base, tmp_path / "a.safetensors")  # an older file: a UNet is assumed
    assert all(k.startswith("unet.") for k in load_file(report.out_file))
    no_layers = tmp_path / "no_layers.safetensors"
    save_file(tensors, str(no_layers), metadata={k: v for k, v in metadata.items() if k != "layers"})
    with pytest.raises(rd.ResTunerFileError, match="lists no layers in its metadata"):
        export_lora(no_layers, tmp_path / "b.safetensors")


def test_the_command_help_names_the_program_and_what_each_option_does(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert text.startswith("usage: resattn-export ")
    for words in (
        "Export a Res-LoRA, GLoRA or SURM tuner as a diffusers or kohya LoRA file",
        "tuner the tuner file, or the training output folder holding res_tuner.safetensors",
        "out the LoRA .safetensors file to write",
        "truncate each layer to this rank (default: exact)",
        "the base model's local folder",
        "the tuner file inside a folder, if not res_tuner.safetensors",
        "--no_overwrite refuse to replace an existing OUT",
    ):
        assert words in text
