"""``merge``: constant-fold every ``b`` into its weight and drop the adapter.

``W_ft = W + b 1ᵀ`` (see :mod:`onelora_fx.fold`), computed in float32 (float64 for float64
weights), checked finite, cast back to the weight's dtype. In the graph form each 1LoRA
node is replaced by the call it replaced, so the merged graph is op for op the un-adapted
capture of the model and its state dict is the model's; in the module form each adapted
layer gets its class back. Both are the form's :meth:`~onelora_fx.forms.Form.merge`.

A weight that something else also uses (an ``lm_head`` tied to the input embedding) is
given its own merged copy; the other users keep the original. With ``inplace=True`` the
model is untied the same way (its head gets the merged copy, and a transformers config
stops tying), so the model computes what the merged module computes.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..compat import is_dtensor
from ..fold import MergeError, check
from ..quant import dequantize
from ..forms import Plan, form_of
from ..query import adapted_sites
from ..analysis.sites import group_by_weight
from ..records import LinearSite
from ..state import get_state, set_state
from ..state import OneLoRAWarning

__all__ = ["merge", "unmerge", "MergeError"]

#: a merged module's adapted original (base tensors shared, vectors and extras its own)
_UNMERGE = "_onelora_unmerge"


def _groups(found: list[LinearSite]) -> dict[str, list[LinearSite]]:
    groups = group_by_weight(s for s in found if s.adapted)
    if not groups:
        raise MergeError("the module carries no 1LoRA vectors: nothing to merge (was it merged already?)")
    return groups


def _check(root: nn.Module, groups: dict[str, list[LinearSite]], inplace: bool) -> None:
    for name, group in groups.items():
        s = group[0]
        weight = s.weight
        if s.quantized:  # merge returns the full-precision weights of a quantized base
            if inplace:
                raise MergeError(
                    f"{s.weight_name} is quantized ({s.quantized}): W + b 1ᵀ cannot be written into its quantized "
                    "storage. ol.merge(gm) (inplace=False) returns the merged full-precision model; nothing was merged"
                )
            owner = root.get_submodule(s.owner) if s.owner else root
            weight = dequantize(weight, owner, s.dtype)
        problem = check(weight, root.get_parameter(name), s.layout, name)
        if problem is not None:
            raise MergeError(f"{problem} (site {s.name}); nothing was merged")


def _storage(t: torch.Tensor) -> tuple:
    local = t.to_local() if is_dtensor(t) else t
    return local.untyped_storage().data_ptr(), local.dtype, local.device


def _check_shared(root: nn.Module, model: nn.Module, groups: dict[str, list[LinearSite]]) -> None:
    """``inplace=True`` writes into the tensors the adapted module shares with the model:
    a model moved or cast since ``transform`` (``model.half()``) holds new tensors that
    the merge would not reach, so it is refused before anything changes."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for group in groups.values():
        s = group[0]
        mine, theirs = s.weight, params.get(s.weight_name)
        if theirs is None or mine is None or _storage(mine) != _storage(theirs):
            raise MergeError(
                f"merge(inplace=True) writes W + b 1ᵀ into the tensors the adapted module shares with the model, but "
                f"the model's {s.weight_name} is no longer one of them (was the model moved or cast after transform, "
                f"e.g. model.half()?): the model would not get the merged weights. Merge with inplace=False and use "
                "its result, or transform the model after moving it; nothing was merged")


def _set_param(root: nn.Module, name: str, value: nn.Parameter) -> None:
    owner, _, leaf = name.rpartition(".")
    (root.get_submodule(owner) if owner else root)._parameters[leaf] = value


def _write_back(root: nn.Module) -> None:
    """``inplace=True``: the model gets the trained extras and buffers too, and the
    merged module shares them with it again."""
    state = get_state(root)
    if state is None:
        return
    with torch.no_grad():
        for name, original in state.extras.items():
            if original is None:  # a module unpickled in another process has no model to write to
                continue
            trained = root.get_parameter(name)
            original.copy_(trained)
            for alias in [n for n, p in root.named_parameters(remove_duplicate=False) if p is trained]:
                _set_param(root, alias, original)
        for name, original in state.buffers.items():
            owner, _, leaf = name.rpartition(".")
            module = root.get_submodule(owner) if owner else root
            current = module._buffers.get(leaf)
            if current is not None and current is not original:
                original.copy_(current)
                module._buffers[leaf] = original


def _untie_config(model: nn.Module, root: nn.Module, untied: list[str]) -> list[str]:
    """Stop a transformers model from tying its embeddings (one flag, for every tie the
    model declares), keeping the ties other than ``untied`` as separate copies so that
    ``save_pretrained`` / ``from_pretrained`` keep them too. Returns what it changed."""
    config = getattr(model, "config", None)
    expand = getattr(model, "get_expanded_tied_weights_keys", None)
    if not getattr(config, "tie_word_embeddings", False) or not callable(expand):
        return []
    changed = []
    for target, source in expand(all_submodels=True).items():
        if target in untied:
            continue
        shared = model.get_parameter(target)
        if shared is model.get_parameter(source):  # the flag going off would drop this tie
            copy = nn.Parameter(shared.detach().clone(), requires_grad=shared.requires_grad)
            for module in (model, root):
                if target in dict(module.named_parameters(remove_duplicate=False)):
                    _set_param(module, target, copy)
            changed.append(f"{target} (now a copy of {source})")
    for cfg in [config, *[c for c in [getattr(config, "get_text_config", lambda: None)()] if c is not None and c is not config]]:
        if getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False
    return [f"{type(config).__name__}.tie_word_embeddings is now False", *changed]


def _untie(root: nn.Module, plans: list[Plan]) -> None:
    """``inplace=True`` with a tied weight: the merged copy goes into the model too, so
    that the model computes what the merged module computes, also after
    ``save_pretrained`` / ``from_pretrained``."""
    state = get_state(root)
    model = state.model if state is not None else None
    untied = [plan.sites[0].weight_name for plan in plans if plan.own_copy]
    if not untied:
        return
    changes: list[str] = []
    if model is not None:
        for name in untied:
            _set_param(model, name, root.get_parameter(name))
        changes = _untie_config(model, root, untied)
    warnings.warn(
        f"{', '.join(untied)} was tied to another weight: it now holds its own merged copy, in the merged "
        "module" + (" and in the model" if model is not None else "") + ", and the other reader keeps "
        "the original" + (f"; {'; '.join(changes)}" if changes else ""),
        category=OneLoRAWarning, stacklevel=3,
    )


def merge(gm: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Fold every 1LoRA vector into its weight; the result has no adapter left.

    ``inplace=False`` (default) returns a new module and changes neither ``gm`` nor the
    model it came from; only the folded weights are new tensors. ``inplace=True`` writes
    the folded weights into the base tensors that ``gm`` shares with the model (no new
    weight memory), writes trained extras and buffers back into the model, and turns
    ``gm`` itself into the merged module: the model then holds the fine-tuned weights
    (``model.generate(...)``, ``model.save_pretrained(...)`` as usual).

    Examples:
        >>> gm = ol.transform(model)                   # doctest: +SKIP
        >>> deployed = ol.merge(gm)                    # same graph as the base model   # doctest: +SKIP
        >>> ol.merge(gm, inplace=True)                 # model now holds W + b 1ᵀ       # doctest: +SKIP

    Raises:
        MergeError: nothing is adapted, a ``b`` is not finite, or a fold overflows the
            weight's dtype. Nothing is changed then.
    """
    if not isinstance(gm, nn.Module):
        raise TypeError(f"merge() takes an adapted module, got {type(gm).__name__}")
    form = form_of(gm)
    state = get_state(gm)
    if state is not None and state.stack:
        raise MergeError(f"a stack of {len(state.stack)} adapters has no single set of merged weights: write one "
                         "adapter out (ol.unstack), load it into a single-adapter module and merge that")
    _check(gm, _groups(adapted_sites(gm)), inplace)  # before anything is copied or changed
    if inplace and state is not None and state.model is not None:
        _check_shared(gm, state.model, _groups(adapted_sites(gm)))
    target = gm if inplace else form.copy(gm)
    original = None if inplace else _snapshot(form, gm)
    plans = form.plan(target, _groups(adapted_sites(target)))
    form.merge(target, plans, inplace)
    if inplace:
        _write_back(target)
        _untie(target, plans)
    set_state(target, None)
    target.__dict__[_UNMERGE] = original
    return target


def _snapshot(form, gm: nn.Module) -> nn.Module:
    """A copy of ``gm`` over the same base tensors whose trained tensors (vectors, extras)
    are its own clones: what :func:`unmerge` gives back, bit for bit."""
    from ..query import adapter_parameters

    copy = form.copy(gm)
    for name, p in adapter_parameters(copy).items():
        owner, _, leaf = name.rpartition(".")
        (copy.get_submodule(owner) if owner else copy)._parameters[leaf] = nn.Parameter(
            p.detach().clone(), requires_grad=p.requires_grad)
    return copy


def unmerge(merged: nn.Module) -> nn.Module:
    """The adapted module a merge was made from: the base weights (the same tensors, bit
    for bit) and the 1LoRA vectors and ``train=`` extras as they were when it was merged.

    A merge with ``inplace=False`` keeps, for this, the adapted module's structure and a
    copy of its trained tensors (``out_features`` numbers per vector, plus any extras); the
    base weights are the model's own, shared, so unmerging costs no weight memory. A merge
    with ``inplace=True`` wrote ``W + b 1ᵀ`` over the base weights: there is nothing to
    restore exactly, and :func:`unmerge` says so.

    Examples:
        >>> deployed = ol.merge(gm)                    # doctest: +SKIP
        >>> again = ol.unmerge(deployed)               # trains on, from where gm was   # doctest: +SKIP

    Raises:
        MergeError: ``merged`` does not come from :func:`merge`, or was merged in place.
    """
    if _UNMERGE not in merged.__dict__:
        raise MergeError(f"{type(merged).__name__} was not made by ol.merge: there is no merge to undo")
    original = merged.__dict__[_UNMERGE]
    if original is None:
        raise MergeError(
            "this module was merged in place (ol.merge(gm, inplace=True)): the base weights now hold W + b 1ᵀ, "
            "and subtracting b again would not give them back bit for bit. Save the adapter before merging in "
            "place (ol.save_adapter) and load it into the base model, or merge with inplace=False, which can be "
            "unmerged")
    return _snapshot(form_of(original), original)
