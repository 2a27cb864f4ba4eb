"""The graph form: a :class:`~onelora_fx.graph_module.CapturedModule` whose graph routes
each adapted call through :func:`onelora_fx.ops.linear` (see :mod:`onelora_fx.rewrite`)."""

from __future__ import annotations

import warnings
from typing import Any, Optional, Sequence

import torch
from torch import fx, nn

from .. import ops
from ..calls import Signature
from ..capture import Capture, trace
from ..compat import pytree
from ..copying import copy_module_tree
from ..coverage import unadapted
from ..fold import MergeError, fold, fold_into
from ..graph_module import CapturedModule
from ..rewrite import STACK, Original, new_vectors, rewrite, stack_graph
from ..sites import LinearSite, find_sites, resolve_attr
from .base import Captured, Form, Plan, own_buffers

__all__ = ["GraphForm"]


def _warn_specialized(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Export specializes every dimension of size 1 in the example: say which."""
    ones = []
    for path, leaf in pytree.tree_flatten_with_path((args, kwargs))[0]:
        if hasattr(leaf, "shape"):
            name = ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path[1:])  # input_ids, pixel_values.0
            ones += [f"{name} dim {d}" for d, n in enumerate(leaf.shape) if n == 1]
    if ones:
        warnings.warn(
            f"example inputs of {type(model).__name__} have size 1 at {', '.join(ones)}: torch.export "
            "specializes such dimensions, so the first call with another size there captures "
            "a new graph (seconds). Give examples of size 2 or more where sizes vary.",
            stacklevel=5,
        )


class GraphForm(Form):
    method = Capture.EXPORT

    def capture(self, model: nn.Module, args: tuple, kwargs: dict[str, Any], dynamic: bool, method: Capture) -> Captured:
        args, kwargs = Signature(model.forward).canonical(args, kwargs)
        traced = trace(model, args, kwargs, method, dynamic)
        if traced.method is Capture.EXPORT and dynamic:
            _warn_specialized(model, args, kwargs)
        root = CapturedModule.build(model, traced, dynamic)
        buffers = own_buffers(root)
        found = find_sites(root)
        return Captured(root, traced.method, found, buffers, unadapted(root, root.graph, found))

    def sites(self, root: nn.Module) -> list[LinearSite]:
        return find_sites(root)

    def adapt(self, root: nn.Module, sites: Sequence[LinearSite]) -> dict[str, nn.Parameter]:
        vectors = new_vectors(root, sites)
        try:
            rewrite(root, root.graph, sites)
        except Exception:
            for name in vectors:  # all or nothing
                owner, _, leaf = name.rpartition(".")
                del (root.get_submodule(owner) if owner else root)._parameters[leaf]
            raise
        CapturedModule.forget_calls(root)  # graphs of other calls are captured again, adapted
        root.recompile()
        return vectors

    def plan(self, root: nn.Module, groups: dict[str, list[LinearSite]]) -> list[Plan]:
        names: dict[int, int] = {}
        for _, p in root.named_parameters(remove_duplicate=False):
            names[id(p)] = names.get(id(p), 0) + 1
        readers = _get_attr_readers(root)
        return [
            Plan(name, group, names.get(id(group[0].weight), 0) > 1 or bool(_readers_elsewhere(root, group, readers)))
            for name, group in groups.items()
        ]

    def merge(self, root: nn.Module, plans: Sequence[Plan], inplace: bool) -> None:
        graph = root.graph
        for plan in plans:
            first = plan.sites[0]
            b = root.get_parameter(plan.name).detach()
            if plan.own_copy or not inplace:
                merged = nn.Parameter(fold(first.weight, b, first.layout), requires_grad=False)
                if plan.own_copy:
                    _give_own_copy(root, plan, merged)
                else:  # the weight has one name and only these calls read it
                    _set_param(root, first.weight_name, merged)
            else:
                fold_into(first.weight, b, first.layout)
            for s in plan.sites:
                _restore(graph, s.node)
        graph.eliminate_dead_code()  # the b get_attr nodes go here
        for plan in plans:
            owner, _, leaf = plan.name.rpartition(".")
            (root.get_submodule(owner) if owner else root)._parameters.pop(leaf)
        graph.lint()
        CapturedModule.forget_calls(root)
        root.recompile()

    def copy(self, root: nn.Module) -> nn.Module:
        return copy_module_tree(root)

    def stack(self, root: nn.Module, stacks: dict[str, torch.Tensor]) -> None:
        for name, B in stacks.items():
            _set_param(root, name, nn.Parameter(B, requires_grad=True))
        stack_graph(root.graph)
        root.meta[STACK] = next(iter(stacks.values())).shape[0]
        CapturedModule.forget_calls(root)  # other calls are captured again, stacked
        root.recompile()


def _restore(graph: fx.Graph, node: fx.Node) -> None:
    """Put back the call a 1LoRA node replaced (an expert term just goes)."""
    if node.op == "call_function" and node.target is ops.expert_term:
        node.replace_all_uses_with(node.args[0])
        graph.erase_node(node)
        return
    original: Optional[Original] = node.meta.get("onelora_original")
    with graph.inserting_before(node):
        new = original.emit(graph, node) if original is not None else _canonical(graph, node)
    new.meta = {k: v for k, v in node.meta.items() if not k.startswith("onelora_")}
    node.replace_all_uses_with(new)
    graph.erase_node(node)


def _canonical(graph: fx.Graph, node: fx.Node) -> fx.Node:
    """The base call for a 1LoRA node that lost its metadata (a pickled module)."""
    aten = torch.ops.aten
    x, weight, bias, _ = node.args[:4]
    if not node.kwargs.get("transposed", False):
        return graph.call_function(aten.linear.default, (x, weight, bias))
    if bias is not None:
        return graph.call_function(aten.addmm.default, (bias, x, weight))
    return graph.call_function(aten.matmul.default, (x, weight))


def _set_param(root: nn.Module, name: str, value: nn.Parameter) -> None:
    owner, _, leaf = name.rpartition(".")
    (root.get_submodule(owner) if owner else root)._parameters[leaf] = value


def _get_attr_readers(gm: nn.Module) -> dict[int, list[fx.Node]]:
    """``id(tensor) -> get_attr nodes`` that read it, for the whole graph at once."""
    readers: dict[int, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            readers.setdefault(id(resolve_attr(gm, node.target)), []).append(node)
    return readers


def _readers_elsewhere(gm: nn.Module, sites: list[LinearSite], readers: dict[int, list[fx.Node]]) -> list[tuple[fx.Node, fx.Node]]:
    """``(get_attr, user)`` pairs through which something other than the adapted calls
    reads their weight (under any name). A transpose that feeds only adapted calls
    (``matmul(x, t(W))``) belongs to them."""
    calls = {s.node for s in sites}
    calls |= {s.node.args[0] for s in sites if s.experts and s.node.target is ops.expert_term}  # the grouped matmul
    own_views = {s.weight_arg for s in sites if s.weight_arg is not None and set(s.weight_arg.users) <= calls}
    return [
        (node, u)
        for node in readers.get(id(sites[0].weight), [])
        for u in node.users
        if u not in calls and u not in own_views
    ]


def _give_own_copy(gm: nn.Module, plan: Plan, merged: nn.Parameter) -> None:
    """Register ``merged`` under the sites' weight name and send every other reader of
    the weight to a name that still holds the original."""
    first = plan.sites[0]
    weight = first.weight
    others = [n for n, p in gm.named_parameters(remove_duplicate=False) if p is weight and n != first.weight_name]
    readers = _get_attr_readers(gm)
    elsewhere = _readers_elsewhere(gm, plan.sites, readers)
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
    others_users = {user for _, user in elsewhere}
    _set_param(gm, first.weight_name, merged)
    for reader, user in elsewhere:
        user.replace_input_with(reader, keep)
    # the adapted calls read the weight's own name, which now holds the merged copy
    for reader in readers.get(id(weight), []):
        if reader.target != first.weight_name:
            with graph.inserting_before(reader):
                own = graph.get_attr(first.weight_name)
            reader.replace_all_uses_with(own, delete_user_cb=lambda user: user not in others_users and user is not own)
