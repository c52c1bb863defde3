"""Evaluation: generate image folders with a tuner, then measure FID, KID, CLIP score, CLIP-T, CLIP-I and DINO.

Python API::

    from resattn_diffusion.evaluation import generate_images, evaluate_folder

    generate_images(pipe, "prompts.txt", "out/res_attn_s1", seeds=range(4), tuner_path="tuner.safetensors")
    report = evaluate_folder("out/res_attn_s1", metrics=["fid", "kid", "clip_score"], reference="coco_val/",
                             inception_weights="pt_inception-2015-12-05-6726825d.pth", clip_model="clip_folder/")

Command line: ``resattn-eval {generate,metrics,stats,all} ...`` (see :mod:`.cli`).
"""

from ..images import IMAGE_EXTENSIONS
from .collapse import between_group_variance, label_entropy, per_group_accuracy, prompt_separation
from .errors import EvaluationError, EvaluationWarning
from .features import (
    CLIPEncoder,
    DINOEncoder,
    ImageEncoder,
    InceptionEncoder,
    extract_features,
    images_to_tensor,
)
from .generate import GenerationResult, generate_images, image_file_name, load_pipeline
from .images import MANIFEST_NAME, list_images, load_image, read_manifest, read_prompts
from .inception import (
    FID_WEIGHTS_NAME,
    FID_WEIGHTS_URL,
    FIDInceptionV3,
    find_inception_weights,
    load_fid_inception,
    resize_bilinear_tf1,
)
from .metrics import (
    DEFAULT_CLIP_MODEL,
    DEFAULT_DINO_MODEL,
    METRICS,
    Evaluator,
    ReferenceStatistics,
    clip_scores,
    cosine_similarities,
    evaluate_folder,
    feature_statistics,
    frechet_distance,
    kernel_inception_distance,
    mean_pairwise_cosine,
    polynomial_mmd2,
    save_reference_statistics,
)
from .report import format_markdown_table, write_reports

__all__ = [
    "CLIPEncoder",
    "DEFAULT_CLIP_MODEL",
    "DEFAULT_DINO_MODEL",
    "DINOEncoder",
    "EvaluationError",
    "EvaluationWarning",
    "Evaluator",
    "FIDInceptionV3",
    "FID_WEIGHTS_NAME",
    "FID_WEIGHTS_URL",
    "GenerationResult",
    "IMAGE_EXTENSIONS",
    "ImageEncoder",
    "InceptionEncoder",
    "MANIFEST_NAME",
    "METRICS",
    "ReferenceStatistics",
    "clip_scores",
    "cosine_similarities",
    "evaluate_folder",
    "extract_features",
    "feature_statistics",
    "find_inception_weights",
    "format_markdown_table",
    "frechet_distance",
    "generate_images",
    "image_file_name",
    "images_to_tensor",
    "kernel_inception_distance",
    "list_images",
    "load_fid_inception",
    "load_image",
    "load_pipeline",
    "mean_pairwise_cosine",
    "polynomial_mmd2",
    "read_manifest",
    "read_prompts",
    "resize_bilinear_tf1",
    "save_reference_statistics",
    "write_reports",
    "between_group_variance",
    "label_entropy",
    "per_group_accuracy",
    "prompt_separation",
]
