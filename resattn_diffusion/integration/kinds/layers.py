"""Operation and linear tuners: one tuner module per layer, held in a :class:`~..processors.TunerBank` at the layer.

An attention layer's bank lives in the processor that wraps the attention's own (the family names the processor
class); a feed-forward's bank is a child module of it, with a forward hook adding the branches; a linear's bank
computes the projection itself through an instance ``forward`` (one GEMM with the merged weight where that is faster).
Hooks and processors keep every frozen module where it was and of its own class (state-dict keys unchanged).
"""

from __future__ import annotations

import functools
from abc import abstractmethod
from collections.abc import Iterator
from dataclasses import replace

import torch
from torch import nn

from ...config import ResTunerConfig
from ...tuners.base import OpShape
from ..families.base import (
    FUSED_PROJECTIONS,
    Layer,
    ModelFamily,
    base_linear,
    bypassed_projections,
    linear_shape,
)
from ..fusion import plan_write
from ..processors import (
    LinearBank,
    OperationBank,
    ResTunerAttnProcessor,
    TunerBank,
    TunerSetting,
    ff_bank_hook,
    linear_bank_forward,
)
from ..state import ResTunerError, ResTunerState, module_dtype_device, remove_forward_hooks
from .base import TunerKindAttach


def tuner_input_shape(shape: OpShape, role: str, placement: str) -> OpShape:
    """The shape a tuner is built for: in sequential form it reads OP's output, so its input width is d_out
    (an attention's context stays the text context)."""
    if placement != "sequential":
        return shape
    context_dim = shape.context_dim if role == "attention" else shape.out_dim
    return replace(shape, in_dim=shape.out_dim, context_dim=context_dim)


def layer_fingerprint(layers: list[Layer]) -> dict[str, dict[str, int]]:
    """Layer path -> the shape its tuner was built for: what a tuner file checks before it loads."""
    return {layer.path: layer.shape.as_dict() for layer in layers}


# --- processor guard: our tuners survive diffusers replacing processors ----------------------------------------
def _set_processor_keeping_tuners(attn: nn.Module, processor) -> None:
    """Installed as ``attn.set_processor``: when diffusers installs another processor (xformers, sliced, the
    default, IP-Adapter's), our processor keeps its tuners and wraps the new one instead of being dropped with its
    weights. diffusers' loaders rebuild the processors they leave alone as ``type(processor)()``; for ours that is an
    empty ``ResTunerAttnProcessor()``, which means: keep this processor as it is."""
    current = attn.processor
    if isinstance(current, ResTunerAttnProcessor):
        if not isinstance(processor, ResTunerAttnProcessor):
            current.set_base_processor(processor)
            return
        if processor.base_processor is None:
            return
    type(attn).set_processor(attn, processor)


def _get_processor_for_diffusers(attn: nn.Module, *args, **kwargs):
    """Installed as ``attn.get_processor``, which ``model.attn_processors`` reads: diffusers finds its IP-Adapter
    processors there by type (``set_ip_adapter_scale``, ``unload_ip_adapter``), so where ours wraps one, the wrapped
    one is reported; otherwise ours (``attn.processor`` is ours either way)."""
    processor = type(attn).get_processor(attn, *args, **kwargs)
    if isinstance(processor, ResTunerAttnProcessor) and hasattr(processor.base_processor, "to_k_ip"):
        return processor.base_processor  # every IP-Adapter processor of diffusers holds its to_k_ip projections
    return processor


def _set_xformers_keeping_tuners(attn: nn.Module, *args, **kwargs) -> None:
    """Installed as ``attn.set_use_memory_efficient_attention_xformers`` (what ``pipe.enable_`` /
    ``disable_xformers_memory_efficient_attention()`` call). diffusers' ``Attention`` picks the new processor by the
    type of ``attn.processor``: an IP-Adapter's is rebuilt with its weights, custom diffusion's, added-KV and joint
    ones by their kind, anything else becomes the plain default. Shown ours, it dropped the IP-Adapter ours wraps.
    So diffusers is shown the processor ours wraps for the call, and ours then wraps what diffusers made of it (or,
    if diffusers refused -- no xformers, no GPU -- the processor it had)."""
    ours = attn.processor
    switch = type(attn).set_use_memory_efficient_attention_xformers
    if not isinstance(ours, ResTunerAttnProcessor):
        switch(attn, *args, **kwargs)
        return
    type(attn).set_processor(attn, ours.base_processor)
    try:
        switch(attn, *args, **kwargs)  # its set_processor call meets the guard with a processor not ours: installed
    finally:
        ours.set_base_processor(attn.processor)
        type(attn).set_processor(attn, ours)


#: The methods of a diffusers attention replaced on the instance while tuners sit on it (see the functions above).
_GUARDS = {
    "set_processor": _set_processor_keeping_tuners,
    "get_processor": _get_processor_for_diffusers,
    "set_use_memory_efficient_attention_xformers": _set_xformers_keeping_tuners,
}


def _install_guard(attn: nn.Module) -> None:
    for name, guard in _GUARDS.items():
        if hasattr(type(attn), name):
            setattr(attn, name, functools.partial(guard, attn))


def _remove_guard(attn: nn.Module) -> None:
    for name in _GUARDS:
        attn.__dict__.pop(name, None)


# --- banks -----------------------------------------------------------------------------------------------------
def bank_for(layer: Layer) -> tuple[TunerBank, nn.Module]:
    """The bank at ``layer``, created (and hooked in) on first use."""
    module = layer.module
    if layer.role == "attention":
        processor = module.processor
        if not isinstance(processor, ResTunerAttnProcessor):
            processor = layer.processor_cls(processor, layer.path)
            type(module).set_processor(module, processor)
            _install_guard(module)
        return processor.bank, module
    bank = getattr(module, "res_tuner_bank", None)
    if bank is None:
        bank = LinearBank(layer.path) if layer.role == "linear" else OperationBank(layer.path)
        module.res_tuner_bank = bank
        if layer.role == "linear":
            # The bank computes the frozen projection itself (see processors.linear_bank_forward): an instance
            # attribute, so the module keeps its class and state-dict keys; a deep copy binds to the copy.
            module.forward = functools.partial(linear_bank_forward, module)
        else:
            module.register_forward_hook(ff_bank_hook)
    return bank, module


def detach_bank(bank: TunerBank, owner: nn.Module) -> None:
    """Put the frozen module back exactly as it was once its bank is empty."""
    processor = getattr(owner, "processor", None)
    if isinstance(processor, ResTunerAttnProcessor) and processor.bank is bank:
        base = processor.base_processor
        _remove_guard(owner)
        type(owner).set_processor(owner, base)
        return
    forward = owner.__dict__.get("forward")
    if isinstance(forward, functools.partial) and forward.func is linear_bank_forward:
        del owner.forward  # back to the class's forward (one that wrapped ours, e.g. accelerate's, is left alone)
    remove_forward_hooks(owner, ff_bank_hook)
    del owner.res_tuner_bank


class LayerKind(TunerKindAttach):
    """What operation and linear tuners share: one module per :class:`Layer`, kept in the layer's bank."""

    @abstractmethod
    def layers(self, model: nn.Module, family: ModelFamily, config: ResTunerConfig) -> list[Layer]:
        """The layers ``config`` puts a tuner on, in module order; raises when nothing fits."""

    def fingerprint(self, model: nn.Module, family: ModelFamily, config: ResTunerConfig) -> dict[str, dict]:
        return layer_fingerprint(self.layers(model, family, config))

    def _build(self, model: nn.Module, family: ModelFamily, config: ResTunerConfig) -> list[tuple[Layer, nn.Module]]:
        """Every layer with its new tuner module (built in the current device context, float32)."""
        layers = self.layers(model, family, config)
        config.params.validate_layers([layer.path for layer in layers])
        built = []
        for layer in layers:
            params = config.params.for_layer(layer.path)
            shape = tuner_input_shape(layer.shape, layer.role, config.placement)
            params.validate_for(shape)
            built.append((layer, config.spec.module_cls(shape, params)))
        return built

    def plan(self, model: nn.Module, family: ModelFamily, config: ResTunerConfig) -> list[tuple[str, nn.Module]]:
        return [(layer.path, tuner) for layer, tuner in self._build(model, family, config)]

    def attach(
        self, model: nn.Module, family: ModelFamily, config: ResTunerConfig, adapter_name: str, state: ResTunerState
    ) -> list[str]:
        # Build every module before touching the model, so a failure leaves it unchanged.
        built = []
        for layer, tuner in self._build(model, family, config):
            dtype, device = module_dtype_device(layer.module)
            built.append((layer, tuner.to(device=device, dtype=dtype)))
        for layer, tuner in built:
            bank, owner = bank_for(layer)
            bank.add(adapter_name, tuner, config.scale, config.placement)
            state.add_bank(bank, owner)
        return [layer.path for layer, _ in built]

    def detach(self, model: nn.Module, state: ResTunerState, adapter_name: str) -> None:
        for bank, owner in list(state.banks):
            if adapter_name not in bank.tuners:
                continue
            bank.remove(adapter_name)
            if not len(bank):
                detach_bank(bank, owner)
                state.drop_bank(bank)

    def iterate(self, model: nn.Module, state: ResTunerState, adapter_name: str) -> Iterator[tuple[str, nn.Module]]:
        for bank, _ in state.banks:
            if adapter_name in bank.tuners:
                yield bank.layer_path, bank.tuners[adapter_name]

    def settings(self, model: nn.Module, state: ResTunerState, adapter_name: str) -> list[TunerSetting]:
        return [bank.settings[adapter_name] for bank, _ in state.banks if adapter_name in bank.settings]


class OperationKind(LayerKind):
    """Operation tuners (Res-Attn, Res-Adapter, Res-Prefix, Res-Prompt, SURM-Adapter): one branch ``T(x, c)`` beside
    each selected attention (in its processor) or feed-forward (a hook on its output)."""

    name = "operation"

    def layers(self, model: nn.Module, family: ModelFamily, config: ResTunerConfig) -> list[Layer]:
        layers = family.operation_layers(model, config)
        single_linears = sorted({layer.path.rsplit(".", 1)[-1] for layer in layers if layer.role == "linear"})
        if single_linears:
            raise ResTunerError(
                f"target(s) {single_linears} of a {family.model_word} are single linear projections: only linear "
                f"tuners (res_lora, glora, surm_*) sit there; {config.tuner} targets {list(family.targets)} minus "
                "those"
            )
        if getattr(config.spec.module_cls, "needs_frozen_attention", False):
            feed_forwards = [layer.path for layer in layers if layer.role != "attention"]
            if feed_forwards:
                raise ResTunerError(
                    f"{config.tuner} reads an attention's frozen projections and cannot sit on {feed_forwards[0]}; "
                    "target attentions only"
                )
        return layers


class LinearKind(LayerKind):
    """Linear tuners (Res-LoRA, GLoRA, SURM): one branch beside each selected projection; they fold into weights."""

    name = "linear"
    can_fuse = True

    def layers(self, model: nn.Module, family: ModelFamily, config: ResTunerConfig) -> list[Layer]:
        projections = family.resolve_projections(config)
        operations = family.operation_layers(model, config)
        layers, found, fused_away = [], set(), []
        for op in operations:
            if op.role == "linear":
                named = [(op.path, op.module)]
            elif op.role == "ff":
                named = [(f"{op.path}.{suffix}", module) for suffix, module in op.linears.values()]
            else:
                named = []
                bypassed = bypassed_projections(op.module)
                for name in projections:
                    if name in op.linears:
                        found.add(name)
                        if name in bypassed:
                            fused_away.append(f"{op.path}.{op.linears[name][0]}")
                        suffix, module = op.linears[name]
                        named.append((f"{op.path}.{suffix}", module))
            for path, module in named:
                linear = base_linear(module)
                if not isinstance(linear, nn.Linear):
                    raise ResTunerError(f"{path} is a {type(linear).__name__}, not a linear layer")
                layers.append(Layer(path, linear, "linear", linear_shape(linear)))
        if fused_away:
            # the attention runs the fused copy (to_qkv, ...) that fuse_qkv_projections() made: a branch beside the
            # separate projection would never run
            kept = [p for p in family.projections if not any(p in names for names in FUSED_PROJECTIONS.values())]
            raise ResTunerError(
                f"{len(fused_away)} projection(s) this config selects, e.g. {fused_away[0]}, are not run: diffusers' "
                f"fuse_qkv_projections() fused them into one linear the attention runs instead, so a tuner beside "
                f"them would never run. Call unfuse_qkv_projections() on the {family.model_word} first, or choose "
                f"projections among {kept}"
            )
        attentions = [op for op in operations if op.role == "attention"]
        if config.projections and not attentions:
            # projections choose among an attention's linears: on feed-forwards / single linears they would go unread
            raise ResTunerError(
                f"projections {list(config.projections)} name attention projections, but the targets "
                f"{sorted({op.path.rsplit('.', 1)[-1] for op in operations})} of this config select no attention of "
                f"this {family.model_word}; drop projections (a linear tuner sits beside every linear of a "
                "feed-forward) or add an attention target"
            )
        missing = [name for name in projections if name not in found]
        if attentions and missing and config.projections is not None:
            raise ResTunerError(
                f"projection(s) {missing} exist on none of the selected attentions of this {family.model_word}; "
                f"they have {sorted({n for op in attentions for n in op.linears})}"
            )
        if not layers:
            raise ResTunerError(f"config {config} selects no linear projection of this {family.model_word}")
        return layers

    def attach(
        self, model: nn.Module, family: ModelFamily, config: ResTunerConfig, adapter_name: str, state: ResTunerState
    ) -> list[str]:
        paths = super().attach(model, family, config, adapter_name, state)
        for bank, _ in state.banks:
            if isinstance(bank, LinearBank) and bank.parent_module is None:
                # where diffusers' LoRA puts a peft wrapper around the projection, whose merges the bank must see
                parent_path = bank.layer_path.rpartition(".")[0]
                bank.bind_parent(model.get_submodule(parent_path) if parent_path else model)
        return paths

    def detach(self, model: nn.Module, state: ResTunerState, adapter_name: str) -> None:
        self.unfuse(model, state, [adapter_name])  # other fused tuners of the layer stay fused; refused: unchanged
        super().detach(model, state, adapter_name)

    def fuse(self, model: nn.Module, state: ResTunerState, names: list[str], safe_fusing: bool = False) -> None:
        # Every layer is resolved (and refused where fusing cannot be exact beside what else folded into it) before
        # any changes; the new weights are computed one layer at a time unless safe_fusing checks them all first.
        plans = []
        for bank, owner in state.banks:
            present = [n for n in names if n in bank.tuners and bank.settings[n].enabled]
            if present and isinstance(bank, LinearBank):
                keep = bank.names_after_fuse(present)
                others = bank.resolve(owner, action="fuse_res_tuner")
                write = plan_write(bank, owner, others, keep) if safe_fusing else None
                if write is not None and not (
                    torch.isfinite(write.weight).all() and (write.bias is None or torch.isfinite(write.bias).all())
                ):
                    raise ResTunerError(
                        f"fusing {present} into {bank.layer_path} gives NaN or inf weights (a diverged tuner or a "
                        "huge scale); nothing was fused. Check the tuner's weights, or run it unfused."
                    )
                plans.append((bank, owner, others, keep, write))
        for bank, owner, others, keep, write in plans:
            bank.write_planned(owner, write or plan_write(bank, owner, others, keep))

    def unfuse(
        self,
        model: nn.Module,
        state: ResTunerState,
        names: list[str] | None = None,
        accept_changed_weights: bool = False,
    ) -> None:
        writes = []
        for bank, owner in state.banks:  # every layer checked before any changes
            if isinstance(bank, LinearBank):
                write = bank.plan_unfuse(owner, names, accept_changed_weights)
                if write is not None:
                    writes.append((bank, owner, write))
        for bank, owner, write in writes:
            bank.write_planned(owner, write)
