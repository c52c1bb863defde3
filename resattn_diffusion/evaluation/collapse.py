"""Does a model draw different things for different prompts? Two mode-collapse scores, and a per-prompt check.

A Frechet distance compares two clouds of features as wholes, so a model that draws one plausible image for every
prompt can sit close to the reference cloud (it was seen: a tuner drawing the same styled blob for every digit
scored a style FD next to full fine-tuning's). These scores look at the prompts separately:

* :func:`label_entropy` -- normalised entropy of the labels a judge (a classifier) gives all samples, pooled over
  prompts: ``H(p) / log K`` with ``p`` the label histogram and ``K`` the number of prompts (the labels one would
  expect). 1 when the samples spread evenly over ``K`` labels, 0 when every sample gets the same label.
* :func:`prompt_separation` -- how far apart the prompts' feature means lie, relative to a reference set with the
  same grouping (real images of each class): ``B(generated) / B(reference)`` with
  ``B = sum_g n_g / n |mu_g - mu|^2`` the between-group variance (its trace) of features ``mu_g`` per group.
  About 1 for samples that differ between prompts as real data does, 0 for a constant image set (or any set
  whose samples do not depend on the prompt), above 1 for prompts drawn more apart than real data (e.g. one
  prototype per prompt).
* :func:`per_group_accuracy` -- the accuracy of each prompt's samples separately, so one forgotten prompt is not
  averaged away (report its minimum).

All are pure numpy; the caller picks the judge and its features.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import EvaluationError


def label_entropy(labels: Sequence[int] | np.ndarray, num_labels: int) -> float:
    """Normalised entropy ``H / log(num_labels)`` of the histogram of ``labels`` (0 = one label, 1 = uniform)."""
    labels = np.asarray(labels).ravel()
    if labels.size == 0:
        raise EvaluationError("label_entropy needs at least one label.")
    if num_labels < 2:
        raise EvaluationError(f"label_entropy needs num_labels >= 2 (the labels one would expect), got {num_labels}.")
    _, counts = np.unique(labels, return_counts=True)
    p = counts / counts.sum()
    return float(min(-(p * np.log(p)).sum() / np.log(num_labels), 1.0))


def between_group_variance(features: np.ndarray, groups: Sequence | np.ndarray) -> float:
    """Trace of the between-group covariance: ``sum_g n_g / n |mu_g - mu|^2`` over the rows of ``features``."""
    features = np.asarray(features, dtype=np.float64)
    groups = np.asarray(groups)
    if features.ndim != 2 or groups.shape != (features.shape[0],):
        raise EvaluationError(
            f"need features (N x D) and one group per row, got features {features.shape} and groups {groups.shape}."
        )
    mean = features.mean(axis=0)
    total = 0.0
    for group in np.unique(groups):
        rows = features[groups == group]
        total += len(rows) / len(features) * float(((rows.mean(axis=0) - mean) ** 2).sum())
    return total


def prompt_separation(
    features: np.ndarray,
    groups: Sequence | np.ndarray,
    reference_features: np.ndarray,
    reference_groups: Sequence | np.ndarray,
) -> float:
    """Between-prompt variance of generated features over that of reference features grouped the same way."""
    generated_groups, reference_set = set(np.asarray(groups).tolist()), set(np.asarray(reference_groups).tolist())
    if len(generated_groups) < 2 or generated_groups != reference_set:
        raise EvaluationError(
            "prompt_separation needs at least two groups and the same groups in both sets; got "
            f"{sorted(generated_groups)} generated and {sorted(reference_set)} reference."
        )
    reference = between_group_variance(reference_features, reference_groups)
    if reference <= 0:
        raise EvaluationError(
            "the reference groups do not differ (between-group variance 0); pick a reference set whose groups differ."
        )
    return between_group_variance(features, groups) / reference


def per_group_accuracy(
    predicted: Sequence[int] | np.ndarray, expected: Sequence[int] | np.ndarray
) -> dict[int, float]:
    """``expected label -> share of its samples predicted as it`` (the per-prompt content check)."""
    predicted, expected = np.asarray(predicted), np.asarray(expected)
    if predicted.shape != expected.shape or predicted.size == 0:
        raise EvaluationError(
            f"need as many predictions as expected labels, got {predicted.shape} and {expected.shape}."
        )
    return {int(label): float(np.mean(predicted[expected == label] == label)) for label in np.unique(expected)}
