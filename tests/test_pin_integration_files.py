"""Pins of the tuner file (``integration/io.py``): the header-size checks at their exact boundaries, the message of a
file that does not fit, the adapter name a load picks, the rollback of a failed install, what a refused save says,
and which temporaries of interrupted saves are removed (issue 18, part 4)."""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import resattn_diffusion as rd
from resattn_diffusion.integration import io as tuner_io
from resattn_diffusion.testing import frozen_tiny_unet, randomize_tuner

LORA = rd.ResTunerConfig(tuner="res_lora", rank=2, targets=["attn2"])


def _unet_with(name: str = "default", config: rd.ResTunerConfig = LORA, kind: str = "sd1", seed: int = 0):
    unet = frozen_tiny_unet(kind)
    rd.add_res_tuner(unet, config, name)
    randomize_tuner(unet, name, seed=seed)
    return unet


def _weights(unet, name: str = "default") -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in tuner_io.res_tuner_state_dict(unet, name).items()}


def _header_file(path: Path, header: bytes, data: bytes = b"") -> Path:
    """A safetensors-shaped file: 8-byte little-endian header length, the header, the data."""
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def _tuner_metadata() -> dict[str, str]:
    return {"format": tuner_io.FORMAT_NAME, "format_version": str(tuner_io.FORMAT_VERSION)}


# --- the header's size ------------------------------------------------------------------------------------------
def test_a_header_that_fills_the_file_exactly_is_read_and_one_byte_less_is_truncated(tmp_path):
    # a file of metadata and no tensors: 8 + header bytes is the whole file, the exact boundary of the size check
    path = tmp_path / "empty.safetensors"
    save_file({}, str(path), metadata=_tuner_metadata())
    (header_bytes,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert path.stat().st_size == 8 + header_bytes
    file, metadata, entries = tuner_io.read_tuner_header(path)
    assert file == path and metadata["format"] == tuner_io.FORMAT_NAME and entries == {}

    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(tuner_io.ResTunerFileError, match="truncated") as err:
        tuner_io.read_tuner_header(cut)
    assert f"{header_bytes:,} bytes" in str(err.value) and f"has {header_bytes + 7:,}" in str(err.value)


def test_the_largest_allowed_header_is_parsed_and_one_byte_more_is_refused_unread(tmp_path):
    text = json.dumps({"__metadata__": _tuner_metadata()}).encode()
    largest = text + b" " * (tuner_io.MAX_HEADER_BYTES - len(text))  # safetensors pads headers with spaces
    file, metadata, entries = tuner_io.read_tuner_header(_header_file(tmp_path / "big.safetensors", largest))
    assert metadata["format"] == tuner_io.FORMAT_NAME and entries == {}

    too_big = _header_file(tmp_path / "too_big.safetensors", largest + b" ")
    with pytest.raises(tuner_io.ResTunerFileError, match="header of 16,777,217 bytes") as err:
        tuner_io.read_tuner_header(too_big)
    assert "at most 16,777,216" in str(err.value)


def test_a_file_shorter_than_the_length_field_is_refused(tmp_path):
    for size in (0, 7):
        path = tmp_path / f"short{size}.safetensors"
        path.write_bytes(b"\x01" * size)
        with pytest.raises(tuner_io.ResTunerFileError, match=f"{size} bytes, shorter than a header"):
            tuner_io.read_tuner_header(path)
    # 8 bytes is a length field and an empty header: past the size check, refused by the parser
    path = _header_file(tmp_path / "eight.safetensors", b"")
    with pytest.raises(tuner_io.ResTunerFileError, match="not a readable safetensors file"):
        tuner_io.read_tuner_header(path)


@pytest.mark.parametrize(
    ("version", "match"),
    [
        ("2", "format version 2; this resattn-diffusion reads up to 1"),
        ("0", "versions start at 1"),
        ("1.0", "must be a whole number"),
        ("", "must be a whole number"),
        ("\u0661", "must be a whole number"),
    ],
)
def test_format_versions_other_than_1_are_refused(tmp_path, version, match):
    path = tmp_path / "v.safetensors"
    save_file({}, str(path), metadata={**_tuner_metadata(), "format_version": version})
    with pytest.raises(tuner_io.ResTunerFileError, match=match):
        tuner_io.read_tuner_header(path)


def test_integer_tensors_are_refused_naming_the_tensor_and_the_allowed_dtypes(tmp_path):
    path = tmp_path / "ints.safetensors"
    save_file(
        {"a.weight": torch.zeros(2), "b.weight": torch.zeros(2, dtype=torch.int64)},
        str(path),
        metadata=_tuner_metadata(),
    )
    with pytest.raises(tuner_io.ResTunerFileError, match=r"'b\.weight' has dtype I64.*F16, BF16, F32, F64"):
        tuner_io.read_tuner_header(path)


# --- a file that does not fit: what the message says -------------------------------------------------------------
def test_the_mismatch_message_names_both_bases_and_each_differing_layer(tmp_path):
    source = _unet_with()
    source.register_to_config(_name_or_path="my/base-model")
    path = rd.save_res_tuner(source, tmp_path / "t.safetensors")
    with safe_open(str(path), framework="pt") as f:
        saved = json.loads(f.metadata()["layers"])
    target = frozen_tiny_unet("sd2")  # same layers, other context width and heads
    with pytest.raises(rd.ResTunerFileError) as err:
        rd.load_res_tuner(target, path)
    lines = str(err.value).splitlines()
    assert lines[0] == f"tuner file {str(path)!r} does not fit this UNet."
    assert lines[1] == (
        "  made for: UNet2DConditionModel my/base-model, block_out_channels=[32, 64], cross_attention_dim=32, "
        "addition_embed_type=None"
    )
    assert lines[2] == (
        "  this UNet: UNet2DConditionModel (unnamed), block_out_channels=[32, 64], cross_attention_dim=48, "
        "addition_embed_type=None"
    )
    # the key and value projections of every attn2 read the context (width 32 -> 48): three shown, the rest counted
    layers = [layer for layer in saved if layer.endswith(("attn2.to_k", "attn2.to_v"))]
    assert len(saved) == 16 and len(layers) == 8
    shown = [line for line in lines if line.startswith("  layer ")]
    assert len(shown) == 3
    for line, layer in zip(shown, layers[:3]):
        assert line.startswith(f"  layer {layer}: file {saved[layer]}, this UNet {{")
        assert "'in_dim': 48" in line.split("this UNet")[1]
    assert lines[-2] == "  ... and 5 more layer(s) with other shapes"
    assert lines[-1] == "Load it into the base model it was trained on."
    assert not any("do not exist here" in line or "not in the file" in line for line in lines)
    assert rd.get_res_tuner_configs(target) == {}


def test_the_mismatch_message_counts_missing_and_extra_layers(tmp_path):
    path = rd.save_res_tuner(_unet_with(), tmp_path / "t.safetensors")
    with safe_open(str(path), framework="pt") as f:
        saved = list(json.loads(f.metadata()["layers"]))  # in the file's order
    projections = {layer.split(".attn2.")[1] for layer in saved}
    target = frozen_tiny_unet("sdxl")
    here = [name for name, _ in target.named_modules() if name.partition(".attn2.")[2] in projections]
    missing, extra = [p for p in saved if p not in here], [p for p in here if p not in saved]
    assert missing and extra
    with pytest.raises(rd.ResTunerFileError) as err:
        rd.load_res_tuner(target, path)
    message = str(err.value)
    assert f"  {len(missing)} layer(s) of the file do not exist here, e.g. {missing[0]}\n" in message
    assert f"  {len(extra)} layer(s) here are not in the file, e.g. {extra[0]}\n" in message
    assert "made for: UNet2DConditionModel (unnamed), block_out_channels=[32, 64]" in message
    assert "addition_embed_type=text_time" in message
    assert "family=" not in message and "class=" not in message and "name_or_path=" not in message


def test_a_file_of_another_family_names_both_kinds_of_model(tmp_path):
    path = rd.save_res_tuner(_unet_with(), tmp_path / "t.safetensors")
    from resattn_diffusion.testing import tiny_sd3_transformer

    target = tiny_sd3_transformer()
    with pytest.raises(rd.ResTunerFileError) as err:
        rd.load_res_tuner(target, path)
    message = str(err.value)
    assert "was made for a UNet2DConditionModel (UNet), not for this SD3Transformer2DModel" in message
    assert rd.get_res_tuner_configs(target) == {}


# --- the adapter name a load picks -------------------------------------------------------------------------------
def test_a_load_uses_the_given_name_else_the_saved_one_else_default(tmp_path):
    source = _unet_with("style")
    path = rd.save_res_tuner(source, tmp_path / "t.safetensors", adapter_name="style")
    target = frozen_tiny_unet()
    assert rd.load_res_tuner(target, path) == "style"
    assert rd.load_res_tuner(target, path, adapter_name="other") == "other"
    assert list(rd.get_res_tuner_configs(target)) == ["style", "other"]
    for name in ("style", "other"):
        assert all(torch.equal(_weights(target, name)[k], v) for k, v in _weights(source, "style").items())

    # a file without a saved name loads as "default"
    with safe_open(str(path), framework="pt") as f:
        metadata = {k: v for k, v in f.metadata().items() if k != "adapter_name"}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    nameless = tmp_path / "nameless.safetensors"
    save_file(tensors, str(nameless), metadata=metadata)
    assert rd.load_res_tuner(target, nameless) == "default"
    with pytest.raises(rd.ResTunerError, match="a tuner named 'default' is already loaded"):
        rd.load_res_tuner(target, nameless)
    assert list(rd.get_res_tuner_configs(target)) == ["style", "other", "default"]


def test_a_bad_saved_adapter_name_is_a_file_error_naming_the_file(tmp_path):
    path = rd.save_res_tuner(_unet_with(), tmp_path / "t.safetensors")
    with safe_open(str(path), framework="pt") as f:
        metadata = {**f.metadata(), "adapter_name": "a.b"}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=metadata)
    target = frozen_tiny_unet()
    for name in (None, "fine"):  # a corrupt name is refused even when another name is given
        with pytest.raises(rd.ResTunerFileError, match="the adapter name in the metadata of .*'a.b' is not allowed"):
            rd.load_res_tuner(target, bad, adapter_name=name)
    assert rd.get_res_tuner_configs(target) == {}


# --- a failed install is rolled back, and only it ---------------------------------------------------------------
@pytest.mark.parametrize("from_state_dict", [False, True])
def test_a_failed_copy_removes_only_the_new_tuner(tmp_path, monkeypatch, from_state_dict):
    source = _unet_with(seed=1)
    path = rd.save_res_tuner(source, tmp_path / "t.safetensors")
    target = _unet_with("kept", seed=2)
    kept = _weights(target, "kept")
    processors = {k: type(v) for k, v in target.attn_processors.items()}

    def failing_copy(*args, **kwargs):
        raise RuntimeError("disk vanished mid-copy")

    monkeypatch.setattr(tuner_io, "load_tuner_tensors", failing_copy)
    with pytest.raises(RuntimeError, match="disk vanished"):
        if from_state_dict:
            rd.load_res_tuner(target, _weights(source), adapter_name="new", config=LORA)
        else:
            rd.load_res_tuner(target, path, adapter_name="new")
    assert list(rd.get_res_tuner_configs(target)) == ["kept"]
    assert all(torch.equal(_weights(target, "kept")[k], v) for k, v in kept.items())
    assert {k: type(v) for k, v in target.attn_processors.items()} == processors


# --- a refused save says what is loaded --------------------------------------------------------------------------
def test_saving_a_name_that_is_not_loaded_lists_the_loaded_ones_and_writes_nothing(tmp_path):
    unet = _unet_with("style")
    rd.add_res_tuner(unet, LORA, "extra")
    for name in ("default", 3, None):
        with pytest.raises(rd.ResTunerError) as err:
            rd.save_res_tuner(unet, tmp_path, adapter_name=name)
        assert f"no tuner named {name!r} on this model to save" in str(err.value)
        assert "loaded tuners (adapter names): ['style', 'extra']" in str(err.value)
    with pytest.raises(rd.ResTunerError, match=r"loaded tuners \(adapter names\): \[\]"):
        rd.save_res_tuner(frozen_tiny_unet(), tmp_path)
    assert list(tmp_path.iterdir()) == []
    written = rd.save_res_tuner(unet, tmp_path, adapter_name="extra")
    with safe_open(str(written), framework="pt") as f:
        assert f.metadata()["adapter_name"] == "extra"


def test_a_saved_file_round_trips_every_tensor_and_its_config_exactly(tmp_path):
    source = _unet_with("style", rd.ResTunerConfig(tuner="res_lora", rank=3, targets=["attn1", "attn2"], scale=0.5))
    path = rd.save_res_tuner(source, tmp_path / "sub" / "x.safetensors", adapter_name="style")
    assert path == tmp_path / "sub" / "x.safetensors"
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~tuner_io._umask())
    metadata, tensors = tuner_io.read_tuner_file(path)
    assert rd.ResTunerConfig.from_json(metadata["config"]) == rd.get_res_tuner_configs(source)["style"]
    assert json.loads(metadata["base"])["family"] == "unet"
    assert tensors.keys() == _weights(source, "style").keys()
    assert all(torch.equal(tensors[k], v) for k, v in _weights(source, "style").items())
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        rd.save_res_tuner(source, path, adapter_name="style", overwrite=False)


# --- temporaries of interrupted saves -----------------------------------------------------------------------------
def _aged(path: Path, seconds: float) -> Path:
    path.write_bytes(b"half a tuner")
    past = time.time() - seconds
    os.utime(path, (past, past))
    return path


def test_the_host_part_of_a_temporary_name_is_the_hostname_made_safe(tmp_path, monkeypatch):
    monkeypatch.setattr(tuner_io.socket, "gethostname", lambda: "Node_7.Cluster.example")
    assert tuner_io._temporary_prefix("t.safetensors") == f".t.safetensors.rt-Node-7-Cluster-example-{os.getpid()}-"
    monkeypatch.setattr(tuner_io.socket, "gethostname", lambda: "h" * 100)
    assert tuner_io._temporary_prefix("t.safetensors") == f".t.safetensors.rt-{'h' * 64}-{os.getpid()}-"


def test_stale_temporaries_go_past_any_number_of_other_files(tmp_path, monkeypatch):
    monkeypatch.setattr(tuner_io.socket, "gethostname", lambda: "my_host.local")
    dead = 2**22 + 12345  # above Linux's default pid_max: no such process
    assert not tuner_io._process_alive(dead)
    # other files, a folder named like a temporary, fresh temporaries: all stay, in whatever order scandir lists them
    keep = [_aged(tmp_path / f"notes{i}.txt", 7200) for i in range(12)]
    keep.append(_aged(tmp_path / ".t.safetensors.rt-my-host-local-99-abcdefgh.tmp.bak", 7200))
    keep.append(_aged(tmp_path / f".t.safetensors.rt-my-host-local-{os.getpid()}-abcdefgh.tmp", 7200))  # mine
    keep.append(_aged(tmp_path / f".t.safetensors.rt-my-host-local-{dead}-young___.tmp", 1))  # within the grace
    keep.append(_aged(tmp_path / ".t.safetensors.rt-otherhost-1-abcdefgh.tmp", 1800))  # writer unknown, young
    keep.append(_aged(tmp_path / ".t.safetensors.abcdefgh.tmp", 1800))  # old format, young
    (tmp_path / ".u.safetensors.rt-otherhost-1-folder__.tmp").mkdir()
    stale = [
        _aged(tmp_path / f".t.safetensors.rt-my-host-local-{dead}-abcdefgh.tmp", 60),
        _aged(tmp_path / ".t.safetensors.rt-otherhost-1-abcdefg2.tmp", 7200),
        _aged(tmp_path / ".t.safetensors.abcdefg3.tmp", 7200),
    ]
    removed = tuner_io.remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted(stale)
    assert all(p.exists() for p in keep) and not any(p.exists() for p in stale)
    assert (tmp_path / ".u.safetensors.rt-otherhost-1-folder__.tmp").is_dir()
    assert tuner_io.remove_stale_temporaries(tmp_path / "no-such-folder") == []


def test_a_temporary_that_cannot_be_removed_stays_and_the_others_still_go(tmp_path, monkeypatch):
    stale = [_aged(tmp_path / f".t.safetensors.rt-otherhost-1-abcdefg{i}.tmp", 7200) for i in range(6)]
    real_unlink, refused = os.unlink, []

    def unlink(path, *args, **kwargs):
        if not refused:  # the first one scandir lists cannot be removed (another owner, a read-only mount)
            refused.append(Path(path))
            raise PermissionError(13, "Permission denied", str(path))
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    removed = tuner_io.remove_stale_temporaries(tmp_path)
    assert len(refused) == 1 and refused[0].exists()
    assert sorted(removed) == sorted(p for p in stale if p != refused[0])


# --- names, folders, and files that change or lie -----------------------------------------------------------------
@pytest.mark.parametrize("weight_name", [".", "..", "", "a/b.safetensors", 3])
def test_a_weight_name_that_is_not_a_file_in_the_folder_is_refused(tmp_path, weight_name):
    rd.save_res_tuner(_unet_with(), tmp_path / "sub")
    with pytest.raises(tuner_io.ResTunerFileError, match="weight_name must be the name of a file inside the folder"):
        tuner_io.read_tuner_header(tmp_path / "sub", weight_name=weight_name)


def test_a_save_creates_every_missing_folder(tmp_path):
    path = rd.save_res_tuner(_unet_with(), tmp_path / "a" / "b" / "c")
    assert path == tmp_path / "a" / "b" / "c" / tuner_io.WEIGHT_NAME and path.is_file()
    again = rd.save_res_tuner(_unet_with(seed=3), tmp_path / "a" / "b" / "c")  # into the existing folder
    assert again == path


def test_a_file_replaced_while_it_is_loaded_is_refused_and_nothing_is_loaded(tmp_path, monkeypatch):
    path = rd.save_res_tuner(_unet_with(), tmp_path / "t.safetensors")
    other = rd.save_res_tuner(
        _unet_with(config=rd.ResTunerConfig(tuner="res_lora", rank=3, targets=["attn2"])), tmp_path / "o.safetensors"
    )
    checked = tuner_io._check_against_plan

    def check_then_swap(*args):  # the header was read and checked; now another process replaces the file
        checked(*args)
        os.replace(other, path)

    monkeypatch.setattr(tuner_io, "_check_against_plan", check_then_swap)
    target = frozen_tiny_unet()
    with pytest.raises(tuner_io.ResTunerFileError, match="changed while it was read; load it again"):
        rd.load_res_tuner(target, path)
    assert rd.get_res_tuner_configs(target) == {}


def test_weights_and_config_that_disagree_are_refused_naming_the_tuner_and_its_hyperparameters(tmp_path):
    path = rd.save_res_tuner(_unet_with(), tmp_path / "t.safetensors")
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    claims = rd.ResTunerConfig(tuner="res_lora", rank=4, targets=["attn2"])  # the tensors are rank 2
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={**metadata, "config": claims.to_json(indent=None)})
    target = frozen_tiny_unet()
    with pytest.raises(tuner_io.ResTunerFileError) as err:
        rd.load_res_tuner(target, bad)
    message = str(err.value)
    assert "but the res_lora its config describes (hyperparameters {" in message and "'rank': 4" in message
    assert "the config and the weights disagree" in message and str(bad) in message
    assert rd.get_res_tuner_configs(target) == {}


@pytest.mark.parametrize(("value", "match"), [(float("nan"), "holds NaN or inf"), (1e6, "holds values up to 1e\\+06")])
def test_bad_weight_values_are_refused_naming_the_file_and_the_tensor(tmp_path, value, match):
    path = rd.save_res_tuner(_unet_with(), tmp_path / "t.safetensors")
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    key = sorted(tensors)[0]
    tensors[key][0, 0] = value
    save_file(tensors, str(path), metadata=metadata)
    target = frozen_tiny_unet()
    with pytest.raises(tuner_io.ResTunerFileError, match=match) as err:
        rd.load_res_tuner(target, path)
    assert str(err.value).startswith(f"{str(path)!r}: tensor {key!r}")
    assert rd.get_res_tuner_configs(target) == {}


def test_a_state_dict_under_a_loaded_name_is_refused_and_the_loaded_one_kept(tmp_path):
    target = _unet_with("style", seed=1)
    kept = _weights(target, "style")
    incoming = _weights(_unet_with(seed=2))
    with pytest.raises(rd.ResTunerError, match="a tuner named 'style' is already loaded"):
        rd.load_res_tuner(target, incoming, adapter_name="style", config=LORA)
    assert all(torch.equal(_weights(target, "style")[k], v) for k, v in kept.items())
    assert rd.load_res_tuner(frozen_tiny_unet(), incoming, config=LORA) == "default"


def test_a_layers_field_that_is_not_an_object_is_refused_saying_what_it_must_be(tmp_path):
    path = rd.save_res_tuner(_unet_with(), tmp_path / "t.safetensors")
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path), metadata={**metadata, "layers": "[1, 2]"})
    with pytest.raises(
        tuner_io.ResTunerFileError, match="'layers' must be a JSON object: layer path -> its shape, got list"
    ):
        rd.load_res_tuner(frozen_tiny_unet(), path)


def test_a_base_field_that_is_not_an_object_is_refused_when_the_file_does_not_fit(tmp_path):
    # read only to describe a mismatch: a file that does not fit and cannot say what it was made for
    path = rd.save_res_tuner(_unet_with(), tmp_path / "t.safetensors")
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path), metadata={**metadata, "base": '"sd1.5"'})
    target = frozen_tiny_unet("sd2")
    with pytest.raises(
        tuner_io.ResTunerFileError, match="'base' must be a JSON object describing the base model, got str"
    ):
        rd.load_res_tuner(target, path)
    assert rd.get_res_tuner_configs(target) == {}


def test_a_writer_process_is_alive_while_it_runs_only_probed_never_signalled(monkeypatch):
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert tuner_io._process_alive(child.pid)
        with pytest.raises(subprocess.TimeoutExpired):  # probed with signal 0, not signalled: still running
            child.wait(timeout=0.5)
    finally:
        child.kill()
        child.wait()
    assert not tuner_io._process_alive(child.pid)  # gone (and reaped)

    def refused(pid, signal):
        raise PermissionError("another user's process")

    monkeypatch.setattr(tuner_io.os, "kill", refused)
    assert tuner_io._process_alive(child.pid)  # exists but cannot be probed: assume its save is in flight


def test_a_file_whose_config_plans_more_parameters_than_the_model_is_refused_before_building(tmp_path):
    path = rd.save_res_tuner(_unet_with(), tmp_path / "t.safetensors")
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    from resattn_diffusion.integration.plan import planned_tensor_shapes

    config = json.loads(metadata["config"])
    config["hyperparameters"]["rank"] = 1000  # 1.2M parameters on the 0.8M-parameter tiny UNet's attn2 projections
    target = frozen_tiny_unet()
    shapes = planned_tensor_shapes(target, rd.ResTunerConfig.from_dict(config))
    tensors = {key: torch.zeros(shape, dtype=torch.float16) for key, shape in shapes.items()}  # shapes that fit
    save_file(tensors, str(path), metadata={**metadata, "config": json.dumps(config)})
    with pytest.raises(tuner_io.ResTunerFileError, match="this res_lora config .* parameters, more than the"):
        rd.load_res_tuner(target, path)
    assert rd.get_res_tuner_configs(target) == {}
