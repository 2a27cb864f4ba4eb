"""``merge``: constant-fold every ``b`` into its weight and drop the adapter.

``W_ft = W + b[:, None]`` for ``[out, in]`` weights (``W + b[None, :]`` for ``[in, out]``),
computed in float32, checked finite, cast back to the weight's dtype. Each 1LoRA node
is replaced by the call it replaced (remembered in its metadata), the ``b`` nodes and
parameters are removed, and the graph is cleaned, so the merged graph is op for op the
un-adapted capture of the model and its state dict is the model's.

A weight that something else also uses (an ``lm_head`` tied to the input embedding) is
given its own merged copy; the other users keep the original.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import fx, nn

from .capture import copy_graph_module
from .fallback import restore_class, structural_copy
from .rewrite import Original
from .sites import Layout, LinearSite, group_by_weight, resolve_attr
from .state import get_state, set_state
from .transform import adapted_sites

__all__ = ["merge", "MergeError", "fold"]

aten = torch.ops.aten

# rows folded at a time in place: bounds the float32 scratch of a bf16 weight
_CHUNK_ELEMENTS = 1 << 22


class MergeError(ValueError):
    """The module cannot be merged (nothing adapted, or a non-finite result)."""


def fold(weight: torch.Tensor, b: torch.Tensor, layout: Layout) -> torch.Tensor:
    """``W + b 1ᵀ`` in float32, cast back to ``weight``'s dtype (a new tensor).

    Example:
        >>> fold(torch.zeros(2, 3), torch.tensor([1.0, 2.0]), Layout.OUT_IN)
        tensor([[1., 1., 1.],
                [2., 2., 2.]])
    """
    b32 = b.detach().to(device=weight.device, dtype=torch.float32)
    delta = b32[:, None] if layout is Layout.OUT_IN else b32[None, :]
    return (weight.detach().to(torch.float32) + delta).to(weight.dtype)


def _fold_into(weight: torch.Tensor, b: torch.Tensor, layout: Layout) -> None:
    """:func:`fold`, written into ``weight`` a block of rows at a time."""
    with torch.no_grad():
        if weight.dtype == torch.float32:
            weight.add_(b.to(weight.device)[:, None] if layout is Layout.OUT_IN else b.to(weight.device)[None, :])
            return
        rows = max(1, _CHUNK_ELEMENTS // max(1, weight.shape[1]))
        for start in range(0, weight.shape[0], rows):
            block = weight[start : start + rows]
            part = b[start : start + rows] if layout is Layout.OUT_IN else b
            block.copy_(fold(block, part, layout))


def _check_finite(groups: dict[str, list[LinearSite]], root: nn.Module) -> None:
    for name, group in groups.items():
        s = group[0]
        b = root.get_parameter(name)
        if b.device.type == "meta":
            raise MergeError(f"{name} is on the meta device: load real weights before merging")
        if not torch.isfinite(b).all():
            raise MergeError(f"{name} (site {s.name}) has non-finite values; nothing was merged")
        w = s.weight.detach()
        if torch.finfo(w.dtype).max < 1e38:  # float16 can overflow where W + b cannot in float32
            rows = max(1, _CHUNK_ELEMENTS // max(1, w.shape[1]))
            for i in range(0, w.shape[0], rows):
                part = b[i : i + rows] if s.layout is Layout.OUT_IN else b
                if not torch.isfinite(fold(w[i : i + rows], part, s.layout)).all():
                    raise MergeError(f"folding {name} into {s.weight_name} overflows {w.dtype}; nothing was merged")


def _aliases(root: nn.Module, tensor: torch.Tensor) -> list[str]:
    return [n for n, p in root.named_parameters(remove_duplicate=False) if p is tensor]


def _set_param(root: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    module = root.get_submodule(owner) if owner else root
    module._parameters[leaf] = value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False)


def _drop_param(root: nn.Module, name: str) -> None:
    owner, _, leaf = name.rpartition(".")
    (root.get_submodule(owner) if owner else root)._parameters.pop(leaf)


def _canonical(graph: fx.Graph, node: fx.Node) -> fx.Node:
    """The base call for a 1LoRA node that lost its metadata (a pickled module)."""
    x, weight, bias, _ = node.args[:4]
    if not node.kwargs.get("transposed", False):
        return graph.call_function(aten.linear.default, (x, weight, bias))
    if bias is not None:
        return graph.call_function(aten.addmm.default, (bias, x, weight))
    return graph.call_function(aten.matmul.default, (x, weight))


def _get_attr_readers(gm: fx.GraphModule) -> dict[int, list[fx.Node]]:
    """``id(tensor) -> get_attr nodes`` that read it, for the whole graph at once."""
    readers: dict[int, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            readers.setdefault(id(resolve_attr(gm, node.target)), []).append(node)
    return readers


def _readers_elsewhere(
    gm: fx.GraphModule, sites: list[LinearSite], readers: Optional[dict[int, list[fx.Node]]] = None
) -> list[tuple[fx.Node, fx.Node]]:
    """``(get_attr, user)`` pairs through which something other than the adapted calls
    reads their weight (under any name). A transpose that feeds only adapted calls
    (``matmul(x, t(W))``) belongs to them."""
    readers = _get_attr_readers(gm) if readers is None else readers
    calls = {s.node for s in sites}
    own_views = {s.weight_arg for s in sites if s.weight_arg is not None and set(s.weight_arg.users) <= calls}
    return [
        (node, u)
        for node in readers.get(id(sites[0].weight), [])
        for u in node.users
        if u not in calls and u not in own_views
    ]


@dataclass
class _Plan:
    name: str  # the adapter (b) name
    sites: list[LinearSite]
    own_copy: bool  # the weight is also used elsewhere: give the adapted calls a copy


def _groups(found: list[LinearSite]) -> dict[str, list[LinearSite]]:
    groups = group_by_weight(s for s in found if s.adapted)
    if not groups:
        raise MergeError("the module carries no 1LoRA vectors: nothing to merge (was it merged already?)")
    return groups


def _plan(root: nn.Module, groups: dict[str, list[LinearSite]]) -> list[_Plan]:
    names: dict[int, int] = {}
    for _, p in root.named_parameters(remove_duplicate=False):
        names[id(p)] = names.get(id(p), 0) + 1
    readers = _get_attr_readers(root) if isinstance(root, fx.GraphModule) else None
    plans = []
    for name, group in groups.items():
        shared = names.get(id(group[0].weight), 0) > 1 or (
            readers is not None and bool(_readers_elsewhere(root, group, readers))
        )
        plans.append(_Plan(name, group, shared))
    return plans


def _merge_graph(gm: fx.GraphModule, plans: list[_Plan], inplace: bool) -> None:
    graph = gm.graph
    for plan in plans:
        first = plan.sites[0]
        b = gm.get_parameter(plan.name).detach()
        if plan.own_copy or not inplace:
            merged = nn.Parameter(fold(first.weight, b, first.layout), requires_grad=False)
            if plan.own_copy:
                _give_own_copy(gm, plan, merged)
            else:  # the weight has one name and only these calls read it
                _set_param(gm, first.weight_name, merged)
        else:
            _fold_into(first.weight, b, first.layout)
        for s in plan.sites:
            node = s.node
            original: Optional[Original] = node.meta.get("onelora_original")
            with graph.inserting_before(node):
                new = original.emit(graph, node) if original is not None else _canonical(graph, node)
            new.meta = {k: v for k, v in node.meta.items() if not k.startswith("onelora_")}
            node.replace_all_uses_with(new)
            graph.erase_node(node)
    graph.eliminate_dead_code()  # the b get_attr nodes go here
    for plan in plans:
        _drop_param(gm, plan.name)
    graph.lint()
    gm.recompile()


def _give_own_copy(gm: fx.GraphModule, plan: _Plan, merged: nn.Parameter) -> None:
    """Register ``merged`` under the sites' weight name and send every other reader of
    the weight to a name that still holds the original."""
    first = plan.sites[0]
    weight = first.weight
    others = [a for a in _aliases(gm, weight) if a != first.weight_name]
    elsewhere = _readers_elsewhere(gm, plan.sites)
    if elsewhere and not others:
        raise MergeError(
            f"{first.weight_name} is read by the adapted linear and by {elsewhere[0][1].format_node()} "
            "under one name; merge cannot give the linear its own copy without renaming the weight"
        )
    graph = gm.graph
    keep = None
    if elsewhere:  # a reader under another name of the original, or a new one
        keep = next((n for n in graph.nodes if n.op == "get_attr" and n.target in others), None)
        if keep is None:
            with graph.inserting_before(elsewhere[0][0]):
                keep = graph.get_attr(others[0])
    readers = _get_attr_readers(gm).get(id(weight), [])
    others_users = {user for _, user in elsewhere}
    _set_param(gm, first.weight_name, merged)
    for reader, user in elsewhere:
        user.replace_input_with(reader, keep)
    # the adapted calls read the weight's own name, which now holds the merged copy
    for reader in readers:
        if reader.target != first.weight_name:
            with graph.inserting_before(reader):
                own = graph.get_attr(first.weight_name)
            reader.replace_all_uses_with(own, delete_user_cb=lambda user: user not in others_users and user is not own)


def _merge_modules(root: nn.Module, plans: list[_Plan], inplace: bool) -> None:
    for plan in plans:
        s = plan.sites[0]
        layer = root.get_submodule(s.owner)
        b = layer.onelora_b.detach()
        if plan.own_copy or not inplace:
            layer._parameters["weight"] = nn.Parameter(fold(layer.weight, b, s.layout), requires_grad=False)
        else:
            _fold_into(layer.weight, b, s.layout)
        del layer._parameters["onelora_b"]
        restore_class(layer)


def _write_back(root: nn.Module) -> None:
    """``inplace=True``: the model gets the trained extras and buffers too, and the
    merged module shares them with it again."""
    state = get_state(root)
    if state is None:
        return
    with torch.no_grad():
        for name, original in state.extras.items():
            trained = root.get_parameter(name)
            original.copy_(trained)
            for alias in _aliases(root, trained):
                _set_param(root, alias, original)
        for name, original in state.buffers.items():
            owner, _, leaf = name.rpartition(".")
            module = root.get_submodule(owner) if owner else root
            current = module._buffers.get(leaf)
            if current is not None and current is not original:
                original.copy_(current)
                module._buffers[leaf] = original


def merge(gm: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Fold every 1LoRA vector into its weight; the result has no adapter left.

    ``inplace=False`` (default) returns a new module and changes neither ``gm`` nor the
    model it came from; only the folded weights are new tensors. ``inplace=True`` writes
    the folded weights into the base tensors that ``gm`` shares with the model (no new
    weight memory), writes trained extras and buffers back into the model, and turns
    ``gm`` itself into the merged module: the model then holds the fine-tuned weights
    (``model.generate(...)``, ``model.save_pretrained(...)`` as usual).

    Example:
        >>> gm = ol.transform(model)                   # doctest: +SKIP
        >>> ...train...                                # doctest: +SKIP
        >>> deployed = ol.merge(gm)                    # same graph as the base model
        >>> ol.merge(gm, inplace=True)                 # model now holds W + b 1ᵀ

    Raises:
        MergeError: nothing is adapted, a ``b`` is not finite, or a fold overflows the
            weight's dtype. Nothing is changed then.
    """
    if not isinstance(gm, nn.Module):
        raise TypeError(f"merge() takes an adapted module, got {type(gm).__name__}")
    _check_finite(_groups(adapted_sites(gm)), gm)  # before anything is copied or changed
    target = gm
    if not inplace:
        target = copy_graph_module(gm) if isinstance(gm, fx.GraphModule) else structural_copy(gm)
    plans = _plan(target, _groups(adapted_sites(target)))
    if isinstance(target, fx.GraphModule):
        _merge_graph(target, plans, inplace)
    else:
        _merge_modules(target, plans, inplace)
    if inplace:
        _write_back(target)
    set_state(target, None)
    return target
