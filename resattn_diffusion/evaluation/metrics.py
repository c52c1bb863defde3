"""The metrics: FID, KID, CLIP score, CLIP-T, CLIP-I and DINO, as pure functions and over image folders.

Definitions (all features float64 for the statistics):

* FID (Heusel et al. 2017): ``|mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))`` between Gaussians fitted to the
  Inception features of generated and reference images. Lower is better. Biased upwards for small sets: compare
  only numbers computed on the same number of images (>= 10k for paper-grade numbers).
* KID (Binkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel ``k(x, y) = (x.y / d + 1)^3``,
  averaged over random subsets (mean and std reported). Unbiased, so usable on a few hundred images.
* CLIP score (Hessel et al. 2021, torchmetrics' convention): per image ``100 * max(cos(E_img, E_text), 0)``,
  averaged; ~30 for good SD 1.5 samples with ViT-L/14.
* CLIP-T (DreamBooth, Ruiz et al. 2023): the mean cosine between prompt and image CLIP embeddings, unscaled
  and unclipped (~0.3).
* CLIP-I, DINO (DreamBooth): the mean cosine over all pairs (generated image, real subject image) of CLIP image
  embeddings / DINO CLS features.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import EvaluationError, EvaluationWarning, check_output_file
from .features import CLIPEncoder, DINOEncoder, ImageEncoder, InceptionEncoder, extract_features
from .images import iter_image_batches, list_images, prompts_for_images, read_manifest

#: Metric names, in report order.
METRICS: tuple[str, ...] = ("fid", "kid", "clip_score", "clip_t", "clip_i", "dino")
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
DEFAULT_DINO_MODEL = "facebook/dino-vits16"


# ----------------------------------------------------------------------------------------------------------------
# Pure math
# ----------------------------------------------------------------------------------------------------------------


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased, N - 1) covariance of N x D features, in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise EvaluationError(f"need at least 2 feature vectors (N x D) for statistics, got shape {features.shape}.")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Frechet distance ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrtm(S1 S2))`` between two Gaussians.

    ``sqrtm(S1 S2)`` is computed with ``scipy.linalg.sqrtm``. Numerical care, as in the reference implementation:
    if the product is too singular for a finite root, ``eps * I`` is added to both covariances; the tiny
    imaginary parts round-off leaves in the root are dropped, and only a large one (the covariances are not
    positive semi-definite) is an error.
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0], mu1.shape[0]):
        raise EvaluationError(
            f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape} "
            "(were they computed with different feature extractors?)."
        )
    if not all(np.isfinite(x).all() for x in (mu1, mu2, sigma1, sigma2)):
        # scipy's sqrtm fails with an internal LinAlgError on NaN: say where the NaN comes from instead
        raise EvaluationError(
            "the feature statistics hold NaN or inf (a feature extractor that returned non-finite features?); FID "
            "is undefined for them."
        )
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        largest_imaginary = np.max(np.abs(np.diagonal(covmean).imag))
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise EvaluationError(
                f"sqrtm(S1 S2) has an imaginary part of {largest_imaginary:.3g} on its diagonal: the covariances are "
                "not positive semi-definite (non-finite features?)."
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def polynomial_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 between two samples with ``k(a, b) = (a.b / d + 1)^3``:
    ``mean_{i != j} k(x_i, x_j) + mean_{i != j} k(y_i, y_j) - 2 mean_{i, j} k(x_i, y_j)``."""
    d = x.shape[1]
    k_xx = (x @ x.T / d + 1.0) ** 3
    k_yy = (y @ y.T / d + 1.0) ** 3
    k_xy = (x @ y.T / d + 1.0) ** 3
    m, n = x.shape[0], y.shape[0]
    mean_xx = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    mean_yy = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(mean_xx + mean_yy - 2.0 * k_xy.mean())


#: KID's subsets above this would run for hours on any machine (each one is a subset_size^2 kernel over the features);
#: clean-fid and torchmetrics use 100
MAX_KID_SUBSETS = 10_000


def check_kid_settings(num_subsets: int, subset_size: int) -> None:
    """Refuse KID settings that cannot give a number, before any image is read or generated."""
    for name, value, least in (("subsets", num_subsets, 1), ("subset size", subset_size, 2)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            raise EvaluationError(f"KID {name} must be a whole number >= {least}, got {value!r}.")
    if num_subsets > MAX_KID_SUBSETS:
        raise EvaluationError(
            f"KID subsets must be at most {MAX_KID_SUBSETS:,} (each is a subset-size^2 kernel; 100 is the usual "
            f"count), got {num_subsets:,}."
        )


def kernel_inception_distance(
    features1: np.ndarray,
    features2: np.ndarray,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """KID: mean and std of :func:`polynomial_mmd2` over ``num_subsets`` random subsets (drawn without
    replacement, seeded) of ``min(subset_size, N1, N2)`` vectors from each set."""
    check_kid_settings(num_subsets, subset_size)
    features1 = np.asarray(features1, dtype=np.float64)
    features2 = np.asarray(features2, dtype=np.float64)
    if features1.ndim != 2 or features2.ndim != 2 or features1.shape[1] != features2.shape[1]:
        raise EvaluationError(
            f"KID needs two N x D feature sets of one width, got {features1.shape} and {features2.shape}."
        )
    size = min(subset_size, features1.shape[0], features2.shape[0])
    if size < 2:
        raise EvaluationError(
            f"KID needs at least 2 images in each set, got {features1.shape[0]} and {features2.shape[0]}."
        )
    rng = np.random.default_rng(seed)
    values = [
        polynomial_mmd2(
            features1[rng.choice(features1.shape[0], size, replace=False)],
            features2[rng.choice(features2.shape[0], size, replace=False)],
        )
        for _ in range(num_subsets)
    ]
    return float(np.mean(values)), float(np.std(values))


def _normalize_rows(x: np.ndarray | torch.Tensor) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def cosine_similarities(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine ``cos(a_i, b_i)`` of two N x D arrays."""
    a, b = _normalize_rows(a), _normalize_rows(b)
    if a.shape != b.shape:
        raise EvaluationError(f"cannot pair embeddings of shapes {a.shape} and {b.shape}.")
    return np.sum(a * b, axis=-1)


def clip_scores(image_embeddings: np.ndarray, text_embeddings: np.ndarray) -> np.ndarray:
    """Per-image CLIP score ``100 * max(cos(image_i, text_i), 0)``."""
    return 100.0 * np.maximum(cosine_similarities(image_embeddings, text_embeddings), 0.0)


def mean_pairwise_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean of ``cos(a_i, b_j)`` over all pairs (i, j) -- CLIP-I and DINO."""
    return float((_normalize_rows(a) @ _normalize_rows(b).T).mean())


# ----------------------------------------------------------------------------------------------------------------
# Reference statistics
# ----------------------------------------------------------------------------------------------------------------


def save_reference_statistics(
    images: str | os.PathLike,
    path: str | os.PathLike,
    encoder: ImageEncoder | None = None,
    inception_weights: str | os.PathLike | None = None,
    keep_features: bool = True,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> Path:
    """Compute the features of a reference folder once and save ``mu``, ``sigma`` (FID), the features themselves
    (KID; skip with ``keep_features=False``), the extractor name and the image count to an ``.npz``.

    Pass the file later as the reference (``--reference ref.npz``). Files of pytorch-fid (``mu``/``sigma`` only)
    are read as well, for FID.
    """
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    check_output_file(path, "reference statistics file")  # before the features are computed
    encoder = encoder or InceptionEncoder(inception_weights, device=device)
    features = extract_features(images, encoder, batch_size=batch_size, progress=progress, description="reference")
    mu, sigma = feature_statistics(features)
    arrays = {"mu": mu, "sigma": sigma, "extractor": np.array(encoder.name), "num_images": np.array(len(features))}
    if keep_features:
        arrays["features"] = features.astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    # written beside and renamed into place: an interrupted save never leaves a truncated reference behind
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    try:
        np.savez(temporary, **arrays)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


class ReferenceStatistics:
    """Features or statistics of a reference set: from a folder (features computed on use) or an ``.npz``."""

    def __init__(self, source: str | os.PathLike):
        self.source = Path(source)
        self.features: np.ndarray | None = None
        self.mu: np.ndarray | None = None
        self.sigma: np.ndarray | None = None
        self.extractor: str | None = None
        self.num_images: int | None = None
        if self.source.is_file():
            self._read_npz()
        elif not self.source.is_dir():
            raise EvaluationError(
                f"reference {str(self.source)!r} does not exist; pass a folder of real images or an .npz of "
                "statistics (--reference)."
            )

    @property
    def is_file(self) -> bool:
        return self.source.is_file()

    def _read_npz(self) -> None:
        try:
            with np.load(self.source, allow_pickle=False) as data:
                arrays = {key: data[key] for key in data.files}
        except Exception as err:  # not an npz at all
            raise EvaluationError(f"cannot read reference statistics {str(self.source)!r}: {err}") from err
        if "features" in arrays:
            self.features = self._finite(arrays, "features")
        if "mu" in arrays and "sigma" in arrays:
            self.mu, self.sigma = self._finite(arrays, "mu"), self._finite(arrays, "sigma")
        elif self.features is not None:
            self.mu, self.sigma = feature_statistics(self.features)
        else:
            raise EvaluationError(
                f"{str(self.source)!r} has neither mu/sigma nor features; make it with save_reference_statistics "
                "(resattn-eval stats)."
            )
        self.extractor = str(arrays["extractor"]) if "extractor" in arrays else None
        if "num_images" in arrays:
            count = arrays["num_images"]
            if count.ndim != 0 or count.dtype.kind not in "iu" or int(count) < 0:
                raise EvaluationError(
                    f"reference statistics {str(self.source)!r}: 'num_images' must be a whole number, got {count!r}; "
                    "make the file with save_reference_statistics (resattn-eval stats)."
                )
            self.num_images = int(count)
        elif self.features is not None:
            self.num_images = len(self.features)

    def _finite(self, arrays: dict[str, np.ndarray], key: str) -> np.ndarray:
        """``arrays[key]`` as float64: numbers, all finite (a crafted or damaged file says which array is wrong)."""
        value = arrays[key]
        if value.dtype.kind not in "biuf" or not np.isfinite(value).all():
            raise EvaluationError(
                f"reference statistics {str(self.source)!r}: '{key}' must hold finite numbers, got dtype "
                f"{value.dtype}{' with NaN or inf' if value.dtype.kind in 'f' else ''}; recompute them "
                "(resattn-eval stats)."
            )
        return value.astype(np.float64)

    def load(self, encoder: ImageEncoder, batch_size: int, progress: bool) -> None:
        """Compute features from the folder (once), or check that the file was made with the same extractor."""
        if self.is_file:
            if self.extractor is not None and self.extractor != encoder.name:
                raise EvaluationError(
                    f"reference statistics {str(self.source)!r} were computed with {self.extractor!r}, but this "
                    f"evaluation uses {encoder.name!r}; recompute them with the same feature extractor."
                )
            return
        if self.features is None:
            self.features = extract_features(
                self.source, encoder, batch_size=batch_size, progress=progress, description="reference"
            ).astype(np.float64)
            self.mu, self.sigma = feature_statistics(self.features)
            self.extractor = encoder.name
            self.num_images = len(self.features)


# ----------------------------------------------------------------------------------------------------------------
# Folder evaluation
# ----------------------------------------------------------------------------------------------------------------


def _check_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    if isinstance(metrics, str):
        metrics = [metrics]
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise EvaluationError(f"unknown metric(s) {unknown}; choose from {list(METRICS)}.")
    if not metrics:
        raise EvaluationError(f"no metric chosen; choose from {list(METRICS)}.")
    return tuple(m for m in METRICS if m in metrics)


class Evaluator:
    """Loads the feature extractors once, caches reference features, and evaluates generated folders.

    Args:
        metrics: any of :data:`METRICS`.
        reference: real images for FID/KID: a folder, or an ``.npz`` from :func:`save_reference_statistics`.
        subject: the subject's real images for CLIP-I / DINO (a folder).
        inception_weights: local FID Inception weights file (``--inception-weights``); never downloaded.
        inception_resize, inception_backend: see :class:`.features.InceptionEncoder`.
        feature_extractor: replaces the Inception for FID/KID: an :class:`.features.ImageEncoder`, or an
            ``nn.Module`` taking RGB batches in [0, 1] (then images must share one size).
        clip_model: hub id or local folder of a ``CLIPModel`` (CLIP score, CLIP-T, CLIP-I).
        dino_model: hub id or local folder of a DINO / DINOv2 ViT (DINO metric).
        kid_subsets, kid_subset_size, seed: KID's subset sampling.

    Models are loaded here, before any evaluation, so a missing weight fails fast.
    """

    def __init__(
        self,
        metrics: Sequence[str] = ("fid",),
        reference: str | os.PathLike | None = None,
        subject: str | os.PathLike | None = None,
        inception_weights: str | os.PathLike | None = None,
        inception_resize: str = "pytorch-fid",
        inception_backend: str = "builtin",
        feature_extractor: ImageEncoder | nn.Module | None = None,
        clip_model: str | os.PathLike | None = DEFAULT_CLIP_MODEL,
        dino_model: str | os.PathLike | None = DEFAULT_DINO_MODEL,
        batch_size: int = 32,
        device: str | torch.device = "cpu",
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        seed: int = 0,
        progress: bool = True,
    ):
        self.metrics = _check_metrics(metrics)
        if batch_size < 1:
            raise EvaluationError(f"batch_size must be >= 1, got {batch_size}.")
        self.batch_size = batch_size
        self.progress = progress
        if "kid" in self.metrics:
            check_kid_settings(kid_subsets, kid_subset_size)  # before the encoders load and any image is read
        self.kid_subsets = kid_subsets
        self.kid_subset_size = kid_subset_size
        self.seed = seed

        self.reference: ReferenceStatistics | None = None
        self.distribution_encoder: ImageEncoder | None = None
        if {"fid", "kid"} & set(self.metrics):
            if reference is None:
                raise EvaluationError(
                    "FID and KID need real images to compare with: pass --reference DIR or FILE.npz."
                )
            self.reference = ReferenceStatistics(reference)
            if "kid" in self.metrics and self.reference.is_file and self.reference.features is None:
                raise EvaluationError(
                    f"KID needs reference features, but {str(reference)!r} holds only mu/sigma; pass the image "
                    "folder, or save statistics with features (resattn-eval stats, the default)."
                )
            if feature_extractor is None:
                self.distribution_encoder = InceptionEncoder(
                    inception_weights, resize=inception_resize, backend=inception_backend, device=device
                )
            elif isinstance(feature_extractor, ImageEncoder):
                self.distribution_encoder = feature_extractor
            else:
                self.distribution_encoder = ImageEncoder(feature_extractor, device=device)

        self.subject_files: list[Path] | None = None
        if {"clip_i", "dino"} & set(self.metrics):
            if subject is None:
                raise EvaluationError("CLIP-I and DINO need the subject's real images: pass --subject DIR.")
            self.subject_files = list_images(subject, what="subject folder")

        self.clip: CLIPEncoder | None = None
        if {"clip_score", "clip_t", "clip_i"} & set(self.metrics):
            if clip_model is None:
                raise EvaluationError("CLIP metrics need a CLIP model: pass --clip-model ID_OR_FOLDER.")
            self.clip = CLIPEncoder(clip_model, device=device)
        self.dino: DINOEncoder | None = None
        if "dino" in self.metrics:
            if dino_model is None:
                raise EvaluationError("the DINO metric needs a DINO model: pass --dino-model ID_OR_FOLDER.")
            self.dino = DINOEncoder(dino_model, device=device)
        self._subject_features: dict[str, np.ndarray] = {}

    def _subject(self, encoder: ImageEncoder) -> np.ndarray:
        if encoder.name not in self._subject_features:
            self._subject_features[encoder.name] = extract_features(
                self.subject_files, encoder, self.batch_size, self.progress, description=f"subject {encoder.name}"
            )
        return self._subject_features[encoder.name]

    def _clip_embeddings(self, files: list[Path], prompts: list[str] | None) -> tuple[np.ndarray, np.ndarray | None]:
        from tqdm.auto import tqdm

        image_chunks, text_chunks = [], []
        with tqdm(total=len(files), desc=self.clip.name, unit="img", disable=not self.progress) as bar:
            for start, batch in zip(range(0, len(files), self.batch_size), iter_image_batches(files, self.batch_size)):
                image_chunks.append(self.clip.encode_images(batch).numpy())
                if prompts is not None:
                    text_chunks.append(self.clip.encode_texts(prompts[start : start + len(batch)]).numpy())
                bar.update(len(batch))
        texts = np.concatenate(text_chunks) if prompts is not None else None
        return np.concatenate(image_chunks), texts

    def evaluate(self, generated: str | os.PathLike, prompts: str | os.PathLike | Sequence[str] | None = None) -> dict:
        """Evaluate one folder of generated images; returns a report dict (see :func:`evaluate_folder`)."""
        files = list_images(generated, what="generated image folder")
        generation = _generation_settings(generated)  # a damaged manifest is refused before any model runs
        results: dict[str, float] = {}
        details: dict[str, object] = {}
        notes: list[str] = []

        if self.distribution_encoder is not None:
            encoder = self.distribution_encoder
            self.reference.load(encoder, self.batch_size, self.progress)
            features = extract_features(files, encoder, self.batch_size, self.progress, description="generated")
            details["fid_features"] = encoder.name
            details["reference"] = str(self.reference.source)
            details["num_reference_images"] = self.reference.num_images
            if "fid" in self.metrics:
                mu, sigma = feature_statistics(features)
                results["fid"] = frechet_distance(mu, sigma, self.reference.mu, self.reference.sigma)
                if len(files) < features.shape[1]:
                    notes.append(
                        f"FID on {len(files)} images (< feature dim {features.shape[1]}) is strongly biased upwards; "
                        "compare only with FIDs on the same number of images, or use KID."
                    )
            if "kid" in self.metrics:
                size = min(self.kid_subset_size, len(features), len(self.reference.features))
                results["kid"], results["kid_std"] = kernel_inception_distance(
                    features, self.reference.features, self.kid_subsets, self.kid_subset_size, self.seed
                )
                details["kid_subsets"] = self.kid_subsets
                details["kid_subset_size"] = size

        if self.clip is not None:
            need_text = bool({"clip_score", "clip_t"} & set(self.metrics))
            prompt_list = prompts_for_images(files, prompts) if need_text else None
            image_embeddings, text_embeddings = self._clip_embeddings(files, prompt_list)
            details["clip_model"] = self.clip.name.removeprefix("clip:")
            if text_embeddings is not None:
                cosines = cosine_similarities(image_embeddings, text_embeddings)
                if "clip_score" in self.metrics:
                    results["clip_score"] = float(clip_scores(image_embeddings, text_embeddings).mean())
                if "clip_t" in self.metrics:
                    results["clip_t"] = float(cosines.mean())
            if "clip_i" in self.metrics:
                results["clip_i"] = mean_pairwise_cosine(image_embeddings, self._subject(self.clip))
        if self.dino is not None:
            features = extract_features(files, self.dino, self.batch_size, self.progress, description=self.dino.name)
            results["dino"] = mean_pairwise_cosine(features, self._subject(self.dino))
            details["dino_model"] = self.dino.name.removeprefix("dino:")
        if self.subject_files is not None:
            details["subject"] = str(self.subject_files[0].parent)
            details["num_subject_images"] = len(self.subject_files)

        for name, value in results.items():
            if not math.isfinite(value):
                notes.append(f"{name} is {value}: check the images and features for NaNs.")
        report = {
            "generated": str(Path(generated)),
            "num_images": len(files),
            "metrics": {name: results[name] for name in (*METRICS, "kid_std") if name in results},
            "details": details,
            "generation": generation,
            "notes": notes,
        }
        for note in notes:
            warnings.warn(note, EvaluationWarning, stacklevel=2)
        return report


def _generation_settings(folder: str | os.PathLike) -> dict | None:
    """The settings shared by every image of a generated folder's manifest (None without a manifest)."""
    records = read_manifest(folder)
    if not records:
        return None
    shared = {}
    for key in ("pipeline", "steps", "guidance", "tuner", "scale", "negative_prompt", "height", "width"):
        values = {repr(record.get(key)) for record in records}
        if len(values) == 1:
            shared[key] = records[0].get(key)
    shared["num_prompts"] = len({record.get("prompt") for record in records})
    shared["num_seeds"] = len({record.get("seed") for record in records})
    return shared


def evaluate_folder(
    generated: str | os.PathLike,
    metrics: Sequence[str] = ("fid",),
    prompts: str | os.PathLike | Sequence[str] | None = None,
    **evaluator_kwargs,
) -> dict:
    """Evaluate one folder of generated images.

    Args:
        generated: the folder (e.g. written by :func:`.generate.generate_images`).
        metrics: any of :data:`METRICS`.
        prompts: per-image prompts for CLIP score / CLIP-T (list or text file, file-name order; one prompt
            applies to all). Default: the folder's ``manifest.jsonl``.
        **evaluator_kwargs: see :class:`Evaluator` (``reference``, ``subject``, ``inception_weights``,
            ``feature_extractor``, ``clip_model``, ``dino_model``, ``batch_size``, ``device``, ...).

    Returns:
        ``{"generated", "num_images", "metrics": {name: value}, "details": {models, reference, ...},
        "generation": settings from the manifest or None, "notes": [warnings]}``. KID adds ``kid_std``.
    """
    return Evaluator(metrics, **evaluator_kwargs).evaluate(generated, prompts)
