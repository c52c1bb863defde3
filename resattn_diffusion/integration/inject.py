"""Finding layers by pattern and installing, scaling, switching, fusing and removing named tuners on a UNet."""

from __future__ import annotations

import fnmatch
import functools
from dataclasses import dataclass, field, replace
from typing import Iterator

import torch
from torch import nn

from ..checks import check_adapter_name, check_call_scale, check_enabled, check_model, check_scale
from ..config import ResTunerConfig
from ..tuners.base import ConfigError, OpShape
from .processors import (
    SCALE_KWARG,
    LinearBank,
    OperationBank,
    ResTunerAttnProcessor,
    TunerBank,
    ff_bank_hook,
    linear_bank_hook,
)

#: The attribute on the UNet that holds its tuners' state (a plain object, not a module).
STATE_ATTR = "_res_tuner_state"
_FF_LINEARS = {"net.0.proj": "ff_in", "net.2": "ff_out"}


class ResTunerError(RuntimeError):
    """A tuner operation that cannot be done on this UNet; the message says why and what to do."""


@dataclass
class Layer:
    """One place a tuner can sit: ``path`` in the UNet, its module, the op kind and the shape a tuner is built for."""

    path: str
    module: nn.Module
    kind: str  # "attention", "ff" or "linear"
    shape: OpShape


@dataclass
class ResTunerState:
    configs: dict[str, ResTunerConfig] = field(default_factory=dict)
    #: (bank, the module that owns it) for every bank on the UNet, in module order.
    banks: list[tuple[TunerBank, nn.Module]] = field(default_factory=list)


def get_state(unet: nn.Module) -> ResTunerState | None:
    return getattr(unet, STATE_ATTR, None)


# --- finding layers ----------------------------------------------------------------------------------------
def transformer_blocks(unet: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every diffusers ``BasicTransformerBlock`` of the UNet, with its path."""
    from diffusers.models.attention import BasicTransformerBlock

    for path, module in unet.named_modules():
        if isinstance(module, BasicTransformerBlock):
            yield path, module


def attention_shape(attn: nn.Module) -> OpShape:
    return OpShape(
        in_dim=attn.to_q.in_features,
        out_dim=attn.to_out[0].out_features,
        context_dim=attn.to_k.in_features,
        inner_dim=attn.to_q.out_features,
        heads=attn.heads,
    )


def _linear_shape(linear: nn.Linear) -> OpShape:
    return OpShape(
        in_dim=linear.in_features, out_dim=linear.out_features, context_dim=linear.in_features, has_bias=linear.bias is not None
    )


def _base_linear(module: nn.Module) -> nn.Linear:
    # A projection that peft/diffusers LoRA wrapped keeps the frozen nn.Linear as ``base_layer``.
    return getattr(module, "base_layer", module)


def _block_selected(path: str, patterns: tuple[str, ...] | None) -> bool:
    if patterns is None:
        return True
    return any(fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(path, p.rstrip(".*") + ".*") for p in patterns)


def find_layers(unet: nn.Module, config: ResTunerConfig) -> list[Layer]:
    """The layers ``config`` puts a tuner on, in module order. Raises when a block pattern matches nothing."""
    blocks = list(transformer_blocks(unet))
    if not blocks:
        raise ResTunerError(
            "this model has no diffusers BasicTransformerBlock (attn1/attn2/ff); pass the pipeline's UNet (pipe.unet)"
        )
    if config.blocks is not None:
        for pattern in config.blocks:
            if not any(_block_selected(path, (pattern,)) for path, _ in blocks):
                examples = sorted({".".join(p.split(".")[:2]) for p, _ in blocks})
                raise ConfigError(
                    f"block pattern {pattern!r} matches no transformer block of this UNet; "
                    f"blocks are named like {blocks[0][0]!r}; patterns that match: {examples + ['mid_block', 'up_blocks.*']}"
                )
    kind = config.spec.kind
    layers: list[Layer] = []
    for block_path, block in blocks:
        if not _block_selected(block_path, config.blocks):
            continue
        for target in config.targets:
            op = getattr(block, target, None)
            if op is None:
                continue  # e.g. a block without cross-attention
            op_path = f"{block_path}.{target}"
            if kind == "operation":
                if target == "ff":
                    dim = _base_linear(op.net[0].proj).in_features
                    out_dim = _base_linear(op.net[2]).out_features
                    layers.append(Layer(op_path, op, "ff", OpShape(in_dim=dim, out_dim=out_dim, context_dim=dim)))
                else:
                    layers.append(Layer(op_path, op, "attention", attention_shape(op)))
            elif kind == "linear":
                if target == "ff":
                    named = [("net.0.proj", op.net[0].proj), ("net.2", op.net[2])]
                else:
                    named = [(p if p != "to_out" else "to_out.0", getattr(op, p) if p != "to_out" else op.to_out[0]) for p in config.projections]
                for name, module in named:
                    linear = _base_linear(module)
                    if not isinstance(linear, nn.Linear):
                        raise ResTunerError(f"{op_path}.{name} is a {type(linear).__name__}, not a linear layer")
                    layers.append(Layer(f"{op_path}.{name}", linear, "linear", _linear_shape(linear)))
            else:
                raise ResTunerError(f"tuner kind {kind!r} is not attached per layer")
    if not layers:
        raise ConfigError(
            f"config {config} selects no layer of this UNet (targets {list(config.targets)}, blocks {config.blocks})"
        )
    return layers


def tuner_input_shape(shape: OpShape, kind: str, placement: str) -> OpShape:
    """The shape a tuner is built for: in sequential form it reads OP's output, so its input width is d_out
    (an attention's context stays the text context)."""
    if placement != "sequential":
        return shape
    context_dim = shape.context_dim if kind == "attention" else shape.out_dim
    return replace(shape, in_dim=shape.out_dim, context_dim=context_dim)


def layer_fingerprint(layers: list[Layer]) -> dict[str, dict[str, int]]:
    """Layer path -> the shape its tuner was built for: what a tuner file checks before it loads."""
    return {layer.path: layer.shape.as_dict() for layer in layers}


# --- processor guard: our tuners survive diffusers replacing processors ----------------------------------------
def _set_processor_keeping_tuners(attn: nn.Module, processor) -> None:
    """Installed as ``attn.set_processor``: when diffusers installs another processor (xformers, sliced, the
    default), our processor keeps its tuners and wraps the new one instead of being dropped with its weights."""
    from diffusers.models.attention_processor import Attention

    current = attn.processor
    if isinstance(current, ResTunerAttnProcessor) and not isinstance(processor, ResTunerAttnProcessor):
        current.set_base_processor(processor)
        return
    Attention.set_processor(attn, processor)


def _set_default_attn_processor_keeping_tuners(unet: nn.Module) -> None:
    """Installed as ``unet.set_default_attn_processor``: diffusers' own refuses to run beside third-party
    processors; this one picks the default from the processors our tuners wrap, and our tuners stay."""
    from diffusers.models.attention_processor import (
        ADDED_KV_ATTENTION_PROCESSORS,
        CROSS_ATTENTION_PROCESSORS,
        AttnAddedKVProcessor,
        AttnProcessor,
    )

    bases = [p.base_processor if isinstance(p, ResTunerAttnProcessor) else p for p in unet.attn_processors.values()]
    if all(type(p) in ADDED_KV_ATTENTION_PROCESSORS for p in bases):
        processor = AttnAddedKVProcessor()
    elif all(type(p) in CROSS_ATTENTION_PROCESSORS for p in bases):
        processor = AttnProcessor()
    else:
        raise ValueError(f"Cannot call `set_default_attn_processor` when attention processors are of type {type(bases[0])}")
    unet.set_attn_processor(processor)


def _install_guard(attn: nn.Module) -> None:
    attn.set_processor = functools.partial(_set_processor_keeping_tuners, attn)


def _remove_guard(attn: nn.Module) -> None:
    attn.__dict__.pop("set_processor", None)


# --- per-call scale from cross_attention_kwargs -------------------------------------------------------------
def _unet_scale_pre_hook(unet: nn.Module, args: tuple, kwargs: dict):
    kwargs_ca = kwargs.get("cross_attention_kwargs")
    if not kwargs_ca or SCALE_KWARG not in kwargs_ca:
        return None
    kwargs_ca = dict(kwargs_ca)
    scale = kwargs_ca.pop(SCALE_KWARG)
    state = get_state(unet)
    if scale is not None:  # None: no per-call override
        check_call_scale(scale, state.configs)  # once per UNet call, before any work, so nothing is half-applied
        for bank, _ in state.banks:
            bank.call_scale = scale
    kwargs = dict(kwargs)
    kwargs["cross_attention_kwargs"] = kwargs_ca or None
    return args, kwargs


def _unet_scale_post_hook(unet: nn.Module, args: tuple, kwargs: dict, output):
    state = get_state(unet)
    if state is not None:
        for bank, _ in state.banks:
            bank.call_scale = None
    return None


def remove_forward_hooks(module: nn.Module, fn) -> None:
    """Remove ``fn`` from the module's forward (pre-)hooks, with its entries in torch's bookkeeping dicts (found by
    identity, so a deep-copied UNet's hooks are found too: no handle is kept)."""
    for hooks, extras in (
        (module._forward_pre_hooks, (module._forward_pre_hooks_with_kwargs,)),
        (module._forward_hooks, (module._forward_hooks_with_kwargs, module._forward_hooks_always_called)),
    ):
        for hook_id in [k for k, hook in hooks.items() if hook is fn]:
            del hooks[hook_id]
            for extra in extras:
                extra.pop(hook_id, None)


# --- install / remove ----------------------------------------------------------------------------------------
def _bank_for(layer: Layer) -> tuple[TunerBank, nn.Module]:
    """The bank at ``layer``, created (and hooked in) on first use."""
    module = layer.module
    if layer.kind == "attention":
        processor = module.processor
        if not isinstance(processor, ResTunerAttnProcessor):
            processor = ResTunerAttnProcessor(processor, layer.path)
            from diffusers.models.attention_processor import Attention

            Attention.set_processor(module, processor)
            _install_guard(module)
        return processor.bank, module
    bank = getattr(module, "res_tuner_bank", None)
    if bank is None:
        bank = LinearBank(layer.path) if layer.kind == "linear" else OperationBank(layer.path)
        module.res_tuner_bank = bank
        module.register_forward_hook(linear_bank_hook if layer.kind == "linear" else ff_bank_hook)
    return bank, module


def _detach_bank(bank: TunerBank, owner: nn.Module) -> None:
    """Put the frozen module back exactly as it was once its bank is empty."""
    processor = getattr(owner, "processor", None)
    if isinstance(processor, ResTunerAttnProcessor) and processor.bank is bank:
        from diffusers.models.attention_processor import Attention

        base = processor.base_processor
        _remove_guard(owner)
        Attention.set_processor(owner, base)
        return
    remove_forward_hooks(owner, linear_bank_hook)
    remove_forward_hooks(owner, ff_bank_hook)
    del owner.res_tuner_bank


def _module_dtype_device(module: nn.Module) -> tuple[torch.dtype, torch.device]:
    param = next(module.parameters())
    return param.dtype, param.device


def _ensure_state(unet: nn.Module) -> ResTunerState:
    state = get_state(unet)
    if state is None:
        state = ResTunerState()
        setattr(unet, STATE_ATTR, state)
        unet.set_default_attn_processor = functools.partial(_set_default_attn_processor_keeping_tuners, unet)
        unet.register_forward_pre_hook(_unet_scale_pre_hook, with_kwargs=True)
        unet.register_forward_hook(_unet_scale_post_hook, with_kwargs=True, always_call=True)
    return state


def add_res_tuner(unet: nn.Module, config: ResTunerConfig, adapter_name: str = "default") -> list[str]:
    """Put a tuner named ``adapter_name`` beside every layer ``config`` selects; returns the layer paths.

    The tuners' parameters are created trainable, in the dtype and device of the layer they sit beside. The UNet's
    own parameters are left as they are (freeze them with ``unet.requires_grad_(False)`` before training).
    """
    check_model(unet, pipelines_ok=False)
    if not isinstance(config, ResTunerConfig):
        raise ConfigError(
            f"config must be a ResTunerConfig (ResTunerConfig.from_dict(d) for a dict), got {type(config).__name__}"
        )
    check_adapter_name(adapter_name)
    state = get_state(unet)
    if state is not None and adapter_name in state.configs:
        raise ResTunerError(
            f"a tuner named {adapter_name!r} is already on this UNet; remove it first or pick another adapter name"
        )
    from .plan import check_tuner_size

    check_tuner_size(unet, config)  # on the meta device: a config too big for its model never allocates
    if config.spec.kind == "unet":
        from .unet_tuners import attach_unet_tuner, unet_tuner_fingerprint  # the bypass side network

        unet_tuner_fingerprint(unet, config)  # raises on a config or UNet it cannot take, before anything changes
        state = _ensure_state(unet)
        paths = attach_unet_tuner(unet, config, adapter_name)
        state.configs[adapter_name] = config
        return paths

    layers = find_layers(unet, config)
    config.params.validate_layers([layer.path for layer in layers])
    # Build every module before touching the UNet, so a failure leaves it unchanged.
    built = []
    for layer in layers:
        params = config.params.for_layer(layer.path)
        shape = tuner_input_shape(layer.shape, layer.kind, config.placement)
        params.validate_for(shape)
        dtype, device = _module_dtype_device(layer.module)
        built.append((layer, config.spec.module_cls(shape, params).to(device=device, dtype=dtype)))

    state = _ensure_state(unet)
    for layer, tuner in built:
        bank, owner = _bank_for(layer)
        bank.add(adapter_name, tuner, config.scale, config.placement)
        if not any(b is bank for b, _ in state.banks):
            state.banks.append((bank, owner))
    state.configs[adapter_name] = config
    return [layer.path for layer in layers]


def remove_res_tuner(unet: nn.Module, adapter_name: str | None = None) -> None:
    """Remove one named tuner (or all, with ``adapter_name=None``), unfusing first; the frozen modules, their
    processors and the UNet's outputs are restored exactly."""
    state = _require_state(unet)
    names = list(state.configs) if adapter_name is None else [_require_name(state, adapter_name)]
    for name in names:
        config = state.configs[name]
        if config.spec.kind == "unet":
            from .unet_tuners import detach_unet_tuner

            detach_unet_tuner(unet, name)
        else:
            for bank, owner in list(state.banks):
                if name not in bank.tuners:
                    continue
                if isinstance(bank, LinearBank) and bank.settings[name].fused:
                    bank.unfuse(owner, [name])  # other fused tuners of the layer stay fused
                bank.remove(name)
                if not len(bank):
                    _detach_bank(bank, owner)
                    state.banks = [(b, o) for b, o in state.banks if b is not bank]
        del state.configs[name]
    if not state.configs:
        remove_forward_hooks(unet, _unet_scale_pre_hook)
        remove_forward_hooks(unet, _unet_scale_post_hook)
        delattr(unet, STATE_ATTR)
        unet.__dict__.pop("set_default_attn_processor", None)


def _require_state(unet: nn.Module) -> ResTunerState:
    check_model(unet, pipelines_ok=False)
    state = get_state(unet)
    if state is None or not state.configs:
        raise ResTunerError("this UNet has no res tuner; add one with add_res_tuner or load one with load_res_tuner")
    return state


def _require_name(state: ResTunerState, name: str) -> str:
    if not isinstance(name, str):
        raise ResTunerError(f"adapter_name must be a tuner's name (a string), got {type(name).__name__} {name!r}")
    if name not in state.configs:
        raise ResTunerError(f"no tuner named {name!r} on this UNet; loaded tuners (adapter names): {list(state.configs)}")
    return name


def _names(state: ResTunerState, adapter_name: str | list[str] | None) -> list[str]:
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
    """(layer path, tuner module) of one named tuner, in module order."""
    state = _require_state(unet)
    _require_name(state, adapter_name)
    if state.configs[adapter_name].spec.kind == "unet":
        from .unet_tuners import iter_unet_tuner

        yield from iter_unet_tuner(unet, adapter_name)
        return
    for bank, _ in state.banks:
        if adapter_name in bank.tuners:
            yield bank.layer_path, bank.tuners[adapter_name]


def get_res_tuner_configs(unet: nn.Module) -> dict[str, ResTunerConfig]:
    state = get_state(unet)
    return {} if state is None else dict(state.configs)


def _settings(unet: nn.Module, names: list[str]):
    state = _require_state(unet)
    for bank, _ in state.banks:
        for name in names:
            if name in bank.settings:
                yield name, bank, bank.settings[name]
    for name in names:
        if state.configs[name].spec.kind == "unet":
            from .unet_tuners import unet_tuner_settings

            yield from ((name, None, s) for s in unet_tuner_settings(unet, name))


def set_res_tuner_scale(unet: nn.Module, scale: float, adapter_name: str | list[str] | None = None) -> None:
    """Set the scale ``s`` of the named tuner(s) (all when None). Refused, changing nothing, if any of them is
    fused with another scale."""
    scale = check_scale(scale)
    names = _names(_require_state(unet), adapter_name)
    settings = list(_settings(unet, names))
    for name, _, setting in settings:  # check every tuner before changing any
        if setting.fused and setting.scale != scale:
            raise ResTunerError(f"tuner {name!r} is fused into the weights; unfuse it before changing its scale")
    for _, _, setting in settings:
        setting.scale = scale
    state = get_state(unet)
    for name in names:
        state.configs[name] = state.configs[name].replace(scale=scale)


def set_res_tuner_enabled(unet: nn.Module, enabled: bool, adapter_name: str | list[str] | None = None) -> None:
    """Switch the named tuner(s) (all when None) on or off without removing them. Refused, changing nothing, if
    any of them is fused and would be switched off."""
    enabled = check_enabled(enabled)
    names = _names(_require_state(unet), adapter_name)
    settings = list(_settings(unet, names))
    for name, _, setting in settings:  # check every tuner before changing any
        if setting.fused and not enabled:
            raise ResTunerError(f"tuner {name!r} is fused into the weights; unfuse it before disabling it")
    for _, _, setting in settings:
        setting.enabled = bool(enabled)


def res_tuner_settings(unet: nn.Module) -> dict[str, dict[str, float | bool]]:
    """Name -> ``{"scale", "enabled", "fused"}`` of every tuner on ``unet`` (empty when none): what the pipeline
    mixin checks before it changes several tuners, so that a refused change leaves all of them as they were."""
    state = get_state(unet)
    if state is None or not state.configs:
        return {}
    status = {name: {"scale": config.scale, "enabled": False, "fused": False} for name, config in state.configs.items()}
    for name, _, setting in _settings(unet, list(state.configs)):
        status[name]["scale"] = setting.scale
        status[name]["enabled"] = status[name]["enabled"] or setting.enabled
        status[name]["fused"] = status[name]["fused"] or setting.fused
    return status


def fuse_res_tuner(
    unet: nn.Module, adapter_name: str | list[str] | None = None, safe_fusing: bool = False
) -> None:
    """Fold linear tuners (Res-LoRA, GLoRA, SURM) into the frozen weights: zero inference cost. Raises, naming
    them, for tuners that cannot fold (attention-side branches), before changing anything. With ``safe_fusing``
    (as in diffusers' ``fuse_lora``) every fused weight is computed and checked first, and a NaN or inf anywhere
    refuses the whole fuse, changing nothing."""
    state = _require_state(unet)
    names = _names(state, adapter_name)
    cannot = [n for n in names if state.configs[n].spec.kind != "linear"]
    if cannot:
        raise ResTunerError(
            f"tuner(s) {cannot} ({', '.join(state.configs[n].tuner for n in cannot)}) add a branch that does not fold "
            "into a weight; only linear tuners (res_lora, glora, surm_*) can be fused. Fuse the others' names only."
        )
    _refuse_disabled(unet, names)
    plans = []
    for bank, owner in state.banks:
        present = [n for n in names if n in bank.tuners and bank.settings[n].enabled]
        if present and isinstance(bank, LinearBank):
            plan = bank.plan_fuse(owner, present) if safe_fusing else None
            if plan is not None and not (
                torch.isfinite(plan[1]).all() and (plan[2] is None or torch.isfinite(plan[2]).all())
            ):
                raise ResTunerError(
                    f"fusing {present} into {bank.layer_path} gives NaN or inf weights (a diverged tuner or a huge "
                    "scale); nothing was fused. Check the tuner's weights, or run it unfused."
                )
            plans.append((bank, owner, present, plan))
    for bank, owner, present, plan in plans:
        bank.fuse(owner, present, plan)


def _refuse_disabled(unet: nn.Module, names: list[str]) -> None:
    """Fusing a disabled tuner would silently do nothing (a disabled branch has nothing to fold): refuse it."""
    enabled = {name for name, _, setting in _settings(unet, names) if setting.enabled}
    disabled = [name for name in names if name not in enabled]
    if disabled:
        raise ResTunerError(
            f"tuner(s) {disabled} are disabled, so there is nothing to fuse; enable them first "
            f"(set_res_tuner_enabled(unet, True, {disabled!r})) or fuse only enabled tuners"
        )


def unfuse_res_tuner(unet: nn.Module, adapter_name: str | list[str] | None = None) -> None:
    """Restore the weights fused tuners changed, exactly; the tuners run as branches again. With
    ``adapter_name``, only the named tuner(s) leave the weights; other fused tuners stay fused."""
    state = _require_state(unet)
    names = None if adapter_name is None else _names(state, adapter_name)
    for bank, owner in state.banks:
        if isinstance(bank, LinearBank):
            bank.unfuse(owner, names)


def set_res_tuner_layer_scales(unet: nn.Module, adapter_name: str, scales: dict[str, float]) -> None:
    """Per-layer scales of one tuner: ``scales`` maps a module path prefix (``"down_blocks.1.attentions.0"``,
    ``"mid_block"``) to the scale of every branch of the tuner under it; branches under no prefix keep their scale.
    The longest matching prefix wins. Refused, changing nothing, if a fused branch would change."""
    state = _require_state(unet)
    _require_name(state, adapter_name)
    if state.configs[adapter_name].spec.kind == "unet":
        raise ResTunerError(f"tuner {adapter_name!r} is a side network over the whole UNet; it has one scale, not per-block ones")
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
            raise ResTunerError(f"tuner {adapter_name!r} is fused into the weights; unfuse it before changing its scales")
        changes.append((setting, scale))
    for setting, scale in changes:
        setting.scale = scale


def res_tuner_parameters(unet: nn.Module, adapter_name: str | None = None) -> list[nn.Parameter]:
    """The parameters of the named tuner (all tuners when None) -- what an optimizer should get."""
    state = _require_state(unet)
    params = []
    for name in _names(state, adapter_name):
        for _, tuner in iter_tuners(unet, name):
            params.extend(tuner.parameters())
    return params


def res_tuner_summary(unet: nn.Module) -> dict:
    """Trainable-parameter summary: per tuner, its config, number of layers and parameters, and its share of
    the UNet's own parameters. ``format_summary`` turns it into a table."""
    from .plan import own_parameter_count

    state = get_state(unet)
    own = own_parameter_count(unet)
    rows = {}
    for name, config in ({} if state is None else state.configs).items():
        tuners = list(iter_tuners(unet, name))
        count = sum(p.numel() for _, t in tuners for p in t.parameters())
        rows[name] = {
            "tuner": config.tuner,
            "targets": list(config.targets),
            "placement": config.placement,
            "layers": len(tuners),
            "parameters": count,
            "percent_of_unet": 100.0 * count / max(own, 1),
        }
    return {"unet_parameters": own, "tuners": rows}


def format_summary(summary: dict) -> str:
    lines = ["| adapter | tuner | targets | layers | parameters | % of UNet |", "|---|---|---|---|---|---|"]
    for name, row in summary["tuners"].items():
        lines.append(
            f"| {name} | {row['tuner']} | {','.join(row['targets'])} | {row['layers']} | "
            f"{row['parameters']:,} | {row['percent_of_unet']:.3f} |"
        )
    lines.append(f"\nUNet parameters (frozen): {summary['unet_parameters']:,}")
    return "\n".join(lines)
