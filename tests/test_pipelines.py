"""Pipelines with res tuners (issue 4): the loader mixin, the four pipeline classes, custom_pipeline loading,
survival beside diffusers' processor swaps and LoRA, and clear errors that leave the pipeline unchanged."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import (
    DiffusionPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
)
from diffusers.models.attention_processor import (
    AttnProcessor,
    AttnProcessor2_0,
    SlicedAttnProcessor,
    XFormersAttnProcessor,
)

import resattn_diffusion as rd
from pipelines import (
    ResTunerStableDiffusionImg2ImgPipeline,
    ResTunerStableDiffusionPipeline,
    ResTunerStableDiffusionXLImg2ImgPipeline,
    ResTunerStableDiffusionXLPipeline,
)
from resattn_diffusion.testing import tiny_unet, unet_inputs

PIPELINES_DIR = Path(__file__).resolve().parents[1] / "pipelines"
PROMPT = "a photo of a sks dog"
TEXT2IMG = {
    "sd1": ResTunerStableDiffusionPipeline,
    "sd2": ResTunerStableDiffusionPipeline,
    "sdxl": ResTunerStableDiffusionXLPipeline,
}
IMG2IMG = {
    "sd1": ResTunerStableDiffusionImg2ImgPipeline,
    "sd2": ResTunerStableDiffusionImg2ImgPipeline,
    "sdxl": ResTunerStableDiffusionXLImg2ImgPipeline,
}
FIRST_ATTENTION = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"  # the first attention a UNet call runs (SD1)


# --- helpers -------------------------------------------------------------------------------------------------
def _load(kind, tiny_dirs, cls=None):
    pipe = (cls or TEXT2IMG[kind]).from_pretrained(tiny_dirs[kind])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, **kwargs) -> torch.Tensor:
    if isinstance(pipe, (StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline)):
        image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(7))
        kwargs = {"image": image, "strength": 0.5, "num_inference_steps": 4, **kwargs}
    kwargs.setdefault("num_inference_steps", 2)
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs).images


@torch.no_grad()
def _randomize(unet, adapter_name, std=0.05, seed=0):
    """Give a tuner non-zero weights (a freshly added tuner is an exact no-op)."""
    generator = torch.Generator().manual_seed(seed)
    for param in rd.res_tuner_parameters(unet, adapter_name):
        param.copy_(std * torch.randn(param.shape, generator=generator).to(param.dtype))


def _tuner_file(kind, folder, config, name, seed=0) -> Path:
    unet = tiny_unet(kind)
    rd.add_res_tuner(unet, config, adapter_name=name)
    _randomize(unet, name, seed=seed)
    return rd.save_res_tuner(unet, Path(folder) / f"{kind}_{name}.safetensors", adapter_name=name)


@pytest.fixture(scope="module")
def tuner_files(tmp_path_factory):
    """Random-weight tuner files: ``{(kind, "attn"): res_attn on attn1+attn2, (kind, "lora"): res_lora}``."""
    folder = tmp_path_factory.mktemp("tuners")
    files = {}
    for kind in ("sd1", "sd2", "sdxl"):
        files[kind, "attn"] = _tuner_file(
            kind, folder, rd.ResTunerConfig(tuner="res_attn", rank=4, heads=2), "attn", seed=1
        )
    files["sd1", "lora"] = _tuner_file(
        "sd1", folder, rd.ResTunerConfig(tuner="res_lora", targets=["attn1", "attn2", "ff"]), "lora", seed=2
    )
    return files


def _processors(pipe):
    """What must not change when a call is refused: each processor object and what it wraps."""
    return {k: (id(p), id(getattr(p, "base_processor", None))) for k, p in pipe.unet.attn_processors.items()}


def _tuner_state(pipe):
    return {
        name: (info["config"].to_dict(), info["scale"], info["enabled"], info["fused"])
        for name, info in pipe.get_res_tuners().items()
    }


def _base_weights(unet):
    return {n: p.detach().clone() for n, p in unet.named_parameters() if ".bank." not in n and "res_tuner" not in n}


def _lora_state_dict(kind):
    """A small diffusers-format LoRA for the tiny UNet, as diffusers' training scripts save it."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = tiny_unet(kind)
    unet.add_adapter(
        LoraConfig(
            r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"]
        )
    )
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    state_dict = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    return {f"unet.{key}": value for key, value in state_dict.items()}


def _train(pipe, steps=4):
    """A few noise-prediction steps on random latents and encoded prompts, updating only the tuner."""
    unet = pipe.unet
    tuner_params = rd.res_tuner_parameters(unet)
    tuner_ids = {id(p) for p in tuner_params}
    optimizer = torch.optim.AdamW(tuner_params, lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        prompt_embeds, _ = pipe.encode_prompt([PROMPT, "a red cat"], "cpu", 1, False)
    for _ in range(steps):
        latents = torch.randn(2, 4, 16, 16, generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, 1000, (2,), generator=generator)
        noisy = pipe.scheduler.add_noise(latents, noise, timesteps)
        loss = F.mse_loss(unet(noisy, timesteps, prompt_embeds).sample, noise)
        loss.backward()
        assert all(p.grad is None for p in unet.parameters() if id(p) not in tuner_ids)  # the UNet stays frozen
        assert all(p.grad is not None for p in tuner_params)
        optimizer.step()
        optimizer.zero_grad()


# --- training -> save -> fresh pipeline ----------------------------------------------------------------------
def test_trained_tuner_reloads_into_a_fresh_pipeline_and_generates_the_same_images(tiny_dirs, tmp_path):
    pipe = _load("sd1", tiny_dirs)
    base = _generate(pipe)
    pipe.unet.requires_grad_(False)
    rd.add_res_tuner(
        pipe.unet, rd.ResTunerConfig(tuner="res_attn", rank=4, heads=2, targets=["attn1", "attn2", "ff"]), "style"
    )
    _train(pipe)
    trained = _generate(pipe)
    assert not torch.allclose(trained, base, atol=1e-4)
    output_dir = tmp_path / "run"
    rd.save_res_tuner(pipe.unet, output_dir, adapter_name="style")  # a training output folder
    del pipe

    fresh = _load("sd1", tiny_dirs)
    assert fresh.load_res_tuner(output_dir) == "style"
    assert torch.equal(_generate(fresh), trained)
    assert torch.equal(_generate(fresh), trained)  # deterministic for a given generator

    fresh.set_res_tuner_scale(0.0)
    assert torch.equal(_generate(fresh), base)
    fresh.set_res_tuner_scale(1.0)
    fresh.disable_res_tuner()
    assert torch.equal(_generate(fresh), base)
    fresh.enable_res_tuner()
    assert torch.equal(_generate(fresh), trained)
    # per call, through cross_attention_kwargs
    assert torch.equal(_generate(fresh, cross_attention_kwargs={rd.SCALE_KWARG: 0.0}), base)

    fresh.unload_res_tuner()
    assert fresh.get_res_tuners() == {}
    assert all(type(p) is AttnProcessor2_0 for p in fresh.unet.attn_processors.values())
    assert torch.equal(_generate(fresh), base)
    fresh.unload_res_tuner()  # unloading everything when nothing is loaded is a no-op, like unload_lora_weights


# --- mixing ---------------------------------------------------------------------------------------------------
def test_mixing_two_tuners_is_the_weighted_sum_of_their_branches(tiny_dirs, tuner_files):
    pipe = _load("sd1", tiny_dirs)
    unet = pipe.unet
    pipe.load_res_tuner(tuner_files["sd1", "attn"], adapter_name="a")
    rd.add_res_tuner(unet, rd.ResTunerConfig(tuner="res_adapter", targets=["attn1", "ff"]), adapter_name="b")
    _randomize(unet, "b", seed=5)
    w1, w2 = 0.7, -0.4

    # Exact at the first attention the UNet runs: nothing upstream of it is tuned, so its output is
    # frozen + w1 T1 + w2 T2 with the same input in every call (further down, branches feed through non-linear layers).
    captured = []
    attention = unet.get_submodule(FIRST_ATTENTION)
    hook = attention.register_forward_hook(lambda module, args, output: captured.append(output.detach().clone()))
    inputs = unet_inputs(unet, batch_size=2, seed=2, tokens=77)

    def first_attention_output():
        captured.clear()
        with torch.no_grad():
            unet(**inputs)
        return captured[0]

    pipe.set_res_tuners(["a"])
    t1 = first_attention_output()
    pipe.set_res_tuners("b", 1.0)
    t2 = first_attention_output()
    pipe.disable_res_tuner()
    base = first_attention_output()
    pipe.set_res_tuners(["a", "b"], [w1, w2])
    mixed = first_attention_output()
    hook.remove()
    assert not torch.allclose(t1, base) and not torch.allclose(t2, base)
    torch.testing.assert_close(mixed, base + w1 * (t1 - base) + w2 * (t2 - base), rtol=1e-5, atol=1e-5)

    # The weights become the scales; a loaded tuner not named is disabled (exactly as if it were not there).
    rd.add_res_tuner(unet, rd.ResTunerConfig(tuner="res_attn", targets=["attn2"]), adapter_name="c")
    _randomize(unet, "c", seed=6)
    pipe.set_res_tuners(["a", "b"], [w1, w2])
    state = pipe.get_res_tuners()
    assert (state["a"]["scale"], state["b"]["scale"], state["c"]["enabled"]) == (w1, w2, False)
    assert state["a"]["config"].scale == w1 and state["a"]["config"].tuner == "res_attn"
    images = _generate(pipe)
    pipe.unload_res_tuner("c")
    pipe.set_res_tuner_scale(1.0)
    assert torch.equal(_generate(pipe, cross_attention_kwargs={rd.SCALE_KWARG: {"a": w1, "b": w2}}), images)
    assert not torch.equal(_generate(pipe), images)


# --- fuse / unfuse ------------------------------------------------------------------------------------------------
def test_fuse_then_unfuse_restores_the_base_weights_exactly(tiny_dirs, tuner_files):
    pipe = _load("sd1", tiny_dirs)
    original = _base_weights(pipe.unet)
    pipe.load_res_tuner(tuner_files["sd1", "lora"])
    pipe.load_res_tuner(tuner_files["sd1", "attn"])
    processors = _processors(pipe)
    tuned = _generate(pipe)

    # a res_attn branch cannot fold: the error names it and no weight changes
    with pytest.raises(rd.ResTunerError, match=r"'attn'.*only linear tuners"):
        pipe.fuse_res_tuner()
    assert all(torch.equal(w, original[n]) for n, w in _base_weights(pipe.unet).items())
    assert _processors(pipe) == processors

    pipe.fuse_res_tuner("lora")
    assert pipe.get_res_tuners()["lora"]["fused"] and not pipe.get_res_tuners()["attn"]["fused"]
    assert any(not torch.equal(w, original[n]) for n, w in _base_weights(pipe.unet).items())
    torch.testing.assert_close(_generate(pipe), tuned, rtol=1e-4, atol=1e-4)
    with pytest.raises(rd.ResTunerError, match="unfuse_res_tuner"):
        pipe.set_res_tuner_scale(0.5, "lora")
    with pytest.raises(rd.ResTunerError, match="unfuse_res_tuner"):
        pipe.set_res_tuners(["attn"])
    assert pipe.get_res_tuners()["attn"]["scale"] == 1.0 and pipe.get_res_tuners()["lora"]["enabled"]

    pipe.unfuse_res_tuner()
    assert all(torch.equal(w, original[n]) for n, w in _base_weights(pipe.unet).items())
    assert torch.equal(_generate(pipe), tuned)
    pipe.fuse_res_tuner("lora")
    pipe.unload_res_tuner()  # unloading a fused tuner unfuses it first
    assert all(torch.equal(w, original[n]) for n, w in _base_weights(pipe.unet).items())


# --- loading routes -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "file_name,pipeline_class,kind",
    [
        ("res_tuner_stable_diffusion.py", ResTunerStableDiffusionPipeline, "sd1"),
        ("res_tuner_stable_diffusion_img2img.py", ResTunerStableDiffusionImg2ImgPipeline, "sd1"),
        ("res_tuner_stable_diffusion_xl.py", ResTunerStableDiffusionXLPipeline, "sdxl"),
        ("res_tuner_stable_diffusion_xl_img2img.py", ResTunerStableDiffusionXLImg2ImgPipeline, "sdxl"),
    ],
)
def test_custom_pipeline_loads_from_the_file(file_name, pipeline_class, kind, tiny_dirs, tuner_files):
    pipe = DiffusionPipeline.from_pretrained(
        tiny_dirs[kind], custom_pipeline=str(PIPELINES_DIR / file_name), trust_remote_code=True
    )
    pipe.set_progress_bar_config(disable=True)
    # diffusers imported a copy of the file, so the class is not ours by identity, but it is the same pipeline
    assert type(pipe).__name__ == pipeline_class.__name__
    assert isinstance(pipe, rd.ResTunerLoaderMixin) and isinstance(pipe, pipeline_class.__mro__[2])
    pipe.load_res_tuner(tuner_files[kind, "attn"])
    reference = _load(kind, tiny_dirs, pipeline_class)
    reference.load_res_tuner(tuner_files[kind, "attn"])
    assert torch.equal(_generate(pipe), _generate(reference))


def test_package_import_and_from_pipe_share_weights(tiny_dirs, tuner_files):
    stock = StableDiffusionPipeline.from_pretrained(tiny_dirs["sd1"])
    for source in (stock, _load("sd1", tiny_dirs)):
        derived = ResTunerStableDiffusionImg2ImgPipeline.from_pipe(source)
        for name, component in source.components.items():
            assert derived.components[name] is component, name
        for (name, p), q in zip(source.unet.named_parameters(), derived.unet.parameters()):
            assert p is q and p.data_ptr() == q.data_ptr(), name
    # the UNet is shared, so a tuner loaded on one pipeline is on the other
    text2img = ResTunerStableDiffusionPipeline.from_pipe(stock)
    img2img = ResTunerStableDiffusionImg2ImgPipeline.from_pipe(text2img)
    text2img.load_res_tuner(tuner_files["sd1", "attn"])
    assert set(img2img.get_res_tuners()) == {"attn"}
    assert isinstance(stock.unet.attn_processors[FIRST_ATTENTION + ".processor"], rd.ResTunerAttnProcessor)


@pytest.mark.parametrize("kind", ["sd2", "sdxl"])
def test_sd2_and_sdxl_text2img_and_img2img(kind, tiny_dirs, tuner_files):
    pipe = _load(kind, tiny_dirs)
    img2img = IMG2IMG[kind].from_pipe(pipe)
    img2img.set_progress_bar_config(disable=True)
    bases = [_generate(pipe), _generate(img2img)]
    pipe.load_res_tuner(tuner_files[kind, "attn"])
    for p, base in zip((pipe, img2img), bases):
        tuned = _generate(p)
        assert not torch.allclose(tuned, base, atol=1e-4)
        assert torch.equal(_generate(p), tuned)
        p.set_res_tuner_scale(0.0)
        assert torch.equal(_generate(p), base)
        p.set_res_tuner_scale(1.0)
    pipe.unload_res_tuner()
    assert [torch.equal(_generate(p), b) for p, b in zip((pipe, img2img), bases)] == [True, True]


def test_hub_repo_id_resolves_through_the_hub_cache_and_fails_clearly_offline(tiny_dirs, tuner_files, tmp_path):
    # A Hub download leaves the file in the Hub cache; offline, hf_hub_download resolves it from there.
    snapshot = tmp_path / "models--someone--my-tuner" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (tmp_path / "models--someone--my-tuner" / "refs").mkdir()
    (tmp_path / "models--someone--my-tuner" / "refs" / "main").write_text("0" * 40)
    shutil.copy(tuner_files["sd1", "attn"], snapshot / "res_tuner.safetensors")
    pipe = _load("sd1", tiny_dirs)
    reference = _load("sd1", tiny_dirs)
    reference.load_res_tuner(tuner_files["sd1", "attn"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
        assert pipe.load_res_tuner("someone/my-tuner", cache_dir=tmp_path) == "attn"
        assert torch.equal(_generate(pipe), _generate(reference))
        processors = _processors(pipe)
        with pytest.raises(rd.ResTunerFileError, match=r"'someone/other'.*Hugging Face Hub.*offline"):
            pipe.load_res_tuner("someone/other", cache_dir=tmp_path)
        assert _processors(pipe) == processors
    with pytest.raises(TypeError, match="revison"):
        pipe.load_res_tuner("someone/my-tuner", revison="main")


# --- survival beside diffusers -----------------------------------------------------------------------------------
def _attention_bases(pipe):
    return {
        type(p.base_processor) for p in pipe.unet.attn_processors.values() if isinstance(p, rd.ResTunerAttnProcessor)
    }


@pytest.mark.parametrize("change", ["enable_attention_slicing", "set_default_attn_processor"])
def test_tuners_survive_processor_changes_in_either_order(change, tiny_dirs, tuner_files):
    def apply(pipe):
        if change == "enable_attention_slicing":
            pipe.enable_attention_slicing(1)
        else:
            pipe.unet.set_default_attn_processor()

    expected_base = SlicedAttnProcessor if change == "enable_attention_slicing" else AttnProcessor
    reference = _load("sd1", tiny_dirs)
    base = _generate(reference)
    reference.load_res_tuner(tuner_files["sd1", "attn"])
    tuned = _generate(reference)

    tuner_first = _load("sd1", tiny_dirs)
    tuner_first.load_res_tuner(tuner_files["sd1", "attn"])
    params = [id(p) for p in rd.res_tuner_parameters(tuner_first.unet)]
    apply(tuner_first)
    assert [id(p) for p in rd.res_tuner_parameters(tuner_first.unet)] == params  # the trained weights, not new ones

    diffusers_first = _load("sd1", tiny_dirs)
    apply(diffusers_first)
    diffusers_first.load_res_tuner(tuner_files["sd1", "attn"])

    for pipe in (tuner_first, diffusers_first):
        assert _attention_bases(pipe) == {expected_base}
        # the stock processors compute the same attention up to rounding; the tuner's effect is intact
        torch.testing.assert_close(_generate(pipe), tuned, rtol=1e-5, atol=1e-5)
        pipe.unload_res_tuner()
        assert all(type(p) is expected_base for p in pipe.unet.attn_processors.values())
        torch.testing.assert_close(_generate(pipe), base, rtol=1e-5, atol=1e-5)


def test_tuners_survive_the_xformers_processor_in_either_order(tiny_dirs, tuner_files):
    # enable_xformers_memory_efficient_attention() needs CUDA; this installs what it installs.
    reference = _load("sd1", tiny_dirs)
    reference.load_res_tuner(tuner_files["sd1", "attn"])
    tuned = _generate(reference)
    for order in ("tuner_first", "xformers_first"):
        pipe = _load("sd1", tiny_dirs)
        if order == "tuner_first":
            pipe.load_res_tuner(tuner_files["sd1", "attn"])
        pipe.unet.set_attn_processor(XFormersAttnProcessor())
        if order == "xformers_first":
            pipe.load_res_tuner(tuner_files["sd1", "attn"])
        assert _attention_bases(pipe) == {XFormersAttnProcessor}
        assert set(pipe.get_res_tuners()) == {"attn"}
        pipe.unet.set_attn_processor(AttnProcessor2_0())  # back to SDPA so it runs on this CPU
        assert torch.equal(_generate(pipe), tuned)


def test_tuners_and_diffusers_lora_in_either_order(tiny_dirs, tuner_files):
    lora = _lora_state_dict("sd1")

    def with_tuners(pipe):
        pipe.load_res_tuner(tuner_files["sd1", "attn"])
        pipe.load_res_tuner(tuner_files["sd1", "lora"])  # hooks on the very projections the LoRA wraps

    lora_only = _load("sd1", tiny_dirs)
    lora_only.load_lora_weights(dict(lora), adapter_name="peft")
    lora_images = _generate(lora_only)
    tuners_only = _load("sd1", tiny_dirs)
    with_tuners(tuners_only)
    tuner_images = _generate(tuners_only)

    tuner_first = _load("sd1", tiny_dirs)
    with_tuners(tuner_first)
    tuner_first.load_lora_weights(dict(lora), adapter_name="peft")
    lora_first = _load("sd1", tiny_dirs)
    lora_first.load_lora_weights(dict(lora), adapter_name="peft")
    with_tuners(lora_first)

    both = _generate(tuner_first)
    assert torch.equal(_generate(lora_first), both)
    assert not torch.allclose(both, lora_images, atol=1e-4) and not torch.allclose(both, tuner_images, atol=1e-4)
    for pipe in (tuner_first, lora_first):
        pipe.disable_res_tuner()
        assert torch.equal(_generate(pipe), lora_images)
        pipe.enable_res_tuner()
        pipe.unload_lora_weights()
        torch.testing.assert_close(_generate(pipe), tuner_images, rtol=1e-6, atol=1e-6)
        pipe.unload_res_tuner()


# --- dtype ------------------------------------------------------------------------------------------------------
def test_bf16_generation_is_deterministic_in_either_order(tiny_dirs, tuner_files):
    base_pipe = _load("sd1", tiny_dirs).to(torch.bfloat16)
    base = _generate(base_pipe)
    loaded_then_cast = _load("sd1", tiny_dirs)
    loaded_then_cast.load_res_tuner(tuner_files["sd1", "attn"])
    loaded_then_cast.to(torch.bfloat16)
    cast_then_loaded = _load("sd1", tiny_dirs).to(torch.bfloat16)
    cast_then_loaded.load_res_tuner(tuner_files["sd1", "attn"])
    for pipe in (loaded_then_cast, cast_then_loaded):
        assert {p.dtype for p in rd.res_tuner_parameters(pipe.unet)} == {torch.bfloat16}
        images = _generate(pipe)
        assert images.dtype == torch.bfloat16 and torch.isfinite(images).all()
        assert torch.equal(_generate(pipe), images)
        assert not torch.equal(images, base)
    assert torch.equal(_generate(loaded_then_cast), _generate(cast_then_loaded))


# --- bad input: a clear error, the pipeline unchanged -----------------------------------------------------------
def test_bad_input_is_a_clear_error_and_leaves_the_pipeline_unchanged(tiny_dirs, tuner_files, tmp_path):
    pipe = _load("sdxl", tiny_dirs)
    pipe.load_res_tuner(tuner_files["sdxl", "attn"], adapter_name="mine")
    processors, state, images = _processors(pipe), _tuner_state(pipe), _generate(pipe)
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (lambda: pipe.load_res_tuner(tuner_files["sd1", "attn"]), rd.ResTunerFileError, "does not fit this UNet"),
        (lambda: pipe.load_res_tuner(tmp_path / "missing.safetensors"), rd.ResTunerFileError, "no tuner file"),
        (lambda: pipe.load_res_tuner(empty), rd.ResTunerFileError, "has no tuner file 'res_tuner.safetensors'"),
        (lambda: pipe.load_res_tuner(tuner_files["sdxl", "attn"], adapter_name="mine"), rd.ResTunerError, "already"),
        (lambda: pipe.unload_res_tuner("nope"), rd.ResTunerError, r"no tuner named 'nope'.*\['mine'\]"),
        (lambda: pipe.set_res_tuner_scale(0.5, "nope"), rd.ResTunerError, "no tuner named 'nope'"),
        (lambda: pipe.set_res_tuner_scale(float("nan")), ValueError, "finite"),
        (lambda: pipe.set_res_tuners(["mine", "nope"], [0.5, 0.5]), rd.ResTunerError, "no tuner named 'nope'"),
        (lambda: pipe.set_res_tuners(["mine"], [0.5, 0.5]), ValueError, "1 adapter name"),
        (lambda: pipe.disable_res_tuner("nope"), rd.ResTunerError, "no tuner named 'nope'"),
        (lambda: pipe.fuse_res_tuner("mine"), rd.ResTunerError, "'mine'.*only linear tuners"),
        (lambda: pipe.save_pretrained(tmp_path / "saved"), rd.ResTunerError, "save_res_tuner"),
        (lambda: pipe.fuse_qkv_projections(), rd.ResTunerError, "unload them first"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
        assert _processors(pipe) == processors and _tuner_state(pipe) == state
    assert torch.equal(_generate(pipe), images)
    assert not (tmp_path / "saved").exists()

    fresh = _load("sd1", tiny_dirs)
    with pytest.raises(rd.ResTunerError, match="no res tuner is loaded"):
        fresh.set_res_tuner_scale(0.5)
    fresh.fuse_qkv_projections()
    with pytest.raises(rd.ResTunerError, match="unfuse_qkv_projections"):
        fresh.load_res_tuner(tuner_files["sd1", "attn"])
    assert fresh.get_res_tuners() == {}
