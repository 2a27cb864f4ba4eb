"""Module-level 1LoRA for models no graph capture can take.

Data-dependent Python control flow (``if h.sum() > 0``, eager MoE expert loops) defeats
both ``symbolic_trace`` and ``torch.export``. For those, ``transform(capture="auto")``
adapts the layers instead of the graph: a structural copy of the model (new module
objects, the same parameter tensors) whose ``nn.Linear`` and ``Conv1D`` layers compute
:func:`onelora_fx.ops.linear` with their own ``onelora_b``. Names and numerics are the
graph path's; what it cannot see are linears written as functions (``F.linear`` on a raw
parameter, ``x @ W``), and the output head is taken from ``get_output_embeddings()``
rather than from the dataflow.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from . import ops
from .capture import own_module_tree
from .sites import ADAPTER_SUFFIX, Layout, LinearSite, adapter_name_for

__all__ = ["OneLoRALinear", "OneLoRAConv1D", "module_sites", "adapt_modules", "structural_copy"]


class OneLoRALinear(nn.Linear):
    """``nn.Linear`` with a 1LoRA vector (the class an adapted layer is given)."""

    onelora_b: nn.Parameter

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return ops.linear(input, self.weight, self.bias, self.onelora_b)


class OneLoRAConv1D(nn.Module):
    """GPT-2's ``Conv1D`` (``x @ W + bias``, ``W`` is ``[in, out]``) with a 1LoRA vector."""

    onelora_b: nn.Parameter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias, self.onelora_b, transposed=True)


def _is_conv1d(m: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D, recognised without importing transformers
    w = getattr(m, "weight", None)
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and isinstance(w, nn.Parameter) and w.dim() == 2


def _is_plain_linear(m: nn.Module) -> bool:
    # a subclass with its own forward computes something else: leave it alone
    return isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward


def module_sites(root: nn.Module) -> list[LinearSite]:
    """The ``nn.Linear`` / ``Conv1D`` layers of ``root`` (adapted or not) as sites."""
    head = None
    get_head = getattr(root, "get_output_embeddings", None)
    if callable(get_head):
        try:
            head = get_head()
        except Exception:  # some models raise NotImplementedError here
            head = None
    sites = []
    for name, m in root.named_modules():
        adapted = isinstance(m, (OneLoRALinear, OneLoRAConv1D))
        if isinstance(m, OneLoRAConv1D) or (not adapted and _is_conv1d(m)):
            layout, (in_f, out_f) = Layout.IN_OUT, tuple(m.weight.shape)
        elif adapted or _is_plain_linear(m):
            layout, (out_f, in_f) = Layout.OUT_IN, tuple(m.weight.shape)
        else:
            continue
        sites.append(
            LinearSite(
                name=name,
                weight_name=f"{name}.weight" if name else "weight",
                owner=name,
                attr="weight",
                adapter_name=adapter_name_for(name, "weight"),
                in_features=int(in_f),
                out_features=int(out_f),
                layout=layout,
                has_bias=m.bias is not None,
                kind="module",
                is_head=m is head,
                adapted=adapted,
                selected=adapted,
                dtype=m.weight.dtype,
                device=m.weight.device,
                weight=m.weight,
            )
        )
    return sites


def structural_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s module tree that shares its parameter tensors."""
    root = copy.copy(model)
    root._parameters = dict(model._parameters)
    root._buffers = dict(model._buffers)
    root._modules = dict(model._modules)
    own_module_tree(root)
    return root


def adapt_modules(root: nn.Module, sites: list[LinearSite]) -> dict[str, nn.Parameter]:
    """Give every selected layer of ``root`` (a :func:`structural_copy`) its ``b``."""
    vectors = {}
    for s in sites:
        if not s.selected:
            continue
        m = root.get_submodule(s.owner)
        if hasattr(m, ADAPTER_SUFFIX):
            raise ValueError(f"{s.adapter_name} already exists; transform the base model instead")
    for s in sites:
        if not s.selected:
            continue
        m = root.get_submodule(s.owner)
        m.__dict__["_onelora_base_class"] = type(m)
        m.__class__ = OneLoRAConv1D if s.layout is Layout.IN_OUT else OneLoRALinear
        b = nn.Parameter(torch.zeros(s.out_features, dtype=s.dtype, device=s.device))
        m.register_parameter(ADAPTER_SUFFIX, b)
        vectors[s.adapter_name] = b
    return vectors


def restore_class(m: nn.Module) -> Optional[type]:
    """Undo :func:`adapt_modules` on one layer (used by merge); returns the base class."""
    base = m.__dict__.pop("_onelora_base_class", None)
    if base is not None:
        m.__class__ = base
    return base
