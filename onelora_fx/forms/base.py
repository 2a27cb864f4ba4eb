"""The interface both forms implement: capture, find sites, adapt, plan and merge, copy."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from ..capture import Capture
from ..sites import LinearSite, join

__all__ = ["Form", "Captured", "Plan", "own_buffers"]


@dataclass
class Captured:
    """A model taken into a form, before adaptation."""

    root: nn.Module
    method: Capture
    sites: list[LinearSite]
    #: buffer name -> the model's tensor (the form holds a copy)
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    #: weights read by matmul-like ops that are not sites: name -> op
    unadapted: dict[str, str] = field(default_factory=dict)


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
