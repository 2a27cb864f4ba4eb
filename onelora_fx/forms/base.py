"""The interface both forms implement: capture, find sites, adapt, plan and merge, copy."""

from __future__ import annotations

import abc
import inspect
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..state import Capture
from ..analysis.accounting import Accounting
from ..fold import MergeError
from ..records import LinearSite, join
from ..state import get_state

__all__ = ["Form", "Captured", "Plan", "own_buffers", "plan_merge", "refuse_adapter_ids"]


@dataclass
class Captured:
    """A model taken into a form, before adaptation."""

    root: nn.Module
    method: Capture
    sites: list[LinearSite]
    #: buffer name -> the model's tensor (the form holds a copy)
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    #: every weight and what reads it (see :mod:`onelora_fx.analysis.accounting`)
    accounting: Accounting = field(default_factory=Accounting)
    #: the model's training and eval traces differ and the eval one was kept: where
    mode_note: Optional[str] = None


@dataclass
class Plan:
    """How one weight's ``b`` is folded by ``merge``."""

    name: str  # the adapter (b) name
    sites: list[LinearSite]
    #: something else also reads the weight (a tied embedding): the adapted calls get
    #: a merged copy and the other readers keep the original
    own_copy: bool


class Form(abc.ABC):
    """One way to hold an adapted model. Stages call these methods and never ask which
    form they hold."""

    method: Capture

    @abc.abstractmethod
    def capture(self, model: nn.Module, args: tuple, kwargs: dict[str, Any], dynamic: bool, method: Capture) -> Captured:
        """Take ``model`` into this form (a copy sharing its tensors)."""

    @abc.abstractmethod
    def sites(self, root: nn.Module) -> list[LinearSite]:
        """Every linear site of ``root``; ``adapted`` marks those with a vector."""

    @abc.abstractmethod
    def adapt(self, root: nn.Module, sites: Sequence[LinearSite]) -> dict[str, nn.Parameter]:
        """Give every ``selected`` site its vector; returns the new vectors. All or nothing."""

    @abc.abstractmethod
    def plan(self, root: nn.Module, groups: dict[str, list[LinearSite]]) -> list[Plan]:
        """One :class:`Plan` per adapted weight."""

    @abc.abstractmethod
    def merge(self, root: nn.Module, plans: Sequence[Plan], inplace: bool) -> None:
        """Fold the planned vectors into their weights and remove every trace of them."""

    @abc.abstractmethod
    def copy(self, root: nn.Module) -> nn.Module:
        """A copy of ``root`` that shares its tensors (see :mod:`onelora_fx.copying`)."""

    @abc.abstractmethod
    def stack(self, root: nn.Module, stacks: dict[str, torch.Tensor]) -> None:
        """Replace each vector by its ``[K, out]`` stack; each batch item then takes the
        adapter its ``adapter_ids`` entry names. All or nothing on ``root`` (a copy)."""


def own_buffers(root: nn.Module) -> dict[str, torch.Tensor]:
    """Give ``root`` copies of its buffers; returns ``{name: the original tensor}``.

    Training changes buffers (batch-norm statistics); it must never change the model.
    """
    originals: dict[str, torch.Tensor] = {}
    slots = []  # every (module, name) holding a buffer, a shared module listed once
    for prefix, module in root.named_modules(remove_duplicate=False):
        for name, buf in module._buffers.items():
            if buf is not None:
                originals[join(prefix, name)] = buf
                slots.append((module, name, buf))
    copies: dict[int, torch.Tensor] = {}
    for module, name, buf in slots:
        if id(buf) not in copies:
            copies[id(buf)] = buf.clone()
        module._buffers[name] = copies[id(buf)]
    return originals


def plan_merge(root: nn.Module, groups: dict[str, list[LinearSite]]) -> list[Plan]:
    """One :class:`Plan` per adapted weight, from the weight accounting ``transform``
    recorded (one readers analysis for both forms): a weight that something besides its
    sites reads (a tied embedding lookup) is folded into a copy of its own, which needs
    another name of the weight for that reader to keep; with one name only, merge is
    refused before anything changes."""
    state = get_state(root)
    accounting = state.accounting if state is not None else None
    names: dict[int, list[str]] = {}
    for name, p in root.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    plans = []
    for name, group in groups.items():
        first = group[0]
        aliases = names.get(id(first.weight), [first.weight_name])
        others = accounting.others(first.weight_name) if accounting is not None else []
        if others and len(aliases) < 2:
            reader = others[0]
            raise MergeError(
                f"{first.weight_name} is read by the adapted linear ({first.name}) and by {reader.op}"
                f"{f' ({reader.where})' if reader.where else ''} under one name: folding b into it would change "
                "that reader too, and the linear cannot get a copy of its own without renaming the weight. "
                "Nothing was merged. Leave this site out of the pattern (\"all-linear\" leaves the output "
                "head out), or deploy the adapter unmerged."
            )
        plans.append(Plan(name, group, len(aliases) > 1 or bool(others)))
    return plans


def refuse_adapter_ids(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of an adapted module: ``adapter_ids`` belongs to stacks, and a
    model that takes ``**kwargs`` would swallow it silently."""
    state = get_state(module)
    if "adapter_ids" in kwargs and state is not None and not state.stack:
        model = state.model
        forward = getattr(model, "forward", None)
        try:
            own = "adapter_ids" in inspect.signature(forward).parameters if forward is not None else False
        except (TypeError, ValueError):
            own = False
        if not own:
            raise ValueError("adapter_ids picks each batch item's adapter in a stack (ol.stack); this module holds one "
                             "adapter: call it without adapter_ids, or stack adapters first")
