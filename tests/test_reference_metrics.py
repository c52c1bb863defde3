"""The evaluation metrics against straightforward numpy written from the definitions (issue 18, part 3).

Pinned, on features of known and *different* distributions (not only identical sets):

* feature statistics: the mean and the unbiased covariance ``sum (x - m)(x - m)^T / (N - 1)`` (told apart from
  ``/ N`` at small N);
* FID ``|m1 - m2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))``, with the root's trace written here as
  ``sum sqrt(eig(S1^(1/2) S2 S1^(1/2)))`` (a symmetric product, so plain ``eigh``), on covariances that do not
  commute (where ``sqrtm(S1) sqrtm(S2)`` is wrong), and against the closed form of two known Gaussians;
* KID: the unbiased MMD^2 with ``k(x, y) = (x.y / d + 1)^3`` as explicit sums over ``i != j``, its subsets as
  documented (``numpy.random.default_rng(seed)``, one draw without replacement per set per subset, mean and
  population std over subsets), and its closed form for zero-mean Gaussians, ``3 |S1 - S2|_F^2 / d^2``;
* CLIP score ``100 * max(cos, 0)`` per pair, averaged; CLIP-T the unclipped mean cosine; CLIP-I / DINO the mean
  cosine over every (generated, reference) pair;
* the collapse scores: normalised label entropy, the between-group variance ``sum_g n_g / n |m_g - m|^2`` and
  its ratio, per-group accuracy;
* the folder evaluation (:class:`Evaluator`) computes FID and KID from the same statistics as the hand path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from resattn_diffusion.evaluation.collapse import (
    between_group_variance,
    label_entropy,
    per_group_accuracy,
    prompt_separation,
)
from resattn_diffusion.evaluation.metrics import (
    Evaluator,
    clip_scores,
    cosine_similarities,
    feature_statistics,
    frechet_distance,
    kernel_inception_distance,
    mean_pairwise_cosine,
    polynomial_mmd2,
)


# --- references written out ---------------------------------------------------------------------------------------
def hand_mean_and_covariance(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n, d = x.shape
    mean = x.sum(axis=0) / n
    covariance = np.zeros((d, d))
    for row in x:
        centred = (row - mean)[:, None]
        covariance += centred @ centred.T
    return mean, covariance / (n - 1)


def symmetric_sqrt(a: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(a)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def hand_frechet(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """tr((S1 S2)^(1/2)) = tr((S1^(1/2) S2 S1^(1/2))^(1/2)): S1 S2 is similar to that symmetric PSD matrix."""
    root1 = symmetric_sqrt(s1)
    middle = root1 @ s2 @ root1
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2.0 * trace_root)


def cubic_kernel(a: np.ndarray, b: np.ndarray) -> float:
    return (float(np.dot(a, b)) / a.shape[0] + 1.0) ** 3


def hand_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 as the double sums of its definition (no kernel matrices)."""
    m, n = len(x), len(y)
    xx = sum(cubic_kernel(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(cubic_kernel(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(cubic_kernel(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2.0 * xy


def random_covariance(rng: np.random.Generator, d: int, scale: float = 1.0) -> np.ndarray:
    a = rng.normal(size=(d, d)) * scale
    return a @ a.T + 0.1 * np.eye(d)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.sqrt(np.dot(a, a)) * np.sqrt(np.dot(b, b))))


# --- feature statistics --------------------------------------------------------------------------------------------
def test_statistics_are_the_mean_and_the_unbiased_covariance_at_small_n():
    x = np.random.default_rng(0).normal(size=(5, 3)) * [1.0, 3.0, 0.5] + [2.0, -1.0, 0.0]
    mean, covariance = feature_statistics(x.astype(np.float32))
    hand_mean, hand_covariance = hand_mean_and_covariance(x.astype(np.float32).astype(np.float64))
    assert mean.dtype == covariance.dtype == np.float64
    np.testing.assert_allclose(mean, hand_mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(covariance, hand_covariance, rtol=1e-12, atol=1e-12)
    # N = 5: /N would be 20% smaller, far outside the tolerance
    assert not np.allclose(covariance, hand_covariance * 4 / 5, rtol=1e-3)


def test_statistics_of_a_large_sample_approach_the_true_gaussian():
    rng = np.random.default_rng(1)
    d, n = 4, 40_000
    true_mean, true_covariance = rng.normal(size=d) * 3, random_covariance(rng, d)
    x = rng.multivariate_normal(true_mean, true_covariance, size=n)
    mean, covariance = feature_statistics(x)
    # standard errors: sqrt(S_ii / n) for the mean, sqrt((S_ij^2 + S_ii S_jj) / n) for the covariance
    diagonal = np.diag(true_covariance)
    assert np.all(np.abs(mean - true_mean) < 5 * np.sqrt(diagonal / n))
    covariance_error = np.sqrt((true_covariance**2 + np.outer(diagonal, diagonal)) / n)
    assert np.all(np.abs(covariance - true_covariance) < 5 * covariance_error)


# --- FID -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_frechet_distance_equals_the_symmetric_root_formula_for_covariances_that_do_not_commute(seed):
    rng = np.random.default_rng(seed)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = random_covariance(rng, d), random_covariance(rng, d, scale=0.5)
    assert not np.allclose(s1 @ s2, s2 @ s1, atol=1e-3)  # where sqrtm(S1) sqrtm(S2) would be wrong
    ours = frechet_distance(mu1, s1, mu2, s2)
    np.testing.assert_allclose(ours, hand_frechet(mu1, s1, mu2, s2), rtol=1e-8)
    wrong_product = (
        ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2) - 2 * np.trace(symmetric_sqrt(s1) @ symmetric_sqrt(s2))
    )
    assert abs(ours - wrong_product) > 1e-3 * ours


def test_frechet_distance_of_one_dimension_and_of_diagonal_gaussians_is_the_closed_form():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s
    np.testing.assert_allclose(frechet_distance([1.5], [[4.0]], [-0.5], [[0.25]]), 2.0**2 + (2.0 - 0.5) ** 2)
    # diagonal: |dm|^2 + sum (sqrt(a_i) - sqrt(b_i))^2
    a, b = np.array([1.0, 4.0, 9.0]), np.array([0.25, 4.0, 1.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    np.testing.assert_allclose(frechet_distance(mu1, np.diag(a), mu2, np.diag(b)), expected, rtol=1e-10)


def test_fid_of_two_large_gaussian_samples_approaches_the_closed_form():
    rng = np.random.default_rng(3)
    d, n = 4, 40_000
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = random_covariance(rng, d), random_covariance(rng, d, scale=0.6)
    x1 = rng.multivariate_normal(mu1, s1, size=n)
    x2 = rng.multivariate_normal(mu2, s2, size=n)
    ours = frechet_distance(*feature_statistics(x1), *feature_statistics(x2))
    np.testing.assert_allclose(ours, hand_frechet(mu1, s1, mu2, s2), rtol=0.03)


def test_fid_of_small_sets_uses_the_unbiased_covariances():
    rng = np.random.default_rng(4)
    x1 = rng.normal(size=(6, 3)) * [1.0, 2.0, 0.5]
    x2 = rng.normal(size=(8, 3)) + [1.0, 0.0, -1.0]
    ours = frechet_distance(*feature_statistics(x1), *feature_statistics(x2))
    expected = hand_frechet(*hand_mean_and_covariance(x1), *hand_mean_and_covariance(x2))
    np.testing.assert_allclose(ours, expected, rtol=1e-8)
    biased = hand_frechet(
        x1.mean(0), np.cov(x1, rowvar=False, bias=True), x2.mean(0), np.cov(x2, rowvar=False, bias=True)
    )
    assert abs(ours - biased) > 1e-3 * ours


# --- KID -----------------------------------------------------------------------------------------------------------
def test_polynomial_mmd2_equals_the_unbiased_double_sums():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(7, 5))
    y = rng.normal(size=(9, 5)) * 1.5 + 0.3
    np.testing.assert_allclose(polynomial_mmd2(x, y), hand_mmd2(x, y), rtol=1e-10)


def test_kid_subsets_are_seeded_draws_without_replacement_and_report_mean_and_population_std():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(20, 4))
    y = rng.normal(size=(15, 4)) * 1.3
    mean, std = kernel_inception_distance(x, y, num_subsets=5, subset_size=6, seed=123)
    draws = np.random.default_rng(123)
    values = []
    for _ in range(5):
        subset_x = x[draws.choice(20, 6, replace=False)]
        subset_y = y[draws.choice(15, 6, replace=False)]
        values.append(hand_mmd2(subset_x, subset_y))
    np.testing.assert_allclose(mean, np.mean(values), rtol=1e-10)
    np.testing.assert_allclose(std, np.sqrt(np.mean((np.array(values) - np.mean(values)) ** 2)), rtol=1e-8)


def test_kid_with_subsets_as_large_as_the_sets_is_the_full_unbiased_mmd():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(12, 3)) + 0.5
    y = rng.normal(size=(12, 3))
    mean, std = kernel_inception_distance(x, y, num_subsets=3, subset_size=50, seed=0)
    np.testing.assert_allclose(mean, hand_mmd2(x, y), rtol=1e-10)  # every subset is a permutation of a whole set
    assert std < 1e-12


def test_kid_subsets_have_the_size_of_the_smaller_set():
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(12, 3)) + 0.5, rng.normal(size=(10, 3))
    mean, _ = kernel_inception_distance(x, y, num_subsets=1, subset_size=50, seed=4)
    draws = np.random.default_rng(4)
    subset_x = x[draws.choice(12, 10, replace=False)]
    np.testing.assert_allclose(mean, hand_mmd2(subset_x, y[draws.choice(10, 10, replace=False)]), rtol=1e-10)


def test_kid_of_zero_mean_gaussians_approaches_its_closed_form():
    """For x ~ N(0, S1), y ~ N(0, S2): E k(x, y) = 1 + 3 tr(S1 S2) / d^2 (odd moments vanish), so the unbiased
    MMD^2 has expectation 3 |S1 - S2|_F^2 / d^2."""
    rng = np.random.default_rng(8)
    d, n = 3, 2500
    s1, s2 = np.diag([1.0, 2.0, 0.5]), random_covariance(rng, d, scale=0.7)
    x = rng.multivariate_normal(np.zeros(d), s1, size=n)
    y = rng.multivariate_normal(np.zeros(d), s2, size=n)
    expected = 3.0 * ((s1 - s2) ** 2).sum() / d**2
    mean, _ = kernel_inception_distance(x, y, num_subsets=1, subset_size=n, seed=0)
    np.testing.assert_allclose(mean, expected, rtol=0.15)


def test_kid_of_one_distribution_is_unbiased_around_zero():
    """The unbiased estimator averages to 0 for two samples of one distribution; a biased one (diagonal terms
    kept) stays clearly positive."""
    rng = np.random.default_rng(9)
    x = rng.normal(size=(400, 4))
    y = rng.normal(size=(400, 4))
    mean, std = kernel_inception_distance(x, y, num_subsets=40, subset_size=40, seed=1)
    assert abs(mean) < 3 * std / np.sqrt(40)
    diagonal = np.mean([cubic_kernel(row, row) for row in x[:40]])
    assert diagonal / 40 > 6 * std / np.sqrt(40)  # the bias the diagonal would add is far outside that band


# --- CLIP score, CLIP-T, CLIP-I / DINO ------------------------------------------------------------------------------
def test_clip_score_is_100_times_the_clipped_cosine_per_pair():
    rng = np.random.default_rng(10)
    images = rng.normal(size=(6, 8)) * rng.uniform(0.1, 10.0, size=(6, 1))  # norms differ: cosine, not dot
    texts = rng.normal(size=(6, 8))
    texts[0] = -images[0] + 0.1 * rng.normal(size=8)  # a clearly negative cosine: clipped to 0
    expected = [100.0 * max(cosine(i, t), 0.0) for i, t in zip(images, texts)]
    assert expected[0] == 0.0 and min(cosine(i, t) for i, t in zip(images, texts)) < -0.5
    np.testing.assert_allclose(clip_scores(images, texts), expected, rtol=1e-10)
    np.testing.assert_allclose(clip_scores(images, texts).mean(), np.mean(expected), rtol=1e-10)
    # CLIP-T: the same cosines, unscaled and unclipped
    np.testing.assert_allclose(
        cosine_similarities(images, texts), [cosine(i, t) for i, t in zip(images, texts)], rtol=1e-10
    )


def test_clip_i_and_dino_are_the_mean_cosine_over_every_pair():
    rng = np.random.default_rng(11)
    generated = rng.normal(size=(3, 5)) * rng.uniform(0.5, 4.0, size=(3, 1)) + 0.4
    reference = rng.normal(size=(5, 5)) + 0.4
    expected = np.mean([cosine(g, r) for g in generated for r in reference])
    np.testing.assert_allclose(mean_pairwise_cosine(generated, reference), expected, rtol=1e-10)
    paired_only = np.mean([cosine(g, r) for g, r in zip(generated, reference)])
    assert abs(expected - paired_only) > 1e-3


# --- collapse / diversity -----------------------------------------------------------------------------------------
def test_label_entropy_is_the_histogram_entropy_over_log_k():
    labels = [0, 0, 0, 1, 1, 2, 0, 1]
    counts = np.array([4, 3, 1])
    p = counts / counts.sum()
    entropy = -sum(q * np.log(q) for q in p)
    np.testing.assert_allclose(label_entropy(labels, 4), entropy / np.log(4), rtol=1e-12)
    np.testing.assert_allclose(label_entropy(labels, 3), entropy / np.log(3), rtol=1e-12)
    assert label_entropy([2, 2, 2], 5) == 0.0
    np.testing.assert_allclose(label_entropy([0, 1, 2, 3] * 3, 4), 1.0, rtol=1e-12)
    assert label_entropy(list(range(6)), 3) == 1.0  # more labels than expected: capped at 1


def hand_between_group_variance(features: np.ndarray, groups: np.ndarray) -> float:
    n = len(features)
    overall = features.sum(axis=0) / n
    total = 0.0
    for group in set(groups.tolist()):
        rows = features[groups == group]
        total += len(rows) / n * float(((rows.sum(axis=0) / len(rows) - overall) ** 2).sum())
    return total


def test_between_group_variance_and_prompt_separation_by_hand_with_unequal_groups():
    rng = np.random.default_rng(12)
    groups = np.array([0] * 5 + [1] * 12 + [2] * 3)
    centres = np.array([[0.0, 0.0], [3.0, 1.0], [-2.0, 4.0]])
    features = centres[groups] + rng.normal(size=(20, 2))
    reference_groups = np.array([2] * 7 + [0] * 7 + [1] * 7)
    reference = centres[reference_groups] * 0.5 + rng.normal(size=(21, 2))
    ours = between_group_variance(features, groups)
    np.testing.assert_allclose(ours, hand_between_group_variance(features, groups), rtol=1e-12)
    unweighted = np.mean([((features[groups == g].mean(0) - features.mean(0)) ** 2).sum() for g in range(3)])
    assert abs(ours - unweighted) > 1e-2 * ours  # unequal groups: the n_g / n weights matter
    np.testing.assert_allclose(
        prompt_separation(features, groups, reference, reference_groups),
        ours / hand_between_group_variance(reference, reference_groups),
        rtol=1e-12,
    )


def test_between_group_variance_of_a_large_sample_approaches_the_closed_form():
    """Groups of sizes n_g around known centres c_g: sum_g n_g / n |c_g - c|^2 with c = sum_g n_g / n c_g."""
    rng = np.random.default_rng(13)
    sizes, centres = np.array([4000, 12000, 2000]), np.array([[0.0, 0.0, 1.0], [3.0, 1.0, 0.0], [-2.0, 4.0, 2.0]])
    groups = np.repeat(np.arange(3), sizes)
    features = centres[groups] + rng.normal(size=(sizes.sum(), 3))
    weights = sizes / sizes.sum()
    overall = weights @ centres
    expected = float((weights * ((centres - overall) ** 2).sum(axis=1)).sum())
    np.testing.assert_allclose(between_group_variance(features, groups), expected, rtol=0.01)


def test_per_group_accuracy_is_per_expected_label():
    expected = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    predicted = np.array([0, 1, 0, 1, 1, 0, 0, 2, 1])
    assert per_group_accuracy(predicted, expected) == {0: 2 / 3, 1: 1.0, 2: 1 / 4}


# --- through the folder evaluation ---------------------------------------------------------------------------------
class LinearFeatures(nn.Module):
    """Features = flattened RGB pixels in [0, 1] times a fixed matrix."""

    def __init__(self, weight: np.ndarray):
        super().__init__()
        self.weight = nn.Parameter(torch.from_numpy(weight).float(), requires_grad=False)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return batch.flatten(1) @ self.weight


def write_images(folder: Path, pixels: np.ndarray) -> None:
    folder.mkdir()
    for index, image in enumerate(pixels):
        Image.fromarray(image).save(folder / f"{index:03d}.png")


def test_evaluator_fid_and_kid_come_from_the_unbiased_statistics_of_both_folders(tmp_path):
    rng = np.random.default_rng(14)
    generated = rng.integers(0, 256, size=(7, 4, 4, 3), dtype=np.uint8)
    reference = np.clip(rng.normal(160, 40, size=(9, 4, 4, 3)), 0, 255).astype(np.uint8)
    write_images(tmp_path / "generated", generated)
    write_images(tmp_path / "reference", reference)
    weight = rng.normal(size=(48, 4)) / 4
    evaluator = Evaluator(
        ("fid", "kid"),
        reference=tmp_path / "reference",
        feature_extractor=LinearFeatures(weight),
        kid_subsets=2,
        kid_subset_size=100,
        progress=False,
    )
    metrics = evaluator.evaluate(tmp_path / "generated")["metrics"]

    def features(pixels: np.ndarray) -> np.ndarray:  # HWC -> CHW flattened, as a torch batch is
        values = pixels.astype(np.float32) / 255.0
        return values.transpose(0, 3, 1, 2).reshape(len(pixels), -1).astype(np.float64) @ weight.astype(np.float32)

    f_gen, f_ref = features(generated), features(reference)
    expected_fid = hand_frechet(*hand_mean_and_covariance(f_gen), *hand_mean_and_covariance(f_ref))
    np.testing.assert_allclose(metrics["fid"], expected_fid, rtol=1e-4)
    # KID: subsets of min(7, 9) = 7 images from each folder, drawn with the evaluator's seed (0)
    draws = np.random.default_rng(0)
    values = [
        hand_mmd2(f_gen[draws.choice(7, 7, replace=False)], f_ref[draws.choice(9, 7, replace=False)]) for _ in range(2)
    ]
    np.testing.assert_allclose(metrics["kid"], np.mean(values), rtol=1e-4)
    np.testing.assert_allclose(metrics["kid_std"], np.std(values), rtol=1e-3, atol=1e-9)
