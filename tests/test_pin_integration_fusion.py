"""Fusing linear tuners into a projection, one layer by hand (issue 18: pins of ``fusion.py`` and ``LinearBank``).

On the tiny SD1 UNet in float64 (fused in float64, so float64 tolerances), with two Res-LoRA tuners (and a GLoRA that
creates a bias) on ``attn1``'s projections: the weight written is ``W0 + sum_i s_i dW_i`` with each ``dW_i`` folded
from W0, a partial unfuse keeps the others folded, the record follows ``.to(dtype)`` without entering the state dict,
and a weight edited while fused is refused (naming the call and the flag, changing nothing) unless
``accept_changed_weights``, which subtracts exactly the tuners' delta and keeps the edit.
"""

from __future__ import annotations

import pytest
import torch

import resattn_diffusion as rd
from resattn_diffusion.integration.api import get_state
from resattn_diffusion.integration.processors import LinearBank
from resattn_diffusion.testing import frozen_tiny_unet, randomize_tuner

TARGET = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"


def lora_unet(names=("a", "b"), scales=(0.5, 2.0), tuner: str = "res_lora", **hyper):
    unet = frozen_tiny_unet("sd1").to(torch.float64)
    for seed, (name, scale) in enumerate(zip(names, scales)):
        config = rd.ResTunerConfig(tuner, targets=["attn1"], blocks=["down_blocks.0"], scale=scale, **hyper)
        rd.add_res_tuner(unet, config, adapter_name=name)
        randomize_tuner(unet, name, seed=seed + 1, std=0.2)
    return unet


def banks(unet) -> list[tuple[LinearBank, torch.nn.Linear]]:
    return [(bank, owner) for bank, owner in get_state(unet).banks if isinstance(bank, LinearBank)]


def folded(bank: LinearBank, name: str, weight: torch.Tensor, bias: torch.Tensor | None):
    """``s dW`` and ``s db`` of one tuner, folded from the original weights by the tuner's own ``fold``."""
    delta_w, delta_b = bank.tuners[name].fold(weight, bias)
    scale = bank.settings[name].scale
    return scale * delta_w, None if delta_b is None else scale * delta_b


def originals(unet) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    return {
        bank.layer_path: (owner.weight.detach().clone(), None if owner.bias is None else owner.bias.detach().clone())
        for bank, owner in banks(unet)
    }


def test_fused_weight_is_w0_plus_each_scaled_delta_and_a_partial_unfuse_keeps_the_others():
    unet = lora_unet()
    before = originals(unet)
    keys = list(unet.state_dict())
    rd.fuse_res_tuner(unet, "a")
    rd.fuse_res_tuner(unet, "b")  # beside "a", folded from W0 (not from W0 + dW_a)
    assert list(unet.state_dict()) == keys  # the record of P / W0 is in non-persistent buffers
    for bank, owner in banks(unet):
        w0, b0 = before[bank.layer_path]
        expected = w0 + folded(bank, "a", w0, b0)[0] + folded(bank, "b", w0, b0)[0]
        torch.testing.assert_close(owner.weight, expected, rtol=1e-12, atol=1e-13)
        assert bank.fused_names() == ["a", "b"] and bank.all_fused
    rd.unfuse_res_tuner(unet, "a")
    for bank, owner in banks(unet):
        w0, b0 = before[bank.layer_path]
        torch.testing.assert_close(owner.weight, w0 + folded(bank, "b", w0, b0)[0], rtol=1e-12, atol=1e-13)
        assert bank.fused_names() == ["b"] and not bank.all_fused and bank.settings["a"].fused is False
    rd.unfuse_res_tuner(unet, "a")  # nothing of "a" is fused any more: a no-op
    rd.unfuse_res_tuner(unet)
    for bank, owner in banks(unet):
        assert torch.equal(owner.weight, before[bank.layer_path][0])
        assert bank.fused is None and bank.fused_others_weight is None and bank.fused_names() == []
    assert list(unet.state_dict()) == keys


def test_the_fused_record_follows_to_dtype_and_unfuse_restores_the_converted_weights():
    unet = lora_unet(names=("a",), scales=(1.0,))
    before = originals(unet)
    rd.fuse_res_tuner(unet)
    unet.to(torch.float32)
    for bank, _ in banks(unet):
        assert bank.fused_others_weight.dtype == torch.float32
    rd.unfuse_res_tuner(unet)
    for bank, owner in banks(unet):
        w0, b0 = before[bank.layer_path]
        assert owner.weight.dtype == torch.float32 and torch.equal(owner.weight, w0.float())
        assert (owner.bias is None) == (b0 is None)


@pytest.mark.parametrize("call", ["unfuse", "fuse_another"])
def test_a_weight_edited_while_fused_is_refused_naming_the_call_and_nothing_changes(call):
    unet = lora_unet()
    rd.fuse_res_tuner(unet, "a")
    bank, owner = banks(unet)[0]
    with torch.no_grad():
        owner.weight.add_(0.01)  # a direct edit, not a peft merge
    edited = {b.layer_path: o.weight.detach().clone() for b, o in banks(unet)}
    action = "unfuse_res_tuner" if call == "unfuse" else "fuse_res_tuner"
    with pytest.raises(
        rd.ResTunerError,
        match=rf"{bank.layer_path} was changed.*so {action} cannot know.*"
        r"accept_changed_weights=True",
    ):
        if call == "unfuse":
            rd.unfuse_res_tuner(unet)
        else:
            rd.fuse_res_tuner(unet, "b")
    for b, o in banks(unet):
        assert torch.equal(o.weight, edited[b.layer_path]) and b.fused_names() == ["a"]


def test_accept_changed_weights_subtracts_exactly_the_tuners_delta_and_keeps_the_edit():
    unet = lora_unet()
    before = originals(unet)
    rd.fuse_res_tuner(unet)
    bank, owner = banks(unet)[0]
    edit = torch.full_like(owner.weight, 0.01)
    with torch.no_grad():
        owner.weight.add_(edit)
    rd.unfuse_res_tuner(unet, "a", accept_changed_weights=True)  # "b" stays fused, refolded from the new P
    w0, b0 = before[bank.layer_path]
    expected = w0 + edit + folded(bank, "b", w0 + edit, b0)[0]
    torch.testing.assert_close(owner.weight, expected, rtol=1e-12, atol=1e-13)
    assert bank.fused_names() == ["b"]
    rd.unfuse_res_tuner(unet)  # untouched since: exact, no flag needed
    torch.testing.assert_close(owner.weight, w0 + edit, rtol=1e-12, atol=1e-13)
    for other, linear in banks(unet)[1:]:
        assert torch.equal(linear.weight, before[other.layer_path][0])


def test_accept_changed_weights_drops_the_bias_that_fusing_created():
    # GLoRA's W0 C is a bias on the bias-free to_q: created on fuse, gone again on unfuse, even after an edit
    unet = lora_unet(names=("g",), scales=(1.0,), tuner="glora", config="A=none,B=none,C=vector,D=none,E=none")
    before = originals(unet)
    rd.fuse_res_tuner(unet)
    created = [(bank, owner) for bank, owner in banks(unet) if before[bank.layer_path][1] is None]
    assert created and all(owner.bias is not None and bank.added_bias for bank, owner in created)
    bank, owner = created[0]
    with torch.no_grad():
        owner.weight.mul_(1.5)
    with pytest.raises(rd.ResTunerError, match="accept_changed_weights"):
        rd.unfuse_res_tuner(unet)
    assert owner.bias is not None and bank.fused_names() == ["g"]
    rd.unfuse_res_tuner(unet, accept_changed_weights=True)
    for bank, owner in created:
        assert owner.bias is None and not bank.added_bias
    w0 = before[created[0][0].layer_path][0]
    delta = folded(created[0][0], "g", w0, None)[0]
    torch.testing.assert_close(created[0][1].weight, (w0 + delta) * 1.5 - delta, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("tuner,hyper", [("res_lora", {}), ("surm_circulant", {})])
def test_a_sequential_tuner_folds_as_dw_w0_and_dw_b0_plus_db_and_fused_equals_unfused(tuner, hyper):
    unet = frozen_tiny_unet("sd1").to(torch.float64)
    config = rd.ResTunerConfig(
        tuner, targets=["attn1"], blocks=["down_blocks.0"], placement="sequential", scale=0.7, **hyper
    )
    rd.add_res_tuner(unet, config)
    randomize_tuner(unet, seed=4, std=0.2)
    before = originals(unet)
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    with torch.no_grad():
        unfused = {bank.layer_path: owner(x) for bank, owner in banks(unet)}
    rd.fuse_res_tuner(unet)
    for bank, owner in banks(unet):
        w0, b0 = before[bank.layer_path]
        delta_w, delta_b = bank.tuners["default"].fold(w0, b0)
        expected_b = (0 if delta_b is None else delta_b) + (0 if b0 is None else delta_w @ b0)
        torch.testing.assert_close(owner.weight, w0 + 0.7 * delta_w @ w0, rtol=1e-12, atol=1e-13)
        if b0 is None and delta_b is None:
            assert owner.bias is None
        else:
            torch.testing.assert_close(
                owner.bias, (0 if b0 is None else b0) + 0.7 * expected_b, rtol=1e-12, atol=1e-13
            )
        with torch.no_grad():
            torch.testing.assert_close(owner(x), unfused[bank.layer_path], rtol=1e-12, atol=1e-12)
    rd.unfuse_res_tuner(unet)
    for bank, owner in banks(unet):
        assert torch.equal(owner.weight, before[bank.layer_path][0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weights_are_the_same_within_8_ulps_of_each_entry_plus_2_ulps_of_the_largest(dtype):
    """``fusion._close``, the "was this weight changed by someone else?" test: rounding of a few additions (up to 8
    ulps of the entry's size, float32 ulps at least) plus 2 ulps of the largest entry, for the residue of merges
    that came and went; anything larger is a change. Checked at entries of 0, where float32 resolves the bound."""
    from resattn_diffusion.integration.fusion import _close

    eps = torch.finfo(torch.float32).eps  # float32's, also for float64 weights: the deltas run in float32

    def shifted(expected: torch.Tensor, by: float) -> torch.Tensor:
        actual = expected.clone()
        actual[1] += by
        return actual

    # an entry of 0 beside one of 1000: the 2-ulp floor of the largest entry (not of 1/1000)
    large = torch.tensor([1000.0, 0.0], dtype=dtype)
    assert _close(shifted(large, 1.9 * eps * 1000), large, None)
    assert not _close(shifted(large, 2.1 * eps * 1000), large, None)
    # the size of the terms summed there (a fused delta of 100 that cancelled to 0): 8 ulps of it on the floor
    small, magnitude = torch.tensor([4.0, 0.0], dtype=dtype), torch.tensor([0.0, 100.0])
    floor = 2 * eps * 4
    assert _close(shifted(small, 7.9 * eps * 100 + floor), small, magnitude)
    assert not _close(shifted(small, 8.5 * eps * 100 + floor), small, magnitude)
    assert not _close(shifted(small, 7.9 * eps * 100 + floor), small, None)
    assert _close(None, None, None) and not _close(small, None, None) and not _close(None, small, None)
    assert not _close(small[:1], small, None)


def test_the_peft_wrapper_is_only_a_module_in_the_projections_place_whose_base_layer_is_the_bank_s_linear():
    from resattn_diffusion.integration.fusion import peft_wrapper

    class Wrapper(torch.nn.Module):  # peft's layers answer get_base_layer()
        def __init__(self, base):
            super().__init__()
            self.base = base

        def get_base_layer(self):
            return self.base

    linear, other = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    parent = torch.nn.Module()
    bank = LinearBank("block.attn1.to_q")
    assert peft_wrapper(bank, linear) is None  # no parent bound
    bank.bind_parent(parent)
    for in_place, expected in [
        (None, None),  # nothing there
        (linear, None),  # the linear itself: not wrapped
        (torch.nn.Sequential(linear), None),  # something else holding it, with no get_base_layer
        (Wrapper(other), None),  # a wrapper of another linear
    ]:
        parent.to_q = in_place
        assert peft_wrapper(bank, linear) is expected
    parent.to_q = wrapper = Wrapper(linear)
    assert peft_wrapper(bank, linear) is wrapper


def test_the_fused_record_stays_out_of_the_state_dict():
    unet = lora_unet()
    keys = list(unet.state_dict())
    rd.fuse_res_tuner(unet)
    assert all(bank.fused_base_weight is not None or bank.fused_others_weight is not None for bank, _ in banks(unet))
    assert list(unet.state_dict()) == keys  # W0 / P copies are buffers that follow .to(), never saved
