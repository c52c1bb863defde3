"""Evolutionary search of a GLoRA supernet's per-layer configuration under a trainable-parameter budget.

Fitness is the held-out denoising loss (lower is better) of the UNet with the candidate subnet active, at FIXED
timesteps and noise: :class:`DenoisingFitness` draws, once from the seed, a noise tensor for every (held-out
sample, timestep) pair, so every candidate is scored on exactly the same noisy latents.

The search (as in GLoRA / AutoFormer):

1. an initial population of ``population_size`` random subnets;
2. each iteration keeps the best half as parents and breeds ``population_size`` children: with probability
   ``crossover_rate`` a child takes each layer's configuration from one of two random parents (uniform crossover),
   otherwise it copies one parent; then every layer is re-drawn from its choice space with probability
   ``mutation_rate``;
3. a candidate over the parameter ``budget`` is *repaired*: random (layer, support tensor) forms are stepped down to
   the next smaller form of their choice space (lora r -> a smaller lora -> vector -> scalar -> none) until it fits,
   so every evaluated and returned subnet respects the budget;
4. the next population is the best ``population_size`` of parents and children (elitist; duplicates are never
   evaluated twice).

Everything random comes from ``random.Random(seed)`` (the evolution) and ``torch.Generator().manual_seed(seed)``
(noise and timesteps), so the same seed gives the same result.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checks import MAX_SEED
from ..training.objective import prediction_target
from ..tuners.base import ConfigError
from ..tuners.glora import SUPPORTS, GLoRALayerConfig, num_parameters
from .glora_space import GLoRAChoiceSpace, sample_layer_config
from .supernet import _require_unfused, get_subnet, set_subnet, supernet_layers

__all__ = [
    "DenoisingFitness",
    "check_search_settings",
    "LayerSpace",
    "SearchResult",
    "evolutionary_search",
    "search_glora",
]

#: A subnet as the search handles it: one canonical configuration string per layer, in layer order.
Genome = tuple[str, ...]


# --- fitness -----------------------------------------------------------------------------------------------------


class DenoisingFitness:
    """Held-out denoising loss of ``unet`` at fixed timesteps and noise (lower is better).

    Args:
        unet: the UNet (with its tuner loaded); called as ``unet(noisy, t, encoder_hidden_states, ...)``.
        latents: clean held-out latents (N, C, H, W), already scaled by the VAE's scaling factor.
        encoder_hidden_states: their text embeddings (N, M, d_c).
        noise_scheduler: a diffusers noise scheduler (``add_noise``, ``get_velocity``, ``config.num_train_timesteps``,
            ``config.prediction_type``) -- the one the model was trained with.
        timesteps: an int k (k timesteps spread evenly over the schedule, at the centres of k equal bins) or the
            timesteps themselves. Every sample is scored at every timestep.
        seed: seeds the noise (one independent draw per sample and timestep).
        added_cond_kwargs: SDXL's ``{"text_embeds": (N, ...), "time_ids": (N, 6)}``; None for SD 1.x/2.x.
        batch_size: UNet batch size while scoring.

    Calling the object scores the UNet as it is now: the mean squared error between the UNet's prediction and its
    target (the noise for epsilon-prediction, the velocity for v-prediction, the latents for sample-prediction),
    averaged over all samples and timesteps, computed in float32.
    """

    def __init__(
        self,
        unet: nn.Module,
        latents: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        noise_scheduler,
        timesteps: int | Sequence[int] = 4,
        seed: int = 0,
        added_cond_kwargs: Mapping[str, torch.Tensor] | None = None,
        batch_size: int = 8,
    ):
        if latents.ndim != 4 or latents.shape[0] == 0:
            raise ValueError(f"latents must be a non-empty (N, C, H, W) tensor, got shape {tuple(latents.shape)}")
        count = latents.shape[0]
        if encoder_hidden_states.shape[0] != count:
            raise ValueError(
                f"{count} latents but {encoder_hidden_states.shape[0]} encoder_hidden_states; give one per latent"
            )
        for key, value in (added_cond_kwargs or {}).items():
            if value.shape[0] != count:
                raise ValueError(
                    f"added_cond_kwargs[{key!r}] has {value.shape[0]} rows; give one per latent ({count})"
                )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.unet = unet
        self.batch_size = int(batch_size)
        self.timesteps = self.fixed_timesteps(timesteps, noise_scheduler.config.num_train_timesteps)

        # Every (sample, timestep) pair, sample-major, with its own noise drawn once from the seed.
        generator = torch.Generator().manual_seed(int(seed))
        latents = latents.detach().float().cpu()
        pairs = len(self.timesteps)
        repeated = latents.repeat_interleave(pairs, dim=0)
        noise = torch.randn(repeated.shape, generator=generator, dtype=torch.float32)
        steps = torch.tensor(self.timesteps, dtype=torch.long).repeat(count)
        self.noisy_latents = noise_scheduler.add_noise(repeated, noise, steps)
        self.targets = prediction_target(noise_scheduler, repeated, noise, steps)
        self.steps = steps
        self.encoder_hidden_states = encoder_hidden_states.detach().cpu().repeat_interleave(pairs, dim=0)
        self.added_cond_kwargs = {
            key: value.detach().cpu().repeat_interleave(pairs, dim=0)
            for key, value in (added_cond_kwargs or {}).items()
        }

    @staticmethod
    def fixed_timesteps(timesteps: int | Sequence[int], num_train_timesteps: int) -> list[int]:
        """The timesteps every sample is scored at; at most as many as the schedule has (more would only repeat
        them, and every one is a copy of the held-out latents: ``--timesteps 1000000000`` took all memory)."""
        check_search_settings(timesteps=timesteps)
        if _is_whole(timesteps):
            if timesteps > num_train_timesteps:
                raise ConfigError(
                    f"timesteps asks for {timesteps:,} timesteps; the noise schedule has {num_train_timesteps}"
                )
            width = num_train_timesteps / timesteps
            return [min(num_train_timesteps - 1, int(width * (index + 0.5))) for index in range(timesteps)]
        steps = list(timesteps)
        if len(steps) > num_train_timesteps or any(t >= num_train_timesteps for t in steps):
            raise ConfigError(
                f"timesteps must be at most {num_train_timesteps} timesteps in [0, {num_train_timesteps - 1}], "
                f"got {steps[:8]}{' ...' if len(steps) > 8 else ''}"
            )
        return steps

    def __len__(self) -> int:
        return self.noisy_latents.shape[0]

    def __call__(self) -> float:
        def predict(start: int, stop: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
            kwargs = {}
            if self.added_cond_kwargs:
                kwargs["added_cond_kwargs"] = {
                    key: value[start:stop].to(device=device, dtype=dtype)
                    for key, value in self.added_cond_kwargs.items()
                }
            return self.unet(
                self.noisy_latents[start:stop].to(device=device, dtype=dtype),
                self.steps[start:stop].to(device),
                encoder_hidden_states=self.encoder_hidden_states[start:stop].to(device=device, dtype=dtype),
                **kwargs,
            ).sample

        return held_out_mean_squared_error(self.unet, predict, self.targets, self.batch_size)


@torch.no_grad()
def held_out_mean_squared_error(
    model: nn.Module,
    predict: Callable[[int, int, torch.device, torch.dtype], torch.Tensor],
    targets: torch.Tensor,
    batch_size: int,
) -> float:
    """``mean_i ||predict(i) - targets[i]||^2 / numel`` over the rows of ``targets``, ``batch_size`` rows per call
    of ``predict(start, stop, device, dtype)`` (inputs go to the model's device and dtype), with ``model`` in eval
    mode for the calls (its mode restored after): the fitness of every held-out loss of the search."""
    parameter = next(model.parameters())
    device, dtype = parameter.device, parameter.dtype
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for start in range(0, targets.shape[0], batch_size):
            stop = start + batch_size
            error = (predict(start, stop, device, dtype).float().cpu() - targets[start:stop]).pow(2)
            total += error.mean(dim=tuple(range(1, error.ndim))).sum().item()
    finally:
        model.train(was_training)
    return total / targets.shape[0]


# --- the evolution (independent of the UNet) --------------------------------------------------------------------


@dataclass(frozen=True)
class LayerSpace:
    """One searchable layer: its path, choice space and the dims its parameter count depends on."""

    path: str
    space: GLoRAChoiceSpace
    d_out: int
    d_in: int
    has_bias: bool = True

    def count(self, config: str) -> int:
        return num_parameters(config, self.d_out, self.d_in, self.has_bias)

    def smallest(self) -> str:
        return str(self.space.smallest())


@dataclass
class SearchResult:
    """What the search found: ``configs`` (layer path -> configuration), its parameter count and fitness, and how it
    got there (``history``: one entry per generation; ``evaluated``: size and fitness of every evaluated subnet)."""

    configs: dict[str, str]
    parameters: int
    fitness: float
    history: list[dict] = field(default_factory=list)
    evaluated: list[dict] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> Path:
        """Write the result as JSON (parent folders are created), beside and renamed into place: an interrupted
        save keeps the older file instead of leaving a truncated one."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            temporary.write_text(json.dumps(self.to_dict(), indent=2), encoding="utf-8")
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | Path) -> SearchResult:
        """Read a result written by :meth:`save`; a file that is not one (not JSON, another shape, a field of the
        wrong type, an unknown field) is a :class:`ConfigError` naming the file and the field. The configurations
        themselves are checked against the supernet where they are used (``set_subnet`` / ``save_subnet``)."""
        file = str(path)
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise ConfigError(f"cannot read the search result {file!r}: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"search result {file!r}: the file holds a JSON {type(data).__name__}, not an object")
        known = {f.name for f in fields(cls)}
        unknown, missing = sorted(set(data) - known), sorted({"configs", "parameters", "fitness"} - set(data))
        if unknown or missing:
            raise ConfigError(
                f"search result {file!r}: "
                + (f"unknown field(s) {unknown} " if unknown else "")
                + (f"missing field(s) {missing} " if missing else "")
                + f"(a result has {sorted(known)}); was it written by the search?"
            )
        configs, parameters, fitness = data["configs"], data["parameters"], data["fitness"]
        if (
            not isinstance(configs, dict)
            or not configs
            or not all(isinstance(key, str) and isinstance(value, str) for key, value in configs.items())
        ):
            raise ConfigError(
                f"search result {file!r}: 'configs' must be a non-empty object of layer path -> configuration string"
            )
        if isinstance(parameters, bool) or not isinstance(parameters, int) or parameters < 0:
            raise ConfigError(f"search result {file!r}: 'parameters' must be a whole number >= 0, got {parameters!r}")
        if isinstance(fitness, bool) or not isinstance(fitness, (int, float)) or not math.isfinite(fitness):
            raise ConfigError(f"search result {file!r}: 'fitness' must be a finite number, got {fitness!r}")
        for name, kind in (("history", list), ("evaluated", list), ("settings", dict)):
            if not isinstance(data.get(name, kind()), kind):
                raise ConfigError(f"search result {file!r}: {name!r} must be a JSON {kind.__name__}")
        return cls(**data)


class _Evolution:
    """The state of one search: layers, budget, random stream and the cache of evaluated genomes."""

    def __init__(
        self, layers: Sequence[LayerSpace], evaluate: Callable[[Genome], float], budget: int | None, rng: random.Random
    ):
        self.layers = list(layers)
        self.evaluate_fn = evaluate
        self.budget = budget
        self.rng = rng
        self.fitness: dict[Genome, float] = {}
        self.evaluated: list[dict] = []

    def count(self, genome: Genome) -> int:
        return sum(layer.count(config) for layer, config in zip(self.layers, genome))

    def random_genome(self) -> Genome:
        return tuple(str(sample_layer_config(layer.space, self.rng)) for layer in self.layers)

    def repair(self, genome: Genome) -> Genome:
        """Step random forms down to the next smaller one until the genome fits the budget."""
        if self.budget is None:
            return genome
        configs = [GLoRALayerConfig.parse(text) for text in genome]
        total = self.count(genome)
        while total > self.budget:
            shrinkable = [
                (index, support)
                for index, (layer, config) in enumerate(zip(self.layers, configs))
                for support in SUPPORTS
                if layer.space.smaller_forms(support, getattr(config, support))
            ]
            index, support = self.rng.choice(shrinkable)  # non-empty: the smallest genome fits (checked up front)
            layer, config = self.layers[index], configs[index]
            smaller = layer.space.smaller_forms(support, getattr(config, support))[-1]
            before = layer.count(str(config))
            configs[index] = GLoRALayerConfig(**{**{s: getattr(config, s) for s in SUPPORTS}, support: smaller})
            total += layer.count(str(configs[index])) - before
        return tuple(str(config) for config in configs)

    def crossover(self, first: Genome, second: Genome) -> Genome:
        return tuple(a if self.rng.random() < 0.5 else b for a, b in zip(first, second))

    def mutate(self, genome: Genome, rate: float) -> Genome:
        return tuple(
            str(sample_layer_config(layer.space, self.rng)) if self.rng.random() < rate else config
            for layer, config in zip(self.layers, genome)
        )

    def score(self, genome: Genome) -> float:
        if genome not in self.fitness:
            parameters = self.count(genome)
            if self.budget is not None and parameters > self.budget:  # a guard: repair() makes this unreachable
                raise RuntimeError(
                    f"internal error: a subnet of {parameters} parameters exceeds the budget {self.budget}"
                )
            value = float(self.evaluate_fn(genome))
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"the held-out loss of a subnet is {value}; the supernet weights are not finite (diverged "
                    "training?)"
                )
            self.fitness[genome] = value
            self.evaluated.append({"parameters": parameters, "fitness": value})
        return self.fitness[genome]

    def sort_key(self, genome: Genome) -> tuple[float, int, Genome]:
        # lower loss first; ties: fewer parameters, then the configuration strings (deterministic)
        return self.fitness[genome], self.count(genome), genome


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


#: The largest population :func:`check_search_settings` accepts: every member is a full evaluation on the held-out
#: data per generation, so 100,000 (a typo for 100) ran for days; the GLoRA paper's search uses 50.
MAX_POPULATION_SIZE = 10_000


def check_search_settings(
    *,
    population_size: int = 16,
    iterations: int = 10,
    mutation_rate: float = 0.1,
    crossover_rate: float = 0.5,
    budget: int | None = None,
    seed: int = 0,
    timesteps: int | Sequence[int] = 4,
    batch_size: int = 8,
) -> None:
    """The search's numbers, checked at once (the CLI calls this before it loads anything; the search again before
    it scores anything): a bad one is a :class:`ConfigError` naming it, not a raw error after the held-out data
    were encoded (``batch_size=0`` was ``range() arg 3 must not be zero``, a seed above 2**64 - 1 torch's
    overflow, a rate ``"0.1"`` a raw ``TypeError``). Timesteps are checked against the schedule by
    :meth:`DenoisingFitness.fixed_timesteps`."""
    if not _is_whole(population_size) or not 2 <= population_size <= MAX_POPULATION_SIZE:
        raise ConfigError(
            f"population_size must be an integer from 2 to {MAX_POPULATION_SIZE:,} (each member is scored on the "
            f"held-out data in every generation), got {population_size!r}"
        )
    if not _is_whole(iterations) or iterations < 0:
        raise ConfigError(f"iterations must be an integer >= 0, got {iterations!r}")
    for name, rate in (("mutation_rate", mutation_rate), ("crossover_rate", crossover_rate)):
        if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0.0 <= rate <= 1.0:  # NaN fails too
            raise ConfigError(f"{name} must be a number in [0, 1], got {rate!r}")
    if budget is not None and (not _is_whole(budget) or budget < 0):
        raise ConfigError(f"budget must be a non-negative number of parameters, got {budget!r}")
    if not _is_whole(seed) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"seed must be an integer from 0 to 2**64 - 1 (torch's generator), got {seed!r}")
    if not _is_whole(batch_size) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if _is_whole(timesteps):
        if timesteps < 1:
            raise ConfigError(f"timesteps must be a count >= 1 or a list of timesteps, got {timesteps!r}")
    elif (
        isinstance(timesteps, (str, bytes))
        or not isinstance(timesteps, Sequence)
        or not timesteps
        or not all(_is_whole(t) and t >= 0 for t in timesteps)
    ):
        raise ConfigError(f"timesteps must be a count >= 1 or a non-empty list of integers >= 0, got {timesteps!r}")


def evolutionary_search(
    layers: Sequence[LayerSpace],
    evaluate: Callable[[Genome], float],
    *,
    population_size: int = 16,
    iterations: int = 10,
    mutation_rate: float = 0.1,
    crossover_rate: float = 0.5,
    budget: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> SearchResult:
    """The evolution itself, over per-layer choice spaces; ``evaluate(genome)`` returns a fitness (lower is better)
    for a tuple of configuration strings in the order of ``layers``. See the module docstring for the algorithm."""
    from tqdm.auto import tqdm

    if not layers:
        raise ConfigError("nothing to search: the supernet has no layers")
    check_search_settings(
        population_size=population_size,
        iterations=iterations,
        mutation_rate=mutation_rate,
        crossover_rate=crossover_rate,
        budget=budget,
        seed=seed,
    )
    evolution = _Evolution(layers, evaluate, budget, random.Random(seed))
    smallest = tuple(layer.smallest() for layer in layers)
    largest = tuple(str(layer.space.largest()) for layer in layers)
    if budget is not None:
        minimum = evolution.count(smallest)
        if minimum > budget:
            raise ConfigError(
                f"budget {budget:,} is below the smallest subnet of this supernet ({minimum:,} parameters); "
                f"raise the budget to at least {minimum:,} or add 'none' to the choice space"
            )
    space_size = math.prod(layer.space.size() for layer in layers)
    # A tiny space (tests) cannot supply population_size distinct subnets; never loop forever looking for new ones.
    max_attempts = 20 * population_size

    bar = tqdm(total=population_size * (iterations + 1), desc="GLoRA search", unit="subnet", disable=not progress)
    history: list[dict] = []

    def record(iteration: int, population: list[Genome]) -> None:
        best = population[0]
        scores = [evolution.fitness[g] for g in population]
        history.append(
            {
                "iteration": iteration,
                "best_fitness": evolution.fitness[best],
                "mean_fitness": sum(scores) / len(scores),
                "best_parameters": evolution.count(best),
                "evaluations": len(evolution.fitness),
            }
        )
        bar.set_postfix(best=f"{evolution.fitness[best]:.5f}", params=f"{evolution.count(best):,}")

    def new_candidates(make: Callable[[], Genome], wanted: int, seen: set[Genome]) -> list[Genome]:
        candidates: list[Genome] = []
        attempts = 0
        while len(candidates) < wanted and attempts < max_attempts and len(seen) < space_size:
            attempts += 1
            genome = evolution.repair(make())
            if genome in seen:
                continue
            seen.add(genome)
            candidates.append(genome)
        return candidates

    try:
        seen: set[Genome] = set()
        population = new_candidates(evolution.random_genome, population_size, seen)
        for genome in population:
            evolution.score(genome)
            bar.update(1)
        population.sort(key=evolution.sort_key)
        record(0, population)
        for iteration in range(1, iterations + 1):
            parents = population[: max(2, len(population) // 2)]

            def child(parents: list = parents) -> Genome:  # bound now: called only within this iteration
                if len(parents) >= 2 and evolution.rng.random() < crossover_rate:
                    first, second = evolution.rng.sample(parents, 2)
                    genome = evolution.crossover(first, second)
                else:
                    genome = evolution.rng.choice(parents)
                return evolution.mutate(genome, mutation_rate)

            children = new_candidates(child, population_size, seen)
            for genome in children:
                evolution.score(genome)
                bar.update(1)
            population = sorted(set(population) | set(children), key=evolution.sort_key)[:population_size]
            record(iteration, population)
    finally:
        bar.close()

    best = population[0]
    return SearchResult(
        configs={layer.path: config for layer, config in zip(layers, best)},
        parameters=evolution.count(best),
        fitness=evolution.fitness[best],
        history=history,
        evaluated=evolution.evaluated,
        settings={
            "population_size": population_size,
            "iterations": iterations,
            "mutation_rate": mutation_rate,
            "crossover_rate": crossover_rate,
            "budget": budget,
            "seed": seed,
            "layers": len(layers),
            "supernet_largest_parameters": evolution.count(largest),
            "smallest_parameters": evolution.count(smallest),
        },
    )


# --- on a UNet -----------------------------------------------------------------------------------------------


def search_glora(
    unet: nn.Module,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    noise_scheduler,
    *,
    added_cond_kwargs: Mapping[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
    population_size: int = 16,
    iterations: int = 10,
    mutation_rate: float = 0.1,
    crossover_rate: float = 0.5,
    budget: int | None = None,
    seed: int = 0,
    timesteps: int | Sequence[int] = 4,
    batch_size: int = 8,
    progress: bool = True,
) -> SearchResult:
    """Search the per-layer configuration of the GLoRA supernet ``adapter_name`` on ``unet``.

    Held-out data: ``latents`` (N, C, H, W; VAE latents times its scaling factor) with their ``encoder_hidden_states``
    (and SDXL's ``added_cond_kwargs``). Fitness: :class:`DenoisingFitness` at ``timesteps`` with noise fixed by
    ``seed``. ``budget``: the most trainable parameters the chosen fixed GLoRA may have (None: no limit). The same
    seed gives the same result. Afterwards the supernet evaluates the chosen subnet; save it with
    :func:`resattn_diffusion.search.supernet.save_subnet` (``result.configs``).
    """
    evolution = {
        "population_size": population_size,
        "iterations": iterations,
        "mutation_rate": mutation_rate,
        "crossover_rate": crossover_rate,
        "budget": budget,
        "seed": seed,
    }
    check_search_settings(**evolution, timesteps=timesteps, batch_size=batch_size)  # all before any work
    fitness = DenoisingFitness(
        unet,
        latents,
        encoder_hidden_states,
        noise_scheduler,
        timesteps=timesteps,
        seed=seed,
        added_cond_kwargs=added_cond_kwargs,
        batch_size=batch_size,
    )
    settings = {"timesteps": fitness.timesteps, "held_out_samples": int(latents.shape[0])}
    return search_supernet(unet, fitness, adapter_name=adapter_name, progress=progress, settings=settings, **evolution)


def search_supernet(
    model: nn.Module,
    fitness: Callable[[], float],
    *,
    adapter_name: str = "default",
    population_size: int = 16,
    iterations: int = 10,
    mutation_rate: float = 0.1,
    crossover_rate: float = 0.5,
    budget: int | None = None,
    seed: int = 0,
    progress: bool = True,
    settings: Mapping[str, Any] | None = None,
) -> SearchResult:
    """The evolutionary search of the GLoRA supernet ``adapter_name`` on any model (a UNet, a diffusion
    transformer), scoring each configuration by ``fitness()`` -- the held-out loss with that configuration active,
    lower is better (:class:`DenoisingFitness` for a UNet, :class:`~.flow_fitness.FlowMatchingFitness` for SD3 /
    Flux). Afterwards the supernet evaluates the chosen subnet; ``settings`` are recorded in the result."""
    check_search_settings(
        population_size=population_size,
        iterations=iterations,
        mutation_rate=mutation_rate,
        crossover_rate=crossover_rate,
        budget=budget,
        seed=seed,
    )
    modules = list(supernet_layers(model, adapter_name))
    _require_unfused(model, adapter_name)
    layers = [
        LayerSpace(path, GLoRAChoiceSpace.of_module(module), module.d_out, module.d_in, module.has_bias)
        for path, module in modules
    ]
    previous = get_subnet(model, adapter_name)

    def evaluate(genome: Genome) -> float:
        for (_, module), config in zip(modules, genome):
            module.set_active(config)
        return fitness()

    try:
        result = evolutionary_search(
            layers,
            evaluate,
            population_size=population_size,
            iterations=iterations,
            mutation_rate=mutation_rate,
            crossover_rate=crossover_rate,
            budget=budget,
            seed=seed,
            progress=progress,
        )
    except BaseException:
        set_subnet(model, previous, adapter_name)
        raise
    set_subnet(model, result.configs, adapter_name)
    result.settings.update({"adapter_name": adapter_name, **(settings or {})})
    return result
