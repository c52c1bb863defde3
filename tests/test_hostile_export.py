"""``export_lora`` / ``resattn-export`` with crafted tuner files and output paths (an attacker's pass): each ends in
our own error naming the file and the field, and the tuner file is never replaced.

The README's "What is refused and why" table has one row per case.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

import resattn_diffusion as rd
from resattn_diffusion.integration.export import export_lora
from resattn_diffusion.testing import frozen_tiny_unet, randomize_tuner


@pytest.fixture
def tuner_file(tmp_path: Path) -> Path:
    unet = frozen_tiny_unet("sd1")
    rd.add_res_tuner(unet, rd.ResTunerConfig(tuner="res_lora"))
    randomize_tuner(unet, seed=1, std=0.2)
    return rd.save_res_tuner(unet, tmp_path / "tuner.safetensors")


def _layers_with(layers: dict, **fields) -> str:
    return json.dumps({path: {**shape, **fields} for path, shape in layers.items()})


def test_crafted_metadata_is_refused_naming_the_field(tuner_file: Path, tmp_path: Path):
    """``base`` / ``layers`` that are not JSON objects, or layer shapes with a negative, text or non-bool value,
    were raw ``JSONDecodeError`` / ``AttributeError`` / ``RuntimeError`` (load_res_tuner already refused them)."""
    with safe_open(str(tuner_file), framework="pt") as f:
        metadata = dict(f.metadata())
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    layers = json.loads(metadata["layers"])
    variants = {
        "base": ["{not json", "[1]"],
        "layers": ["{not json", "[1, 2]", _layers_with(layers, in_dim=-5), _layers_with(layers, out_dim="32")],
        "has_bias": [_layers_with(layers, has_bias="no")],
    }
    for field, values in variants.items():
        key = "layers" if field == "has_bias" else field
        for value in values:
            crafted = tmp_path / "crafted.safetensors"
            save_file(tensors, str(crafted), metadata={**metadata, key: value})
            with pytest.raises(rd.ResTunerFileError, match=rf"crafted\.safetensors.*{field}"):
                export_lora(crafted, tmp_path / "lora.safetensors")
    assert not (tmp_path / "lora.safetensors").exists()


def test_exporting_onto_the_tuner_file_itself_is_refused(tuner_file: Path, tmp_path: Path):
    """``resattn-export tuner.safetensors tuner.safetensors`` replaced the tuner with its LoRA export, for good."""
    before = tuner_file.read_bytes()
    link = tmp_path / "link.safetensors"
    link.symlink_to(tuner_file)
    for out in (tuner_file, link):
        with pytest.raises(rd.ResTunerFileError, match="is the tuner file being exported"):
            export_lora(tuner_file, out)
    with pytest.raises(rd.ResTunerFileError, match="is the tuner file being exported"):
        export_lora(tmp_path, tuner_file, weight_name="tuner.safetensors")  # the folder form names the same file
    assert tuner_file.read_bytes() == before


def test_an_output_path_that_cannot_be_a_file_is_our_error(tuner_file: Path, tmp_path: Path):
    """A folder named ``*.safetensors`` was a raw ``IsADirectoryError`` (after the whole export was computed), a
    parent that is a file a raw ``FileExistsError``, a NUL byte in the path a raw ``ValueError``."""
    folder = tmp_path / "out.safetensors"
    folder.mkdir()
    with pytest.raises(rd.ResTunerFileError, match="is a folder"):
        export_lora(tuner_file, folder)
    blocker = tmp_path / "a_file"
    blocker.write_text("untouched")
    with pytest.raises(rd.ResTunerFileError, match="cannot create its folder"):
        export_lora(tuner_file, blocker / "lora.safetensors")
    assert blocker.read_text() == "untouched"
    with pytest.raises(rd.ResTunerFileError, match="NUL byte"):  # was a raw "ValueError: embedded null byte"
        export_lora(tuner_file, str(tmp_path / "a\x00b.safetensors"))
