"""The processor's two other ways of computing the frozen attention, on bare diffusers ``Attention`` modules in
float64 (issue 18, mutation pins; a few seconds).

* **Extra heads** (``ResTunerAttnProcessor._extra_heads_call``, forced with ``processor.extra_heads = "on"``): a
  lone Res-Attn branch computed as extra heads of the frozen attention equals the reference path (the frozen
  attention plus the branch) on a plain SD attention, and steps aside -- same output as the reference path -- on
  every attention whose frozen projections are not just their weights: a qk-norm on the query or on the keys alone,
  a group norm, a residual, an output rescale, a bias on q/k/v, a peft LoRA wrapper, an instance ``forward``, a
  forward hook or pre-hook on any projection.
* **xformers** (GPU only in practice): with a stand-in ``memory_efficient_attention`` computed by hand, the
  processor's own frozen attention equals diffusers' ``XFormersAttnProcessor`` on the same stand-in, for an
  attention with a non-default ``scale`` and a per-example mask (batch 2).
"""

from __future__ import annotations

import math
import types

import pytest
import torch
from diffusers.models import attention_processor as diffusers_attention
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, XFormersAttnProcessor
from processor_spies import record_extra_heads_calls
from reference_math import seeded
from torch import nn

from resattn_diffusion.integration import processors as our_processors
from resattn_diffusion.integration.processors import ResTunerAttnProcessor
from resattn_diffusion.tuners.base import OpShape
from resattn_diffusion.tuners.res_attn import ResAttn, ResAttnParams

DIM, CONTEXT_DIM, HEADS, TOKENS, CONTEXT_TOKENS, SCALE = 16, 12, 2, 6, 5, 0.7


def _fill(module: nn.Module, seed: int, std: float = 0.3) -> None:
    with torch.no_grad():
        for i, parameter in enumerate(module.parameters()):
            parameter.copy_(seeded(*parameter.shape, seed=seed + i, std=std))


def _attention(**options) -> Attention:
    attn = Attention(query_dim=DIM, heads=HEADS, dim_head=DIM // HEADS, **options).to(torch.float64).eval()
    _fill(attn, seed=10)
    with torch.no_grad():  # norms near 1: a norm skipped by a path changes the output, not only its scale
        for name, parameter in attn.named_parameters():
            if "norm" in name:
                parameter.add_(1.0)
    return attn


def _tuned(attn: Attention, context_dim: int) -> tuple[ResTunerAttnProcessor, ResAttn]:
    shape = OpShape(in_dim=DIM, out_dim=DIM, context_dim=context_dim, inner_dim=DIM, heads=HEADS)
    branch = ResAttn(shape, ResAttnParams(rank=4, heads=2)).to(torch.float64)
    _fill(branch, seed=30)
    processor = ResTunerAttnProcessor(AttnProcessor2_0(), "blocks.0.attn")
    processor.bank.add("default", branch, SCALE, "parallel")
    attn.set_processor(processor)
    return processor, branch


def _run_both_paths(attn: Attention, processor: ResTunerAttnProcessor, cross: bool):
    hidden = seeded(2, TOKENS, DIM, seed=3)
    context = seeded(2, CONTEXT_TOKENS, CONTEXT_DIM, seed=4) if cross else None
    with torch.no_grad():
        processor.extra_heads = "off"
        reference = attn(hidden, encoder_hidden_states=context)
        processor.extra_heads = "on"
        forced = attn(hidden, encoder_hidden_states=context)
    return hidden, context, reference, forced


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_extra_heads_on_a_plain_attention_equal_the_frozen_attention_plus_the_branch(cross, monkeypatch):
    attn = _attention(cross_attention_dim=CONTEXT_DIM) if cross else _attention()
    processor, branch = _tuned(attn, CONTEXT_DIM if cross else DIM)
    taken = record_extra_heads_calls(monkeypatch)
    hidden, context, reference, forced = _run_both_paths(attn, processor, cross)
    assert taken == [False, True]  # "off" is the reference path; "on" takes extra heads on a plain attention
    with torch.no_grad():
        by_hand = AttnProcessor2_0()(attn, hidden, encoder_hidden_states=context) + SCALE * branch(hidden, context)
    torch.testing.assert_close(reference, by_hand, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(forced, by_hand, rtol=1e-10, atol=1e-10)


def _one_norm(which: str):
    def change(attn: Attention) -> None:
        norm = nn.LayerNorm(DIM // HEADS, elementwise_affine=True).to(torch.float64)
        _fill(norm, seed=50)
        setattr(attn, which, norm)

    return change


def _bias_on(name: str):
    def change(attn: Attention) -> None:
        old = getattr(attn, name)
        new = nn.Linear(old.in_features, old.out_features, bias=True).to(torch.float64)
        _fill(new, seed=60)
        setattr(attn, name, new)

    return change


def _instance_forward(attn: Attention) -> None:
    to_k = attn.to_k
    plain = to_k.forward
    to_k.forward = lambda x: plain(x) * 1.5  # e.g. a monkey-patched projection: its weight is not what it computes


def _forward_hook(name: str):
    def change(attn: Attention) -> None:
        module = attn.to_out[0] if name == "to_out" else getattr(attn, name)
        module.register_forward_hook(lambda _module, _args, out: out * 0.5)

    return change


def _pre_hook(attn: Attention) -> None:
    attn.to_q.register_forward_pre_hook(lambda _module, args: (args[0] * 2.0,))


def _peft_lora(attn: Attention) -> None:
    peft = pytest.importorskip("peft")
    peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["to_v"]), attn)
    attn.to(torch.float64)
    with torch.no_grad():
        for name, parameter in attn.named_parameters():
            if "lora_B" in name:
                parameter.copy_(seeded(*parameter.shape, seed=70, std=0.3))


NOT_PLAIN = {
    "norm_q_only": ({}, _one_norm("norm_q")),
    "norm_k_only": ({}, _one_norm("norm_k")),
    "qk_layer_norm": ({"qk_norm": "layer_norm"}, None),
    "group_norm": ({"norm_num_groups": 4}, None),
    "residual": ({"residual_connection": True}, None),
    "rescaled_output": ({"rescale_output_factor": 2.0}, None),
    "qkv_bias": ({"bias": True}, None),
    "bias_on_to_k": ({}, _bias_on("to_k")),
    "peft_lora_on_to_v": ({}, _peft_lora),
    "instance_forward_on_to_k": ({}, _instance_forward),
    "forward_hook_on_to_v": ({}, _forward_hook("to_v")),
    "forward_hook_on_to_out": ({}, _forward_hook("to_out")),
    "pre_hook_on_to_q": ({}, _pre_hook),
}


@pytest.mark.parametrize("case", list(NOT_PLAIN))
def test_extra_heads_step_aside_where_a_projection_is_not_its_weight(case, monkeypatch):
    options, change = NOT_PLAIN[case]
    attn = _attention(**options)
    if change is not None:
        change(attn)
    processor, _ = _tuned(attn, DIM)
    taken = record_extra_heads_calls(monkeypatch)
    hidden, _, reference, forced = _run_both_paths(attn, processor, cross=False)
    assert taken == [False, False]
    torch.testing.assert_close(forced, reference, rtol=0, atol=0)
    # the case matters: the plain attention with the same weights gives another output
    plain = _attention()
    _tuned(plain, DIM)
    with torch.no_grad():
        assert not torch.allclose(plain(hidden), reference, atol=1e-6)


# --- the xformers backend, with a stand-in kernel -----------------------------------------------------------------


def _memory_efficient_attention(q, k, v, attn_bias=None, op=None, scale=None):
    """xformers' contract on (batch * heads, tokens, head_dim) tensors, by hand."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = q @ k.transpose(-1, -2) * scale
    if attn_bias is not None:
        scores = scores + attn_bias
    return scores.softmax(-1) @ v


@pytest.fixture
def stand_in_xformers(monkeypatch):
    ops = types.SimpleNamespace(memory_efficient_attention=_memory_efficient_attention)
    monkeypatch.setattr(our_processors, "xformers_ops", ops)
    monkeypatch.setattr(diffusers_attention, "xformers", types.SimpleNamespace(ops=ops), raising=False)
    return ops


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_xformers_backend_equals_diffusers_xformers_processor_with_a_custom_scale_and_a_mask(
    cross, masked, stand_in_xformers
):
    attn = _attention(cross_attention_dim=CONTEXT_DIM) if cross else _attention()
    attn.scale = 0.9  # not 1/sqrt(head_dim): a kernel left to its default scale gives another output
    hidden = seeded(2, TOKENS, DIM, seed=3)
    context = seeded(2, CONTEXT_TOKENS, CONTEXT_DIM, seed=4) if cross else None
    mask = None
    if masked:  # per example: the second one sees only its first two keys
        mask = torch.zeros(2, 1, CONTEXT_TOKENS if cross else TOKENS, dtype=torch.float64)
        mask[1, :, 2:] = -10000.0
    with torch.no_grad():
        reference = XFormersAttnProcessor()(attn, hidden, encoder_hidden_states=context, attention_mask=mask)
        default_scale = AttnProcessor2_0()(attn, hidden, encoder_hidden_states=context, attention_mask=mask)
        processor = ResTunerAttnProcessor(XFormersAttnProcessor(), "blocks.0.attn")
        assert processor.backend == "xformers"
        attn.set_processor(processor)
        ours = attn(hidden, encoder_hidden_states=context, attention_mask=mask)
        unmasked = attn(hidden, encoder_hidden_states=context)
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(reference, default_scale, atol=1e-6)  # the custom scale matters here
    assert torch.allclose(unmasked[0], ours[0], atol=1e-12) and (
        not masked or not torch.allclose(unmasked[1], ours[1], atol=1e-6)
    )


def test_xformers_backend_hands_the_branch_the_frozen_query(stand_in_xformers):
    attn = _attention()
    processor = ResTunerAttnProcessor(XFormersAttnProcessor(), "blocks.0.attn")
    attn.set_processor(processor)
    seen = []

    class Recording(nn.Module):
        def forward(self, x, context, frozen):
            seen.append(frozen)
            return x * 2.0

    processor.bank.add("rec", Recording(), 0.5, "parallel")
    hidden = seeded(2, TOKENS, DIM, seed=3)
    with torch.no_grad():
        out = attn(hidden)
        reference = XFormersAttnProcessor()(attn, hidden)
    torch.testing.assert_close(out, reference + hidden, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(seen[0].query, attn.to_q(hidden), rtol=0, atol=0)
