"""``ResTunerConfig``: which tuner, where it sits, how strongly, and its hyperparameters. JSON round trip."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from .checks import check_item_count, check_scale
from .registry import get_tuner_spec, known_projections, known_targets
from .tuners.base import ConfigError, TunerParams, check_choice

#: Operations of a UNet transformer block that can get a tuner (each model family has its own targets:
#: ``resattn_diffusion.registry.known_targets()`` lists them all).
TARGETS = ("attn1", "attn2", "ff")
#: Linear projections of a UNet attention that a linear tuner (Res-LoRA, GLoRA, SURM) can sit beside.
#: On the ``ff`` target a linear tuner sits beside both of the feed-forward's linears.
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out")
#: Targets that name a feed-forward in some family: tuners that read an attention's frozen projections cannot sit
#: there.
_FEED_FORWARD_TARGETS = ("ff", "ff_context")
PLACEMENTS = ("parallel", "sequential")

_COMMON = ("tuner", "targets", "blocks", "projections", "placement", "scale")


class ResTunerConfig:
    """Configuration of one named tuner on a UNet or a diffusion transformer.

    Args:
        tuner: a registered tuner name (``resattn_diffusion.tuner_names()``), e.g. ``"res_attn"``.
        targets: operations of each transformer block that get a branch. On a UNet any of ``"attn1"``
            (self-attention), ``"attn2"`` (cross-attention), ``"ff"`` (feed-forward); on SD3 / Flux transformers
            ``"attn"`` (joint attention), ``"attn2"`` (SD3.5), ``"ff"``, ``"ff_context"``, and on Flux's single blocks
            ``"proj_mlp"`` / ``"proj_out"`` (linear tuners). ``None``: the model family's default (UNet: attn1 and
            attn2; SD3 / Flux: attn, and attn2 where a block has one).
        blocks: glob patterns on the transformer block's path selecting where tuners go, e.g. ``["up_blocks.*"]``
            or ``["mid_block", "up_blocks.1"]`` (a pattern also matches everything below the path it names).
            ``None`` means every transformer block. A pattern that matches no block is an error when the config
            is applied to a UNet.
        projections: for linear tuners (Res-LoRA, GLoRA, SURM), which attention projections get a branch:
            ``"to_q"``, ``"to_k"``, ``"to_v"``, ``"to_out"`` and, on the joint attention of SD3 / Flux, the text
            stream's ``"add_q_proj"``, ``"add_k_proj"``, ``"add_v_proj"``, ``"to_add_out"``. ``None``: every
            projection of the family (both streams on SD3 / Flux).
        placement: ``"parallel"`` (``y + s T(x)``, Res-Tuning) or ``"sequential"`` (``y + s T(y)``, U-Tuning).
        scale: the branch scale ``s``; 0 gives the frozen model exactly.
        **hyperparameters: the tuner's own (e.g. ``rank=8, heads=2`` for ``res_attn``); defaults otherwise.
    """

    def __init__(
        self,
        tuner: str = "res_attn",
        targets: Iterable[str] | None = None,
        blocks: Iterable[str] | None = None,
        projections: Iterable[str] | None = None,
        placement: str = "parallel",
        scale: float = 1.0,
        **hyperparameters: Any,
    ):
        self.spec = get_tuner_spec(tuner)
        self.tuner = tuner
        self.targets = None if targets is None else _as_tuple("targets", targets)
        self.blocks = None if blocks is None else _as_tuple("blocks", blocks)
        self.projections = None if projections is None else _as_tuple("projections", projections)
        self.placement = placement
        self.scale = check_scale(scale)
        self.params: TunerParams = self.spec.make_params(**hyperparameters)
        self.validate()

    # -- validation -------------------------------------------------------------------------------------------
    def validate(self) -> None:
        targets = self.targets or ()
        if self.targets is not None and not self.targets:
            raise ConfigError(
                f"targets is empty; choose from {list(known_targets())}, or None for the model's default"
            )
        for target in targets:
            check_choice("target", target, known_targets())
        for projection in self.projections or ():
            check_choice("projection", projection, known_projections())
        if self.spec.kind == "linear" and self.projections is not None and not self.projections:
            if not any(t in _FEED_FORWARD_TARGETS for t in targets):
                raise ConfigError(
                    f"{self.tuner} sits beside linear projections: give projections from {list(known_projections())}"
                )
        check_choice("placement", self.placement, PLACEMENTS)
        if self.placement == "sequential" and not getattr(self.spec.module_cls, "supports_sequential", True):
            raise ConfigError(
                f"{self.tuner} re-parameterises its own layer's weight and is parallel only; use placement='parallel'"
            )
        feed_forwards = [t for t in targets if t in _FEED_FORWARD_TARGETS]
        if (
            self.spec.kind == "operation"
            and feed_forwards
            and getattr(self.spec.module_cls, "needs_frozen_attention", False)
        ):
            raise ConfigError(
                f"{self.tuner} reads an attention's frozen projections and cannot sit on {feed_forwards[0]!r}; target "
                "attentions (UNet: attn1/attn2; SD3 / Flux: attn/attn2)"
            )
        if self.blocks is not None and not self.blocks:
            raise ConfigError("blocks is empty; use None for every transformer block, or patterns like 'up_blocks.*'")
        check_scale(self.scale)
        self.params.validate()

    # -- serialisation ----------------------------------------------------------------------------------------
    @property
    def hyperparameters(self) -> dict[str, Any]:
        return self.params.to_dict()

    def to_dict(self) -> dict[str, Any]:
        return {
            "tuner": self.tuner,
            "targets": None if self.targets is None else list(self.targets),
            "blocks": None if self.blocks is None else list(self.blocks),
            "projections": None if self.projections is None else list(self.projections),
            "placement": self.placement,
            "scale": self.scale,
            "hyperparameters": self.hyperparameters,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ResTunerConfig:
        if not isinstance(data, dict) or "tuner" not in data:
            raise ConfigError(
                'a tuner config is a JSON object with at least a \'tuner\' key, e.g. {"tuner": "res_attn"}'
            )
        data = dict(data)
        hyperparameters = data.pop("hyperparameters", None)
        if hyperparameters is None:
            hyperparameters = {}
        if not isinstance(hyperparameters, dict):
            raise ConfigError(
                f"hyperparameters must be a JSON object {{name: value}}, got {type(hyperparameters).__name__}"
            )
        unknown = set(data) - set(_COMMON)
        if unknown:
            raise ConfigError(
                f"unknown config key(s) {sorted(unknown)}; allowed: {list(_COMMON) + ['hyperparameters']}"
            )
        return cls(**data, **hyperparameters)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> ResTunerConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"tuner config is not valid JSON: {err}") from None
        except RecursionError:
            raise ConfigError("tuner config is not valid JSON: nested too deeply") from None
        return cls.from_dict(data)

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json())

    @classmethod
    def load(cls, path: str) -> ResTunerConfig:
        with open(path, encoding="utf-8") as f:
            try:
                text = f.read()
            except UnicodeDecodeError as err:  # a binary file passed as --tuner_config: say what it is not
                raise ConfigError(f"tuner config {str(path)!r} is not UTF-8 text (a JSON file): {err}") from None
        return cls.from_json(text)

    def replace(self, **changes: Any) -> ResTunerConfig:
        data = self.to_dict()
        hyper = data.pop("hyperparameters")
        for key, value in changes.items():
            (data if key in _COMMON else hyper)[key] = value
        return ResTunerConfig(**data, **hyper)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ResTunerConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        hyper = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters.items())
        return (
            f"ResTunerConfig(tuner={self.tuner!r}, targets={self.targets and list(self.targets)}, "
            f"blocks={self.blocks}, placement={self.placement!r}, scale={self.scale}, {hyper})"
        )


def _as_tuple(name: str, values: Iterable[str]) -> tuple[str, ...]:
    if isinstance(values, str):
        values = [values]
    try:
        out = tuple(values)
    except TypeError:
        raise ConfigError(f"{name} must be a list of strings, got {values!r}") from None
    check_item_count(name, out)
    for value in out:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a list of strings, got {values!r}")
    return out
