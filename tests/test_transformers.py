"""Tuners on diffusion transformers (issue 17, attachment): what is particular to the SD3 and Flux families.

The shared contract (no-op at init, learning, scale 0, save -> load, remove) runs for every family in
tests/test_inject.py, fusing in tests/test_fuse.py; here: default configs, refusals, files for other models, and the
joint-attention processor keeping diffusers' own computation.
"""

from __future__ import annotations

import pytest
import torch

import resattn_diffusion as rd
from resattn_diffusion.integration.families import family_of
from resattn_diffusion.integration.processors import ResTunerJointAttnProcessor
from resattn_diffusion.testing import TRANSFORMER_KINDS, frozen_tiny_model, model_inputs, randomize_tuner

LAYER_TUNERS = [n for n in rd.tuner_names() if rd.get_tuner_spec(n).kind != "model"]


def _run(model, inputs, **kwargs):
    with torch.no_grad():
        return model(**inputs, **kwargs).sample


def _tuned(kind: str, tuner: str, seed: int):
    """A fresh tiny ``kind`` model with one randomized ``tuner``, seeded inputs and its tuned output."""
    model = frozen_tiny_model(kind)
    inputs = model_inputs(model, seed=seed)
    rd.add_res_tuner(model, rd.ResTunerConfig(tuner=tuner))
    randomize_tuner(model)
    return model, inputs, _run(model, inputs)


def _processor_types(model):
    return {name: type(p) for name, p in model.attn_processors.items()}


@pytest.mark.parametrize("kind", TRANSFORMER_KINDS)
@pytest.mark.parametrize("tuner", LAYER_TUNERS)
def test_every_default_config_works_on_every_transformer(kind, tuner):
    model = frozen_tiny_model(kind)
    inputs = model_inputs(model, seed=2)
    reference = _run(model, inputs)
    paths = rd.add_res_tuner(model, rd.ResTunerConfig(tuner=tuner))
    family = family_of(model)
    assert paths and all(any(f".{t}" in p for t in family.default_targets) for p in paths)
    assert torch.equal(_run(model, inputs), reference)
    randomize_tuner(model)
    assert not torch.equal(_run(model, inputs), reference)
    summary = rd.res_tuner_summary(model)["tuners"]["default"]
    assert summary["targets"] == list(family.default_targets) and summary["layers"] == len(paths)


def test_linear_tuners_default_to_both_streams_and_skip_dead_text_projections():
    sd3 = frozen_tiny_model("sd3")
    paths = rd.add_res_tuner(sd3, rd.ResTunerConfig(tuner="res_lora"))
    first = [p for p in paths if p.startswith("transformer_blocks.0.")]
    last = [p for p in paths if p.startswith("transformer_blocks.1.")]
    assert {p.rsplit("attn.", 1)[1] for p in first} == {
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
        "to_add_out",
    }
    # the last SD3 block is context_pre_only: its text queries and text output never reach the image
    assert {p.rsplit("attn.", 1)[1] for p in last} == {"to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"}
    flux = frozen_tiny_model("flux")
    single = [p for p in rd.add_res_tuner(flux, rd.ResTunerConfig(tuner="res_lora")) if p.startswith("single_")]
    assert {p.rsplit("attn.", 1)[1] for p in single} == {"to_q", "to_k", "to_v"}  # pre_only: no to_out


@pytest.mark.parametrize("kind", TRANSFORMER_KINDS)
def test_bypass_and_unknown_targets_are_refused_listing_what_can_sit_there(kind):
    model = frozen_tiny_model(kind)
    before = _processor_types(model)
    with pytest.raises(
        rd.ResTunerError, match=r"res_bypass is a model-level tuner and cannot sit on a .*transformer.*'res_attn'"
    ):
        rd.add_res_tuner(model, rd.ResTunerConfig(tuner="res_bypass"))
    with pytest.raises(rd.ConfigError, match=r"\['attn1'\] do not exist on a .*transformer; its targets are \['attn'"):
        rd.add_res_tuner(model, rd.ResTunerConfig(tuner="res_attn", targets=["attn1"]))
    with pytest.raises(rd.ConfigError, match="matches no transformer block"):
        rd.add_res_tuner(model, rd.ResTunerConfig(tuner="res_attn", blocks=["up_blocks.*"]))
    assert rd.get_res_tuner_configs(model) == {} and _processor_types(model) == before
    assert not hasattr(model, "_res_tuner_state")


def test_operation_tuners_are_refused_on_flux_single_linears():
    flux = frozen_tiny_model("flux")
    with pytest.raises(rd.ResTunerError, match=r"\['proj_mlp'\].*single linear projections: only linear tuners"):
        rd.add_res_tuner(flux, rd.ResTunerConfig(tuner="res_adapter", targets=["attn", "proj_mlp"]))
    with pytest.raises(rd.ConfigError, match="cannot sit on 'ff_context'"):
        rd.ResTunerConfig(tuner="res_prefix", targets=["ff_context"])
    assert rd.get_res_tuner_configs(flux) == {}
    paths = rd.add_res_tuner(flux, rd.ResTunerConfig(tuner="surm_circulant", targets=["proj_mlp", "proj_out"]))
    assert paths == [f"single_transformer_blocks.{i}.{name}" for i in range(2) for name in ("proj_mlp", "proj_out")]


@pytest.mark.parametrize(
    "source,target,message",
    [
        ("sd3", "flux", r"made for a SD3Transformer2DModel \(SD3 transformer\), not for this FluxTransformer2DModel"),
        ("flux", "sd3", r"made for a FluxTransformer2DModel \(Flux transformer\), not for this SD3Transformer2DModel"),
        ("sd1", "sd3", r"made for a UNet2DConditionModel \(UNet\), not for this SD3Transformer2DModel"),
        ("sd3", "sd35", "does not fit this SD3 transformer"),
    ],
)
def test_a_file_for_another_model_is_refused_and_changes_nothing(source, target, message, tmp_path):
    trained = frozen_tiny_model(source)
    rd.add_res_tuner(trained, rd.ResTunerConfig(tuner="res_attn"))
    randomize_tuner(trained)
    path = rd.save_res_tuner(trained, tmp_path / "tuner.safetensors")
    other = frozen_tiny_model(target)
    before = _processor_types(other)
    with pytest.raises(rd.ResTunerFileError, match=message):
        rd.load_res_tuner(other, path)
    assert rd.get_res_tuner_configs(other) == {} and _processor_types(other) == before


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_joint_processor_keeps_the_text_stream_and_adds_the_branch_to_the_image_stream(kind):
    model = frozen_tiny_model(kind)
    attn = model.transformer_blocks[0].attn
    base = attn.processor
    rd.add_res_tuner(model, rd.ResTunerConfig(tuner="res_attn", rank=4, heads=2))
    randomize_tuner(model)
    processor = attn.processor
    assert isinstance(processor, ResTunerJointAttnProcessor) and processor.base_processor is base
    generator = torch.Generator().manual_seed(0)
    image, text = torch.randn(2, 16, 16, generator=generator), torch.randn(2, 7, 16, generator=generator)
    extra = {}
    if kind == "flux":  # rotary embeddings over text + image positions, as the model passes them
        ids = torch.cat([torch.zeros(7, 3), model_inputs(model)["img_ids"]])
        extra["image_rotary_emb"] = model.pos_embed(ids)
    with torch.no_grad():
        frozen_image, frozen_text = base(attn, image, text, None, **extra)
        tuned_image, tuned_text = attn(image, text, **extra)
        tuner = processor.bank.tuners["default"]
        branch = tuner(image, torch.cat([text, image], dim=1), None)
    assert torch.equal(tuned_text, frozen_text)
    torch.testing.assert_close(tuned_image, frozen_image + branch, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_tuners_survive_diffusers_setting_processors_on_a_transformer(kind):
    model, inputs, tuned = _tuned(kind, "res_attn", seed=3)
    stock = type(model.transformer_blocks[0].attn.processor.base_processor)
    model.set_attn_processor(stock())
    assert all(isinstance(p, ResTunerJointAttnProcessor) for p in model.attn_processors.values())
    assert torch.equal(_run(model, inputs), tuned)
    rd.remove_res_tuner(model)
    assert all(type(p) is stock for p in model.attn_processors.values())


def test_bf16_transformer_training_step_on_cpu():
    model = frozen_tiny_model("flux").to(torch.bfloat16)
    inputs = model_inputs(model, seed=4)
    rd.add_res_tuner(model, rd.ResTunerConfig(tuner="res_attn"), adapter_name="attn")
    rd.add_res_tuner(model, rd.ResTunerConfig(tuner="res_lora"), adapter_name="lora")
    assert {p.dtype for p in rd.res_tuner_parameters(model)} == {torch.bfloat16}
    model(**inputs).sample.float().pow(2).mean().backward()
    grads = [p.grad for p in rd.res_tuner_parameters(model)]
    assert any(g is not None and torch.isfinite(g.float()).all() and g.abs().sum() > 0 for g in grads)


# --- diffusers' fuse_qkv_projections() beside tuners ------------------------------------------------------------
def _has_fused_linears(model) -> bool:
    return any(hasattr(m, "to_qkv") or hasattr(m, "to_added_qkv") for m in model.modules())


@pytest.mark.parametrize("kind", ["sd3", "flux", "sd1"])  # sd1: the UNet has the same guards
@pytest.mark.parametrize("fused", [False, True])
def test_fuse_qkv_projections_beside_linear_tuners_is_refused_and_changes_nothing(kind, fused):
    # diffusers copies to_q/to_k/to_v (and add_*_proj) into one linear the attention runs instead: the tuners beside
    # the separate projections stopped running silently, and a fused one was copied in for good
    model = frozen_tiny_model(kind)
    inputs = model_inputs(model, seed=5)
    reference = _run(model, inputs)
    rd.add_res_tuner(model, rd.ResTunerConfig(tuner="res_lora"))
    randomize_tuner(model)
    if fused:
        rd.fuse_res_tuner(model)
    tuned, processors = _run(model, inputs), _processor_types(model)
    with pytest.raises(rd.ResTunerError, match=r"fuse_qkv_projections\(\) would copy .*stop running; nothing was"):
        model.fuse_qkv_projections()
    assert not _has_fused_linears(model) and _processor_types(model) == processors
    assert torch.equal(_run(model, inputs), tuned)
    rd.remove_res_tuner(model)
    assert torch.equal(_run(model, inputs), reference)
    model.fuse_qkv_projections()  # the guard leaves with the last tuner: diffusers' own call again
    assert _has_fused_linears(model) and "fuse_qkv_projections" not in model.__dict__


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_a_linear_tuner_on_projections_fuse_qkv_projections_replaced_is_refused(kind):
    model = frozen_tiny_model(kind)
    inputs = model_inputs(model, seed=6)
    model.fuse_qkv_projections()
    with pytest.raises(rd.ResTunerError, match=r"are not run: diffusers' fuse_qkv_projections\(\).*unfuse_qkv"):
        rd.add_res_tuner(model, rd.ResTunerConfig(tuner="res_lora"))
    assert rd.get_res_tuner_configs(model) == {} and not hasattr(model, "_res_tuner_state")
    # the output projections are not fused: a tuner there runs
    fused_reference = _run(model, inputs)
    rd.add_res_tuner(model, rd.ResTunerConfig(tuner="res_lora", projections=["to_out", "to_add_out"]))
    randomize_tuner(model)
    assert not torch.equal(_run(model, inputs), fused_reference)
    rd.remove_res_tuner(model)
    model.unfuse_qkv_projections()
    rd.add_res_tuner(model, rd.ResTunerConfig(tuner="res_lora", projections=["to_q"]))  # unfused: accepted again
    randomize_tuner(model)
    assert not torch.equal(_run(model, inputs), fused_reference)


@pytest.mark.parametrize("kind", ["sd3", "flux", "sd1"])  # sd1: the UNet has the same guards
def test_unfuse_qkv_projections_under_attention_tuners_restores_the_unfused_processors(kind):
    model = frozen_tiny_model(kind)
    inputs = model_inputs(model, seed=7)
    stock = _processor_types(model)
    rd.add_res_tuner(model, rd.ResTunerConfig(tuner="res_attn"))
    randomize_tuner(model)
    tuned = _run(model, inputs)
    model.fuse_qkv_projections()  # attention-side tuners read to_q/to_k/to_v themselves: allowed
    torch.testing.assert_close(_run(model, inputs), tuned, rtol=0, atol=1e-6)
    model.unfuse_qkv_projections()
    # SD3 used to keep its fused processor inside ours after unfuse_qkv_projections(), and got it back on removal
    bases = {name: type(p.base_processor) for name, p in model.attn_processors.items()}
    assert bases == stock
    rd.remove_res_tuner(model)
    assert _processor_types(model) == stock


@pytest.mark.parametrize(
    "source,target,config,message",
    [
        # the layers agree (same paths and shapes): only the file's record of its base tells the models apart
        ("flux", "sd3", {"blocks": ["transformer_blocks.0"]}, r"made for a FluxTransformer2DModel \(Flux"),
        ("sd1", "sd3", {}, r"made for a UNet2DConditionModel \(UNet\)"),
        # SD3.5's attn2 layers: it used to say "lacks tensor ...attn2...; the file is incomplete: re-save it"
        ("sd3", "sd35", {}, r"does not fit this SD3 transformer.\n  made for: .*dual_attention_layers=\[\]"),
        ("sd35", "sd3", {}, r"does not fit this SD3 transformer.\n  made for: .*dual_attention_layers=\[0\]"),
    ],
)
def test_hotswap_of_a_file_for_another_model_is_refused_like_a_load(source, target, config, message, tmp_path):
    trained = frozen_tiny_model(source)
    rd.add_res_tuner(trained, rd.ResTunerConfig(tuner="res_attn", **config))
    randomize_tuner(trained)
    path = rd.save_res_tuner(trained, tmp_path / "tuner.safetensors")
    model = frozen_tiny_model(target)
    inputs = model_inputs(model, seed=8)
    rd.add_res_tuner(model, rd.ResTunerConfig(tuner="res_attn", **config))
    randomize_tuner(model, seed=1)
    before = _run(model, inputs)
    with pytest.raises(rd.ResTunerFileError, match=message):
        rd.load_res_tuner(model, path, adapter_name="default", hotswap=True)
    assert torch.equal(_run(model, inputs), before)


def test_set_attention_backend_reaches_the_processor_our_tuners_wrap():
    # diffusers sets processor._attention_backend where the processor has one; on our wrapper it was skipped, so the
    # wrapped Flux processor kept the backend it had when the tuner came, even after the tuner was removed
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    def backends():
        return {p.base_processor._attention_backend for p in model.attn_processors.values()}

    active = _AttentionBackendRegistry._active_backend  # set_attention_backend also sets it for the whole process
    try:
        model = frozen_tiny_model("flux")
        model.set_attention_backend("_native_math")
        rd.add_res_tuner(model, rd.ResTunerConfig(tuner="res_attn"))
        model.set_attention_backend("native")
        assert backends() == {AttentionBackendName.NATIVE}
        model.transformer_blocks[0].attn.set_attention_backend("_native_math")
        assert model.transformer_blocks[0].attn.processor.base_processor._attention_backend == "_native_math"
        model.reset_attention_backend()
        assert backends() == {None}
        model.set_attention_backend("native")
        rd.remove_res_tuner(model)
        assert {p._attention_backend for p in model.attn_processors.values()} == {AttentionBackendName.NATIVE}
    finally:
        _AttentionBackendRegistry.set_active_backend(active)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_a_per_call_scale_for_a_fused_tuner_is_refused_not_ignored(kind):
    model = frozen_tiny_model(kind)
    inputs = model_inputs(model, seed=9)
    rd.add_res_tuner(model, rd.ResTunerConfig(tuner="res_lora"), adapter_name="lora")
    rd.add_res_tuner(model, rd.ResTunerConfig(tuner="res_attn"), adapter_name="attn")
    randomize_tuner(model, "lora")
    randomize_tuner(model, "attn", seed=1)
    rd.fuse_res_tuner(model, "lora")
    fused = _run(model, inputs)
    # it used to run the fused weights unchanged: scale 0 gave the tuned output, silently
    for scale in (0.0, {"lora": 0.5}):
        with pytest.raises(rd.ResTunerError, match=r"'lora' is fused into the weights at scale 1.0, so the per-call"):
            _run(model, inputs, joint_attention_kwargs={"res_tuner_scale": scale})
    assert torch.equal(_run(model, inputs), fused)  # nothing of the refused call stays
    assert torch.equal(_run(model, inputs, joint_attention_kwargs={"res_tuner_scale": 1.0}), fused)
    attn_off = _run(model, inputs, joint_attention_kwargs={"res_tuner_scale": {"attn": 0.0}})
    rd.set_res_tuner_enabled(model, False, "attn")
    assert torch.equal(attn_off, _run(model, inputs))


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_a_per_call_scale_under_gradient_checkpointing_with_gradients_is_refused(kind):
    # the backward pass recomputes the blocks after the call's scale is gone: the gradients were those of scale 1
    model = frozen_tiny_model(kind)
    inputs = model_inputs(model, seed=10)
    rd.add_res_tuner(model, rd.ResTunerConfig(tuner="res_attn"))
    rd.add_res_tuner(model, rd.ResTunerConfig(tuner="res_lora"), adapter_name="lora")
    randomize_tuner(model)
    randomize_tuner(model, "lora", seed=1)
    model.enable_gradient_checkpointing()
    model.train()
    with pytest.raises(rd.ResTunerError, match="does not reach the blocks gradient checkpointing recomputes"):
        model(**inputs, joint_attention_kwargs={"res_tuner_scale": 0.5})
    sampled = _run(model, inputs, joint_attention_kwargs={"res_tuner_scale": 0.5})  # no gradients: no recompute
    rd.set_res_tuner_scale(model, 0.5)
    assert torch.equal(_run(model, inputs), sampled)
    model(**inputs).sample.pow(2).mean().backward()  # the scale set on the tuners trains, checkpointed
    assert all(p.grad is not None for p in rd.res_tuner_parameters(model))


@pytest.mark.parametrize("kind", ["sd3", "flux", "sd1"])  # sd1: the UNet has the same guards
def test_layerwise_casting_and_tuners_are_refused_in_either_order(kind):
    # diffusers' layerwise casting stores every module under a linear / attention in float8, tuners included: they
    # were built in float8 (raw NotImplementedError later) or rounded to float8 for good (raw dtype errors in forward)
    from resattn_diffusion.integration.families.base import layerwise_casting_active

    model, inputs, tuned = _tuned(kind, "res_lora", seed=11)
    with pytest.raises(rd.ResTunerError, match=r"layerwise casting \(enable_layerwise_casting\) cannot share a model"):
        model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    assert not layerwise_casting_active(model)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert torch.equal(_run(model, inputs), tuned)
    rd.remove_res_tuner(model)
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)  # diffusers' own
    with pytest.raises(rd.ResTunerError, match="cannot share a model"):
        rd.add_res_tuner(model, rd.ResTunerConfig(tuner="res_attn"))
    assert not hasattr(model, "_res_tuner_state")


@pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")  # the second adapter, on purpose
@pytest.mark.parametrize("kind", ["sd3", "flux", "sd1"])  # sd1: the UNet has the same guards
def test_a_peft_lora_added_after_our_tuners_leaves_them_trainable(kind):
    # peft marks every parameter it did not add frozen: a tuner trained beside a LoRA added after it stopped learning
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model = frozen_tiny_model(kind)
    inputs = model_inputs(model, seed=12)
    rd.add_res_tuner(model, rd.ResTunerConfig(tuner="glora"), adapter_name="glora")
    rd.add_res_tuner(model, rd.ResTunerConfig(tuner="res_attn"), adapter_name="attn")
    randomize_tuner(model, "glora")
    rd.res_tuner_parameters(model, "attn")[0].requires_grad_(False)  # what the user froze stays frozen
    before = [p.requires_grad for p in rd.res_tuner_parameters(model)]
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=["to_q"]), "peft")
    assert [p.requires_grad for p in rd.res_tuner_parameters(model)] == before
    model(**inputs).sample.pow(2).mean().backward()
    assert all(p.grad is not None for p in rd.res_tuner_parameters(model, "glora"))
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_A.peft" in n)
    lora = get_peft_model_state_dict(model, adapter_name="peft")
    model.load_lora_adapter(lora, adapter_name="again", prefix=None)  # what pipe.load_lora_weights calls
    assert [p.requires_grad for p in rd.res_tuner_parameters(model)] == before
    rd.remove_res_tuner(model)
    assert "add_adapter" not in model.__dict__ and "load_lora_adapter" not in model.__dict__
