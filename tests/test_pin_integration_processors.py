"""The attention processors against diffusers' own, and what they hand the branches (issue 18, mutation pins).

``ResTunerAttnProcessor`` recomputes the stock SDPA attention itself (to share the frozen query with the branches)
or wraps any other processor; ``ResTunerJointAttnProcessor`` wraps SD3's / Flux's. Here, on bare diffusers
``Attention`` modules in float64 and on the tiny transformers: the frozen output equals diffusers' processor for
every option of the attention (cross-attention norm, qk-norm, group norm, mask, residual, output rescale), and a
recording branch sees exactly the input, context, frozen projections and query it should, at the scale asked.
"""

from __future__ import annotations

import types

import pytest
import torch
from diffusers.models.attention_processor import (
    Attention,
    AttnProcessor,
    AttnProcessor2_0,
    SlicedAttnProcessor,
)
from reference_math import seeded
from torch import nn

import resattn_diffusion as rd
from resattn_diffusion.integration.processors import ResTunerAttnProcessor, ResTunerJointAttnProcessor
from resattn_diffusion.testing import frozen_tiny_model

DIM, CONTEXT_DIM, HEADS, TOKENS, CONTEXT_TOKENS = 16, 12, 2, 6, 5


class RecordingBranch(nn.Module):
    """A branch ``T(x, c) = x M (+ mean of c)`` that records what the bank gives it, so both a wrong input and a wrong
    context change the output, and the test can inspect the frozen pieces it was handed."""

    def __init__(self, in_dim: int, out_dim: int, seed: int = 1):
        super().__init__()
        self.weight = nn.Parameter(seeded(in_dim, out_dim, seed=seed))
        self.calls: list[tuple[torch.Tensor, torch.Tensor | None, object]] = []

    def forward(self, x: torch.Tensor, context: torch.Tensor | None, frozen) -> torch.Tensor:
        self.calls.append((x, context, frozen))
        out = x @ self.weight
        return out if context is None else out + context.mean()


def attention(**options) -> Attention:
    torch.manual_seed(0)
    attn = Attention(query_dim=DIM, heads=HEADS, dim_head=DIM // HEADS, **options).to(torch.float64).eval()
    with torch.no_grad():  # non-trivial norms: a skipped or swapped norm must show
        for name, parameter in attn.named_parameters():
            if "norm" in name:
                parameter.copy_(seeded(*parameter.shape, seed=len(name)) * 0.3 + 1.0)
    return attn


CASES = {
    "self": ({}, False, False),
    "cross": ({"cross_attention_dim": CONTEXT_DIM}, True, False),
    "cross_layer_norm": ({"cross_attention_dim": CONTEXT_DIM, "cross_attention_norm": "layer_norm"}, True, False),
    "qk_layer_norm": ({"qk_norm": "layer_norm"}, False, False),
    "qk_rms_norm_cross": ({"qk_norm": "rms_norm", "cross_attention_dim": CONTEXT_DIM}, True, False),
    "cross_masked": ({"cross_attention_dim": CONTEXT_DIM}, True, True),
    "self_masked": ({}, False, True),
    "self_masked_per_query": ({}, False, "per_query"),
    "group_norm_residual_rescaled": (
        {"norm_num_groups": 4, "residual_connection": True, "rescale_output_factor": 2.0},
        False,
        False,
    ),
}


def inputs(cross: bool, masked: bool | str) -> dict[str, torch.Tensor | None]:
    context = seeded(2, CONTEXT_TOKENS, CONTEXT_DIM, seed=4) if cross else None
    mask = None
    if masked:  # diffusers' additive mask over the keys; the second example sees only its first two keys
        keys = CONTEXT_TOKENS if cross else TOKENS
        # one row for every query (diffusers' processors accept (B, N, keys) too), else one for all of them
        mask = torch.zeros(2, TOKENS if masked == "per_query" else 1, keys, dtype=torch.float64)
        mask[1, :, 2:] = -10000.0
        if masked == "per_query":
            mask[0, 1:, :1] = -10000.0  # the first example's later queries do not see its first key
    return {"encoder_hidden_states": context, "attention_mask": mask}


def expected_context(attn: Attention, context: torch.Tensor | None) -> torch.Tensor | None:
    if context is None:
        return None
    return attn.norm_encoder_hidden_states(context) if attn.norm_cross else context


@pytest.mark.parametrize("stock", [AttnProcessor2_0, AttnProcessor], ids=["inline_sdpa", "wrapped"])
@pytest.mark.parametrize("case", list(CASES))
def test_frozen_attention_is_diffusers_own_and_the_branch_reads_what_it_should(case, stock):
    options, cross, masked = CASES[case]
    attn = attention(**options)
    kwargs = inputs(cross, masked)
    hidden = seeded(2, TOKENS, DIM, seed=3)
    with torch.no_grad():
        reference = stock()(attn, hidden, **kwargs)
        processor = ResTunerAttnProcessor(stock(), "blocks.0.attn")
        assert processor.backend == ("sdpa" if stock is AttnProcessor2_0 else "wrapped")
        attn.set_processor(processor)
        torch.testing.assert_close(attn(hidden, **kwargs), reference, rtol=1e-12, atol=1e-12)  # empty bank

        branch = RecordingBranch(DIM, DIM)
        processor.bank.add("rec", branch, 0.5, "parallel")
        tuned = attn(hidden, **kwargs)
    context = expected_context(attn, kwargs["encoder_hidden_states"])
    expected = reference + 0.5 * (hidden @ branch.weight + (0.0 if context is None else context.mean()))
    torch.testing.assert_close(tuned, expected, rtol=1e-12, atol=1e-12)

    ((x, seen_context, frozen),) = branch.calls
    assert torch.equal(x, hidden)
    if context is None:
        assert seen_context is None
    else:
        torch.testing.assert_close(seen_context, context, rtol=0, atol=0)
    assert frozen.to_q is attn.to_q and frozen.to_k is attn.to_k and frozen.to_v is attn.to_v
    assert frozen.out_weight is attn.to_out[0].weight and frozen.heads == HEADS
    # the query is shared only when computed inline from the branch's own input (no group norm in between)
    if stock is AttnProcessor2_0 and attn.group_norm is None:
        torch.testing.assert_close(frozen.query, attn.to_q(hidden), rtol=0, atol=0)
    else:
        assert frozen.query is None


@pytest.mark.parametrize("stock", [AttnProcessor2_0, AttnProcessor], ids=["inline_sdpa", "wrapped"])
def test_a_per_call_scale_on_the_attention_is_applied_and_checked(stock):
    attn = attention(cross_attention_dim=CONTEXT_DIM)
    kwargs = inputs(cross=True, masked=False)
    hidden = seeded(2, TOKENS, DIM, seed=3)
    processor = ResTunerAttnProcessor(stock(), "blocks.0.attn")
    attn.set_processor(processor)
    branch = RecordingBranch(DIM, DIM)
    processor.bank.add("rec", branch, 1.0, "parallel")
    with torch.no_grad():
        frozen = stock()(attn, hidden, **kwargs)
        one = attn(hidden, **kwargs)
        assert torch.equal(attn(hidden, **kwargs, res_tuner_scale=0.0), frozen)
        torch.testing.assert_close(attn(hidden, **kwargs, res_tuner_scale={"rec": 3.0}) - frozen, 3 * (one - frozen))
        with pytest.raises(rd.ConfigError, match="res_tuner_scale"):
            attn(hidden, **kwargs, res_tuner_scale=float("nan"))
        # the bank reads a dict; another mapping was a raw TypeError inside the branch
        with pytest.raises(rd.ConfigError, match=r"one number or a dict .* got a mappingproxy: pass dict"):
            attn(hidden, **kwargs, res_tuner_scale=types.MappingProxyType({"rec": 3.0}))
    assert processor.bank.call_scale is None  # a per-call scale is an argument, never left behind as state


class RecordingProcessor(AttnProcessor):
    """diffusers' classic processor, recording the keyword arguments it is called with."""

    def __init__(self):
        super().__init__()
        self.kwargs: list[dict] = []

    def __call__(self, attn, hidden_states, **kwargs):
        self.kwargs.append(dict(kwargs))
        return super().__call__(attn, hidden_states, **kwargs)


def test_the_wrapped_processor_gets_temb_only_when_given_and_a_sliced_one_runs_unchanged():
    attn = attention(cross_attention_dim=CONTEXT_DIM)
    kwargs = inputs(cross=True, masked=True)
    hidden = seeded(2, TOKENS, DIM, seed=3)
    base = RecordingProcessor()
    attn.set_processor(ResTunerAttnProcessor(base, "blocks.0.attn"))
    with torch.no_grad():
        attn(hidden, **kwargs)
        temb = seeded(2, 4, seed=5)
        attn.processor(attn, hidden, temb=temb, **kwargs)
    assert "temb" not in base.kwargs[0]
    assert base.kwargs[1]["temb"] is temb
    assert base.kwargs[1]["encoder_hidden_states"] is kwargs["encoder_hidden_states"]
    assert base.kwargs[1]["attention_mask"] is kwargs["attention_mask"]

    sliced = attention(cross_attention_dim=CONTEXT_DIM, cross_attention_norm="layer_norm")
    with torch.no_grad():
        reference = SlicedAttnProcessor(slice_size=1)(sliced, hidden, **kwargs)
        sliced.set_processor(ResTunerAttnProcessor(SlicedAttnProcessor(slice_size=1), "blocks.0.attn"))
        torch.testing.assert_close(sliced(hidden, **kwargs), reference, rtol=0, atol=0)
        # a processor whose __call__ names no temb is not handed one (it raised a TypeError)
        torch.testing.assert_close(sliced.processor(sliced, hidden, temb=temb, **kwargs), reference, rtol=0, atol=0)


# --- the joint attention of SD3 / SD3.5 / Flux --------------------------------------------------------------------
def _per_head(linear: nn.Module, norm: nn.Module | None, heads: int, x: torch.Tensor) -> torch.Tensor:
    out = linear(x)
    return out if norm is None else norm(out.unflatten(-1, (heads, -1))).flatten(-2)


def _joint_case(kind: str, path: str):
    model = frozen_tiny_model(kind).to(torch.float64)
    attn = model.get_submodule(path)
    processor = attn.processor
    joint = ResTunerJointAttnProcessor(processor, path)
    attn.set_processor(joint)
    branch = RecordingBranch(16, 16, seed=2)
    joint.bank.add("rec", branch, 0.25, "parallel")
    return model, attn, processor, joint, branch


def _rotary(model, kind: str, text_tokens: int, image_tokens: int) -> dict:
    if kind != "flux":
        return {}
    ids = torch.zeros(text_tokens + image_tokens, 3, dtype=torch.float64)
    ids[text_tokens:, 1] = torch.arange(image_tokens, dtype=torch.float64)
    return {"image_rotary_emb": model.pos_embed(ids)}


@pytest.mark.parametrize(
    "kind,path",
    [
        ("sd3", "transformer_blocks.0.attn"),
        ("sd35", "transformer_blocks.0.attn"),
        ("flux", "transformer_blocks.0.attn"),
    ],
)
def test_joint_attention_hands_the_branch_the_normed_frozen_projections_of_both_streams(kind, path):
    model, attn, stock, _, branch = _joint_case(kind, path)
    image, text = seeded(2, 16, 16, seed=6), seeded(2, 7, 16, seed=7)
    extra = _rotary(model, kind, 7, 16)
    with torch.no_grad():
        frozen_image, frozen_text = stock(attn, image, text, None, **extra)
        tuned_image, tuned_text = attn(image, text, **extra)
        scaled_image, _ = attn(image, text, res_tuner_scale=2.0, **extra)
    assert torch.equal(tuned_text, frozen_text)
    joint = torch.cat([text, image], dim=1)
    branch_out = image @ branch.weight + joint.mean()
    torch.testing.assert_close(tuned_image, frozen_image + 0.25 * branch_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(scaled_image, frozen_image + 2.0 * branch_out, rtol=1e-12, atol=1e-12)

    x, context, frozen = branch.calls[0]
    assert torch.equal(x, image) and torch.equal(context, joint)
    heads = attn.heads
    with torch.no_grad():
        torch.testing.assert_close(frozen.to_q(image), _per_head(attn.to_q, attn.norm_q, heads, image))
        # prompt tokens stand in for text: the text stream's key projection and its qk-norm
        torch.testing.assert_close(frozen.to_k(text), _per_head(attn.add_k_proj, attn.norm_added_k, heads, text))
        torch.testing.assert_close(frozen.to_v(text), attn.add_v_proj(text))
    assert frozen.out_weight is attn.to_out[0].weight and frozen.heads == heads and frozen.query is None


@pytest.mark.parametrize(
    "kind,path", [("flux", "single_transformer_blocks.0.attn"), ("sd35", "transformer_blocks.0.attn2")]
)
def test_one_sequence_attention_gives_a_self_attention_branch(kind, path):
    model, attn, stock, _, branch = _joint_case(kind, path)
    tokens = seeded(2, 9, 16, seed=8)
    extra = _rotary(model, kind, 0, 9)
    with torch.no_grad():
        frozen_out = stock(attn, tokens, None, None, **extra)
        tuned = attn(tokens, **extra)
        scaled = attn(tokens, res_tuner_scale=2.0, **extra)  # a per-call scale reaches this path too
    torch.testing.assert_close(tuned, frozen_out + 0.25 * (tokens @ branch.weight), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(scaled, frozen_out + 2.0 * (tokens @ branch.weight), rtol=1e-12, atol=1e-12)
    x, context, frozen = branch.calls[0]
    assert torch.equal(x, tokens) and context is None
    heads = attn.heads
    with torch.no_grad():
        torch.testing.assert_close(frozen.to_q(tokens), _per_head(attn.to_q, attn.norm_q, heads, tokens))
        torch.testing.assert_close(frozen.to_k(tokens), _per_head(attn.to_k, attn.norm_k, heads, tokens))
        torch.testing.assert_close(frozen.to_v(tokens), attn.to_v(tokens))
    to_out = getattr(attn, "to_out", None)
    if kind == "flux":  # pre_only: no output projection, the branch's attended values are its output (W_o = I)
        assert to_out is None and frozen.out_weight is None
    else:
        assert frozen.out_weight is to_out[0].weight


def test_joint_processor_with_an_empty_bank_returns_diffusers_output_itself():
    model = frozen_tiny_model("sd3").to(torch.float64)
    attn = model.transformer_blocks[0].attn
    stock = attn.processor
    attn.set_processor(ResTunerJointAttnProcessor(ResTunerJointAttnProcessor(stock, "a"), "a"))
    assert attn.processor.base_processor is stock and attn.processor.backend == "wrapped"
    image, text = seeded(2, 16, 16, seed=6), seeded(2, 7, 16, seed=7)
    with torch.no_grad():
        frozen_image, frozen_text = stock(attn, image, text, None)
        image_out, text_out = attn(image, text)
    assert torch.equal(image_out, frozen_image) and torch.equal(text_out, frozen_text)


def test_the_bank_runs_what_is_enabled_unfused_and_added_with_per_call_and_per_name_scales():
    attn = attention(cross_attention_dim=CONTEXT_DIM)
    kwargs = inputs(cross=True, masked=False)
    hidden = seeded(2, TOKENS, DIM, seed=3)
    processor = ResTunerAttnProcessor(AttnProcessor2_0(), "blocks.0.attn")
    attn.set_processor(processor)
    bank = processor.bank
    first, second = RecordingBranch(DIM, DIM, seed=1), RecordingBranch(DIM, DIM, seed=2)
    context = kwargs["encoder_hidden_states"]
    with torch.no_grad():
        frozen = attn(hidden, **kwargs)
        one = hidden @ first.weight + context.mean()
        two = hidden @ second.weight + context.mean()

        def run(**extra):
            return attn(hidden, **kwargs, **extra)

        bank.add("first", first, 1.0, "parallel")
        run()  # the list of branches is cached now: adding, removing or changing a setting must renew it
        bank.add("second", second, 0.5, "parallel")
        torch.testing.assert_close(run(), frozen + one + 0.5 * two)
        torch.testing.assert_close(run(res_tuner_scale={"second": 2.0}), frozen + one + 2.0 * two)  # first keeps 1
        torch.testing.assert_close(run(res_tuner_scale={"first": 0.0}), frozen + 0.5 * two)
        bank.settings["first"].enabled = False
        torch.testing.assert_close(run(), frozen + 0.5 * two)
        bank.settings["first"].enabled = True
        bank.settings["second"].scale = 0.0  # a branch at scale 0 is not computed at all
        calls = len(second.calls)
        torch.testing.assert_close(run(), frozen + one)
        assert len(second.calls) == calls
        torch.testing.assert_close(run(res_tuner_scale=3.0), frozen + 3.0 * one + 3.0 * two)  # a float: every tuner
        bank.settings["first"].fused = True  # a fused branch is in the weights, never run beside them
        torch.testing.assert_close(run(res_tuner_scale=1.0), frozen + two)
        bank.remove("first")
        bank.settings["second"].scale = 1.0
        torch.testing.assert_close(run(), frozen + two)
        bank.call_scale = 0.25  # what the model's pre-hook sets for one call
        torch.testing.assert_close(run(), frozen + 0.25 * two)


def test_a_sequential_branch_reads_the_attention_output_without_the_frozen_query():
    attn = attention(cross_attention_dim=CONTEXT_DIM)
    kwargs = inputs(cross=True, masked=False)
    hidden = seeded(2, TOKENS, DIM, seed=3)
    processor = ResTunerAttnProcessor(AttnProcessor2_0(), "blocks.0.attn")
    attn.set_processor(processor)
    parallel, sequential = RecordingBranch(DIM, DIM, seed=1), RecordingBranch(DIM, DIM, seed=2)
    processor.bank.add("par", parallel, 1.0, "parallel")
    processor.bank.add("seq", sequential, 0.5, "sequential")
    with torch.no_grad():
        frozen = AttnProcessor2_0()(attn, hidden, **kwargs)
        out = attn(hidden, **kwargs)
    context = kwargs["encoder_hidden_states"]
    expected = (
        frozen + (hidden @ parallel.weight + context.mean()) + 0.5 * (frozen @ sequential.weight + context.mean())
    )
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    ((_, _, par_frozen),) = parallel.calls
    ((x, seen_context, seq_frozen),) = sequential.calls
    torch.testing.assert_close(x, frozen, rtol=1e-12, atol=1e-12)
    assert torch.equal(seen_context, context)
    assert par_frozen.query is not None and seq_frozen.query is None
    assert seq_frozen.to_q is attn.to_q and seq_frozen.to_k is attn.to_k and seq_frozen.to_v is attn.to_v
    assert seq_frozen.out_weight is attn.to_out[0].weight and seq_frozen.heads == HEADS


def test_only_diffusers_stock_sdpa_processor_is_computed_inline():
    from diffusers.models.attention_processor import XFormersAttnProcessor

    from resattn_diffusion.integration import processors

    class CustomSdpa(AttnProcessor2_0):  # a subclass may change the computation: it is called, not reimplemented
        pass

    assert ResTunerAttnProcessor(AttnProcessor2_0(), "a").backend == "sdpa"
    assert ResTunerAttnProcessor(CustomSdpa(), "a").backend == "wrapped"
    assert ResTunerAttnProcessor(AttnProcessor(), "a").backend == "wrapped"
    if processors.xformers_ops is None:  # xformers absent (always on CPU): its processor is only ever wrapped
        assert ResTunerAttnProcessor(XFormersAttnProcessor(), "a").backend == "wrapped"
    wrapped = ResTunerAttnProcessor(ResTunerAttnProcessor(AttnProcessor2_0(), "a"), "a")  # never nested
    assert type(wrapped.base_processor) is AttnProcessor2_0 and wrapped.backend == "sdpa"
