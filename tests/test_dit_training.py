"""SD3 and Flux in the training core (issue 17): the tiny offline pipelines, family detection, the rectified-flow
objective against a reference written from diffusers' scripts, the prompt cache, validation without text encoders,
flag checks; the pipelines and the evaluation CLI on ``pipe.transformer``.

Training runs that need a tuner on the transformer are in ``test_dit_training_runs.py``.
"""

from __future__ import annotations

import json
import math
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from resattn_diffusion.testing import DIT_KINDS, make_t5_tokenizer, save_tiny_dit_pipeline, tiny_dit_pipeline
from resattn_diffusion.training import TrainingError, train
from resattn_diffusion.training.args import parse_args
from resattn_diffusion.training.families import family_of
from resattn_diffusion.training.flow import FluxBase, SD3Base
from resattn_diffusion.training.models import StableDiffusionBase

PROMPT = "a photo of sks dog"


@pytest.fixture(scope="module")
def dit_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_dit")
    return {kind: save_tiny_dit_pipeline(kind, root / kind) for kind in DIT_KINDS}


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("instance")
    rng = np.random.default_rng(0)
    for index in range(2):
        Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    return folder


def dreambooth(model: Path, instance_dir: Path, *extra: str, output_dir: Path | None = None) -> Namespace:
    argv = [
        "--pretrained_model_name_or_path",
        str(model),
        "--instance_data_dir",
        str(instance_dir),
        "--instance_prompt",
        PROMPT,
    ]
    argv += ["--resolution", "32", "--report_to", "none", "--seed", "0"]
    if output_dir is not None:
        argv += ["--output_dir", str(output_dir)]
    return parse_args("dreambooth", argv + list(extra))


def loaded(model: Path, instance_dir: Path, *extra: str):
    args = dreambooth(model, instance_dir, "--max_sequence_length", "12", *extra)
    base = family_of(args).load(args)
    base.to(torch.device("cpu"), torch.float32)
    return args, base


def random_batch(captions: list[str], seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.rand(len(captions), 3, 32, 32, generator=generator) * 2 - 1
    return {"pixel_values": pixels, "captions": captions, "is_prior": torch.zeros(len(captions), dtype=torch.bool)}


# --- the tiny pipelines ------------------------------------------------------------------------------------------
def test_t5_tokenizer_has_whole_words_and_no_unknowns_for_ascii():
    tokenizer = make_t5_tokenizer(words=("zorbly",))
    assert tokenizer.tokenize("a photo of sks dog zorbly") == [
        "\u2581a",
        "\u2581photo",
        "\u2581of",
        "\u2581sks",
        "\u2581dog",
        "\u2581zorbly",
    ]
    ids = tokenizer("Qx9 #!~ unusual", add_special_tokens=False).input_ids
    assert tokenizer.unk_token_id not in ids and ids
    assert tokenizer("a dog").input_ids[-1] == tokenizer.eos_token_id


@pytest.mark.parametrize("kind", DIT_KINDS)
def test_tiny_dit_folder_loads_with_its_own_pipeline_class_and_generates_the_same(kind, dit_dirs):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    pipeline_class = StableDiffusion3Pipeline if kind == "sd3" else FluxPipeline
    saved = pipeline_class.from_pretrained(dit_dirs[kind])
    saved.set_progress_bar_config(disable=True)
    in_memory = tiny_dit_pipeline(kind)
    assert saved.vae.config.latent_channels == 16 and saved.vae.config.shift_factor is not None
    call = dict(prompt=PROMPT, num_inference_steps=2, height=32, width=32, output_type="np")
    first = in_memory(**call, generator=torch.Generator().manual_seed(0)).images
    second = saved(**call, generator=torch.Generator().manual_seed(0)).images
    assert first.shape == (1, 32, 32, 3) and np.isfinite(first).all() and first.std() > 0
    np.testing.assert_array_equal(first, second)
    model_index = json.loads((dit_dirs[kind] / "model_index.json").read_text())
    assert model_index["_class_name"] == pipeline_class.__name__


def test_tiny_sd3_is_sd35_shaped_and_flux_packs_16_channels():
    sd3, flux = tiny_dit_pipeline("sd3"), tiny_dit_pipeline("flux")
    assert sd3.transformer.transformer_blocks[0].attn2 is not None  # SD3.5's second image attention
    assert sd3.transformer.config.joint_attention_dim == sd3.text_encoder_3.config.d_model
    assert (
        sd3.transformer.config.pooled_projection_dim
        == sd3.text_encoder.config.projection_dim + sd3.text_encoder_2.config.projection_dim
    )
    assert flux.transformer.config.in_channels == 4 * flux.vae.config.latent_channels
    assert (
        flux.transformer.config.guidance_embeds
        and flux.transformer.config.pooled_projection_dim == flux.text_encoder.config.hidden_size
    )


# --- which family ------------------------------------------------------------------------------------------------
def test_family_detected_from_the_model_folder(dit_dirs, tiny_dirs, instance_dir):
    expected = {"sd3": SD3Base, "flux": FluxBase}
    for kind, family in expected.items():
        assert family_of(dreambooth(dit_dirs[kind], instance_dir)) is family
    for kind in ("sd1", "sdxl"):
        assert family_of(dreambooth(tiny_dirs[kind], instance_dir)) is StableDiffusionBase


def test_unknown_denoiser_is_refused_naming_what_is_known(dit_dirs, instance_dir, tmp_path):
    folder = tmp_path / "other"
    folder.mkdir()
    index = json.loads((dit_dirs["sd3"] / "model_index.json").read_text())
    index["_class_name"], index["transformer"] = "PixArtSigmaPipeline", ["diffusers", "PixArtTransformer2DModel"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(TrainingError, match="PixArtTransformer2DModel.*SD3Transformer2DModel.*FluxTransformer2DModel"):
        family_of(dreambooth(folder, instance_dir))


@pytest.mark.parametrize(
    "kind, flags, message",
    [
        ("sd3", ["--snr_gamma", "5"], "--snr_gamma belongs to the UNet"),
        ("flux", ["--prediction_type", "epsilon"], "--prediction_type belongs to the UNet"),
        ("flux", ["--noise_offset", "0.1"], "--noise_offset belongs to the UNet"),
        ("sd3", ["--guidance_scale", "3.5"], "SD3 has none"),
        ("sd1", ["--weighting_scheme", "logit_normal"], "--weighting_scheme belongs to rectified-flow"),
        ("sdxl", ["--max_sequence_length", "77"], "--max_sequence_length belongs to rectified-flow"),
        ("sd1", ["--guidance_scale", "3.5"], "--guidance_scale belongs to rectified-flow"),
        ("sd1", ["--logit_mean", "0"], "--logit_mean belongs to rectified-flow"),
    ],
)
def test_flags_of_the_other_objective_are_refused_before_anything_loads(
    kind, flags, message, dit_dirs, tiny_dirs, instance_dir, tmp_path
):
    model = {**dit_dirs, **tiny_dirs}[kind]
    args = dreambooth(model, instance_dir, *flags, output_dir=tmp_path / "out")
    with pytest.raises(TrainingError, match=message):
        train(args)
    assert not (tmp_path / "out" / "args.json").exists()  # refused before the run started


def test_flux_without_guidance_embedding_refuses_guidance_scale(instance_dir, tmp_path):
    from resattn_diffusion.testing import tiny_dit_transformer_overrides, tiny_flux_transformer

    pipeline = tiny_dit_pipeline("flux")
    pipeline.transformer = tiny_flux_transformer(guidance_embeds=False, **tiny_dit_transformer_overrides("flux"))
    pipeline.save_pretrained(tmp_path / "schnell")
    args = dreambooth(tmp_path / "schnell", instance_dir, "--guidance_scale", "3.5")
    with pytest.raises(TrainingError, match="no guidance embedding"):
        family_of(args).load(args)


def test_sd3_without_t5_trains_on_clip_alone_and_flux_needs_both_encoders(instance_dir, tmp_path):
    sd3 = tiny_dit_pipeline("sd3")
    sd3.text_encoder_3 = sd3.tokenizer_3 = None
    sd3.save_pretrained(tmp_path / "sd3_no_t5")
    args, base = loaded(tmp_path / "sd3_no_t5", instance_dir)
    with torch.no_grad():
        losses = base.per_example_loss(
            args, base.denoiser, random_batch([PROMPT]), 32, torch.float32, torch.Generator().manual_seed(0)
        )
    assert torch.isfinite(losses).all()
    flux = tiny_dit_pipeline("flux")
    flux.text_encoder_2 = flux.tokenizer_2 = None
    flux.save_pretrained(tmp_path / "flux_no_t5")
    args = dreambooth(tmp_path / "flux_no_t5", instance_dir)
    with pytest.raises(TrainingError, match="has no text_encoder_2"):
        family_of(args).load(args)


def test_native_resolution_and_resolution_multiple(dit_dirs, instance_dir, tmp_path):
    args = dreambooth(dit_dirs["sd3"], instance_dir)
    assert SD3Base.native_resolution(args) == 16 * 2  # transformer sample_size x VAE factor
    args = dreambooth(dit_dirs["flux"], instance_dir, "--resolution", "30", output_dir=tmp_path / "out")
    with pytest.raises(TrainingError, match="not a multiple of 4"):
        train(args)


# --- the objective ------------------------------------------------------------------------------------------------
def reference_flow_loss(base, args, batch, seed: int, scheme: str) -> torch.Tensor:
    """The per-example loss written step by step from diffusers' train_dreambooth_lora_sd3.py / _flux.py, with the
    same random draws in the same order as the training core (VAE sample, noise, timestep density)."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    generator = torch.Generator().manual_seed(seed)
    vae, transformer = base.vae, base.denoiser
    latents = vae.encode(batch["pixel_values"]).latent_dist.sample(generator=generator)
    latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
    pipeline = base.text_pipeline()
    noise = torch.randn(latents.shape, generator=generator)
    u = compute_density_for_timestep_sampling(scheme, latents.shape[0], 0.0, 1.0, 1.29, generator=generator)
    indices = (u * 1000).long()
    scheduler = base.noise_scheduler
    timesteps, sigmas = scheduler.timesteps[indices], scheduler.sigmas[indices].view(-1, 1, 1, 1)
    noisy = (1.0 - sigmas) * latents + sigmas * noise
    if isinstance(base, SD3Base):
        context, _, pooled, _ = pipeline.encode_prompt(
            batch["captions"], None, None, do_classifier_free_guidance=False, max_sequence_length=12
        )
        prediction = transformer(
            hidden_states=noisy, timestep=timesteps, encoder_hidden_states=context, pooled_projections=pooled
        ).sample
    else:
        context, pooled, text_ids = pipeline.encode_prompt(batch["captions"], None, max_sequence_length=12)
        b, c, h, w = noisy.shape
        # packing written out: 2x2 patches of the latent image become the channels of one token, row-major
        packed = noisy.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
        rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
        image_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()
        out = transformer(
            hidden_states=packed,
            timestep=timesteps / 1000,
            guidance=torch.full((b,), 3.5),
            pooled_projections=pooled,
            encoder_hidden_states=context,
            txt_ids=text_ids,
            img_ids=image_ids,
        ).sample
        prediction = out.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
    weighting = {"sigma_sqrt": sigmas**-2.0, "cosmap": 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))}.get(
        scheme, torch.ones_like(sigmas)
    )
    return (weighting * (prediction - (noise - latents)) ** 2).reshape(latents.shape[0], -1).mean(dim=1)


@pytest.mark.parametrize("kind", DIT_KINDS)
@pytest.mark.parametrize("scheme", ["none", "logit_normal", "sigma_sqrt"])
def test_flow_matching_loss_equals_the_diffusers_script_reference(kind, scheme, dit_dirs, instance_dir):
    args, base = loaded(dit_dirs[kind], instance_dir, "--weighting_scheme", scheme)
    batch = random_batch([PROMPT, "a red car"])
    with torch.no_grad():
        ours = base.per_example_loss(args, base.denoiser, batch, 32, torch.float32, torch.Generator().manual_seed(3))
        reference = reference_flow_loss(base, args, batch, 3, scheme)
    assert ours.shape == (2,) and torch.isfinite(ours).all()
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


def test_family_defaults_are_the_scripts_defaults(dit_dirs, instance_dir):
    sd3_args, sd3 = loaded(dit_dirs["sd3"], instance_dir)
    flux_args, flux = loaded(dit_dirs["flux"], instance_dir)
    sd3_args.max_sequence_length = flux_args.max_sequence_length = None
    assert (sd3.weighting_scheme(sd3_args), sd3.max_sequence_length(sd3_args)) == ("logit_normal", 77)
    assert (flux.weighting_scheme(flux_args), flux.max_sequence_length(flux_args), flux.guidance(flux_args)) == (
        "none",
        512,
        3.5,
    )


def test_timestep_schemes_sample_where_they_should(dit_dirs, instance_dir):
    args, base = loaded(
        dit_dirs["sd3"], instance_dir, "--weighting_scheme", "logit_normal", "--logit_mean", "2", "--logit_std", "0.01"
    )
    timesteps, sigmas = base.sample_timesteps(args, 64, torch.Generator().manual_seed(0))
    index = int(torch.sigmoid(torch.tensor(2.0)) * 1000)  # every u is close to sigmoid(mean)
    assert (timesteps - base.noise_scheduler.timesteps[index]).abs().max() < 12  # within ~5 of 1000 schedule steps
    assert torch.equal(sigmas * 1000, timesteps)  # the scheduler's timesteps are its sigmas x 1000
    args.weighting_scheme = "none"
    _, uniform = base.sample_timesteps(args, 2000, torch.Generator().manual_seed(0))
    assert uniform.min() < 0.05 and uniform.max() > 0.99  # uniform over the (shifted) schedule


def test_precondition_outputs_compares_denoised_latents(dit_dirs, instance_dir):
    args, base = loaded(dit_dirs["sd3"], instance_dir, "--weighting_scheme", "none")
    batch = random_batch([PROMPT])
    with torch.no_grad():
        plain = base.per_example_loss(args, base.denoiser, batch, 32, torch.float32, torch.Generator().manual_seed(1))
        args.precondition_outputs = True
        preconditioned = base.per_example_loss(
            args, base.denoiser, batch, 32, torch.float32, torch.Generator().manual_seed(1)
        )
        _, sigmas = base.sample_timesteps(args, 1, _generator_after_latents(base, batch, seed=1))
    # x_t - sigma v - x0 = sigma (noise - x0 - v): the preconditioned loss is sigma^2 times the plain one
    torch.testing.assert_close(preconditioned, plain * sigmas**2, rtol=1e-4, atol=1e-7)


def _generator_after_latents(base, batch, seed: int) -> torch.Generator:
    """A generator in the state the loss leaves it in just before it samples timesteps."""
    generator = torch.Generator().manual_seed(seed)
    latents = base.vae.encode(batch["pixel_values"]).latent_dist.sample(generator=generator)
    torch.randn(latents.shape, generator=generator)
    return generator


# --- text encoders: encoded once and freed -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", DIT_KINDS)
def test_cached_prompts_give_the_same_loss_and_free_the_text_encoders(kind, dit_dirs, instance_dir):
    args, base = loaded(dit_dirs[kind], instance_dir)
    batch = random_batch([PROMPT, "a dog"])
    with torch.no_grad():
        direct = base.per_example_loss(args, base.denoiser, batch, 32, torch.float32, torch.Generator().manual_seed(0))
        base.cache_prompts([PROMPT, "a dog"], torch.device("cpu"), args)
        cached = base.per_example_loss(args, base.denoiser, batch, 32, torch.float32, torch.Generator().manual_seed(0))
    torch.testing.assert_close(cached, direct, rtol=0, atol=0)
    assert base.text_encoders == [] and all(
        v is None for k, v in base.text_modules.items() if k.startswith("text_encoder")
    )
    with pytest.raises(TrainingError, match="'a cat' was not encoded before the text encoders were freed"):
        base.encode_prompts(["a cat"], torch.device("cpu"), args)


@pytest.mark.parametrize("kind", DIT_KINDS)
def test_validation_without_text_encoders_generates_what_the_full_pipeline_does(kind, dit_dirs, instance_dir):
    from diffusers import DiffusionPipeline

    args, base = loaded(dit_dirs[kind], instance_dir, "--validation_prompt", "a photo of a dog")
    full = DiffusionPipeline.from_pretrained(dit_dirs[kind])
    full.set_progress_bar_config(disable=True)
    call = dict(num_inference_steps=2, height=32, width=32, output_type="np", max_sequence_length=12)
    expected = full("a photo of a dog", generator=torch.Generator().manual_seed(0), **call).images
    base.cache_prompts(base.validation_prompts(args), torch.device("cpu"), args)
    pipeline = base.inference_pipeline(base.denoiser)
    kwargs = base.validation_kwargs(args, torch.device("cpu"))
    assert "prompt" not in kwargs and "prompt_embeds" in kwargs
    images = pipeline(**{**kwargs, **call}, generator=torch.Generator().manual_seed(0)).images
    np.testing.assert_allclose(images, expected, atol=1e-5)


# --- pipelines and evaluation ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kind, file_name", [("sd3", "res_tuner_stable_diffusion_3.py"), ("flux", "res_tuner_flux.py")]
)
def test_pipelines_put_the_mixin_on_the_transformer_also_as_custom_pipeline(kind, file_name, dit_dirs):
    from diffusers import DiffusionPipeline

    from pipelines import ResTunerFluxPipeline, ResTunerStableDiffusion3Pipeline
    from resattn_diffusion.integration.loader_mixin import denoiser_attribute

    pipeline_class = ResTunerStableDiffusion3Pipeline if kind == "sd3" else ResTunerFluxPipeline
    direct = pipeline_class.from_pretrained(dit_dirs[kind])
    custom = DiffusionPipeline.from_pretrained(
        dit_dirs[kind],
        custom_pipeline=str(Path(__file__).resolve().parents[1] / "pipelines" / file_name),
        trust_remote_code=True,
    )
    for pipe in (direct, custom):
        assert type(pipe).__name__ == pipeline_class.__name__
        assert denoiser_attribute(pipe) == "transformer" and pipe._res_tuner_denoiser is pipe.transformer
        assert pipe.get_res_tuners() == {}
        pipe.unload_res_tuner()  # nothing loaded: a no-op


def test_mixin_names_the_missing_denoiser():
    from diffusers import FluxPipeline

    from pipelines import ResTunerFluxPipeline
    from resattn_diffusion.integration.api import ResTunerError

    parts = dict(tiny_dit_pipeline("flux").components)
    parts["transformer"] = None
    accepted = set(FluxPipeline._get_signature_keys(FluxPipeline)[0]) | {"image_encoder", "feature_extractor"}
    pipe = ResTunerFluxPipeline(**{k: v for k, v in parts.items() if k in accepted})
    with pytest.raises(ResTunerError, match="neither pipe.unet nor pipe.transformer"):
        pipe.get_res_tuners()


@pytest.mark.parametrize("kind", DIT_KINDS)
def test_evaluation_generates_from_dit_pipelines(kind, dit_dirs, tmp_path):
    from resattn_diffusion.evaluation.cli import main as eval_main
    from resattn_diffusion.evaluation.generate import attention_kwargs_name, load_pipeline

    assert attention_kwargs_name(load_pipeline(dit_dirs[kind], device="cpu")) == "joint_attention_kwargs"
    out = tmp_path / "images"
    code = eval_main([
        "generate", "--pipeline", str(dit_dirs[kind]), "--prompt", PROMPT, "--prompt", "a red car",
        "--seeds", "0", "1", "--steps", "2", "--guidance", "3.5", "--height", "32", "--width", "32",
        "--out", str(out), "--device", "cpu",
    ])  # fmt: skip
    assert code == 0
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all((out / r["file"]).is_file() for r in records)
