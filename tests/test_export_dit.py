"""Export of weight-space tuners on the diffusion transformers (SD3, Flux) as diffusers LoRA files.

The file holds ``transformer.<layer>.lora_A/B`` keys that the stock pipelines' ``load_lora_weights`` read, and the
LoRA-loaded transformer gives the tuned transformer's output. ``base`` (GLoRA, sequential placement) is the saved
pipeline folder as for a UNet: its ``transformer/`` folder is read. Before, a pipeline folder given as the base of
a transformer tuner raised diffusers' raw OSError ("no file named config.json"), since only ``unet/`` was looked for.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import resattn_diffusion as rd
from resattn_diffusion.integration.export import export_lora, main
from resattn_diffusion.testing import (
    model_inputs,
    randomize_tuner,
    save_tiny_dit_pipeline,
    save_tiny_pipeline,
    tiny_dit_pipeline,
)

KINDS = ("sd3", "flux")
#: (tuner, config settings): a low-rank product, a base-dependent delta with bias terms, a full-rank structured one,
#: and a sequential one (``dW W0``)
TUNERS = {
    "res_lora": {"rank": 2},
    "res_lora sequential": {"tuner": "res_lora", "rank": 2, "placement": "sequential"},
    "glora": {},
    "surm_ldr": {},
}


@pytest.fixture(scope="module")
def pipeline_folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dit_pipelines")
    return {kind: save_tiny_dit_pipeline(kind, root / kind) for kind in KINDS}


def _tuned_file(kind: str, case: str, folder: Path) -> tuple[Path, dict, torch.Tensor]:
    """A tuner of ``case`` on the tiny ``kind`` transformer, saved; the inputs and the tuned output."""
    transformer = tiny_dit_pipeline(kind).transformer
    settings = dict(TUNERS[case])
    rd.add_res_tuner(transformer, rd.ResTunerConfig(settings.pop("tuner", case), **settings))
    randomize_tuner(transformer, std=0.3)
    inputs = model_inputs(transformer)
    with torch.no_grad():
        tuned = transformer(**inputs)[0]
    return rd.save_res_tuner(transformer, folder / f"{kind}_{case.replace(' ', '_')}.safetensors"), inputs, tuned


@pytest.mark.parametrize("case", list(TUNERS))
@pytest.mark.parametrize("kind", KINDS)
def test_an_exported_transformer_tuner_loads_with_load_lora_weights_and_gives_the_tuned_output(
    tmp_path, pipeline_folders, kind, case
):
    file, inputs, tuned = _tuned_file(kind, case, tmp_path)
    report = export_lora(file, tmp_path / "lora.safetensors", base=pipeline_folders[kind])
    keys = list(load_file(report.out_file))
    assert keys and all(key.startswith("transformer.") for key in keys)
    pipe = tiny_dit_pipeline(kind)
    with torch.no_grad():
        base = pipe.transformer(**inputs)[0]
    pipe.load_lora_weights(str(report.out_file))
    with torch.no_grad():
        loaded = pipe.transformer(**inputs)[0]
    assert (tuned - base).abs().max() > 1e-2  # the tuner does something the LoRA has to reproduce
    torch.testing.assert_close(loaded, tuned, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_every_form_of_the_base_gives_the_same_file(tmp_path, pipeline_folders, kind):
    """The pipeline folder, its transformer folder, the weights file in it, the pipeline and its transformer."""
    file, _, _ = _tuned_file(kind, "glora", tmp_path)
    folder = pipeline_folders[kind]
    pipe = tiny_dit_pipeline(kind)
    weights = next((folder / "transformer").glob("*.safetensors"))
    bases = [folder, folder / "transformer", weights, pipe, pipe.transformer, str(folder)]
    written = [
        load_file(export_lora(file, tmp_path / f"out{i}.safetensors", base=b).out_file) for i, b in enumerate(bases)
    ]
    for other in written[1:]:
        assert other.keys() == written[0].keys() and all(torch.equal(other[k], written[0][k]) for k in other)
    assert any(key.endswith("lora_B.bias") for key in written[0])  # GLoRA's bias terms went through


def test_a_wrong_base_is_refused_naming_what_to_pass_and_nothing_is_written(tmp_path, pipeline_folders):
    file, _, _ = _tuned_file("flux", "glora", tmp_path)
    out = tmp_path / "out.safetensors"
    # an SD pipeline folder: it has unet/, not the transformer/ the tuner reads
    sd_folder = save_tiny_pipeline("sd1", tmp_path / "sd1")
    with pytest.raises(rd.ResTunerFileError, match="pipeline folder without a transformer/ folder"):
        export_lora(file, out, base=sd_folder)
    # a folder with nothing diffusers can read: our error, not diffusers' OSError
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(rd.ResTunerFileError, match="holds no Flux transformer diffusers can read"):
        export_lora(file, out, base=empty)
    # the other transformer family's pipeline: its layers do not fit
    with pytest.raises(rd.ResTunerFileError, match="pass the base model it was trained on|not the model the tuner"):
        export_lora(file, out, base=pipeline_folders["sd3"])
    with pytest.raises(rd.ResTunerError, match=r"needs the base model's weights .*its transformer folder"):
        export_lora(file, out)
    from resattn_diffusion.testing import tiny_pipeline

    with pytest.raises(rd.ResTunerFileError, match="StableDiffusionPipeline, which has no pipe.transformer"):
        export_lora(file, out, base=tiny_pipeline("sd1"))
    with pytest.raises(TypeError, match="base must be a path, a pipeline or a Flux transformer module, got int"):
        export_lora(file, out, base=3)
    assert not out.exists()


def test_the_command_exports_a_flux_tuner_with_the_pipeline_folder_as_base(tmp_path, pipeline_folders, capsys):
    file, _, _ = _tuned_file("flux", "glora", tmp_path)
    out = tmp_path / "cli.safetensors"
    assert main([str(file), str(out), "--base", str(pipeline_folders["flux"])]) == 0
    assert "written to" in capsys.readouterr().out and out.exists()
    assert main([str(file), str(tmp_path / "x.safetensors"), "--base", str(tmp_path)]) == 2
    assert "resattn-export: error:" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["sd1", "flux"])
def test_a_bin_only_model_folder_is_read_by_the_family_model_class(tmp_path, kind):
    """A folder of ``diffusion_pytorch_model.bin`` (no safetensors) is loaded through diffusers as the tuner's own
    model class: ``UNet2DConditionModel`` for a UNet tuner, ``FluxTransformer2DModel`` for a Flux one."""
    from resattn_diffusion.testing import tiny_pipeline

    pipe = tiny_pipeline(kind) if kind == "sd1" else tiny_dit_pipeline(kind)
    model = pipe.unet if kind == "sd1" else pipe.transformer
    model.save_pretrained(tmp_path / "bin_only", safe_serialization=False)
    assert not list((tmp_path / "bin_only").glob("*.safetensors"))
    rd.add_res_tuner(model, rd.ResTunerConfig("glora"))
    randomize_tuner(model, std=0.3)
    file = rd.save_res_tuner(model, tmp_path / "t.safetensors")
    from_folder = load_file(export_lora(file, tmp_path / "a.safetensors", base=tmp_path / "bin_only").out_file)
    fresh = tiny_pipeline(kind) if kind == "sd1" else tiny_dit_pipeline(kind)
    from_pipe = load_file(export_lora(file, tmp_path / "b.safetensors", base=fresh).out_file)
    assert from_folder.keys() == from_pipe.keys() and all(torch.equal(from_folder[k], from_pipe[k]) for k in from_pipe)
