"""Res-Tuning-Bypass (issue 7): the side network's math, and its promise on the SD1-, SD2- and SDXL-like tiny UNets --
an exact no-op at init, no graph through the frozen UNet body, it learns, and it saves/loads/removes exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import resattn_diffusion as rd
from resattn_diffusion.integration.unet_tuners import BANK_ATTR, requires_unet_backward
from resattn_diffusion.testing import frozen_tiny_unet as _frozen_unet
from resattn_diffusion.testing import tiny_pipeline, tiny_unet_config, unet_inputs
from resattn_diffusion.tuners.bypass import ResBypass, ResBypassParams

KINDS = ("sd1", "sd2", "sdxl")


def _run(unet, inputs, **kwargs):
    return unet(**inputs, **kwargs).sample


def _perturb(params, std=0.05, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(std * torch.randn(p.shape, generator=generator, dtype=p.dtype))


def _hook_counts(module: nn.Module) -> dict[str, int]:
    return {name: len(m._forward_hooks) + len(m._forward_pre_hooks) for name, m in module.named_modules()}


# --- the pure module ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "params",
    [
        ResBypassParams(),
        ResBypassParams(lateral="attention", vertical="attention", rank=8, heads=2, up_rank=4),
        ResBypassParams(vertical="none", activation="relu", normalize=False),
    ],
)
def test_module_is_zero_at_init_and_every_factor_learns(params):
    widths = [32, 32, 16, 8]
    bypass = ResBypass(widths, params)
    features = [
        torch.randn(2, 32, 4, 4),
        torch.randn(2, 32, 8, 8),
        torch.randn(2, 16, 16, 16),
        torch.randn(2, 8, 16, 16),
    ]
    target = torch.randn(2, 8, 16, 16)
    out = bypass(features)
    assert out.shape == (2, 8, 16, 16) and torch.equal(out, torch.zeros_like(out))

    # first step: exactly the zero-initialised factors (the last lateral's output projection, the last up conv)
    # get a gradient; every chain passes through one of them
    (out - target).pow(2).mean().backward()
    with_grad = {n for n, p in bypass.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    zero_factors = {n for n, p in bypass.named_parameters() if not p.detach().abs().sum()}
    last = len(widths) - 1
    assert zero_factors == with_grad
    assert len(zero_factors) == 2 and all(n.startswith(f"stages.{last}.") for n in zero_factors)

    # once they have moved, every factor gets a gradient
    optimizer = torch.optim.SGD(bypass.parameters(), lr=0.1)
    optimizer.step()
    optimizer.zero_grad()
    (bypass(features) - target).pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in bypass.parameters())


def test_equal_widths_skip_the_conv_except_on_the_last_transition():
    bypass = ResBypass([16, 16, 16], ResBypassParams(vertical="none"))
    assert bypass.stages[1].up.conv is None  # identity at equal widths: no parameters
    assert bypass.stages[2].up.conv is not None and not bypass.stages[2].up.conv.weight.abs().sum()
    # no resize where the UNet's block did not upsample
    features = [torch.randn(1, 16, 4, 4), torch.randn(1, 16, 8, 8), torch.randn(1, 16, 8, 8)]
    assert bypass(features).shape == (1, 16, 8, 8)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"lateral": "conv"}, r"lateral='conv' is not allowed"),
        ({"vertical": "mlp"}, r"vertical='mlp' is not allowed"),
        ({"lateral": "attention", "rank": 6, "heads": 4}, r"rank=6 is not divisible by heads=4"),
        ({"up_rank": 0}, r"up_rank must be None"),
        ({"rank": 0}, r"rank must be a positive number"),
    ],
)
def test_bad_hyperparameters_say_what_is_allowed(kwargs, match):
    with pytest.raises(rd.ConfigError, match=match):
        rd.ResTunerConfig(tuner="res_bypass", **kwargs)


# --- on the UNet -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_identity_at_init(kind):
    unet = _frozen_unet(kind)
    inputs = unet_inputs(unet, batch_size=2, seed=1)
    with torch.no_grad():
        reference = _run(unet, inputs)
    paths = rd.add_res_tuner(unet, rd.ResTunerConfig(tuner="res_bypass"))
    assert paths == ["mid_block"] + [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]
    out = _run(unet, inputs)
    assert torch.equal(out, reference)
    assert out.requires_grad  # through the bypass only
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("kind", KINDS)
def test_a_bypass_step_builds_no_graph_through_the_unet_body(kind):
    unet = _frozen_unet(kind)
    inputs = unet_inputs(unet, batch_size=2, seed=2)
    rd.add_res_tuner(unet, rd.ResTunerConfig(tuner="res_bypass"))
    assert requires_unet_backward(unet) is False
    bypass_modules = {id(m) for m in getattr(unet, BANK_ATTR).modules()}
    tail = {"conv_norm_out", "conv_act", "conv_out"}
    seen: dict[str, tuple[bool, bool]] = {}

    def record(name):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            if isinstance(out, torch.Tensor):
                seen[name] = (out.requires_grad, torch.is_grad_enabled())

        return hook

    handles = [
        m.register_forward_hook(record(name))
        for name, m in unet.named_modules()
        if name and id(m) not in bypass_modules
    ]
    out = _run(unet, inputs)
    for handle in handles:
        handle.remove()
    body = {n: v for n, v in seen.items() if n not in tail}
    assert {"mid_block", "up_blocks.0", "time_embedding", "conv_in"} <= set(body)
    assert not any(requires_grad or grad_mode for requires_grad, grad_mode in body.values()), body
    assert all(seen[n][1] for n in tail if n in seen)  # the tail runs with grad on: it carries the gradient
    assert seen["conv_out"][0] and torch.is_grad_enabled()

    out.float().pow(2).mean().backward()
    tuner_ids = {id(p) for p in rd.res_tuner_parameters(unet)}
    assert all(p.grad is None for p in unet.parameters() if id(p) not in tuner_ids)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in rd.res_tuner_parameters(unet))


def test_only_the_bypass_and_the_tail_are_saved_for_backward():
    unet = _frozen_unet("sd1")
    inputs = unet_inputs(unet, batch_size=2, seed=3)
    rd.add_res_tuner(unet, rd.ResTunerConfig(tuner="res_bypass"))
    bypass_params = {p.data_ptr() for p in rd.res_tuner_parameters(unet)}
    frozen_params = {p.data_ptr() for n, p in unet.named_parameters() if not n.startswith(BANK_ATTR)}
    tail_params = {p.data_ptr() for m in (unet.conv_norm_out, unet.conv_out) for p in m.parameters()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        _run(unet, inputs)
    pointers = {t.data_ptr() for t in saved}
    assert pointers & bypass_params  # the bypass's own weights are saved for its backward
    assert not (pointers & (frozen_params - tail_params))  # no frozen weight of the body is


def test_grad_mode_is_restored_when_the_forward_raises():
    unet = _frozen_unet("sd2")
    inputs = unet_inputs(unet, batch_size=1, seed=4)
    rd.add_res_tuner(unet, rd.ResTunerConfig(tuner="res_bypass"))

    def boom(module, args, output):
        raise RuntimeError("boom")

    handle = unet.up_blocks[0].register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        _run(unet, inputs)
    assert torch.is_grad_enabled()
    handle.remove()
    with torch.no_grad():
        _run(unet, inputs)
        assert not torch.is_grad_enabled()  # never switched on for a caller that had it off
    assert torch.is_grad_enabled()


def test_inputs_that_require_grad_keep_the_body_graph():
    unet = _frozen_unet("sd1")
    inputs = unet_inputs(unet, batch_size=2, seed=5)
    rd.add_res_tuner(unet, rd.ResTunerConfig(tuner="res_bypass"))
    _perturb(rd.res_tuner_parameters(unet))
    # e.g. a text encoder being trained: its embedding must still get a gradient through the UNet
    inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"].clone().requires_grad_(True)
    _run(unet, inputs).pow(2).mean().backward()
    assert inputs["encoder_hidden_states"].grad is not None and inputs["encoder_hidden_states"].grad.abs().sum() > 0


def test_an_unfrozen_unet_or_an_attention_tuner_needs_the_unet_backward():
    unet = _frozen_unet("sd1")
    assert requires_unet_backward(unet)  # no bypass
    rd.add_res_tuner(unet, rd.ResTunerConfig(tuner="res_bypass"))
    assert not requires_unet_backward(unet)
    unet.conv_out.requires_grad_(True)  # the tail is after the injection point: still no body graph needed
    assert not requires_unet_backward(unet)
    unet.up_blocks[0].requires_grad_(True)
    assert requires_unet_backward(unet)
    unet.up_blocks[0].requires_grad_(False)
    rd.add_res_tuner(unet, rd.ResTunerConfig(tuner="res_attn", targets=["attn2"]), adapter_name="attn")
    assert requires_unet_backward(unet)


@pytest.mark.parametrize("kind", ("sd1", "sdxl"))
def test_loss_falls_fitting_a_fixed_target(kind):
    unet = _frozen_unet(kind)
    inputs = unet_inputs(unet, batch_size=2, seed=6)
    with torch.no_grad():
        target = _run(unet, inputs) + 0.5 * torch.randn(2, 4, unet.config.sample_size, unet.config.sample_size)
    rd.add_res_tuner(unet, rd.ResTunerConfig(tuner="res_bypass", rank=8))
    optimizer = torch.optim.Adam(rd.res_tuner_parameters(unet), lr=3e-3)
    losses = []
    for _ in range(12):
        loss = (_run(unet, inputs) - target).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def _trained(kind, **hyper):
    unet = _frozen_unet(kind)
    rd.add_res_tuner(unet, rd.ResTunerConfig(tuner="res_bypass", **hyper))
    _perturb(rd.res_tuner_parameters(unet))
    return unet


@pytest.mark.parametrize(
    "kind,hyper", [("sd1", {}), ("sdxl", {"lateral": "attention", "vertical": "none", "up_rank": 8})]
)
def test_save_load_into_a_fresh_unet_and_remove_are_exact(kind, hyper, tmp_path):
    unet = _trained(kind, **hyper)
    inputs = unet_inputs(unet, batch_size=2, seed=7)
    hooks_before = _hook_counts(_frozen_unet(kind))
    with torch.no_grad():
        reference = _run(_frozen_unet(kind), inputs)
        tuned = _run(unet, inputs)
        assert not torch.allclose(tuned, reference)
        path = rd.save_res_tuner(unet, tmp_path)
        fresh = _frozen_unet(kind)
        assert rd.load_res_tuner(fresh, tmp_path) == "default"
        assert torch.equal(_run(fresh, inputs), tuned)
        assert rd.get_res_tuner_configs(fresh) == rd.get_res_tuner_configs(unet)

        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
        assert keys and all(k.split(".")[0] in ("mid_block", "up_blocks") for k in keys)

        rd.remove_res_tuner(fresh)
        assert torch.equal(_run(fresh, inputs), reference)
        assert not any("res_tuner" in n for n, _ in fresh.named_parameters())
        assert _hook_counts(fresh) == hooks_before
        assert not any("_res_tuner_bypass_slot" in m.__dict__ for m in fresh.modules())


def test_a_file_for_other_widths_is_refused_and_changes_nothing(tmp_path):
    from diffusers import UNet2DConditionModel

    path = rd.save_res_tuner(_trained("sd1"), tmp_path / "bypass.safetensors")
    config = tiny_unet_config("sd1")
    config["block_out_channels"] = (16, 32)
    other = UNet2DConditionModel(**config)
    with pytest.raises(rd.ResTunerFileError, match="does not fit this UNet"):
        rd.load_res_tuner(other, path)
    assert rd.get_res_tuner_configs(other) == {} and not hasattr(other, BANK_ATTR)


def test_blocks_do_not_apply_and_the_unet_stays_unchanged():
    unet = _frozen_unet("sd1")
    with pytest.raises(rd.ConfigError, match="leave blocks=None"):
        rd.add_res_tuner(unet, rd.ResTunerConfig(tuner="res_bypass", blocks=["up_blocks.*"]))
    assert rd.get_res_tuner_configs(unet) == {} and _hook_counts(unet) == _hook_counts(_frozen_unet("sd1"))


def test_scale_zero_disabled_and_per_call_scales_give_the_frozen_output():
    unet = _trained("sd2")
    inputs = unet_inputs(unet, batch_size=2, seed=8)
    with torch.no_grad():
        reference = _run(_frozen_unet("sd2"), inputs)
        tuned = _run(unet, inputs)
        assert torch.equal(_run(unet, inputs, cross_attention_kwargs={rd.SCALE_KWARG: 0.0}), reference)
        assert torch.equal(_run(unet, inputs, cross_attention_kwargs={rd.SCALE_KWARG: {"default": 0.0}}), reference)
        half = _run(unet, inputs, cross_attention_kwargs={rd.SCALE_KWARG: 0.5})
        assert not torch.allclose(half, reference) and not torch.allclose(half, tuned)
        assert torch.equal(_run(unet, inputs), tuned)  # the per-call scale lasts one call
        rd.set_res_tuner_scale(unet, 0.0)
        assert torch.equal(_run(unet, inputs), reference)
        rd.set_res_tuner_scale(unet, 1.0)
        rd.set_res_tuner_enabled(unet, False)
        assert torch.equal(_run(unet, inputs), reference)
        rd.set_res_tuner_enabled(unet, True)
        assert torch.equal(_run(unet, inputs), tuned)
        assert torch.equal(_run(copy.deepcopy(unet), inputs), tuned)


def test_combined_with_res_attn():
    unet = _frozen_unet("sdxl")
    inputs = unet_inputs(unet, batch_size=2, seed=9)
    with torch.no_grad():
        reference = _run(unet, inputs)
    rd.add_res_tuner(unet, rd.ResTunerConfig(tuner="res_bypass"), adapter_name="bypass")
    rd.add_res_tuner(unet, rd.ResTunerConfig(tuner="res_attn"), adapter_name="attn")
    assert requires_unet_backward(unet)
    assert torch.equal(_run(unet, inputs), reference)

    # the body keeps its graph for res_attn, the bypass still reads detached outputs
    captured = {}
    handle = unet.up_blocks[0].register_forward_hook(lambda m, a, o: captured.setdefault("h", o))
    bypass = getattr(unet, BANK_ATTR).tuners["bypass"]

    def record_inputs(module, args):
        captured["read"] = [h.requires_grad for h in args[0]]

    bypass_handle = bypass.register_forward_pre_hook(record_inputs)
    _perturb(rd.res_tuner_parameters(unet, "attn"), seed=1)
    _perturb(rd.res_tuner_parameters(unet, "bypass"), seed=2)
    out = _run(unet, inputs)
    handle.remove()
    bypass_handle.remove()
    assert captured["h"].requires_grad
    assert captured["read"] == [False] * len(unet.up_blocks + [unet.mid_block])
    out.pow(2).mean().backward()
    for name in ("attn", "bypass"):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in rd.res_tuner_parameters(unet, name)), name

    with torch.no_grad():
        only_attn = _run(unet, inputs, cross_attention_kwargs={rd.SCALE_KWARG: {"bypass": 0.0}})
        only_bypass = _run(unet, inputs, cross_attention_kwargs={rd.SCALE_KWARG: {"attn": 0.0}})
        both = _run(unet, inputs)
        assert not torch.allclose(only_attn, both) and not torch.allclose(only_bypass, both)
        rd.remove_res_tuner(unet, "bypass")
        assert torch.equal(_run(unet, inputs), only_attn)
        rd.remove_res_tuner(unet, "attn")
        assert torch.equal(_run(unet, inputs), reference)


def test_pipeline_round_trip(tmp_path):
    def generate(pipe, **kwargs):
        return pipe(
            "a photo of a dog",
            num_inference_steps=2,
            output_type="pt",
            generator=torch.Generator().manual_seed(0),
            **kwargs,
        ).images

    pipe = tiny_pipeline("sd1")
    base = generate(pipe)
    pipe.unet.requires_grad_(False)
    rd.add_res_tuner(pipe.unet, rd.ResTunerConfig(tuner="res_bypass"))
    _perturb(rd.res_tuner_parameters(pipe.unet), std=0.2)
    tuned = generate(pipe)
    assert not torch.allclose(tuned, base)
    assert torch.equal(generate(pipe, cross_attention_kwargs={rd.SCALE_KWARG: 0.0}), base)
    rd.save_res_tuner(pipe.unet, tmp_path)

    fresh = tiny_pipeline("sd1")
    rd.load_res_tuner(fresh.unet, tmp_path)
    assert torch.equal(generate(fresh), tuned)


def test_fp16_weights_and_bf16_autocast_training():
    unet = _frozen_unet("sd1").to(torch.float16)
    inputs = {
        k: (v.half() if torch.is_tensor(v) and v.is_floating_point() else v)
        for k, v in unet_inputs(unet, 1, 0).items()
    }
    with torch.no_grad():
        reference = _run(unet, inputs)
        rd.add_res_tuner(unet, rd.ResTunerConfig(tuner="res_bypass"))
        assert all(p.dtype == torch.float16 for p in rd.res_tuner_parameters(unet))
        assert torch.equal(_run(unet, inputs), reference)

    unet = _frozen_unet("sdxl")
    inputs = unet_inputs(unet, batch_size=2, seed=10)
    rd.add_res_tuner(unet, rd.ResTunerConfig(tuner="res_bypass"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _run(unet, inputs)
    out.float().pow(2).mean().backward()
    grads = [p.grad for p in rd.res_tuner_parameters(unet)]
    assert any(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_gradient_checkpointing_changes_nothing():
    unet = _trained("sd2")
    inputs = unet_inputs(unet, batch_size=2, seed=11)
    _run(unet, inputs).pow(2).mean().backward()
    expected = [p.grad.clone() for p in rd.res_tuner_parameters(unet)]
    unet.zero_grad(set_to_none=True)
    unet.enable_gradient_checkpointing()
    unet.train()
    _run(unet, inputs).pow(2).mean().backward()
    for grad, reference in zip([p.grad for p in rd.res_tuner_parameters(unet)], expected):
        torch.testing.assert_close(grad, reference)


def test_benchmark_runs_and_the_bypass_keeps_less_for_backward(tmp_path):
    from benchmarks.perf.bypass_memory import main

    result = main(["--tiny", "--threads", "1", "--out-dir", str(tmp_path)])
    rows = {row["name"]: row for row in result["rows"]}
    assert set(rows) == {"res_bypass", "res_attn", "peft_lora"}
    assert (tmp_path / "bypass_memory.json").is_file() and (tmp_path / "bypass_memory.md").is_file()
    # similar trainable sizes, and the bypass keeps a fraction of LoRA's activations for backward
    counts = [row["trainable_parameters"] for row in rows.values()]
    assert max(counts) < 1.5 * min(counts)
    assert rows["res_bypass"]["saved_vs_lora"] < 0.5 and rows["res_bypass"]["memory_vs_lora"] < 1.0


def test_two_named_bypasses_share_the_hooks_and_scale_apart():
    unet = _frozen_unet("sd1")
    inputs = unet_inputs(unet, batch_size=2, seed=12)
    rd.add_res_tuner(unet, rd.ResTunerConfig(tuner="res_bypass"), adapter_name="a")
    rd.add_res_tuner(unet, rd.ResTunerConfig(tuner="res_bypass", vertical="none", rank=4), adapter_name="b")
    _perturb(rd.res_tuner_parameters(unet, "a"), seed=3)
    _perturb(rd.res_tuner_parameters(unet, "b"), seed=4)
    with torch.no_grad():
        only_a = _run(unet, inputs, cross_attention_kwargs={rd.SCALE_KWARG: {"b": 0.0}})
        only_b = _run(unet, inputs, cross_attention_kwargs={rd.SCALE_KWARG: {"a": 0.0}})
        assert not torch.allclose(only_a, only_b)
        rd.remove_res_tuner(unet, "b")
        assert torch.equal(_run(unet, inputs), only_a)
    assert set(getattr(unet, BANK_ATTR).tuners) == {"a"}
