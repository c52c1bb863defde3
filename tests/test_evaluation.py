"""Tests of resattn_diffusion.evaluation: the metric math, the feature extractors on tiny random models saved to
folders, resumable generation with a tuner, and the command line end to end. CPU, offline, tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from resattn_diffusion.evaluation import (
    MANIFEST_NAME,
    CLIPEncoder,
    DINOEncoder,
    EvaluationError,
    Evaluator,
    FIDInceptionV3,
    InceptionEncoder,
    clip_scores,
    evaluate_folder,
    feature_statistics,
    frechet_distance,
    generate_images,
    kernel_inception_distance,
    list_images,
    load_image,
    polynomial_mmd2,
    resize_bilinear_tf1,
)
from resattn_diffusion.evaluation.cli import main, parse_seeds

# ----------------------------------------------------------------------------------------------------------------
# Helpers and fixtures
# ----------------------------------------------------------------------------------------------------------------


def write_random_images(folder: Path, count: int, seed: int, size: tuple[int, int] = (32, 32)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        pixels = rng.integers(0, 256, size=(size[0], size[1], 3), dtype=np.uint8)
        path = folder / f"img_{index:03d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def _pil_processor(module_name: str, **kwargs):
    """The PIL-backed image processor of transformers 5 (torchvision is not installed), or the v4 class."""
    import transformers

    return getattr(transformers, module_name + "Pil", getattr(transformers, module_name))(**kwargs)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    """A tiny random CLIPModel + generated tokenizer + image processor, saved like a hub folder."""
    from transformers import CLIPConfig, CLIPModel

    from resattn_diffusion.testing import make_tokenizer

    folder = tmp_path_factory.mktemp("clip")
    tokenizer = make_tokenizer()
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    torch.manual_seed(7)  # a seed whose cosines on the test images have both signs
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    processor = _pil_processor("CLIPImageProcessor", size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dino_folders(tmp_path_factory) -> dict[str, Path]:
    """Tiny random DINO-style ViT and DINOv2 models with their image processors."""
    from transformers import Dinov2Config, Dinov2Model, ViTConfig, ViTModel

    root = tmp_path_factory.mktemp("dino")
    shape = dict(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, image_size=32, patch_size=8
    )
    torch.manual_seed(2)
    ViTModel(ViTConfig(**shape), add_pooling_layer=False).save_pretrained(root / "vit")
    _pil_processor("ViTImageProcessor", size={"height": 32, "width": 32}).save_pretrained(root / "vit")
    Dinov2Model(Dinov2Config(**shape)).save_pretrained(root / "dinov2")
    square = {"height": 32, "width": 32}
    dinov2_processor = _pil_processor("BitImageProcessor", size={"shortest_edge": 32}, crop_size=square)
    dinov2_processor.save_pretrained(root / "dinov2")
    return {"vit": root / "vit", "dinov2": root / "dinov2"}


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory) -> Path:
    """A random-weight FID Inception state dict saved as a .pth file (stands in for the real weights file)."""
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("inception") / "random_inception.pth"
    torch.save(FIDInceptionV3().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def pipeline():
    from resattn_diffusion.testing import tiny_pipeline

    return tiny_pipeline("sd1")


@pytest.fixture(scope="module")
def tuner_file(tmp_path_factory) -> Path:
    """A Res-Attn tuner for the tiny SD 1 UNet with random (non-zero) weights, saved to a file."""
    from resattn_diffusion import ResTunerConfig, add_res_tuner, res_tuner_parameters, save_res_tuner
    from resattn_diffusion.testing import tiny_unet

    unet = tiny_unet("sd1")
    add_res_tuner(unet, ResTunerConfig("res_attn", rank=4, heads=2))
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for parameter in res_tuner_parameters(unet):
            parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))
    return save_res_tuner(unet, tmp_path_factory.mktemp("tuner") / "res_attn.safetensors")


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


# ----------------------------------------------------------------------------------------------------------------
# Metric math
# ----------------------------------------------------------------------------------------------------------------


def test_frechet_distance_equals_closed_form_for_commuting_covariances():
    rng = np.random.default_rng(0)
    dim = 6
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    eig1, eig2 = rng.uniform(0.2, 3.0, size=dim), rng.uniform(0.2, 3.0, size=dim)
    # Diagonal: tr(S1 + S2 - 2 sqrt(S1 S2)) = sum (sqrt(l1) - sqrt(l2))^2.
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(eig1) - np.sqrt(eig2)) ** 2)
    assert frechet_distance(mu1, np.diag(eig1), mu2, np.diag(eig2)) == pytest.approx(expected, rel=1e-9)
    # The same eigenvalues in a shared rotated basis (commuting, non-diagonal covariances): same distance.
    rotation, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    sigma1, sigma2 = rotation @ np.diag(eig1) @ rotation.T, rotation @ np.diag(eig2) @ rotation.T
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-7)
    # Isotropic unit Gaussians: only the squared mean distance is left.
    assert frechet_distance(mu1, np.eye(dim), mu2, np.eye(dim)) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-9)


def test_frechet_distance_is_zero_for_identical_sets_and_survives_singular_covariances():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(500, 8)) @ rng.normal(size=(8, 8))
    mu, sigma = feature_statistics(features)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8
    # Fewer samples than dimensions (rank-deficient covariances, as with FID on a few images): finite, >= 0.
    small_a, small_b = rng.normal(size=(5, 32)), rng.normal(size=(5, 32)) + 0.5
    distance = frechet_distance(*feature_statistics(small_a), *feature_statistics(small_b))
    assert np.isfinite(distance) and distance > 0
    same = frechet_distance(*feature_statistics(small_a), *feature_statistics(small_a))
    assert abs(same) < 1e-5
    with pytest.raises(EvaluationError, match="different feature extractors"):
        frechet_distance(mu, sigma, mu[:4], sigma[:4, :4])


def test_kid_is_near_zero_for_identical_sets_and_positive_for_shifted_ones():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(5, 3))
    # Unbiased MMD^2 by explicit loops over the kernel k(a, b) = (a.b / d + 1)^3.
    k = lambda a, b: (a @ b / 3 + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(6) for j in range(6) if i != j) / (6 * 5)
    yy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    xy = sum(k(x[i], y[j]) for i in range(6) for j in range(5)) / (6 * 5)
    assert polynomial_mmd2(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)

    features = rng.normal(size=(400, 16))
    same_mean, same_std = kernel_inception_distance(features, features, num_subsets=20, subset_size=100)
    shifted_mean, shifted_std = kernel_inception_distance(features, features + 1.0, num_subsets=20, subset_size=100)
    assert abs(same_mean) < 0.05
    assert shifted_mean > 0.5 and shifted_mean > 10 * shifted_std
    with pytest.raises(EvaluationError, match="at least 2"):
        kernel_inception_distance(features[:1], features)


def test_clip_score_clips_negative_cosines_at_zero():
    image = np.array([[1.0, 0.0], [1.0, 0.0], [3.0, 4.0]])
    text = np.array([[2.0, 0.0], [-1.0, 0.0], [4.0, 3.0]])
    np.testing.assert_allclose(clip_scores(image, text), [100.0, 0.0, 96.0])


# ----------------------------------------------------------------------------------------------------------------
# Feature extractors
# ----------------------------------------------------------------------------------------------------------------


def test_clip_score_and_clip_t_equal_a_hand_computation(tmp_path, clip_folder):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    files = write_random_images(tmp_path / "gen", 6, seed=0)
    prompts = [
        "a photo of a dog",
        "a red car",
        "a cat in the snow",
        "an old castle",
        "a blue bird",
        "sks dog on the beach",
    ]
    report = evaluate_folder(
        tmp_path / "gen",
        ["clip_score", "clip_t"],
        prompts=prompts,
        clip_model=clip_folder,
        batch_size=4,
        progress=False,
    )

    model = CLIPModel.from_pretrained(clip_folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(clip_folder)
    processor = AutoImageProcessor.from_pretrained(clip_folder)
    with torch.no_grad():
        images = [Image.open(f).convert("RGB") for f in files]
        pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
        image_embeds = model.visual_projection(model.vision_model(pixel_values=pixel_values).pooler_output)
        tokens = tokenizer(prompts, padding=True, return_tensors="pt")
        text_embeds = model.text_projection(
            model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output
        )
        cosines = F.cosine_similarity(image_embeds, text_embeds, dim=-1).double().numpy()
    assert (cosines < 0).any() and (cosines > 0).any()  # the clipping at 0 matters for these inputs
    assert report["metrics"]["clip_score"] == pytest.approx(float(np.mean(100 * np.maximum(cosines, 0))), abs=1e-4)
    assert report["metrics"]["clip_t"] == pytest.approx(float(np.mean(cosines)), abs=1e-6)
    assert report["details"]["clip_model"] == str(clip_folder)

    with pytest.raises(EvaluationError, match="2 prompts for 6 images"):
        evaluate_folder(tmp_path / "gen", ["clip_score"], prompts=prompts[:2], clip_model=clip_folder, progress=False)


@pytest.mark.parametrize("kind", ["vit", "dinov2"])
def test_clip_i_and_dino_equal_mean_pairwise_cosine(tmp_path, clip_folder, dino_folders, kind):
    from transformers import AutoImageProcessor, AutoModel, CLIPModel

    generated = write_random_images(tmp_path / "gen", 3, seed=1)
    subject = write_random_images(tmp_path / "subject", 4, seed=2, size=(40, 48))
    report = evaluate_folder(
        tmp_path / "gen",
        ["clip_i", "dino"],
        subject=tmp_path / "subject",
        clip_model=clip_folder,
        dino_model=dino_folders[kind],
        batch_size=2,
        progress=False,
    )

    def mean_pairwise(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(np.mean([[F.cosine_similarity(u, v, dim=0).item() for v in b] for u in a]))

    def load(paths):
        return [Image.open(p).convert("RGB") for p in paths]

    with torch.no_grad():
        clip = CLIPModel.from_pretrained(clip_folder).eval()
        clip_processor = AutoImageProcessor.from_pretrained(clip_folder)
        clip_embed = lambda paths: clip.visual_projection(  # noqa: E731
            clip.vision_model(
                pixel_values=clip_processor(images=load(paths), return_tensors="pt")["pixel_values"]
            ).pooler_output
        )
        dino = AutoModel.from_pretrained(dino_folders[kind]).eval()
        dino_processor = AutoImageProcessor.from_pretrained(dino_folders[kind])
        dino_embed = lambda paths: dino(  # noqa: E731
            pixel_values=dino_processor(images=load(paths), return_tensors="pt")["pixel_values"]
        ).last_hidden_state[:, 0]
        expected_clip_i = mean_pairwise(clip_embed(generated), clip_embed(subject))
        expected_dino = mean_pairwise(dino_embed(generated), dino_embed(subject))
    assert report["metrics"]["clip_i"] == pytest.approx(expected_clip_i, abs=1e-5)
    assert report["metrics"]["dino"] == pytest.approx(expected_dino, abs=1e-5)
    assert report["details"]["num_subject_images"] == 4


def test_inception_has_2048_features_and_loads_a_weights_file(tmp_path, inception_weights):
    reference = FIDInceptionV3()
    reference.load_state_dict(torch.load(inception_weights, weights_only=True))
    images = torch.rand(2, 3, 40, 56)
    with torch.no_grad():
        expected = reference(images)
    assert expected.shape == (2, 2048)

    encoder = InceptionEncoder(weights_path=inception_weights)
    pil_images = [Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for img in images]
    with torch.no_grad():
        as_tensor = torch.stack([torch.from_numpy(np.array(p)).permute(2, 0, 1).float() / 255 for p in pil_images])
        expected_from_pil = reference(as_tensor)
    torch.testing.assert_close(encoder.encode_images(pil_images), expected_from_pil, rtol=1e-4, atol=1e-5)

    # Files of older torch lack BatchNorm's num_batches_tracked; they load too. A foreign file is refused.
    state = torch.load(inception_weights, weights_only=True)
    state = {key: value for key, value in state.items() if "num_batches_tracked" not in key}
    torch.save(state, tmp_path / "old.pth")
    FIDInceptionV3().load_weights(tmp_path / "old.pth")
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "foreign.pth")
    with pytest.raises(EvaluationError, match="not an FID Inception weights file"):
        FIDInceptionV3().load_weights(tmp_path / "foreign.pth")


def test_inception_resize_modes():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    # TF1 legacy bilinear: output pixel i samples input i * in / out; 4 -> 2 picks rows/cols 0 and 2.
    torch.testing.assert_close(resize_bilinear_tf1(x, (2, 2)), torch.tensor([[[[0.0, 2.0], [8.0, 10.0]]]]))
    # 4 -> 8: steps of 0.5, the last source position (3.5) clamps to the edge.
    torch.testing.assert_close(resize_bilinear_tf1(x, (8, 8))[0, 0, 0], torch.tensor([0, 0.5, 1, 1.5, 2, 2.5, 3, 3.0]))
    images = torch.rand(1, 3, 32, 32)
    expected = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
    torch.testing.assert_close(FIDInceptionV3("pytorch-fid").resize(images), expected)
    ones = torch.ones(1, 3, 299, 299)
    assert FIDInceptionV3("pytorch-fid").normalize(ones).max() == 1.0
    assert FIDInceptionV3("tf1").normalize(ones).max() == pytest.approx(127 / 128)


def test_offline_without_weights_the_error_names_the_flag(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RESATTN_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty_hub"))
    write_random_images(tmp_path / "gen", 2, seed=0)
    with pytest.raises(EvaluationError, match="--inception-weights"):
        InceptionEncoder()
    with pytest.raises(EvaluationError, match="--inception-weights"):
        Evaluator(["fid"], reference=tmp_path / "gen")
    # The default hub ids cannot be reached offline (the test session runs with HF_HUB_OFFLINE=1).
    with pytest.raises(EvaluationError, match="--clip-model"):
        CLIPEncoder("openai/clip-vit-large-patch14")
    with pytest.raises(EvaluationError, match="--dino-model"):
        DINOEncoder(str(tmp_path / "no_such_dino"))
    code = main(
        [
            "metrics",
            "--generated",
            str(tmp_path / "gen"),
            "--reference",
            str(tmp_path / "gen"),
            "--metrics",
            "fid",
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    assert code == 2
    assert "--inception-weights" in capsys.readouterr().err


def test_bad_inputs_give_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvaluationError, match="holds no images"):
        list_images(tmp_path / "empty")
    with pytest.raises(EvaluationError, match="does not exist"):
        list_images(tmp_path / "missing")
    write_random_images(tmp_path / "gen", 2, seed=0)
    (tmp_path / "gen" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(EvaluationError, match="broken.png"):
        load_image(tmp_path / "gen" / "broken.png")
    with pytest.raises(EvaluationError, match="broken.png"):
        evaluate_folder(
            tmp_path / "gen", ["fid"], reference=tmp_path / "gen", feature_extractor=torch.nn.Flatten(), progress=False
        )
    with pytest.raises(EvaluationError, match="unknown metric"):
        Evaluator(["fidd"])
    with pytest.raises(EvaluationError, match="--reference"):
        Evaluator(["kid"])
    assert parse_seeds(["0-2", "7,9"]) == [0, 1, 2, 7, 9]


# ----------------------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------------------


def test_generation_is_resumable_and_depends_only_on_prompt_and_seed(tmp_path, pipeline):
    prompts = ["a photo of a dog", "a red car"]
    settings = dict(num_inference_steps=2, progress=False)
    first = generate_images(pipeline, prompts, tmp_path / "a", seeds=[0], batch_size=2, **settings)
    assert (first.num_generated, first.num_reused) == (2, 0)
    kept = {record["file"]: (tmp_path / "a" / record["file"]).stat().st_mtime_ns for record in first.records}

    second = generate_images(pipeline, prompts, tmp_path / "a", seeds=[0, 1], batch_size=2, **settings)
    assert (second.num_generated, second.num_reused) == (2, 2)
    for name, mtime in kept.items():
        assert (tmp_path / "a" / name).stat().st_mtime_ns == mtime  # kept, not regenerated
    lines = [json.loads(line) for line in (tmp_path / "a" / MANIFEST_NAME).read_text().splitlines()]
    assert len(lines) == 4 and len(list_images(tmp_path / "a")) == 4
    assert {(r["prompt"], r["seed"]) for r in lines} == {(p, s) for p in prompts for s in (0, 1)}
    assert all(r["steps"] == 2 and r["guidance"] == 7.5 and r["tuner"] is None for r in lines)

    # The same (prompt, seed) generated alone, in another batch: the same image.
    alone = generate_images(pipeline, prompts, tmp_path / "b", seeds=[1, 0], batch_size=1, **settings)
    for record in alone.records:
        assert np.abs(pixels(tmp_path / "a" / record["file"]) - pixels(tmp_path / "b" / record["file"])).max() <= 1

    # A deleted image is regenerated; another setting in the same folder is refused.
    (tmp_path / "a" / first.records[0]["file"]).unlink()
    again = generate_images(pipeline, prompts, tmp_path / "a", seeds=[0, 1], num_inference_steps=2, progress=False)
    assert (again.num_generated, again.num_reused) == (1, 3)
    with pytest.raises(EvaluationError, match="other settings"):
        generate_images(pipeline, prompts, tmp_path / "a", seeds=[0], num_inference_steps=3, progress=False)


def test_generation_with_a_tuner_and_its_scale(tmp_path, pipeline, tuner_file):
    from resattn_diffusion import get_res_tuner_configs

    prompts = ["a photo of a dog"]
    plain = generate_images(pipeline, prompts, tmp_path / "plain", seeds=[0], num_inference_steps=2, progress=False)
    tuned = generate_images(
        pipeline,
        prompts,
        tmp_path / "tuned",
        seeds=[0],
        num_inference_steps=2,
        tuner_path=tuner_file,
        tuner_scale=1.0,
        progress=False,
    )
    off = generate_images(
        pipeline,
        prompts,
        tmp_path / "off",
        seeds=[0],
        num_inference_steps=2,
        tuner_path=tuner_file,
        tuner_scale=0.0,
        progress=False,
    )
    name = plain.records[0]["file"]
    assert np.abs(pixels(tmp_path / "tuned" / name) - pixels(tmp_path / "plain" / name)).max() > 10
    assert np.abs(pixels(tmp_path / "off" / name) - pixels(tmp_path / "plain" / name)).max() <= 1
    assert tuned.records[0]["tuner"] == str(Path(tuner_file).resolve()) and tuned.records[0]["scale"] == 1.0
    assert off.records[0]["scale"] == 0.0
    assert get_res_tuner_configs(pipeline.unet) == {}  # the tuner was removed after generating


# ----------------------------------------------------------------------------------------------------------------
# Command line, end to end
# ----------------------------------------------------------------------------------------------------------------


FEATURE_EXTRACTOR_FILE = """
import torch

def make():
    # 4x4 average colours: a 48-d "feature extractor" standing in for a user's classifier.
    return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten())
"""


def test_cli_generates_with_a_tuner_then_reports_json_and_markdown(tmp_path, tuner_file, clip_folder, capsys):
    from resattn_diffusion.testing import save_tiny_pipeline

    pipeline_dir = save_tiny_pipeline("sd1", tmp_path / "pipe")
    (tmp_path / "prompts.txt").write_text("a photo of a dog\n\na red car\n")
    out = tmp_path / "gen"
    common = [
        "--pipeline",
        str(pipeline_dir),
        "--prompts",
        str(tmp_path / "prompts.txt"),
        "--steps",
        "2",
        "--tuner",
        str(tuner_file),
        "--tuner-scale",
        "0.5",
        "--out",
        str(out),
        "--device",
        "cpu",
        "--no-progress",
    ]
    assert main(["generate", *common, "--seeds", "0-1"]) == 0
    assert main(["generate", *common, "--num-seeds", "3"]) == 0
    assert "2 images generated, 4 kept" in capsys.readouterr().out
    assert len(list_images(out)) == 6

    write_random_images(tmp_path / "ref", 5, seed=5)
    (tmp_path / "fx.py").write_text(FEATURE_EXTRACTOR_FILE)
    metric_args = [
        "--reference",
        str(tmp_path / "ref"),
        "--feature-extractor",
        f"{tmp_path / 'fx.py'}:make",
        "--clip-model",
        str(clip_folder),
        "--kid-subsets",
        "10",
        "--kid-subset-size",
        "4",
        "--device",
        "cpu",
        "--no-progress",
    ]
    assert (
        main(
            [
                "metrics",
                "--generated",
                str(out),
                *metric_args,
                "--metrics",
                "fid",
                "kid",
                "clip_score",
                "clip_t",
                "--json",
                str(tmp_path / "report.json"),
                "--markdown",
                str(tmp_path / "report.md"),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "report.json").read_text())["reports"][0]
    assert report["num_images"] == 6
    assert set(report["metrics"]) == {"fid", "kid", "kid_std", "clip_score", "clip_t"}
    assert report["generation"]["tuner"] == str(Path(tuner_file).resolve()) and report["generation"]["scale"] == 0.5
    table = (tmp_path / "report.md").read_text()
    assert table.splitlines()[0].startswith("| run | images | tuner | scale | FID")
    assert table in printed and "res_attn.safetensors" in table

    # The FID equals the Frechet distance of the extractor's features computed by hand.
    def features(folder):
        return np.stack(
            [
                F.adaptive_avg_pool2d(torch.from_numpy(pixels(p).astype(np.float32) / 255).permute(2, 0, 1), 4)
                .flatten()
                .numpy()
                for p in list_images(folder)
            ]
        )

    expected = frechet_distance(*feature_statistics(features(out)), *feature_statistics(features(tmp_path / "ref")))
    assert report["metrics"]["fid"] == pytest.approx(expected, rel=1e-4)

    # Saved reference statistics give the same FID and KID as the folder.
    assert (
        main(
            [
                "stats",
                "--images",
                str(tmp_path / "ref"),
                "--out",
                str(tmp_path / "ref.npz"),
                "--feature-extractor",
                f"{tmp_path / 'fx.py'}:make",
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "metrics",
                "--generated",
                str(out),
                *metric_args,
                "--reference",
                str(tmp_path / "ref.npz"),
                "--metrics",
                "fid",
                "kid",
            ]
        )
        == 0
    )
    from_stats = json.loads((out / "metrics.json").read_text())["reports"][0]["metrics"]
    assert from_stats["fid"] == pytest.approx(report["metrics"]["fid"], rel=1e-5)
    assert from_stats["kid"] == pytest.approx(report["metrics"]["kid"], rel=1e-5)


def test_cli_all_with_inception_weights_for_kid(tmp_path, tuner_file, inception_weights, clip_folder):
    from resattn_diffusion.testing import save_tiny_pipeline

    pipeline_dir = save_tiny_pipeline("sd1", tmp_path / "pipe")
    write_random_images(tmp_path / "ref", 3, seed=6, size=(48, 40))
    out = tmp_path / "gen"
    code = main(
        [
            "all",
            "--pipeline",
            str(pipeline_dir),
            "--prompt",
            "a photo of a dog",
            "--prompt",
            "a red car",
            "--seeds",
            "0",
            "1",
            "--steps",
            "2",
            "--tuner",
            str(tuner_file),
            "--out",
            str(out),
            "--reference",
            str(tmp_path / "ref"),
            "--inception-weights",
            str(inception_weights),
            "--clip-model",
            str(clip_folder),
            "--metrics",
            "kid",
            "clip_score",
            "--kid-subset-size",
            "3",
            "--kid-subsets",
            "5",
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    assert code == 0
    report = json.loads((out / "metrics.json").read_text())["reports"][0]
    assert report["details"]["fid_features"] == "inception-v3-fid/pytorch-fid"
    assert np.isfinite(report["metrics"]["kid"]) and 0 <= report["metrics"]["clip_score"] <= 100
    assert (out / "metrics.md").read_text().count("\n") == 3
