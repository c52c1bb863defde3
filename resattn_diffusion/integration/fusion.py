"""Folding linear tuners into weights that diffusers / peft LoRA also fold into: exact in any order, or refused.

The weight of a linear whose bank has fused tuners is ``W = P + D``:

* ``P``, the *others' weight*: the base ``W0`` plus whatever peft has merged into it (``pipe.fuse_lora()``);
* ``D``, the fused tuners' delta ``sum_i s_i dW_i``, always computed from ``W0``, the base weight without any
  adapter's delta (GLoRA's ``W0 ⊙ A`` and ``W0 C`` are defined on it; a LoRA merged into the weight is not W0).

While any tuner of a bank is fused, the bank keeps (:class:`FusedWeights`) an exact copy of ``P`` as it was when
the bank last wrote the weight, which peft adapters were merged into ``P`` then, and ``W0`` where it differs from
``P``. Before each write (fuse, unfuse, remove) the others' weight *now* is found (:func:`resolve_others`):

1. the weight is bit-identical to what the bank wrote: ``P`` is restored bit for bit;
2. otherwise the change must be peft merging or unmerging its adapters since then (``fuse_lora``, ``unfuse_lora``,
   ``disable_lora``, ``unload_lora_weights`` of a fused LoRA, which bakes it in): ``P`` with those merges replayed
   the way peft does them, checked against the weight to rounding: what diffusers alone would have left;
3. otherwise something else wrote the weight (a direct edit, a non-additive merge such as DoRA, ...): refused,
   changing nothing, unless the caller accepts changed weights; then exactly the bank's own delta is subtracted.

peft is read by duck typing (``get_base_layer``, ``merged_adapters``, ``get_delta_weight``), never imported here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .state import ResTunerError

if TYPE_CHECKING:  # pragma: no cover
    from .processors import LinearBank

#: ``unfuse_res_tuner(..., accept_changed_weights=True)``: the name users see in the refusal message.
ACCEPT_FLAG = "accept_changed_weights"


def _error(message: str) -> Exception:
    return ResTunerError(message)


# --- peft, read by duck typing ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PeftMerges:
    """A peft layer wrapping the bank's linear (None: none) and the adapters merged into it, in merge order."""

    wrapper: nn.Module | None = None
    merged: tuple[str, ...] = ()


def peft_wrapper(bank: LinearBank, linear: nn.Linear) -> nn.Module | None:
    """The peft layer (diffusers' ``load_lora_weights``) now wrapping ``linear``, found where the bank sits."""
    parent = bank.parent_module
    if parent is None:
        return None
    module = getattr(parent, bank.layer_path.rsplit(".", 1)[-1], None)
    if module is None or module is linear or not hasattr(module, "get_base_layer"):
        return None
    return module if module.get_base_layer() is linear else None


def current_merges(bank: LinearBank, linear: nn.Linear) -> PeftMerges:
    wrapper = peft_wrapper(bank, linear)
    if wrapper is None:
        return PeftMerges()
    return PeftMerges(wrapper, tuple(getattr(wrapper, "merged_adapters", ()) or ()))


def check_additive(merges: PeftMerges, layer_path: str) -> None:
    """Refuse peft merges that do not simply add ``dW`` to the weight (DoRA and the other LoRA variants)."""
    wrapper = merges.wrapper
    for adapter in merges.merged:
        lora_a = getattr(wrapper, "lora_A", {})
        variants = getattr(wrapper, "lora_variant", {}) or {}
        if adapter in lora_a and adapter not in variants and hasattr(wrapper, "get_delta_weight"):
            continue
        kind = type(variants[adapter]).__name__ if adapter in variants else type(wrapper).__name__
        raise _error(
            f"the diffusers/peft adapter {adapter!r} on {layer_path} is merged into the weight in a form that does "
            f"not simply add to it ({kind}, e.g. DoRA), so res tuners cannot be folded beside it exactly. Nothing was "
            "changed. Call pipe.unfuse_lora() first, fuse or unfuse the res tuners, then pipe.fuse_lora() again"
        )


def _adds_to_bias(wrapper: nn.Module, adapter: str) -> bool:
    """Whether peft's merge of ``adapter`` adds to the bias too (peft's ``lora_bias``)."""
    return bool((getattr(wrapper, "lora_bias", {}) or {}).get(adapter, False))


def _adapter_delta(wrapper: nn.Module, adapter: str, layer_path: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What peft's ``merge`` adds for one adapter: ``(dW, db)``."""
    check_additive(PeftMerges(wrapper, (adapter,)), layer_path)
    delta_w = wrapper.get_delta_weight(adapter)
    delta_b = None
    if _adds_to_bias(wrapper, adapter):
        delta_b = wrapper.lora_B[adapter].bias * wrapper.scaling[adapter]
    return delta_w, delta_b


def _peft_merge(weight: torch.Tensor, bias: torch.Tensor | None, wrapper, adapter: str, layer_path: str):
    """``weight + dW`` the way peft's ``merge`` computes it (in place on a copy, in the weight's dtype)."""
    delta_w, delta_b = _adapter_delta(wrapper, adapter, layer_path)
    weight = weight.clone().add_(delta_w)
    if delta_b is not None:
        bias = bias.clone().add_(delta_b) if bias is not None else None
    return weight, bias, delta_w


def _peft_unmerge(weight: torch.Tensor, bias: torch.Tensor | None, wrapper, adapter: str, layer_path: str):
    """``weight - dW`` the way peft's ``unmerge`` computes it."""
    delta_w, delta_b = _adapter_delta(wrapper, adapter, layer_path)
    weight = weight.clone().sub_(delta_w.to(weight.dtype))
    if delta_b is not None:
        bias = bias.clone().sub_(delta_b.to(bias.dtype)) if bias is not None else None
    return weight, bias, delta_w


def _transition(before: tuple[str, ...], after: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """peft's merged list went from ``before`` to ``after``: the adapters unmerged (in peft's order, last merged
    first) and merged since, assuming the shortest story (peft only appends on merge and unmerges from the end)."""
    common = 0
    while common < min(len(before), len(after)) and before[common] == after[common]:
        common += 1
    return list(reversed(before[common:])), list(after[common:])


def replay_peft(
    weight: torch.Tensor, bias: torch.Tensor | None, then: PeftMerges, now: PeftMerges, layer_path: str
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``P`` recorded with ``then`` merged, with peft's merges and unmerges since replayed: ``(P', b', |sum dW|)``.

    A wrapper recorded then but gone now was unloaded: whatever it had merged at that moment (its own
    ``merged_adapters``, which unloading does not clear) stays in the weight, as in diffusers."""
    # Rounding of merges that came and went (merge then unmerge) leaves no trace in the lists: count every adapter.
    magnitude = torch.zeros_like(weight, dtype=torch.float32)
    for wrapper in {id(w): w for w in (then.wrapper, now.wrapper) if w is not None}.values():
        for adapter in getattr(wrapper, "lora_A", {}):
            if adapter not in (getattr(wrapper, "lora_variant", {}) or {}) and hasattr(wrapper, "get_delta_weight"):
                magnitude += wrapper.get_delta_weight(adapter).detach().abs().float()
    steps: list[tuple[nn.Module, list[str], list[str]]] = []
    if then.wrapper is not None and then.wrapper is not now.wrapper:
        steps.append((then.wrapper, *_transition(then.merged, tuple(then.wrapper.merged_adapters or ()))))
        steps.append((now.wrapper, *_transition((), now.merged)) if now.wrapper is not None else (None, [], []))
    else:
        steps.append((now.wrapper, *_transition(then.merged, now.merged)))
    for wrapper, unmerged, merged in steps:
        for adapter in unmerged:
            weight, bias, _ = _peft_unmerge(weight, bias, wrapper, adapter, layer_path)
        for adapter in merged:
            weight, bias, _ = _peft_merge(weight, bias, wrapper, adapter, layer_path)
    return weight, bias, magnitude


def without_merges(
    weight: torch.Tensor, bias: torch.Tensor | None, merges: PeftMerges, layer_path: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``W0`` and ``b0``: the weights with the merged peft adapters taken out again (as peft's unmerge would)."""
    for adapter in reversed(merges.merged):
        weight, bias, _ = _peft_unmerge(weight, bias, merges.wrapper, adapter, layer_path)
    return weight, bias


# --- what a bank remembers while fused --------------------------------------------------------------------------
@dataclass
class FusedWeights:
    """``P`` (exact copies, in buffers of the bank so that ``.to()`` moves them) and the peft merges in it."""

    merges: PeftMerges


def _store(bank: LinearBank, name: str, value: torch.Tensor | None) -> None:
    # Non-persistent buffers: they follow unet.to(device, dtype) but are never written into a state dict.
    bank.register_buffer(name, None if value is None else value.detach(), persistent=False)


def _record(bank: LinearBank) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """(P, its bias, W0, b0) as the bank recorded them."""
    others_w, others_b = bank.fused_others_weight, bank.fused_others_bias
    if bank.fused_base_weight is None:
        return others_w, others_b, others_w, others_b
    return others_w, others_b, bank.fused_base_weight, bank.fused_base_bias


def frozen_base(bank: LinearBank, linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """``(W0, b0, differs)`` for the branches that run: the base weights without any fused tuner's or peft adapter's
    delta, and whether the linear's own weights differ from them (then its output is not ``W0 x + b0``)."""
    if bank.fused is not None:
        _, _, base_w, base_b = _record(bank)
        return base_w, base_b, True
    merges = current_merges(bank, linear)
    if not merges.merged:
        return linear.weight, linear.bias, False
    base_w, base_b = without_merges(
        linear.weight.detach(), None if linear.bias is None else linear.bias.detach(), merges, bank.layer_path
    )
    return base_w, base_b, True


def frozen_output(bank: LinearBank, linear: nn.Linear, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """``W0 x + b0`` (what a sequential branch reads): the linear's output when its weights are W0, else recomputed."""
    base_w, base_b, differs = frozen_base(bank, linear)
    return F.linear(x, base_w.to(x.dtype), None if base_b is None else base_b.to(x.dtype)) if differs else output


# --- resolving and writing ----------------------------------------------------------------------------------------
def wide(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in the dtype deltas are summed in: float32, or float64 for a float64 model (never narrower)."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _compose(others: torch.Tensor | None, delta: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """The value a bank writes: ``P + D`` computed in float32 (float64 for a float64 model), in the weight's dtype
    (the one formula used both to write and to recognise what was written)."""
    if delta is None:
        return others
    if others is None:
        return delta.to(like.dtype)
    return (wide(others) + delta).to(others.dtype)


def tuners_delta(
    bank: LinearBank, names: list[str], base_w: torch.Tensor, base_b: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``D = sum_i s_i dW_i`` (and the bias delta) of the named tuners in float32 (float64 for a float64 model),
    computed from W0 and b0 (a sequential tuner folds as ``dW W0`` and ``dW b0 + db``:
    :func:`.processors.effective_delta`)."""
    from .processors import effective_delta  # here: processors imports this module

    if not names:
        return None, None
    weight = wide(base_w)
    bias = None if base_b is None else wide(base_b)
    total_w = torch.zeros_like(weight)
    total_b = None
    for name in names:
        setting = bank.settings[name]
        delta_w, delta_b = effective_delta(bank.tuners[name], setting.placement, weight, bias)
        total_w += setting.scale * delta_w
        if delta_b is not None:
            total_b = setting.scale * delta_b if total_b is None else total_b + setting.scale * delta_b
    return total_w, total_b


@dataclass
class Resolved:
    """The others' weight now (``P``), the peft merges in it, and whether it is the live weight (to copy)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    merges: PeftMerges
    live: bool = False


def _close(actual: torch.Tensor | None, expected: torch.Tensor | None, magnitude: torch.Tensor | None) -> bool:
    """Equal up to the rounding of the few additions between them: a handful of ulps of the terms' size, plus two
    ulps of the tensor's largest entry for the residue of merges we never saw (a LoRA loaded, fused, unfused and
    unloaded while a tuner was fused leaves ``(W + d) - d``, with d unknown by then)."""
    if actual is None or expected is None:
        return actual is None and expected is None
    if actual.shape != expected.shape:
        return False
    # The deltas are computed in float32 at least; peft's merges (replayed here) may be float32 on a float64 model.
    eps = max(torch.finfo(actual.dtype).eps, torch.finfo(torch.float32).eps)
    size = wide(expected.detach().abs())
    floor = 2 * eps * float(size.max()) if size.numel() else 0.0
    if magnitude is not None:
        size = size + magnitude.to(size.device)
    bound = 8 * eps * size + (floor + torch.finfo(torch.float32).tiny)
    return bool(((wide(actual.detach()) - wide(expected.detach())).abs() <= bound).all())


def _same_values(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """``torch.equal``, with NaN equal to NaN: a tuner that diverged (NaN weights) and was fused wrote NaN, and
    must still be recognised as untouched, so that unfusing restores the exact weights the bank kept."""
    if torch.equal(actual, expected):
        return True
    if actual.shape != expected.shape or not actual.is_floating_point():
        return False
    return bool(((actual == expected) | (actual.isnan() & expected.isnan())).all())


def _changed_message(bank: LinearBank, action: str) -> str:
    return (
        f"the weight of {bank.layer_path} was changed while res tuner(s) {bank.fused_names()} were fused, by "
        "something other than diffusers' fuse_lora()/unfuse_lora() (for example unload_lora_weights() or "
        "delete_adapters() of a LoRA loaded after the res tuner was fused and fused itself, a DoRA merge, or a direct "
        f"edit), so {action} cannot know which weights are meant. Nothing was changed. Keep the order "
        "load -> fuse -> unfuse -> unload for each adapter, or unfuse_res_tuner(..., "
        f"{ACCEPT_FLAG}=True) to subtract exactly the res tuners' delta and keep the other change"
    )


def resolve_others(
    bank: LinearBank, linear: nn.Linear, accept_changed: bool = False, action: str = "unfusing"
) -> Resolved:
    """The others' weight ``P`` now (see the module docstring). Raises ``ResTunerError``, computing nothing to
    write, when the weight changed in a way that makes an exact answer impossible and ``accept_changed`` is off."""
    now = current_merges(bank, linear)
    check_additive(now, bank.layer_path)
    if bank.fused is None:
        return Resolved(linear.weight.detach(), None if linear.bias is None else linear.bias.detach(), now, live=True)

    others_w, others_b, base_w, base_b = _record(bank)
    delta_w, delta_b = tuners_delta(bank, bank.fused_names(), base_w, base_b)
    weight = linear.weight.detach()
    bias = None if linear.bias is None else linear.bias.detach()
    expected_w = _compose(others_w, delta_w, weight)
    expected_b = _compose(others_b, delta_b, weight)
    same_bias = (bias is None and expected_b is None) or (
        bias is not None and expected_b is not None and _same_values(bias, expected_b)
    )
    if _same_values(weight, expected_w) and same_bias:  # untouched since we wrote it: P exactly
        return Resolved(others_w, others_b, bank.fused.merges)

    try:
        replayed_w, replayed_b, magnitude = replay_peft(
            others_w.to(weight.dtype),
            None if others_b is None else others_b.to(weight.dtype),
            bank.fused.merges,
            now,
            bank.layer_path,
        )
        explained = _close(weight, _compose(replayed_w, delta_w, weight), magnitude + delta_w.abs()) and _close(
            bias, _compose(replayed_b, delta_b, weight), None if delta_b is None else delta_b.abs()
        )
    except (KeyError, AttributeError, RuntimeError):  # a recorded adapter was deleted: the story cannot be replayed
        explained = False
    if explained:
        return Resolved(replayed_w, replayed_b, now)
    biased = [adapter for adapter in now.merged if _adds_to_bias(now.wrapper, adapter)]
    if bank.added_bias and biased:
        # peft merged a LoRA's bias into the bias fusing created: without our tuners the layer has none to hold it,
        # so even accept_changed_weights (which keeps the other change) has no exact answer: refused either way.
        raise _error(
            f"{bank.layer_path} has no bias of its own: fusing res tuner(s) {bank.fused_names()} added one, and "
            f"the peft LoRA {biased} (lora_bias) was then fused into it, so {action} has nowhere to keep that "
            f"LoRA's bias ({ACCEPT_FLAG}=True cannot either). Nothing was changed. Call pipe.unfuse_lora() first, "
            "then this, then pipe.fuse_lora()"
        )
    if not accept_changed:
        raise _error(_changed_message(bank, action))
    # Accepted: subtract exactly the delta this bank added, keep the rest of whatever changed the weight.
    new_w = (wide(weight) - delta_w).to(weight.dtype)
    if bias is None:
        new_b = None
    elif bank.added_bias and delta_b is not None:
        new_b = None  # the bias was ours (a LoRA's bias merged into it was refused above): it goes
    else:
        new_b = bias if delta_b is None else (wide(bias) - delta_b).to(bias.dtype)
    return Resolved(new_w, new_b, now)


@dataclass
class FusedWrite:
    """What folding ``names`` writes into a linear (``weight``, ``bias``: None when it has or keeps no bias) and
    what the bank then records (``record``: P, its bias, W0 and b0 where they differ from P; ``merges``)."""

    names: list[str]
    weight: torch.Tensor
    bias: torch.Tensor | None
    record: tuple[torch.Tensor | None, ...]
    merges: PeftMerges


@torch.no_grad()
def plan_write(bank: LinearBank, linear: nn.Linear, others: Resolved, names: list[str]) -> FusedWrite:
    """``P + D(names)`` (``P`` itself when ``names`` is empty), computed without changing anything; ``names`` are all
    the tuners of the bank that will be fused."""
    merges = others.merges
    if not names:
        return FusedWrite([], others.weight, None if bank.added_bias else others.bias, (None,) * 4, merges)
    if others.live:  # the record must not alias the weights about to be overwritten
        others = Resolved(others.weight.clone(), None if others.bias is None else others.bias.clone(), merges)
    others_b = None if bank.added_bias else others.bias  # a bias we created is not part of P
    if merges.merged:
        base_w, base_b = without_merges(others.weight, others_b, merges, bank.layer_path)
    else:
        base_w, base_b = others.weight, others_b
    delta_w, delta_b = tuners_delta(bank, names, base_w, base_b)
    record = (others.weight, others_b, base_w if merges.merged else None, base_b if merges.merged else None)
    return FusedWrite(
        list(names),
        _compose(others.weight, delta_w, linear.weight),
        _compose(others_b, delta_b, linear.weight),
        record,
        merges,
    )


@torch.no_grad()
def apply_write(bank: LinearBank, linear: nn.Linear, write: FusedWrite) -> None:
    """Write a :func:`plan_write` result into ``linear`` and record it in the bank (or drop the record)."""
    linear.weight.data.copy_(write.weight.to(linear.weight.dtype))
    if write.bias is not None:
        if linear.bias is None:
            # The tuner creates a bias the frozen linear lacks (e.g. GLoRA's E + W0 C on a bias-free to_q).
            linear.bias = nn.Parameter(
                write.bias.to(device=linear.weight.device, dtype=linear.weight.dtype), requires_grad=False
            )
            bank.added_bias = True
        else:
            linear.bias.data.copy_(write.bias.to(linear.bias.dtype))
    elif bank.added_bias:  # unfused, or re-fused after the tuners' bias terms went away (another GLoRA subnet)
        linear.bias = None  # nn.Linear keeps "bias" as a parameter slot; None is how a bias-free one has it
        bank.added_bias = False
    for name, value in zip(
        ("fused_others_weight", "fused_others_bias", "fused_base_weight", "fused_base_bias"), write.record
    ):
        _store(bank, name, value)
    bank.fused = FusedWeights(write.merges) if write.names else None


__all__ = [
    "ACCEPT_FLAG",
    "FusedWeights",
    "PeftMerges",
    "Resolved",
    "current_merges",
    "FusedWrite",
    "apply_write",
    "frozen_base",
    "frozen_output",
    "plan_write",
    "peft_wrapper",
    "replay_peft",
    "resolve_others",
    "tuners_delta",
    "without_merges",
]
