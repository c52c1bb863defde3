"""Pins of GLoRA's configuration layer and module bookkeeping (``tuners/glora.py``): which override decides a
layer, the choice space a supernet holds, the state dict a sub-network is cut into, what the module reports, and
the checks that refuse a bad configuration with a message naming it. The math itself is pinned by
``test_glora_math.py`` / ``test_reference_tuners.py``.
"""

from __future__ import annotations

import pytest
import torch

from resattn_diffusion.tuners.base import ConfigError, OpShape
from resattn_diffusion.tuners.glora import (
    GLoRA,
    GLoRALayerConfig,
    GLoRAParams,
    canonical_form_choices,
    form_size_key,
    format_form_choices,
    largest_forms,
    num_parameters,
    override_matches,
    paper_form_choices,
    parse_form,
    parse_form_choices,
)


def _shape(d_in: int, d_out: int) -> OpShape:
    return OpShape(in_dim=d_in, out_dim=d_out, context_dim=d_in)


def _randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
    return module


# --- forms and choice spaces -------------------------------------------------------------------------------------


def test_parse_form_reads_case_spaces_and_default_rank() -> None:
    assert parse_form("A", " LoRA12 ") == "lora12"
    assert parse_form("C", "lora", default_rank=3) == "lora3"
    assert parse_form("B", "lora1") == "lora1"
    assert parse_form("E", " Scalar") == "scalar"
    assert parse_form("D", "NONE") == "none"
    assert str(GLoRALayerConfig.parse(" A=vector ,, , b=scalar,")) == "A=vector,B=scalar,C=none,D=none,E=none"
    assert GLoRALayerConfig.parse("A=lora,C=lora2", default_rank=3) == GLoRALayerConfig(A="lora3", C="lora2")
    with pytest.raises(ConfigError, match=r"unknown GLoRA support tensor 'F'.*\['A', 'B', 'C', 'D', 'E'\]"):
        parse_form("F", "vector")
    with pytest.raises(ConfigError, match="rank must be >= 1"):
        parse_form("A", "lora", default_rank=0)
    with pytest.raises(ConfigError, match="E may be one of: vector, scalar, none"):
        parse_form("E", "lora", default_rank=4)


def test_paper_choices_and_their_largest_forms() -> None:
    assert paper_form_choices(8) == {
        "A": ("lora8", "lora4", "vector", "scalar", "none"),
        "B": ("lora8", "lora4", "vector", "scalar", "none"),
        "C": ("lora8", "lora4", "vector", "none"),
        "D": ("vector", "scalar", "none"),
        "E": ("vector", "scalar", "none"),
    }
    # rank 1: r/2 = 0 is no rank; rank 3: 3 and 1
    assert paper_form_choices(1)["A"] == ("lora1", "vector", "scalar", "none")
    assert paper_form_choices(3)["C"] == ("lora3", "lora1", "vector", "none")
    assert str(largest_forms(paper_form_choices(6))) == "A=lora6,B=lora6,C=lora6,D=vector,E=vector"
    # the order: none < scalar < vector < lora by rank, whatever order the forms are listed in
    forms = ["lora2", "none", "lora10", "vector", "scalar", "lora3"]
    assert sorted(forms, key=form_size_key) == ["none", "scalar", "vector", "lora2", "lora3", "lora10"]
    choices = parse_form_choices("A=scalar|vector,B=none|scalar,C=vector|lora2,D=scalar,E=none|vector")
    assert str(largest_forms(choices)) == "A=vector,B=scalar,C=lora2,D=scalar,E=vector"


def test_choice_strings_parse_to_canonical_deduplicated_forms_and_back() -> None:
    choices = parse_form_choices(" a = LoRA | lora4 | Vector || , c = none ", default_rank=4)
    assert choices == {"A": ("lora4", "vector"), "B": ("none",), "C": ("none",), "D": ("none",), "E": ("none",)}
    text = format_form_choices(choices)
    assert text == "A=lora4|vector,B=none,C=none,D=none,E=none"
    assert parse_form_choices(text) == choices
    assert canonical_form_choices("D", "Scalar") == ("scalar",)
    assert canonical_form_choices("B", ("lora", "vector", "lora2"), default_rank=2) == ("lora2", "vector")
    with pytest.raises(ConfigError, match="B needs at least one form"):
        canonical_form_choices("B", ())
    with pytest.raises(ConfigError, match="B needs at least one form"):
        parse_form_choices("B=|")
    assert GLoRAParams(rank=2).form_choices() == paper_form_choices(2)
    assert GLoRAParams(rank=2, choices="  ").form_choices() == paper_form_choices(2)
    assert GLoRAParams(rank=6, choices="A=lora|none").form_choices()["A"] == ("lora6", "none")


def test_parameter_counts_per_form() -> None:
    d_out, d_in = 7, 11
    assert num_parameters("A=lora3", d_out, d_in) == 3 * (d_out + d_in)
    assert num_parameters("B=vector", d_out, d_in) == d_out
    assert num_parameters("B=scalar", d_out, d_in) == 1
    assert num_parameters("C=lora2", d_out, d_in) == 2 * (d_in + 1)
    assert num_parameters("C=vector", d_out, d_in) == d_in
    assert num_parameters("D=vector", d_out, d_in) == d_out
    assert num_parameters("D=vector", d_out, d_in, has_bias=False) == 0
    assert num_parameters("E=scalar,D=scalar", d_out, d_in, has_bias=False) == 1
    assert num_parameters(GLoRALayerConfig(), d_out, d_in) == 0


# --- overrides -----------------------------------------------------------------------------------------------------


def test_override_patterns_match_the_path_or_a_parent() -> None:
    assert override_matches("up_blocks.1", "up_blocks.1.attentions.0.attn2.to_k")
    assert override_matches("*.attn1", "down_blocks.0.attentions.0.attn1.to_q")
    assert override_matches("up_blocks.1.attentions.0.attn2.to_k", "up_blocks.1.attentions.0.attn2.to_k")
    assert not override_matches("up_blocks.1", "up_blocks.10.attn1.to_q")
    assert not override_matches("*.attn1", "down_blocks.0.attentions.0.attn2.to_q")
    assert not override_matches("UP_blocks.1", "up_blocks.1.attn1.to_q")  # case-sensitive


def test_the_most_specific_override_decides_a_layer() -> None:
    path = "up_blocks.1.attentions.0.attn2.to_k"
    overrides = {
        "*.to_k": "A=vector",
        "up_blocks.*": "A=scalar",  # 10 literal characters, more than "*.to_k"'s 5
        "up_blocks.1": "B=vector",  # 11: wins among the wildcard-free parents ... unless an exact path is given
        "*[0-9].attn2.to_k": "E=scalar",  # a set counts as one literal: 1 + 11 = 12 beats "up_blocks.1"
    }
    params = GLoRAParams(overrides=overrides)
    assert params.matching_override(path) == "*[0-9].attn2.to_k"
    assert str(params.for_layer(path).config) == "E=scalar"
    params = GLoRAParams(overrides={**overrides, path: "C=vector", "up_blocks.1.attentions.0.attn2.to_k*": "D=scalar"})
    assert params.matching_override(path) == path  # an exact path first, even with fewer literal characters
    # equal specificity: the one listed last wins
    tied = GLoRAParams(overrides={"*.attn2.to_k": "A=vector", "up_blocks.1*": "A=scalar"})
    assert tied.matching_override(path) == "up_blocks.1*"
    tied = GLoRAParams(overrides={"up_blocks.1*": "A=scalar", "*.attn2.to_k": "A=vector"})
    assert tied.matching_override(path) == "*.attn2.to_k"
    assert GLoRAParams(overrides={"down_blocks.*": "A=vector"}).matching_override(path) is None
    # a pattern that does not match is skipped, whatever comes after it
    assert (
        GLoRAParams(overrides={"down_blocks.*": "A=vector", "*.to_k": "A=scalar"}).matching_override(path) == "*.to_k"
    )
    # a [set] is one literal character: "up_blocks.[0123456789]" (11) loses to "up_blocks.1.attentions" (22)
    sets = GLoRAParams(overrides={"up_blocks.1.attentions": "A=vector", "up_blocks.[0123456789]": "A=scalar"})
    assert sets.matching_override(path) == "up_blocks.1.attentions"


def test_for_layer_gives_the_winning_configuration_and_no_overrides() -> None:
    params = GLoRAParams(rank=2, config="A=vector", overrides={"*.attn2.to_k": "A=lora,B=vector"})
    layer = params.for_layer("mid_block.attentions.0.attn2.to_k")
    assert layer.config == "A=lora,B=vector" and layer.overrides == {} and layer.rank == 2
    assert str(layer.layer_config()) == "A=lora2,B=vector,C=none,D=none,E=none"
    other = params.for_layer("mid_block.attentions.0.attn1.to_k")
    assert other.config == "A=vector" and other.overrides == {}
    assert params.overrides == {"*.attn2.to_k": "A=lora,B=vector"}  # the original is not changed
    supernet = GLoRAParams(supernet=True, overrides={"*": "A=vector"})
    assert supernet.for_layer("anything") is supernet
    plain = GLoRAParams()
    assert plain.for_layer("anything") is plain


def test_validate_layers_names_a_pattern_that_matches_nothing() -> None:
    paths = ["down_blocks.0.attn1.to_q", "up_blocks.1.attn2.to_k"]
    GLoRAParams(overrides={"up_blocks.1": "A=vector", "*.to_q": "A=scalar"}).validate_layers(paths)
    with pytest.raises(ConfigError, match=r"'\*.to_v' matches none of the 2 layers .*'down_blocks.0.attn1.to_q'"):
        GLoRAParams(overrides={"up_blocks.1": "A=vector", "*.to_v": "A=scalar"}).validate_layers(paths)
    with pytest.raises(ConfigError, match=r"matches none of the 0 layers .*\(none\)"):
        GLoRAParams(overrides={"*.to_v": "A=scalar"}).validate_layers([])
    GLoRAParams(supernet=True, overrides={"*.to_v": "A=scalar"}).validate_layers(paths)  # unused by a supernet


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rank": True}, "rank must be a positive integer"),
        ({"rank": 2.0}, "rank must be a positive integer"),
        ({"config": "A=matrix"}, "A may be one of"),
        ({"overrides": ["*.to_k"]}, "overrides must be a mapping.*got list"),
        ({"overrides": {"": "A=vector"}}, "patterns must be non-empty strings"),
        ({"overrides": {3: "A=vector"}}, "patterns must be non-empty strings, got 3"),
        ({"overrides": {"*.to_k": "A=lora0"}}, r"override '\*.to_k': GLoRA A='lora0'.*>= 1"),
        ({"supernet": "yes"}, "supernet must be true or false"),
        ({"choices": "C=scalar"}, "C may be one of"),
    ],
)
def test_params_refuse_bad_values_by_name(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        GLoRAParams(**kwargs).validate()


def test_lora_ranks_are_checked_against_the_layer() -> None:
    GLoRAParams(config="A=lora8,B=lora8").validate_for(_shape(8, 16))  # rank == min(d_in, d_out): allowed
    with pytest.raises(ConfigError, match=r"B=lora9 exceeds min\(d_in, d_out\) = 8 of a 16 -> 8 layer"):
        GLoRAParams(config="B=lora9").validate_for(_shape(16, 8))
    GLoRAParams(config="C=lora20").validate_for(_shape(4, 4))  # C is a column: not limited
    with pytest.raises(ConfigError, match="positive in_dim and out_dim, got 0 -> 4"):
        GLoRAParams().validate_for(_shape(0, 4))
    with pytest.raises(ConfigError, match="positive in_dim and out_dim, got 4 -> 0"):
        GLoRAParams(config="A=vector").validate_for(_shape(4, 0))
    one = GLoRA(_shape(1, 1), GLoRAParams(config="A=lora1,B=vector,C=lora1,D=scalar,E=vector"))  # the smallest layer
    assert one(torch.ones(2, 1), torch.ones(1, 1), torch.ones(1)).shape == (2, 1)
    GLoRAParams(supernet=True, rank=4).validate_for(_shape(4, 4))
    with pytest.raises(ConfigError, match="the choice space: A=lora5"):
        GLoRAParams(supernet=True, rank=5).validate_for(_shape(4, 4))
    # overrides are checked by the module built for the layer they match
    GLoRAParams(config="A=vector", overrides={"*": "A=lora9"}).validate_for(_shape(4, 4))
    with pytest.raises(ConfigError, match="layer configuration A=lora9"):
        GLoRA(_shape(4, 4), GLoRAParams(config="A=vector"), layer_config="A=lora9")


# --- the module's bookkeeping ------------------------------------------------------------------------------------


def test_a_fixed_module_holds_exactly_its_configuration() -> None:
    module = GLoRA(_shape(6, 5), GLoRAParams(config="A=lora2,B=scalar,C=vector,D=vector,E=scalar"))
    shapes = {name: tuple(p.shape) for name, p in module.named_parameters()}
    assert shapes == {
        "A_lora_up": (5, 2),
        "A_lora_down": (2, 6),
        "B_scalar": (1,),
        "C_vector": (6,),
        "D_vector": (5,),
        "E_scalar": (1,),
    }
    assert module.describe_held() == "A: lora<=2|none, B: scalar|none, C: vector|none, D: vector|none, E: scalar|none"
    assert repr(module).startswith("GLoRA(d_out=5, d_in=6, fixed, active=A=lora2,B=scalar,C=vector,D=vector,E=scalar")
    # the zero factors and the random ones (exactly one zero factor per product)
    assert torch.count_nonzero(module.A_lora_up) == 0 and torch.count_nonzero(module.A_lora_down) == 12
    assert all(torch.count_nonzero(p) == 0 for n, p in module.named_parameters() if n != "A_lora_down")
    c_lora = GLoRA(_shape(6, 5), GLoRAParams(config="C=lora3"))
    assert tuple(c_lora.C_lora_up.shape) == (6, 3) and tuple(c_lora.C_lora_down.shape) == (3, 1)
    assert torch.count_nonzero(c_lora.C_lora_down) == 3
    # a layer given by the integration overrides params.config; no bias drops D
    override = GLoRA(
        _shape(6, 5), GLoRAParams(rank=3, config="A=vector"), layer_config="B=lora,D=scalar", has_bias=False
    )
    assert str(override.active_config) == "A=none,B=lora3,C=none,D=none,E=none"
    assert sorted(n for n, _ in override.named_parameters()) == ["B_lora_down", "B_lora_up"]
    assert GLoRA(_shape(6, 5), GLoRAParams(config="D=scalar")).has_bias is True  # the shape's default
    assert GLoRA(_shape(6, 5), GLoRAParams(config="D=scalar"), has_bias=False).has_bias is False


def test_a_supernet_serves_every_configuration_its_held_forms_cover() -> None:
    supernet = GLoRA(_shape(8, 6), GLoRAParams(supernet=True, choices="A=lora4|scalar,B=vector|none,E=scalar"))
    assert "supernet over A=lora4|scalar,B=vector|none,C=none,D=none,E=scalar" in repr(supernet)
    assert str(supernet.active_config) == "A=lora4,B=vector,C=none,D=none,E=scalar"
    assert supernet.describe_held() == "A: lora<=4|scalar|none, B: vector|none, C: none, D: none, E: scalar|none"
    assert supernet.can_serve(GLoRALayerConfig(A="lora3", E="scalar"))
    assert supernet.can_serve(GLoRALayerConfig(A="lora4"))
    assert not supernet.can_serve(GLoRALayerConfig(A="lora5"))
    assert not supernet.can_serve(GLoRALayerConfig(A="vector"))
    assert not supernet.can_serve(GLoRALayerConfig(B="scalar"))
    assert not supernet.can_serve(GLoRALayerConfig(C="vector"))
    assert not supernet.can_serve(GLoRALayerConfig(B="lora1"))
    supernet.set_active("A=lora2")
    assert supernet.num_active_parameters() == 2 * (6 + 8)
    before = supernet.active_config
    with pytest.raises(ConfigError, match=r"cannot evaluate A=none,B=scalar.*holds A: lora<=4\|scalar\|none"):
        supernet.set_active("B=scalar")
    assert supernet.active_config == before  # a refused configuration changes nothing


def test_fixed_state_dict_cuts_detached_copies_of_the_sub_network() -> None:
    supernet = _randomize(GLoRA(_shape(8, 6), GLoRAParams(supernet=True, rank=4)))
    state = supernet.fixed_state_dict("A=lora2,B=scalar,C=lora1,D=vector")
    assert sorted(state) == ["A_lora_down", "A_lora_up", "B_scalar", "C_lora_down", "C_lora_up", "D_vector"]
    assert torch.equal(state["A_lora_up"], supernet.A_lora_up[:, :2])
    assert torch.equal(state["A_lora_down"], supernet.A_lora_down[:2])
    assert torch.equal(state["C_lora_up"], supernet.C_lora_up[:, :1])
    assert torch.equal(state["C_lora_down"], supernet.C_lora_down[:1])
    assert torch.equal(state["B_scalar"], supernet.B_scalar) and torch.equal(state["D_vector"], supernet.D_vector)
    assert all(not t.requires_grad for t in state.values())
    state["B_scalar"].add_(1.0)
    assert not torch.equal(state["B_scalar"], supernet.B_scalar)  # a copy, not a view
    # the default is the active configuration; a bias-free layer drops D
    supernet.set_active("E=vector")
    assert sorted(supernet.fixed_state_dict()) == ["E_vector"]
    bias_free = GLoRA(_shape(8, 6), GLoRAParams(supernet=True, rank=4), has_bias=False)
    assert sorted(bias_free.fixed_state_dict("A=vector,D=vector")) == ["A_vector"]
    with pytest.raises(ConfigError, match="cannot evaluate"):
        supernet.fixed_state_dict("A=lora8")


def test_forward_and_fold_keep_the_input_and_weight_dtypes() -> None:
    module = _randomize(GLoRA(_shape(6, 5), GLoRAParams(config="A=scalar,B=lora2,C=vector,E=vector")))
    weight = torch.randn(5, 6, dtype=torch.float64)
    bias = torch.randn(5, dtype=torch.float64)
    x = torch.randn(3, 6, dtype=torch.float64)
    out = module(x, weight, bias)
    assert out.dtype == torch.float64
    delta_weight, delta_bias = module.fold(weight, bias)
    assert delta_weight.dtype == delta_bias.dtype == torch.float64
    # the fold computes in the wider dtype: exact against the float64 forward
    torch.testing.assert_close(x @ delta_weight.T + delta_bias, out, rtol=1e-12, atol=1e-12)
    half = module.fold(weight.half(), bias.half())
    assert half[0].dtype == half[1].dtype == torch.float16
    # nothing active: zeros of the output's shape, and a zero fold without bias
    empty = GLoRA(_shape(6, 5), GLoRAParams(config="A=none,B=none,C=none,D=none,E=none"))
    assert torch.equal(empty(x, weight, bias), torch.zeros(3, 5, dtype=torch.float64))
    zero_weight, no_bias = empty.fold(weight, bias)
    assert torch.equal(zero_weight, torch.zeros_like(weight)) and no_bias is None


@pytest.mark.parametrize(
    "config", ["A=vector,B=scalar,E=vector", "A=scalar,B=lora2,C=vector", "A=lora2,B=vector,D=scalar"]
)
def test_half_precision_activations_give_half_outputs_close_to_float64(config: str) -> None:
    """float32 parameters beside a float16 layer: the branch runs and returns float16 (the dtype the frozen layer's
    output has, so the two add without promoting the UNet's activations)."""
    module = _randomize(GLoRA(_shape(6, 5), GLoRAParams(config=config)))
    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(5, 6, generator=generator).half()
    bias = torch.randn(5, generator=generator).half()
    x = torch.randn(3, 6, generator=generator).half()
    out = module(x, weight, bias)
    assert out.dtype == torch.float16
    expected = module.double()(x.double(), weight.double(), bias.double())
    torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("weight_dtype", [torch.float16, torch.bfloat16])
def test_fold_of_half_weights_runs_in_the_parameters_float32_then_rounds_once(weight_dtype) -> None:
    # the documented order: W0 ⊙ A + B (and b0 ⊙ D + E + W0 C) in the wider dtype, one rounding to the weight's at
    # the end; summing in half precision would round every term
    shape = OpShape(in_dim=24, out_dim=16, context_dim=24, has_bias=True)
    glora = _randomize(GLoRA(shape, GLoRAParams(config="A=lora4,B=lora4,C=lora4,D=vector,E=vector")), seed=3)
    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(16, 24, generator=generator).to(weight_dtype)
    bias = torch.randn(16, generator=generator).to(weight_dtype)
    delta_w, delta_b = glora.fold(weight, bias)
    wide_w, wide_b = glora.fold(weight.float(), bias.float())
    assert delta_w.dtype == delta_b.dtype == weight_dtype
    assert torch.equal(delta_w, wide_w.to(weight_dtype)) and torch.equal(delta_b, wide_b.to(weight_dtype))


def test_an_assignment_with_two_equals_signs_names_the_form_and_a_rank_too_high_names_the_config() -> None:
    with pytest.raises(ConfigError, match=r"GLoRA A='lora4=vector' is not allowed; A may be one of"):
        GLoRALayerConfig.parse("A=lora4=vector")
    with pytest.raises(ConfigError, match=r"GLoRA config: A=lora9 exceeds min\(d_in, d_out\) = 8 of a 8 -> 16 layer"):
        GLoRAParams(config="A=lora9").validate_for(_shape(8, 16))


def test_a_character_set_counts_as_one_literal_character_of_an_override() -> None:
    # "*.attn1.to_[qk]": 10 literal characters (".attn1.to_" and the set); "*.attn1.to_q": 11, so it wins
    params = GLoRAParams(overrides={"*.attn1.to_[qk]": "A=vector", "*.attn1.to_q": "A=scalar"})
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert params.matching_override(path) == "*.attn1.to_q"
    assert params.matching_override(path.replace("to_q", "to_k")) == "*.attn1.to_[qk]"


def test_a_configuration_item_without_equals_names_the_configuration() -> None:
    with pytest.raises(ConfigError, match=r"GLoRA configuration item 'A' has no '='"):
        GLoRALayerConfig.parse("A")
