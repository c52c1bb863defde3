"""Tests of the offline tiny-model helpers in ``resattn_diffusion.testing``."""

from __future__ import annotations

import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.models.attention import BasicTransformerBlock
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from resattn_diffusion.testing import (
    DEFAULT_WORDS,
    KINDS,
    SD15_UNET_CONFIG,
    SD21_UNET_CONFIG,
    SDXL_UNET_CONFIG,
    make_tokenizer,
    save_tiny_pipeline,
    tiny_pipeline,
    tiny_unet,
    unet_from_config,
    unet_inputs,
)

PROMPT = "a photo of sks dog"


def _generate(pipeline, prompt: str = PROMPT, output_type: str = "pt", seed: int = 0):
    return pipeline(
        prompt,
        num_inference_steps=2,
        output_type=output_type,
        generator=torch.Generator().manual_seed(seed),
    ).images


# ---------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_whole_words_encode_decode_and_pad():
    tokenizer = make_tokenizer(words=["Zorblax", "ooo"], model_max_length=20)

    assert isinstance(tokenizer, CLIPTokenizer)
    for word in list(DEFAULT_WORDS) + ["zorblax", "ooo"]:
        assert tokenizer.tokenize(word) == [word + "</w>"], word
    # Small vocabulary: 512 byte-level symbols, whole-word merges, then the two special tokens last.
    assert 514 < len(tokenizer) < 1000
    assert tokenizer.bos_token == "<|startoftext|>" and tokenizer.bos_token_id == len(tokenizer) - 2
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == len(tokenizer) - 1

    prompt = "A photo of digit seven, 7, by Zorblax"
    encoded = tokenizer(prompt, padding="max_length", truncation=True)
    assert len(encoded.input_ids) == 20
    assert encoded.input_ids[0] == tokenizer.bos_token_id
    n_tokens = sum(encoded.attention_mask)
    assert n_tokens == 2 + 10  # start, "a photo of digit seven , 7 , by zorblax", end
    assert tokenizer.decode(encoded.input_ids, skip_special_tokens=True) == "a photo of digit seven , 7 , by zorblax"


def test_tokenizer_encodes_unknown_text_byte_level_and_truncates():
    tokenizer = make_tokenizer(model_max_length=8)
    # Words outside the vocabulary fall back to byte-level pieces: never an unknown token.
    pieces = tokenizer.tokenize("quixotic café")
    assert len(pieces) > 2 and "<|endoftext|>" not in pieces
    assert tokenizer.decode(tokenizer("quixotic café").input_ids, skip_special_tokens=True) == "quixotic café"

    encoded = tokenizer("a photo of a dog in the style of van gogh", padding="max_length", truncation=True)
    assert len(encoded.input_ids) == 8
    assert encoded.input_ids[-1] == tokenizer.eos_token_id


def test_tokenizer_save_and_load_round_trip(tmp_path):
    tokenizer = make_tokenizer(words=["sksdog"], model_max_length=16, pad_token="!")
    tokenizer.save_pretrained(tmp_path)
    loaded = CLIPTokenizer.from_pretrained(tmp_path)

    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert loaded.model_max_length == 16
    assert loaded.pad_token == "!" and loaded.pad_token_id == tokenizer.pad_token_id
    text = "a sksdog painting, 1990"
    assert loaded(text, padding="max_length").input_ids == tokenizer(text, padding="max_length").input_ids


def test_tokenizer_rejects_bad_arguments():
    with pytest.raises(TypeError, match="sequence of strings"):
        make_tokenizer(words="sks")
    with pytest.raises(ValueError, match="model_max_length"):
        make_tokenizer(model_max_length=1)
    with pytest.raises(ValueError, match="pad_token"):
        make_tokenizer(pad_token="<pad>")


# ---------------------------------------------------------------------------------------------- tiny UNets


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_unet_has_transformer_blocks_everywhere_and_runs(kind):
    unet = tiny_unet(kind)

    block_paths = [name for name, module in unet.named_modules() if isinstance(module, BasicTransformerBlock)]
    for part in ("down_blocks", "mid_block", "up_blocks"):
        assert any(path.startswith(part) for path in block_paths), (kind, part)
    for path in block_paths:
        block = unet.get_submodule(path)
        assert block.attn1 is not None and block.attn2 is not None and block.ff is not None
        assert block.attn2.to_k.in_features == unet.config.cross_attention_dim
    # Tiny: well under 2M parameters (a forward on batch 2 takes ~10 ms on 2 CPU threads).
    assert sum(parameter.numel() for parameter in unet.parameters()) < 2_000_000

    inputs = unet_inputs(unet, batch_size=2, seed=1)
    with torch.no_grad():
        output = unet(**inputs).sample
    assert output.shape == inputs["sample"].shape == (2, 4, 16, 16)
    assert torch.isfinite(output).all()
    assert ("added_cond_kwargs" in inputs) == (kind == "sdxl")


def test_unet_inputs_are_seeded_and_follow_the_unet_dtype():
    unet = tiny_unet("sdxl")
    first, again, other = unet_inputs(unet, seed=0), unet_inputs(unet, seed=0), unet_inputs(unet, seed=1)
    assert torch.equal(first["sample"], again["sample"])
    assert torch.equal(first["added_cond_kwargs"]["text_embeds"], again["added_cond_kwargs"]["text_embeds"])
    assert not torch.equal(first["sample"], other["sample"])
    assert first["encoder_hidden_states"].shape == (2, 7, 96)
    assert first["added_cond_kwargs"]["text_embeds"].shape == (2, 40)

    half_inputs = unet_inputs(tiny_unet("sd1").half(), batch_size=1, tokens=5)
    assert half_inputs["sample"].dtype == torch.float16 and half_inputs["timestep"].dtype == torch.int64
    assert half_inputs["encoder_hidden_states"].shape == (1, 5, 32)


def test_tiny_unet_is_seeded_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    first, again, other = tiny_unet("sd1", seed=0), tiny_unet("sd1", seed=0), tiny_unet("sd1", seed=1)
    assert torch.equal(torch.get_rng_state(), state)

    for (name, weight), weight_again in zip(first.state_dict().items(), again.state_dict().values()):
        assert torch.equal(weight, weight_again), name
    assert not torch.equal(first.conv_in.weight, other.conv_in.weight)
    # The pipeline's UNet is the same model as tiny_unet(kind, seed).
    assert torch.equal(tiny_pipeline("sd1", seed=1).unet.conv_in.weight, other.conv_in.weight)


def test_sd1_uses_conv_projections_and_one_head_count():
    unet = tiny_unet("sd1")
    transformers_2d = [module for name, module in unet.named_modules() if name.endswith("attentions.0")]
    assert transformers_2d and all(isinstance(module.proj_in, torch.nn.Conv2d) for module in transformers_2d)
    assert {block.attn1.heads for block in unet.modules() if isinstance(block, BasicTransformerBlock)} == {4}


def test_sd2_has_linear_projections_and_per_block_heads():
    pipeline = tiny_pipeline("sd2")
    unet = pipeline.unet

    assert unet.config.use_linear_projection is True
    assert isinstance(unet.config.attention_head_dim, (tuple, list)) and len(set(unet.config.attention_head_dim)) > 1
    assert isinstance(unet.down_blocks[0].attentions[0].proj_in, torch.nn.Linear)
    assert isinstance(unet.mid_block.attentions[0].proj_out, torch.nn.Linear)
    down_attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    mid_attn = unet.mid_block.attentions[0].transformer_blocks[0].attn1
    assert down_attn.heads != mid_attn.heads
    # SD 2 keeps the head size constant while the head count grows with the width.
    assert down_attn.inner_dim // down_attn.heads == mid_attn.inner_dim // mid_attn.heads

    assert unet.config.cross_attention_dim == pipeline.text_encoder.config.hidden_size
    assert unet.config.cross_attention_dim != tiny_unet("sd1").config.cross_attention_dim
    assert pipeline.scheduler.config.prediction_type == "v_prediction"


def test_sdxl_has_two_encoders_added_conditions_and_deep_transformers():
    pipeline = tiny_pipeline("sdxl")
    unet = pipeline.unet

    assert isinstance(pipeline, StableDiffusionXLPipeline)
    assert type(pipeline.text_encoder) is CLIPTextModel
    assert isinstance(pipeline.text_encoder_2, CLIPTextModelWithProjection)
    assert pipeline.tokenizer.pad_token == "<|endoftext|>" and pipeline.tokenizer_2.pad_token == "!"
    hidden_sizes = (pipeline.text_encoder.config.hidden_size, pipeline.text_encoder_2.config.hidden_size)
    assert unet.config.cross_attention_dim == sum(hidden_sizes)

    assert unet.config.addition_embed_type == "text_time"
    n_time_ids = 6
    assert unet.add_embedding.linear_1.in_features == (
        pipeline.text_encoder_2.config.projection_dim + n_time_ids * unet.config.addition_time_embed_dim
    )
    assert 2 in tuple(unet.config.transformer_layers_per_block)
    assert len(unet.mid_block.attentions[0].transformer_blocks) == 2
    assert isinstance(unet.mid_block.attentions[0].proj_in, torch.nn.Linear)


# ---------------------------------------------------------------------------------------------- pipelines


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_pipeline_generates_images_of_expected_size(kind):
    pipeline = tiny_pipeline(kind)
    image_size = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    assert image_size == 32

    images = _generate(pipeline, output_type="pt")
    assert images.shape == (1, 3, image_size, image_size)
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1

    pil_images = _generate(pipeline, output_type="pil")
    assert pil_images[0].size == (image_size, image_size) and pil_images[0].mode == "RGB"

    # Same seed -> same image; the prompt reaches the UNet.
    assert torch.equal(_generate(pipeline), images)
    assert not torch.allclose(_generate(pipeline, prompt="a watercolor painting of a red car"), images)


@pytest.mark.parametrize(
    ("kind", "loader"),
    [
        ("sd1", StableDiffusionPipeline),
        ("sd2", StableDiffusionPipeline),
        ("sdxl", StableDiffusionXLPipeline),
        ("sd1", DiffusionPipeline),
        ("sdxl", DiffusionPipeline),
    ],
)
def test_saved_pipeline_loads_offline_with_identical_output(kind, loader, tiny_dirs):
    loaded = loader.from_pretrained(tiny_dirs[kind])
    loaded.set_progress_bar_config(disable=True)
    in_memory = tiny_pipeline(kind)

    assert type(loaded) is type(in_memory)
    assert type(loaded.scheduler) is type(in_memory.scheduler)
    assert loaded.scheduler.config.prediction_type == in_memory.scheduler.config.prediction_type
    assert torch.equal(_generate(loaded), _generate(in_memory))


def test_save_tiny_pipeline_returns_folder_and_rejects_files(tmp_path):
    folder = save_tiny_pipeline("sd1", tmp_path / "nested" / "sd1", seed=3)
    assert (folder / "model_index.json").is_file()
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (folder / "tokenizer" / "tokenizer.json").is_file()

    a_file = tmp_path / "not_a_folder"
    a_file.write_text("x")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        save_tiny_pipeline("sd1", a_file)
    with pytest.raises(ValueError, match="sd1, sd2, sdxl"):
        tiny_pipeline("sd3")


# ---------------------------------------------------------------------------------------------- real configs


@pytest.mark.parametrize(
    ("config", "n_parameters"),
    [(SD15_UNET_CONFIG, 859_520_964), (SD21_UNET_CONFIG, 865_910_724), (SDXL_UNET_CONFIG, 2_567_463_684)],
    ids=["sd15", "sd21", "sdxl"],
)
def test_real_unet_configs_have_the_published_parameter_counts(config, n_parameters):
    config_before = repr(config)
    unet = unet_from_config(config)

    assert all(parameter.device.type == "meta" for parameter in unet.parameters())
    assert sum(parameter.numel() for parameter in unet.parameters()) == n_parameters
    assert repr(config) == config_before  # the shared constant is not modified


def test_real_unet_architecture_details():
    sd15, sd21, sdxl = (unet_from_config(config) for config in (SD15_UNET_CONFIG, SD21_UNET_CONFIG, SDXL_UNET_CONFIG))

    assert sd15.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.in_features == 768
    assert isinstance(sd15.down_blocks[0].attentions[0].proj_in, torch.nn.Conv2d)
    assert sd21.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.in_features == 1024
    assert isinstance(sd21.down_blocks[0].attentions[0].proj_in, torch.nn.Linear)
    assert sd21.down_blocks[0].attentions[0].transformer_blocks[0].attn1.heads == 5
    assert len(sdxl.down_blocks[2].attentions[0].transformer_blocks) == 10
    assert sdxl.add_embedding.linear_1.in_features == 2816


def test_benchmark_config_is_sd1_shaped_and_fresh():
    from benchmarks.perf.common import benchmark_unet_config

    config = benchmark_unet_config()
    config["sample_size"] = 1
    assert benchmark_unet_config()["sample_size"] == 32

    unet = unet_from_config(benchmark_unet_config())
    assert unet.config.layers_per_block == 2
    assert [type(block).__name__ for block in unet.down_blocks] == [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ]
    assert 5_000_000 < sum(parameter.numel() for parameter in unet.parameters()) < 50_000_000

    with pytest.raises(TypeError, match="must be a dict"):
        unet_from_config(["not", "a", "config"])
