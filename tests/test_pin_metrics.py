"""Pins of the evaluation math (``evaluation/metrics.py``) against numpy written out here, on random features of
known, different covariance (never only identical sets), with the edge cases a mutant of the code would change:
the unbiased N - 1 covariance, the eps retry of a singular product, the imaginary-part check, KID's subsets.

Written to kill the surviving mutants of ``scripts/dev.sh mutate`` (README, "Mutation score").
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from resattn_diffusion.evaluation.errors import EvaluationError
from resattn_diffusion.evaluation.metrics import (
    ReferenceStatistics,
    clip_scores,
    cosine_similarities,
    feature_statistics,
    frechet_distance,
    kernel_inception_distance,
    mean_pairwise_cosine,
    polynomial_mmd2,
)


def _features(n: int, d: int, seed: int, scale: float = 1.0, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) * scale
    return rng.normal(size=(n, d)) @ mix + shift


def _sqrtm_psd_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """tr(sqrtm(S1 S2)) = sum of the square roots of the eigenvalues of S1 S2 (real, >= 0 for PSD S1, S2)."""
    eig = np.linalg.eigvals(s1 @ s2).real
    return float(np.sqrt(np.clip(eig, 0, None)).sum())


def test_feature_statistics_is_the_mean_and_unbiased_covariance() -> None:
    f = _features(9, 3, 0, shift=2.0)
    mu, sigma = feature_statistics(f)
    centered = f - f.sum(axis=0) / 9
    np.testing.assert_allclose(mu, f.sum(axis=0) / 9)
    np.testing.assert_allclose(sigma, centered.T @ centered / 8)  # N - 1
    assert mu.dtype == np.float64 and sigma.shape == (3, 3)
    mu2, _ = feature_statistics(f.astype(np.float32))
    assert mu2.dtype == np.float64
    feature_statistics(f[:2])  # two vectors are enough
    for bad in (f[:1], f[0], f[None]):
        with pytest.raises(EvaluationError, match="at least 2 feature vectors"):
            feature_statistics(bad)


def test_frechet_distance_equals_the_formula_on_different_gaussians() -> None:
    mu1, s1 = feature_statistics(_features(40, 4, 1))
    mu2, s2 = feature_statistics(_features(40, 4, 2, scale=1.7, shift=0.5))
    expected = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * _sqrtm_psd_product(s1, s2))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-6)
    # one dimension: |m1 - m2|^2 + (sqrt(v1) - sqrt(v2))^2
    assert frechet_distance(np.array(1.0), np.array(4.0), np.array(3.0), np.array(9.0)) == pytest.approx(5.0)
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(5.0)


def test_frechet_distance_of_singular_covariances() -> None:
    singular = np.diag([1.0, 0.0])
    other = np.diag([0.0, 1.0])  # S1 S2 = 0: sqrtm is 0 (finite), no retry needed
    assert frechet_distance(np.zeros(2), singular, np.zeros(2), other) == pytest.approx(2.0, abs=1e-6)
    # rank-one S1 and a tiny S2 whose product is 0: sqrtm(0) = 0, the distance is tr(S1) + tr(S2)
    s1 = np.array([[1.0, 1.0], [1.0, 1.0]])
    s2 = np.array([[1.0, -1.0], [-1.0, 1.0]]) * 1e-30
    value = frechet_distance(np.zeros(2), s1, np.zeros(2), s2, eps=1e-6)
    assert np.isfinite(value) and value == pytest.approx(2.0, abs=1e-2)


def test_frechet_distance_refuses_mismatched_or_non_psd_statistics() -> None:
    with pytest.raises(EvaluationError, match="statistics do not match"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(EvaluationError, match="statistics do not match"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(3))
    with pytest.raises(EvaluationError, match="statistics do not match"):
        frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(2))
    with pytest.raises(EvaluationError, match="imaginary part"):
        frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.diag([1.0, 1.0]))


def _k(a: np.ndarray, b: np.ndarray) -> float:
    return (a @ b / a.shape[0] + 1.0) ** 3


def test_polynomial_mmd2_equals_the_unbiased_estimate_by_loops() -> None:
    x, y = _features(5, 3, 3), _features(6, 3, 4, shift=0.7)
    m, n = len(x), len(y)
    xx = sum(_k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(_k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(_k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    assert polynomial_mmd2(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-9)


def test_kid_is_mean_and_std_over_seeded_subsets_without_replacement() -> None:
    f1, f2 = _features(12, 3, 5), _features(10, 3, 6, shift=1.0)
    mean, std = kernel_inception_distance(f1, f2, num_subsets=4, subset_size=7, seed=3)
    rng = np.random.default_rng(3)
    values = []
    for _ in range(4):
        i, j = rng.choice(12, 7, replace=False), rng.choice(10, 7, replace=False)
        values.append(polynomial_mmd2(f1[i], f2[j]))
    assert (mean, std) == pytest.approx((np.mean(values), np.std(values)), rel=1e-9)
    # subsets as large as the smaller set: every vector of it, each once
    full_mean, full_std = kernel_inception_distance(f1[:5], f2[:5], num_subsets=2, subset_size=1000)
    assert full_mean == pytest.approx(polynomial_mmd2(f1[:5], f2[:5]), rel=1e-9) and full_std == pytest.approx(0)
    assert kernel_inception_distance(f1, f2, num_subsets=1, subset_size=2)[1] == 0.0
    with pytest.raises(EvaluationError, match="one width"):
        kernel_inception_distance(f1, f2[:, :2])
    with pytest.raises(EvaluationError, match="one width"):
        kernel_inception_distance(f1[0], f2)
    with pytest.raises(EvaluationError, match="one width"):
        kernel_inception_distance(f1, f2[0])
    with pytest.raises(EvaluationError, match="at least 2 images"):
        kernel_inception_distance(f1[:1], f2)
    with pytest.raises(EvaluationError, match="subset size must be a whole number >= 2"):
        kernel_inception_distance(f1, f2, subset_size=1)
    with pytest.raises(EvaluationError, match="subsets must be a whole number >= 1"):
        kernel_inception_distance(f1, f2, num_subsets=0)


def test_cosines_and_clip_scores_by_hand() -> None:
    a = np.array([[3.0, 4.0], [1.0, 0.0], [0.0, 0.0]])
    b = np.array([[4.0, 3.0], [-1.0, 0.0], [1.0, 1.0]])
    np.testing.assert_allclose(cosine_similarities(a, b), [24 / 25, -1.0, 0.0])
    np.testing.assert_allclose(clip_scores(a, b), [96.0, 0.0, 0.0])
    np.testing.assert_allclose(cosine_similarities(torch.tensor(a), torch.tensor(b)), [24 / 25, -1.0, 0.0])
    pairs = [
        a[i] @ b[j] / max(np.linalg.norm(a[i]) * np.linalg.norm(b[j]), 1e-300) for i in range(2) for j in range(3)
    ]
    assert mean_pairwise_cosine(a[:2], b) == pytest.approx(float(np.mean(pairs)))
    tiny = np.array([[1e-13, 0.0]])  # norm below the 1e-12 floor: divided by 1e-12, not by its own norm
    np.testing.assert_allclose(cosine_similarities(tiny, np.array([[1.0, 0.0]])), [0.1])
    with pytest.raises(EvaluationError, match="cannot pair"):
        cosine_similarities(a, b[:2])


def test_reference_statistics_read_from_an_npz(tmp_path) -> None:
    f = _features(6, 3, 7)
    only_features = tmp_path / "f.npz"
    np.savez(only_features, features=f.astype(np.float32))
    ref = ReferenceStatistics(only_features)
    assert ref.is_file and ref.num_images == 6 and ref.extractor is None and ref.features.dtype == np.float64
    mu, sigma = feature_statistics(f.astype(np.float32))
    np.testing.assert_allclose(ref.mu, mu) and np.testing.assert_allclose(ref.sigma, sigma)

    full = tmp_path / "s.npz"
    np.savez(full, mu=np.ones(3), sigma=np.eye(3) * 2, features=f, extractor=np.array("inception"),
             num_images=np.array(50))  # fmt: skip
    ref = ReferenceStatistics(full)
    np.testing.assert_allclose(ref.mu, np.ones(3))
    np.testing.assert_allclose(ref.sigma, np.eye(3) * 2)
    assert ref.num_images == 50 and ref.extractor == "inception" and ref.features.shape == (6, 3)

    stats_only = tmp_path / "m.npz"
    np.savez(stats_only, mu=np.zeros(3), sigma=np.eye(3))
    ref = ReferenceStatistics(stats_only)
    assert ref.features is None and ref.num_images is None

    empty = tmp_path / "e.npz"
    np.savez(empty, other=np.zeros(1))
    with pytest.raises(EvaluationError, match="neither mu/sigma nor features"):
        ReferenceStatistics(empty)
    (tmp_path / "bad.npz").write_text("not an npz")
    with pytest.raises(EvaluationError, match="cannot read reference statistics"):
        ReferenceStatistics(tmp_path / "bad.npz")
    with pytest.raises(EvaluationError, match="does not exist"):
        ReferenceStatistics(tmp_path / "missing")


def _write_images(folder, n: int, seed: int) -> np.ndarray:
    """n random 4x4 RGB PNGs; returns their pixels in [0, 1], N x 48 in file-name order (C, H, W flattened)."""
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(n, 4, 4, 3), dtype=np.uint8)
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    return (pixels.astype(np.float64) / 255.0).transpose(0, 3, 1, 2).reshape(n, -1)


def test_evaluator_fid_and_kid_on_folders_equal_the_formulas(tmp_path) -> None:
    from resattn_diffusion.evaluation.metrics import Evaluator

    projection = torch.nn.Linear(48, 5, bias=False).double()
    generated, reference = _write_images(tmp_path / "gen", 9, 1), _write_images(tmp_path / "ref", 11, 2)
    with torch.no_grad():
        f_gen = projection(torch.from_numpy(generated)).numpy()
        f_ref = projection(torch.from_numpy(reference)).numpy()
    extractor = torch.nn.Sequential(torch.nn.Flatten(), projection)
    evaluator = Evaluator(["kid", "fid"], reference=tmp_path / "ref", feature_extractor=extractor, batch_size=4,
                          kid_subsets=3, kid_subset_size=6, seed=2, progress=False)  # fmt: skip
    report = evaluator.evaluate(tmp_path / "gen")
    assert report["notes"] == []  # 9 images, 5 features: FID is not flagged as biased
    mu_g, s_g = feature_statistics(f_gen)
    mu_r, s_r = feature_statistics(f_ref)
    assert report["metrics"]["fid"] == pytest.approx(frechet_distance(mu_g, s_g, mu_r, s_r), rel=1e-4)
    kid, kid_std = kernel_inception_distance(f_gen, f_ref, 3, 6, 2)
    assert report["metrics"]["kid"] == pytest.approx(kid, rel=1e-4, abs=1e-9)
    assert report["metrics"]["kid_std"] == pytest.approx(kid_std, rel=1e-4, abs=1e-9)
    assert list(report["metrics"]) == ["fid", "kid", "kid_std"]  # report order, not the order asked
    assert report["num_images"] == 9 and report["details"]["num_reference_images"] == 11
    assert report["details"]["kid_subset_size"] == 6 and report["details"]["kid_subsets"] == 3
    assert report["generation"] is None
    _write_images(tmp_path / "few", 4, 3)
    with pytest.warns(UserWarning, match=r"FID on 4 images \(< feature dim 5\)"):
        assert len(evaluator.evaluate(tmp_path / "few")["notes"]) == 1


def test_frechet_distance_eps_retry_when_the_root_is_not_finite() -> None:
    # S1 S2 = [[0, 1], [0, 0]] has no square root (scipy returns inf): retried with eps I added to both
    s1, s2, eps = np.diag([1.0, 0.0]), np.array([[0.0, 1.0], [0.0, 0.0]]), 1e-4
    shifted = (s1 + eps * np.eye(2)) @ (s2 + eps * np.eye(2))
    expected = np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.linalg.eigvals(shifted).astype(complex)).real.sum()
    with np.errstate(all="ignore"):
        value = frechet_distance(np.zeros(2), s1, np.zeros(2), s2, eps=eps)
    assert value == pytest.approx(float(expected), rel=1e-6)


def test_normalized_rows_are_float64_whatever_the_input() -> None:
    a = np.array([[3.0, 4.0]], dtype=np.float32)
    assert cosine_similarities(a, a).dtype == np.float64


def test_save_reference_statistics_writes_what_the_reader_reads(tmp_path) -> None:
    from resattn_diffusion.evaluation.features import ImageEncoder
    from resattn_diffusion.evaluation.metrics import save_reference_statistics

    pixels = _write_images(tmp_path / "real", 5, 4)
    projection = torch.nn.Linear(48, 3, bias=False).double()
    encoder = ImageEncoder(torch.nn.Sequential(torch.nn.Flatten(), projection), name="proj3")
    with torch.no_grad():
        features = projection(torch.from_numpy(pixels)).numpy()
    (tmp_path / "out").mkdir()  # an existing folder is fine, a missing parent is made
    for target in (tmp_path / "out" / "a" / "b" / "stats", tmp_path / "out" / "b.npz"):
        path = save_reference_statistics(tmp_path / "real", target, encoder=encoder, batch_size=2, progress=False)
        assert path.suffix == ".npz" and path.name in ("stats.npz", "b.npz") and path.is_file()
        with np.load(path) as data:
            assert sorted(data.files) == ["extractor", "features", "mu", "num_images", "sigma"]
            assert str(data["extractor"]) == "proj3" and int(data["num_images"]) == 5
        ref = ReferenceStatistics(path)
        mu, sigma = feature_statistics(features)
        np.testing.assert_allclose(ref.mu, mu, rtol=1e-5)
        np.testing.assert_allclose(ref.sigma, sigma, rtol=1e-5)
        np.testing.assert_allclose(ref.features, features, rtol=1e-5)
        ref.load(encoder, 2, False)  # the same extractor: nothing to do
        other = ImageEncoder(torch.nn.Flatten(), name="other")
        with pytest.raises(EvaluationError, match="computed with 'proj3', but this evaluation uses 'other'"):
            ref.load(other, 2, False)
    stats_only = save_reference_statistics(tmp_path / "real", tmp_path / "m", encoder=encoder, keep_features=False,
                                           progress=False)  # fmt: skip
    with np.load(stats_only) as data:
        assert "features" not in data.files


def test_kid_defaults_and_float64_arithmetic() -> None:
    f1, f2 = _features(8, 3, 8), _features(7, 3, 9, shift=0.3)
    assert kernel_inception_distance(f1, f2, 3, 5) == kernel_inception_distance(f1, f2, 3, 5, seed=0)
    as32 = kernel_inception_distance(f1.astype(np.float32), f2.astype(np.float32), 3, 5)
    g1, g2 = f1.astype(np.float32).astype(np.float64), f2.astype(np.float32).astype(np.float64)
    as64 = kernel_inception_distance(g1, g2, 3, 5)
    assert as32 == pytest.approx(as64, rel=1e-13)  # float32 features are computed with in float64


def test_evaluator_defaults_details_and_subject_checks(tmp_path) -> None:
    import json

    from resattn_diffusion.evaluation.metrics import Evaluator

    _write_images(tmp_path / "gen", 6, 5)
    _write_images(tmp_path / "ref", 4, 6)
    records = [{"file": f"{i:03d}.png", "pipeline": "sd", "steps": 20, "guidance": 7.5, "seed": i % 2,
                "prompt": "a" if i < 3 else "b", "scale": 1.0 if i else 0.5} for i in range(6)]  # fmt: skip
    (tmp_path / "gen" / "manifest.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    extractor = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 2))
    evaluator = Evaluator(["kid"], reference=tmp_path / "ref", feature_extractor=extractor, kid_subsets=2,
                          progress=False)  # fmt: skip
    assert evaluator.kid_subset_size == 1000 and evaluator.seed == 0
    report = evaluator.evaluate(tmp_path / "gen")
    details = report["details"]
    assert details["kid_subset_size"] == 4  # the smaller set: 4 reference images
    assert details["fid_features"] == "custom" and details["reference"] == str(tmp_path / "ref")
    assert report["generation"] == {"pipeline": "sd", "steps": 20, "guidance": 7.5, "tuner": None,
                                    "negative_prompt": None, "height": None, "width": None,
                                    "num_prompts": 2, "num_seeds": 2}  # fmt: skip
    for metric in ("clip_i", "dino"):
        with pytest.raises(EvaluationError, match="need the subject's real images"):
            Evaluator([metric])
        with pytest.raises(EvaluationError, match="subject folder"):
            Evaluator([metric], subject=tmp_path / "no_subject")
    with pytest.raises(EvaluationError, match="generated image folder"):
        evaluator.evaluate(tmp_path / "missing")
