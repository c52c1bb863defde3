"""GLoRA per-layer configuration, supernet training mode, evolutionary structure search and its CLI (issue 3)."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest
import torch
from PIL import Image

import resattn_diffusion as rd
from resattn_diffusion.integration.api import iter_tuners
from resattn_diffusion.search import (
    LayerSpace,
    SearchResult,
    evolutionary_search,
    fixed_glora_config,
    get_subnet,
    is_glora_supernet,
    sample_subnet,
    save_subnet,
    search_glora,
    set_subnet,
    subnet_parameter_count,
)
from resattn_diffusion.search.cli import main as search_main
from resattn_diffusion.search.cli import parse_budget, parse_timesteps
from resattn_diffusion.search.glora_space import GLoRAChoiceSpace
from resattn_diffusion.testing import frozen_tiny_unet as frozen_unet
from resattn_diffusion.testing import randomize_tuner as randomize
from resattn_diffusion.testing import save_tiny_pipeline, unet_inputs
from resattn_diffusion.tuners.glora import GLoRAParams, parse_layer_config

Q1 = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
UP_K2 = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
UP_K1 = "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k"


def run(unet, inputs) -> torch.Tensor:
    with torch.no_grad():
        return unet(**inputs).sample


def supernet_unet(kind: str = "sd1", **hyper):
    unet = frozen_unet(kind)
    rd.add_res_tuner(unet, rd.ResTunerConfig(tuner="glora", supernet=True, rank=4, **hyper))
    randomize(unet)
    return unet


def noise_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


# --- per-layer overrides ------------------------------------------------------------------------------------------


def test_override_precedence_is_exact_then_most_specific_then_last():
    params = GLoRAParams(
        config="A=lora2",
        overrides={
            "*.attn1.*": "A=vector",  # 8 literal (non-wildcard) characters
            "up_blocks.1": "B=scalar",  # a parent path: everything below it; 11
            "up_blocks.*.attn2.to_k": "C=vector",  # 20
            "*.attn2.to_q": "E=scalar",  # 11, listed after "up_blocks.1": wins that tie
            UP_K2: "A=scalar,E=vector",  # exact: always wins
        },
    )
    assert params.matching_override(Q1) == "*.attn1.*"
    assert params.matching_override(UP_K1) == "up_blocks.1"  # 11 beats 8
    assert params.matching_override(UP_K2) == UP_K2
    assert (
        params.matching_override("up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k")
        == "up_blocks.*.attn2.to_k"
    )
    assert params.matching_override("up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_q") == "*.attn2.to_q"
    assert params.matching_override("mid_block.attentions.0.transformer_blocks.0.ff.net.2") is None

    layer = params.for_layer(UP_K2)
    assert layer.config == "A=scalar,E=vector" and layer.overrides == {} and layer.rank == params.rank
    assert params.for_layer("mid_block.attentions.0.transformer_blocks.0.ff.net.2").config == "A=lora2"
    assert params.overrides[UP_K2] == "A=scalar,E=vector"  # the original is untouched

    # equally specific patterns (11 literal characters each): the one listed last wins
    assert (
        GLoRAParams(overrides={"*.attn1.to_q": "A=vector", "down_blocks*": "A=none"}).matching_override(Q1)
        == "down_blocks*"
    )
    assert (
        GLoRAParams(overrides={"down_blocks*": "A=none", "*.attn1.to_q": "A=vector"}).matching_override(Q1)
        == "*.attn1.to_q"
    )


def test_overrides_give_each_layer_its_module():
    unet = frozen_unet()
    overrides = {
        "*.attn1": "A=vector,B=none,C=none,D=none,E=scalar",
        UP_K2: "A=lora1,B=scalar",
        "up_blocks.*.ff": "E=vector",
    }
    config = rd.ResTunerConfig(
        tuner="glora", targets=["attn1", "attn2", "ff"], config="A=lora2,B=lora2", overrides=overrides
    )
    rd.add_res_tuner(unet, config)
    active = {path: str(module.active_config) for path, module in iter_tuners(unet, "default")}
    assert active[Q1] == "A=vector,B=none,C=none,D=none,E=scalar"
    assert active[UP_K2] == "A=lora1,B=scalar,C=none,D=none,E=none"
    assert (
        active["up_blocks.1.attentions.1.transformer_blocks.0.ff.net.0.proj"] == "A=none,B=none,C=none,D=none,E=vector"
    )
    assert (
        active["mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj"] == "A=lora2,B=lora2,C=none,D=none,E=none"
    )
    assert active["mid_block.attentions.0.transformer_blocks.0.attn2.to_v"] == "A=lora2,B=lora2,C=none,D=none,E=none"


def test_override_that_matches_no_layer_is_an_error_at_add_time(tmp_path):
    unet = frozen_unet()
    inputs = unet_inputs(unet, batch_size=1, seed=0)
    base = run(unet, inputs)
    with pytest.raises(rd.ConfigError, match="'up_blocks.*.attn2.to_z'"):
        rd.add_res_tuner(unet, rd.ResTunerConfig(tuner="glora", overrides={"up_blocks.*.attn2.to_z": "A=vector"}))
    # a pattern for a layer the config does not select (ff is not a target) is an error too
    with pytest.raises(rd.ConfigError, match="matches none of the"):
        rd.add_res_tuner(unet, rd.ResTunerConfig(tuner="glora", overrides={"*.ff.*": "A=vector"}))
    assert rd.get_res_tuner_configs(unet) == {}
    assert torch.equal(run(unet, inputs), base)


def test_overrides_round_trip_through_a_tuner_file(tmp_path):
    unet = frozen_unet()
    config = rd.ResTunerConfig(
        tuner="glora", config="A=lora2", overrides={"*.attn2.to_k": "A=vector,C=lora1,E=scalar"}
    )
    rd.add_res_tuner(unet, config)
    randomize(unet)
    inputs = unet_inputs(unet, batch_size=1, seed=1)
    expected = run(unet, inputs)
    rd.save_res_tuner(unet, tmp_path)
    fresh = frozen_unet()
    rd.load_res_tuner(fresh, tmp_path)
    assert rd.get_res_tuner_configs(fresh)["default"] == config
    assert torch.equal(run(fresh, inputs), expected)


# --- supernet -----------------------------------------------------------------------------------------------------


def test_supernet_sampling_is_reproducible_and_changes_outputs():
    unet = supernet_unet()
    assert is_glora_supernet(unet)
    inputs = unet_inputs(unet, batch_size=1, seed=2)
    first = sample_subnet(unet, torch.Generator().manual_seed(7))
    out_first = run(unet, inputs)
    second = sample_subnet(unet, torch.Generator().manual_seed(7))
    assert first == second and torch.equal(run(unet, inputs), out_first)
    assert get_subnet(unet) == first

    generator = torch.Generator().manual_seed(7)
    step_one, step_two = sample_subnet(unet, generator), sample_subnet(unet, generator)
    assert step_one == first and step_two != step_one  # a new configuration per step
    assert not torch.allclose(run(unet, inputs), out_first)
    # per layer: the layers of one sample do not all share one configuration
    assert len(set(first.values())) > 1
    # a random.Random works the same way
    assert sample_subnet(unet, random.Random(3)) == sample_subnet(unet, random.Random(3))


def test_set_subnet_and_parameter_count_match_a_fixed_glora():
    unet = supernet_unet()
    configs = sample_subnet(unet, torch.Generator().manual_seed(1))
    count = subnet_parameter_count(unet, configs)
    fixed = frozen_unet()
    rd.add_res_tuner(fixed, fixed_glora_config(rd.get_res_tuner_configs(unet)["default"], configs))
    assert rd.res_tuner_summary(fixed)["tuners"]["default"]["parameters"] == count
    assert {path: str(m.active_config) for path, m in iter_tuners(fixed, "default")} == configs

    set_subnet(unet, {path: "A=none,B=none,C=none,D=none,E=none" for path in configs})
    assert torch.equal(run(unet, unet_inputs(unet, 1, 0)), run(frozen_unet(), unet_inputs(unet, 1, 0)))
    with pytest.raises(rd.ConfigError, match="have no configuration"):
        set_subnet(unet, dict(list(configs.items())[1:]))
    with pytest.raises(rd.ConfigError, match="outside its choice space"):
        set_subnet(unet, {**configs, Q1: "A=lora3"})
    with pytest.raises(rd.ResTunerError, match="not a GLoRA supernet"):
        fixed_unet = frozen_unet()
        rd.add_res_tuner(fixed_unet, rd.ResTunerConfig(tuner="glora"))
        sample_subnet(fixed_unet, torch.Generator())
    rd.fuse_res_tuner(unet)
    with pytest.raises(rd.ResTunerError, match="unfuse"):
        sample_subnet(unet, torch.Generator())


def test_supernet_trains_the_sampled_subnet():
    unet = supernet_unet()
    inputs = unet_inputs(unet, batch_size=1, seed=3)
    sample_subnet(unet, torch.Generator().manual_seed(0))
    unet(**inputs).sample.pow(2).mean().backward()
    active = {path: module.active_config for path, module in iter_tuners(unet, "default")}
    for path, module in iter_tuners(unet, "default"):
        for name, parameter in module.named_parameters():
            support, kind = name.split("_")[:2]
            used = active[path].form(support)[0] == kind
            assert (parameter.grad is not None and parameter.grad.abs().sum() > 0) == used, (path, name)


# --- the evolution ------------------------------------------------------------------------------------------------


def synthetic_layers(count: int = 6) -> list[LayerSpace]:
    space = GLoRAChoiceSpace.default(4)
    return [LayerSpace(f"layer{i}", space, d_out=16 + 8 * i, d_in=24, has_bias=i % 2 == 0) for i in range(count)]


def test_evolution_improves_respects_the_budget_and_is_seeded():
    layers = synthetic_layers()
    target = tuple(str(parse_layer_config("A=lora2,B=vector,C=vector,D=scalar,E=none")) for _ in layers)

    def distance(genome):  # a fitness with a known optimum: how many support tensors differ from the target
        return float(sum(a != b for g, t in zip(genome, target) for a, b in zip(g.split(","), t.split(","))))

    budget = 600
    kwargs = dict(
        population_size=8, iterations=12, mutation_rate=0.2, crossover_rate=0.5, budget=budget, progress=False
    )
    result = evolutionary_search(layers, distance, seed=5, **kwargs)
    again = evolutionary_search(layers, distance, seed=5, **kwargs)
    assert result == again
    other = evolutionary_search(layers, distance, seed=6, **kwargs)
    assert other.evaluated != result.evaluated
    assert result.parameters <= budget
    assert all(entry["parameters"] <= budget for entry in result.evaluated)
    assert result.history[-1]["best_fitness"] < result.history[0]["best_fitness"]
    assert [h["best_fitness"] for h in result.history] == sorted(
        (h["best_fitness"] for h in result.history), reverse=True
    )
    assert sum(layer.count(result.configs[layer.path]) for layer in layers) == result.parameters

    with pytest.raises(rd.ConfigError, match="below the smallest subnet"):
        small = [LayerSpace("l", GLoRAChoiceSpace(A=("vector",)), 16, 8)]
        evolutionary_search(small, distance, budget=10, progress=False)


def test_search_glora_is_reproducible_respects_the_budget_and_exports_a_loadable_fixed_tuner(tmp_path):
    unet = supernet_unet()
    held_out = unet_inputs(unet, batch_size=2, seed=11)
    largest = subnet_parameter_count(unet, get_subnet(unet))
    budget = largest // 4
    kwargs = dict(population_size=4, iterations=2, budget=budget, seed=3, timesteps=2, progress=False)
    result = search_glora(unet, held_out["sample"], held_out["encoder_hidden_states"], noise_scheduler(), **kwargs)
    again = search_glora(unet, held_out["sample"], held_out["encoder_hidden_states"], noise_scheduler(), **kwargs)
    assert result.configs == again.configs and result.history == again.history and result.fitness == again.fitness
    assert result.parameters <= budget and all(entry["parameters"] <= budget for entry in result.evaluated)
    assert len(result.evaluated) > kwargs["population_size"]
    assert subnet_parameter_count(unet, result.configs) == result.parameters
    assert get_subnet(unet) == result.configs  # the supernet is left at the chosen subnet

    inputs = unet_inputs(unet, batch_size=2, seed=12)
    expected = run(unet, inputs)
    path = save_subnet(unet, result.configs, tmp_path)
    fresh = frozen_unet()
    name = rd.load_res_tuner(fresh, path)
    config = rd.get_res_tuner_configs(fresh)[name]
    assert name == "default" and config.tuner == "glora" and not config.hyperparameters["supernet"]
    assert all("*" not in pattern for pattern in config.hyperparameters["overrides"])
    assert rd.res_tuner_summary(fresh)["tuners"]["default"]["parameters"] == result.parameters
    torch.testing.assert_close(run(fresh, inputs), expected, rtol=1e-5, atol=1e-5)
    rd.fuse_res_tuner(fresh)
    torch.testing.assert_close(run(fresh, inputs), expected, rtol=1e-5, atol=1e-5)


def test_an_edited_subnet_outside_the_choice_space_is_refused_before_anything_is_written(tmp_path):
    """A search result edited to a form the supernet never trained (``lora3`` of a ``lora4|lora2`` space) was cut out
    and saved silently by ``save_subnet`` (``set_subnet`` refused it); a list of paths was a raw TypeError."""
    unet = supernet_unet()
    configs = get_subnet(unet)
    edited = {**configs, Q1: "A=lora3,B=none,C=none,D=none,E=none"}
    for call in (
        lambda: save_subnet(unet, edited, tmp_path / "edited.safetensors"),
        lambda: subnet_parameter_count(unet, edited),
        lambda: set_subnet(unet, edited),
    ):
        with pytest.raises(rd.ConfigError, match=f"layer {Q1}: configuration A=lora3.* is outside its choice space"):
            call()
    assert not (tmp_path / "edited.safetensors").exists() and get_subnet(unet) == configs
    for call in (save_subnet, set_subnet, subnet_parameter_count):
        with pytest.raises(rd.ConfigError, match="a subnet is a dict"):
            call(unet, list(configs), *([tmp_path / "list.safetensors"] if call is save_subnet else []))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "text, field",
    [
        ("{", "cannot read"),
        ("[1, 2]", "JSON list, not an object"),
        ('{"configs": {"a": "A=none"}, "parameters": 1, "fitness": 0.5, "note": 1}', r"unknown field\(s\) \['note'\]"),
        ('{"configs": {"a": "A=none"}, "parameters": 1}', r"missing field\(s\) \['fitness'\]"),
        ('{"configs": ["a"], "parameters": 1, "fitness": 0.5}', "'configs' must be"),
        ('{"configs": {"a": 5}, "parameters": 1, "fitness": 0.5}', "'configs' must be"),
        ('{"configs": {"a": "A=none"}, "parameters": "1", "fitness": 0.5}', "'parameters' must be"),
        ('{"configs": {"a": "A=none"}, "parameters": 1, "fitness": NaN}', "'fitness' must be a finite number"),
        ('{"configs": {"a": "A=none"}, "parameters": 1, "fitness": 0.5, "history": {}}', "'history' must be"),
    ],
)
def test_a_search_result_file_that_is_not_one_is_a_config_error(text, field, tmp_path):
    """``SearchResult.load`` was ``cls(**json.loads(...))``: raw JSONDecodeError / TypeError, or a result of the
    wrong types accepted silently."""
    path = tmp_path / "glora_search.json"
    path.write_text(text)
    with pytest.raises(rd.ConfigError, match=field):
        SearchResult.load(path)


def test_a_saved_search_result_loads_back(tmp_path):
    result = SearchResult({"a": "A=none"}, 3, 0.25, history=[{"iteration": 0}], settings={"seed": 1})
    assert SearchResult.load(result.save(tmp_path / "r.json")) == result


def test_search_on_sdxl_with_added_conditions():
    unet = supernet_unet("sdxl")
    held_out = unet_inputs(unet, batch_size=2, seed=13)
    result = search_glora(
        unet,
        held_out["sample"],
        held_out["encoder_hidden_states"],
        noise_scheduler(),
        added_cond_kwargs=held_out["added_cond_kwargs"],
        population_size=2,
        iterations=1,
        timesteps=[500],
        progress=False,
    )
    assert np.isfinite(result.fitness) and len(result.configs) == len(get_subnet(unet))


def test_cli_argument_parsing():
    assert parse_budget("250k") == 250_000 and parse_budget("1.5M") == 1_500_000 and parse_budget("123") == 123
    assert parse_budget(None) is None and parse_budget("none") is None
    assert (
        parse_timesteps("4") == 4
        and parse_timesteps("100,500,900") == [100, 500, 900]
        and parse_timesteps("500,") == [500]
    )
    with pytest.raises(ValueError, match="--budget"):
        parse_budget("lots")


# --- the command line ---------------------------------------------------------------------------------------------


def write_held_out(folder, count: int = 3, metadata: bool = True) -> None:
    folder.mkdir(parents=True)
    rows = []
    for index in range(count):
        pixels = np.random.default_rng(index).integers(0, 255, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index}.png")
        caption = f"a photo of a {['red', 'blue', 'green'][index % 3]} dog"
        if metadata:
            rows.append(json.dumps({"file_name": f"{index}.png", "text": caption}))
        else:
            (folder / f"{index}.txt").write_text(caption)
    if metadata:
        (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_cli_end_to_end(kind, tmp_path, capsys):
    from diffusers import DiffusionPipeline

    model = save_tiny_pipeline(kind, tmp_path / "model")
    unet = DiffusionPipeline.from_pretrained(model).unet
    unet.requires_grad_(False)
    rd.add_res_tuner(unet, rd.ResTunerConfig(tuner="glora", supernet=True, rank=2))
    randomize(unet)
    rd.save_res_tuner(unet, tmp_path / "supernet")
    write_held_out(tmp_path / "held_out", metadata=kind == "sd1")

    def arguments(data_dir, output_dir):
        return [
            "--pretrained_model_name_or_path", str(model), "--supernet", str(tmp_path / "supernet"),
            "--data_dir", str(data_dir), "--output_dir", str(output_dir),
            "--population_size", "3", "--iterations", "1", "--budget", "3k", "--timesteps", "2", "--seed", "1",
            "--no_progress",
        ]  # fmt: skip

    argv = arguments(tmp_path / "held_out", tmp_path / "out")
    assert search_main(argv) == 0
    result = json.loads((tmp_path / "out" / "glora_search.json").read_text())
    assert result["parameters"] <= 3000 and result["history"] and len(result["configs"]) == len(get_subnet(unet))
    assert "best held-out loss" in capsys.readouterr().out

    pipeline = DiffusionPipeline.from_pretrained(model)
    rd.load_res_tuner(pipeline.unet, tmp_path / "out")
    assert rd.res_tuner_summary(pipeline.unet)["tuners"]["default"]["parameters"] == result["parameters"]

    # an existing result is not overwritten unless asked; bad input is a clear error
    assert search_main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert search_main(arguments(tmp_path / "missing", tmp_path / "other")) == 2
    assert "does not exist" in capsys.readouterr().err


# --- the command line refuses bad numbers and paths before it loads anything ---------------------------------------
@pytest.fixture(scope="module")
def search_inputs(tmp_path_factory):
    """A tiny SD pipeline folder, its GLoRA supernet file and a held-out folder, shared by the refusal tests."""
    from diffusers import DiffusionPipeline

    root = tmp_path_factory.mktemp("search_inputs")
    model = save_tiny_pipeline("sd1", root / "model")
    unet = DiffusionPipeline.from_pretrained(model).unet
    unet.requires_grad_(False)
    rd.add_res_tuner(unet, rd.ResTunerConfig(tuner="glora", supernet=True, rank=2))
    randomize(unet)
    rd.save_res_tuner(unet, root / "supernet")
    write_held_out(root / "held_out")
    return root


def search_argv(root, output_dir, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(root / "model"), "--supernet", str(root / "supernet"),
        "--data_dir", str(root / "held_out"), "--output_dir", str(output_dir),
        "--population_size", "3", "--iterations", "1", "--timesteps", "2", "--no_progress", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--batch_size", "0"], "batch_size must be an integer >= 1"),  # was range() arg 3 must not be zero
        (["--timesteps", "0"], "timesteps must be a count >= 1"),  # was a raw ValueError after loading
        (["--timesteps", "1000000000"], "asks for 1,000,000,000 timesteps; the noise schedule has 1000"),  # all RAM
        (["--timesteps", "5000,"], r"at most 1000 timesteps in \[0, 999\]"),
        (["--seed", str(2**70)], "seed must be an integer from 0 to 2\\*\\*64 - 1"),  # was torch's overflow
        (["--mutation_rate", "nan"], "mutation_rate must be a number in"),
        (["--resolution", "0"], "--resolution must be a positive number"),  # 0 silently meant the default
        (["--resolution", "-64"], "--resolution must be a positive number"),  # was PIL's raw ValueError
        (["--resolution", "7"], "--resolution must be a multiple of 2"),  # ran on images the VAE cropped
        (["--device", "nonsense"], "--device 'nonsense' is not a device"),  # was torch's raw RuntimeError
        (["--population_size", "100000"], "--population_size must be an integer from 2 to 10,000"),  # ran for days
        (["--crossover_rate", "2"], "--crossover_rate must be a number in"),  # the flag, not the setting's name
    ],
)
def test_cli_refuses_bad_numbers_before_the_search(flags, message, search_inputs, tmp_path, capsys, monkeypatch):
    import resattn_diffusion.search.cli as cli

    def no_encoding(*args, **kwargs):
        raise AssertionError("the held-out data were encoded")

    monkeypatch.setattr(cli, "encode_held_out", no_encoding)
    assert search_main(search_argv(search_inputs, tmp_path / "out", *flags)) == 2
    assert re.search(message, capsys.readouterr().err)
    assert (
        not (tmp_path / "out" / "glora_search.json").exists()
        and not (tmp_path / "out" / "res_tuner.safetensors").exists()
    )


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--timesteps", "5000,"], r"at most 1000 timesteps"),
        (["--data_dir", "/nonexistent/held_out"], "held-out data folder"),
        (["--population_size", "1"], "--population_size must be"),
    ],
)
def test_cli_refusals_that_need_no_model_write_nothing(flags, message, search_inputs, tmp_path, capsys):
    """Refused before any model loads, the search leaves no --output_dir behind (it used to hold a search.log)."""
    argv = search_argv(search_inputs, tmp_path / "out")
    for flag, value in zip(flags[::2], flags[1::2]):  # a later repeat of a flag wins in argparse
        argv += [flag, value]
    assert search_main(argv) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_cli_refuses_an_output_it_cannot_write_before_loading(search_inputs, tmp_path, capsys, monkeypatch):
    """A folder named glora_search.json with --overwrite: the search ran to the end, wrote the tuner file, then
    failed with a raw IsADirectoryError (a tuner without its result). An --output_dir that is a file, under a file
    or holds a NUL byte was a raw OSError / ValueError."""
    import resattn_diffusion.search.cli as cli

    def no_loading(*args, **kwargs):
        raise AssertionError("the pipeline was loaded")

    monkeypatch.setattr(cli, "_load_pipeline", no_loading)
    (tmp_path / "out" / "glora_search.json").mkdir(parents=True)
    assert search_main(search_argv(search_inputs, tmp_path / "out", "--overwrite")) == 2
    assert "glora_search.json' is a folder" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["glora_search.json"]
    (tmp_path / "file").write_text("x")
    for output_dir in (tmp_path / "file", tmp_path / "file" / "below", f"{tmp_path}/a\0b"):
        assert search_main(search_argv(search_inputs, output_dir)) == 2
        assert "cannot write the search results to" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "x"


def test_an_interrupted_result_save_keeps_the_older_file(tmp_path, monkeypatch):
    import os

    path = SearchResult({"a": "A=none"}, 1, 0.5).save(tmp_path / "glora_search.json")
    before = path.read_text()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        SearchResult({"b": "A=none"}, 2, 0.25).save(path)
    assert path.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["glora_search.json"]


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"batch_size": 0}, "batch_size must be"),
        ({"seed": 2**70}, "seed must be"),
        ({"seed": -1}, "seed must be"),
        ({"mutation_rate": "0.1"}, "mutation_rate must be a number"),
        ({"timesteps": []}, "timesteps must be"),
        ({"timesteps": 1001}, "the noise schedule has 1000"),
    ],
)
def test_search_glora_checks_its_numbers_before_touching_the_supernet(setting, message):
    unet = supernet_unet()
    subnet = get_subnet(unet)
    held_out = unet_inputs(unet, batch_size=2, seed=11)
    with pytest.raises(rd.ConfigError, match=message):
        search_glora(unet, held_out["sample"], held_out["encoder_hidden_states"], noise_scheduler(), **setting)
    assert get_subnet(unet) == subnet
