"""Crafted image files (an attacker's pass): what evaluation, training and search read must be the picture the
file shows, or an error naming the file -- never a number computed from something else, never a raw Pillow error.

The README's "What is refused and why" table has one row per case.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from resattn_diffusion.evaluation import EvaluationError, ImageEncoder, extract_features, load_image
from resattn_diffusion.training.data import list_images as training_images
from resattn_diffusion.training.errors import TrainingDataError

#: Every gray level once: a 16 x 16 picture of the 8-bit ramp.
RAMP = np.arange(256, dtype=np.uint8).reshape(16, 16)


def _png(width: int, height: int) -> bytes:
    """A PNG header (and an empty image) claiming ``width`` x ``height`` RGB pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_a_16_bit_grayscale_image_is_read_as_the_picture_it_shows(tmp_path: Path):
    """``convert("RGB")`` clips 16-bit values at 255: the ramp saved as a 16-bit PNG or TIFF (what scientific and
    some export tools write) was read as an almost white image, and every metric measured that."""
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(RAMP).save(folder / "a_8bit.png")
    sixteen = RAMP.astype(np.uint16) * 257  # the same picture: 255 -> 65535
    Image.fromarray(sixteen).save(folder / "b_16bit.png")
    Image.fromarray(sixteen).save(folder / "c_16bit.tif")
    assert Image.open(folder / "b_16bit.png").mode.startswith("I")
    for name in ("b_16bit.png", "c_16bit.tif"):
        np.testing.assert_array_equal(
            np.asarray(load_image(folder / name)), np.asarray(load_image(folder / "a_8bit.png"))
        )
    encoder = ImageEncoder(torch.nn.Flatten(), size=None)  # features = the pixels themselves
    features = extract_features(folder, encoder, batch_size=3, progress=False)
    np.testing.assert_array_equal(features[1], features[0])
    np.testing.assert_array_equal(features[2], features[0])


def test_an_image_without_a_known_white_level_is_refused_naming_it(tmp_path: Path):
    """A float TIFF with values in [0, 1] was read as almost black (and one in [0, 255] as the picture): which one a
    file means cannot be known, so it is refused -- up front, when training lists its data folder."""
    folder = tmp_path / "data"
    folder.mkdir()
    Image.fromarray(RAMP).save(folder / "ok.png")
    Image.fromarray(RAMP.astype(np.float32) / 255.0, "F").save(folder / "float.tif")
    with pytest.raises(EvaluationError, match=r"float\.tif.*floating-point.*white level"):
        load_image(folder / "float.tif")
    with pytest.raises(TrainingDataError, match=r"float\.tif.*floating-point"):
        training_images(folder, "--instance_data_dir")


def test_a_decompression_bomb_is_our_error_naming_the_file(tmp_path: Path):
    """A 100-byte PNG whose header claims 30000 x 30000 pixels: Pillow's ``DecompressionBombError`` (not an
    ``OSError``) escaped raw from evaluation and from training's data check."""
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "bomb.png").write_bytes(_png(30000, 30000))
    with pytest.raises(EvaluationError, match=r"bomb\.png.*decompression bomb"):
        load_image(folder / "bomb.png")
    with pytest.raises(TrainingDataError, match=r"bomb\.png"):
        training_images(folder, "--instance_data_dir")


@pytest.mark.parametrize(
    "line,field",
    [
        ('{"file": ["a.png"], "prompt": "a dog"}', "'file'"),
        ('{"file": 5, "prompt": "a dog"}', "'file'"),
        ('{"file": "../a.png", "prompt": "a dog"}', "'file'"),
        ('{"file": "a.png", "prompt": ["a dog"]}', "'prompt'"),
        ('{"file": "a.png", "prompt": null}', "'prompt'"),
        ('{"file": "a.png", "prompt": "a dog", "seed": [1]}', "'seed'"),
    ],
)
def test_a_crafted_manifest_line_is_refused_naming_it(tmp_path: Path, line: str, field: str):
    """``manifest.jsonl`` fields of the wrong type were a raw ``TypeError: unhashable type`` (a list as file name or
    seed), or reached the CLIP tokenizer as a list / None prompt; a file name with '..' pointed out of the folder."""
    from resattn_diffusion.evaluation.images import prompts_for_images
    from resattn_diffusion.evaluation.metrics import evaluate_folder

    for name, pixels in (("a.png", RAMP), ("b.png", RAMP.T), ("c.png", 255 - RAMP)):
        Image.fromarray(np.ascontiguousarray(pixels)).save(tmp_path / name)
    (tmp_path / "manifest.jsonl").write_text('{"file": "a.png", "prompt": "a dog", "seed": 0}\n' + line + "\n")
    with pytest.raises(EvaluationError, match=f"manifest.jsonl.* line 2: {field}"):
        prompts_for_images([tmp_path / "a.png"])
    encoder = ImageEncoder(torch.nn.Flatten(), size=None)
    with pytest.raises(EvaluationError, match="line 2"):
        evaluate_folder(tmp_path, ["kid"], feature_extractor=encoder, reference=tmp_path, progress=False)


def test_images_of_mixed_sizes_are_our_error_whatever_the_batch_size(tmp_path: Path):
    """With an extractor whose feature width follows the image size, mixed sizes were our error only when they met
    in one batch; across batches (``--batch-size 1``) they were numpy's raw ``ValueError`` from concatenating."""
    for index, size in enumerate((8, 8, 16)):
        Image.fromarray(np.full((size, size, 3), 100 + index, np.uint8)).save(tmp_path / f"{index}.png")
    encoder = ImageEncoder(torch.nn.Flatten())
    for batch_size in (1, 2, 3):
        with pytest.raises(EvaluationError, match="different sizes"):
            extract_features(tmp_path, encoder, batch_size=batch_size, progress=False)


def test_crafted_reference_statistics_are_refused_naming_the_array(tmp_path: Path):
    """A reference ``.npz`` whose arrays are text, NaN or inf, or whose ``num_images`` is not a number, was a raw
    ``ValueError`` or scipy's ``LinAlgError: Internal error in sqrtm``; so were NaN features from an extractor."""
    from resattn_diffusion.evaluation.metrics import evaluate_folder

    generated = tmp_path / "generated"
    generated.mkdir()
    rng = np.random.default_rng(0)
    for index in range(4):
        Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(generated / f"{index}.png")
    encoder = ImageEncoder(torch.nn.Flatten(), name="flat")
    features = rng.normal(size=(5, 48))
    crafted = {
        "features": {"features": np.array([["a"] * 48] * 5)},
        "num_images": {"features": features, "num_images": np.array("abc")},
        "mu": {"mu": np.full(48, np.inf), "sigma": np.eye(48)},
        "sigma": {"mu": features.mean(0), "sigma": np.full((48, 48), np.nan)},
    }
    for key, arrays in crafted.items():
        reference = tmp_path / f"{key}.npz"
        np.savez(reference, extractor="flat", **arrays)
        with pytest.raises(EvaluationError, match=rf"{key}\.npz.*'{key}' must"):
            evaluate_folder(generated, ["fid"], feature_extractor=encoder, reference=reference, progress=False)

    class NaNFeatures(torch.nn.Module):
        def forward(self, batch: torch.Tensor) -> torch.Tensor:
            return torch.full((batch.shape[0], 4), float("nan"))

    with pytest.raises(EvaluationError, match="NaN or inf"):
        evaluate_folder(generated, ["fid"], feature_extractor=ImageEncoder(NaNFeatures()), reference=generated)


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--seeds", "0-99999999999"], "100,000,000,000 seeds"),
        (["--num-seeds", "99999999999"], "99,999,999,999 seeds"),
        (["--seeds", "18446744073709551616"], "2**64 - 1"),
    ],
)
def test_absurd_seeds_fail_at_once_before_the_pipeline_loads(tmp_path: Path, capsys, flags: list[str], needle: str):
    """``--seeds 0-99999999999`` built a list of 10^11 seeds (all memory) after the pipeline had loaded; a seed above
    2**64 - 1 was torch's raw ``ValueError: Overflow`` in the middle of generating."""
    import time

    from resattn_diffusion.evaluation.cli import main

    start = time.perf_counter()
    argv = ["generate", "--pipeline", str(tmp_path / "no_such_pipeline"), "--prompt", "a dog"]
    assert main([*argv, "--out", str(tmp_path / "out"), *flags]) == 2
    assert time.perf_counter() - start < 2.0
    assert needle in capsys.readouterr().err  # not the missing pipeline: the seeds are checked first


def test_a_binary_prompt_file_is_our_error(tmp_path: Path):
    """``--prompts image.png`` was a raw ``UnicodeDecodeError``."""
    from resattn_diffusion.evaluation import read_prompts

    Image.fromarray(RAMP).save(tmp_path / "prompts.png")
    with pytest.raises(EvaluationError, match=r"prompts\.png.*not UTF-8"):
        read_prompts(tmp_path / "prompts.png")


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--guidance", "nan"], "--guidance) must be a finite number"),
        (["--tuner-scale", "nan"], "--tuner-scale must be a finite number"),
        (["--tuner-scale", "1e9"], "--tuner-scale must be a finite number"),
        (["--height", "7", "--width", "32"], "multiple of 8"),
    ],
)
def test_generation_settings_that_cannot_run_are_refused_before_any_image(
    tmp_path: Path, tiny_dirs, capsys, flags: list[str], needle: str
):
    """``--guidance nan`` generated NaN (black) images with exit status 0, and the next run with the same flags was
    refused (NaN != NaN: "other settings"); ``--tuner-scale nan`` or ``1e9`` ended in a raw ``ConfigError``
    traceback, ``--height 7`` in diffusers' raw ``ValueError``, both after the pipeline had loaded."""
    from resattn_diffusion.evaluation.cli import main

    if "--tuner-scale" in flags:  # the scale applies to a tuner: give it one
        import resattn_diffusion as rd
        from resattn_diffusion.testing import frozen_tiny_unet

        unet = frozen_tiny_unet("sd1")
        rd.add_res_tuner(unet, rd.ResTunerConfig(tuner="res_lora"))
        flags = [*flags, "--tuner", str(rd.save_res_tuner(unet, tmp_path / "tuner.safetensors"))]
    out = tmp_path / "images"
    argv = ["generate", "--pipeline", str(tiny_dirs["sd1"]), "--prompt", "a dog", "--steps", "1", "--no-progress"]
    assert main([*argv, "--out", str(out), *flags]) == 2
    assert needle in capsys.readouterr().err
    assert not out.exists() or not any(out.glob("*.png"))


def test_output_files_that_cannot_be_written_are_refused_before_the_work(tmp_path: Path, monkeypatch, capsys):
    """``resattn-eval stats --out`` / ``metrics --json`` under a file or at a folder failed with a raw ``OSError``
    only after every feature or metric had been computed; the statistics are now written atomically, so a failed
    save keeps an older file."""
    from resattn_diffusion.evaluation import metrics as metrics_module
    from resattn_diffusion.evaluation.cli import main
    from resattn_diffusion.evaluation.metrics import save_reference_statistics

    images = tmp_path / "images"
    images.mkdir()
    for index in range(3):
        Image.fromarray(np.roll(RAMP, index)).save(images / f"{index}.png")
    blocker = tmp_path / "a_file"
    blocker.write_text("untouched")
    computed = []
    original = metrics_module.extract_features
    monkeypatch.setattr(metrics_module, "extract_features", lambda *a, **k: computed.append(1) or original(*a, **k))
    encoder = ImageEncoder(torch.nn.Flatten(), name="flat")
    (tmp_path / "folder.npz").mkdir()
    for out in (blocker / "ref.npz", tmp_path / "folder.npz"):
        with pytest.raises(EvaluationError, match="cannot be written|is a folder"):
            save_reference_statistics(images, out, encoder=encoder, progress=False)
    assert not computed  # refused before any feature was computed
    reference = save_reference_statistics(images, tmp_path / "ref.npz", encoder=encoder, progress=False)
    old = reference.read_bytes()

    def interrupted(file, **arrays):
        Path(file).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", interrupted)
    with pytest.raises(OSError, match="disk full"):
        save_reference_statistics(images, reference, encoder=encoder, progress=False)
    assert reference.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "folder.npz", "images", "ref.npz"]
    assert blocker.read_text() == "untouched"
    monkeypatch.undo()
    factory = tmp_path / "flat.py"
    factory.write_text("import torch\n\ndef make():\n    return torch.nn.Flatten()\n")
    argv = ["metrics", "--generated", str(images), "--reference", str(images), "--metrics", "kid"]
    argv += ["--feature-extractor", f"{factory}:make", "--no-progress"]
    assert main([*argv, "--json", str(blocker / "m.json")]) == 2
    assert "'a_file' is a file" in capsys.readouterr().err.replace(str(tmp_path) + "/", "")


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--kid-subsets", "0"], "KID subsets must be a whole number >= 1"),
        (["--kid-subsets", "100000000000"], "at most 10,000"),
        (["--kid-subset-size", "1"], "KID subset size must be a whole number >= 2"),
    ],
)
def test_kid_settings_that_cannot_give_a_number_are_refused_before_anything_is_read(
    tmp_path: Path, capsys, flags: list[str], needle: str
):
    """``--kid-subsets 0`` or ``--kid-subset-size 1`` failed only once every feature had been extracted (or, for the
    subset size, blamed the image count); ``--kid-subsets 10^11`` ran for days. The reference folder does not exist
    here: the settings are checked before it is read."""
    import time

    from resattn_diffusion.evaluation.cli import main
    from resattn_diffusion.evaluation.metrics import Evaluator, kernel_inception_distance

    start = time.perf_counter()
    argv = ["metrics", "--generated", str(tmp_path / "gen"), "--reference", str(tmp_path / "no_such_reference")]
    assert main([*argv, "--metrics", "kid", *flags]) == 2
    assert time.perf_counter() - start < 2.0
    assert needle in capsys.readouterr().err
    with pytest.raises(EvaluationError, match="KID subsets must be a whole number"):
        Evaluator(["kid"], reference=tmp_path / "no_such_reference", kid_subsets=2.5)
    with pytest.raises(EvaluationError, match="KID subset size must be a whole number >= 2"):
        kernel_inception_distance(np.zeros((4, 3)), np.ones((4, 3)), subset_size=1)


@pytest.mark.parametrize("command", ["generate", "all"])
@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--steps", "0"], "num_inference_steps (--steps) must be a whole number >= 1"),
        (["--batch-size", "-2"], "batch_size (--batch-size) must be a whole number >= 1"),
        (["--guidance", "inf"], "--guidance) must be a finite number"),
        (["--height", "12"], "height (--height) must be a positive multiple of 8"),
        (["--tuner", "no_such_tuner.safetensors"], "does not exist (--tuner)"),
    ],
)
def test_generation_settings_are_checked_before_the_pipeline_or_the_metric_models_load(
    tmp_path: Path, capsys, command: str, flags: list[str], needle: str
):
    """These were checked only once the pipeline had loaded (and, for ``all``, after the CLIP / Inception models):
    minutes on a real model before ``--steps 0`` was refused. The pipeline here does not exist: the settings are
    checked first."""
    import time

    from resattn_diffusion.evaluation.cli import main

    start = time.perf_counter()
    argv = [command, "--pipeline", str(tmp_path / "no_such_pipeline"), "--prompt", "a dog"]
    flags = [str(tmp_path / flag) if flag.endswith(".safetensors") else flag for flag in flags]
    assert main([*argv, "--out", str(tmp_path / "out"), *flags]) == 2
    assert time.perf_counter() - start < 2.0
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_size_off_the_pipelines_latent_grid_is_refused_once_the_pipeline_is_known(tmp_path: Path):
    """The command line checks multiples of 8 before loading; SD3's patched latent grid (VAE factor 8 x patch 2 = 16)
    is checked by ``generate_images`` against the pipeline it was given, before the first image or folder."""
    from types import SimpleNamespace

    from resattn_diffusion.evaluation import generate_images

    pipeline = SimpleNamespace(vae_scale_factor=8, patch_size=2, name_or_path="sd3-like")
    with pytest.raises(EvaluationError, match=r"height \(--height\) must be a positive multiple of 16"):
        generate_images(pipeline, ["a dog"], tmp_path / "out", height=24, width=32, progress=False)
    assert not (tmp_path / "out").exists()
