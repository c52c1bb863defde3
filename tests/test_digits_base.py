"""The digits benchmark's foundation: data, the shipped classifier, the shipped base pipeline (all fast)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.digits.classifier import (
    DEFAULT_CLASSIFIER_DIR,
    DigitClassifier,
    load_digit_classifier,
    random_affine,
    save_digit_classifier,
)
from benchmarks.digits.data import (
    DIGIT_NAMES,
    STYLES,
    DigitSet,
    apply_style,
    base_training_set,
    caption_for,
    caption_words,
    load_digits_split,
    to_grayscale_tensor,
    upsample_digits,
)
from benchmarks.digits.evaluate_base import (
    DEFAULT_BASE_MODEL_DIR,
    evaluate_prompt_following,
    load_base_pipeline,
    save_image_grid,
)

# --- data ---------------------------------------------------------------------------------------------------------


def test_split_shapes_ranges_and_determinism():
    train, test = load_digits_split("train"), load_digits_split("test")
    assert len(train) + len(test) == 1797
    assert train.images.shape == (len(train), 32, 32) and train.images.dtype == np.float32
    assert 0.0 <= train.images.min() and train.images.max() <= 1.0
    # Stratified: every digit is in the test split with about a fifth of its images.
    assert sorted(np.bincount(test.labels).tolist())[0] >= 34
    again = load_digits_split("train")
    np.testing.assert_array_equal(train.labels, again.labels)
    np.testing.assert_array_equal(train.images, again.images)
    # Train and test hold different images (no image of the test split is also in the train split).
    train_rows = {image.tobytes() for image in train.images}
    assert sum(image.tobytes() in train_rows for image in test.images) <= 2  # the raw set has a few duplicates


def test_conversions_tensors_pil_and_back():
    digits = load_digits_split("test").first(4)
    tensors = digits.tensors()
    assert tensors.shape == (4, 3, 32, 32) and tensors.dtype == torch.float32
    assert torch.equal(tensors[:, 0], tensors[:, 2])
    assert digits.tensors(channels=1).shape == (4, 1, 32, 32)
    pil = digits.pil_images()
    assert all(isinstance(image, Image.Image) and image.size == (32, 32) and image.mode == "RGB" for image in pil)
    back = to_grayscale_tensor(pil)
    assert back.shape == (4, 1, 32, 32)
    assert (back - digits.tensors(channels=1)).abs().max() <= 1 / 255 + 1e-6
    numpy_hwc = np.repeat(digits.images[..., None], 3, axis=-1)
    assert torch.allclose(to_grayscale_tensor(numpy_hwc), digits.tensors(channels=1))
    with pytest.raises(ValueError, match=r"\(N, 8, 8\)"):
        upsample_digits(np.zeros((2, 16, 16)))


def test_captions_name_the_digit_and_template_is_a_parameter():
    assert caption_for(7) == "a photo of digit seven"
    assert caption_for(3, "handwritten {digit}") == "handwritten 3"
    digits = load_digits_split("test").first(6)
    captions = digits.captions("a drawing of {name}")
    assert captions == [f"a drawing of {DIGIT_NAMES[label]}" for label in digits.labels]
    assert set(DIGIT_NAMES) <= set(caption_words())
    with pytest.raises(ValueError, match="names no digit"):
        caption_for(1, "a photo")
    with pytest.raises(ValueError, match="0 to 9"):
        caption_for(10)


def test_heldout_digit_is_excluded_from_base_training():
    train = base_training_set(heldout_digit=9)
    assert 9 not in train.labels and train.digits == list(range(9))
    assert len(train) == len(load_digits_split("train")) - int((load_digits_split("train").labels == 9).sum())
    assert 3 not in base_training_set(heldout_digit=3).labels
    assert base_training_set(heldout_digit=None).digits == list(range(10))
    nines = load_digits_split("train").only(9).first(5)
    assert len(nines) == 5 and set(nines.labels) == {9}


@pytest.mark.parametrize("style", sorted(STYLES))
def test_styles_change_images_and_keep_shape_and_range(style):
    plain = load_digits_split("test").first(8)
    styled = plain.styled(style)
    assert styled.style == style and styled.images.shape == plain.images.shape
    assert styled.images.dtype == np.float32
    assert 0.0 <= styled.images.min() and styled.images.max() <= 1.0
    assert np.abs(styled.images - plain.images).mean() > 0.02
    np.testing.assert_array_equal(styled.labels, plain.labels)
    assert styled.captions("a photo of digit {name} in {style} style")[0].endswith(f"in {style} style")


def test_style_semantics():
    images = load_digits_split("test").first(8).images
    np.testing.assert_array_equal(apply_style(images, "mirrored"), images[:, :, ::-1])
    np.testing.assert_allclose(apply_style(images, "inverted"), 1.0 - images)
    np.testing.assert_array_equal(apply_style(apply_style(images, "rotated"), "rotated"), images[:, ::-1, ::-1])
    assert apply_style(images, "bold").sum() > images.sum() > apply_style(images, "thin").sum()
    with pytest.raises(ValueError, match="unknown style"):
        apply_style(images, "sparkly")
    with pytest.raises(ValueError, match="already styled"):
        DigitSet(images, np.zeros(8, dtype=np.int64), "bold").styled("inverted")


# --- classifier ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier() -> DigitClassifier:
    return load_digit_classifier()


def test_shipped_classifier_recognises_the_real_test_split(classifier):
    test = load_digits_split("test")
    assert classifier.accuracy(test) >= 0.95
    # It is the same judge whatever form the images come in.
    first = test.first(32)
    from_pil = classifier.predict(first.pil_images())
    assert torch.equal(from_pil, classifier.predict(first.tensors()))
    assert (from_pil.numpy() == first.labels).mean() >= 0.9


def test_classifier_features_are_penultimate_and_discriminative(classifier):
    test = load_digits_split("test")
    features = classifier.features(test.tensors())
    assert features.shape == (len(test), classifier.config.feature_dim)
    ones, sevens = features[test.labels == 1], features[test.labels == 7]
    within = torch.cdist(ones, ones).mean()
    between = torch.cdist(ones, sevens).mean()
    assert between > within


def test_classifier_round_trip_and_missing_folder(tmp_path, classifier):
    save_digit_classifier(classifier, tmp_path / "clf")
    assert json.loads((tmp_path / "clf" / "config.json").read_text())["feature_dim"] == classifier.config.feature_dim
    reloaded = load_digit_classifier(tmp_path / "clf")
    images = load_digits_split("test").first(8).tensors()
    assert torch.allclose(reloaded.features(images), classifier.features(images))
    with pytest.raises(FileNotFoundError, match="classifier.py --out"):
        load_digit_classifier(tmp_path / "nothing here")
    assert DEFAULT_CLASSIFIER_DIR.name == "classifier"


def test_augmentation_keeps_background_black():
    pixels = torch.full((4, 1, 32, 32), -1.0)
    pixels[:, :, 12:20, 12:20] = 1.0
    moved = random_affine(pixels, torch.Generator().manual_seed(0))
    assert moved.shape == pixels.shape
    assert torch.allclose(moved[:, :, :2, :2], torch.full_like(moved[:, :, :2, :2], -1.0))
    assert not torch.allclose(moved, pixels)


# --- the shipped base pipeline ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_pipeline():
    return load_base_pipeline(DEFAULT_BASE_MODEL_DIR)


def test_shipped_base_loads_offline_and_generates_32x32(base_pipeline):
    from diffusers import StableDiffusionPipeline

    direct = StableDiffusionPipeline.from_pretrained(str(DEFAULT_BASE_MODEL_DIR), local_files_only=True)
    assert direct.safety_checker is None
    output = base_pipeline(
        "a photo of digit three",
        num_inference_steps=4,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pil",
    )
    image = output.images[0]
    assert image.size == (32, 32)
    assert np.asarray(image).std() > 10  # an image with content, not a flat field


def test_shipped_base_is_small_and_every_transformer_block_is_text_conditioned(base_pipeline):
    from diffusers.models.attention import BasicTransformerBlock

    size = sum(path.stat().st_size for path in DEFAULT_BASE_MODEL_DIR.rglob("*") if path.is_file())
    assert size < 15e6
    blocks = [module for module in base_pipeline.unet.modules() if isinstance(module, BasicTransformerBlock)]
    assert len(blocks) >= 5
    text_dim = base_pipeline.text_encoder.config.hidden_size
    for block in blocks:
        assert block.attn2 is not None and block.attn2.is_cross_attention
        assert block.attn2.to_k.in_features == text_dim
    assert base_pipeline.tokenizer.model_max_length <= 16
    assert base_pipeline.tokenizer.tokenize("a photo of sks digit") == [
        "a</w>",
        "photo</w>",
        "of</w>",
        "sks</w>",
        "digit</w>",
    ]


def test_evaluate_prompt_following_reports_per_digit(base_pipeline, classifier, tmp_path):
    report = evaluate_prompt_following(
        base_pipeline, classifier, digits=[0, 1], samples_per_digit=2, num_inference_steps=8
    )
    assert set(report.per_digit) == {0, 1} and report.samples_per_digit == 2
    assert 0.0 <= report.overall <= 1.0 and len(report.predictions[0]) == 2
    assert "| **all** |" in report.table()
    # Judging given samples: real test images of digit 2 prompted as 2 are all recognised.
    real_twos = np.repeat(load_digits_split("test").only(2).first(6).images[..., None], 3, axis=-1)
    judged = evaluate_prompt_following(base_pipeline, classifier, digits=[2], samples={2: real_twos})
    assert judged.per_digit[2] == 1.0
    grid = save_image_grid([real_twos, real_twos[:3]], tmp_path / "grid.png", ["2", "2"])
    assert Image.open(grid).size[1] == 2 * (32 * 3 + 2)


# --- the base model's training, at a tiny budget --------------------------------------------------------------------


def test_base_training_stages_run_and_save_a_loadable_pipeline(tmp_path):
    from diffusers import StableDiffusionPipeline

    from benchmarks.digits.train_base import (
        BaseRecipe,
        build_components,
        make_digits_tokenizer,
        make_pipeline,
        save_pipeline,
        train_autoencoder,
        train_denoiser,
    )

    recipe = BaseRecipe(vae_steps=2, vae_batch_size=4, steps=2, batch_size=4, warmup_steps=1)
    tokenizer = make_digits_tokenizer(recipe)
    vae, text_encoder, unet = build_components(recipe, tokenizer)
    data = base_training_set(heldout_digit=9).first(16)

    metrics = train_autoencoder(vae, data.images, recipe, log_every=1)
    assert metrics["scaling_factor"] > 0 and vae.config.scaling_factor == metrics["scaling_factor"]
    assert not any(parameter.requires_grad for parameter in vae.parameters())

    initial = [parameter.detach().clone() for parameter in unet.parameters()]
    train_denoiser(unet, text_encoder, tokenizer, vae, data.images, data.labels, recipe, log_every=1)
    moved = sum((before - after).abs().sum() for before, after in zip(initial, unet.parameters()))
    assert moved > 0

    folder = tmp_path / "base"
    save_pipeline(make_pipeline(vae, text_encoder, tokenizer, unet, recipe), folder)
    save_pipeline(make_pipeline(vae, text_encoder, tokenizer, unet, recipe), folder)  # rerunnable: replaces it
    assert (folder / "tokenizer" / "vocab.json").is_file() and (folder / "tokenizer" / "merges.txt").is_file()
    reloaded = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    image = reloaded("a photo of digit one", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (32, 32, 3)
    (tmp_path / "not a pipeline").mkdir()
    with pytest.raises(FileExistsError, match="not a pipeline folder"):
        save_pipeline(reloaded, tmp_path / "not a pipeline")
