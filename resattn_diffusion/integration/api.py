"""The core API: install, scale, switch, fuse and remove named tuners on a UNet or a diffusion transformer.

Every call asks the model's family (``families/``: which blocks, operations, projections) and the tuner's kind
(``kinds/``: how such a tuner attaches, detaches, lists its parts and settings, fuses) and knows neither itself.
Shared state (the model's configs and banks) lives in ``state.py``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator

import torch
from torch import nn

from ..checks import check_adapter_name, check_call_scale, check_enabled, check_model, check_scale
from ..config import ResTunerConfig
from ..tuners.base import ConfigError
from .families import family_of
from .families.base import LAYERWISE_CASTING_REFUSAL, Layer, layerwise_casting_active
from .families.unet import attention_shape, transformer_blocks
from .kinds import kind_of
from .kinds.layers import LayerKind, layer_fingerprint, tuner_input_shape
from .processors import SCALE_KWARG, TunerSetting
from .state import STATE_ATTR, ResTunerError, ResTunerState, get_state, remove_forward_hooks
from .state import require_name as _require_name

__all__ = [
    "Layer",
    "ResTunerError",
    "ResTunerState",
    "STATE_ATTR",
    "add_res_tuner",
    "attention_shape",
    "check_layer_scales_apply",
    "find_layers",
    "format_summary",
    "fuse_res_tuner",
    "get_res_tuner_configs",
    "get_state",
    "iter_tuners",
    "layer_fingerprint",
    "remove_forward_hooks",
    "remove_res_tuner",
    "res_tuner_parameters",
    "res_tuner_settings",
    "res_tuner_summary",
    "set_res_tuner_enabled",
    "set_res_tuner_layer_scales",
    "set_res_tuner_scale",
    "transformer_blocks",
    "tuner_input_shape",
    "unfuse_res_tuner",
]


def find_layers(model: nn.Module, config: ResTunerConfig) -> list[Layer]:
    """The layers a per-layer tuner (operation or linear kind) of ``config`` sits on, in module order."""
    kind = kind_of(config)
    if not isinstance(kind, LayerKind):
        raise ResTunerError(f"tuner kind {config.spec.kind!r} is not attached per layer")
    family = family_of(model)
    family.check_kind(config)
    return kind.layers(model, family, config)


def expected_fingerprint(model: nn.Module, config: ResTunerConfig) -> dict[str, dict]:
    """Path -> shape of every place ``config`` puts a tuner on ``model``: what a tuner file must agree with.
    Raises (changing nothing) when ``config`` cannot sit on ``model``."""
    family = family_of(model)
    family.check_kind(config)
    return kind_of(config).fingerprint(model, family, config)


# --- per-call scale from the model's attention kwargs ----------------------------------------------------------
@functools.cache
def _positional_index(model_cls: type, name: str) -> int | None:
    """Where the forward argument ``name`` of ``model_cls`` sits among the positional arguments after ``self``, or
    None where it cannot be passed positionally (keyword-only, after ``*args``, absent). Once per class."""
    try:
        params = list(inspect.signature(model_cls.forward).parameters.values())[1:]
    except (TypeError, ValueError):  # no signature to read: only the keyword is seen
        return None
    for index, param in enumerate(params):
        if param.kind not in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            return None
        if param.name == name:
            return index
    return None


def _scale_pre_hook(model: nn.Module, args: tuple, kwargs: dict):
    state = get_state(model)
    key = state.family.call_kwargs
    position = None
    if key in kwargs:
        call_kwargs = kwargs[key]
    else:
        # passed positionally (``unet(sample, t, ehs, None, None, None, {"res_tuner_scale": 0.5})``): the linear
        # tuners would run at their own scale, silently. The position is read once per class (a cached look-up);
        # while compiling, dynamo traces the function itself (it warns that it skips a cache it is given).
        lookup = _positional_index.__wrapped__ if torch.compiler.is_compiling() else _positional_index
        position = lookup(type(model), key)
        if position is None or len(args) <= position:
            return None
        call_kwargs = args[position]
    if not call_kwargs or SCALE_KWARG not in call_kwargs:
        return None
    call_kwargs = dict(call_kwargs)
    scale = call_kwargs.pop(SCALE_KWARG)
    if scale is not None:  # None: no per-call override
        check_call_scale(scale, state.configs)  # once per model call, before any work, so nothing is half-applied
        _refuse_call_scale_of_fused(state, scale)
        _refuse_call_scale_under_checkpointing(model)
        for bank, _ in state.banks:
            bank.call_scale = scale
    if position is not None:
        return (*args[:position], call_kwargs or None, *args[position + 1 :]), kwargs
    kwargs = dict(kwargs)
    kwargs[key] = call_kwargs or None
    return args, kwargs


def _refuse_call_scale_of_fused(state: ResTunerState, scale: float | dict[str, float]) -> None:
    """A fused tuner is in the weights at the scale it was fused with and runs no branch a per-call scale could
    scale: another per-call scale for it would be ignored silently (as ``set_res_tuner_scale`` refuses it)."""
    for bank, _ in state.banks:
        if getattr(bank, "fused", None) is None:  # only a LinearBank holding a fused tuner records one
            continue
        for name in bank.fused_names():
            wanted = scale.get(name) if isinstance(scale, dict) else scale
            if wanted is not None and wanted != bank.settings[name].scale:
                raise ResTunerError(
                    f"tuner {name!r} is fused into the weights at scale {bank.settings[name].scale}, so the per-call "
                    f"{SCALE_KWARG}={wanted} cannot change it; unfuse it first (unfuse_res_tuner) or leave it out of "
                    f"the per-call scale (a dict {{name: scale}} of the other tuners)"
                )


def _refuse_call_scale_under_checkpointing(model: nn.Module) -> None:
    """Gradient checkpointing runs the blocks again in the backward pass, after this call has ended and its per-call
    scale is gone: the gradients would be those of the tuners' own scales (4% off at 0.5 on the tiny Flux), silently.
    Only with gradients, where diffusers checkpoints; sampling under ``no_grad`` never pays for the check."""
    if torch.is_grad_enabled() and getattr(model, "is_gradient_checkpointing", False):
        raise ResTunerError(
            f"a per-call {SCALE_KWARG} does not reach the blocks gradient checkpointing recomputes in the backward "
            "pass, so the gradients would be of another scale; for training set the scale with set_res_tuner_scale, "
            "or call disable_gradient_checkpointing() on the model"
        )


def _scale_post_hook(model: nn.Module, args: tuple, kwargs: dict, output):
    state = get_state(model)
    if state is not None:
        for bank, _ in state.banks:
            bank.call_scale = None
    return None


# --- install / remove ----------------------------------------------------------------------------------------
def _ensure_state(model: nn.Module, family) -> ResTunerState:
    state = get_state(model)
    if state is None:
        state = ResTunerState(family=family)
        setattr(model, STATE_ATTR, state)
        family.install_model_guards(model)
        model.register_forward_pre_hook(_scale_pre_hook, with_kwargs=True)
        model.register_forward_hook(_scale_post_hook, with_kwargs=True, always_call=True)
    return state


def add_res_tuner(unet: nn.Module, config: ResTunerConfig, adapter_name: str = "default") -> list[str]:
    """Put a tuner named ``adapter_name`` beside every layer ``config`` selects; returns the layer paths.

    ``unet`` is the denoiser: a ``UNet2DConditionModel`` (SD 1/2/XL) or an ``SD3Transformer2DModel`` /
    ``FluxTransformer2DModel``. The tuners' parameters are created trainable, in the dtype and device of the layer
    they sit beside. The model's own parameters are left as they are (freeze them with ``requires_grad_(False)``
    before training). A config or tuner that cannot sit on the model raises before anything changes.
    """
    check_model(unet, pipelines_ok=False)
    if not isinstance(config, ResTunerConfig):
        raise ConfigError(
            f"config must be a ResTunerConfig (ResTunerConfig.from_dict(d) for a dict), got {type(config).__name__}"
        )
    check_adapter_name(adapter_name)
    family = family_of(unet)
    state = get_state(unet)
    if state is not None and adapter_name in state.configs:
        raise ResTunerError(
            f"a tuner named {adapter_name!r} is already on this {family.model_word}; remove it first or pick another "
            "adapter name"
        )
    family.check_kind(config)
    if layerwise_casting_active(unet):  # the tuners would be built, and stored, in float8
        raise ResTunerError(LAYERWISE_CASTING_REFUSAL)
    kind = kind_of(config)
    kind.fingerprint(unet, family, config)  # raises on a config the model cannot take, before anything changes
    from .plan import check_tuner_size

    check_tuner_size(unet, config)  # on the meta device: a config too big for its model never allocates
    state = _ensure_state(unet, family)
    try:
        paths = kind.attach(unet, family, config, adapter_name, state)
    except Exception:
        if not state.configs:  # the first tuner failed to build: leave no state and no hooks behind
            _drop_state(unet, state)
        raise
    state.configs[adapter_name] = config
    return paths


def _drop_state(model: nn.Module, state: ResTunerState) -> None:
    remove_forward_hooks(model, _scale_pre_hook)
    remove_forward_hooks(model, _scale_post_hook)
    delattr(model, STATE_ATTR)
    state.family.remove_model_guards(model)


def remove_res_tuner(unet: nn.Module, adapter_name: str | list[str] | None = None) -> None:
    """Remove the named tuner(s) (all, with ``adapter_name=None``), unfusing first; the frozen modules, their
    processors and the model's outputs are restored exactly. Every name is checked, and every fused one unfused,
    before the first is removed: a refusal leaves all of them loaded."""
    state = _require_state(unet)
    names = list(dict.fromkeys(_selected_tuner_names(state, adapter_name)))
    fused = [name for name in names if res_tuner_settings(unet)[name]["fused"]]
    if fused:  # every layer at once: refused (weights changed behind a fused tuner) before anything is removed
        unfuse_res_tuner(unet, fused)
    for name in names:
        kind_of(state.configs[name]).detach(unet, state, name)
        del state.configs[name]
    if not state.configs:
        _drop_state(unet, state)


def _require_state(unet: nn.Module) -> ResTunerState:
    check_model(unet, pipelines_ok=False)
    state = get_state(unet)
    if state is None or not state.configs:
        word = family_of(unet).model_word  # a model no family describes is told what to pass instead
        raise ResTunerError(
            f"this {word} has no res tuner; add one with add_res_tuner or load one with load_res_tuner"
        )
    return state


def _selected_tuner_names(state: ResTunerState, adapter_name: str | list[str] | None) -> list[str]:
    """The names an ``adapter_name`` argument selects (None: every tuner), each checked to be loaded."""
    if adapter_name is None:
        return list(state.configs)
    if isinstance(adapter_name, str):
        adapter_name = [adapter_name]
    if not isinstance(adapter_name, (list, tuple)) or not adapter_name:
        raise ResTunerError(
            f"adapter_name must be a tuner's name, a non-empty list of names or None (all), got {adapter_name!r}"
        )
    return [_require_name(state, n) for n in adapter_name]


def iter_tuners(unet: nn.Module, adapter_name: str) -> Iterator[tuple[str, nn.Module]]:
    """(path, tuner module) of one named tuner, in module order."""
    state = _require_state(unet)
    _require_name(state, adapter_name)
    yield from kind_of(state.configs[adapter_name]).iterate(unet, state, adapter_name)


def get_res_tuner_configs(unet: nn.Module) -> dict[str, ResTunerConfig]:
    state = get_state(unet)
    return {} if state is None else dict(state.configs)


def _settings_by_name(unet: nn.Module, names: list[str]) -> Iterator[tuple[str, TunerSetting]]:
    """(tuner name, its setting at one place) for every place the named tuners sit, each place once (a bypass,
    whose bank is also in ``state.banks``, is reported by its kind only)."""
    state = _require_state(unet)
    for name in names:
        for setting in kind_of(state.configs[name]).settings(unet, state, name):
            yield name, setting


def set_res_tuner_scale(unet: nn.Module, scale: float, adapter_name: str | list[str] | None = None) -> None:
    """Set the scale ``s`` of the named tuner(s) (all when None). Refused, changing nothing, if any of them is
    fused with another scale."""
    scale = check_scale(scale)
    names = _selected_tuner_names(_require_state(unet), adapter_name)
    settings = list(_settings_by_name(unet, names))
    for name, setting in settings:  # check every tuner before changing any
        if setting.fused and setting.scale != scale:
            raise ResTunerError(f"tuner {name!r} is fused into the weights; unfuse it before changing its scale")
    for _, setting in settings:
        setting.scale = scale
    state = get_state(unet)
    for name in names:
        state.configs[name] = state.configs[name].replace(scale=scale)


def set_res_tuner_enabled(unet: nn.Module, enabled: bool, adapter_name: str | list[str] | None = None) -> None:
    """Switch the named tuner(s) (all when None) on or off without removing them. Refused, changing nothing, if
    any of them is fused and would be switched off."""
    enabled = check_enabled(enabled)
    names = _selected_tuner_names(_require_state(unet), adapter_name)
    settings = list(_settings_by_name(unet, names))
    for name, setting in settings:  # check every tuner before changing any
        if setting.fused and not enabled:
            raise ResTunerError(f"tuner {name!r} is fused into the weights; unfuse it before disabling it")
    for _, setting in settings:
        setting.enabled = bool(enabled)


def res_tuner_settings(unet: nn.Module) -> dict[str, dict[str, float | bool]]:
    """Name -> ``{"scale", "enabled", "fused"}`` of every tuner on ``unet`` (empty when none): what the pipeline
    mixin checks before it changes several tuners, so that a refused change leaves all of them as they were."""
    state = get_state(unet)
    if state is None or not state.configs:
        return {}
    status = {
        name: {"scale": config.scale, "enabled": False, "fused": False} for name, config in state.configs.items()
    }
    for name, setting in _settings_by_name(unet, list(state.configs)):
        status[name]["scale"] = setting.scale
        status[name]["enabled"] = status[name]["enabled"] or setting.enabled
        status[name]["fused"] = status[name]["fused"] or setting.fused
    return status


def fuse_res_tuner(unet: nn.Module, adapter_name: str | list[str] | None = None, safe_fusing: bool = False) -> None:
    """Fold linear tuners (Res-LoRA, GLoRA, SURM) into the frozen weights: zero inference cost. Raises, naming
    them, for tuners that cannot fold (attention-side branches), before changing anything. With ``safe_fusing``
    (as in diffusers' ``fuse_lora``) every fused weight is computed and checked first, and a NaN or inf anywhere
    refuses the whole fuse, changing nothing."""
    state = _require_state(unet)
    names = _selected_tuner_names(state, adapter_name)
    cannot = [n for n in names if not kind_of(state.configs[n]).can_fuse]
    if cannot:
        raise ResTunerError(
            f"tuner(s) {cannot} ({', '.join(state.configs[n].tuner for n in cannot)}) add a branch that does not fold "
            "into a weight; only linear tuners (res_lora, glora, surm_*) can be fused. Fuse the others' names only."
        )
    _refuse_disabled(unet, names)
    for kind in {id(kind_of(state.configs[n])): kind_of(state.configs[n]) for n in names}.values():
        kind.fuse(unet, state, [n for n in names if kind_of(state.configs[n]) is kind], safe_fusing)


def _refuse_disabled(unet: nn.Module, names: list[str]) -> None:
    """Fusing a disabled tuner would silently do nothing (a disabled branch has nothing to fold): refuse it."""
    enabled = {name for name, setting in _settings_by_name(unet, names) if setting.enabled}
    disabled = [name for name in names if name not in enabled]
    if disabled:
        raise ResTunerError(
            f"tuner(s) {disabled} are disabled, so there is nothing to fuse; enable them first "
            f"(set_res_tuner_enabled(unet, True, {disabled!r})) or fuse only enabled tuners"
        )


def unfuse_res_tuner(
    unet: nn.Module, adapter_name: str | list[str] | None = None, accept_changed_weights: bool = False
) -> None:
    """Unfold fused tuners (the named ones, else all); they run as branches again and the weights are what the
    rest of the model makes them: bit for bit the original ones when nothing else was folded in between, exactly
    where a diffusers LoRA fused or unfused in between leaves them otherwise (:mod:`.fusion`).

    Refused, changing nothing, when a weight was changed while fused by something other than diffusers'
    ``fuse_lora``/``unfuse_lora`` (e.g. ``unload_lora_weights()`` of a LoRA loaded and fused after the tuner was
    fused). ``accept_changed_weights=True`` then subtracts exactly the tuners' delta and keeps the other change."""
    check_enabled(accept_changed_weights, "accept_changed_weights")
    state = _require_state(unet)
    names = None if adapter_name is None else _selected_tuner_names(state, adapter_name)
    kinds = [kind for kind in {id(kind_of(c)): kind_of(c) for c in state.configs.values()}.values() if kind.can_fuse]
    for kind in kinds:
        kind.unfuse(unet, state, names, accept_changed_weights)


def check_layer_scales_apply(unet: nn.Module, adapter_name: str) -> ResTunerState:
    """The model's state, if ``adapter_name`` is a loaded tuner that sits per layer and so can take per-layer (or
    per-block) scales; a side network over the whole model (the bypass) has one scale."""
    state = _require_state(unet)
    _require_name(state, adapter_name)
    if not isinstance(kind_of(state.configs[adapter_name]), LayerKind):
        raise ResTunerError(
            f"tuner {adapter_name!r} is a side network over the whole model; it has one scale, not per-block ones"
        )
    return state


def set_res_tuner_layer_scales(unet: nn.Module, adapter_name: str, scales: dict[str, float]) -> None:
    """Per-layer scales of one tuner: ``scales`` maps a module path prefix (``"down_blocks.1.attentions.0"``,
    ``"mid_block"``) to the scale of every branch of the tuner under it; branches under no prefix keep their scale.
    The longest matching prefix wins. Refused, changing nothing, if a fused branch would change."""
    state = check_layer_scales_apply(unet, adapter_name)
    if not isinstance(scales, dict):
        raise ConfigError(f"scales must map module path prefixes to numbers, got {type(scales).__name__}")
    scales = {prefix: check_scale(value, f"scale of {prefix!r}") for prefix, value in scales.items()}
    changes = []
    for bank, _ in state.banks:
        setting = bank.settings.get(adapter_name)
        if setting is None:
            continue
        prefixes = [p for p in scales if bank.layer_path == p or bank.layer_path.startswith(p + ".")]
        if not prefixes:
            continue
        scale = scales[max(prefixes, key=len)]
        if setting.fused and setting.scale != scale:
            raise ResTunerError(
                f"tuner {adapter_name!r} is fused into the weights; unfuse it before changing its scales"
            )
        changes.append((setting, scale))
    for setting, scale in changes:
        setting.scale = scale


def res_tuner_parameters(unet: nn.Module, adapter_name: str | None = None) -> list[nn.Parameter]:
    """The parameters of the named tuner (all tuners when None) -- what an optimizer should get."""
    state = _require_state(unet)
    params = []
    for name in _selected_tuner_names(state, adapter_name):
        for _, tuner in iter_tuners(unet, name):
            params.extend(tuner.parameters())
    return params


def _resolved_targets(state: ResTunerState, config: ResTunerConfig) -> list[str]:
    """The config's targets, or the family's defaults it stands for."""
    return list(config.targets) if config.targets is not None else list(state.family.resolve_targets(config))


def res_tuner_summary(unet: nn.Module) -> dict:
    """Trainable-parameter summary: per tuner, its config, number of layers and parameters, and its share of
    the model's own parameters. ``format_summary`` turns it into a table."""
    from .plan import own_parameter_count

    state = get_state(unet)
    own = own_parameter_count(unet)
    rows = {}
    for name, config in ({} if state is None else state.configs).items():
        tuners = list(iter_tuners(unet, name))
        count = sum(p.numel() for _, t in tuners for p in t.parameters())
        rows[name] = {
            "tuner": config.tuner,
            "targets": _resolved_targets(state, config),
            "placement": config.placement,
            "layers": len(tuners),
            "parameters": count,
            "percent_of_unet": 100.0 * count / max(own, 1),
        }
    return {"unet_parameters": own, "tuners": rows}


def format_summary(summary: dict) -> str:
    lines = ["| adapter | tuner | targets | layers | parameters | % of model |", "|---|---|---|---|---|---|"]
    for name, row in summary["tuners"].items():
        lines.append(
            f"| {name} | {row['tuner']} | {','.join(row['targets'])} | {row['layers']} | "
            f"{row['parameters']:,} | {row['percent_of_unet']:.3f} |"
        )
    lines.append(f"\nModel parameters (frozen): {summary['unet_parameters']:,}")
    return "\n".join(lines)
