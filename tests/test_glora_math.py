"""GLoRA math: configuration strings, parameter counts, the no-op init and its gradients, exact folding, supernet."""

from __future__ import annotations

import random

import pytest
import torch

from resattn_diffusion.search.glora_space import GLoRAChoiceSpace, sample_layer_config
from resattn_diffusion.tuners.base import ConfigError, OpShape
from resattn_diffusion.tuners.glora import (
    GLoRA,
    GLoRALayerConfig,
    GLoRAParams,
    format_layer_config,
    num_parameters,
    parse_layer_config,
)

EVERY_FORM_CONFIGS = [
    "A=lora4,B=lora4,C=lora2,D=vector,E=vector",
    "A=vector,B=vector,C=vector,D=scalar,E=scalar",
    "A=scalar,B=scalar,C=none,D=vector,E=scalar",
    "A=none,B=lora3,C=lora1,D=none,E=vector",
    "A=lora2,B=scalar,C=vector,D=scalar,E=none",
    "A=vector,B=lora2,C=none,D=none,E=none",
    "A=none,B=none,C=none,D=none,E=none",
    "A=lora4,B=none,C=none,D=none,E=none",
]

SHAPES = [(320, 320), (320, 768), (1280, 320), (17, 29)]  # (d_out, d_in)


def make_glora(d_out: int, d_in: int, config: str, has_bias: bool = True, **params) -> GLoRA:
    return GLoRA(
        OpShape(in_dim=d_in, out_dim=d_out, context_dim=d_in), GLoRAParams(config=config, **params), has_bias=has_bias
    )


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


def frozen_layer(d_out: int, d_in: int, has_bias: bool, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(d_out, d_in, generator=generator) / d_in**0.5
    bias = torch.randn(d_out, generator=generator) if has_bias else None
    return weight, bias


def reference_branch(module: GLoRA, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """T(x) = W' x + b' - (W0 x + b0) straight from the definition, every support tensor built as a full matrix."""
    d_out, d_in = weight.shape
    config = module.active_config

    def full(support: str, rows: int, cols: int) -> torch.Tensor:
        return full_in_float32(support, rows, cols).to(weight.dtype)

    def full_in_float32(support: str, rows: int, cols: int) -> torch.Tensor:
        kind, rank = config.form(support)
        if kind == "lora":
            return getattr(module, f"{support}_lora_up")[:, :rank] @ getattr(module, f"{support}_lora_down")[:rank]
        if kind == "vector":
            return getattr(module, f"{support}_vector").reshape(rows, 1).expand(rows, cols)
        if kind == "scalar":
            return getattr(module, f"{support}_scalar").reshape(1, 1).expand(rows, cols)
        return torch.zeros(rows, cols, dtype=weight.dtype)

    a, b = full("A", d_out, d_in), full("B", d_out, d_in)
    c = full("C", d_in, 1).reshape(d_in)
    d, e = full("D", d_out, 1).reshape(d_out), full("E", d_out, 1).reshape(d_out)
    b0 = torch.zeros(d_out, dtype=weight.dtype) if bias is None else bias
    new_weight = weight + weight * a + b
    new_bias = b0 + b0 * d + e + weight @ c
    return (x @ new_weight.T + new_bias) - (x @ weight.T + b0)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


# --- configuration strings ---------------------------------------------------------------------------------------


def test_config_string_round_trip():
    for text in EVERY_FORM_CONFIGS:
        config = parse_layer_config(text)
        assert format_layer_config(config) == text
        assert parse_layer_config(str(config)) == config
    loose = parse_layer_config(" b = LoRA8 , a=Vector, e=scalar ")
    assert str(loose) == "A=vector,B=lora8,C=none,D=none,E=scalar"
    assert parse_layer_config("A=lora,C=lora", default_rank=6) == GLoRALayerConfig(A="lora6", C="lora6")
    assert GLoRALayerConfig.parse("") == GLoRALayerConfig()


@pytest.mark.parametrize(
    "text, message",
    [
        ("C=scalar", "C may be one of: lora<r> (e.g. lora4), vector, none"),
        ("D=lora4", "D may be one of: vector, scalar, none"),
        ("A=lora", "give the rank"),
        ("A=lora0", "rank must be >= 1"),
        ("A=matrix", "A may be one of"),
        ("F=vector", "unknown support tensor 'F'"),
        ("A=vector,A=scalar", "A is given twice"),
        ("A vector", "has no '='"),
    ],
)
def test_config_string_errors(text, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_layer_config(text)


def test_layer_config_dataclass_validates_and_is_frozen():
    with pytest.raises(ConfigError, match="E may be one of"):
        GLoRALayerConfig(E="lora2")
    config = GLoRALayerConfig(A="LORA4")
    assert config.A == "lora4"
    with pytest.raises(AttributeError):
        config.A = "vector"  # type: ignore[misc]


def test_choice_space_round_trip_and_default():
    space = GLoRAChoiceSpace.default(8)
    assert str(space) == (
        "A=lora8|lora4|vector|scalar|none,B=lora8|lora4|vector|scalar|none,C=lora8|lora4|vector|none,"
        "D=vector|scalar|none,E=vector|scalar|none"
    )
    assert GLoRAChoiceSpace.parse(str(space)) == space
    assert space.size() == 5 * 5 * 4 * 3 * 3
    assert str(space.largest()) == "A=lora8,B=lora8,C=lora8,D=vector,E=vector"
    assert GLoRAChoiceSpace.parse("A=lora|none", default_rank=2).A == ("lora2", "none")
    with pytest.raises(ConfigError, match="C may be one of"):
        GLoRAChoiceSpace.parse("C=lora4|scalar")


def test_params_validation():
    params = GLoRAParams()
    params.validate()
    assert str(params.layer_config()) == "A=lora4,B=lora4,C=vector,D=scalar,E=vector"
    GLoRAParams(overrides={"*attn2.to_k": "A=vector,B=lora"}).validate()
    with pytest.raises(ConfigError, match=r"override '\*to_q': GLoRA C='scalar'"):
        GLoRAParams(overrides={"*to_q": "C=scalar"}).validate()
    with pytest.raises(ConfigError, match="rank must be a positive integer"):
        GLoRAParams(rank=0).validate()
    with pytest.raises(ConfigError, match="rank <= 8"):
        GLoRAParams(config="A=lora16").validate_for(OpShape(in_dim=8, out_dim=32, context_dim=8))
    with pytest.raises(ConfigError, match="choice space"):
        GLoRAParams(supernet=True, rank=64).validate_for(OpShape(in_dim=32, out_dim=32, context_dim=32))
    assert GLoRAParams(rank=2).to_dict()["config"] == "A=lora,B=lora,C=vector,D=scalar,E=vector"


# --- parameter counts --------------------------------------------------------------------------------------------


def test_parameter_count_formula():
    d_out, d_in = 16, 32
    config = "A=lora4,B=vector,C=lora2,D=scalar,E=vector"
    expected = 4 * (d_out + d_in) + d_out + 2 * (d_in + 1) + 1 + d_out
    assert num_parameters(config, d_out, d_in) == expected
    assert num_parameters(config, d_out, d_in, has_bias=False) == expected - 1
    assert num_parameters("A=scalar,B=scalar,C=vector,D=vector,E=scalar", d_out, d_in) == 1 + 1 + d_in + d_out + 1


def test_parameter_count_matches_modules():
    generator = random.Random(0)
    space = GLoRAChoiceSpace.default(4)
    for d_out, d_in in [(16, 32), (24, 8)]:
        for has_bias in (True, False):
            for _ in range(25):
                config = sample_layer_config(space, generator)
                module = make_glora(d_out, d_in, str(config), has_bias=has_bias)
                count = sum(parameter.numel() for parameter in module.parameters())
                assert count == num_parameters(config, d_out, d_in, has_bias) == module.num_active_parameters()


# --- init, gradients, folding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", EVERY_FORM_CONFIGS)
@pytest.mark.parametrize("has_bias", [True, False])
def test_identity_at_init(config, has_bias):
    module = make_glora(24, 40, config)
    weight, bias = frozen_layer(24, 40, has_bias)
    out = module(torch.randn(2, 5, 40), weight, bias)
    assert out.shape == (2, 5, 24)
    assert torch.equal(out, torch.zeros_like(out))
    delta_weight, delta_bias = module.fold(weight, bias)
    assert torch.equal(delta_weight, torch.zeros_like(weight))
    assert delta_bias is None or torch.equal(delta_bias, torch.zeros(24))


@pytest.mark.parametrize("d_out, d_in", SHAPES)
@pytest.mark.parametrize("has_bias", [True, False])
def test_forward_equals_definition_and_fold(d_out, d_in, has_bias):
    weight, bias = frozen_layer(d_out, d_in, has_bias)
    x = torch.randn(3, 7, d_in)
    for index, config in enumerate(EVERY_FORM_CONFIGS[:-2]):
        module = make_glora(d_out, d_in, config)
        randomize(module, seed=index)
        out = module(x, weight, bias)
        with torch.no_grad():
            expected = reference_branch(module, x.double(), weight.double(), None if bias is None else bias.double())
            delta_weight, delta_bias = module.fold(weight, bias)
            folded = x @ delta_weight.T + (0 if delta_bias is None else delta_bias)
        assert relative_error(out.double(), expected) < 1e-5, config
        assert relative_error(folded.double(), expected) < 1e-5, config


def test_fold_bias_is_none_only_without_bias_terms():
    weight, bias = frozen_layer(8, 8, has_bias=True)
    assert make_glora(8, 8, "A=lora2,B=vector").fold(weight, bias)[1] is None
    assert make_glora(8, 8, "A=lora2,D=vector").fold(weight, None)[1] is None
    assert make_glora(8, 8, "E=scalar").fold(weight, None)[1] is not None  # a bias-free layer gains a bias
    assert make_glora(8, 8, "C=vector").fold(weight, None)[1] is not None


def test_bias_free_layer_drops_d():
    module = make_glora(8, 12, "A=vector,D=vector,E=scalar", has_bias=False)
    assert not hasattr(module, "D_vector")
    assert module.active_config.D == "none"
    # D in a module built with has_bias=True does not crash on a bias-free call; it just contributes nothing
    with_d = make_glora(8, 12, "D=vector")
    randomize(with_d)
    weight, _ = frozen_layer(8, 12, has_bias=False)
    assert torch.equal(with_d(torch.randn(4, 12), weight, None), torch.zeros(4, 8))


@pytest.mark.parametrize(
    "config",
    ["A=lora4,B=lora4,C=lora2,D=vector,E=vector", "A=vector,B=scalar,C=vector,D=scalar,E=scalar", "A=scalar,B=vector"],
)
def test_gradients_first_step_and_after(config):
    torch.manual_seed(0)
    module = make_glora(16, 24, config)
    weight, bias = frozen_layer(16, 24, has_bias=True)
    x, target = torch.randn(4, 6, 24), torch.randn(4, 6, 16)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)

    def step() -> dict[str, torch.Tensor]:
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(module(x, weight, bias), target).backward()
        grads = {name: parameter.grad.clone() for name, parameter in module.named_parameters()}
        optimizer.step()
        return grads

    first = step()
    for name, grad in first.items():
        if name.endswith("_lora_down"):
            # its partner *_lora_up is zero, so it only learns from the second step on
            assert torch.count_nonzero(grad) == 0, name
        else:
            assert torch.count_nonzero(grad) > 0, f"zero-initialised {name} got no gradient on the first step"
    second = step()
    for name, grad in second.items():
        assert torch.count_nonzero(grad) > 0, f"{name} got no gradient after one step"


def test_half_precision_inputs():
    module = make_glora(16, 24, "A=lora4,B=vector,C=vector,D=scalar,E=vector")
    randomize(module)
    weight, bias = frozen_layer(16, 24, has_bias=True)
    x = torch.randn(2, 3, 24)
    reference = module(x, weight, bias)
    out = module(x.bfloat16(), weight.bfloat16(), bias.bfloat16())
    assert out.dtype == torch.bfloat16
    assert relative_error(out.float(), reference) < 3e-2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_out = module(x, weight, bias)
    assert relative_error(autocast_out.float(), reference) < 3e-2


def test_not_sequential():
    assert GLoRA.supports_sequential is False


# --- supernet ------------------------------------------------------------------------------------------------------


def test_sampling_is_reproducible():
    space = GLoRAChoiceSpace.default(8)
    for make in (lambda seed: torch.Generator().manual_seed(seed), random.Random):

        def run(seed: int, make=make) -> list[GLoRALayerConfig]:
            generator = make(seed)
            return [sample_layer_config(space, generator) for _ in range(40)]

        run_a = run(7)
        assert run_a == run(7)
        assert run_a != run(8)
        assert all(space.contains(config) for config in run_a)
        assert len({str(config) for config in run_a}) > 20  # it does explore the space
    with pytest.raises(TypeError, match="generator"):
        sample_layer_config(space, 7)  # type: ignore[arg-type]


def test_supernet_matches_fixed_modules():
    d_out, d_in = 20, 36
    shape = OpShape(in_dim=d_in, out_dim=d_out, context_dim=d_in)
    supernet = GLoRA(shape, GLoRAParams(rank=8, supernet=True))
    randomize(supernet)
    assert str(supernet.active_config) == "A=lora8,B=lora8,C=lora8,D=vector,E=vector"
    assert sum(p.numel() for p in supernet.parameters()) == (
        2 * (8 * (d_out + d_in) + d_out + 1) + 8 * (d_in + 1) + d_in + 2 * (d_out + 1)
    )
    weight, bias = frozen_layer(d_out, d_in, has_bias=True)
    x = torch.randn(2, 5, d_in)
    generator = torch.Generator().manual_seed(3)
    outputs = []
    for _ in range(12):
        config = sample_layer_config(GLoRAChoiceSpace.of_module(supernet), generator)
        supernet.set_active(config)
        fixed = GLoRA(shape, GLoRAParams(config=str(config)))
        fixed.load_state_dict(supernet.fixed_state_dict(), strict=True)
        out = supernet(x, weight, bias)
        torch.testing.assert_close(out, fixed(x, weight, bias), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(supernet.fold(weight, bias)[0], fixed.fold(weight, bias)[0])
        assert supernet.num_active_parameters() == num_parameters(config, d_out, d_in)
        outputs.append(out)
    assert any(not torch.allclose(outputs[0], other) for other in outputs[1:])  # set_active changes the computation


def test_supernet_lora_uses_leading_components_and_only_they_learn():
    shape = OpShape(in_dim=12, out_dim=10, context_dim=12)
    supernet = GLoRA(shape, GLoRAParams(supernet=True, choices="A=lora8|lora4|none,B=none"))
    randomize(supernet)
    supernet.set_active("A=lora4")
    weight, bias = frozen_layer(10, 12, has_bias=True)
    supernet(torch.randn(3, 12), weight, bias).square().sum().backward()
    assert torch.count_nonzero(supernet.A_lora_up.grad[:, :4]) > 0
    assert torch.count_nonzero(supernet.A_lora_up.grad[:, 4:]) == 0
    assert torch.count_nonzero(supernet.A_lora_down.grad[4:]) == 0
    with pytest.raises(ConfigError, match="cannot evaluate.*holds A: lora<=8"):
        supernet.set_active("A=lora16")
    with pytest.raises(ConfigError, match="cannot evaluate"):
        supernet.set_active("A=vector")


def test_supernet_without_bias_has_no_d():
    shape = OpShape(in_dim=12, out_dim=10, context_dim=12)
    supernet = GLoRA(shape, GLoRAParams(supernet=True), has_bias=False)
    assert supernet.held_forms["D"] == GLoRAChoiceSpace.of_module(supernet).D == ("none",)
    assert not any(name.startswith("D_") for name, _ in supernet.named_parameters())
    supernet.set_active("A=vector,D=vector")  # D is dropped for a bias-free layer rather than refused
    assert supernet.active_config.D == "none"
