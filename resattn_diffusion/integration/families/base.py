"""A model family: what the tuners see of one kind of diffusers denoiser.

A :class:`ModelFamily` says which blocks a model has, which operations of a block a target names (an attention,
a feed-forward, a single linear), the linear projections of each operation, which processor class wraps its
attention, and how a tuner file describes the model. The tuner kinds (``integration/kinds``) and the API
(``api.py``) ask the family and never look at a diffusers class themselves: adding a model family is one
new subclass registered in ``families/__init__.py``.
"""

from __future__ import annotations

import fnmatch
import functools
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from ...config import ResTunerConfig
from ...tuners.base import ConfigError, OpShape
from ..processors import LinearBank
from ..state import ResTunerError, get_state


@dataclass
class Layer:
    """One place a tuner can sit: ``path`` in the model, its module, how the branch is hooked in (``role``) and the
    shape a tuner is built for.

    ``role`` is ``"attention"`` (inside the attention processor named by ``processor_cls``), ``"ff"`` (a forward hook
    adding a branch to a whole module's output) or ``"linear"`` (a forward hook beside one ``nn.Linear``).
    """

    path: str
    module: nn.Module
    role: str
    shape: OpShape
    #: role "attention": the processor class that wraps the module's own processor and adds the branches
    processor_cls: type | None = None
    #: projection name (the config's vocabulary) -> (path suffix, module) of the operation's linears
    linears: dict[str, tuple[str, nn.Module]] = field(default_factory=dict)


def base_linear(module: nn.Module) -> nn.Module:
    """The frozen linear inside a projection that peft/diffusers LoRA wrapped (kept as ``base_layer``)."""
    return getattr(module, "base_layer", module)


def linear_shape(linear: nn.Linear) -> OpShape:
    """The shape of the frozen linear as the base model has it: a bias that fusing a tuner added to a bias-free
    projection (GLoRA's ``E`` / ``W0 C`` terms) is not the layer's own, so a tuner built or saved while it is fused
    fits the base model."""
    bank = getattr(linear, "res_tuner_bank", None)
    return OpShape(
        in_dim=linear.in_features,
        out_dim=linear.out_features,
        context_dim=linear.in_features,
        has_bias=linear.bias is not None and not getattr(bank, "added_bias", False),
    )


def feed_forward_layer(path: str, ff: nn.Module) -> Layer:
    """A diffusers ``FeedForward`` (``net.0.proj`` -> activation -> ``net.2``) as a layer of role ``"ff"``."""
    first, last = base_linear(ff.net[0].proj), base_linear(ff.net[2])
    shape = OpShape(in_dim=first.in_features, out_dim=last.out_features, context_dim=first.in_features)
    return Layer(
        path, ff, "ff", shape, linears={"net.0.proj": ("net.0.proj", ff.net[0].proj), "net.2": ("net.2", ff.net[2])}
    )


def linear_layer(path: str, module: nn.Module) -> Layer:
    """A single projection (e.g. Flux's ``proj_mlp``) as a layer of role ``"linear"``."""
    linear = base_linear(module)
    if not isinstance(linear, nn.Linear):
        raise ResTunerError(f"{path} is a {type(linear).__name__}, not a linear layer")
    return Layer(path, linear, "linear", linear_shape(linear))


#: What diffusers' ``fuse_qkv_projections()`` copies into one fused linear, by the fused linear's name.
FUSED_PROJECTIONS = {
    "to_qkv": ("to_q", "to_k", "to_v"),
    "to_kv": ("to_k", "to_v"),
    "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj"),
}


def runs_fused_projections(attn: nn.Module) -> bool:
    """Whether ``attn`` computes its q/k/v through the linears ``fuse_qkv_projections()`` made (``to_qkv``, ...)
    instead of ``to_q`` / ``to_k`` / ``to_v``: an attention of diffusers' new kind (Flux's ``FluxAttention``) reads
    its ``fused_projections`` flag in the processor; the older ``Attention`` (SD3, the UNet) only under a
    ``Fused*`` processor (SD3's ``unfuse_qkv_projections()`` puts the old processor back but leaves the flag)."""
    if not getattr(attn, "fused_projections", False):
        return False
    try:
        from diffusers.models.attention import AttentionModuleMixin
    except ImportError:  # diffusers before 0.35: every attention is of the older kind
        AttentionModuleMixin = ()  # noqa: N806 - isinstance(x, ()) is False

    if isinstance(attn, AttentionModuleMixin):
        return True
    processor = getattr(attn, "processor", None)
    processor = getattr(processor, "base_processor", processor)  # ours wraps the one diffusers installed
    return type(processor).__name__.startswith("Fused")


def bypassed_projections(attn: nn.Module) -> tuple[str, ...]:
    """The projections of ``attn`` (the config's names) that it does not run while it runs fused projections: a
    tuner beside one of them would silently never run."""
    if not runs_fused_projections(attn):
        return ()
    return tuple(name for fused, names in FUSED_PROJECTIONS.items() if hasattr(attn, fused) for name in names)


#: Why tuners and diffusers' layerwise casting (``enable_layerwise_casting``: float8 storage) do not go together.
LAYERWISE_CASTING_REFUSAL = (
    "res tuners and diffusers' layerwise casting (enable_layerwise_casting) cannot share a model: it stores every "
    "module under a linear or an attention in its storage dtype (float8 by default), the tuners that sit there "
    "included, so their weights would be rounded to it for good and could not train. Use the model in bfloat16 / "
    "float16 (and fuse_res_tuner for zero-cost inference), or enable layerwise casting on a model without res tuners"
)


def layerwise_casting_active(model: nn.Module) -> bool:
    """Whether diffusers' layerwise casting hooks sit on any module of ``model``."""
    return any(
        getattr(module, "_diffusers_hook", None) is not None
        and module._diffusers_hook.get_hook("layerwise_casting") is not None
        for module in model.modules()
    )


#: diffusers' calls that put a peft adapter into the model; peft then marks every parameter it did not add frozen.
PEFT_INJECTING_METHODS = ("add_adapter", "load_lora_adapter")


def _peft_call_keeping_tuners_trainable(model: nn.Module, method: str, *args: Any, **kwargs: Any) -> Any:
    """Installed as ``model.add_adapter`` / ``model.load_lora_adapter`` while tuners sit on it: diffusers' own call,
    after which the tuners' parameters are as trainable as they were (peft froze them: training the tuner beside a
    LoRA added after it silently stopped updating it)."""
    state = get_state(model)
    banks = [] if state is None else state.banks
    trainable = [(param, param.requires_grad) for bank, _ in banks for param in bank.tuners.parameters()]
    result = getattr(type(model), method)(model, *args, **kwargs)
    for param, requires_grad in trainable:
        param.requires_grad_(requires_grad)
    return result


def install_peft_guards(model: nn.Module) -> None:
    """Keep the tuners trainable through diffusers' peft calls (see :func:`_peft_call_keeping_tuners_trainable`)."""
    for method in PEFT_INJECTING_METHODS:
        if hasattr(type(model), method):
            setattr(model, method, functools.partial(_peft_call_keeping_tuners_trainable, model, method))


def remove_peft_guards(model: nn.Module) -> None:
    for method in PEFT_INJECTING_METHODS:
        model.__dict__.pop(method, None)


def _fuse_qkv_projections_keeping_tuners(model: nn.Module) -> None:
    """Installed as ``model.fuse_qkv_projections`` while tuners sit on it.

    diffusers copies ``to_q`` / ``to_k`` / ``to_v`` (and the text stream's ``add_*_proj``) into one new linear that
    the attention then runs instead: a linear tuner beside the separate projections would silently stop running (a
    fused one would be copied in for good, and unfusing it later would no longer reach the copy). That is refused
    before anything changes. Attention-side tuners stay: SD3 installs a fused processor, which ours wraps; diffusers
    remembers the processors to restore in ``unfuse_qkv_projections()`` -- ours, now wrapping the fused one -- so
    those are replaced by the processors ours wrapped before, and unfusing brings the unfused computation back.
    """
    state = get_state(model)
    fused_names = {name for names in FUSED_PROJECTIONS.values() for name in names}
    beside = [
        bank.layer_path
        for bank, _ in ([] if state is None else state.banks)
        if isinstance(bank, LinearBank) and bank.layer_path.rsplit(".", 1)[-1] in fused_names
    ]
    if beside:
        raise ResTunerError(
            f"fuse_qkv_projections() would copy the q/k/v projections into one linear the attention runs instead, "
            f"and the res tuner(s) beside {len(beside)} of them (e.g. {beside[0]}) would silently stop running; "
            "nothing was fused. Remove those tuners first (remove_res_tuner), or keep the projections unfused: "
            "fuse_res_tuner folds linear tuners into the weights for inference"
        )
    before = {name: getattr(p, "base_processor", p) for name, p in model.attn_processors.items()}
    type(model).fuse_qkv_projections(model)
    if getattr(model, "original_attn_processors", None) is not None:
        model.original_attn_processors = before


def _enable_layerwise_casting_refused(model: nn.Module, *args: Any, **kwargs: Any) -> None:
    """Installed as ``model.enable_layerwise_casting`` while tuners sit on it: diffusers would cast every module
    under each linear and attention to the storage dtype -- the tuners that are children of them too -- and back to
    the compute dtype around each call, so the tuners' weights would be rounded to float8 for good (and some would
    fail in the forward with a raw dtype error)."""
    raise ResTunerError(LAYERWISE_CASTING_REFUSAL)


def save_pretrained_refusal(model: nn.Module, method: str = "save_pretrained") -> ResTunerError | None:
    """The error for diffusers' ``save_pretrained`` (or ``push_to_hub``) of ``model``, or of a pipeline holding it,
    while res tuners sit on it; None when none do. The one copy of the message: the model's guard and our
    pipelines' method raise it.

    ``from_pretrained`` loads the model's own weights only: unfused tuners would be written into the file and dropped
    on reload, and fused ones would be saved as base weights -- with a bias that a fused GLoRA added to a bias-free
    projection lost on reload, silently."""
    state = get_state(model)
    if state is None or not state.configs:
        return None
    word = state.family.model_word
    return ResTunerError(
        f"res tuner(s) {list(state.configs)} are loaded; {method} would write them into the {word} weights "
        "where from_pretrained does not load them back (fused ones would become base weights, and a bias a fused "
        "GLoRA added would be dropped); nothing was written. Save each with resattn_diffusion.save_res_tuner(model, "
        "path, adapter_name=name), remove them (remove_res_tuner(model) / pipe.unload_res_tuner()), then "
        f"{method}(...)"
    )


#: diffusers' calls that write the model's weights out (``push_to_hub`` creates the Hub repo before it saves).
SAVING_METHODS = ("save_pretrained", "push_to_hub")


def _saving_refused(model: nn.Module, method: str, *args: Any, **kwargs: Any) -> Any:
    """Installed as ``model.save_pretrained`` / ``model.push_to_hub`` while tuners sit on it (see
    :func:`save_pretrained_refusal`): a direct ``unet.save_pretrained(...)`` and a stock diffusers pipeline's, which
    calls each component's, are refused before anything is written."""
    error = save_pretrained_refusal(model, method)
    if error is not None:
        raise error
    # a reference to the guard kept past the last tuner's removal saves as diffusers does
    return getattr(type(model), method)(model, *args, **kwargs)


def install_diffusers_guards(model: nn.Module) -> None:
    """What every family guards while tuners sit on ``model`` (diffusers' calls the UNet and the transformers
    share): ``fuse_qkv_projections`` keeps or refuses the tuners; ``enable_layerwise_casting``,
    ``save_pretrained`` and ``push_to_hub`` are refused; peft's ``add_adapter`` / ``load_lora_adapter`` leave the
    tuners trainable."""
    for method in SAVING_METHODS:
        if hasattr(type(model), method):
            setattr(model, method, functools.partial(_saving_refused, model, method))
    if hasattr(type(model), "fuse_qkv_projections"):
        model.fuse_qkv_projections = functools.partial(_fuse_qkv_projections_keeping_tuners, model)
    if hasattr(type(model), "enable_layerwise_casting"):  # diffusers 0.33 and later
        model.enable_layerwise_casting = functools.partial(_enable_layerwise_casting_refused, model)
    install_peft_guards(model)


def remove_diffusers_guards(model: nn.Module) -> None:
    """Undo :func:`install_diffusers_guards` exactly."""
    for method in SAVING_METHODS:
        model.__dict__.pop(method, None)
    model.__dict__.pop("fuse_qkv_projections", None)
    model.__dict__.pop("enable_layerwise_casting", None)
    remove_peft_guards(model)


def block_selected(path: str, patterns: tuple[str, ...] | None) -> bool:
    if patterns is None:
        return True
    return any(fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(path, p.rstrip(".*") + ".*") for p in patterns)


class ModelFamily(ABC):
    """The description of one model family; subclasses fill in the class attributes and the three methods."""

    #: short name, stored in tuner files (``"unet"``, ``"sd3"``, ``"flux"``)
    name: ClassVar[str]
    #: what a user calls the model in messages ("UNet", "SD3 transformer", ...)
    model_word: ClassVar[str]
    #: the pipeline's attribute holding the model, which is also its folder in a saved pipeline ("unet", "transformer")
    component: ClassVar[str]
    #: diffusers class names of the models of this family (matched along the model's MRO)
    model_classes: ClassVar[tuple[str, ...]]
    #: every target name a block of this family may have, and the targets a config without ``targets`` gets
    targets: ClassVar[tuple[str, ...]]
    default_targets: ClassVar[tuple[str, ...]]
    #: the attention projections a linear tuner may sit beside, and those a config without ``projections`` gets
    projections: ClassVar[tuple[str, ...]]
    default_projections: ClassVar[tuple[str, ...]]
    #: the model's forward keyword argument whose :data:`~.processors.SCALE_KWARG` key sets scales for one call
    call_kwargs: ClassVar[str]
    #: tuner kinds that can sit on this family (``registry`` kind names)
    kinds: ClassVar[tuple[str, ...]] = ("operation", "linear")
    #: block path patterns shown when a ``blocks`` pattern matches nothing
    block_examples: ClassVar[tuple[str, ...]] = ()

    def matches(self, model: nn.Module) -> bool:
        return any(cls.__name__ in self.model_classes for cls in type(model).__mro__)

    @abstractmethod
    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """(path, block) of every block tuners can sit in, in module order."""

    @abstractmethod
    def operation(self, block_path: str, block: nn.Module, target: str) -> Layer | None:
        """The operation ``target`` names in ``block`` (None where this block has none, e.g. SD3's ``attn2``)."""

    def describe(self, model: nn.Module) -> dict[str, Any]:
        """What a tuner file records of the base model (shown when a file does not fit); a key the config lacks
        reads as None."""
        config = getattr(model, "config", {})
        get = config.get if hasattr(config, "get") else (lambda k, d=None: getattr(config, k, d))
        return {"class": type(model).__name__, "name_or_path": get("_name_or_path", "") or "", **self._describe(get)}

    def _describe(self, get) -> dict[str, Any]:
        return {}

    def kohya_module_paths(
        self, paths: Sequence[str], described: Mapping[str, Any], model_config: Mapping[str, Any] | None
    ) -> dict[str, str]:
        """Layer path -> the dotted path kohya's sd-scripts give that layer in the model they train, which a kohya
        LoRA key spells ``lora_unet_<path with _>``.

        ``described`` is a tuner file's record of its base model (:meth:`describe`); ``model_config`` the base
        model's config where the caller has one (else None). Families the kohya format does not cover refuse."""
        raise ResTunerError(
            f"the kohya format names UNet layers (lora_unet_*); this tuner sits on a {described.get('class')}: "
            "export with format='diffusers'"
        )

    def install_model_guards(self, model: nn.Module) -> None:  # noqa: B027 - optional hook, no-op by default
        """Called when the first tuner arrives on ``model`` (e.g. keep diffusers' helpers from dropping it)."""

    def remove_model_guards(self, model: nn.Module) -> None:  # noqa: B027 - optional hook, no-op by default
        """Called when the last tuner leaves ``model``: undo :meth:`install_model_guards` exactly."""

    # -- shared logic -------------------------------------------------------------------------------------------
    def resolve_targets(self, config: ResTunerConfig) -> tuple[str, ...]:
        targets = self.default_targets if config.targets is None else config.targets
        unknown = [t for t in targets if t not in self.targets]
        if unknown:
            raise ConfigError(
                f"target(s) {unknown} do not exist on a {self.model_word}; its targets are {list(self.targets)} "
                f"(default {list(self.default_targets)})"
            )
        return tuple(targets)

    def resolve_projections(self, config: ResTunerConfig) -> tuple[str, ...]:
        projections = self.default_projections if config.projections is None else config.projections
        unknown = [p for p in projections if p not in self.projections]
        if unknown:
            raise ConfigError(
                f"projection(s) {unknown} do not exist on a {self.model_word}; its projections are "
                f"{list(self.projections)}"
            )
        return tuple(projections)

    def check_kind(self, config: ResTunerConfig) -> None:
        if config.spec.kind not in self.kinds:
            from ...registry import get_tuner_spec, tuner_names

            can = [n for n in tuner_names() if get_tuner_spec(n).kind in self.kinds]
            raise ResTunerError(
                f"{config.tuner} is a {config.spec.kind}-level tuner and cannot sit on a {self.model_word}; "
                f"tuners that can: {can}"
            )

    def operation_layers(self, model: nn.Module, config: ResTunerConfig) -> list[Layer]:
        """The operations ``config`` selects (its targets in the blocks its patterns match), in module order.
        Raises when a block pattern matches nothing or nothing is selected."""
        blocks = self.blocks(model)
        if not blocks:
            raise ResTunerError(f"this {type(model).__name__} has no {self.model_word} blocks a tuner can sit in")
        targets = self.resolve_targets(config)
        if config.blocks is not None:
            for pattern in config.blocks:
                if not any(block_selected(path, (pattern,)) for path, _ in blocks):
                    examples = sorted({".".join(p.split(".")[:2]) for p, _ in blocks})
                    raise ConfigError(
                        f"block pattern {pattern!r} matches no transformer block of this {self.model_word}; "
                        f"blocks are named like {blocks[0][0]!r}; patterns that match: "
                        f"{examples + list(self.block_examples)}"
                    )
        layers = []
        for block_path, block in blocks:
            if not block_selected(block_path, config.blocks):
                continue
            for target in targets:
                layer = self.operation(block_path, block, target)
                if layer is not None:
                    layers.append(layer)
        if not layers:
            raise ConfigError(
                f"config {config} selects no layer of this {self.model_word} (targets {list(targets)}, blocks "
                f"{config.blocks})"
            )
        return layers
