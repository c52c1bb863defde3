"""Where branches run: the attention processor and the hooks on feed-forwards and linear projections.

A :class:`TunerBank` holds the named tuners that sit beside one frozen operation, with each tuner's scale,
placement and on/off state, and adds their branches to the frozen output. Three places own a bank:

* :class:`ResTunerAttnProcessor` -- an ``nn.Module`` attention processor on ``attn1``/``attn2``. It computes the
  frozen attention itself for the stock SDPA and xformers processors (so the frozen query is shared with the
  branches that need it), and otherwise wraps whatever processor it replaced, calling it unchanged.
* a feed-forward (``ff``) -- the bank is a child module of the ``FeedForward`` and a forward hook adds branches;
* a linear projection (``to_q`` ... ``to_out.0``, the ff's linears) -- the bank is a child module of the
  ``nn.Linear``, whose ``forward`` is replaced *on the instance* by :func:`linear_bank_forward`: it computes the
  frozen projection itself, so that on a GPU it can run the frozen weight and every branch as one GEMM
  (:func:`select_linear_path`), which a forward hook -- called after the frozen GEMM -- could not.

Hooks and instance attributes, not wrapper modules, keep every frozen module where it was and of its own class: the
UNet's state-dict keys do not change, and peft/diffusers LoRA can still find and wrap ``to_q`` beside our branch.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_call_scale
from ..tuners.base import ConfigError, ExtraHeads, FrozenAttention
from ..tuners.fast_paths import fast_path_wanted, forced_path
from .fusion import (
    FusedWeights,
    FusedWrite,
    Resolved,
    apply_write,
    frozen_base,
    frozen_output,
    plan_write,
    resolve_others,
)

try:  # the frozen attention runs through xformers only where diffusers already chose it
    import xformers.ops as xformers_ops
except Exception:  # pragma: no cover - xformers has no CPU kernels; absent on most machines
    xformers_ops = None

#: The key of ``cross_attention_kwargs`` that sets tuner scales for one call (diffusers consumes ``scale``):
#: a float for every tuner, or a dict ``{adapter_name: scale}``.
SCALE_KWARG = "res_tuner_scale"


@dataclass
class TunerSetting:
    """How one named tuner's branch is added beside one operation: scale, placement, enabled, fused.

    Hot path: nothing here runs per call. Assigning any field calls ``on_change`` (the bank's
    ``_settings_changed``), which drops the bank's cached list of branches; the next call rebuilds that list once
    (:meth:`TunerBank.active`). A per-call scale (``cross_attention_kwargs["res_tuner_scale"]``) never writes
    here, so it invalidates nothing.
    """

    scale: float = 1.0
    placement: str = "parallel"
    enabled: bool = True
    fused: bool = False
    #: Called after any other field changes: the owning bank drops its cached list of branches to run.
    on_change: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        callback = self.__dict__.get("on_change")
        if callback is not None and name != "on_change":
            callback()


def _add_scaled(out: torch.Tensor, branch: torch.Tensor, scale: float) -> torch.Tensor:
    """``out + scale * branch`` in out's dtype; at scale 1 without the multiplication (same result: 1 * b == b)."""
    branch = branch.to(out.dtype)
    return out + branch if scale == 1.0 else out + scale * branch


def _has_accelerate_hook(modules: Sequence[nn.Module]) -> bool:
    """Whether accelerate hooked any of ``modules`` (a plain loop: it runs once per call of every tuned layer)."""
    for module in modules:
        if "_hf_hook" in module.__dict__:
            return True
    return False


def call_with_weights_loaded(
    holders: Sequence[nn.Module], read: Sequence[nn.Module], function: Callable[..., Any], *args: Any
) -> Any:
    """``function(*args)``. Under ``pipe.enable_sequential_cpu_offload()`` accelerate keeps a module's weights on the
    meta device except inside that module's own call; where it hooked ``holders`` (a bank's
    :meth:`TunerBank.weight_holders`) or ``read`` (frozen modules whose weight the call reads, the attention's
    ``W_o``), their weights are loaded for the call (``accelerate.utils.align_module_device``, what each module's hook
    does around its own call): a tuner's fused GEMMs and merged deltas and ``W_o`` read weights without calling the
    module. Otherwise one dictionary look-up per module."""
    if not (_has_accelerate_hook(holders) or _has_accelerate_hook(read)):
        return function(*args)
    from accelerate.utils import align_module_device  # hooked modules mean accelerate is there

    with contextlib.ExitStack() as stack:
        for module in (*holders, *read):
            stack.enter_context(align_module_device(module))
        return function(*args)


class TunerBank(nn.Module):
    """The named tuners beside one frozen operation, and how each one's branch is added."""

    def __init__(self, layer_path: str):
        super().__init__()
        self.layer_path = layer_path
        self.tuners = nn.ModuleDict()
        self.settings: dict[str, TunerSetting] = {}
        #: Set for the duration of one UNet call from ``cross_attention_kwargs[SCALE_KWARG]``.
        self.call_scale: float | dict[str, float] | None = None
        # (name, tuner, scale, placement) of the enabled, unfused tuners, and of those whose scale is not 0:
        # computed when a tuner or a setting changes, not on every call (see ``active``).
        self._running: list[tuple[str, nn.Module, float, str]] | None = None
        self._nonzero: list[tuple[str, nn.Module, float, str]] = []
        self._weight_holders: list[nn.Module] | None = None

    def add(self, name: str, tuner: nn.Module, scale: float, placement: str) -> None:
        self.tuners[name] = tuner
        self.settings[name] = TunerSetting(scale=scale, placement=placement, on_change=self._settings_changed)
        self._running = None
        self._weight_holders = None

    def remove(self, name: str) -> None:
        del self.tuners[name]
        del self.settings[name]
        self._running = None
        self._weight_holders = None

    def weight_holders(self) -> list[nn.Module]:
        """The tuners' submodules that hold parameters themselves (where accelerate puts its offload hooks)."""
        if self._weight_holders is None:
            self._weight_holders = [m for tuner in self.tuners.values() for m in tuner.modules() if m._parameters]
        return self._weight_holders

    def _settings_changed(self) -> None:
        self._running = None

    def __len__(self) -> int:
        return len(self.tuners)

    def active(self, call_scale: float | dict[str, float] | None = None) -> list[tuple[str, nn.Module, float, str]]:
        """(name, tuner, scale, placement) of every branch to compute in this call, in the order added.

        ``call_scale`` (else ``self.call_scale``) overrides the scales for this call: a float for every tuner or a
        dict ``{name: scale}``. Without an override this is a list kept from the last change of tuners or settings.
        """
        if self._running is None:
            running = []
            for name, tuner in self.tuners.items():
                setting = self.settings[name]
                if setting.enabled and not setting.fused:
                    running.append((name, tuner, setting.scale, setting.placement))
            self._running = running
            self._nonzero = [branch for branch in running if branch[2] != 0.0]
        override = self.call_scale if call_scale is None else call_scale
        if override is None:
            return self._nonzero
        branches = []
        for name, tuner, scale, placement in self._running:
            scale = override.get(name, scale) if isinstance(override, dict) else override
            if scale != 0.0:
                branches.append((name, tuner, scale, placement))
        return branches

    def extra_repr(self) -> str:
        return f"layer={self.layer_path!r}, settings={self.settings}"


class OperationBank(TunerBank):
    """Branches ``T(x, c)`` beside an attention or a feed-forward."""

    def add_branches(
        self,
        frozen_out: torch.Tensor,
        x: torch.Tensor,
        context: torch.Tensor | None,
        frozen: FrozenAttention | None,
        call_scale: float | dict[str, float] | None = None,
    ) -> torch.Tensor:
        """``frozen_out + sum_i s_i T_i(...)`` over the running branches: ``T_i(x, context, frozen)`` when parallel,
        ``T_i(frozen_out, context, ...)`` when sequential (U-Tuning).

        Hot path, per call: one look-up of the running branches (cached by :meth:`TunerBank.active` until a tuner
        or a :class:`TunerSetting` changes; a per-call scale filters that cached list instead), then per branch
        the tuner's forward and one add (no multiply at scale 1). ``frozen`` carries the frozen projections and
        query the processor already computed, so a branch does not recompute them; for sequential branches a
        query-less copy is made once per call (they read the operation's output, not ``x``).
        """
        out = frozen_out
        sequential_frozen = None
        for _, tuner, scale, placement in self.active(call_scale):
            if placement == "parallel":
                branch = tuner(x, context, frozen)
            else:
                if sequential_frozen is None and frozen is not None:
                    # The branch reads OP's output, so the frozen query of x does not apply to it.
                    sequential_frozen = FrozenAttention(
                        frozen.to_q, frozen.to_k, frozen.to_v, frozen.out_weight, frozen.heads, None, frozen.key_mask
                    )
                branch = tuner(frozen_out, context, sequential_frozen)
            out = _add_scaled(out, branch, scale)
        return out


def effective_delta(
    tuner: nn.Module, placement: str, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(dW, db)`` in float32 (float64 where the weight or the tuner is float64) with ``branch(x) = dW x + db`` for
    a linear tuner at ``placement`` beside ``y = W0 x + b0`` (unscaled): the tuner's own fold when parallel;
    ``dW W0`` and ``dW b0 + db`` when sequential, since there it reads ``y``. Shared by fusing and by the LoRA
    export, so both fold the same delta."""
    delta_w, delta_b = tuner.fold(weight, bias)
    dtype = torch.promote_types(torch.promote_types(delta_w.dtype, weight.dtype), torch.float32)
    delta_w = delta_w.to(dtype)
    delta_b = None if delta_b is None else delta_b.to(dtype)
    if placement == "sequential":
        # T(y) = dW (W0 x + b0) + db
        seq_b = delta_w @ bias.to(dtype) if bias is not None else None
        delta_b = seq_b if delta_b is None else (delta_b if seq_b is None else delta_b + seq_b)
        delta_w = delta_w @ weight.to(dtype)
    return delta_w, delta_b


#: Values of :attr:`ResTunerAttnProcessor.extra_heads`.
EXTRA_HEADS_MODES = ("auto", "off", "on")

#: How a :class:`LinearBank` runs its branches (``LinearBank.path``): ``"branch"`` -- the frozen GEMM, then each
#: tuner's ``T(x)`` added (the reference); ``"merged"`` -- one GEMM with ``W + sum_i s_i dW_i`` (and the biases),
#: the deltas formed from the tuners' parameters once per call (see :func:`select_linear_path`); ``"auto"``.
LINEAR_PATHS = ("auto", "branch", "merged")


def select_linear_path(bank: LinearBank, x: torch.Tensor, branches: list[tuple[str, nn.Module, float, str]]) -> str:
    """``"merged"`` or ``"branch"`` for one call of ``bank`` on ``x``.

    ``bank.path`` forces one (``"merged"`` raises :class:`ConfigError` if a branch cannot merge). ``"auto"``
    merges when every branch is parallel and its tuner says it can (``mergeable``: e.g. no dropout on its input
    while training) and the fast paths are wanted -- on CUDA, or under ``forced_paths("fast")``: there one GEMM
    with a d_out x d_in delta beats two passes over the activations and (SURM) float32 FFT spectra of every token.
    On CPU the branches stay separate: the low-rank branch is cheaper than a second full-size weight gradient.
    """
    # ``mergeable`` and ``merge_on_cuda``: flags every LinearTuner declares
    mergeable = all(placement == "parallel" and tuner.mergeable for _, tuner, _, placement in branches)
    if bank.path == "auto":
        if not (mergeable and fast_path_wanted(x.device.type)):
            return "branch"
        # Unforced on CUDA: only tuners whose merged path measured faster there (``merge_on_cuda``).
        measured = forced_path() is not None or all(t.merge_on_cuda for _, t, _, _ in branches)
        return "merged" if measured else "branch"
    if bank.path not in LINEAR_PATHS:
        raise ConfigError(f"LinearBank.path={bank.path!r} is not allowed; choose one of {list(LINEAR_PATHS)}")
    if bank.path == "merged" and not mergeable:
        raise ConfigError(
            f"{bank.layer_path}: path='merged' needs every active tuner parallel and mergeable (no input dropout "
            "while training); set path='auto' or 'branch'"
        )
    return bank.path


class LinearBank(TunerBank):
    """Branches beside a frozen ``y = W0 x + b0``; folds them into the weight on request.

    Fusing writes ``P + sum_i s_i dW_i`` (and the biases) into the linear, where ``P`` is the weight as everybody
    else left it (W0, plus a diffusers LoRA that ``fuse_lora`` merged) and the deltas are computed from W0, the base
    weight without any adapter's delta; unfusing writes ``P`` back, bit for bit when nobody else touched the weight
    in between. :mod:`.fusion` keeps that bookkeeping and refuses the orders it cannot make exact. A tuner that
    creates a bias where the frozen linear has none (GLoRA's ``E + W0 C``) gets one: a frozen bias parameter is
    added on fuse and removed on unfuse, which restores the module exactly (``bias is None``, same state-dict keys).
    Fused tuners are skipped by the branch hook; a bank whose tuners are all fused returns at once.
    """

    #: :data:`LINEAR_PATHS`; a class default, set on one bank to force its path.
    path: str = "auto"

    def __init__(self, layer_path: str):
        super().__init__(layer_path)
        #: the frozen linear had no bias and fusing added one (removed again on unfuse)
        self.added_bias = False
        #: every tuner of the bank is fused: the hook has nothing to add
        self.all_fused = False
        #: while any tuner is fused: what :func:`.fusion.apply_write` recorded (P, W0 in the buffers below)
        self.fused: FusedWeights | None = None
        for name in ("fused_others_weight", "fused_others_bias", "fused_base_weight", "fused_base_bias"):
            self.register_buffer(name, None, persistent=False)
        # The module that holds the projection (where diffusers' LoRA puts its peft wrapper): a plain attribute,
        # not a child module, so the model's module tree and state dict do not change.
        object.__setattr__(self, "parent_module", None)

    def bind_parent(self, parent: nn.Module) -> None:
        object.__setattr__(self, "parent_module", parent)

    def add(self, name: str, tuner: nn.Module, scale: float, placement: str) -> None:
        super().add(name, tuner, scale, placement)
        self._update_all_fused()

    def remove(self, name: str) -> None:
        super().remove(name)
        self._update_all_fused()

    def _update_all_fused(self) -> None:
        self.all_fused = bool(self.settings) and all(setting.fused for setting in self.settings.values())

    def fused_names(self) -> list[str]:
        return [name for name, setting in self.settings.items() if setting.fused]

    def forward_linear(self, x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
        """The linear's output with every active branch: merged into one GEMM or added branch by branch
        (:func:`select_linear_path`)."""
        return call_with_weights_loaded(self.weight_holders(), (), self._forward_linear, x, linear, self.active())

    def _forward_linear(self, x: torch.Tensor, linear: nn.Linear, branches: list) -> torch.Tensor:
        if branches and select_linear_path(self, x, branches) == "merged":
            return self.merged_forward(x, linear, branches)
        return self.add_branches(F.linear(x, linear.weight, linear.bias), x, linear)

    def add_branches(self, frozen_out: torch.Tensor, x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
        """``frozen_out + sum_i s_i T_i(x, W0, b0)`` (a sequential branch reads ``W0 x + b0`` instead of ``x``).

        Hot path, per call: the cached list of running branches (:meth:`TunerBank.active`), then per branch the
        tuner's forward and one add. W0 is the live weight unless a tuner that reads it (GLoRA) or a sequential
        branch runs; only then is the base looked up (:func:`.fusion.frozen_base`: the fused record while something
        is fused, else a check for merged peft adapters), and ``W0 x + b0`` recomputed only when the live weight
        differs from W0.
        """
        out = frozen_out
        branches = self.active()
        weight, bias, base_out = linear.weight, linear.bias, frozen_out
        if any(type(tuner).fold_reads_base or placement == "sequential" for _, tuner, _, placement in branches):
            # Only then do the branches need W0 itself, which differs from the live weight while something is fused.
            weight, bias, _ = frozen_base(self, linear)
            if any(placement == "sequential" for *_, placement in branches):
                base_out = frozen_output(self, linear, x, frozen_out)
        for _, tuner, scale, placement in branches:
            source = x if placement == "parallel" else base_out
            out = _add_scaled(out, tuner(source, weight, bias), scale)
        return out

    def merged_forward(
        self, x: torch.Tensor, linear: nn.Linear, branches: list[tuple[str, nn.Module, float, str]]
    ) -> torch.Tensor:
        """``F.linear(x, W + sum_i s_i dW_i, b + sum_i s_i db_i)``, ``(dW_i, db_i) = tuner_i.fold(W0, b0)`` formed
        from the parameters in this call (so the gradient reaches them), summed in float32 onto the linear's
        current weight (which holds any fused tuners), then cast to x's dtype -- the GEMM runs in the precision
        the frozen one would (autocast's, under autocast)."""
        weight0, bias0 = self.frozen_weight_and_bias(linear)
        wide = torch.promote_types(linear.weight.dtype, torch.float32)  # float32, or float64 for a float64 model
        weight = linear.weight.to(wide)
        bias = None if linear.bias is None else linear.bias.to(wide)
        for _, tuner, scale, _ in branches:
            delta_w, delta_b = tuner.fold(weight0, bias0)
            delta_w = delta_w.to(wide) if scale == 1.0 else scale * delta_w.to(wide)
            weight = weight + delta_w
            if delta_b is not None:
                delta_b = delta_b.to(wide) if scale == 1.0 else scale * delta_b.to(wide)
                bias = delta_b if bias is None else bias + delta_b
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    def frozen_weight_and_bias(self, linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
        """W0 and b0: the base weights without any fused tuner's or diffusers LoRA's delta."""
        weight, bias, _ = frozen_base(self, linear)
        return weight, bias

    def resolve(self, linear: nn.Linear, accept_changed_weights: bool = False, action: str = "fusing") -> Resolved:
        """The weight as everybody else left it (see :func:`.fusion.resolve_others`); refuses, changing nothing."""
        return resolve_others(self, linear, accept_changed_weights, action)

    def names_after_fuse(self, names: list[str]) -> list[str]:
        """The tuners fused once ``names`` are fused beside those already fused: the fused ones first, then the newly
        named ones of this bank in the order they were added."""
        fused = self.fused_names()
        return fused + [n for n in self.settings if n in names and n not in fused]

    def plan_unfuse(
        self, linear: nn.Linear, names: list[str] | None = None, accept_changed_weights: bool = False
    ) -> FusedWrite | None:
        """What unfusing the named tuners (all when None) writes: ``P`` plus the ones that stay fused; None when none
        of them is fused. Refuses, changing nothing, when the weight cannot be restored exactly."""
        fused = self.fused_names()
        leaving = fused if names is None else [n for n in fused if n in names]
        if self.fused is None or not leaving:
            return None
        others = self.resolve(linear, accept_changed_weights, action="unfuse_res_tuner")
        return plan_write(self, linear, others, [n for n in fused if n not in leaving])

    def write_planned(self, linear: nn.Linear, write: FusedWrite) -> None:
        """Write a planned fuse/unfuse into ``linear``; ``write.names`` are fused afterwards, the others not."""
        apply_write(self, linear, write)
        for name, setting in self.settings.items():
            setting.fused = name in write.names
        self._update_all_fused()


# --- hooks (module-level functions: a deep-copied UNet keeps working, and removal finds them by identity) ---
def linear_bank_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``module.forward`` of a linear with a bank (bound with ``functools.partial``): ``nn.Linear.forward`` when
    nothing is to be added, else the bank's :meth:`LinearBank.forward_linear`."""
    bank: LinearBank | None = getattr(module, "res_tuner_bank", None)
    if bank is None or not len(bank) or bank.all_fused:
        return F.linear(x, module.weight, module.bias)
    return bank.forward_linear(x, module)


def ff_bank_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    bank: OperationBank = module.res_tuner_bank
    if not len(bank):
        return output
    return call_with_weights_loaded(bank.weight_holders(), (), bank.add_branches, output, args[0], None, None)


# --- the attention processor -------------------------------------------------------------------------------
#: Keyword arguments diffusers hands an attention processor for an IP-Adapter (its "quiet" attention parameters,
#: and SD3's ``temb``), which diffusers drops unless the processor's ``__call__`` names them: ours name them and pass
#: them on to the processor they wrap where that one names them too.
PASSED_ON_KWARGS = ("ip_adapter_masks", "ip_hidden_states", "temb")


def _passed_on(processor: Any) -> frozenset[str]:
    """Which of :data:`PASSED_ON_KWARGS` ``processor.__call__`` takes (all of them if it takes ``**kwargs``)."""
    if processor is None:
        return frozenset()
    parameters = inspect.signature(processor.__call__).parameters
    if any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters.values()):
        return frozenset(PASSED_ON_KWARGS)
    return frozenset(name for name in PASSED_ON_KWARGS if name in parameters)


def _processor_backend(processor: Any) -> str:
    """How the frozen attention is computed: inline SDPA / xformers for diffusers' stock processors (so the
    branch can reuse the frozen query), or by calling the wrapped processor as it is."""
    from diffusers.models.attention_processor import AttnProcessor2_0, XFormersAttnProcessor

    if type(processor) is AttnProcessor2_0:
        return "sdpa"
    if type(processor) is XFormersAttnProcessor and xformers_ops is not None:
        return "xformers"
    return "wrapped"


class ResTunerAttnProcessor(nn.Module):
    """An attention processor that runs the frozen attention and adds the branches of its :class:`OperationBank`.

    ``base_processor`` is the processor it replaced (diffusers' stock one, or xformers', sliced, ...). It is
    restored when the last tuner is removed, and it is swapped, never lost, when diffusers installs another
    processor (see ``kinds.layers._set_processor_keeping_tuners``).
    """

    #: ``"auto"``: sampling computes a lone parallel branch that is an attention over the same keys (Res-Attn) as
    #: extra heads of the frozen attention where the fast paths are wanted (CUDA); ``"off"`` / ``"on"`` force it
    #: off or on (where it applies) for this processor, winning over ``forced_paths``. See :meth:`_extra_heads_call`.
    extra_heads: str = "auto"
    #: Whether the extra-heads form also runs when gradients are wanted (training): fewer ops per step again (one
    #: attention and its backward instead of two), at the price of weight gradients of the concatenated frozen
    #: projections (GEMMs the floor does not run). Off until a GPU run measures it (``res_attn [extra heads]``,
    #: ``gpu_run4.sh``); a class attribute, so ``ResTunerAttnProcessor.extra_heads_training = True`` turns it on.
    extra_heads_training: bool = False
    #: Whether the extra-heads form also runs while ``torch.compile`` traces. Off: compiled code launches no kernels
    #: from Python, which is what the form saves in eager mode, and it adds two heads at the frozen head width to
    #: the frozen attention where the separate branch runs two narrow ones. Which is faster compiled is a GPU
    #: question: the GPU suite's compiled sampling row ``res_attn (unfused) [extra heads]`` turns it on per
    #: processor to measure it (``gpu_run5.sh``).
    extra_heads_compiled: bool = False

    def __init__(self, base_processor: Any = None, layer_path: str = ""):
        # Built without arguments, it is what diffusers' loaders make of a processor they leave alone: they rebuild
        # those as ``type(processor)()`` (IP-Adapter loading and unloading, motion modules). The attention's guard
        # reads it as "keep this processor" (kinds.layers._set_processor_keeping_tuners); it is never installed.
        super().__init__()
        self.bank = OperationBank(layer_path)
        self.set_base_processor(base_processor)

    def sharing_tuners_around(self, processor: Any) -> ResTunerAttnProcessor:
        """A processor of this class around ``processor`` that runs this one's tuners: the same bank (modules,
        settings) and the same per-processor switches. For a caller that swaps ``processor`` in for a while and
        then puts this one back (diffusers' PAG pipelines)."""
        twin = type(self)(processor, self.bank.layer_path)
        twin.bank = self.bank
        for switch in ("extra_heads", "extra_heads_training", "extra_heads_compiled"):
            if switch in self.__dict__:
                setattr(twin, switch, self.__dict__[switch])
        return twin

    def set_base_processor(self, processor: Any) -> None:
        processor = self._store_base_processor(processor)
        self.backend = _processor_backend(processor)

    def _store_base_processor(self, processor: Any) -> Any:
        """Keep ``processor`` (ours unwrapped) as the one this processor runs. One that is a module (IP-Adapter's,
        with its ``to_k_ip`` / ``to_v_ip``) becomes our child, as it was the attention's: ``model.to(...)``,
        accelerate's offload hooks and ``state_dict()`` keep reaching its weights (it was kept outside the module
        tree, so ``pipe.to("cuda")`` or ``pipe.to(torch.float16)`` left them behind). A stock one, a plain object,
        is an attribute."""
        if isinstance(processor, ResTunerAttnProcessor):
            processor = processor.base_processor
        self._modules.pop("base_processor", None)
        self.__dict__.pop("base_processor", None)
        if isinstance(processor, nn.Module):
            self._modules["base_processor"] = processor
        else:
            self.__dict__["base_processor"] = processor
        self.base_kwargs = _passed_on(processor)
        return processor

    # diffusers' set_attention_backend() / reset_attention_backend() (and FluxAttention.set_attention_backend) set
    # ``processor._attention_backend`` where the processor has one: passed to the wrapped processor, which runs the
    # attention, instead of landing on this wrapper unread (the wrapped one kept the backend it had when tuners came).
    @property
    def _attention_backend(self) -> Any:
        return self.base_processor._attention_backend  # AttributeError where it has none: diffusers then skips us

    @_attention_backend.setter
    def _attention_backend(self, backend: Any) -> None:
        self.base_processor._attention_backend = backend

    # Attention.forward passes a cross_attention_kwargs key only if __call__ names it, hence the explicit signature.
    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        res_tuner_scale: float | dict[str, float] | None = None,
        ip_adapter_masks: Any = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        # A per-call scale passed to the attention itself (the UNet's pre-hook sets ``bank.call_scale`` instead) goes
        # to the bank as an argument, not as state: nothing to restore afterwards, so no try/finally in the hot path.
        bank = self.bank
        # only when the attention itself is given a scale (the UNet's hook checks its own)
        if res_tuner_scale is not None:
            check_call_scale(res_tuner_scale)
        if (
            self.backend == "sdpa"
            and attention_mask is None
            and len(bank)
            and (self.extra_heads_training or not torch.is_grad_enabled())
        ):
            out = self._extra_heads_call(attn, hidden_states, encoder_hidden_states, res_tuner_scale)
            if out is not None:
                return out
        if self.backend == "wrapped":
            # not every processor takes temb (SlicedAttnProcessor does not) or IP-Adapter's masks
            if temb is not None and "temb" in self.base_kwargs:
                kwargs["temb"] = temb
            if ip_adapter_masks is not None and "ip_adapter_masks" in self.base_kwargs:
                kwargs["ip_adapter_masks"] = ip_adapter_masks
            frozen_out = self.base_processor(
                attn,
                hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                attention_mask=attention_mask,
                **kwargs,
            )
            query, context = None, _text_context(self.base_processor, encoder_hidden_states)
            if attn.norm_cross and context is not None:
                context = attn.norm_encoder_hidden_states(context)
        else:
            frozen_out, query, context = self._frozen_attention(
                attn, hidden_states, encoder_hidden_states, attention_mask
            )
        if not len(bank):
            return frozen_out
        # Our processor sits only on the attentions of transformer blocks, whose input is always (B, N, d).
        key_mask = None if attention_mask is None else _branch_key_mask(attn, attention_mask, hidden_states, context)
        to_out = attn.to_out[0]
        return call_with_weights_loaded(
            bank.weight_holders(),
            (to_out,),
            self._add_branches,
            attn,
            to_out,
            frozen_out,
            hidden_states,
            context,
            query,
            key_mask,
            res_tuner_scale,
        )

    def _add_branches(
        self,
        attn: nn.Module,
        to_out: nn.Linear,
        frozen_out: torch.Tensor,
        hidden_states: torch.Tensor,
        context: torch.Tensor | None,
        query: torch.Tensor | None,
        key_mask: torch.Tensor | None,
        call_scale: float | dict[str, float] | None,
    ) -> torch.Tensor:
        # W_o is read here, inside call_with_weights_loaded (under offload it is meta outside)
        frozen = FrozenAttention(attn.to_q, attn.to_k, attn.to_v, to_out.weight, attn.heads, query, key_mask)
        return self.bank.add_branches(frozen_out, hidden_states, context, frozen, call_scale)

    def _extra_heads_call(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        call_scale: float | dict[str, float] | None,
    ) -> torch.Tensor | None:
        """``OP(x, c) + s T(x, c)`` as ONE attention with the branch's heads appended to the frozen ones, or None
        where that does not apply (the caller then runs the frozen attention and adds the branch).

        Why: on a GPU a sampling forward is bound by the host launching kernels, and a separate branch costs ~20
        dispatched ops per attention; as extra heads the frozen projections and the branch's rows (formed from its
        parameters in three small matmuls per call: nothing cached that a write to them could leave stale) are
        concatenated per call into one weight per input -- q, k and v from x in one GEMM in self-attention, k and v
        from c in one in cross-attention -- so the call dispatches about as many ops as the frozen attention alone.
        Applies under ``no_grad`` (sampling; with gradients too when :attr:`extra_heads_training` is set), without a
        mask, to a lone parallel branch that offers :meth:`~..tuners.base.OperationTuner.extra_heads`, beside plain
        linear projections without bias on q/k/v (no LoRA wrapper, hook or bank of ours on them) of an attention
        without group norm, qk-norm, residual or output rescaling (SD's transformer blocks); automatically where the
        fast paths are wanted (CUDA), not while compiling unless :attr:`extra_heads_compiled` (the compiler removes
        the launches anyway). Equal to the branch path up to rounding (the branch's query rows carry its softmax
        scale); ``extra_heads = "off"`` or ``forced_paths("reference")`` gives the reference path.
        """
        if self.extra_heads not in EXTRA_HEADS_MODES:
            raise ConfigError(
                f"{self.bank.layer_path}: extra_heads={self.extra_heads!r} is not allowed; choose one of "
                f"{list(EXTRA_HEADS_MODES)}"
            )
        if self.extra_heads == "off" or (torch.compiler.is_compiling() and not self.extra_heads_compiled):
            return None
        if self.extra_heads != "on" and not fast_path_wanted(hidden_states.device.type):
            return None
        branches = self.bank.active(call_scale)
        if len(branches) != 1 or branches[0][3] != "parallel" or not _plain_attention(attn):
            return None
        _, tuner, scale, _ = branches[0]
        to_q, to_k, to_v, to_out = attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]
        heads = attn.heads
        head_dim = to_k.out_features // heads
        extra: ExtraHeads | None = tuner.extra_heads(head_dim, scale, to_q.weight.dtype)
        if extra is None:
            return None
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        batch = hidden_states.shape[0]
        total = heads + extra.heads
        # One GEMM per input (x: q, k and v in self-attention; c: k and v), the heads viewed out of it.
        if encoder_hidden_states is None:
            weight = torch.cat([to_q.weight, extra.q, to_k.weight, extra.k, to_v.weight, extra.v])
            qkv = F.linear(hidden_states, weight).view(batch, -1, 3, total, head_dim)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q = F.linear(hidden_states, torch.cat([to_q.weight, extra.q])).view(batch, -1, total, head_dim)
            q = q.transpose(1, 2)
            kv = F.linear(context, torch.cat([to_k.weight, extra.k, to_v.weight, extra.v]))
            k, v = kv.view(batch, -1, 2, total, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, total * head_dim).to(q.dtype)
        out = F.linear(out, torch.cat([to_out.weight, extra.out], dim=1), to_out.bias)
        return attn.to_out[1](out)

    def _frozen_attention(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """diffusers' stock attention (AttnProcessor2_0 / XFormersAttnProcessor). Also returns what the branches
        reuse instead of computing again: the frozen query and the (normalised) context, None for self-attention.

        Only the attentions of transformer blocks get this processor: their input is always (B, N, d) and they have
        no spatial norm (the VAE's attention, which has both, never gets one), so those paths of the stock
        processor are left out."""
        residual = hidden_states
        batch_size, key_tokens, _ = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        # The branches may only reuse the query when they see the same input as the frozen attention.
        shared_query = query if attn.group_norm is None else None
        if encoder_hidden_states is None:
            branch_context = None
            encoder_hidden_states = hidden_states
        else:
            if attn.norm_cross:
                encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            branch_context = encoder_hidden_states
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        if self.backend == "xformers":
            if attention_mask is not None:
                attention_mask = attn.prepare_attention_mask(attention_mask, key_tokens, batch_size)
                attention_mask = attention_mask.expand(-1, hidden_states.shape[1], -1)
            q = attn.head_to_batch_dim(query).contiguous()
            k = attn.head_to_batch_dim(key).contiguous()
            v = attn.head_to_batch_dim(value).contiguous()
            out = xformers_ops.memory_efficient_attention(
                q, k, v, attn_bias=attention_mask, op=self.base_processor.attention_op, scale=attn.scale
            )
            out = attn.batch_to_head_dim(out.to(query.dtype))
        else:
            if attention_mask is not None:
                attention_mask = attn.prepare_attention_mask(attention_mask, key_tokens, batch_size)
                attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
            head_dim = key.shape[-1] // attn.heads
            q = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            k = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            v = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            if attn.norm_q is not None:
                q = attn.norm_q(q)
            if attn.norm_k is not None:
                k = attn.norm_k(k)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
            out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)

        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        if attn.rescale_output_factor != 1.0:  # x / 1.0 == x exactly: skip a pass over the output (and its backward)
            out = out / attn.rescale_output_factor
        return out, shared_query, branch_context


def _text_context(processor: Any, encoder_hidden_states: Any) -> torch.Tensor | None:
    """The context the branches read: the text tokens. IP-Adapter's processors are given ``(text, [image tokens per
    adapter])`` (or, in diffusers' deprecated form, the image tokens appended to the text) and attend to the image
    tokens through their own ``to_k_ip`` / ``to_v_ip``; a branch, trained on the text, reads the text only."""
    if isinstance(encoder_hidden_states, tuple):
        return encoder_hidden_states[0]
    image_tokens = getattr(processor, "num_tokens", None)  # an IP-Adapter processor (diffusers' attribute)
    if encoder_hidden_states is not None and isinstance(image_tokens, (list, tuple)) and image_tokens:
        return encoder_hidden_states[:, : encoder_hidden_states.shape[1] - image_tokens[0]]
    return encoder_hidden_states


def _branch_key_mask(
    attn: nn.Module, attention_mask: torch.Tensor, hidden_states: torch.Tensor, context: torch.Tensor | None
) -> torch.Tensor:
    """The mask the frozen attention applies, for a branch over the same keys (:attr:`FrozenAttention.key_mask`):
    diffusers' own preparation (``prepare_attention_mask``: padded to the keys, one copy per head), then head 0's
    copy, (B, 1, N_q or 1, N_k), which broadcasts over however many heads the branch has. A mask made per head
    (batch ``B * heads``) gives every branch head the first head's: the branch's heads are not the frozen ones."""
    batch = hidden_states.shape[0]
    key_tokens = (hidden_states if context is None else context).shape[1]
    prepared = attn.prepare_attention_mask(attention_mask, key_tokens, batch)  # (B heads, [N_q or 1,] N_k)
    return prepared.view(batch, attn.heads, -1, prepared.shape[-1])[:, :1]  # as diffusers' SDPA processor views it


def _plain_linear(module: nn.Module, bias: bool = True) -> bool:
    """An ``nn.Linear`` computing exactly ``x W^T + b`` (no peft wrapper, instance forward, hook; no bias unless
    ``bias``): its weight may stand in for the module."""
    return (
        type(module) is nn.Linear
        and (bias or module.bias is None)
        and "forward" not in module.__dict__
        and not module._forward_hooks
        and not module._forward_pre_hooks
    )


def _plain_attention(attn: nn.Module) -> bool:
    """SD's transformer-block attention as :meth:`ResTunerAttnProcessor._frozen_attention` computes it, with plain
    projections (bias-free q/k/v of equal width): what :meth:`ResTunerAttnProcessor._extra_heads_call` needs."""
    return (
        attn.group_norm is None
        and attn.norm_q is None
        and attn.norm_k is None
        and not attn.residual_connection
        and attn.rescale_output_factor == 1.0
        and _plain_linear(attn.to_q, bias=False)
        and _plain_linear(attn.to_k, bias=False)
        and _plain_linear(attn.to_v, bias=False)
        and _plain_linear(attn.to_out[0])
        and attn.to_q.out_features == attn.to_k.out_features == attn.to_v.out_features
    )


# --- joint attention (SD3 / SD3.5 MMDiT, Flux) ------------------------------------------------------------------
def _frozen_projection(linear: nn.Module, norm: nn.Module | None, heads: int, x: torch.Tensor) -> torch.Tensor:
    """A frozen projection as the joint attention uses it: ``linear(x)``, then its per-head qk-norm (if any).
    No rotary embedding: the branches' attention carries none (see :class:`ResTunerJointAttnProcessor`)."""
    out = linear(x)
    if norm is None:
        return out
    return norm(out.unflatten(-1, (heads, -1))).flatten(-2)


class ResTunerJointAttnProcessor(ResTunerAttnProcessor):
    """The attention processor of diffusion transformers (SD3's ``JointAttnProcessor2_0``, Flux's
    ``FluxAttnProcessor``): it calls the wrapped processor unchanged, so the frozen joint attention -- rotary
    embeddings, masks, qk-norms and both streams -- is computed exactly as diffusers does, and adds the branches
    of its :class:`OperationBank` to the **image stream** (``y_img' = y_img + s T(x_img, [c; x_img])``).

    What the branches read (SPEC, "Diffusion transformers"):

    * joint attention (an ``encoder_hidden_states`` is given): ``x`` are the image tokens, the context is the joint
      sequence ``[c; x]`` (text tokens first), so Res-Attn's keys and values come from text and image; the text
      stream's output is returned untouched (it is read as context, not tuned);
    * an attention over one sequence (SD3.5's ``attn2``, Flux's single blocks over the concatenated text+image
      tokens): a self-attention branch on that sequence, ``c = x``;
    * the frozen query for Res-Prefix / Res-Prompt is ``to_q(x)`` after the attention's qk-norm, without the rotary
      embedding: the learned keys have no position, so rotating only the query would add noise, not information.
      Res-Prompt's tokens go through the text stream's ``add_k_proj`` / ``add_v_proj`` (they stand in for text)
      where the attention has them, else through ``to_k`` / ``to_v``. Where the attention has no output projection
      (Flux's single blocks, ``pre_only``) the branch output is the attended values themselves (``W_o = I``).
    """

    def set_base_processor(self, processor: Any) -> None:
        self._store_base_processor(processor)
        self.backend = "wrapped"  # always: the joint computation (rotary, masks, streams) stays diffusers' own

    # FluxAttention passes (hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb) positionally and
    # forwards only the keyword arguments __call__ names: hence the explicit signature.
    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
        res_tuner_scale: float | dict[str, float] | None = None,
        ip_hidden_states: Any = None,
        ip_adapter_masks: Any = None,
        temb: Any = None,
        **kwargs: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if image_rotary_emb is not None:
            kwargs["image_rotary_emb"] = image_rotary_emb
        if self.base_kwargs:  # the wrapped processor takes IP-Adapter's arguments (or **kwargs)
            passed = {"ip_hidden_states": ip_hidden_states, "ip_adapter_masks": ip_adapter_masks, "temb": temb}
            kwargs.update((name, passed[name]) for name in self.base_kwargs if passed[name] is not None)
        frozen_out = self.base_processor(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        bank = self.bank
        if not len(bank):
            return frozen_out
        to_out = getattr(attn, "to_out", None)
        return call_with_weights_loaded(
            bank.weight_holders(),
            () if to_out is None else (to_out[0],),
            self._add_joint_branches,
            attn,
            frozen_out,
            hidden_states,
            encoder_hidden_states,
            res_tuner_scale,
        )

    def _add_joint_branches(
        self,
        attn: nn.Module,
        frozen_out: torch.Tensor | tuple[torch.Tensor, ...],
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        res_tuner_scale: float | dict[str, float] | None,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        bank = self.bank
        heads = attn.heads
        added_k = getattr(attn, "add_k_proj", None)
        if added_k is not None:  # prompt tokens stand in for text: read them through the text stream's projections
            to_k = functools.partial(_frozen_projection, added_k, getattr(attn, "norm_added_k", None), heads)
            to_v = functools.partial(_frozen_projection, attn.add_v_proj, None, heads)
        else:
            to_k = functools.partial(_frozen_projection, attn.to_k, getattr(attn, "norm_k", None), heads)
            to_v = functools.partial(_frozen_projection, attn.to_v, None, heads)
        to_out = getattr(attn, "to_out", None)
        frozen = FrozenAttention(
            functools.partial(_frozen_projection, attn.to_q, getattr(attn, "norm_q", None), heads),
            to_k,
            to_v,
            None if to_out is None else to_out[0].weight,
            heads,
        )
        # joint: (image stream, text stream[, IP-Adapter's output: Flux]); only the image stream is tuned
        if isinstance(frozen_out, tuple):
            image_out, text_out, *rest = frozen_out
            context = torch.cat([encoder_hidden_states, hidden_states], dim=1)
            return bank.add_branches(image_out, hidden_states, context, frozen, res_tuner_scale), text_out, *rest
        return bank.add_branches(frozen_out, hidden_states, None, frozen, res_tuner_scale)
