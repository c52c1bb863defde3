"""The GLoRA structure search on the diffusion transformers (SD3, Flux): ``resattn-glora-search`` on a saved
pipeline folder, scored by the held-out rectified-flow loss (:class:`FlowMatchingFitness`).

Before, the command refused every pipeline without a UNet, so a GLoRA supernet trained on SD3 or Flux (which the
training scripts allow) could be neither searched nor exported (export refuses a supernet).
"""

from __future__ import annotations

import json

import pytest
import torch
from test_glora_search import write_held_out

import resattn_diffusion as rd
from resattn_diffusion.search.cli import main as search_main
from resattn_diffusion.search.evolution import search_supernet
from resattn_diffusion.search.flow_fitness import FlowMatchingFitness, encode_flow_held_out, flow_flags
from resattn_diffusion.search.supernet import get_subnet, set_subnet
from resattn_diffusion.testing import model_inputs, save_tiny_dit_pipeline
from resattn_diffusion.training.flow import FluxBase, SD3Base

FAMILIES = {"sd3": SD3Base, "flux": FluxBase}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit_search")
    held_out = root / "held_out"
    write_held_out(held_out)
    return {kind: save_tiny_dit_pipeline(kind, root / kind) for kind in FAMILIES} | {"held_out": held_out}


def _supernet_file(folder, tmp_path, kind: str):
    """A GLoRA supernet on the pipeline's transformer, its parameters random (a trained one's are not zero)."""
    base = FAMILIES[kind].load(flow_flags(str(folder)), torch.float32)
    rd.add_res_tuner(base.denoiser, rd.ResTunerConfig("glora", supernet=True, rank=2))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in rd.res_tuner_parameters(base.denoiser):
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return base, rd.save_res_tuner(base.denoiser, tmp_path / f"{kind}_supernet")


def _argv(folders, kind, supernet, out, *extra):
    return [
        "--pretrained_model_name_or_path", str(folders[kind]), "--supernet", str(supernet),
        "--data_dir", str(folders["held_out"]), "--output_dir", str(out), "--resolution", "32",
        "--population_size", "3", "--iterations", "1", "--timesteps", "2", "--seed", "1", "--no_progress", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_the_command_searches_a_transformer_supernet_and_writes_a_loadable_fixed_tuner(
    folders, tmp_path, kind, capsys
):
    base, supernet = _supernet_file(folders[kind], tmp_path, kind)
    assert search_main(_argv(folders, kind, supernet, tmp_path / "out", "--budget", "4k")) == 0
    assert "best held-out loss" in capsys.readouterr().out
    result = json.loads((tmp_path / "out" / "glora_search.json").read_text())
    assert result["parameters"] <= 4000 and result["history"]
    assert result["settings"]["held_out_samples"] == 3 and result["settings"]["resolution"] == 32
    assert len(result["configs"]) == len(get_subnet(base.denoiser))

    # the fixed tuner written is the supernet with the chosen subnet active: same parameters, same output
    fixed = FAMILIES[kind].load(flow_flags(str(folders[kind])), torch.float32)
    rd.load_res_tuner(fixed.denoiser, tmp_path / "out")
    assert rd.res_tuner_summary(fixed.denoiser)["tuners"]["default"]["parameters"] == result["parameters"]
    set_subnet(base.denoiser, result["configs"])
    inputs = model_inputs(base.denoiser)
    with torch.no_grad():
        torch.testing.assert_close(fixed.denoiser(**inputs)[0], base.denoiser(**inputs)[0], rtol=1e-5, atol=1e-5)

    # the same seed gives the same search
    assert search_main(_argv(folders, kind, supernet, tmp_path / "again", "--budget", "4k")) == 0
    again = json.loads((tmp_path / "again" / "glora_search.json").read_text())
    assert again["configs"] == result["configs"] and again["fitness"] == result["fitness"]


def test_flow_fitness_is_deterministic_and_tells_configurations_apart(folders, tmp_path):
    """One configuration always scores the same (fixed noise and timesteps); configurations score differently;
    the search picks the best it evaluated."""
    base, _ = _supernet_file(folders["flux"], tmp_path, "flux")
    flags = flow_flags(str(folders["flux"]))
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents, conditioning = encode_flow_held_out(base, flags, pixels, ["a dog", "a cat"], torch.device("cpu"), 1)
    assert latents.shape[0] == 2 and all(part.shape[0] == 2 for part in conditioning)
    assert base.text_encoders_freed and not base.text_encoders  # encoded once; the search never needs them again
    fitness = FlowMatchingFitness(base, flags, latents, conditioning, timesteps=[100, 900], seed=0, batch_size=3)
    assert len(fitness) == 4 and fitness.timesteps == [100, 900]
    # timesteps mean noise levels, as on a UNet: 100 little noise, 900 much (the flow schedule runs downwards)
    spacing = (base.noise_scheduler.timesteps[:-1] - base.noise_scheduler.timesteps[1:]).abs().max()
    assert (fitness.steps[:2] - torch.tensor([100.0, 900.0])).abs().max() <= spacing
    assert fitness.noisy[0].sub(latents[0]).abs().mean() < fitness.noisy[1].sub(latents[0]).abs().mean()
    first = fitness()
    assert first == fitness() and first > 0
    scores = set()
    for config in ("A=lora2,B=none,C=none,D=none,E=none", "A=none,B=lora2,C=vector,D=vector,E=vector"):
        set_subnet(base.denoiser, dict.fromkeys(get_subnet(base.denoiser), config))
        scores.add(fitness())
    assert len(scores) == 2
    result = search_supernet(base.denoiser, fitness, population_size=3, iterations=1, seed=0, progress=False)
    assert result.evaluated and result.fitness == min(entry["fitness"] for entry in result.evaluated)
    assert result.fitness == fitness()  # the chosen subnet is active afterwards
    with pytest.raises(ValueError, match="2 latents but conditioning with 1 rows"):
        FlowMatchingFitness(base, flags, latents, [part[:1] for part in conditioning])


def test_a_pipeline_the_training_core_does_not_know_is_refused_before_anything_is_written(folders, tmp_path, capsys):
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "X", "transformer": ["diffusers", "Y"]}))
    assert search_main(_argv(folders | {"other": folder}, "other", tmp_path / "none", tmp_path / "out")) == 2
    assert "the training scripts know" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("recorded", "message"),
    [
        ("{not json", "is not readable JSON"),
        ("[16]", "is not a JSON object of training flags"),
        ('{"max_sequence_length": "16"}', "records max_sequence_length='16'"),
        ('{"max_sequence_length": true}', "records max_sequence_length=True"),
        ('{"guidance_scale": NaN}', "records guidance_scale=nan"),
        ('{"max_sequence_length": 9999}', "T5 takes 1 to 512 tokens"),
    ],
)
def test_the_training_flags_beside_the_supernet_are_checked_before_anything_loads(
    folders, tmp_path, capsys, recorded, message
):
    """The search reads T5's token count and Flux's guidance from the training run's ``args.json`` beside the
    supernet (so subnets are scored on the conditioning they trained on); a crafted one is refused, naming it."""
    _, supernet = _supernet_file(folders["flux"], tmp_path, "flux")
    (supernet.parent / "args.json").write_text(recorded)
    assert search_main(_argv(folders, "flux", supernet.parent, tmp_path / "out")) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "glora_search.json").exists()


def test_a_valid_recorded_sequence_length_is_used_and_recorded(folders, tmp_path):
    _, supernet = _supernet_file(folders["sd3"], tmp_path, "sd3")
    (supernet.parent / "args.json").write_text('{"max_sequence_length": 8, "guidance_scale": null}')
    assert search_main(_argv(folders, "sd3", supernet.parent, tmp_path / "out")) == 0
    settings = json.loads((tmp_path / "out" / "glora_search.json").read_text())["settings"]
    assert settings["max_sequence_length"] == 8 and "guidance_scale" not in settings
