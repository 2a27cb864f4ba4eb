"""Many 1LoRA adapters of one base model in one batch: ``stack`` / ``unstack``.

A 1LoRA adapter is one vector per weight, so K adapters are one ``[K, out]`` matrix per
weight, and a batch that mixes them costs a gather: every adapted call computes
``linear(x) + B[adapter_ids[i]] * x[i].sum(-1)`` for batch item ``i`` (``-1``: no
adapter, the base model). No split of the batch, no loop over adapters, and in training
each item's gradient reaches only its own adapter's row of ``B``, so K tenants fine-tune
in one batch. The stack is data: a compiled stack does not recompile when ``B``
changes, and :func:`onelora_fx.load_adapter` with ``index=k`` replaces one adapter.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Mapping, Sequence, Union

import torch
from torch import nn

from .files import AdapterFileError, check_fits, read_adapter, save_adapter
from ..forms import form_of
from ..query import adapter_parameters
from ..state import get_state, set_state

__all__ = ["stack", "unstack"]

Adapter = Union[str, os.PathLike, nn.Module]


def _vectors_of(adapter: Adapter, template: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    if isinstance(adapter, nn.Module):
        state = get_state(adapter)
        if state is not None and state.extras:
            raise ValueError(f"{where} also trains {', '.join(state.extras)}: a stack holds only 1LoRA vectors")
        if state is not None and state.stack:
            raise ValueError(f"{where} is a stack itself: unstack its adapters first")
        vectors = {k: v.detach() for k, v in adapter_parameters(adapter).items()}
    else:
        vectors, _ = read_adapter(adapter)
        where = str(adapter)
    check_fits(template, vectors, where)
    return vectors


def stack(gm: nn.Module, adapters: Union[Sequence[Adapter], Mapping[str, Adapter]]) -> nn.Module:
    """One module that runs ``len(adapters)`` adapters of ``gm``'s base at once.

    ``adapters`` are adapter files (:func:`onelora_fx.save_adapter`) or adapted modules
    of the same base, as a list or a dict (keys name them). The result is called like
    ``gm`` with one more keyword, ``adapter_ids``: a 1-D integer tensor (any integer
    dtype) with one adapter index per batch item, ``-1`` for the base model. ``gm`` itself is not changed.

    Examples:
        >>> multi = ol.stack(gm, ["support.safetensors", "legal.safetensors"])   # doctest: +SKIP
        >>> multi(input_ids=ids, adapter_ids=torch.tensor([0, 1, -1, 0]))       # doctest: +SKIP

    Raises:
        AdapterFileError: an adapter does not fit ``gm`` (names, shapes, dtypes).
        ValueError: an adapter trains more than its vectors, ``gm`` has expert sites, or
            a site's rows are not laid out batch first.
    """
    state = get_state(gm)
    if state is None:
        raise ValueError("stack() takes an adapted module (ol.transform(...)) as the template")
    if state.extras or state.stack:
        raise ValueError("the template must carry 1LoRA vectors only (no train extras, not a stack)")
    names = list(adapters) if isinstance(adapters, Mapping) else [f"adapter {i}" for i in range(len(adapters))]
    items = list(adapters.values()) if isinstance(adapters, Mapping) else list(adapters)
    if not items:
        raise ValueError("stack() needs at least one adapter")
    template = {k: v.detach() for k, v in adapter_parameters(gm).items()}
    vectors = [_vectors_of(a, template, n) for a, n in zip(items, names)]
    stacks = {k: torch.stack([v[k].to(t) for v in vectors]) for k, t in template.items()}
    form = form_of(gm)
    multi = form.copy(gm)
    form.stack(multi, stacks)
    set_state(multi, replace(state, stack=tuple(names)))
    return multi


def unstack(multi: nn.Module, index: int, path: Union[str, os.PathLike]) -> Path:
    """Write adapter ``index`` of a stack to ``path``: the file :func:`stack` read, one
    that :func:`onelora_fx.load_adapter` loads into a single-adapter module.

    Examples:
        >>> ol.unstack(multi, 1, "legal.safetensors")   # doctest: +SKIP
    """
    state = get_state(multi)
    if state is None or not state.stack:
        raise AdapterFileError("unstack() takes a module made by ol.stack()")
    count = len(state.stack)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
        raise ValueError(f"unstack() takes the index of one of the {count} adapters of the stack, 0..{count - 1} "
                         f"({', '.join(state.stack)}), got {index!r} (-1 in adapter_ids means the base model, "
                         "which has no adapter to write)")
    return save_adapter(multi, path, index=index)
