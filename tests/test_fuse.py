"""Re-parameterisation: fusing linear tuners into the frozen weights and unfusing them, on tiny UNets (issue 3).

Fused outputs equal the unfused branches (fp32, 1e-5), unfuse restores the original module bit-exactly (a bias that
fusing created is removed again), fusing always starts from the original W0, the scale is honoured, and a fused
tuner costs nothing at run time (its hook returns at once).
"""

from __future__ import annotations

import pytest
import torch

import resattn_diffusion as rd
from resattn_diffusion.integration.api import get_state
from resattn_diffusion.integration.processors import LinearBank
from resattn_diffusion.testing import (
    KINDS,
    frozen_tiny_model,
    model_inputs,
    present_targets,
    unet_inputs,
)
from resattn_diffusion.testing import (
    frozen_tiny_unet as frozen_unet,
)
from resattn_diffusion.testing import (
    randomize_tuner as randomize,
)

GLORA_CONFIGS = [
    "A=lora4,B=lora4,C=lora2,D=vector,E=vector",
    "A=vector,B=scalar,C=vector,D=scalar,E=scalar",
    "A=none,B=none,C=vector,D=none,E=none",  # only W0 C: a bias on the bias-free to_q/to_k/to_v
    "A=scalar,B=vector,C=none,D=none,E=vector",
]
SURM_TUNERS = ["surm_circulant", "surm_toeplitz", "surm_kronecker", "surm_ldr"]
CASES = (
    [("res_lora", {})]
    + [("glora", {"config": config}) for config in GLORA_CONFIGS]
    + [(name, {}) for name in SURM_TUNERS]
)


def run(unet, inputs) -> torch.Tensor:
    with torch.no_grad():
        return unet(**inputs).sample


def frozen_state(unet) -> dict[str, torch.Tensor]:
    """The UNet's own weights (not the tuners'), cloned."""
    return {k: v.clone() for k, v in unet.state_dict().items() if "res_tuner_bank" not in k}


def assert_bit_exact(unet, before: dict[str, torch.Tensor]) -> None:
    after = frozen_state(unet)
    assert list(after) == list(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def bias_free_linears(unet) -> list[torch.nn.Linear]:
    return [
        bank_owner
        for bank, bank_owner in get_state(unet).banks
        if isinstance(bank, LinearBank) and bank_owner.bias is None
    ]


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sd3", "sd35", "flux"])
@pytest.mark.parametrize("tuner,hyper", CASES, ids=[f"{t}-{h.get('config', '')}" for t, h in CASES])
def test_fused_equals_unfused_and_unfuse_restores_exactly(kind, tuner, hyper):
    unet = frozen_tiny_model(kind)
    inputs = model_inputs(unet, batch_size=2, seed=1)
    base = run(unet, inputs)
    # every target of the family that exists here: UNet attn1/attn2/ff; SD3 also ff_context; Flux proj_mlp/proj_out
    rd.add_res_tuner(unet, rd.ResTunerConfig(tuner=tuner, targets=present_targets(unet), **hyper))
    randomize(unet)
    keys = list(unet.state_dict())
    weights = frozen_state(unet)
    bias_free = bias_free_linears(unet)
    if kind in KINDS:  # SD3's and Flux's projections all have biases
        assert bias_free, "SD's to_q/to_k/to_v have no bias: the bias-creating case must be exercised"
    unfused = run(unet, inputs)
    assert (unfused - base).abs().max() > 1e-3, "the tuner must change the output for the comparison to mean anything"

    rd.fuse_res_tuner(unet)
    fused = run(unet, inputs)
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)
    creates_bias = tuner == "glora" and ("C=none" not in hyper["config"] or "E=none" not in hyper["config"])
    if creates_bias:
        assert all(linear.bias is not None and not linear.bias.requires_grad for linear in bias_free)

    rd.unfuse_res_tuner(unet)
    assert all(linear.bias is None for linear in bias_free)
    assert list(unet.state_dict()) == keys
    assert_bit_exact(unet, weights)
    torch.testing.assert_close(run(unet, inputs), unfused, rtol=0, atol=0)
    rd.remove_res_tuner(unet)
    assert torch.equal(run(unet, inputs), base)


def test_fusing_twice_and_two_tuners_start_from_the_original_weights():
    unet = frozen_unet()
    inputs = unet_inputs(unet, batch_size=2, seed=2)
    weights = frozen_state(unet)
    rd.add_res_tuner(unet, rd.ResTunerConfig(tuner="glora", config="A=lora2,B=vector,C=vector,E=scalar"), "g")
    rd.add_res_tuner(unet, rd.ResTunerConfig(tuner="res_lora", rank=2), "l")
    randomize(unet, "g", seed=1)
    randomize(unet, "l", seed=2)
    both = run(unet, inputs)

    rd.fuse_res_tuner(unet, "g")
    one_fused = run(unet, inputs)  # g folded, l still a branch that sees the original W0
    torch.testing.assert_close(one_fused, both, rtol=1e-5, atol=1e-5)
    fused_once = frozen_state(unet)
    rd.fuse_res_tuner(unet, "g")  # again: no compounding
    for key, value in frozen_state(unet).items():
        assert torch.equal(value, fused_once[key]), key

    rd.fuse_res_tuner(unet, "l")
    torch.testing.assert_close(run(unet, inputs), both, rtol=1e-5, atol=1e-5)
    rd.fuse_res_tuner(unet)  # both again
    torch.testing.assert_close(run(unet, inputs), both, rtol=1e-5, atol=1e-5)

    rd.unfuse_res_tuner(unet)
    rd.remove_res_tuner(unet)
    assert_bit_exact(unet, weights)


def test_fusing_honours_the_scale():
    unet = frozen_unet()
    inputs = unet_inputs(unet, batch_size=2, seed=3)
    rd.add_res_tuner(
        unet, rd.ResTunerConfig(tuner="glora", config="A=lora4,B=lora4,C=vector,D=vector,E=vector", scale=0.5)
    )
    randomize(unet)
    half = run(unet, inputs)
    rd.set_res_tuner_scale(unet, 1.0)
    full = run(unet, inputs)
    assert (half - full).abs().max() > 1e-3
    rd.set_res_tuner_scale(unet, 0.5)
    rd.fuse_res_tuner(unet)
    torch.testing.assert_close(run(unet, inputs), half, rtol=1e-5, atol=1e-5)
    with pytest.raises(rd.ResTunerError, match="unfuse"):
        rd.set_res_tuner_scale(unet, 1.0)


@pytest.mark.parametrize("tuner", ["res_attn", "surm_adapter"])
def test_fusing_a_branch_tuner_raises_naming_it_and_changes_nothing(tuner):
    unet = frozen_unet()
    rd.add_res_tuner(unet, rd.ResTunerConfig(tuner="glora"), "linear")
    rd.add_res_tuner(unet, rd.ResTunerConfig(tuner=tuner), "branch")
    randomize(unet, "linear")
    weights = frozen_state(unet)
    with pytest.raises(rd.ResTunerError, match=tuner):
        rd.fuse_res_tuner(unet)  # every tuner: refused as a whole
    with pytest.raises(rd.ResTunerError, match="'branch'"):
        rd.fuse_res_tuner(unet, "branch")
    assert_bit_exact(unet, weights)
    rd.fuse_res_tuner(unet, "linear")  # the linear one alone is fine


def test_remove_while_fused_restores_the_module():
    unet = frozen_unet()
    inputs = unet_inputs(unet, batch_size=1, seed=4)
    base = run(unet, inputs)
    keys = list(unet.state_dict())
    rd.add_res_tuner(unet, rd.ResTunerConfig(tuner="glora", config="C=lora2,E=vector"))
    randomize(unet)
    rd.fuse_res_tuner(unet)
    rd.remove_res_tuner(unet)
    assert list(unet.state_dict()) == keys
    assert torch.equal(run(unet, inputs), base)


def test_fused_tuners_do_no_work_at_run_time(monkeypatch):
    unet = frozen_unet()
    inputs = unet_inputs(unet, batch_size=1, seed=5)
    rd.add_res_tuner(unet, rd.ResTunerConfig(tuner="glora", targets=["attn1", "attn2", "ff"]))
    randomize(unet)
    rd.fuse_res_tuner(unet)
    banks = [bank for bank, _ in get_state(unet).banks]
    assert banks and all(isinstance(bank, LinearBank) and bank.all_fused for bank in banks)

    def no_branch(self, *args, **kwargs):
        raise AssertionError("a fused bank computed a branch")

    def no_weights(self, *args, **kwargs):
        raise AssertionError("a fully fused bank did hook work")

    monkeypatch.setattr(LinearBank, "add_branches", no_weights)
    from resattn_diffusion.tuners.glora import GLoRA

    monkeypatch.setattr(GLoRA, "forward", no_branch)
    run(unet, inputs)
    monkeypatch.undo()
    # a second, unfused tuner on the same layers runs again as a branch (the fused one still does not)
    rd.add_res_tuner(unet, rd.ResTunerConfig(tuner="res_lora"), "extra")
    shared = [bank for bank in banks if "extra" in bank.tuners]
    assert shared and not any(bank.all_fused for bank in shared)
    rd.remove_res_tuner(unet, "extra")
    assert all(bank.all_fused for bank in banks)


def test_fused_unet_runs_no_branch_work():
    """A fused UNet runs at the base model's speed because no tuner computes anything: checked by counting tuner
    calls, not by timing (timing belongs in benchmarks/perf, measured as ratios)."""
    unet = frozen_unet()
    inputs = unet_inputs(unet, batch_size=2, seed=6)
    rd.add_res_tuner(unet, rd.ResTunerConfig(tuner="surm_ldr", targets=["attn1", "attn2", "ff"], displacement_rank=4))
    randomize(unet)
    calls = []
    tuners = [m for n, m in unet.named_modules() if n.endswith("res_tuner_bank.tuners.default")]
    handles = [t.register_forward_hook(lambda *_: calls.append(1)) for t in tuners]
    run(unet, inputs)
    assert len(calls) == len(tuners) > 0  # unfused: every branch runs
    calls.clear()
    rd.fuse_res_tuner(unet)
    run(unet, inputs)
    assert calls == []  # fused: the hooks return at once
    for h in handles:
        h.remove()
