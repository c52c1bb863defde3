"""Fused res tuners beside a diffusers LoRA, in every order (issue 12, part 1).

A diffusers LoRA (``pipe.load_lora_weights``, peft underneath) and a weight-space res tuner (res_lora, glora, every
surm_* family) on the same projections of the tiny SD1 and SDXL pipelines, driven through a script of the calls
``fuse_lora`` (L), ``fuse_res_tuner`` (R), ``unfuse_lora`` (l), ``unfuse_res_tuner`` (r) and loading / unloading
either adapter (``+lora``, ``-lora``, ``+res``, ``-res``) in between. After every call:

* the UNet's output equals the output of the same adapters unfused (fusing is an optimisation, not a change);
* a call the library refuses (``!``) raises ``ResTunerError`` and changes neither the weights nor the output.

At the end, with everything unloaded, every weight of the UNet is bit-identical to the original weight or to what
the same LoRA calls leave without any res tuner (peft's own ``unfuse_lora`` is not bit-exact: W + d - d).
"""

from __future__ import annotations

import copy

import pytest
import torch
from fusion_scripts import FUSIBLE_TUNERS, FUSION_TARGETS, ORDER_SCRIPTS, TWO_TUNER_ORDERS

import resattn_diffusion as rd
from pipelines import ResTunerStableDiffusionPipeline, ResTunerStableDiffusionXLPipeline
from resattn_diffusion.testing import randomize_tuner, tiny_pipeline, tiny_unet, unet_inputs

KINDS = ["sd1", "sdxl"]
TARGETS = FUSION_TARGETS
TUNERS = FUSIBLE_TUNERS
PIPELINE_CLASSES = {"sd1": ResTunerStableDiffusionPipeline, "sdxl": ResTunerStableDiffusionXLPipeline}

# Scripts of calls. "!" marks a call that must be refused; "r*" is unfuse_res_tuner(accept_changed_weights=True).
SCRIPTS = {
    **ORDER_SCRIPTS,
    # unload_lora_weights() of a fused LoRA bakes it in; known wrapper: exact; unknown: refused unless accepted
    "R L bake": "+res +lora R L -lora r -res",
    "R +lora L bake": "+res R +lora L -lora r! -res! r* -res",
}


# --- building blocks ------------------------------------------------------------------------------------------
_PIPES: dict[str, object] = {}
_LORAS: dict[str, dict[str, torch.Tensor]] = {}


def fresh_pipe(kind: str):
    """A tiny pipeline with its own copy of the UNet (the rest is shared: LoRA and tuners only touch the UNet)."""
    if kind not in _PIPES:
        _PIPES[kind] = tiny_pipeline(kind).components
    components = dict(_PIPES[kind], unet=copy.deepcopy(_PIPES[kind]["unet"]))
    return PIPELINE_CLASSES[kind](**components)


def lora_state_dict(kind: str) -> dict[str, torch.Tensor]:
    """A diffusers-format LoRA on to_q/to_k/to_v/to_out.0 of the tiny UNet (the projections res tuners sit on)."""
    if kind not in _LORAS:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft import LoraConfig
        from peft.utils import get_peft_model_state_dict

        unet = tiny_unet(kind)
        unet.add_adapter(
            LoraConfig(
                r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"]
            )
        )
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for name, param in unet.named_parameters():
                if "lora_B" in name:
                    param.copy_(0.1 * torch.randn(param.shape, generator=generator))
        state_dict = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        _LORAS[kind] = {f"unet.{key}": value for key, value in state_dict.items()}
    return dict(_LORAS[kind])


def add_res(pipe, tuner: str, name: str = "res", seed: int = 1) -> None:
    rd.add_res_tuner(pipe.unet, rd.ResTunerConfig(targets=TARGETS, **TUNERS[tuner]), adapter_name=name)
    randomize_tuner(pipe.unet, name, seed=seed, std=0.05)


def base_weights(unet) -> dict[str, torch.Tensor]:
    """The UNet's own weights by their unwrapped names (a peft wrapper's ``base_layer.`` left out)."""
    return {
        name.replace("base_layer.", ""): value.detach().clone()
        for name, value in unet.state_dict().items()
        if "lora_" not in name and "res_tuner_bank" not in name
    }


_INPUTS: dict[str, dict] = {}


@torch.no_grad()
def output(pipe) -> torch.Tensor:
    kind = "sdxl" if pipe.unet.config.addition_embed_type == "text_time" else "sd1"
    if kind not in _INPUTS:
        _INPUTS[kind] = unet_inputs(pipe.unet, batch_size=1, seed=1)
    return pipe.unet(**_INPUTS[kind]).sample


def call(pipe, step: str, tuner: str, kind: str) -> None:
    if step == "+lora":
        pipe.load_lora_weights(lora_state_dict(kind), adapter_name="peft")
    elif step == "-lora":
        pipe.unload_lora_weights()
    elif step == "L":
        pipe.fuse_lora()
    elif step == "l":
        pipe.unfuse_lora()
    elif step == "+res":
        add_res(pipe, tuner)
    elif step == "-res":
        pipe.unload_res_tuner()
    elif step == "R":
        pipe.fuse_res_tuner()
    elif step == "r":
        pipe.unfuse_res_tuner()
    elif step == "r*":
        pipe.unfuse_res_tuner(accept_changed_weights=True)
    else:  # pragma: no cover - a typo in a script
        raise ValueError(step)


_REFERENCES: dict[tuple[str, str], dict[tuple[bool, bool], torch.Tensor]] = {}


def references(kind: str, tuner: str) -> dict[tuple[bool, bool], torch.Tensor]:
    """(LoRA loaded, res tuner loaded) -> the UNet's output with those adapters, nothing fused."""
    key = (kind, tuner)
    if key not in _REFERENCES:
        outputs = {}
        for lora in (False, True):
            for res in (False, True):
                pipe = fresh_pipe(kind)
                if lora:
                    call(pipe, "+lora", tuner, kind)
                if res:
                    call(pipe, "+res", tuner, kind)
                outputs[lora, res] = output(pipe)
        assert (outputs[True, True] - outputs[False, True]).abs().max() > 1e-3, "the LoRA must matter"
        assert (outputs[True, True] - outputs[True, False]).abs().max() > 1e-3, "the res tuner must matter"
        _REFERENCES[key] = outputs
    return _REFERENCES[key]


_LORA_ONLY: dict[tuple, dict[str, torch.Tensor]] = {}


def lora_only_weights(kind: str, steps: list[str]) -> dict[str, torch.Tensor]:
    """The base weights the same LoRA calls leave without any res tuner."""
    lora_steps = tuple(step for step in steps if step in ("+lora", "-lora", "L", "l"))
    if (kind, lora_steps) not in _LORA_ONLY:
        pipe = fresh_pipe(kind)
        for step in lora_steps:
            call(pipe, step, "res_lora", kind)
        _LORA_ONLY[kind, lora_steps] = base_weights(pipe.unet)
    return _LORA_ONLY[kind, lora_steps]


def run_script(kind: str, tuner: str, script: str) -> None:
    refs = references(kind, tuner)
    steps = script.split()
    pipe = fresh_pipe(kind)
    original = base_weights(pipe.unet)
    keys = list(pipe.unet.state_dict())
    lora = res = baked = False
    for index, step in enumerate(steps):
        where = f"{script!r} step {index} ({step})"
        if step.endswith("!"):
            weights, before = base_weights(pipe.unet), output(pipe)
            with pytest.raises(rd.ResTunerError, match="accept_changed_weights"):
                call(pipe, step[:-1], tuner, kind)
            after = base_weights(pipe.unet)
            assert all(torch.equal(after[k], v) for k, v in weights.items()), f"{where}: refused but changed weights"
            assert torch.equal(output(pipe), before), f"{where}: refused but changed the output"
            continue
        if step == "-lora" and any(getattr(m, "merged", False) for m in pipe.unet.modules()):
            baked = True  # unloading a fused LoRA keeps its delta in the weights (diffusers' documented behaviour)
        call(pipe, step, tuner, kind)
        lora = {"+lora": True, "-lora": False}.get(step, lora)
        res = {"+res": True, "-res": False}.get(step, res)
        if baked and res and (TUNERS[tuner]["tuner"] == "glora" or "sequential" in tuner):
            continue  # the baked LoRA is the new W0, which these tuners read: no unfused reference to compare with
        torch.testing.assert_close(
            output(pipe), refs[lora or baked, res], rtol=1e-4, atol=2e-5, msg=lambda m, where=where: f"{where}: {m}"
        )

    assert list(pipe.unet.state_dict()) == keys
    final, oracle = base_weights(pipe.unet), lora_only_weights(kind, steps)
    for name, value in final.items():
        if "*" in script:  # subtracted, not restored: equal to rounding
            torch.testing.assert_close(
                value, oracle[name], rtol=1e-6, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}"
            )
            continue
        exact = (value == original[name]) | (value == oracle[name])
        assert bool(exact.all()), (
            f"{script!r}: {name} differs bitwise from both the original and the LoRA-only weights"
        )


# The six orders for every tuner on SD1, and the first order for every tuner on SDXL (SDXL's shapes: two layers per
# block, the wide text context); loading and unloading in between for the tuners that read W0 (GLoRA), read the
# output (sequential) or pad a rectangular weight (Toeplitz) -- the other SURM families fold through the very same
# code as these. The other five orders on SDXL run no line or branch of the library that the kept cases do not
# (coverage run --branch with per-test contexts over resattn_diffusion/, pipelines/, benchmarks/ and the training
# scripts): the order logic does not depend on the family.
CORE = ["R L r l", "R L l r", "L R r l", "L R l r", "R r L l", "L l R r"]
EXTENDED_TUNERS = {"sd1": ["glora", "res_lora_sequential", "surm_toeplitz"], "sdxl": ["glora"]}
CASES = [
    (kind, tuner, name) for kind in KINDS for tuner in TUNERS for name in CORE if kind == "sd1" or name == CORE[0]
] + [
    (kind, tuner, name)
    for kind, tuners in EXTENDED_TUNERS.items()
    for tuner in tuners
    for name in SCRIPTS
    if name not in CORE
]


# --- tests ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,tuner,name", CASES, ids=[f"{k}-{t}-{n}" for k, t, n in CASES])
def test_fusing_beside_a_diffusers_lora_is_exact_in_every_order(kind, tuner, name):
    run_script(kind, tuner, SCRIPTS[name])


@pytest.mark.parametrize("kind", KINDS)
def test_fused_images_equal_unfused_images(kind):
    """Whole pipeline calls: fusing both adapters (either order) leaves the images as they are unfused."""

    def images(pipe):
        return pipe(
            "a photo of a dog", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt"
        ).images

    for order in (["R", "L"], ["L", "R"]):
        pipe = fresh_pipe(kind)
        for step in ("+res", "+lora"):
            call(pipe, step, "glora", kind)
        unfused = images(pipe)
        for step in order:
            call(pipe, step, "glora", kind)
        torch.testing.assert_close(images(pipe), unfused, rtol=1e-4, atol=1e-5)


TWO_ORDERS = TWO_TUNER_ORDERS
# Every order on SD1, the first on SDXL: as above, the other SDXL orders run no library code the kept ones do not.
TWO_ORDER_CASES = [(kind, order) for kind in KINDS for order in TWO_ORDERS if kind == "sd1" or order == TWO_ORDERS[0]]


@pytest.mark.parametrize("kind,order", TWO_ORDER_CASES, ids=[f"{order}-{kind}" for kind, order in TWO_ORDER_CASES])
def test_two_res_tuners_on_the_same_layers_fuse_exactly_in_any_order(kind, order):
    pipe = fresh_pipe(kind)
    original = base_weights(pipe.unet)
    call(pipe, "+lora", "glora", kind)
    add_res(pipe, "glora", "a", seed=1)
    add_res(pipe, "res_lora", "b", seed=2)
    unfused = output(pipe)
    for step in order.split():
        names = [name for name in step[1:] if name in "ab"]
        if step[0] == "R":
            pipe.fuse_res_tuner(names)
        elif step[0] == "r":
            pipe.unfuse_res_tuner(names)
        else:
            call(pipe, step, "glora", kind)
        torch.testing.assert_close(
            output(pipe), unfused, rtol=1e-4, atol=2e-5, msg=lambda m, step=step: f"{order} after {step}: {m}"
        )
    assert not any(info["fused"] for info in pipe.get_res_tuners().values())
    pipe.unload_res_tuner()
    pipe.unload_lora_weights()
    final, oracle = (
        base_weights(pipe.unet),
        lora_only_weights(kind, ["+lora"] + [s for s in order.split() if s in "Ll"]),
    )
    for name, value in final.items():
        assert bool(((value == original[name]) | (value == oracle[name])).all()), f"{order}: {name}"


def _first_linear_bank(unet):
    from resattn_diffusion.integration.api import get_state
    from resattn_diffusion.integration.processors import LinearBank

    return next((bank, owner) for bank, owner in get_state(unet).banks if isinstance(bank, LinearBank))


def test_a_weight_changed_behind_the_fused_tuner_is_refused_unless_accepted():
    pipe = fresh_pipe("sd1")
    add_res(pipe, "glora")
    original = base_weights(pipe.unet)
    pipe.fuse_res_tuner()
    bank, linear = _first_linear_bank(pipe.unet)
    with torch.no_grad():
        linear.weight[0, 0] += 0.5  # someone else's edit, not a peft merge
    edited, out = base_weights(pipe.unet), output(pipe)
    for refused in (pipe.unfuse_res_tuner, pipe.unload_res_tuner, lambda: pipe.fuse_res_tuner("res")):
        with pytest.raises(rd.ResTunerError, match=f"{bank.layer_path}.*accept_changed_weights=True"):
            refused()
        assert all(torch.equal(base_weights(pipe.unet)[k], v) for k, v in edited.items())
        assert torch.equal(output(pipe), out) and pipe.get_res_tuners()["res"]["fused"]
    pipe.unfuse_res_tuner(accept_changed_weights=True)  # subtracts exactly the tuner's delta, keeps the edit
    pipe.unload_res_tuner()
    final = base_weights(pipe.unet)
    key = next(k for k in final if not torch.equal(final[k], original[k]))
    expected = original[key].clone()
    expected[0, 0] += 0.5
    torch.testing.assert_close(final[key], expected, rtol=0, atol=1e-6)
    assert sum(not torch.equal(final[k], original[k]) for k in final) == 1


def test_a_non_additive_lora_merge_dora_is_refused_and_changes_nothing():
    from peft import LoraConfig

    pipe = fresh_pipe("sd1")
    add_res(pipe, "res_lora")
    add_res(pipe, "glora", "g")
    pipe.disable_res_tuner("g")
    pipe.unet.add_adapter(
        LoraConfig(r=2, lora_alpha=2, use_dora=True, init_lora_weights="gaussian", target_modules=["to_q"]),
        adapter_name="dora",
    )
    pipe.unet.fuse_lora()
    weights, out = base_weights(pipe.unet), output(pipe)
    pipe.enable_res_tuner("g")
    with pytest.raises(rd.ResTunerError, match="'dora'.*unfuse_lora"):
        output(pipe)  # GLoRA reads W0, which a merged DoRA hides: an error, not a silently different output
    pipe.disable_res_tuner("g")
    with pytest.raises(rd.ResTunerError, match="'dora'.*unfuse_lora"):
        pipe.fuse_res_tuner("res")
    assert all(torch.equal(base_weights(pipe.unet)[k], v) for k, v in weights.items())
    assert torch.equal(output(pipe), out) and not pipe.get_res_tuners()["res"]["fused"]
    pipe.unet.unfuse_lora()
    pipe.fuse_res_tuner("res")  # the order that works: the DoRA unfused first
    pipe.unfuse_res_tuner()


def test_moving_the_fused_unet_to_another_dtype_still_unfuses_to_the_converted_base():
    pipe = fresh_pipe("sd1")
    add_res(pipe, "glora")
    original = base_weights(pipe.unet)
    pipe.fuse_res_tuner()
    pipe.unet.to(torch.float64)  # the recorded base weights are buffers of the bank: they follow
    pipe.unfuse_res_tuner()
    pipe.unload_res_tuner()
    final = base_weights(pipe.unet)
    assert all(torch.equal(final[k], v.to(final[k].dtype)) for k, v in original.items())
