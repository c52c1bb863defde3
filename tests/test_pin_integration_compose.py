"""Fused res tuners beside a diffusers (peft) LoRA and beside a second tuner, in every order, on the smallest UNet
that has the same layers (issue 18, mutation pins: the compositions of ``tests/test_fuse_compose.py`` in a few
seconds instead of two minutes, so that every mutant of the fusion code runs them cheaply).

The model: one cross-attention down block (one transformer block), no mid block, 8 channels, float64 --
the same ``Attention`` / ``FeedForward`` projections (``attn1``, ``attn2``, ``ff``) that the tuners and peft wrap in
the tiny SD pipelines, at a fraction of the cost. The calls are the UNet's own (``fuse_lora``, ``unfuse_lora``,
``unload_lora``: what a pipeline's ``fuse_lora`` / ``unfuse_lora`` / ``unload_lora_weights`` call on it) and ours.
After every call the output equals the output of the same adapters unfused; a refused call (``!``) changes neither
weights nor output; at the end every weight is bit-identical to the original or to what the same LoRA calls leave
without a res tuner.
"""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from fusion_scripts import FUSIBLE_TUNERS, FUSION_TARGETS, ORDER_SCRIPTS, TWO_TUNER_ORDERS

import resattn_diffusion as rd
from resattn_diffusion.integration.api import get_state, res_tuner_settings
from resattn_diffusion.integration.processors import LinearBank
from resattn_diffusion.testing import randomize_tuner

TARGETS = FUSION_TARGETS
TUNERS = FUSIBLE_TUNERS
_UNET: list[UNet2DConditionModel] = []


def smallest_unet() -> UNet2DConditionModel:
    if not _UNET:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(5)
            unet = UNet2DConditionModel(
                sample_size=4,
                in_channels=4,
                out_channels=4,
                block_out_channels=(8,),
                layers_per_block=1,
                norm_num_groups=4,
                down_block_types=("CrossAttnDownBlock2D",),
                up_block_types=("UpBlock2D",),
                mid_block_type=None,
                cross_attention_dim=12,
                attention_head_dim=2,
            )
        _UNET.append(unet.to(torch.float64).eval().requires_grad_(False))
    return copy.deepcopy(_UNET[0])


_INPUTS: list[tuple[torch.Tensor, torch.Tensor]] = []


@torch.no_grad()
def output(unet) -> torch.Tensor:
    """Every transformer block of the UNet on the same fixed tokens and context, concatenated: each block runs
    attn1, attn2 and ff through the processors and linear banks as in a UNet forward, at ~1/20 of its ops."""
    if not _INPUTS:
        generator = torch.Generator().manual_seed(1)
        hidden = torch.randn(1, 4, 8, generator=generator, dtype=torch.float64)
        context = torch.randn(1, 3, 12, generator=generator, dtype=torch.float64)
        _INPUTS.append((hidden, context))
    hidden, context = _INPUTS[0]
    blocks = [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]
    return torch.cat([block(hidden, encoder_hidden_states=context) for block in blocks])


def add_lora(unet, seed: int = 3, name: str = "peft") -> None:
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer

    unet.add_adapter(
        LoraConfig(
            r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"]
        ),
        adapter_name=name,
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # peft's own factors only (a res tuner may name its factors lora_A / lora_B too)
        for module in unet.modules():
            if isinstance(module, LoraLayer):
                for factor in (module.lora_A[name].weight, module.lora_B[name].weight):
                    factor.copy_(0.2 * torch.randn(factor.shape, generator=generator, dtype=torch.float64))


def add_res(unet, tuner: str, name: str = "res", seed: int = 1, scale: float = 0.7) -> None:
    # a scale other than 1: a fused delta that ignores the scale must show
    rd.add_res_tuner(unet, rd.ResTunerConfig(targets=TARGETS, scale=scale, **TUNERS[tuner]), adapter_name=name)
    randomize_tuner(unet, name, seed=seed, std=0.2)


def base_weights(unet) -> dict[str, torch.Tensor]:
    return {
        name.replace("base_layer.", ""): value.detach().clone()
        for name, value in unet.state_dict().items()
        if "lora_" not in name and "res_tuner_bank" not in name
    }


def call(unet, step: str, tuner: str) -> None:
    steps = {
        "+lora": lambda: add_lora(unet),
        "-lora": unet.unload_lora,
        "L": unet.fuse_lora,
        "l": unet.unfuse_lora,
        "+res": lambda: add_res(unet, tuner),
        "-res": lambda: rd.remove_res_tuner(unet),
        "R": lambda: rd.fuse_res_tuner(unet),
        "r": lambda: rd.unfuse_res_tuner(unet),
        "r*": lambda: rd.unfuse_res_tuner(unet, accept_changed_weights=True),
    }
    steps[step]()


_REFERENCES: dict[str, dict[tuple[bool, bool], torch.Tensor]] = {}


def references(tuner: str) -> dict[tuple[bool, bool], torch.Tensor]:
    """(LoRA loaded, res tuner loaded) -> the output with those adapters, nothing fused."""
    if tuner not in _REFERENCES:
        outputs = {}
        for lora in (False, True):
            for res in (False, True):
                unet = smallest_unet()
                if lora:
                    add_lora(unet)
                if res:
                    add_res(unet, tuner)
                outputs[lora, res] = output(unet)
        assert (outputs[True, True] - outputs[False, True]).abs().max() > 1e-3, "the LoRA must matter"
        assert (outputs[True, True] - outputs[True, False]).abs().max() > 1e-3, "the res tuner must matter"
        _REFERENCES[tuner] = outputs
    return _REFERENCES[tuner]


_LORA_ONLY: dict[tuple[str, ...], dict[str, torch.Tensor]] = {}


def lora_only_weights(steps: list[str]) -> dict[str, torch.Tensor]:
    """The base weights the same LoRA calls leave without any res tuner."""
    lora_steps = tuple(step for step in steps if step in ("+lora", "-lora", "L", "l"))
    if lora_steps not in _LORA_ONLY:
        unet = smallest_unet()
        for step in lora_steps:
            call(unet, step, "res_lora")
        _LORA_ONLY[lora_steps] = base_weights(unet)
    return _LORA_ONLY[lora_steps]


SCRIPTS = {
    **ORDER_SCRIPTS,
    # a LoRA unloaded (its wrapper gone) and another loaded and fused while the tuner stays fused
    "R -lora +lora L r": "+res +lora R -lora +lora L r l -lora -res",
    # unloading a fused LoRA bakes it in; known wrapper: exact; unknown: refused unless accepted
    "R L bake": "+res +lora R L -lora r -res",
    # fused over a merged LoRA that is then unloaded: the weights are untouched since the fuse, so exact as they are
    # (the recorded merge cannot be replayed: its wrapper is gone)
    "L R bake": "+res +lora L R -lora r -res",
    "R +lora L bake": "+res R +lora L -lora r! -res! r* -res",
}
CORE = ["R L r l", "R L l r", "L R r l", "L R l r", "R r L l", "L l R r"]
# every order for every tuner; loading and unloading in between for those that read W0 (GLoRA), read the output
# (sequential) or pad a rectangular weight (Toeplitz)
CASES = [(tuner, name) for tuner in TUNERS for name in CORE] + [
    (tuner, name)
    for tuner in ("glora", "res_lora_sequential", "surm_toeplitz")
    for name in SCRIPTS
    if name not in CORE
]


@pytest.mark.parametrize("tuner,name", CASES, ids=[f"{t}-{n}" for t, n in CASES])
def test_fusing_beside_a_peft_lora_is_exact_in_every_order(tuner, name):
    script = SCRIPTS[name]
    refs = references(tuner)
    steps = script.split()
    unet = smallest_unet()
    original = base_weights(unet)
    keys = list(unet.state_dict())
    lora = res = baked = False
    for index, step in enumerate(steps):
        where = f"{script!r} step {index} ({step})"
        if step.endswith("!"):
            weights, before = base_weights(unet), output(unet)
            with pytest.raises(rd.ResTunerError, match="accept_changed_weights"):
                call(unet, step[:-1], tuner)
            after = base_weights(unet)
            assert all(torch.equal(after[k], v) for k, v in weights.items()), f"{where}: refused but changed weights"
            assert torch.equal(output(unet), before), f"{where}: refused but changed the output"
            continue
        if step == "-lora" and any(getattr(m, "merged", False) for m in unet.modules()):
            baked = True  # unloading a fused LoRA keeps its delta in the weights (diffusers' behaviour)
        call(unet, step, tuner)
        lora = {"+lora": True, "-lora": False}.get(step, lora)
        res = {"+res": True, "-res": False}.get(step, res)
        if baked and res and (TUNERS[tuner]["tuner"] == "glora" or "sequential" in tuner):
            continue  # the baked LoRA is the new W0, which these tuners read: no unfused reference
        torch.testing.assert_close(
            output(unet), refs[lora or baked, res], rtol=1e-5, atol=1e-6, msg=lambda m, where=where: f"{where}: {m}"
        )
    assert list(unet.state_dict()) == keys
    final, oracle = base_weights(unet), lora_only_weights(steps)
    for key, value in final.items():
        if "*" in script:  # subtracted, not restored: equal to rounding
            torch.testing.assert_close(value, oracle[key], rtol=1e-5, atol=1e-6)
            continue
        exact = (value == original[key]) | (value == oracle[key])
        assert bool(exact.all()), f"{script!r}: {key} differs bitwise from both the original and the LoRA-only weights"


TWO_ORDERS = TWO_TUNER_ORDERS


# a reads W0 (GLoRA) or the frozen output (sequential), so it must see W0 while b is fused into the weight
PAIRS = [("glora", "res_lora"), ("res_lora_sequential", "surm_circulant")]
TWO_CASES = [(pair, order) for pair in PAIRS for order in TWO_ORDERS if pair == PAIRS[0] or "L" not in order]


@pytest.mark.parametrize("pair,order", TWO_CASES, ids=[f"{a}+{b}-{o}" for (a, b), o in TWO_CASES])
def test_two_res_tuners_on_the_same_layers_fuse_exactly_in_any_order(pair, order):
    unet = smallest_unet()
    original = base_weights(unet)
    add_lora(unet)
    add_res(unet, pair[0], "a", seed=1, scale=1.3)
    add_res(unet, pair[1], "b", seed=2)
    unfused = output(unet)
    for step in order.split():
        names = [name for name in step[1:] if name in "ab"]
        if step[0] == "R":
            rd.fuse_res_tuner(unet, names)
        elif step[0] == "r":
            rd.unfuse_res_tuner(unet, names)
        else:
            call(unet, step, "glora")
        fused = {name for name, s in res_tuner_settings(unet).items() if s["fused"]}
        expected = {
            n for n in "ab" if any(s[0] == "R" and n in s for s in order.split()[: order.split().index(step) + 1])
        }
        expected -= {
            n for n in "ab" if any(s[0] == "r" and n in s for s in order.split()[: order.split().index(step) + 1])
        }
        assert fused == expected, f"{order} after {step}"
        torch.testing.assert_close(
            output(unet), unfused, rtol=1e-5, atol=1e-6, msg=lambda m, step=step: f"{order} after {step}: {m}"
        )
    rd.remove_res_tuner(unet)
    unet.unload_lora()
    final, oracle = base_weights(unet), lora_only_weights(["+lora"] + [s for s in order.split() if s in "Ll"])
    for key, value in final.items():
        assert bool(((value == original[key]) | (value == oracle[key])).all()), f"{order}: {key}"


def _first_linear_bank(unet):
    return next((bank, owner) for bank, owner in get_state(unet).banks if isinstance(bank, LinearBank))


@pytest.mark.parametrize("remove", [False, True], ids=["unfuse", "unload"])
def test_a_weight_changed_behind_the_fused_tuner_is_refused_unless_accepted(remove):
    unet = smallest_unet()
    add_res(unet, "glora")
    original = base_weights(unet)
    rd.fuse_res_tuner(unet)
    bank, linear = _first_linear_bank(unet)
    with torch.no_grad():
        linear.weight[0, 0] += 0.5  # someone else's edit, not a peft merge
    edited, out = base_weights(unet), output(unet)
    for refused in (
        lambda: rd.unfuse_res_tuner(unet),
        lambda: rd.unfuse_res_tuner(unet, "res"),
        lambda: rd.remove_res_tuner(unet),
        lambda: rd.fuse_res_tuner(unet, "res"),
    ):
        with pytest.raises(rd.ResTunerError, match=f"{bank.layer_path}.*accept_changed_weights=True"):
            refused()
        assert all(torch.equal(base_weights(unet)[k], v) for k, v in edited.items())
        assert torch.equal(output(unet), out) and res_tuner_settings(unet)["res"]["fused"]
    if remove:
        rd.unfuse_res_tuner(unet, "res", accept_changed_weights=True)
    else:
        rd.unfuse_res_tuner(unet, accept_changed_weights=True)  # subtracts exactly the delta, keeps the edit
    assert not res_tuner_settings(unet)["res"]["fused"]
    rd.remove_res_tuner(unet)
    final = base_weights(unet)
    key = next(k for k in final if not torch.equal(final[k], original[k]))
    expected = original[key].clone()
    expected[0, 0] += 0.5
    torch.testing.assert_close(final[key], expected, rtol=0, atol=1e-7)
    assert sum(not torch.equal(final[k], original[k]) for k in final) == 1


@pytest.mark.parametrize("tuner", ["res_lora", "glora"])
@pytest.mark.parametrize("order", ["L R l r", "L R r l", "R L l r", "L R -res l"])
def test_two_peft_adapters_merged_around_a_fused_tuner_are_replayed_in_peft_order(tuner, order):
    """Two LoRA adapters fused together: peft unmerges the last merged first, and the replay of those merges behind
    a fused tuner must do the same, so that the weights come back bit for bit as peft alone leaves them."""

    def loras(unet):
        add_lora(unet, seed=3)
        add_lora(unet, seed=4, name="peft2")
        unet.set_adapter(["peft", "peft2"])

    unet = smallest_unet()
    original = base_weights(unet)
    loras(unet)
    without_res = output(unet)
    add_res(unet, tuner)
    unfused = output(unet)
    assert not torch.allclose(unfused, without_res, atol=1e-3)
    oracle_unet = smallest_unet()
    loras(oracle_unet)
    removed = False
    for step in order.split():
        call(unet, step, tuner)
        if step in ("L", "l"):
            call(oracle_unet, step, tuner)
        removed = removed or step == "-res"
        torch.testing.assert_close(
            output(unet), without_res if removed else unfused, rtol=1e-5, atol=1e-6, msg=lambda m, s=step: f"{s}: {m}"
        )
    oracle = base_weights(oracle_unet)
    for key, value in base_weights(unet).items():
        assert bool(((value == original[key]) | (value == oracle[key])).all()), f"{order}: {key}"


def add_lora_with_bias(unet, targets: tuple[str, ...] = ("to_out.0",)) -> None:
    """peft's lora_bias: the LoRA's merge adds to the bias too (on to_out.0, the attention projection with a bias)."""
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer

    unet.add_adapter(
        LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=list(targets), lora_bias=True),
        adapter_name="peft",
    )
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in unet.modules():
            if isinstance(module, LoraLayer):
                for factor in (module.lora_A["peft"].weight, module.lora_B["peft"].weight, module.lora_B["peft"].bias):
                    factor.copy_(0.2 * torch.randn(factor.shape, generator=generator, dtype=torch.float64))


@pytest.mark.parametrize("order", ["R L r l", "L R r l", "R L l r"])
def test_a_fused_peft_lora_with_a_bias_is_seen_through_when_the_tuner_unfuses(order):
    unet, lora_only = smallest_unet(), smallest_unet()
    original = base_weights(unet)
    add_lora_with_bias(unet)
    add_lora_with_bias(lora_only)
    add_res(unet, "glora")  # reads W0 and b0: both must be recovered from under the LoRA's merge
    unfused = output(unet)
    for step in order.split():
        call(unet, step, "glora")
        torch.testing.assert_close(output(unet), unfused, rtol=1e-5, atol=1e-6, msg=lambda m, s=step: f"{s}: {m}")
        if step in ("L", "l"):
            call(lora_only, step, "glora")  # the same LoRA calls without a res tuner: what peft alone leaves
    rd.remove_res_tuner(unet)
    unet.unload_lora()
    lora_only.unload_lora()
    oracle = base_weights(lora_only)
    for key, value in base_weights(unet).items():  # bit for bit what peft alone leaves ((b + d) - d may round)
        assert torch.equal(value, oracle[key]) or torch.equal(value, original[key]), key


def test_a_merged_dora_is_refused_naming_its_variant_and_changes_nothing():
    from peft import LoraConfig

    unet = smallest_unet()
    add_res(unet, "res_lora")
    unet.add_adapter(
        LoraConfig(r=2, lora_alpha=2, use_dora=True, init_lora_weights="gaussian", target_modules=["to_q"]),
        adapter_name="dora",
    )
    unet.fuse_lora()
    weights, out = base_weights(unet), output(unet)
    with pytest.raises(
        rd.ResTunerError, match=r"'dora' on .*attn1.to_q is merged .* \(DoraLinearVariant, e.g. DoRA\)"
    ):
        rd.fuse_res_tuner(unet)
    assert all(torch.equal(base_weights(unet)[k], v) for k, v in weights.items()) and torch.equal(output(unet), out)


@pytest.mark.parametrize("call", ["unfuse", "remove", "unfuse accepting changed weights"])
def test_a_lora_bias_fused_into_the_bias_fusing_created_is_refused_naming_both_and_the_order_that_works(call):
    # GLoRA's E / W0 C terms give the bias-free to_q a bias while fused; a lora_bias LoRA fused then adds to it
    unet = smallest_unet()
    add_res(unet, "glora")
    rd.fuse_res_tuner(unet)
    add_lora_with_bias(unet, targets=["to_q"])
    lora_unfused = output(unet)
    unet.fuse_lora()
    weights, out = base_weights(unet), output(unet)
    refused = {
        "unfuse": lambda: rd.unfuse_res_tuner(unet),
        "remove": lambda: rd.remove_res_tuner(unet),
        # keeping "the other change" would need the LoRA's bias kept in a bias the layer does not have: was dropped
        "unfuse accepting changed weights": lambda: rd.unfuse_res_tuner(unet, accept_changed_weights=True),
    }[call]
    with pytest.raises(
        rd.ResTunerError, match=r"attn1.to_q has no bias of its own: .*\['peft'\] \(lora_bias\).*unfuse_lora"
    ):
        refused()
    assert all(torch.equal(base_weights(unet)[k], v) for k, v in weights.items()) and torch.equal(output(unet), out)
    unet.unfuse_lora()  # the order that works
    refused()
    if call.startswith("unfuse"):
        torch.testing.assert_close(output(unet), lora_unfused, rtol=1e-5, atol=1e-6)
    else:  # the bias fusing added has gone with the tuner
        assert rd.get_res_tuner_configs(unet) == {}
        assert all(m.get_base_layer().bias is None for n, m in unet.named_modules() if n.endswith("attn1.to_q"))
