r"""GLoRA: generalised LoRA with a per-layer choice of support-tensor forms and a supernet (papers/glora.md).

For a frozen linear ``y = W0 x + b0`` (W0: d_out x d_in; ``b0 = 0`` when the layer has no bias):

    W' = W0 + W0 ⊙ A + B,        b' = b0 + b0 ⊙ D + E + W0 C

and the tuner is the parallel branch ``T(x) = W' x + b' - (W0 x + b0) = (W0 ⊙ A) x + B x + b0 ⊙ D + E + W0 C``,
affine in x, so it folds into the weight (:meth:`GLoRA.fold` returns ``dW = W0 ⊙ A + B``,
``db = b0 ⊙ D + E + W0 C``). It is defined relative to its own layer's W0, hence parallel only.

Forms of the support tensors (a layer's *configuration*, e.g. ``"A=lora4,B=lora4,C=vector,D=scalar,E=none"``):

* A, B ``lora<r>``: ``X = X_up X_down``, (d_out x r)(r x d_in) ........ ``r (d_out + d_in)`` parameters
* A, B ``vector``: (d_out, 1), one value per output row ............... ``d_out``
* A, B ``scalar``: one value everywhere ............................... ``1``
* C ``lora<r>``: ``C = C_up C_down``, (d_in x r)(r x 1) ............... ``r (d_in + 1)``
* C ``vector``: (d_in, 1), the whole column C ......................... ``d_in``
* D, E ``vector``: (d_out,), one value per output ..................... ``d_out``
* D, E ``scalar``: one value for all outputs .......................... ``1``
* any ``none``: the term is absent .................................... ``0``

So ``A = vector`` scales each output row of W0 (``(W0 ⊙ A) x = a ⊙ (W0 x)``) and ``B = vector`` adds
``b_i sum_j x_j`` to output i (B's rows are constant). C is d_in x 1 (``W0 C`` is d_out x 1), so its "vector"
is the full C and ``lora<r>`` factorises that column. On a layer without bias ``b0 ⊙ D = 0``: D is then
dropped (``has_bias=False``) so no parameter is left without a gradient.

Init (exact no-op, every zero factor still learns). Every term is a product with exactly one zero factor:
``A = A_up A_down`` with ``A_up = 0`` and ``A_down`` kaiming (same for B and ``C = C_up C_down``); vector and
scalar forms are zero. Gradients at the first step, with ``G = dL/dT`` (rows ``g_n``) and inputs ``x_n``:

* ``dL/dA = W0 ⊙ (sum_n g_n x_n^T)``, so ``dL/dA_up = (dL/dA) A_down^T != 0``, ``dL/da_vector = sum_n g_n ⊙ W0 x_n``,
  ``dL/da_scalar = sum_n g_n . W0 x_n`` -- non-zero because W0 is frozen and non-zero (A never multiplies
  another zero factor);
* ``dL/dB = sum_n g_n x_n^T``, so ``dL/dB_up = (dL/dB) B_down^T != 0``, ``dL/db_vector = sum_n g_n (1^T x_n)``
  (B's vector and scalar forms see x only through ``sum_j x_j``: zero-mean inputs give them no gradient);
* ``dL/dC = W0^T sum_n g_n``, so ``dL/dC_up = (dL/dC) C_down^T != 0``; ``dL/dD = b0 ⊙ sum_n g_n``;
  ``dL/dE = sum_n g_n``.

The lora factors ``*_down`` get their gradient once ``*_up`` has moved. Never are two factors of one product zero.

Supernet (as in the GLoRA paper): the module holds the largest form of each support in a choice space (lora
factors up to ``r_max``, plus the vector and scalar parameters) and evaluates any configuration of that space
(:meth:`GLoRA.set_active`; the choice space, drawing configurations and the search are
:mod:`resattn_diffusion.search`'s: :mod:`~resattn_diffusion.search.glora_space`, ``supernet``, ``evolution``);
``lora<r>`` uses the first r components ``X_up[:, :r] X_down[:r, :]`` of the shared
``r_max`` factors. :func:`num_parameters` counts a configuration's parameters (for the search's budget);
:meth:`GLoRA.fixed_state_dict` cuts the sub-network out as the state dict of a fixed-configuration module.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .base import ConfigError, LinearTuner, OpShape, TunerParams, init_down_projection

SUPPORTS: tuple[str, ...] = ("A", "B", "C", "D", "E")

#: The form kinds each support tensor allows ("lora" carries a rank: "lora4").
ALLOWED_KINDS: dict[str, tuple[str, ...]] = {
    "A": ("lora", "vector", "scalar", "none"),
    "B": ("lora", "vector", "scalar", "none"),
    "C": ("lora", "vector", "none"),
    "D": ("vector", "scalar", "none"),
    "E": ("vector", "scalar", "none"),
}

_LORA_FORM = re.compile(r"^lora(\d*)$")


def _allowed_text(support: str) -> str:
    return ", ".join("lora<r> (e.g. lora4)" if kind == "lora" else kind for kind in ALLOWED_KINDS[support])


def parse_form(support: str, text: str, default_rank: int | None = None) -> str:
    """The canonical form string of one support tensor: ``"lora<r>"``, ``"vector"``, ``"scalar"`` or ``"none"``.

    A bare ``"lora"`` takes ``default_rank`` (an error if there is none). Raises :class:`ConfigError` listing the
    allowed forms.
    """
    if support not in ALLOWED_KINDS:
        raise ConfigError(f"unknown GLoRA support tensor {support!r}; the support tensors are {list(SUPPORTS)}")
    form = str(text).strip().lower()
    match = _LORA_FORM.match(form)
    if match and "lora" in ALLOWED_KINDS[support]:
        if match.group(1):
            rank = int(match.group(1))
        elif default_rank is not None:
            rank = int(default_rank)
        else:
            raise ConfigError(f"GLoRA {support}={text!r}: give the rank, e.g. {support}=lora4")
        if rank < 1:
            raise ConfigError(f"GLoRA {support}={text!r}: the lora rank must be >= 1")
        return f"lora{rank}"
    if form in ALLOWED_KINDS[support]:  # "lora" never gets here: the branch above returned or raised
        return form
    raise ConfigError(f"GLoRA {support}={text!r} is not allowed; {support} may be one of: {_allowed_text(support)}")


def form_kind_and_rank(form: str) -> tuple[str, int]:
    """``"lora8" -> ("lora", 8)``, ``"vector" -> ("vector", 0)``."""
    if form.startswith("lora"):
        return "lora", int(form[4:])
    return form, 0


def _split_assignments(text: str, what: str) -> dict[str, str]:
    """``"A=x, b=y"`` -> ``{"A": "x", "B": "y"}`` with clear errors for malformed, unknown or repeated keys."""
    assignments: dict[str, str] = {}
    for item in str(text).split(","):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise ConfigError(f"GLoRA {what} item {item!r} has no '='; write e.g. 'A=lora4,B=vector,C=none'")
        key, value = (part.strip() for part in item.split("=", 1))
        key = key.upper()
        if key not in ALLOWED_KINDS:
            raise ConfigError(f"GLoRA {what}: unknown support tensor {key!r} in {text!r}; use {list(SUPPORTS)}")
        if key in assignments:
            raise ConfigError(f"GLoRA {what}: {key} is given twice in {text!r}")
        assignments[key] = value
    return assignments


# --- one layer's configuration ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class GLoRALayerConfig:
    """The forms of A, B, C, D, E for one layer, each canonical (``"lora4"``, ``"vector"``, ``"scalar"``, ``"none"``).

    ``str(config)`` is the short form ``"A=lora4,B=lora4,C=vector,D=scalar,E=none"``; :meth:`parse` reads it back.
    """

    A: str = "none"
    B: str = "none"
    C: str = "none"
    D: str = "none"
    E: str = "none"

    def __post_init__(self) -> None:
        for support in SUPPORTS:
            value = getattr(self, support)
            canonical = parse_form(support, value)
            if canonical != value:
                object.__setattr__(self, support, canonical)

    @classmethod
    def parse(cls, text: str, default_rank: int | None = None) -> GLoRALayerConfig:
        return parse_layer_config(text, default_rank)

    def form(self, support: str) -> tuple[str, int]:
        return form_kind_and_rank(getattr(self, support))

    def without_bias(self) -> GLoRALayerConfig:
        """The same configuration for a layer without bias: ``b0 ⊙ D = 0``, so D is dropped."""
        return GLoRALayerConfig(self.A, self.B, self.C, "none", self.E)

    def __str__(self) -> str:
        return format_layer_config(self)


def parse_layer_config(text: str, default_rank: int | None = None) -> GLoRALayerConfig:
    """Read ``"A=lora4,B=vector,C=none,D=scalar,E=vector"`` (keys in any order and case, spaces allowed).

    Omitted support tensors are ``none``; a bare ``lora`` takes ``default_rank``.
    """
    if isinstance(text, GLoRALayerConfig):
        return text
    assignments = _split_assignments(text, "configuration")
    return GLoRALayerConfig(**{key: parse_form(key, value, default_rank) for key, value in assignments.items()})


def format_layer_config(config: GLoRALayerConfig) -> str:
    """The canonical short form, every support named: ``"A=lora4,B=lora4,C=vector,D=scalar,E=none"``."""
    return ",".join(f"{support}={getattr(config, support)}" for support in SUPPORTS)


def num_parameters(config: GLoRALayerConfig | str, d_out: int, d_in: int, has_bias: bool = True) -> int:
    """Trainable parameters of a layer in this configuration (D counts 0 on a layer without bias):

    A, B: ``lora<r>`` r (d_out + d_in), ``vector`` d_out, ``scalar`` 1; C: ``lora<r>`` r (d_in + 1), ``vector`` d_in;
    D, E: ``vector`` d_out, ``scalar`` 1; ``none`` 0.
    """
    config = parse_layer_config(config)
    total = 0
    for support in SUPPORTS:
        kind, rank = config.form(support)
        if kind == "none" or (support == "D" and not has_bias):
            continue
        if support == "C":
            total += rank * (d_in + 1) if kind == "lora" else d_in
        elif kind == "lora":
            total += rank * (d_out + d_in)
        elif kind == "vector":
            total += d_out
        else:
            total += 1
    return total


# --- the forms a supernet holds ------------------------------------------------------------------------------
# The ``choices`` hyperparameter's syntax and default live here because the module allocates its parameters from
# them; the choice space as the search uses it (membership, size, sampling, stepping forms down) is
# :class:`resattn_diffusion.search.glora_space.GLoRAChoiceSpace`.

#: Forms per support tensor, each a non-empty tuple of canonical forms: what a supernet layer holds.
FormChoices = dict[str, tuple[str, ...]]


def form_size_key(form: str) -> tuple[int, int]:
    """Orders forms by size: none < scalar < vector < lora<r> (by r)."""
    kind, rank = form_kind_and_rank(form)
    return {"none": 0, "scalar": 1, "vector": 2, "lora": 3}[kind], rank


def canonical_form_choices(
    support: str, choices: str | tuple[str, ...], default_rank: int | None = None
) -> tuple[str, ...]:
    """The canonical, de-duplicated forms of one support (a single form may be given as a string)."""
    if isinstance(choices, str):
        choices = (choices,)
    canonical = tuple(dict.fromkeys(parse_form(support, choice, default_rank) for choice in choices))
    if not canonical:
        raise ConfigError(f"GLoRA choice space: {support} needs at least one form")
    return canonical


def paper_form_choices(rank: int) -> FormChoices:
    """The GLoRA paper's space at rank r: lora r and r/2, vector, scalar, none (C without scalar, D/E without
    lora). The default of :attr:`GLoRAParams.choices`."""
    loras = tuple(dict.fromkeys(f"lora{r}" for r in (rank, rank // 2) if r >= 1))
    return {
        "A": loras + ("vector", "scalar", "none"),
        "B": loras + ("vector", "scalar", "none"),
        "C": loras + ("vector", "none"),
        "D": ("vector", "scalar", "none"),
        "E": ("vector", "scalar", "none"),
    }


def parse_form_choices(text: str, default_rank: int | None = None) -> FormChoices:
    """Read ``"A=lora8|lora4|vector,B=none,..."`` (omitted supports are ``none``; a bare ``lora`` takes
    ``default_rank``)."""
    assignments = _split_assignments(text, "choice space")
    choices = {support: ("none",) for support in SUPPORTS}
    for support, value in assignments.items():
        forms = tuple(choice for choice in value.split("|") if choice.strip())
        choices[support] = canonical_form_choices(support, forms, default_rank)
    return choices


def format_form_choices(choices: Mapping[str, tuple[str, ...]]) -> str:
    """The short form read by :func:`parse_form_choices`, every support named."""
    return ",".join(f"{support}={'|'.join(choices[support])}" for support in SUPPORTS)


def largest_forms(choices: Mapping[str, tuple[str, ...]]) -> GLoRALayerConfig:
    """The configuration with the largest form of every support (lora of the highest rank > vector > scalar >
    none): what a supernet holds parameters for."""
    return GLoRALayerConfig(**{support: max(choices[support], key=form_size_key) for support in SUPPORTS})


def check_lora_ranks(config: GLoRALayerConfig, shape: OpShape, where: str) -> None:
    """A and B's lora rank must not exceed ``min(d_in, d_out)`` (a higher rank adds parameters, not expressiveness)."""
    limit = min(shape.in_dim, shape.out_dim)
    for support in ("A", "B"):
        kind, rank = config.form(support)
        if kind == "lora" and rank > limit:
            raise ConfigError(
                f"GLoRA {where}: {support}=lora{rank} exceeds min(d_in, d_out) = {limit} of a "
                f"{shape.in_dim} -> {shape.out_dim} layer; use a rank <= {limit}"
            )


@dataclass
class GLoRAParams(TunerParams):
    """GLoRA hyperparameters.

    * ``rank``: the rank of a bare ``lora`` in ``config``, ``overrides`` and ``choices``.
    * ``config``: the default layer configuration (short form; omitted support tensors are ``none``).
    * ``overrides``: name pattern -> configuration for the layers it matches (see :meth:`for_layer`), e.g.
      ``{"up_blocks.*.attn2.to_k": "A=lora8,B=lora8", "*.attn1": "A=vector,E=scalar"}``. Exact layer paths are
      patterns too (the structure search writes its result that way).
    * ``supernet``: hold the largest forms of ``choices`` and evaluate sampled configurations.
    * ``choices``: the supernet's choice space in short form (``"A=lora8|lora4|vector|scalar|none,..."``);
      empty = :func:`paper_form_choices` at ``rank``. ``config``/``overrides`` are unused by a supernet.
    """

    rank: int = 4
    config: str = "A=lora,B=lora,C=vector,D=scalar,E=vector"
    overrides: dict[str, str] = field(default_factory=dict)
    supernet: bool = False
    choices: str = ""

    def validate(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ConfigError(f"GLoRA rank must be a positive integer, got {self.rank!r}")
        self.layer_config()
        if not isinstance(self.overrides, Mapping):
            raise ConfigError(
                f"GLoRA overrides must be a mapping pattern -> configuration, got {type(self.overrides).__name__}"
            )
        for pattern in self.overrides:
            if not isinstance(pattern, str) or not pattern:
                raise ConfigError(f"GLoRA override patterns must be non-empty strings, got {pattern!r}")
            try:
                self.layer_config(pattern)
            except ConfigError as error:
                raise ConfigError(f"GLoRA override {pattern!r}: {error}") from None
        if not isinstance(self.supernet, bool):
            raise ConfigError(f"GLoRA supernet must be true or false, got {self.supernet!r}")
        self.form_choices()

    def validate_for(self, shape: OpShape) -> None:
        if shape.in_dim < 1 or shape.out_dim < 1:
            raise ConfigError(f"GLoRA needs positive in_dim and out_dim, got {shape.in_dim} -> {shape.out_dim}")
        if self.supernet:
            check_lora_ranks(largest_forms(self.form_choices()), shape, "the choice space")
        else:
            # Overrides are checked by the module built for the layers they match (they may not match this one).
            check_lora_ranks(self.layer_config(), shape, "config")

    def matching_override(self, layer_path: str) -> str | None:
        """The override pattern that decides ``layer_path``'s configuration, or None (the default ``config``).

        A pattern matches a layer when ``fnmatch`` (case-sensitive; ``*`` also crosses dots) matches the layer's
        path or one of its parents, like block patterns: ``"up_blocks.1"`` and ``"*.attn1"`` match every layer
        below them. When several patterns match, the most specific wins: an exact path (no wildcard) first,
        then the pattern with the most literal (non-wildcard) characters, and among equals the one listed last.
        """
        best: tuple[tuple[bool, int, int], str] | None = None
        for index, pattern in enumerate(self.overrides):
            if not override_matches(pattern, layer_path):
                continue
            rank = (pattern == layer_path, _literal_length(pattern), index)
            if best is None or rank > best[0]:
                best = (rank, pattern)
        return None if best is None else best[1]

    def for_layer(self, layer_path: str) -> GLoRAParams:
        """The parameters of one layer: a copy with ``config`` set to the override that wins for ``layer_path``
        (:meth:`matching_override`) and no overrides. A supernet ignores ``config`` and ``overrides``."""
        if self.supernet or not self.overrides:
            return self
        pattern = self.matching_override(layer_path)
        config = self.config if pattern is None else self.overrides[pattern]
        return replace(self, config=config, overrides={})

    def validate_layers(self, layer_paths: list[str]) -> None:
        """Every override pattern must match at least one of the layers the tuner sits on."""
        if self.supernet or not self.overrides:
            return
        for pattern in self.overrides:
            if not any(override_matches(pattern, path) for path in layer_paths):
                example = layer_paths[0] if layer_paths else "(none)"
                raise ConfigError(
                    f"GLoRA override pattern {pattern!r} matches none of the {len(layer_paths)} layers this tuner "
                    f"sits on (they are named like {example!r}); fix the pattern, e.g. 'up_blocks.*.attn2.to_k' or "
                    "'*.attn1', or check the config's targets, blocks and projections"
                )

    def layer_config(self, override_pattern: str | None = None) -> GLoRALayerConfig:
        """The default configuration, or the one ``overrides[override_pattern]`` gives."""
        text = self.config if override_pattern is None else self.overrides[override_pattern]
        return parse_layer_config(text, default_rank=self.rank)

    def form_choices(self) -> FormChoices:
        """The supernet's forms per support: ``choices`` read, or the paper's space at ``rank`` when it is empty."""
        if not str(self.choices).strip():
            return paper_form_choices(self.rank)
        return parse_form_choices(self.choices, default_rank=self.rank)


def override_matches(pattern: str, layer_path: str) -> bool:
    """Whether an override pattern selects ``layer_path``: an ``fnmatch`` of the path or of one of its parents."""
    return fnmatch.fnmatchcase(layer_path, pattern) or fnmatch.fnmatchcase(layer_path, pattern + ".*")


def _literal_length(pattern: str) -> int:
    """Characters of a pattern that are not wildcards (a ``[...]`` set counts as one): its specificity."""
    without_sets = re.sub(r"\[[^\]]*\]", "#", pattern)
    return len(without_sets.replace("*", "").replace("?", ""))


# --- the module ------------------------------------------------------------------------------------------------


class GLoRA(LinearTuner):
    r"""GLoRA branch ``T(x) = (W0 ⊙ A) x + B x + b0 ⊙ D + E + W0 C`` beside a frozen ``y = W0 x + b0``.

    ``GLoRA(shape, params)`` builds the fixed configuration ``params.config`` (or ``layer_config`` when the
    integration resolved an override) -- or, with ``params.supernet``, every form of ``params.form_choices()``
    (:attr:`held_forms`), active configuration its largest until :meth:`set_active`. ``has_bias=False`` (a layer
    without bias) drops D. Formulas, shapes, init and the first-step gradient argument: see the module docstring.

    Parameters are named ``<support>_<form>[_up|_down]`` (``A_lora_up``: d_out x r, ``A_lora_down``: r x d_in,
    ``A_vector``: d_out, ``A_scalar``: 1, ``C_lora_up``: d_in x r, ``C_lora_down``: r x 1, ``C_vector``: d_in, ...),
    the same in fixed and supernet modules (a supernet's lora factors have r_max components).
    """

    supports_sequential: ClassVar[bool] = False
    #: ``fold`` is differentiable in every support tensor: the GPU fast path runs ``W0 + T`` as one GEMM.
    mergeable: ClassVar[bool] = True
    #: H100 run 1 (issue 14, SD 1.5 batch 4 fp16): merged 0.356 s/step vs branch 0.318 s -- the branch stays the
    #: automatic choice on CUDA until a run measures the merged path faster (gpu_run2's ``glora [fast]`` row).
    merge_on_cuda: ClassVar[bool] = False

    def __init__(
        self,
        shape: OpShape,
        params: GLoRAParams,
        layer_config: GLoRALayerConfig | str | None = None,
        has_bias: bool | None = None,
    ):
        super().__init__()
        if has_bias is None:
            has_bias = shape.has_bias
        params.validate()
        params.validate_for(shape)
        self.d_out = shape.out_dim
        self.d_in = shape.in_dim
        self.has_bias = has_bias
        self.supernet = params.supernet
        if params.supernet:
            held = params.form_choices()
            if not has_bias:
                held["D"] = ("none",)  # b0 ⊙ D = 0 without a bias
            initial = largest_forms(held)
        else:
            config = params.layer_config() if layer_config is None else parse_layer_config(layer_config, params.rank)
            check_lora_ranks(config, shape, f"layer configuration {config}")
            if not has_bias:
                config = config.without_bias()
            held = {support: (getattr(config, support),) for support in SUPPORTS}
            initial = config
        #: per support, the forms this module can evaluate (a fixed module: its one configuration's)
        self.held_forms: FormChoices = held

        #: per support: the largest lora rank held (0: none) and the non-lora kinds held
        self.held_lora_rank: dict[str, int] = {}
        self.held_kinds: dict[str, set[str]] = {}
        for support in SUPPORTS:
            kinds_and_ranks = [form_kind_and_rank(form) for form in held[support]]
            self.held_lora_rank[support] = max((rank for kind, rank in kinds_and_ranks if kind == "lora"), default=0)
            self.held_kinds[support] = {kind for kind, _ in kinds_and_ranks if kind not in ("lora", "none")}
            self._make_parameters(support)
        self.set_active(initial)

    def _make_parameters(self, support: str) -> None:
        d_out, d_in = self.d_out, self.d_in
        rank = self.held_lora_rank[support]
        if rank:
            rows, cols = (d_in, 1) if support == "C" else (d_out, d_in)
            up = nn.Parameter(torch.zeros(rows, rank))
            down = nn.Parameter(torch.empty(rank, cols))
            init_down_projection(down)
            self.register_parameter(f"{support}_lora_up", up)
            self.register_parameter(f"{support}_lora_down", down)
        if "vector" in self.held_kinds[support]:
            self.register_parameter(f"{support}_vector", nn.Parameter(torch.zeros(d_in if support == "C" else d_out)))
        if "scalar" in self.held_kinds[support]:
            self.register_parameter(f"{support}_scalar", nn.Parameter(torch.zeros(1)))

    # -- configuration --------------------------------------------------------------------------------------------

    def can_serve(self, config: GLoRALayerConfig) -> bool:
        for support in SUPPORTS:
            kind, rank = config.form(support)
            if kind == "lora" and rank > self.held_lora_rank[support]:
                return False
            if kind in ("vector", "scalar") and kind not in self.held_kinds[support]:
                return False
        return True

    def set_active(self, config: GLoRALayerConfig | str) -> None:
        """Evaluate ``config`` from now on (supernet: any configuration the held forms cover; lora r <= r_max)."""
        config = parse_layer_config(config)
        if not self.has_bias:
            config = config.without_bias()
        if not self.can_serve(config):
            raise ConfigError(f"this GLoRA module cannot evaluate {config}; it holds {self.describe_held()}")
        self.active_config = config
        # parsed once here, so that the forward pass only does dictionary look-ups
        self._active_forms = {support: config.form(support) for support in SUPPORTS}

    def describe_held(self) -> str:
        """What the module can evaluate, e.g. ``"A: lora<=8|vector|scalar|none, B: ..."``."""
        parts = []
        for support in SUPPORTS:
            forms = [f"lora<={self.held_lora_rank[support]}"] if self.held_lora_rank[support] else []
            forms += sorted(self.held_kinds[support]) + ["none"]
            parts.append(f"{support}: {'|'.join(forms)}")
        return ", ".join(parts)

    def num_active_parameters(self) -> int:
        """Parameters used by the active configuration (:func:`num_parameters` of it)."""
        return num_parameters(self.active_config, self.d_out, self.d_in, self.has_bias)

    def fixed_state_dict(self, config: GLoRALayerConfig | str | None = None) -> dict[str, torch.Tensor]:
        """The sub-network for ``config`` (default: the active one) as the state dict of a fixed-configuration
        GLoRA module of that configuration (lora factors cut to their first r components; tensors detached clones)."""
        config = self.active_config if config is None else parse_layer_config(config)
        if not self.has_bias:
            config = config.without_bias()
        if not self.can_serve(config):
            raise ConfigError(f"this GLoRA module cannot evaluate {config}; it holds {self.describe_held()}")
        state: dict[str, torch.Tensor] = {}
        for support in SUPPORTS:
            kind, rank = config.form(support)
            if kind == "lora":
                state[f"{support}_lora_up"] = getattr(self, f"{support}_lora_up")[:, :rank].detach().clone()
                state[f"{support}_lora_down"] = getattr(self, f"{support}_lora_down")[:rank].detach().clone()
            elif kind != "none":
                state[f"{support}_{kind}"] = getattr(self, f"{support}_{kind}").detach().clone()
        return state

    # -- support tensors of the active configuration -------------------------------------------------------------

    def _lora_factors(self, support: str) -> tuple[torch.Tensor, torch.Tensor]:
        _, rank = self._active_forms[support]
        up, down = getattr(self, f"{support}_lora_up"), getattr(self, f"{support}_lora_down")
        if rank == down.shape[0]:
            # The whole factors (every fixed module, a supernet at r_max): no slice to dispatch here and no
            # slice_backward in the backward pass.
            return up, down
        return up[:, :rank], down[:rank]

    def _weight_support(self, support: str) -> torch.Tensor | None:
        """A or B, broadcastable to d_out x d_in: lora (d_out, d_in), vector (d_out, 1), scalar (1,), none None."""
        kind, _ = self._active_forms[support]
        if kind == "lora":
            up, down = self._lora_factors(support)
            return up @ down
        if kind == "vector":
            return getattr(self, f"{support}_vector").unsqueeze(-1)
        if kind == "scalar":
            return getattr(self, f"{support}_scalar")
        return None

    def _weight_delta(self, weight: torch.Tensor) -> torch.Tensor | None:
        """``W0 ⊙ A + B`` in the dtype the ops promote to (None when A and B are none). A lora B rides on the
        product as one ``addmm`` (``W0 ⊙ A + B_up B_down``) instead of a matmul and an add."""
        a = self._weight_support("A")
        delta = None if a is None else weight * a
        kind_b, _ = self._active_forms["B"]
        if kind_b == "lora" and delta is not None:
            up, down = self._lora_factors("B")
            return torch.addmm(delta, up.to(delta.dtype), down.to(delta.dtype))
        if kind_b != "none":
            b = self._weight_support("B")
            return b.expand_as(weight) if delta is None else delta + b
        return delta

    def _bias_delta(self, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        """``b0 ⊙ D + E + W0 C`` as a (d_out,) tensor in the weight's dtype, or None when every term is absent.

        At most one op per term: ``addmv`` puts ``W0 C`` onto E and ``addcmul`` puts ``b0 ⊙ D`` onto that (the
        parameters cast to the weight's dtype: these fused ops take one dtype; casting the small parameters, never
        the d_out x d_in weight)."""
        dtype = weight.dtype
        kind_e, _ = self._active_forms["E"]
        total = None if kind_e == "none" else getattr(self, f"E_{kind_e}").to(dtype)
        kind_c, _ = self._active_forms["C"]
        if kind_c != "none":
            if kind_c == "lora":
                up, down = self._lora_factors("C")
                column = (up @ down).squeeze(-1).to(dtype)
            else:
                column = self.C_vector.to(dtype)
            total = weight @ column if total is None else torch.addmv(total, weight, column)
        kind_d, _ = self._active_forms["D"]
        if bias is not None and kind_d != "none":
            d = getattr(self, f"D_{kind_d}").to(dtype)
            total = bias * d if total is None else torch.addcmul(total, bias, d)
        if total is not None and total.shape[0] != self.d_out:
            total = total.expand(self.d_out)  # E scalar alone: its one value for every output
        return total

    # -- LinearTuner ------------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``T(x)``. With A = lora one dense matmul with ``W0 ⊙ A + B``, the bias terms riding on it as its bias;
        with A = vector/scalar ``a ⊙ (W0 x) + B x``; a lora B alone runs as two thin matmuls, a vector/scalar B as
        ``b (1^T x)``."""
        dtype = x.dtype
        kind_a, _ = self._active_forms["A"]
        kind_b, _ = self._active_forms["B"]
        bias_delta = self._bias_delta(weight, bias)
        if bias_delta is not None:
            bias_delta = bias_delta.to(dtype)
        if kind_a == "lora":
            return F.linear(x, self._weight_delta(weight).to(dtype), bias_delta)
        out: torch.Tensor | None = None
        a = self._weight_support("A")
        if a is not None:
            out = F.linear(x, weight.to(dtype)) * a.squeeze(-1).to(dtype)
        if kind_b != "none":
            if kind_b == "lora":
                up, down = self._lora_factors("B")
                b_x = F.linear(F.linear(x, down.to(dtype)), up.to(dtype))
            else:
                b_x = x.sum(dim=-1, keepdim=True) * getattr(self, f"B_{kind_b}").to(dtype).expand(self.d_out)
            out = b_x if out is None else out + b_x
        if bias_delta is not None:
            out = bias_delta.expand(*x.shape[:-1], self.d_out) if out is None else out + bias_delta
        if out is None:
            out = x.new_zeros(*x.shape[:-1], self.d_out)
        return out

    def fold(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(dW, db)`` with ``T(x) = dW x + db`` exactly: ``dW = W0 ⊙ A + B`` (zeros when A and B are none),
        ``db = b0 ⊙ D + E + W0 C`` or None when the configuration has no bias term. A layer without bias gets a
        bias from a C or E term: the integration must then add one when fusing (and drop it when unfusing).
        Computed in the wider of the weight's and the parameters' dtypes, returned in the weight's dtype."""
        parameter_dtype = self._parameter_dtype()
        # the merged GPU path runs this every step: no promote_types op when the dtypes already agree
        compute_dtype = (
            weight.dtype if weight.dtype == parameter_dtype else torch.promote_types(weight.dtype, parameter_dtype)
        )
        weight_c = weight.to(compute_dtype)
        bias_c = None if bias is None else bias.to(compute_dtype)
        delta_weight = self._weight_delta(weight_c)
        if delta_weight is None:
            delta_weight = torch.zeros_like(weight_c)
        bias_delta = self._bias_delta(weight_c, bias_c)
        return delta_weight.to(weight.dtype), None if bias_delta is None else bias_delta.to(weight.dtype)

    def _parameter_dtype(self) -> torch.dtype:
        first = next(iter(self.parameters()), None)
        return torch.float32 if first is None else first.dtype

    def extra_repr(self) -> str:
        mode = f"supernet over {format_form_choices(self.held_forms)}" if self.supernet else "fixed"
        return f"d_out={self.d_out}, d_in={self.d_in}, {mode}, active={self.active_config}"


__all__ = [
    "ALLOWED_KINDS",
    "FormChoices",
    "GLoRA",
    "GLoRALayerConfig",
    "GLoRAParams",
    "SUPPORTS",
    "canonical_form_choices",
    "form_size_key",
    "format_form_choices",
    "format_layer_config",
    "largest_forms",
    "num_parameters",
    "override_matches",
    "paper_form_choices",
    "parse_form",
    "parse_form_choices",
    "parse_layer_config",
]
