"""Pins of the folder evaluation and the reference files (``evaluation/metrics.py``): what a user of
``Evaluator`` / ``save_reference_statistics`` / ``resattn-eval`` sees -- which models are built from which
arguments and where, the report's entries, the reference file's rules and format, the progress bars, the
defaults -- plus the numerical cases of the math the first pin file leaves out (float32 statistics, a complex
root of rank-deficient covariances, single vectors, the KID defaults).

Tiny inputs: 4x4 images, a linear feature extractor, the tiny random CLIP / DINO folders of
``test_evaluation.py``.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from test_evaluation import clip_folder, dino_folders  # noqa: F401  (fixtures: tiny CLIP / DINO model folders)
from test_pin_metrics import _write_images
from test_reference_metrics import hand_frechet

from resattn_diffusion.evaluation import metrics
from resattn_diffusion.evaluation.errors import EvaluationError, EvaluationWarning
from resattn_diffusion.evaluation.features import CLIPEncoder, ImageEncoder
from resattn_diffusion.evaluation.metrics import (
    Evaluator,
    ReferenceStatistics,
    cosine_similarities,
    feature_statistics,
    frechet_distance,
    kernel_inception_distance,
    mean_pairwise_cosine,
    save_reference_statistics,
)


class RecordingProjection(torch.nn.Module):
    """Flatten + a fixed projection of 4x4 RGB images, recording the size of every batch it sees."""

    def __init__(self, width: int = 3, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.weight = torch.nn.Parameter(torch.randn(48, width, generator=generator, dtype=torch.float64))
        self.batches: list[int] = []

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        self.batches.append(batch.shape[0])
        return batch.flatten(1).to(self.weight.dtype) @ self.weight


def _project(pixels: np.ndarray, module: RecordingProjection) -> np.ndarray:
    return pixels @ module.weight.detach().numpy()


# ----------------------------------------------------------------------------------------------------------------
# The math: cases left out by test_pin_metrics.py
# ----------------------------------------------------------------------------------------------------------------


def test_frechet_distance_of_float32_statistics_is_computed_in_float64() -> None:
    rng = np.random.default_rng(11)
    features1, features2 = rng.normal(size=(300, 64)), rng.normal(size=(300, 64)) * 1.3 + 0.1
    mu1, s1 = (x.astype(np.float32) for x in feature_statistics(features1))
    mu2, s2 = (x.astype(np.float32) for x in feature_statistics(features2))
    as64 = frechet_distance(*(x.astype(np.float64) for x in (mu1, s1, mu2, s2)))
    # every argument float32 alone, then all of them: the same number as from their float64 copies
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(as64, rel=1e-12)
    assert frechet_distance(mu1, s1.astype(np.float64), mu2, s2) == pytest.approx(as64, rel=1e-12)
    assert frechet_distance(mu1, s1, mu2, s2.astype(np.float64)) == pytest.approx(as64, rel=1e-12)


def test_frechet_distance_of_fewer_images_than_dimensions_drops_the_roots_round_off() -> None:
    # 4 images of 10 features: rank-3 covariances; scipy's root of their product comes back complex with
    # round-off imaginary parts (~2e-5 on the diagonal here), which are dropped, not taken for non-PSD covariances
    rng = np.random.default_rng(78)
    mu1, s1 = feature_statistics(rng.normal(size=(4, 10)))
    mu2, s2 = feature_statistics(rng.normal(size=(4, 10)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy: the product is singular
        value = frechet_distance(mu1, s1, mu2, s2)
    assert isinstance(value, float) and value == pytest.approx(hand_frechet(mu1, s1, mu2, s2), rel=1e-6)


def test_cosines_of_single_vectors() -> None:
    a, b = np.array([3.0, 4.0]), np.array([4.0, 3.0])
    assert float(cosine_similarities(a, b)) == pytest.approx(24 / 25)
    assert mean_pairwise_cosine(a, np.array([[4.0, 3.0], [0.0, -2.0]])) == pytest.approx((24 / 25 - 4 / 5) / 2)


def test_kid_defaults_are_100_subsets_of_1000() -> None:
    rng = np.random.default_rng(12)
    small1, small2 = rng.normal(size=(8, 2)), rng.normal(size=(9, 2)) + 0.2
    assert kernel_inception_distance(small1, small2) == kernel_inception_distance(small1, small2, 100, 1000, 0)
    # one subset of the default size: 1000 of the 1002 vectors (the kernels of 1000 x 1000 pairs take ~1 s)
    f1, f2 = rng.normal(size=(1002, 2)), rng.normal(size=(1002, 2)) + 0.2
    assert kernel_inception_distance(f1, f2, num_subsets=1) == kernel_inception_distance(f1, f2, 1, 1000, 0)


# ----------------------------------------------------------------------------------------------------------------
# Reference files and folders
# ----------------------------------------------------------------------------------------------------------------


def test_reference_file_refuses_pickles_and_reads_features_without_sigma(tmp_path) -> None:
    # an .npz may hold pickled objects; reading one would run code from the file: refused, named
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, features=np.array([{"x": 1}, {"y": 2}], dtype=object))
    with pytest.raises(EvaluationError, match="cannot read reference statistics"):
        ReferenceStatistics(pickled)
    # mu without sigma is not a pair of statistics: they come from the features
    features = np.random.default_rng(13).normal(size=(5, 3))
    mu_only = tmp_path / "mu_only.npz"
    np.savez(mu_only, mu=np.full(3, 9.0), features=features)
    reference = ReferenceStatistics(mu_only)
    mu, sigma = feature_statistics(features)
    np.testing.assert_allclose(reference.mu, mu)
    np.testing.assert_allclose(reference.sigma, sigma)
    sigma_only = tmp_path / "sigma_only.npz"
    np.savez(sigma_only, sigma=np.eye(3))
    with pytest.raises(EvaluationError, match="neither mu/sigma nor features"):
        ReferenceStatistics(sigma_only)


def test_folder_reference_is_computed_once_on_use(tmp_path) -> None:
    pixels = _write_images(tmp_path / "ref", 7, 21)
    reference = ReferenceStatistics(tmp_path / "ref")
    assert not reference.is_file
    assert (reference.features, reference.mu, reference.sigma, reference.extractor, reference.num_images) == (
        None, None, None, None, None,
    )  # fmt: skip
    module = RecordingProjection()
    encoder = ImageEncoder(module, name="proj")
    reference.load(encoder, batch_size=3, progress=False)
    assert module.batches == [3, 3, 1]
    assert reference.extractor == "proj" and reference.num_images == 7 and reference.features.dtype == np.float64
    mu, sigma = feature_statistics(_project(pixels, module))
    np.testing.assert_allclose(reference.mu, mu, rtol=1e-5)
    np.testing.assert_allclose(reference.sigma, sigma, rtol=1e-5)
    reference.load(encoder, batch_size=3, progress=False)
    assert module.batches == [3, 3, 1]  # cached: not encoded again


def test_saved_reference_features_are_float32_and_batched_by_32_by_default(tmp_path) -> None:
    _write_images(tmp_path / "real", 33, 22)
    module = RecordingProjection()
    path = save_reference_statistics(tmp_path / "real", tmp_path / "stats", encoder=ImageEncoder(module, name="p"),
                                     progress=False)  # fmt: skip
    assert module.batches == [32, 1]
    with np.load(path) as data:
        assert data["features"].dtype == np.float32 and data["mu"].dtype == np.float64
        assert data["features"].shape == (33, 3)
    module.batches.clear()
    save_reference_statistics(tmp_path / "real", path, encoder=ImageEncoder(module, name="p"), batch_size=10,
                              progress=False)  # fmt: skip
    assert module.batches == [10, 10, 10, 3]


class FakeInception(ImageEncoder):
    """Stands in for the 2048-d Inception (seconds per image on CPU): records how it was built, and runs its tiny
    projection on the CPU whatever the device asked for (the wiring is checked, not the placement)."""

    built: list[dict] = []

    def __init__(self, weights_path=None, resize="pytorch-fid", backend="builtin", device="cpu"):
        FakeInception.built.append(dict(weights_path=weights_path, resize=resize, backend=backend, device=device))
        super().__init__(RecordingProjection(), name=f"fake-inception/{resize}/{backend}")


def test_the_inception_is_built_from_the_given_weights_resize_backend_and_device(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(metrics, "InceptionEncoder", FakeInception)
    FakeInception.built = []
    _write_images(tmp_path / "ref", 4, 23)
    weights = tmp_path / "inception.pth"
    path = save_reference_statistics(tmp_path / "ref", tmp_path / "ref.npz", inception_weights=weights,
                                     progress=False)  # fmt: skip
    assert FakeInception.built == [dict(weights_path=weights, resize="pytorch-fid", backend="builtin", device="cpu")]
    assert ReferenceStatistics(path).extractor == "fake-inception/pytorch-fid/builtin"
    FakeInception.built = []
    save_reference_statistics(tmp_path / "ref", tmp_path / "ref2.npz", inception_weights=weights, device="meta",
                              progress=False)  # fmt: skip
    assert FakeInception.built == [dict(weights_path=weights, resize="pytorch-fid", backend="builtin", device="meta")]
    FakeInception.built = []
    evaluator = Evaluator(["fid"], reference=tmp_path / "ref", inception_weights=weights, inception_resize="tf1",
                          inception_backend="torch-fidelity", device="meta", progress=False)  # fmt: skip
    assert FakeInception.built == [dict(weights_path=weights, resize="tf1", backend="torch-fidelity", device="meta")]
    assert evaluator.distribution_encoder.name == "fake-inception/tf1/torch-fidelity"


def test_models_are_placed_on_the_device_asked_for(tmp_path, clip_folder, dino_folders) -> None:  # noqa: F811
    _write_images(tmp_path / "ref", 3, 24)
    _write_images(tmp_path / "subject", 2, 25)
    evaluator = Evaluator(["fid", "clip_i", "dino"], reference=tmp_path / "ref", subject=tmp_path / "subject",
                          feature_extractor=RecordingProjection(), clip_model=clip_folder,
                          dino_model=dino_folders["vit"], device="meta", progress=False)  # fmt: skip
    for encoder in (evaluator.distribution_encoder, evaluator.clip, evaluator.dino):
        assert encoder.device == torch.device("meta")
        assert {p.device.type for p in encoder.model.parameters()} == {"meta"}


# ----------------------------------------------------------------------------------------------------------------
# The folder evaluation's reports
# ----------------------------------------------------------------------------------------------------------------


def test_kid_and_fid_from_a_saved_reference_file_equal_those_from_its_folder(tmp_path) -> None:
    pixels_ref = _write_images(tmp_path / "ref", 8, 26)
    pixels_gen = _write_images(tmp_path / "gen", 5, 27)
    module = RecordingProjection()
    encoder = ImageEncoder(module, name="proj")
    with_features = save_reference_statistics(tmp_path / "ref", tmp_path / "full", encoder=encoder, progress=False)
    stats_only = save_reference_statistics(tmp_path / "ref", tmp_path / "stats", encoder=encoder, keep_features=False,
                                           progress=False)  # fmt: skip
    options = dict(feature_extractor=encoder, kid_subsets=3, kid_subset_size=6, seed=1, progress=False)
    from_folder = Evaluator(["fid", "kid"], reference=tmp_path / "ref", **options).evaluate(tmp_path / "gen")
    from_file = Evaluator(["fid", "kid"], reference=with_features, **options).evaluate(tmp_path / "gen")
    for name in ("fid", "kid", "kid_std"):
        assert from_file["metrics"][name] == pytest.approx(from_folder["metrics"][name], rel=1e-4, abs=1e-9)
    # the subsets are capped by the smaller set, here the 5 generated images
    assert from_file["details"]["kid_subset_size"] == 5 and from_folder["details"]["kid_subset_size"] == 5
    f_gen, f_ref = _project(pixels_gen, module), _project(pixels_ref, module)
    assert from_file["metrics"]["kid"] == pytest.approx(kernel_inception_distance(f_gen, f_ref, 3, 6, 1)[0],
                                                        rel=1e-4, abs=1e-9)  # fmt: skip
    # mu/sigma only: enough for FID, refused for KID before anything is computed
    fid_only = Evaluator(["fid"], reference=stats_only, **options).evaluate(tmp_path / "gen")
    assert fid_only["metrics"]["fid"] == pytest.approx(from_folder["metrics"]["fid"], rel=1e-4)
    with pytest.raises(EvaluationError, match="KID needs reference features"):
        Evaluator(["kid"], reference=stats_only, **options)


def test_one_metric_name_batch_size_one_and_an_image_encoder_as_given(tmp_path) -> None:
    _write_images(tmp_path / "ref", 3, 28)
    _write_images(tmp_path / "gen", 3, 29)
    module = RecordingProjection()
    evaluator = Evaluator("fid", reference=tmp_path / "ref", feature_extractor=ImageEncoder(module, name="proj"),
                          batch_size=1, progress=False)  # fmt: skip
    report = evaluator.evaluate(tmp_path / "gen")
    assert list(report["metrics"]) == ["fid"] and report["details"]["fid_features"] == "proj"
    assert module.batches == [1] * 6  # reference then generated, one image at a time
    assert report["generated"] == str(tmp_path / "gen") and report["num_images"] == 3
    for bad in (0, -1):
        with pytest.raises(EvaluationError, match="batch_size must be >= 1"):
            Evaluator("fid", reference=tmp_path / "ref", feature_extractor=module, batch_size=bad)


def test_evaluator_defaults_batch_32_and_100_kid_subsets(tmp_path) -> None:
    _write_images(tmp_path / "ref", 33, 30)
    _write_images(tmp_path / "gen", 3, 31)
    module = RecordingProjection(width=2)
    report = Evaluator(["kid"], reference=tmp_path / "ref", feature_extractor=module, progress=False).evaluate(
        tmp_path / "gen"
    )
    assert module.batches == [32, 1, 3]
    assert report["details"]["kid_subsets"] == 100 and report["details"]["kid_subset_size"] == 3


def test_the_fid_note_is_for_fewer_images_than_features_only(tmp_path) -> None:
    _write_images(tmp_path / "ref", 6, 32)
    _write_images(tmp_path / "gen", 3, 33)
    evaluator = Evaluator(["fid"], reference=tmp_path / "ref", feature_extractor=RecordingProjection(width=3),
                          progress=False)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 3 images, 3 features: not flagged
        assert evaluator.evaluate(tmp_path / "gen")["notes"] == []


class NaNFeatures(torch.nn.Module):
    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.full((batch.shape[0], 2), float("nan"))


def test_a_non_finite_metric_is_noted_by_name_and_warned(tmp_path) -> None:
    _write_images(tmp_path / "ref", 3, 34)
    _write_images(tmp_path / "gen", 3, 35)
    evaluator = Evaluator(["kid"], reference=tmp_path / "ref", feature_extractor=NaNFeatures(), kid_subsets=2,
                          progress=False)  # fmt: skip
    with pytest.warns(EvaluationWarning) as caught:
        report = evaluator.evaluate(tmp_path / "gen")
    assert [str(w.message) for w in caught] == report["notes"]
    assert report["notes"] == ["kid is nan: check the images and features for NaNs.",
                               "kid_std is nan: check the images and features for NaNs."]  # fmt: skip


def test_missing_folders_are_named_in_the_error(tmp_path) -> None:
    _write_images(tmp_path / "ref", 3, 36)
    with pytest.raises(EvaluationError, match=r"^subject folder '.*no_subject' does not exist"):
        Evaluator(["dino"], subject=tmp_path / "no_subject")
    evaluator = Evaluator(["fid"], reference=tmp_path / "ref", feature_extractor=RecordingProjection())
    with pytest.raises(EvaluationError, match=r"^generated image folder '.*missing' does not exist"):
        evaluator.evaluate(tmp_path / "missing")


def test_clip_t_alone_is_the_mean_prompt_image_cosine(tmp_path, clip_folder) -> None:  # noqa: F811
    _write_images(tmp_path / "gen", 3, 37)
    prompts = ["a red square", "a blue dot", "noise"]
    report = Evaluator(["clip_t"], clip_model=clip_folder, batch_size=2, progress=False).evaluate(
        tmp_path / "gen", prompts
    )
    from resattn_diffusion.evaluation.images import iter_image_batches, list_images

    encoder = CLIPEncoder(clip_folder)
    images = next(iter_image_batches(list_images(tmp_path / "gen"), 3))
    expected = cosine_similarities(encoder.encode_images(images).numpy(), encoder.encode_texts(prompts).numpy())
    assert list(report["metrics"]) == ["clip_t"]
    assert report["metrics"]["clip_t"] == pytest.approx(float(expected.mean()), rel=1e-5)
    assert report["details"]["clip_model"] == str(clip_folder)


def test_the_report_of_one_image_against_one_subject_image(tmp_path, dino_folders) -> None:  # noqa: F811
    _write_images(tmp_path / "gen", 1, 38)
    _write_images(tmp_path / "subject", 1, 39)
    record = {"file": "000.png", "pipeline": "sd", "steps": 4, "guidance": 2.0, "seed": 0, "prompt": "a"}
    (tmp_path / "gen" / "manifest.jsonl").write_text(json.dumps(record) + "\n")
    report = Evaluator(["dino"], subject=tmp_path / "subject", dino_model=dino_folders["vit"],
                       progress=False).evaluate(tmp_path / "gen")  # fmt: skip
    assert report["details"] == {"dino_model": str(dino_folders["vit"]), "subject": str(tmp_path / "subject"),
                                 "num_subject_images": 1}  # fmt: skip
    assert report["generation"] == {"pipeline": "sd", "steps": 4, "guidance": 2.0, "tuner": None, "scale": None,
                                    "negative_prompt": None, "height": None, "width": None, "num_prompts": 1,
                                    "num_seeds": 1}  # fmt: skip
    assert report["generated"] == str(tmp_path / "gen") and -1.0 <= report["metrics"]["dino"] <= 1.0


# ----------------------------------------------------------------------------------------------------------------
# Progress bars: each set named and counted, silent with progress=False
# ----------------------------------------------------------------------------------------------------------------


def _bars(stderr: str) -> dict[str, str]:
    """The last state of each tqdm bar in captured stderr, by its description."""
    bars = {}
    for line in re.split(r"[\r\n]+", stderr):
        if ": " in line and "|" in line:
            bars[line.split(": ", 1)[0]] = line
    return bars


def _assert_done(bars: dict[str, str], description: str, count: int) -> None:
    assert description in bars, f"no progress bar named {description!r} in {sorted(bars)}"
    assert re.match(rf"{re.escape(description)}: 100%\|.*\| {count}/{count} \[.*img/s\]", bars[description]), bars[
        description
    ]


def test_progress_bars_name_and_count_every_set(tmp_path, capsys, clip_folder, dino_folders) -> None:  # noqa: F811
    _write_images(tmp_path / "ref", 5, 40)
    _write_images(tmp_path / "gen", 3, 41)
    _write_images(tmp_path / "subject", 2, 42)
    encoder = ImageEncoder(RecordingProjection(), name="proj")
    save_reference_statistics(tmp_path / "ref", tmp_path / "ref.npz", encoder=encoder, batch_size=2)
    _assert_done(_bars(capsys.readouterr().err), "reference", 5)

    evaluator = Evaluator(["fid", "clip_score", "clip_i", "dino"], reference=tmp_path / "ref",
                          subject=tmp_path / "subject", feature_extractor=encoder, clip_model=clip_folder,
                          dino_model=dino_folders["vit"], batch_size=2)  # fmt: skip
    evaluator.evaluate(tmp_path / "gen", ["a photo"])
    bars = _bars(capsys.readouterr().err)
    clip, dino = f"clip:{clip_folder}", f"dino:{dino_folders['vit']}"
    for description, count in (("reference", 5), ("generated", 3), (clip, 3), (f"subject {clip}", 2), (dino, 3),
                               (f"subject {dino}", 2)):  # fmt: skip
        _assert_done(bars, description, count)
    assert len(bars) == 6

    quiet = Evaluator(["fid", "clip_score", "clip_i", "dino"], reference=tmp_path / "ref",
                      subject=tmp_path / "subject", feature_extractor=encoder, clip_model=clip_folder,
                      dino_model=dino_folders["vit"], batch_size=2, progress=False)  # fmt: skip
    quiet.evaluate(tmp_path / "gen", ["a photo"])
    save_reference_statistics(tmp_path / "ref", tmp_path / "ref.npz", encoder=encoder, progress=False)
    assert capsys.readouterr().err == ""
