"""Tuners beside diffusers' IP-Adapter, loaded through the pipeline's own ``load_ip_adapter`` from a file saved here
(the tiny SD 1 pipeline; an IP-Adapter file in diffusers' safetensors layout, ``image_proj.*`` and ``ip_adapter.*``).

What broke before (each test says which): ``load_ip_adapter`` after tuners on ``attn1`` raised a TypeError inside
diffusers (it rebuilds the processors it leaves alone as ``type(processor)()``); Res-Attn on ``attn2`` raised one too
(it read ``(text, [image tokens])`` as its context); ``set_ip_adapter_scale``, ``unload_ip_adapter``,
``disable_xformers_memory_efficient_attention`` and ``ip_adapter_masks`` silently did nothing or dropped the adapter;
``pipe.to(...)`` left the adapter's weights behind; Flux's adapter raised at the first call. SD3's adapter (a
timestep-conditioned resampler) is checked beside tuners in either order.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate import cpu_offload
from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
from safetensors.torch import save_file

import resattn_diffusion as rd
from resattn_diffusion.testing import randomize_tuner, tiny_pipeline, unet_inputs

#: width of the image embedding the tiny IP-Adapter projects (CLIP ViT-H's is 1024)
IMAGE_EMBED_DIM = 12


def save_ip_adapter(unet: torch.nn.Module, folder: Path, seed: int = 0) -> Path:
    """A plain IP-Adapter (4 image tokens) for ``unet`` in diffusers' file layout: the image projection and, per
    cross-attention in ``attn_processors`` order, ``<1, 3, 5, ...>.to_k_ip`` / ``to_v_ip`` weights."""
    generator = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    tensors = {
        "image_proj.proj.weight": torch.randn(4 * cross, IMAGE_EMBED_DIM, generator=generator) * 0.3,
        "image_proj.proj.bias": torch.zeros(4 * cross),
        "image_proj.norm.weight": torch.ones(cross),
        "image_proj.norm.bias": torch.zeros(cross),
    }
    key = 1
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            width = unet.get_submodule(name.removesuffix(".processor")).to_out[0].out_features
            tensors[f"ip_adapter.{key}.to_k_ip.weight"] = torch.randn(width, cross, generator=generator) * 0.3
            tensors[f"ip_adapter.{key}.to_v_ip.weight"] = torch.randn(width, cross, generator=generator) * 0.3
            key += 2
    path = folder / "ip_adapter.safetensors"
    save_file(tensors, str(path))
    return path


def load_ip_adapter(pipe, path: Path) -> None:
    pipe.load_ip_adapter(str(path.parent), subfolder="", weight_name=path.name, image_encoder_folder=None)


def image_embeds(seed: int) -> list[torch.Tensor]:
    return [torch.randn(2, 1, IMAGE_EMBED_DIM, generator=torch.Generator().manual_seed(seed))]


def add_tuners(unet: torch.nn.Module) -> None:
    rd.add_res_tuner(unet, rd.ResTunerConfig("res_attn", targets=["attn1", "attn2"]))
    rd.add_res_tuner(unet, rd.ResTunerConfig("res_lora", rank=2), adapter_name="lora")
    randomize_tuner(unet, std=0.3)
    randomize_tuner(unet, "lora", seed=1, std=0.3)


@pytest.mark.parametrize("order", ["tuners first", "ip-adapter first"])
def test_tuners_and_an_ip_adapter_in_either_order(tmp_path, order):
    """Both load in either order, the branches read the text only (at IP-Adapter scale 0 the tuned UNet's output is
    exactly what it was without the adapter, whatever the image), and the image steers the output at scale 1."""
    pipe = tiny_pipeline("sd1")
    unet = pipe.unet
    path = save_ip_adapter(unet, tmp_path)
    inputs = unet_inputs(unet)
    reference = tiny_pipeline("sd1").unet  # the same UNet and tuners, without the adapter
    add_tuners(reference)
    with torch.no_grad():
        tuned = reference(**inputs).sample
    if order == "tuners first":
        add_tuners(unet)
        parameters = {id(p) for p in rd.res_tuner_parameters(unet)}
        load_ip_adapter(pipe, path)
    else:
        load_ip_adapter(pipe, path)
        add_tuners(unet)
        parameters = {id(p) for p in rd.res_tuner_parameters(unet)}
    attentions = {
        name.removesuffix(".processor"): unet.get_submodule(name.removesuffix(".processor"))
        for name in unet.attn_processors
    }
    assert all(isinstance(attn.processor, rd.ResTunerAttnProcessor) for attn in attentions.values())
    # diffusers finds its IP-Adapter processors by type in attn_processors: the wrapped ones are reported there
    reported = {name: type(p) for name, p in unet.attn_processors.items()}
    assert {name.rsplit(".", 2)[-2]: kind for name, kind in reported.items()} == {
        "attn1": rd.ResTunerAttnProcessor,
        "attn2": IPAdapterAttnProcessor2_0,
    }
    assert {id(p) for p in rd.res_tuner_parameters(unet)} == parameters  # every tuner still there

    pipe.set_ip_adapter_scale(0.0)
    with torch.no_grad():
        for seed in (0, 1):
            out = unet(**inputs, added_cond_kwargs={"image_embeds": image_embeds(seed)}).sample
            torch.testing.assert_close(out, tuned, rtol=1e-6, atol=1e-6)
        pipe.set_ip_adapter_scale(1.0)
        first = unet(**inputs, added_cond_kwargs={"image_embeds": image_embeds(0)}).sample
        second = unet(**inputs, added_cond_kwargs={"image_embeds": image_embeds(1)}).sample
    assert not torch.allclose(first, tuned, atol=1e-4) and not torch.allclose(first, second, atol=1e-4)


def test_unload_ip_adapter_keeps_the_tuners_and_drops_the_adapter(tmp_path):
    """``pipe.unload_ip_adapter()`` puts diffusers' SDPA processor back under our tuners (before, the IP-Adapter
    processor would have stayed wrapped, splitting the last 4 text tokens off as image tokens); removing the
    tuners beside a loaded adapter leaves the adapter's processors installed."""
    pipe = tiny_pipeline("sd1")
    unet = pipe.unet
    path = save_ip_adapter(unet, tmp_path)
    inputs = unet_inputs(unet)
    add_tuners(unet)
    with torch.no_grad():
        tuned = unet(**inputs).sample
    load_ip_adapter(pipe, path)
    pipe.unload_ip_adapter()
    assert unet.encoder_hid_proj is None
    processors = unet.attn_processors.values()
    assert all(type(p) is rd.ResTunerAttnProcessor and type(p.base_processor) is AttnProcessor2_0 for p in processors)
    with torch.no_grad():
        torch.testing.assert_close(unet(**inputs).sample, tuned, rtol=1e-6, atol=1e-6)

    load_ip_adapter(pipe, path)
    rd.remove_res_tuner(unet, "default")
    rd.remove_res_tuner(unet, "lora")
    kinds = {name.rsplit(".", 2)[-2]: type(p) for name, p in unet.attn_processors.items()}
    assert kinds == {"attn1": AttnProcessor2_0, "attn2": IPAdapterAttnProcessor2_0}


def test_a_sampling_call_with_an_image_prompt(tmp_path):
    """The pipeline's own call with ``ip_adapter_image_embeds`` (classifier-free guidance: negative and positive
    embeddings) runs with tuners loaded, and the image prompt changes the image."""
    pipe = tiny_pipeline("sd1")
    path = save_ip_adapter(pipe.unet, tmp_path)
    add_tuners(pipe.unet)
    load_ip_adapter(pipe, path)

    def sample(seed: int):
        embeds = [torch.cat([torch.zeros(1, 1, IMAGE_EMBED_DIM), image_embeds(seed)[0][:1]])]
        generator = torch.Generator().manual_seed(0)
        return pipe(
            "a photo", num_inference_steps=2, ip_adapter_image_embeds=embeds, generator=generator, output_type="np"
        ).images

    first, second = sample(0), sample(1)
    assert first.shape == second.shape and abs(first - second).max() > 1e-4


def test_the_deprecated_tensor_form_reads_the_text_tokens_only():
    """diffusers still accepts the image tokens appended to the text (deprecated): the branch reads the text part,
    as the IP-Adapter processor splits it."""
    pipe = tiny_pipeline("sd1")
    unet = pipe.unet
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    processor = IPAdapterAttnProcessor2_0(
        hidden_size=attn.to_out[0].out_features, cross_attention_dim=attn.to_k.in_features, num_tokens=(4,)
    )
    attn.set_processor(processor)
    rd.add_res_tuner(unet, rd.ResTunerConfig("res_attn", targets=["attn2"]))
    randomize_tuner(unet, std=0.3)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, attn.to_q.in_features, generator=generator)
    text = torch.randn(2, 7, attn.to_k.in_features, generator=generator)
    image = torch.randn(2, 4, attn.to_k.in_features, generator=generator)
    with torch.no_grad():
        as_tuple = attn(x, (text, [image]))
        appended = attn(x, torch.cat([text, image], dim=1))
    torch.testing.assert_close(appended, as_tuple, rtol=1e-6, atol=1e-6)


def test_switching_xformers_keeps_the_ip_adapter_and_the_tuners(tmp_path):
    """``disable_xformers_memory_efficient_attention()`` rebuilds an IP-Adapter processor with its weights; with ours
    around it, it used to install the plain default and drop the adapter silently. Enabling xformers where it cannot
    run (here: not installed, no GPU) is refused by diffusers and changes nothing."""
    pipe = tiny_pipeline("sd1")
    unet = pipe.unet
    add_tuners(unet)
    load_ip_adapter(pipe, save_ip_adapter(unet, tmp_path))
    inputs = dict(unet_inputs(unet), added_cond_kwargs={"image_embeds": image_embeds(0)})
    with torch.no_grad():
        before = unet(**inputs).sample
    pipe.disable_xformers_memory_efficient_attention()
    attn2 = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    assert isinstance(attn2.processor, rd.ResTunerAttnProcessor)
    assert isinstance(attn2.processor.base_processor, IPAdapterAttnProcessor2_0)
    with torch.no_grad():
        torch.testing.assert_close(unet(**inputs).sample, before, rtol=1e-6, atol=1e-6)
    processors = {name: (p, getattr(p, "base_processor", None)) for name, p in unet.attn_processors.items()}
    with pytest.raises((ModuleNotFoundError, ValueError)):
        pipe.enable_xformers_memory_efficient_attention()
    assert {name: (p, getattr(p, "base_processor", None)) for name, p in unet.attn_processors.items()} == processors
    with torch.no_grad():
        torch.testing.assert_close(unet(**inputs).sample, before, rtol=1e-6, atol=1e-6)


def test_ip_adapter_masks_reach_the_wrapped_ip_adapter_processor(tmp_path):
    """``cross_attention_kwargs={"ip_adapter_masks": ...}``: diffusers hands an attention processor only the keyword
    arguments its ``__call__`` names, so with ours around the IP-Adapter's processor the masks were dropped silently.
    A mask of zeros keeps the image out everywhere: the output is the one at adapter scale 0."""
    pipe = tiny_pipeline("sd1")
    unet = pipe.unet
    add_tuners(unet)
    load_ip_adapter(pipe, save_ip_adapter(unet, tmp_path))
    inputs = dict(unet_inputs(unet), added_cond_kwargs={"image_embeds": image_embeds(0)})
    masked = {"ip_adapter_masks": [torch.zeros(1, 1, 32, 32)]}
    with torch.no_grad():
        pipe.set_ip_adapter_scale(0.0)
        without_image = unet(**inputs).sample
        pipe.set_ip_adapter_scale(1.0)
        with_image = unet(**inputs).sample
        torch.testing.assert_close(unet(**inputs, cross_attention_kwargs=masked).sample, without_image)
    assert not torch.allclose(with_image, without_image, atol=1e-4)


def flux_ip_adapter_state_dict(transformer: torch.nn.Module, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """A Flux IP-Adapter (4 image tokens) as diffusers' ``load_ip_adapter`` hands it to the transformer: the image
    projection and, per double-stream block, ``<i>.to_k_ip`` / ``to_v_ip`` with biases."""
    generator = torch.Generator().manual_seed(seed)
    cross, inner = transformer.config.joint_attention_dim, transformer.inner_dim
    ip_adapter = {}
    for block in range(transformer.config.num_layers):
        for name in ("to_k_ip", "to_v_ip"):
            ip_adapter[f"{block}.{name}.weight"] = torch.randn(inner, cross, generator=generator) * 0.3
            ip_adapter[f"{block}.{name}.bias"] = torch.zeros(inner)
    image_proj = {
        "proj.weight": torch.randn(4 * cross, IMAGE_EMBED_DIM, generator=generator) * 0.3,
        "proj.bias": torch.zeros(4 * cross),
        "norm.weight": torch.ones(cross),
        "norm.bias": torch.zeros(cross),
    }
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def test_flux_ip_adapter_beside_tuners():
    """Flux's IP-Adapter processor returns (image, text, its own output) and takes ``ip_hidden_states`` as a keyword:
    ours passed neither on (a ValueError at the first call, after a None that diffusers' filter left). Now: at
    adapter scale 0 the tuned transformer's output is the same tuners' output without the adapter; at 1 it moves."""
    from resattn_diffusion.testing import flux_transformer_inputs, tiny_dit_pipeline

    pipe = tiny_dit_pipeline("flux")
    transformer = pipe.transformer
    rd.add_res_tuner(transformer, rd.ResTunerConfig("res_attn"))
    randomize_tuner(transformer, std=0.3)
    inputs = flux_transformer_inputs(transformer)
    with torch.no_grad():
        tuned = transformer(**inputs).sample
    transformer._load_ip_adapter_weights(flux_ip_adapter_state_dict(transformer), low_cpu_mem_usage=False)
    image = {"ip_adapter_image_embeds": image_embeds(0)}
    with torch.no_grad():
        pipe.set_ip_adapter_scale(0.0)
        torch.testing.assert_close(transformer(**inputs, joint_attention_kwargs=dict(image)).sample, tuned)
        pipe.set_ip_adapter_scale(1.0)
        guided = transformer(**inputs, joint_attention_kwargs=dict(image)).sample
    assert not torch.allclose(guided, tuned, atol=1e-4)


def sd3_ip_adapter_state_dict(transformer: torch.nn.Module, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """An SD3 IP-Adapter as diffusers' ``load_ip_adapter`` hands it to the transformer: its time-conditioned
    resampler (``IPAdapterTimeImageProjection``, 4 image tokens) and, per joint attention, the adapter processor's
    ``norm_ip`` / ``to_k_ip`` / ``to_v_ip``; every weight random (a fresh module's state, then redrawn)."""
    from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0
    from diffusers.models.embeddings import IPAdapterTimeImageProjection

    generator = torch.Generator().manual_seed(seed)
    config = transformer.config
    hidden = config.attention_head_dim * config.num_attention_heads

    def redrawn(module: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {k: torch.randn(v.shape, generator=generator) * 0.3 for k, v in module.state_dict().items()}

    resampler_width = 64  # one 64-wide head; its timestep embedding, this wide too, conditions every processor
    ip_adapter = {}
    for index in range(len(transformer.attn_processors)):
        processor = SD3IPAdapterJointAttnProcessor2_0(hidden, hidden, config.attention_head_dim, resampler_width)
        ip_adapter.update({f"{index}.{key}": value for key, value in redrawn(processor).items()})
    projection = IPAdapterTimeImageProjection(
        embed_dim=IMAGE_EMBED_DIM, output_dim=hidden, hidden_dim=resampler_width, heads=1, num_queries=4
    )
    return {"image_proj": redrawn(projection), "ip_adapter": ip_adapter}


@pytest.mark.parametrize("order", ["tuners first", "ip-adapter first"])
def test_sd3_ip_adapter_beside_tuners(order):
    """SD3's IP-Adapter (a resampler conditioned on the timestep, whose processor takes ``ip_hidden_states`` and
    ``temb``): in either order, at adapter scale 0 the tuned transformer's output is exactly the same tuners' output
    without the adapter, and at scale 1 the image moves it."""
    from resattn_diffusion.testing import sd3_transformer_inputs, tiny_dit_pipeline

    def add_res_attn(transformer: torch.nn.Module) -> None:
        rd.add_res_tuner(transformer, rd.ResTunerConfig("res_attn"))
        randomize_tuner(transformer, std=0.3)

    reference = tiny_dit_pipeline("sd3").transformer
    add_res_attn(reference)
    inputs = sd3_transformer_inputs(reference)
    with torch.no_grad():
        tuned = reference(**inputs).sample
    pipe = tiny_dit_pipeline("sd3")
    transformer = pipe.transformer
    if order == "tuners first":
        add_res_attn(transformer)
    transformer._load_ip_adapter_weights(sd3_ip_adapter_state_dict(transformer), low_cpu_mem_usage=False)
    if order == "ip-adapter first":
        add_res_attn(transformer)
    image = torch.randn(2, 1, IMAGE_EMBED_DIM, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pipe.set_ip_adapter_scale(0.0)
        at_zero = transformer(**inputs, joint_attention_kwargs={"ip_adapter_image_embeds": image}).sample
        pipe.set_ip_adapter_scale(1.0)
        guided = transformer(**inputs, joint_attention_kwargs={"ip_adapter_image_embeds": image}).sample
    torch.testing.assert_close(at_zero, tuned, rtol=0, atol=1e-6)
    assert (guided - tuned).abs().max() > 1e-2


@pytest.mark.parametrize("order", ["tuners first", "ip-adapter first"])
def test_moving_the_pipeline_moves_the_wrapped_adapter(tmp_path, order):
    """``pipe.to(dtype)`` (and so ``pipe.to("cuda")``) after both are loaded: the IP-Adapter processor ours wraps is
    our child module, as it was the attention's, so its weights move with the model. Kept outside the module tree
    before, they stayed float32 (on the CPU) and the first call raised a dtype (device) mismatch. Under
    accelerate's sequential offload its weights are offloaded and loaded like every other module's."""
    pipe = tiny_pipeline("sd1")
    unet = pipe.unet
    path = save_ip_adapter(unet, tmp_path)
    if order == "tuners first":
        add_tuners(unet)
        load_ip_adapter(pipe, path)
    else:
        load_ip_adapter(pipe, path)
        add_tuners(unet)
    inputs = dict(unet_inputs(unet), added_cond_kwargs={"image_embeds": image_embeds(0)})
    with torch.no_grad():
        expected = unet(**inputs).sample
    pipe.to(torch.float64)
    attn2 = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    assert attn2.processor.base_processor.to_k_ip[0].weight.dtype == torch.float64
    as_float64 = {key: value.double() if torch.is_tensor(value) else value for key, value in inputs.items()}
    as_float64["added_cond_kwargs"] = {"image_embeds": [e.double() for e in image_embeds(0)]}
    with torch.no_grad():
        torch.testing.assert_close(unet(**as_float64).sample.float(), expected, rtol=1e-4, atol=1e-4)
    pipe.to(torch.float32)
    cpu_offload(unet, execution_device=torch.device("cpu"))
    assert attn2.processor.base_processor.to_k_ip[0].weight.device.type == "meta"
    with torch.no_grad():
        torch.testing.assert_close(unet(**inputs).sample, expected, rtol=1e-5, atol=1e-5)
