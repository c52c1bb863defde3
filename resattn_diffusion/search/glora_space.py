"""GLoRA's choice space as the structure search uses it: which forms each support tensor may take on a layer, its
size, membership, drawing a configuration from it and stepping a form down to a smaller one.

The forms themselves, the ``choices`` hyperparameter's syntax and the supernet module that holds them are the
formula's (:mod:`resattn_diffusion.tuners.glora`); this module builds on them and never the other way round.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..tuners.glora import (
    SUPPORTS,
    FormChoices,
    GLoRA,
    GLoRALayerConfig,
    canonical_form_choices,
    form_size_key,
    format_form_choices,
    largest_forms,
    paper_form_choices,
    parse_form_choices,
)

__all__ = ["GLoRAChoiceSpace", "sample_layer_config"]


@dataclass(frozen=True)
class GLoRAChoiceSpace:
    """The forms a supernet layer may take, per support tensor (each a non-empty tuple of canonical forms).

    Short form: ``"A=lora8|lora4|vector|scalar|none,B=...,C=lora8|vector|none,D=vector|scalar|none,E=..."``.
    """

    A: tuple[str, ...] = ("none",)
    B: tuple[str, ...] = ("none",)
    C: tuple[str, ...] = ("none",)
    D: tuple[str, ...] = ("none",)
    E: tuple[str, ...] = ("none",)

    def __post_init__(self) -> None:
        for support in SUPPORTS:
            object.__setattr__(self, support, canonical_form_choices(support, getattr(self, support)))

    @classmethod
    def default(cls, rank: int) -> GLoRAChoiceSpace:
        """The GLoRA paper's space at rank r (:func:`~resattn_diffusion.tuners.glora.paper_form_choices`)."""
        return cls(**paper_form_choices(rank))

    @classmethod
    def parse(cls, text: str, default_rank: int | None = None) -> GLoRAChoiceSpace:
        return cls(**parse_form_choices(text, default_rank))

    @classmethod
    def of_module(cls, module: GLoRA) -> GLoRAChoiceSpace:
        """The space a GLoRA module can evaluate (a supernet's choices, without D on a bias-free layer)."""
        return cls(**module.held_forms)

    def __str__(self) -> str:
        return format_form_choices(self.as_dict())

    def as_dict(self) -> FormChoices:
        return {support: self.choices(support) for support in SUPPORTS}

    def choices(self, support: str) -> tuple[str, ...]:
        return getattr(self, support)

    def contains(self, config: GLoRALayerConfig) -> bool:
        return all(getattr(config, support) in self.choices(support) for support in SUPPORTS)

    def size(self) -> int:
        """The number of distinct layer configurations."""
        return math.prod(len(self.choices(support)) for support in SUPPORTS)

    def largest(self) -> GLoRALayerConfig:
        """The configuration with the largest form of every support (lora of the highest rank > vector > scalar >
        none)."""
        return largest_forms(self.as_dict())

    def smallest(self) -> GLoRALayerConfig:
        """The configuration with the smallest form of every support."""
        return GLoRALayerConfig(**{s: min(self.choices(s), key=form_size_key) for s in SUPPORTS})

    def smaller_forms(self, support: str, form: str) -> list[str]:
        """The forms of ``support`` in this space smaller than ``form``, smallest first."""
        smaller = (f for f in self.choices(support) if form_size_key(f) < form_size_key(form))
        return sorted(smaller, key=form_size_key)

    def without_bias(self) -> GLoRAChoiceSpace:
        """The space for a layer without bias: D is always ``none``."""
        return GLoRAChoiceSpace(self.A, self.B, self.C, ("none",), self.E)


def sample_layer_config(
    space: GLoRAChoiceSpace | Mapping[str, tuple[str, ...]], generator: torch.Generator | random.Random
) -> GLoRALayerConfig:
    """A configuration drawn uniformly (each support independently) from ``space``; reproducible for a seeded
    ``torch.Generator`` or ``random.Random``. ``space`` may also be a module's :attr:`~GLoRA.held_forms` (what the
    per-step sampling passes, to skip re-validating forms the module already holds)."""
    forms = space.as_dict() if isinstance(space, GLoRAChoiceSpace) else space
    picks = {}
    for support in SUPPORTS:
        choices = forms[support]
        if isinstance(generator, random.Random):
            index = generator.randrange(len(choices))
        elif isinstance(generator, torch.Generator):
            index = int(torch.randint(len(choices), (1,), generator=generator).item())
        else:
            raise TypeError(f"generator must be a torch.Generator or random.Random, got {type(generator).__name__}")
        picks[support] = choices[index]
    return GLoRALayerConfig(**picks)
