"""Where branches run, against hand computations: the attention processor, the feed-forward hook, the linear banks
(branch and merged GEMM), GLoRA's W0 beside fused weights, the bypass before ``conv_norm_out``, and the joint
attention of SD3 / Flux.

``OP`` is the frozen attention run by a stock diffusers ``AttnProcessor2_0`` on an untouched copy; ``T`` is the
hand-written formula of ``tests/reference_math.py`` reading the tuner's parameters. On the tiny SD2 UNet (float64)
the cross-attention of ``down_blocks.0`` has 2 heads, d = d_out = 32 and a 48-wide context of 7 tokens (few keys),
and its self-attention sees 20 tokens (SDPA). Each case runs with every fast path forced on and off.
"""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from reference_math import (
    ACTIVATIONS,
    assert_same_function,
    glora_delta,
    glora_supports,
    linear,
    mha,
    randomize,
    res_attn_reference,
    seeded,
    structured_dense,
)
from torch import nn
from torch.func import functional_call

import resattn_diffusion as rd
from resattn_diffusion.testing import frozen_tiny_model, frozen_tiny_unet, randomize_tuner, unet_inputs
from resattn_diffusion.tuners.fast_paths import forced_paths

BLOCK = "down_blocks.0.attentions.0.transformer_blocks.0"
TOKENS, CONTEXT_TOKENS = 20, 7
SCALE = 0.7


def fresh_unet() -> nn.Module:
    return frozen_tiny_unet("sd2").to(torch.float64)


def stock_copy(module: nn.Module) -> nn.Module:
    """An untouched copy of a frozen attention / feed-forward, run by diffusers' own processor."""
    module = copy.deepcopy(module)
    if hasattr(module, "set_processor"):
        module.set_processor(AttnProcessor2_0())
    return module


def tuned(name: str, target: str, placement: str = "parallel", seed: int = 0, **hyper):
    """A UNet with the tuner on one block's ``target``; returns (unet, tuned module, stock copy, tuner)."""
    unet = fresh_unet()
    module = unet.get_submodule(f"{BLOCK}.{target}")
    stock = stock_copy(module)
    config = rd.ResTunerConfig(
        name, targets=[target], blocks=["down_blocks.0"], placement=placement, scale=SCALE, **hyper
    )
    rd.add_res_tuner(unet, config)
    tuners = _tuner_modules(unet)
    for tuner in tuners.values():
        randomize(tuner, seed, std=0.3)
    return unet, module, stock, tuners


def _tuner_modules(unet: nn.Module, name: str = "default") -> dict[str, nn.Module]:
    """layer path -> the named tuner's module there (read from the banks the processor / hooks hold)."""
    found = {}
    for path, module in unet.named_modules():
        bank = getattr(module, "res_tuner_bank", None) or getattr(getattr(module, "processor", None), "bank", None)
        if bank is not None and name in bank.tuners:
            found[path] = bank.tuners[name]
    return found


def operation_branch(name: str, tuner: nn.Module, inputs: torch.Tensor, context: torch.Tensor, stock: nn.Module):
    """SPEC's ``T(inputs, context)`` with the frozen projections of ``stock`` (an attention, or None for ff)."""
    if name == "res_attn":
        return res_attn_reference(tuner, inputs, context, tuner.heads)
    if name == "res_adapter":
        return linear(ACTIVATIONS["gelu"](linear(inputs, tuner.down.weight)), tuner.up.weight)
    if name == "surm_adapter":
        width, d_in = tuner.down.d_out, tuner.down.d_in
        hidden = ACTIVATIONS["gelu"](linear(inputs, structured_dense(tuner.down, width, d_in)))
        return linear(hidden, structured_dense(tuner.up, tuner.up.d_out, width))
    q = linear(inputs, stock.to_q.weight, stock.to_q.bias)
    w_o = stock.to_out[0].weight
    if name == "res_prefix":
        return linear(mha(q, tuner.prefix_keys, tuner.prefix_values, stock.heads), w_o)
    if name == "res_prompt":
        k = linear(tuner.prompt_tokens, stock.to_k.weight, stock.to_k.bias)
        v = linear(tuner.prompt_tokens, stock.to_v.weight, stock.to_v.bias)
        return tuner.gate * linear(mha(q, k, v, stock.heads), w_o)
    raise AssertionError(f"no reference for {name}")


def call(module: nn.Module, target: str, x: torch.Tensor, c: torch.Tensor, **kwargs) -> torch.Tensor:
    if target == "attn2":
        return module(x, encoder_hidden_states=c, **kwargs)
    return module(x, **kwargs)


OPERATION_CASES = [
    (name, target)
    for name in ("res_attn", "res_adapter", "res_prefix", "res_prompt", "surm_adapter")
    for target in ("attn1", "attn2", "ff")
    if not (target == "ff" and name in ("res_prefix", "res_prompt"))
]


@pytest.mark.parametrize("name, target", OPERATION_CASES)
@pytest.mark.parametrize("placement", ["parallel", "sequential"])
@pytest.mark.parametrize("path", ["reference", "fast"])
def test_processor_adds_the_scaled_branch_at_its_placement(name, target, placement, path):
    """parallel: ``OP(x, c) + s T(x, c)``; sequential: ``OP(x, c) + s T(OP(x, c), c)`` (self-attention and ff:
    the branch's context is its own input)."""
    hyper = {"rank": 12, "heads": 3} if name == "res_attn" else {}
    unet, module, stock, tuners = tuned(name, target, placement, **hyper)
    (tuner,) = tuners.values()
    x, c = seeded(2, TOKENS, 32, seed=1), seeded(2, CONTEXT_TOKENS, 48, seed=2)
    with torch.no_grad():
        frozen = call(stock, target, x, c)
    source = x if placement == "parallel" else frozen
    context = c if target == "attn2" else source

    def reference():
        return frozen + SCALE * operation_branch(name, tuner, source, context, stock if target != "ff" else None)

    with forced_paths(path):
        out = assert_same_function(lambda: call(module, target, x, c), reference, list(tuner.parameters()))
        # the other placement's formula is far from it: this test tells sequential from parallel
        other = x if placement == "sequential" else frozen
        other_context = c if target == "attn2" else other
        wrong = frozen + SCALE * operation_branch(name, tuner, other, other_context, stock if target != "ff" else None)
        assert not torch.allclose(out, wrong, atol=1e-4)
        # a scale given for one call replaces the configured one
        per_call = call(module, target, x, c, res_tuner_scale=0.3) if target != "ff" else None
    if per_call is not None:
        with torch.no_grad():
            torch.testing.assert_close(per_call, frozen + 0.3 * (reference() - frozen) / SCALE)


def key_masks(kind: str, queries: int, keys: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the mask given to the attention, the additive bias it means) for 2 samples: sample 0 masks keys 1 and 3,
    sample 1 its last two; ``per query`` also masks key q mod M for query q (no query loses every key).
    ``additive``: -10000 on a masked key, as the UNet makes ``encoder_attention_mask`` (B, 1, M), or given as
    (B, M), which diffusers' processors take too; ``boolean``: True attends."""
    masked = torch.zeros(2, 1, keys, dtype=torch.bool)
    masked[0, 0, [1, 3]] = True
    masked[1, 0, -2:] = True
    if kind.endswith("per query"):
        masked = masked.expand(2, queries, keys).clone()
        masked[:, torch.arange(queries), torch.arange(queries) % keys] = True
        masked[:, :, 0] = False  # every query keeps key 0
    if kind.startswith("additive"):
        bias = torch.where(masked, -10000.0, 0.0).to(torch.float64)
        return (bias[:, 0] if kind.endswith("(B, M)") else bias), bias
    return ~masked, torch.where(masked, -torch.inf, 0.0).to(torch.float64)


@pytest.mark.parametrize("target", ["attn1", "attn2"])
@pytest.mark.parametrize("placement", ["parallel", "sequential"])
@pytest.mark.parametrize("path", ["reference", "fast"])
@pytest.mark.parametrize("mask_kind", ["additive", "additive (B, M)", "boolean per query"])
def test_res_attn_masks_the_keys_the_frozen_attention_masks(target, placement, path, mask_kind):
    """With an attention mask (a padded prompt's ``encoder_attention_mask``), Res-Attn's ``MHA_h`` masks the same
    keys as the frozen attention: ``OP_m(x, c) + s W_up MHA_h,m(...)``, with and without gradients (the extra-heads
    form steps aside for a mask) and on the few-keys path (7 context tokens)."""
    unet, module, stock, tuners = tuned("res_attn", target, placement, rank=12, heads=3)
    (tuner,) = tuners.values()
    x, c = seeded(2, TOKENS, 32, seed=1), seeded(2, CONTEXT_TOKENS, 48, seed=2)
    mask, bias = key_masks(mask_kind, TOKENS, CONTEXT_TOKENS if target == "attn2" else TOKENS)
    with torch.no_grad():
        frozen = call(stock, target, x, c, attention_mask=mask)
    source = x if placement == "parallel" else frozen
    context = c if target == "attn2" else source

    def reference(key_bias=bias):
        return frozen + SCALE * res_attn_reference(tuner, source, context, tuner.heads, bias=key_bias)

    with forced_paths(path):
        out = assert_same_function(
            lambda: call(module, target, x, c, attention_mask=mask), reference, list(tuner.parameters())
        )
        with torch.no_grad():
            torch.testing.assert_close(call(module, target, x, c, attention_mask=mask), out, rtol=1e-9, atol=1e-10)
    with torch.no_grad():
        assert not torch.allclose(out, reference(None), atol=1e-4)  # the mask changes the branch here


@pytest.mark.parametrize("backend", ["sdpa", "wrapped"])
@pytest.mark.parametrize("path", ["reference", "fast"])
def test_a_masked_prompt_token_changes_nothing_in_a_res_attn_unet(backend, path):
    """``unet(..., encoder_attention_mask=m)``: what the masked prompt tokens hold does not reach the output, branch
    included, whichever processor the tuner wraps (diffusers' SDPA one inline, or an older one called as it is)."""
    unet = frozen_tiny_unet("sd1")
    if backend == "wrapped":
        unet.set_attn_processor(AttnProcessor())
    rd.add_res_tuner(unet, rd.ResTunerConfig("res_attn", targets=["attn1", "attn2"]))
    randomize_tuner(unet, std=0.3)
    inputs = unet_inputs(unet, tokens=9)
    mask = torch.ones(2, 9)
    mask[0, [2, 5]] = 0
    mask[1, -3:] = 0
    changed = torch.where(mask.bool()[..., None], inputs["encoder_hidden_states"], 7.0)  # masked tokens rewritten
    other = dict(inputs, encoder_hidden_states=changed)
    with forced_paths(path), torch.no_grad():
        out = unet(**inputs, encoder_attention_mask=mask).sample
        torch.testing.assert_close(unet(**other, encoder_attention_mask=mask).sample, out, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(unet(**other).sample, unet(**inputs).sample, atol=1e-3)  # unmasked, they count


# --- linear tuners beside the attention's projections -----------------------------------------------------------

LINEAR_CASES = [
    ("res_lora", {"rank": 3}, "parallel"),
    ("res_lora", {"rank": 3}, "sequential"),
    ("glora", {"config": "A=lora2,B=vector,C=lora2,D=vector,E=scalar"}, "parallel"),
    ("glora", {"config": "A=scalar,B=lora3,C=vector,D=scalar,E=vector"}, "parallel"),
    ("surm_circulant", {}, "parallel"),
    ("surm_circulant", {}, "sequential"),
    ("surm_toeplitz", {}, "parallel"),
    ("surm_kronecker", {}, "sequential"),
    ("surm_ldr", {"displacement_rank": 2}, "parallel"),
]


def linear_delta(tuner: nn.Module, w0: torch.Tensor, b0: torch.Tensor | None, forms: dict | None, d_in: int):
    """``(dW, db)`` of the hand-written formula, ``T(z) = dW z + db`` for z of width ``d_in`` (the projection's
    input when parallel, its output when sequential)."""
    kind = type(tuner).__name__
    d_out = w0.shape[0]
    if kind == "ResLoRA":
        return tuner.lora_B.weight @ tuner.lora_A.weight, torch.zeros(d_out, dtype=w0.dtype)
    if kind == "GLoRA":
        if not tuner.has_bias:  # b0 = 0 (the projection has no bias): b0 ⊙ D = 0, and the module holds no D
            forms = {**forms, "D": "none"}
        return glora_delta(glora_supports(tuner, forms, d_out, d_in), w0, b0)
    return structured_dense(tuner.delta, d_out, d_in), torch.zeros(d_out, dtype=w0.dtype)


def tuned_weights(stock: nn.Module, tuners: dict, placement: str, forms: dict | None, scales: dict | None = None):
    """The stock attention's weights with each tuned projection folded by hand: parallel ``W0 + s dW``,
    ``b0 + s db``; sequential (``y + s T(y)``) ``W0 + s dW W0``, ``b0 + s (dW b0 + db)``."""
    weights = {}
    for path, tuner in tuners.items():
        projection = path.split(f"{BLOCK}.attn2.", 1)[1]
        linear_module = stock.get_submodule(projection)
        w0, b0 = linear_module.weight, linear_module.bias
        d_in = w0.shape[0] if placement == "sequential" else w0.shape[1]
        delta_w, delta_b = linear_delta(tuner, w0, b0, forms, d_in)
        scale = SCALE if scales is None else scales[path]
        base_b = torch.zeros(w0.shape[0], dtype=w0.dtype) if b0 is None else b0
        if placement == "sequential":
            delta_w, delta_b = delta_w @ w0, delta_w @ base_b + delta_b
        weights[f"{projection}.weight"] = w0 + scale * delta_w
        weights[f"{projection}.bias"] = base_b + scale * delta_b
    return weights


def with_biases(stock: nn.Module) -> nn.Module:
    """The stock attention with a zero bias on every projection that has none (GLoRA's ``E + W0 C`` creates one)."""
    stock = copy.deepcopy(stock)
    for name in ("to_q", "to_k", "to_v"):
        old = getattr(stock, name)
        if old.bias is None:
            new = nn.Linear(old.in_features, old.out_features, dtype=old.weight.dtype)
            with torch.no_grad():
                new.weight.copy_(old.weight)
                new.bias.zero_()
            setattr(stock, name, new.requires_grad_(False))
    return stock


@pytest.mark.parametrize("name, hyper, placement", LINEAR_CASES)
@pytest.mark.parametrize("path", ["reference", "fast"])
def test_linear_bank_adds_the_branch_beside_each_projection(name, hyper, placement, path):
    """Cross-attention with ``to_k`` (48 -> 32, no bias) and ``to_out`` (32 -> 32, bias) tuned equals the stock
    attention whose weights hold the hand-folded branch; ``"fast"`` is the merged one-GEMM path."""
    unet, module, stock, _ = tuned(name, "attn2", placement, projections=["to_k", "to_out"], **hyper)
    tuners = _tuner_modules(unet)
    assert sorted(path.split(".attn2.")[1] for path in tuners) == ["to_k", "to_out.0"]
    stock = with_biases(stock)
    forms = dict(item.split("=") for item in hyper["config"].split(",")) if name == "glora" else None
    x, c = seeded(2, TOKENS, 32, seed=1), seeded(2, CONTEXT_TOKENS, 48, seed=2)
    parameters = [p for tuner in tuners.values() for p in tuner.parameters()]

    def reference():
        weights = tuned_weights(stock, tuners, placement, forms)
        return functional_call(stock, weights, (x,), {"encoder_hidden_states": c})

    with forced_paths(path):
        out = assert_same_function(lambda: module(x, encoder_hidden_states=c), reference, parameters)
    with torch.no_grad():
        assert not torch.allclose(out, stock(x, encoder_hidden_states=c), atol=1e-3)


# --- GLoRA reads W0 while the live weight holds something else ---------------------------------------------------


@pytest.mark.parametrize("path", ["reference", "fast"])
def test_unfused_glora_reads_w0_beside_a_fused_tuner(path):
    forms_text = "A=lora2,B=lora2,C=vector,D=vector,E=vector"
    unet, module, stock, _ = tuned("res_lora", "attn2", projections=["to_k", "to_out"], rank=2)
    config = rd.ResTunerConfig(
        "glora", targets=["attn2"], blocks=["down_blocks.0"], projections=["to_k", "to_out"], config=forms_text
    )
    rd.add_res_tuner(unet, config, "g")
    lora, glora = _tuner_modules(unet, "default"), _tuner_modules(unet, "g")
    for tuner in glora.values():
        randomize(tuner, 7, std=0.3)
    rd.fuse_res_tuner(unet, "default")  # the live weights are now W0 + s dW_lora
    assert not torch.equal(module.to_k.weight, stock.to_k.weight)
    forms = dict(item.split("=") for item in forms_text.split(","))
    stock = with_biases(stock)
    x, c = seeded(2, TOKENS, 32, seed=1), seeded(2, CONTEXT_TOKENS, 48, seed=2)

    def reference():
        # both deltas from the original W0 (GLoRA at scale 1), added to W0
        lora_weights = tuned_weights(stock, lora, "parallel", None)
        glora_weights = tuned_weights(stock, glora, "parallel", forms, {p: 1.0 for p in glora})
        weights = {}
        for key, value in lora_weights.items():
            weights[key] = value + glora_weights[key] - stock.get_parameter(key)
        return functional_call(stock, weights, (x,), {"encoder_hidden_states": c})

    parameters = [p for tuner in glora.values() for p in tuner.parameters()]
    with forced_paths(path):
        # fusing folds in float64 on a float64 model (fusion.wide; it was float32, ~3e-8 off); reading the live
        # weight instead of W0 is off by O(s dW_lora) ~ 0.1
        assert_same_function(lambda: module(x, encoder_hidden_states=c), reference, parameters, rtol=1e-10, atol=1e-10)


def test_unfused_glora_reads_w0_beside_a_fused_diffusers_lora():
    from peft import LoraConfig

    unet = fresh_unet()
    attention = unet.get_submodule(f"{BLOCK}.attn2")
    w0 = attention.to_k.weight.detach().clone()
    config = rd.ResTunerConfig(
        "glora", targets=["attn2"], blocks=["down_blocks.0"], projections=["to_k"], config="A=lora2,C=vector,E=vector"
    )
    rd.add_res_tuner(unet, config)
    (glora,) = _tuner_modules(unet).values()
    randomize(glora, 3, std=0.3)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=["to_k"]))
    with torch.no_grad():
        for parameter_name, parameter in unet.named_parameters():
            if "lora_B" in parameter_name:
                parameter.copy_(seeded(*parameter.shape, seed=5, std=0.3))
    unet.fuse_lora()
    live = attention.to_k.get_base_layer().weight.detach().clone()
    assert not torch.allclose(live, w0)
    c = seeded(2, CONTEXT_TOKENS, 48, seed=2)
    forms = {"A": "lora2", "B": "none", "C": "vector", "D": "none", "E": "vector"}
    for path in ("reference", "fast"):
        with forced_paths(path):
            out = attention.to_k(c)
        with torch.no_grad():
            torch.testing.assert_close(
                out, linear(c, live) + linear(c, *glora_delta(glora_supports(glora, forms, 32, 48), w0, None))
            )


# --- the bypass ------------------------------------------------------------------------------------------------------


def _nearest(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize by index: ``out[i, j] = x[floor(i H / H'), floor(j W / W')]``."""
    rows = torch.tensor([i * x.shape[-2] // size[0] for i in range(size[0])])
    cols = torch.tensor([j * x.shape[-1] // size[1] for j in range(size[1])])
    return x[..., rows, :][..., cols]


def _layer_norm(tokens: torch.Tensor) -> torch.Tensor:
    mean = tokens.mean(dim=-1, keepdim=True)
    variance = ((tokens - mean) ** 2).mean(dim=-1, keepdim=True)
    return (tokens - mean) / torch.sqrt(variance + 1e-5)


def _token_branch(kind: str, tuner: nn.Module, tokens: torch.Tensor, heads: int) -> torch.Tensor:
    if kind == "adapter":
        return linear(ACTIVATIONS["gelu"](linear(tokens, tuner.down.weight)), tuner.up.weight)
    return res_attn_reference(tuner, tokens, tokens, heads)


def _on_tokens(fn, feature_map: torch.Tensor) -> torch.Tensor:
    batch, channels, height, width = feature_map.shape
    out = fn(feature_map.flatten(2).transpose(1, 2))
    return out.transpose(1, 2).reshape(batch, -1, height, width)


def bypass_reference(bypass: nn.Module, features: list[torch.Tensor], lateral: str, vertical: str, heads: int):
    """``b_0 = L_0(h_0)``, ``b_i = L_i(h_i) + V_i(up_i(b_{i-1}))``, ``V(z) = z + T(z)``, L on layer-normed tokens."""
    b = None
    for stage, h in zip(bypass.stages, features):
        lateral_out = _on_tokens(lambda t, s=stage: _token_branch(lateral, s.lateral, _layer_norm(t), heads), h)
        if b is None:
            b = lateral_out
            continue
        z = b if tuple(b.shape[-2:]) == tuple(h.shape[-2:]) else _nearest(b, tuple(h.shape[-2:]))
        if stage.up.conv is not None:
            z = torch.nn.functional.conv2d(z, stage.up.conv.weight, padding=1)
        if stage.up.proj is not None:
            z = torch.nn.functional.conv2d(z, stage.up.proj.weight)
        if vertical != "none":
            z = z + _on_tokens(lambda t, s=stage: _token_branch(vertical, s.vertical, t, heads), z)
        b = lateral_out + z
    return b


@pytest.mark.parametrize(
    "lateral, vertical, up_rank",
    [("adapter", "adapter", None), ("attention", "attention", None), ("adapter", "none", 3)],
)
def test_bypass_equals_hand_computation_before_conv_norm_out(lateral, vertical, up_rank):
    unet = fresh_unet()
    reference_unet = copy.deepcopy(unet)
    features, head_input = [], []
    hooks = [
        block.register_forward_hook(
            lambda m, a, out: features.append((out[0] if isinstance(out, tuple) else out).detach())
        )
        for block in (reference_unet.mid_block, *reference_unet.up_blocks)
    ]
    hooks.append(reference_unet.conv_norm_out.register_forward_pre_hook(lambda m, a: head_input.append(a[0])))
    inputs = unet_inputs(unet, batch_size=2, seed=0)
    inputs = {k: v.to(torch.float64) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad():
        reference_unet(**inputs)
    for hook in hooks:
        hook.remove()
    config = rd.ResTunerConfig(
        "res_bypass", lateral=lateral, vertical=vertical, rank=4, heads=2, up_rank=up_rank, scale=SCALE
    )
    rd.add_res_tuner(unet, config)
    bypass = unet.res_tuner_bypass.tuners["default"]
    randomize(bypass, 4, std=0.3)
    parameters = list(bypass.parameters())

    def reference():
        b = bypass_reference(bypass, features, lateral, vertical, 2)
        hidden = reference_unet.conv_act(reference_unet.conv_norm_out(head_input[0] + SCALE * b))
        return reference_unet.conv_out(hidden)

    assert len(features) == 1 + len(unet.up_blocks)
    out = assert_same_function(lambda: unet(**inputs).sample, reference, parameters)
    with torch.no_grad():
        assert not torch.allclose(out, reference_unet(**inputs).sample, atol=1e-4)


# --- joint attention of diffusion transformers (SD3 MMDiT, Flux single blocks) -------------------------------------


def _rms_norm_per_head(x: torch.Tensor, norm: nn.Module | None, heads: int) -> torch.Tensor:
    """A qk-norm written out: per head ``x / sqrt(mean(x^2) + eps) * weight`` (identity when there is none)."""
    if norm is None:
        return x
    split = x.unflatten(-1, (heads, -1))
    normed = split / torch.sqrt((split**2).mean(dim=-1, keepdim=True) + norm.eps) * norm.weight
    return normed.flatten(-2)


def joint_branch(name: str, tuner: nn.Module, inputs: torch.Tensor, context: torch.Tensor, stock: nn.Module):
    """SPEC's branch on a joint attention: Res-Attn's keys and values from ``context``; Res-Prefix / Res-Prompt with
    the frozen query ``norm_q(to_q(x))`` (no rotary), prompt tokens through the text stream's ``add_k_proj`` /
    ``add_v_proj`` where there are some, and ``W_o = I`` where the attention has no ``to_out``."""
    if name not in ("res_prefix", "res_prompt"):
        return operation_branch(name, tuner, inputs, context, None)
    heads = stock.heads
    q = _rms_norm_per_head(linear(inputs, stock.to_q.weight, stock.to_q.bias), stock.norm_q, heads)
    to_out = getattr(stock, "to_out", None)
    w_o = None if to_out is None else to_out[0].weight
    if name == "res_prefix":
        attended = mha(q, tuner.prefix_keys, tuner.prefix_values, heads)
        return attended if w_o is None else linear(attended, w_o)
    if getattr(stock, "add_k_proj", None) is not None:
        k_proj, k_norm, v_proj = stock.add_k_proj, stock.norm_added_k, stock.add_v_proj
    else:
        k_proj, k_norm, v_proj = stock.to_k, stock.norm_k, stock.to_v
    k = _rms_norm_per_head(linear(tuner.prompt_tokens, k_proj.weight, k_proj.bias), k_norm, heads)
    v = linear(tuner.prompt_tokens, v_proj.weight, v_proj.bias)
    attended = mha(q, k, v, heads)
    return tuner.gate * (attended if w_o is None else linear(attended, w_o))


JOINT_TUNERS = ("res_attn", "res_adapter", "res_prefix", "res_prompt", "surm_adapter")


@pytest.mark.parametrize("name", JOINT_TUNERS)
@pytest.mark.parametrize("placement", ["parallel", "sequential"])
def test_sd3_joint_attention_adds_the_branch_to_the_image_stream(name, placement):
    """``y_img' = y_img + s T(x_img, [c; x_img])`` (sequential: ``T(y_img, [c; x_img])``), ``y_txt`` unchanged."""
    model = frozen_tiny_model("sd3").to(torch.float64)
    path = "transformer_blocks.0"
    attention = model.get_submodule(f"{path}.attn")
    stock = copy.deepcopy(attention)  # keeps diffusers' JointAttnProcessor2_0
    hyper = {"rank": 8, "heads": 2} if name == "res_attn" else {}
    config = rd.ResTunerConfig(name, targets=["attn"], blocks=[path], placement=placement, scale=SCALE, **hyper)
    rd.add_res_tuner(model, config)
    (tuner,) = _tuner_modules(model).values()
    randomize(tuner, 1, std=0.3)
    x, c = seeded(2, 18, 16, seed=1), seeded(2, 5, 16, seed=2)  # 23 joint keys: the SDPA path
    with torch.no_grad():
        image, text = stock(x, encoder_hidden_states=c)
    source = x if placement == "parallel" else image

    def reference():
        return image + SCALE * joint_branch(name, tuner, source, torch.cat([c, x], dim=1), stock)

    tuned_text = []

    def run():
        tuned_image, tuned_text_out = attention(x, encoder_hidden_states=c)
        tuned_text.append(tuned_text_out)
        return tuned_image

    assert_same_function(run, reference, list(tuner.parameters()))
    torch.testing.assert_close(tuned_text[0], text, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["res_attn", "res_prefix", "res_prompt"])
def test_flux_single_block_attention_uses_qk_norms_and_no_output_projection(name):
    model = frozen_tiny_model("flux").to(torch.float64)
    path = "single_transformer_blocks.0"
    attention = model.get_submodule(f"{path}.attn")
    stock = copy.deepcopy(attention)
    assert getattr(stock, "to_out", None) is None and stock.norm_q is not None
    hyper = {"rank": 8, "heads": 2} if name == "res_attn" else {}
    rd.add_res_tuner(model, rd.ResTunerConfig(name, targets=["attn"], blocks=[path], scale=SCALE, **hyper))
    (tuner,) = _tuner_modules(model).values()
    randomize(tuner, 2, std=0.3)
    with torch.no_grad():  # a trained-looking qk-norm: its weight matters
        stock.norm_q.weight.copy_(seeded(*stock.norm_q.weight.shape, seed=8, std=0.5) + 1.0)
        stock.norm_k.weight.copy_(seeded(*stock.norm_k.weight.shape, seed=9, std=0.5) + 1.0)
        attention.norm_q.weight.copy_(stock.norm_q.weight)
        attention.norm_k.weight.copy_(stock.norm_k.weight)
    x = seeded(2, 12, stock.to_q.in_features, seed=1)
    with torch.no_grad():
        frozen = stock(x)
    assert_same_function(
        lambda: attention(x),
        lambda: frozen + SCALE * joint_branch(name, tuner, x, x, stock),
        list(tuner.parameters()),
    )
