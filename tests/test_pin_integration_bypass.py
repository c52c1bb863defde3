"""The Res-Tuning-Bypass wiring on a UNet (issue 18, mutation score): what it reads (paths, widths), exactly what
it adds at the injection point (``sample + sum_i s_i b_i(h)``, recomputed by hand from the blocks' outputs), a UNet
without an output norm, inputs that require grad inside lists and dicts, and removal leaving no hook behind."""

from __future__ import annotations

import pytest
import torch

import resattn_diffusion as rd
from resattn_diffusion.integration import api
from resattn_diffusion.integration.unet_tuners import BANK_ATTR, requires_unet_backward
from resattn_diffusion.testing import frozen_tiny_unet, randomize_tuner, unet_inputs

BYPASS = rd.ResTunerConfig("res_bypass")


def _hooks(module) -> dict[str, int]:
    return {name: len(m._forward_hooks) + len(m._forward_pre_hooks) for name, m in module.named_modules()}


def test_the_bypass_reads_the_mid_block_and_every_up_block_with_their_widths():
    unet = frozen_tiny_unet("sd1")
    widths = list(unet.config.block_out_channels)
    expected = {"mid_block": {"channels": widths[-1]}}
    expected.update({f"up_blocks.{i}": {"channels": w} for i, w in enumerate(reversed(widths))})
    assert api.expected_fingerprint(unet, BYPASS) == expected
    assert rd.add_res_tuner(unet, BYPASS) == list(expected)
    assert rd.add_res_tuner(unet, BYPASS, "second") == list(expected)
    bank = getattr(unet, BANK_ATTR)
    assert [b for b, _ in api.get_state(unet).banks].count(bank) == 1  # one bank for both, in the state once
    assert bank.widths == [expected[p]["channels"] for p in expected]


@pytest.mark.parametrize(
    "config,match",
    [
        (rd.ResTunerConfig("res_bypass", blocks=["up_blocks.*"]), "`blocks` does not apply"),
        (rd.ResTunerConfig("res_bypass", placement="sequential"), "placement must be 'parallel'"),
    ],
)
def test_configs_the_bypass_cannot_take_are_refused_changing_nothing(config, match):
    unet = frozen_tiny_unet("sd1")
    hooks = _hooks(unet)
    with pytest.raises(rd.ConfigError, match=match):
        rd.add_res_tuner(unet, config)
    assert _hooks(unet) == hooks and not hasattr(unet, BANK_ATTR) and api.get_state(unet) is None


def test_the_injection_adds_the_scaled_sum_of_every_active_bypass_exactly():
    unet = frozen_tiny_unet("sd1")
    inputs = unet_inputs(unet, batch_size=2, seed=7)
    rd.add_res_tuner(unet, BYPASS, "a")
    rd.add_res_tuner(unet, rd.ResTunerConfig("res_bypass", vertical="none", rank=4, scale=0.5), "b")
    rd.add_res_tuner(unet, BYPASS, "off")
    for seed, name in enumerate(("a", "b", "off")):
        randomize_tuner(unet, name, seed=seed + 1)
    rd.set_res_tuner_enabled(unet, False, "off")
    bank = getattr(unet, BANK_ATTR)
    features, seen = {}, {}

    def keep(path):
        def hook(module, args, output):
            features[path] = (output[0] if isinstance(output, tuple) else output).detach()

        return hook

    handles = [unet.get_submodule(p).register_forward_hook(keep(p)) for p in bank.source_paths]
    # registered after the bypass's own pre-hook: sees the input with the bypass added
    handles.append(unet.conv_norm_out.register_forward_pre_hook(lambda m, args: seen.__setitem__("in", args[0])))
    with torch.no_grad():
        rd.set_res_tuner_enabled(unet, False)
        unet(**inputs)
        plain = seen["in"]
        rd.set_res_tuner_enabled(unet, True, ["a", "b"])
        unet(**inputs)
        hidden = [features[p] for p in bank.source_paths]
        expected = plain + 1.0 * bank.tuners["a"](hidden) + 0.5 * bank.tuners["b"](hidden)
    assert torch.allclose(seen["in"], expected, atol=1e-6)
    assert not torch.allclose(seen["in"], plain)
    with torch.no_grad():
        unet(**inputs, cross_attention_kwargs={rd.SCALE_KWARG: 2.0})
        doubled = plain + 2.0 * (bank.tuners["a"](hidden) + bank.tuners["b"](hidden))
    assert torch.allclose(seen["in"], doubled, atol=1e-5)
    for handle in handles:
        handle.remove()
    # the output head called on its own (outside a UNet call) is left alone: nothing to add
    x = torch.randn_like(plain)
    with torch.no_grad():
        assert torch.equal(unet.conv_norm_out(x), torch.nn.functional.group_norm(
            x, unet.conv_norm_out.num_groups, unet.conv_norm_out.weight, unet.conv_norm_out.bias,
            unet.conv_norm_out.eps))  # fmt: skip
    assert bank.features == {}  # no block output is kept past the call


def test_a_unet_without_output_norm_gets_the_bypass_at_conv_out_and_loses_it_exactly():
    unet = frozen_tiny_unet("sd1")
    unet.conv_norm_out = None  # as diffusers builds it with norm_num_groups=None: conv_act, conv_out only
    inputs = unet_inputs(unet, batch_size=1, seed=2)
    hooks = _hooks(unet)
    with torch.no_grad():
        reference = unet(**inputs).sample
    rd.add_res_tuner(unet, BYPASS)
    assert getattr(unet, BANK_ATTR).injection_path == "conv_out"
    randomize_tuner(unet, seed=3)
    with torch.no_grad():
        tuned = unet(**inputs).sample
        assert not torch.allclose(tuned, reference)
        assert torch.equal(unet(**inputs, cross_attention_kwargs={rd.SCALE_KWARG: 0.0}).sample, reference)
    rd.remove_res_tuner(unet)
    assert _hooks(unet) == hooks and not hasattr(unet, BANK_ATTR)
    with torch.no_grad():
        assert torch.equal(unet(**inputs).sample, reference)


def test_inputs_requiring_grad_in_a_dict_keep_the_body_graph_and_grad_mode_comes_back():
    unet = frozen_tiny_unet("sdxl")
    inputs = unet_inputs(unet, batch_size=1, seed=4)
    rd.add_res_tuner(unet, BYPASS)
    randomize_tuner(unet, seed=5)
    assert requires_unet_backward(unet) is False
    # a pooled text embedding from a text encoder being trained: it must get its gradient through the body
    text_embeds = inputs["added_cond_kwargs"]["text_embeds"].clone().requires_grad_(True)
    inputs["added_cond_kwargs"] = {**inputs["added_cond_kwargs"], "text_embeds": text_embeds}
    unet(**inputs).sample.pow(2).mean().backward()
    assert text_embeds.grad is not None and text_embeds.grad.abs().sum() > 0
    assert torch.is_grad_enabled()
    # a positional sample that requires grad, likewise
    sample = inputs.pop("sample").clone().requires_grad_(True)
    inputs["added_cond_kwargs"]["text_embeds"] = text_embeds.detach()
    unet(sample, **inputs).sample.pow(2).mean().backward()
    assert sample.grad is not None and sample.grad.abs().sum() > 0
    # nothing requires grad: the body is not recorded, the bypass still trains, grad mode is back on after
    unet.zero_grad()
    out = unet(sample.detach(), **inputs).sample
    assert torch.is_grad_enabled() and out.requires_grad
    out.pow(2).mean().backward()
    assert all(p.grad is not None for p in rd.res_tuner_parameters(unet))


def test_removing_one_bypass_keeps_the_hooks_and_removing_the_last_leaves_none():
    unet = frozen_tiny_unet("sd1")
    inputs = unet_inputs(unet, batch_size=1, seed=6)
    hooks = _hooks(unet)
    with torch.no_grad():
        reference = unet(**inputs).sample
    rd.add_res_tuner(unet, BYPASS, "a")
    rd.add_res_tuner(unet, BYPASS, "b")
    randomize_tuner(unet, "a", seed=1)
    randomize_tuner(unet, "b", seed=2)
    with torch.no_grad():
        only_a = unet(**inputs, cross_attention_kwargs={rd.SCALE_KWARG: {"b": 0.0}}).sample
    with_hooks = {k: v for k, v in _hooks(unet).items() if not k.startswith(BANK_ATTR)}
    rd.remove_res_tuner(unet, "b")
    assert {k: v for k, v in _hooks(unet).items() if not k.startswith(BANK_ATTR)} == with_hooks  # kept for "a"
    assert [name for name, _ in api.iter_tuners(unet, "a")] == ["mid_block", "up_blocks.0", "up_blocks.1"]
    with torch.no_grad():
        assert torch.equal(unet(**inputs).sample, only_a)
    rd.remove_res_tuner(unet, "a")
    assert _hooks(unet) == hooks and not hasattr(unet, BANK_ATTR)
    assert requires_unet_backward(unet) is True
    with torch.no_grad():
        assert torch.equal(unet(**inputs).sample, reference)


def test_an_output_head_of_another_width_than_the_last_up_block_is_refused():
    unet = frozen_tiny_unet("sd1")
    last = unet.config.block_out_channels[0]
    unet.conv_norm_out = torch.nn.GroupNorm(4, last // 2)
    with pytest.raises(
        rd.ResTunerError, match=f"conv_norm_out takes {last // 2} channels but the last up block gives"
    ):
        rd.add_res_tuner(unet, BYPASS)
    unet.conv_norm_out = None
    unet.conv_out = torch.nn.Conv2d(last * 2, 4, 3, padding=1)
    with pytest.raises(
        rd.ResTunerError, match=f"conv_out takes {last * 2} channels but the last up block gives {last}"
    ):
        rd.add_res_tuner(unet, BYPASS)
    assert api.get_state(unet) is None and not hasattr(unet, BANK_ATTR)


def test_a_trainable_output_head_needs_no_body_backward_and_a_removed_bypass_leaves_no_bank():
    unet = frozen_tiny_unet("sd1")
    rd.add_res_tuner(unet, BYPASS)
    unet.conv_norm_out.requires_grad_(True)  # after the injection point: trained with the bypass, outside the body
    unet.conv_out.requires_grad_(True)
    assert requires_unet_backward(unet) is False
    paths = rd.add_res_tuner(unet, rd.ResTunerConfig("res_attn", rank=4, targets=["attn1"]), "attn")
    assert requires_unet_backward(unet) is True
    rd.remove_res_tuner(unet, "default")
    banks = [bank for bank, _ in api.get_state(unet).banks]
    assert [bank.layer_path for bank in banks] == paths  # the bypass's bank is gone from the state with it


def test_removing_the_bypass_from_inside_a_unet_call_gives_the_caller_autograd_back():
    # the body runs without autograd (nothing there trains); the hook that switches it back on goes with the tuner
    unet = frozen_tiny_unet()
    rd.add_res_tuner(unet, BYPASS)
    seen = []

    def remove_midway(module, args, output):
        seen.append(torch.is_grad_enabled())
        rd.remove_res_tuner(unet)

    handle = unet.down_blocks[0].register_forward_hook(remove_midway)
    with torch.enable_grad():
        unet(**unet_inputs(unet))
        assert seen == [False] and torch.is_grad_enabled()
    handle.remove()
    assert not hasattr(unet, BANK_ATTR)
