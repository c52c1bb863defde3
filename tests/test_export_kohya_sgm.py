"""kohya-format export of SDXL tuners: kohya's sd-scripts (and A1111) name SDXL LoRA modules by the original
SGM/LDM UNet (``input_blocks`` / ``middle_block`` / ``output_blocks``), SD 1.x/2.x ones by the diffusers UNet.

The expected names below are written by hand from kohya's SDXL UNet (``library/sdxl_original_unet.py``): input
block 0 is ``conv_in``; each resolution then has ``layers_per_block`` blocks of (resnet, transformer) and, except
the last, one downsampler block; the middle block is (resnet, transformer, resnet); each resolution of the output
has ``layers_per_block + 1`` blocks of (resnet, transformer[, upsampler]). A transformer is child 1 of its block.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from resattn_diffusion import ResTunerConfig, ResTunerError, add_res_tuner, save_res_tuner
from resattn_diffusion.integration.export import export_lora, main
from resattn_diffusion.integration.families import family_named
from resattn_diffusion.testing import (
    SDXL_UNET_CONFIG,
    frozen_tiny_unet,
    randomize_tuner,
    save_tiny_pipeline,
    tiny_pipeline,
    unet_from_config,
)

pytest.importorskip("peft")  # diffusers' load_lora_weights needs it

#: The tiny SDXL UNet (layers_per_block=1; DownBlock2D, CrossAttnDownBlock2D; CrossAttnUpBlock2D, UpBlock2D):
#: input blocks 1 (resnet), 2 (downsampler), 3 (resnet, transformer); output blocks 0, 1 (resnet, transformer),
#: 2, 3 (resnet).
TINY_SDXL_KOHYA_BLOCKS = {
    "lora_unet_input_blocks_3_1",
    "lora_unet_middle_block_1",
    "lora_unet_output_blocks_0_1",
    "lora_unet_output_blocks_1_1",
}
DIFFUSERS_BLOCK_PREFIXES = ("lora_unet_down_blocks", "lora_unet_mid_block", "lora_unet_up_blocks")


def _images(pipe):
    return pipe("a photo", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images


def _block_of(key: str) -> str:
    """``lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.lora_down.weight`` -> its block's name."""
    return key.split(".")[0].split("_transformer_blocks_")[0]


@pytest.mark.parametrize("tuner", ["res_lora", "surm_circulant"])
def test_sdxl_kohya_file_has_sgm_names_and_loads_in_stock_diffusers_with_the_tuners_images(tuner, tmp_path):
    pipe = tiny_pipeline("sdxl")
    add_res_tuner(pipe.unet, ResTunerConfig(tuner=tuner, targets=("attn1", "attn2", "ff"), scale=0.7))
    randomize_tuner(pipe.unet, std=0.2)
    tuner_file = save_res_tuner(pipe.unet, tmp_path / "t.safetensors")
    ours = _images(pipe)

    stock = tiny_pipeline("sdxl")
    base_images = _images(stock)
    report = export_lora(tuner_file, tmp_path / "kohya.safetensors", format="kohya", base=stock.unet)
    keys = list(load_file(report.out_file))
    assert keys and not any(key.startswith(DIFFUSERS_BLOCK_PREFIXES) for key in keys)
    assert {_block_of(key) for key in keys} == TINY_SDXL_KOHYA_BLOCKS

    stock.load_lora_weights(str(report.out_file))
    # every tuner layer became a LoRA layer at its own diffusers path (none was dropped or misplaced)
    assert all(hasattr(stock.unet.get_submodule(layer.path), "lora_A") for layer in report.layers)
    theirs = _images(stock)
    assert abs(ours - base_images).max() > 1e-2  # the tuner changes the images, so the match below means something
    assert abs(ours - theirs).max() < 1e-4


def _sdxl_shaped_unet():
    """SDXL's block layout (layers_per_block 2; DownBlock2D then two CrossAttn blocks; transformer depths 1, 2, 10)
    at tiny widths."""
    config = {
        **SDXL_UNET_CONFIG,
        "block_out_channels": [32, 64, 64],
        "attention_head_dim": [2, 4, 4],
        "norm_num_groups": 8,
        "cross_attention_dim": 32,
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 40 + 6 * 8,
        "sample_size": 16,
    }
    torch.manual_seed(0)
    return unet_from_config(config, device="cpu")


def test_an_sdxl_shaped_unet_gets_the_key_names_kohya_gives_sdxl(tmp_path):
    unet = _sdxl_shaped_unet()
    add_res_tuner(unet, ResTunerConfig(tuner="res_lora", rank=2, targets=("attn1", "attn2", "ff")))
    randomize_tuner(unet)
    tuner_file = save_res_tuner(unet, tmp_path / "t.safetensors")
    keys = set(load_file(export_lora(tuner_file, tmp_path / "k.safetensors", format="kohya", base=unet).out_file))

    # SDXL: input blocks 4, 5 (level 1) and 7, 8 (level 2) hold transformers; output blocks 0-2 (level 2), 3-5
    # (level 1); 3 and 6 are downsamplers, 1, 2 and 6-8 resnets only.
    assert {_block_of(key) for key in keys} == {
        "lora_unet_input_blocks_4_1",
        "lora_unet_input_blocks_5_1",
        "lora_unet_input_blocks_7_1",
        "lora_unet_input_blocks_8_1",
        "lora_unet_middle_block_1",
        *(f"lora_unet_output_blocks_{i}_1" for i in range(6)),
    }
    for name in (
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",  # down_blocks.1.attentions.0
        "lora_unet_input_blocks_5_1_transformer_blocks_1_attn2_to_k",  # down_blocks.1.attentions.1
        "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_out_0",  # down_blocks.2.attentions.1
        "lora_unet_middle_block_1_transformer_blocks_9_ff_net_0_proj",  # mid_block.attentions.0
        "lora_unet_output_blocks_2_1_transformer_blocks_9_attn2_to_v",  # up_blocks.0.attentions.2
        "lora_unet_output_blocks_3_1_transformer_blocks_0_attn1_to_out_0",  # up_blocks.1.attentions.0
        "lora_unet_output_blocks_5_1_transformer_blocks_1_ff_net_2",  # up_blocks.1.attentions.2
    ):
        assert f"{name}.lora_down.weight" in keys and f"{name}.lora_up.weight" in keys
    # 2 * 2 + 2 * 10 + 10 + 3 * 10 + 3 * 2 transformer blocks; 10 linears each (q, k, v, out of attn1 and attn2;
    # ff.net.0.proj, ff.net.2); 2 tensors per linear
    assert len(keys) == (4 + 20 + 10 + 30 + 6) * 10 * 2


def test_sd1_and_sd2_kohya_files_keep_the_diffusers_module_names(tmp_path):
    for kind in ("sd1", "sd2"):
        unet = frozen_tiny_unet(kind)
        add_res_tuner(unet, ResTunerConfig(tuner="res_lora", rank=2, targets=("attn1", "attn2", "ff")))
        randomize_tuner(unet)
        tuner_file = save_res_tuner(unet, tmp_path / f"{kind}.safetensors")
        report = export_lora(tuner_file, tmp_path / f"{kind}-kohya.safetensors", format="kohya", base=unet)
        expected = set()
        for layer in report.layers:
            name = "lora_unet_" + layer.path.replace(".", "_")
            expected |= {f"{name}.lora_down.weight", f"{name}.lora_up.weight"}
        assert set(load_file(report.out_file)) == expected
        assert any(key.startswith("lora_unet_down_blocks_0_attentions_0_") for key in expected)


def test_an_sdxl_kohya_export_without_the_base_config_is_refused_naming_what_to_pass(tmp_path):
    unet = frozen_tiny_unet("sdxl")
    add_res_tuner(unet, ResTunerConfig(tuner="res_lora", rank=2))
    tuner_file = save_res_tuner(unet, tmp_path / "t.safetensors")
    out = tmp_path / "k.safetensors"
    with pytest.raises(ResTunerError, match=r"layers_per_block.*pass base="):
        export_lora(tuner_file, out, format="kohya")
    assert not out.exists()
    weights_only = tmp_path / "weights.safetensors"  # a UNet weights file with no config.json beside it
    weights_only.write_bytes((tmp_path / "t.safetensors").read_bytes())
    with pytest.raises(ResTunerError, match="config.json"):
        export_lora(tuner_file, out, format="kohya", base=weights_only)
    assert not out.exists()
    export_lora(tuner_file, out, format="diffusers")  # the diffusers format needs no layout


def test_the_sdxl_layout_is_read_from_a_model_folder_and_a_base_of_another_shape_is_refused(tmp_path):
    unet = frozen_tiny_unet("sdxl")
    add_res_tuner(unet, ResTunerConfig(tuner="res_lora", rank=2))
    randomize_tuner(unet)
    tuner_file = save_res_tuner(unet, tmp_path / "t.safetensors")
    from_module = load_file(export_lora(tuner_file, tmp_path / "a.safetensors", format="kohya", base=unet).out_file)
    folder = save_tiny_pipeline("sdxl", tmp_path / "model")
    out = tmp_path / "b.safetensors"
    assert main([str(tuner_file), str(out), "--format", "kohya", "--base", str(folder)]) == 0
    from_folder = load_file(out)
    assert from_folder.keys() == from_module.keys()
    assert {_block_of(key) for key in from_folder} == TINY_SDXL_KOHYA_BLOCKS
    with pytest.raises(ResTunerError, match=r"block_out_channels \[32, 64, 64\].*\[32, 64\]"):
        export_lora(tuner_file, tmp_path / "c.safetensors", format="kohya", base=_sdxl_shaped_unet())
    assert not (tmp_path / "c.safetensors").exists()


_SDXL = {"class": "UNet2DConditionModel", "addition_embed_type": "text_time"}
_BLOCK = "transformer_blocks.0.attn1.to_q"


@pytest.mark.parametrize(
    "path, why",
    [
        (f"down_blocks.0.attentions.0.{_BLOCK}", "DownBlock2D"),  # SDXL's first resolution has no transformer
        (f"down_blocks.1.attentions.2.{_BLOCK}", "layers_per_block"),  # 2 per down block
        (f"up_blocks.0.attentions.3.{_BLOCK}", "layers_per_block"),  # 3 per up block
        (f"up_blocks.3.attentions.0.{_BLOCK}", "3 up blocks"),
        (f"mid_block.attentions.1.{_BLOCK}", "one transformer"),
        (_BLOCK, "outside"),
    ],
)
def test_a_layer_without_an_sgm_counterpart_is_refused_naming_it(path, why):
    family = family_named("unet")
    with pytest.raises(ResTunerError, match=rf"(?s){path.replace('.', '[.]')}.*{why}"):
        family.kohya_module_paths([path], _SDXL, SDXL_UNET_CONFIG)


def test_per_block_layer_counts_are_refused():
    # diffusers' SGM conversion numbers blocks by one integer layers_per_block: with a list it cannot map back
    family = family_named("unet")
    config = {**SDXL_UNET_CONFIG, "layers_per_block": [1, 2, 2]}
    with pytest.raises(ResTunerError, match=r"layers_per_block \[1, 2, 2\]"):
        family.kohya_module_paths([f"down_blocks.1.attentions.0.{_BLOCK}"], _SDXL, config)
