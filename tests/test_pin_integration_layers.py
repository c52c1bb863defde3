"""How tuners get onto a model and off again (issue 18, mutation pins of ``kinds/layers.py`` and ``kinds/model.py``).

The plan (meta-device modules) agrees with what attaching builds, for every kind; the layers a linear tuner sits
on (attention projections, a feed-forward's linears) and the refusals of selections that fit nothing; the
processor guard keeps tuners when diffusers installs another processor; removing the last tuner puts every
frozen module back as it was; removing a fused tuner unfuses it first, keeping the other fused ones.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

import resattn_diffusion as rd
from resattn_diffusion.integration.api import get_state
from resattn_diffusion.integration.io import tuner_state_dict
from resattn_diffusion.integration.plan import planned_tensor_shapes
from resattn_diffusion.integration.processors import LinearBank, ResTunerAttnProcessor
from resattn_diffusion.testing import frozen_tiny_model, model_inputs, randomize_tuner

BLOCK = "down_blocks.0.attentions.0.transformer_blocks.0"


@pytest.mark.parametrize(
    "kind,config",
    [
        ("sd1", {"tuner": "res_attn", "targets": ["attn2"]}),
        ("sd1", {"tuner": "res_adapter", "targets": ["attn2", "ff"], "placement": "sequential"}),
        ("sd1", {"tuner": "res_lora", "targets": ["attn1", "ff"], "placement": "sequential"}),
        ("sd1", {"tuner": "res_bypass"}),
        ("sd3", {"tuner": "glora"}),
    ],
)
def test_the_plan_is_what_attaching_builds(kind, config):
    model = frozen_tiny_model(kind)
    config = rd.ResTunerConfig(**config)
    planned = planned_tensor_shapes(model, config)
    rd.add_res_tuner(model, config)
    built = {key: tuple(value.shape) for key, value in tuner_state_dict(model).items()}
    assert planned == built and planned


def test_a_sequential_tuner_is_built_for_the_operation_output_and_keeps_the_text_context():
    model = frozen_tiny_model("sd1")
    rd.add_res_tuner(model, rd.ResTunerConfig("res_attn", targets=["attn2"], placement="sequential"), "seq")
    attn2 = model.get_submodule(f"{BLOCK}.attn2")
    tuner = attn2.processor.bank.tuners["seq"]
    assert tuner.q_proj.in_features == attn2.to_out[0].out_features
    assert tuner.kv_proj.in_features == attn2.to_k.in_features  # still reads the text context


def test_linear_tuners_sit_on_the_projections_and_feed_forward_linears_asked_for():
    model = frozen_tiny_model("sd1")
    paths = rd.add_res_tuner(
        model,
        rd.ResTunerConfig(
            "res_lora", targets=["attn2", "ff"], projections=["to_k", "to_out"], blocks=["down_blocks.0"]
        ),
    )
    assert paths == [f"{BLOCK}.attn2.to_k", f"{BLOCK}.attn2.to_out.0", f"{BLOCK}.ff.net.0.proj", f"{BLOCK}.ff.net.2"]
    for path in paths:
        bank = model.get_submodule(path).res_tuner_bank
        assert isinstance(bank, LinearBank) and bank.parent_module is model.get_submodule(path.rpartition(".")[0])


@pytest.mark.parametrize(
    "kind,targets", [("sd1", ["ff"]), ("sd3", ["ff", "ff_context"]), ("flux", ["proj_mlp", "proj_out"])]
)
def test_projections_with_no_attention_target_are_refused_not_ignored(kind, targets):
    model = frozen_tiny_model(kind)
    projection = "to_q"
    with pytest.raises(rd.ResTunerError, match=r"projections \['to_q'\] name attention projections.*select no atten"):
        rd.add_res_tuner(model, rd.ResTunerConfig("res_lora", targets=targets, projections=[projection]))
    assert rd.get_res_tuner_configs(model) == {} and not hasattr(model, "_res_tuner_state")
    assert rd.add_res_tuner(model, rd.ResTunerConfig("res_lora", targets=targets))  # without projections: every linear


def test_projections_present_on_none_of_the_selected_attentions_are_refused_naming_what_exists():
    model = frozen_tiny_model("sd3")  # its last block is context_pre_only: no text query projection
    with pytest.raises(
        rd.ResTunerError,
        match=r"\['add_q_proj'\] exist on none of the selected attentions of this "
        r"SD3 transformer; they have \['add_k_proj', 'add_v_proj', 'to_k', 'to_out', 'to_q', 'to_v'\]",
    ):
        rd.add_res_tuner(
            model, rd.ResTunerConfig("res_lora", projections=["add_q_proj"], blocks=["transformer_blocks.1"])
        )
    assert rd.get_res_tuner_configs(model) == {} and not hasattr(model, "_res_tuner_state")
    # one selected attention has it: the tuner sits there only
    paths = rd.add_res_tuner(model, rd.ResTunerConfig("res_lora", projections=["add_q_proj"]))
    assert paths == ["transformer_blocks.0.attn.add_q_proj"]


def test_the_processor_guard_keeps_tuners_and_removal_restores_every_module():
    model = frozen_tiny_model("sd1")
    attn1 = model.get_submodule(f"{BLOCK}.attn1")
    ff = model.get_submodule(f"{BLOCK}.ff")
    to_q = attn1.to_q
    stock = attn1.processor
    inputs = model_inputs(model, seed=2)
    with torch.no_grad():
        frozen = model(**inputs).sample
    rd.add_res_tuner(model, rd.ResTunerConfig("res_attn", targets=["attn1"]), "op")
    rd.add_res_tuner(model, rd.ResTunerConfig("res_adapter", targets=["ff"]), "ff")
    rd.add_res_tuner(model, rd.ResTunerConfig("res_lora", targets=["attn1"]), "lin")
    for name in ("op", "ff", "lin"):
        randomize_tuner(model, name)
    with torch.no_grad():
        tuned = model(**inputs).sample
    ours = attn1.processor
    assert isinstance(ours, ResTunerAttnProcessor) and ours.base_processor is stock
    model.set_attn_processor(AttnProcessor())  # diffusers installs another processor: it is wrapped, tuners kept
    assert attn1.processor is ours and type(ours.base_processor) is AttnProcessor and ours.backend == "wrapped"
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).sample, tuned, rtol=1e-5, atol=1e-6)
    replacement = ResTunerAttnProcessor(AttnProcessor2_0(), f"{BLOCK}.attn1")
    attn1.set_processor(replacement)  # one of ours is installed as given
    assert attn1.processor is replacement
    attn1.set_processor(ours)

    rd.remove_res_tuner(model, "lin")  # the last linear tuner: the projections compute themselves again
    assert "forward" not in to_q.__dict__ and not hasattr(to_q, "res_tuner_bank")
    assert isinstance(attn1.processor, ResTunerAttnProcessor)  # the attention tuner stays
    rd.remove_res_tuner(model)
    assert type(attn1.processor) is AttnProcessor and "set_processor" not in attn1.__dict__
    assert not hasattr(ff, "res_tuner_bank") and not ff._forward_hooks
    model.set_attn_processor(AttnProcessor2_0())
    with torch.no_grad():
        assert torch.equal(model(**inputs).sample, frozen)


def test_removing_a_fused_tuner_unfuses_it_and_keeps_the_others_fused():
    model = frozen_tiny_model("sd1").to(torch.float64)
    for seed, name in enumerate(("a", "b")):
        rd.add_res_tuner(model, rd.ResTunerConfig("res_lora", targets=["attn1"], blocks=["down_blocks.0"]), name)
        randomize_tuner(model, name, seed=seed + 1, std=0.2)
    banks = [(bank, owner) for bank, owner in get_state(model).banks if isinstance(bank, LinearBank)]
    original = {bank.layer_path: owner.weight.detach().clone() for bank, owner in banks}
    inputs = model_inputs(model, seed=3)
    rd.set_res_tuner_enabled(model, False, "a")
    with torch.no_grad():
        only_b = model(**inputs).sample
    rd.set_res_tuner_enabled(model, True, "a")
    rd.fuse_res_tuner(model)
    rd.remove_res_tuner(model, "a")
    for bank, owner in banks:
        assert bank.fused_names() == ["b"] and "a" not in bank.tuners
        delta = bank.tuners["b"].fold(original[bank.layer_path], owner.bias)[0]
        torch.testing.assert_close(owner.weight, original[bank.layer_path] + delta, rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).sample, only_b, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        banks[0][1].weight.add_(0.01)  # edited while "b" is fused: removing it is refused, nothing changes
    with pytest.raises(rd.ResTunerError, match="accept_changed_weights"):
        rd.remove_res_tuner(model, "b")
    assert "b" in rd.get_res_tuner_configs(model) and banks[0][0].fused_names() == ["b"]


def test_removing_a_tuner_drops_the_banks_it_leaves_empty_and_keeps_the_shared_ones():
    model = frozen_tiny_model("sd1")
    rd.add_res_tuner(model, rd.ResTunerConfig("res_lora", rank=2, targets=["attn1"]), "a")
    rd.add_res_tuner(model, rd.ResTunerConfig("res_lora", rank=2, targets=["attn1", "attn2"]), "b")
    state = get_state(model)
    shared = [bank.layer_path for bank, _ in state.banks if "a" in bank.tuners]
    rd.remove_res_tuner(model, "b")
    assert [bank.layer_path for bank, _ in state.banks] == shared  # attn2's banks, empty now, are gone
    assert all(list(bank.tuners) == ["a"] for bank, _ in state.banks)


def test_a_projection_whose_forward_another_library_wrapped_runs_plain_once_the_tuner_is_gone():
    # accelerate's hooks (sequential offload) wrap module.forward after ours; removing the tuner must not break it
    from accelerate.hooks import ModelHook, add_hook_to_module

    model = frozen_tiny_model("sd1")
    rd.add_res_tuner(model, rd.ResTunerConfig("res_lora", rank=2, targets=["attn1"], blocks=["down_blocks.0"]))
    randomize_tuner(model, seed=1)
    linear = model.get_submodule(f"{BLOCK}.attn1.to_q")
    add_hook_to_module(linear, ModelHook())
    x = torch.randn(2, 5, linear.in_features)
    with torch.no_grad():
        assert not torch.allclose(linear(x), torch.nn.functional.linear(x, linear.weight, linear.bias))
        rd.remove_res_tuner(model)
        torch.testing.assert_close(linear(x), torch.nn.functional.linear(x, linear.weight, linear.bias))
