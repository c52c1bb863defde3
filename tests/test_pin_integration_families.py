"""The model families (issue 18, mutation score): which model each family takes, the layers a config selects on
the tiny UNet, SD3 / SD3.5 and Flux transformers (paths, roles, shapes and projections read off the diffusers
modules), how block patterns match, what a tuner file records of the model, and the refusals' messages."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

import resattn_diffusion as rd
from resattn_diffusion.integration import api
from resattn_diffusion.integration.families import family_of
from resattn_diffusion.integration.families.joint import joint_attention_layer
from resattn_diffusion.testing import (
    frozen_tiny_unet,
    tiny_flux_transformer,
    tiny_sd3_transformer,
    tiny_unet,
    unet_inputs,
)


def _paths(model, **config) -> list[str]:
    return [layer.path for layer in api.find_layers(model, rd.ResTunerConfig(**config))]


def _operations(model, config: rd.ResTunerConfig):
    """The operations (attentions, feed-forwards, single linears) a config selects."""
    return family_of(model).operation_layers(model, config)


@pytest.fixture(scope="module")
def unet():
    return frozen_tiny_unet("sd1")


@pytest.fixture(scope="module")
def sd3():
    return tiny_sd3_transformer(dual_attention=True)


@pytest.fixture(scope="module")
def flux():
    return tiny_flux_transformer()


# --- which family ---------------------------------------------------------------------------------------------
def test_each_model_gets_its_family_and_an_unknown_model_is_told_what_to_pass(unet, sd3, flux):
    assert [family_of(m).name for m in (unet, sd3, flux)] == ["unet", "sd3", "flux"]
    assert [family_of(m).call_kwargs for m in (unet, sd3, flux)] == [
        "cross_attention_kwargs",
        "joint_attention_kwargs",
        "joint_attention_kwargs",
    ]
    from diffusers import Transformer2DModel

    bare = Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=16, norm_num_groups=8)
    assert family_of(bare).name == "unet"  # built of BasicTransformerBlocks: the UNet's tuners fit
    with pytest.raises(rd.ResTunerError) as info:
        family_of(nn.Linear(2, 2))
    message = str(info.value)
    assert message.startswith("res tuners do not know a Linear")
    for word in ("UNet2DConditionModel (UNet)", "SD3Transformer2DModel (SD3 transformer)",
                 "FluxTransformer2DModel (Flux transformer)", "pipe.unet"):  # fmt: skip
        assert word in message


# --- UNet layers ------------------------------------------------------------------------------------------------
def test_unet_layers_default_targets_roles_shapes_and_projections(unet):
    from diffusers.models.attention import BasicTransformerBlock

    blocks = [name for name, m in unet.named_modules() if isinstance(m, BasicTransformerBlock)]
    layers = _operations(unet, rd.ResTunerConfig("res_lora"))
    assert [layer.path for layer in layers] == [f"{b}.{t}" for b in blocks for t in ("attn1", "attn2")]
    for layer in layers:
        attn = unet.get_submodule(layer.path)
        assert layer.module is attn and layer.role == "attention"
        assert layer.processor_cls is rd.ResTunerAttnProcessor
        shape = layer.shape
        assert (shape.in_dim, shape.out_dim, shape.context_dim, shape.inner_dim, shape.heads) == (
            attn.to_q.in_features,
            attn.to_out[0].out_features,
            attn.to_k.in_features,
            attn.to_q.out_features,
            attn.heads,
        )
        assert {name: (suffix, module) for name, (suffix, module) in layer.linears.items()} == {
            "to_q": ("to_q", attn.to_q),
            "to_k": ("to_k", attn.to_k),
            "to_v": ("to_v", attn.to_v),
            "to_out": ("to_out.0", attn.to_out[0]),
        }
    cross = [layer for layer in layers if layer.path.endswith("attn2")]
    assert {layer.shape.context_dim for layer in cross} == {unet.config.cross_attention_dim}


def test_unet_feed_forward_layer(unet):
    layers = api.find_layers(unet, rd.ResTunerConfig("res_adapter", targets=["ff"]))
    assert layers and all(layer.path.endswith(".ff") for layer in layers)
    for layer in layers:
        ff = unet.get_submodule(layer.path)
        assert layer.role == "ff" and layer.module is ff and layer.processor_cls is None
        assert (layer.shape.in_dim, layer.shape.out_dim, layer.shape.context_dim) == (
            ff.net[0].proj.in_features,
            ff.net[2].out_features,
            ff.net[0].proj.in_features,
        )
        assert layer.linears == {"net.0.proj": ("net.0.proj", ff.net[0].proj), "net.2": ("net.2", ff.net[2])}


def test_block_patterns_match_whole_path_parts(unet):
    every = _paths(unet, tuner="res_attn", rank=4, targets=["attn1"])
    up = [p for p in every if p.startswith("up_blocks.")]
    up1 = [p for p in every if p.startswith("up_blocks.1.")]
    mid = [p for p in every if p.startswith("mid_block.")]
    up10 = [p for p in every if p.startswith("up_blocks.1.attentions.0.")]
    assert up and up1 and up10 and mid and len(up10) < len(up1)
    assert _paths(unet, tuner="res_attn", rank=4, targets=["attn1"], blocks=["up_blocks.*"]) == up
    assert _paths(unet, tuner="res_attn", rank=4, targets=["attn1"], blocks=["up_blocks.1"]) == up1
    assert _paths(unet, tuner="res_attn", rank=4, targets=["attn1"], blocks=["up_blocks.1.*"]) == up1
    assert _paths(unet, tuner="res_attn", rank=4, targets=["attn1"], blocks=["up_blocks.1.attentions.0"]) == up10
    assert _paths(unet, tuner="res_attn", rank=4, targets=["attn1"], blocks=["mid_block", "up_blocks.1"]) == [
        p for p in every if p in mid + up1
    ]
    one_block = up1[0].rsplit(".", 1)[0]
    assert _paths(unet, tuner="res_attn", rank=4, targets=["attn1"], blocks=[one_block]) == [up1[0]]
    with pytest.raises(rd.ConfigError) as info:
        _paths(unet, tuner="res_attn", rank=4, targets=["attn1"], blocks=["up_blocks.*", "up_block"])
    message = str(info.value)
    assert "block pattern 'up_block' matches no transformer block of this UNet" in message
    assert "'mid_block'" in message and "'up_blocks.1'" in message  # examples that do match


def test_unknown_targets_and_projections_name_the_family_vocabulary(unet, sd3):
    vocabulary = r"its targets are \['attn', 'attn2', 'ff', 'ff_context'\] \(default \['attn', 'attn2'\]\)"
    with pytest.raises(
        rd.ConfigError, match=r"target\(s\) \['attn1'\] do not exist on a SD3 transformer; " + vocabulary
    ):
        api.find_layers(sd3, rd.ResTunerConfig("res_attn", rank=4, targets=["attn1"]))
    with pytest.raises(rd.ConfigError, match=r"projection\(s\) \['add_q_proj'\] do not exist on a UNet; its "
                       r"projections are \['to_q', 'to_k', 'to_v', 'to_out'\]"):  # fmt: skip
        rd.add_res_tuner(unet, rd.ResTunerConfig("res_lora", projections=["to_q", "add_q_proj"]))
    lora_sd3 = rd.ResTunerConfig("res_lora", projections=["add_q_proj"])
    assert api.expected_fingerprint(sd3, lora_sd3)  # the same projection is SD3's


def test_a_config_that_selects_nothing_is_refused(sd3):
    plain = tiny_sd3_transformer(dual_attention=False)
    assert _paths(sd3, tuner="res_attn", rank=4, targets=["attn2"]) == ["transformer_blocks.0.attn2"]
    with pytest.raises(rd.ConfigError, match=r"selects no layer of this SD3 transformer \(targets \['attn2'\]"):
        api.find_layers(plain, rd.ResTunerConfig("res_attn", rank=4, targets=["attn2"]))


# --- SD3 / Flux layers ------------------------------------------------------------------------------------------
def _joint_expected(attn) -> tuple:
    out = attn.to_out[0].out_features if getattr(attn, "to_out", None) is not None else attn.to_q.out_features
    return (attn.to_q.in_features, out, attn.to_q.in_features, attn.to_q.out_features, attn.heads)


def test_sd3_layers_and_the_last_blocks_text_projections(sd3):
    layers = _operations(sd3, rd.ResTunerConfig("res_lora", targets=["attn", "attn2", "ff", "ff_context"]))
    assert [(layer.path, layer.role) for layer in layers] == [
        ("transformer_blocks.0.attn", "attention"),
        ("transformer_blocks.0.attn2", "attention"),
        ("transformer_blocks.0.ff", "ff"),
        ("transformer_blocks.0.ff_context", "ff"),
        ("transformer_blocks.1.attn", "attention"),
        ("transformer_blocks.1.ff", "ff"),  # the last block is context_pre_only: no ff_context
    ]
    first, attn2, last = layers[0], layers[1], layers[4]
    for layer in (first, attn2, last):
        attn = sd3.get_submodule(layer.path)
        assert layer.module is attn
        shape = layer.shape
        assert (shape.in_dim, shape.out_dim, shape.context_dim, shape.inner_dim, shape.heads) == _joint_expected(attn)
        assert layer.processor_cls.__name__ == "ResTunerJointAttnProcessor"
    every = ["to_q", "to_k", "to_v", "to_out", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    assert list(first.linears) == every
    assert first.linears["to_out"] == ("to_out.0", sd3.transformer_blocks[0].attn.to_out[0])
    assert first.linears["to_add_out"] == ("to_add_out", sd3.transformer_blocks[0].attn.to_add_out)
    assert list(attn2.linears) == ["to_q", "to_k", "to_v", "to_out"]  # an image-only attention
    # the last block drops the text output: no text queries or text output projection for a tuner
    assert list(last.linears) == ["to_q", "to_k", "to_v", "to_out", "add_k_proj", "add_v_proj"]


def test_flux_layers_double_blocks_then_single_blocks(flux):
    targets = ["attn", "ff", "ff_context", "proj_mlp", "proj_out"]
    layers = _operations(flux, rd.ResTunerConfig("res_lora", targets=targets))
    assert [(layer.path, layer.role) for layer in layers] == [
        ("transformer_blocks.0.attn", "attention"),
        ("transformer_blocks.0.ff", "ff"),
        ("transformer_blocks.0.ff_context", "ff"),
        ("single_transformer_blocks.0.attn", "attention"),
        ("single_transformer_blocks.0.proj_mlp", "linear"),
        ("single_transformer_blocks.0.proj_out", "linear"),
        ("single_transformer_blocks.1.attn", "attention"),
        ("single_transformer_blocks.1.proj_mlp", "linear"),
        ("single_transformer_blocks.1.proj_out", "linear"),
    ]
    single_attn = layers[3]
    attn = flux.single_transformer_blocks[0].attn
    assert single_attn.shape.out_dim == attn.to_q.out_features  # no output projection: the inner width
    assert (single_attn.shape.in_dim, single_attn.shape.heads) == (attn.to_q.in_features, attn.heads)
    assert list(single_attn.linears) == ["to_q", "to_k", "to_v"]
    for layer in (layers[4], layers[5]):
        linear = flux.get_submodule(layer.path)
        assert layer.module is linear
        assert (layer.shape.in_dim, layer.shape.out_dim, layer.shape.context_dim, layer.shape.has_bias) == (
            linear.in_features,
            linear.out_features,
            linear.in_features,
            linear.bias is not None,
        )
    # a linear tuner sits on each single linear itself
    assert _paths(flux, tuner="res_lora", targets=["proj_mlp"], blocks=["single_transformer_blocks.1"]) == [
        "single_transformer_blocks.1.proj_mlp"
    ]


def test_joint_attention_with_a_text_stream_of_another_width_is_refused():
    attn = nn.Module()
    attn.to_q, attn.to_k, attn.to_v = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(8, 16)
    attn.add_k_proj = nn.Linear(12, 16)
    attn.heads = 2
    with pytest.raises(rd.ResTunerError, match="x.attn: the text stream is 12 wide and the image stream 8"):
        joint_attention_layer("x.attn", attn)
    attn.add_k_proj = nn.Linear(8, 16)
    layer = joint_attention_layer("x.attn", attn)
    assert (layer.shape.in_dim, layer.shape.out_dim, layer.shape.context_dim) == (8, 16, 8)
    assert list(layer.linears) == ["to_q", "to_k", "to_v", "add_k_proj"]


def test_a_linear_target_that_is_not_a_linear_is_refused(flux):
    from resattn_diffusion.integration.families.base import linear_layer

    with pytest.raises(rd.ResTunerError, match=r"blk.proj_mlp is a Conv1d, not a linear layer"):
        linear_layer("blk.proj_mlp", nn.Conv1d(2, 2, 1))


# --- what a file records of the model ----------------------------------------------------------------------------
def test_describe_records_the_models_class_and_shape(unet, sd3, flux):
    assert family_of(unet).describe(unet) == {
        "class": "UNet2DConditionModel",
        "name_or_path": "",
        "block_out_channels": list(unet.config.block_out_channels),
        "cross_attention_dim": unet.config.cross_attention_dim,
        "addition_embed_type": None,
    }
    sdxl = tiny_unet("sdxl")
    assert family_of(sdxl).describe(sdxl)["addition_embed_type"] == "text_time"
    assert family_of(sd3).describe(sd3) == {
        "class": "SD3Transformer2DModel",
        "name_or_path": "",
        "num_layers": 2,
        "num_attention_heads": 2,
        "attention_head_dim": 8,
        "joint_attention_dim": sd3.config.joint_attention_dim,
        "dual_attention_layers": [0],
    }
    assert family_of(flux).describe(flux) == {
        "class": "FluxTransformer2DModel",
        "name_or_path": "",
        "num_layers": 1,
        "num_single_layers": 2,
        "num_attention_heads": 2,
        "attention_head_dim": 8,
        "joint_attention_dim": flux.config.joint_attention_dim,
    }
    # a config read by attribute (no .get), with a name
    model = nn.Module()
    model.config = types.SimpleNamespace(_name_or_path="org/model", block_out_channels=(4, 8))
    described = family_of(unet).describe(model)
    assert described["name_or_path"] == "org/model" and described["block_out_channels"] == [4, 8]
    assert described["cross_attention_dim"] is None and described["class"] == "Module"


# --- the UNet's guard on set_default_attn_processor ---------------------------------------------------------------
def test_set_default_attn_processor_keeps_the_tuners_and_the_guard_leaves_with_them():
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    unet = frozen_tiny_unet("sd1")
    inputs = unet_inputs(unet, batch_size=1, seed=2)
    with torch.no_grad():
        reference = unet(**inputs).sample
    assert "set_default_attn_processor" not in unet.__dict__
    rd.add_res_tuner(unet, rd.ResTunerConfig("res_attn", rank=4, targets=["attn1"]))
    from resattn_diffusion.testing import randomize_tuner

    randomize_tuner(unet, seed=4)
    with torch.no_grad():
        tuned = unet(**inputs).sample
    assert "set_default_attn_processor" in unet.__dict__
    unet.set_default_attn_processor()
    processors = unet.attn_processors
    wrapped = [p for p in processors.values() if isinstance(p, rd.ResTunerAttnProcessor)]
    assert wrapped and all(type(p.base_processor) is AttnProcessor for p in wrapped)
    assert all(type(p) is AttnProcessor for p in processors.values() if p not in wrapped)
    with torch.no_grad():
        assert torch.allclose(unet(**inputs).sample, tuned, atol=1e-5)
    rd.remove_res_tuner(unet)
    assert "set_default_attn_processor" not in unet.__dict__
    assert all(type(p) in (AttnProcessor, AttnProcessor2_0) for p in unet.attn_processors.values())
    with torch.no_grad():
        assert torch.allclose(unet(**inputs).sample, reference, atol=1e-5)
