"""The graph form: a :class:`~onelora_fx.forms.graph.module.CapturedModule` whose graph
routes each adapted call through :func:`onelora_fx.ops.linear` (the passes of
:mod:`.rewrite`); merge puts each replaced call back (:class:`Restore`)."""

from __future__ import annotations

import logging
import warnings
from dataclasses import replace
from typing import Any, Optional, Sequence

import torch
from torch import fx, nn

from ... import ops
from .calls import Signature
from ...state import Capture
from .capture import CaptureError, first_line, trace
from ...compat import pytree
from ...copying import copy_module_tree, own_parameters
from ...analysis.accounting import graph_readers
from ...analysis.flow import SHAPE_QUERIES, carries_weight
from ...analysis.linear_ops import op_name
from ...fold import MergeError, fold, fold_into
from .module import CapturedModule
from .passes import GraphPass
from .rewrite import STACK, Original, Rewrite, StackSites, new_vectors, tagged_nodes
from ...analysis.sites import find_sites, handles
from ...records import LinearSite, resolve_attr
from ...state import get_state
from ..base import Captured, Form, Plan, own_buffers, plan_merge
from ...state import OneLoRAWarning

log = logging.getLogger(__name__)

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
            category=OneLoRAWarning, stacklevel=5,
        )


class GraphForm(Form):
    method = Capture.EXPORT

    def capture(self, model: nn.Module, args: tuple, kwargs: dict[str, Any], dynamic: bool, method: Capture) -> Captured:
        args, kwargs = Signature(model.forward).canonical(args, kwargs)
        traced = trace(model, args, kwargs, method, dynamic)
        if traced.method is Capture.EXPORT and dynamic:
            _warn_specialized(model, args, kwargs)
        root = CapturedModule.build(model, traced, dynamic)
        own_parameters(root)
        buffers = own_buffers(root)
        found = find_sites(root)
        readers = graph_readers(root, root.graph, found)
        opaque = readers.opaque()
        if opaque and method is Capture.AUTO and traced.method is Capture.FX and (args or kwargs):
            # symbolic_trace kept a call whole (torch.fx.wrap, a leaf module) that reads
            # weights; torch.export traces into it: take that capture where it works
            listed = ", ".join(f"{w} ({op})" for w, op in opaque.items())
            try:
                captured = self.capture(model, args, kwargs, dynamic, Capture.EXPORT)
            except CaptureError as e:
                log.warning("symbolic_trace keeps calls whole that read %s; torch.export cannot capture %s either "
                            "(%s): keeping symbolic_trace's graph", listed, type(model).__name__, first_line(e))
            else:
                log.warning("symbolic_trace keeps calls whole that read %s; captured %s with torch.export instead, "
                            "which traces into them", listed, type(model).__name__)
                return captured
        return Captured(root, traced.method, found, buffers, readers, traced.mode_note)

    def sites(self, root: nn.Module) -> list[LinearSite]:
        """The site records of the adapter state, with the graph nodes of the adapted
        ones (tagged by the rewrite) and the current weights."""
        state = get_state(root)
        nodes = tagged_nodes(root.graph)
        out = []
        for record in state.sites if state is not None else ():
            node = nodes.get(record.key) if record.adapted else None
            if node is not None:
                out.append(replace(record, **handles(root, node)))
            else:
                weight = resolve_attr(root, record.weight_name)
                out.append(replace(record, weight=weight if isinstance(weight, torch.Tensor) else None))
        return out

    def adapt(self, root: nn.Module, sites: Sequence[LinearSite]) -> dict[str, nn.Parameter]:
        vectors = new_vectors(root, sites)
        try:
            Rewrite(sites)(root)
        except Exception:
            for name in vectors:  # all or nothing
                owner, _, leaf = name.rpartition(".")
                del (root.get_submodule(owner) if owner else root)._parameters[leaf]
            raise
        CapturedModule.forget_calls(root)  # graphs of other calls are captured again, adapted
        return vectors

    def plan(self, root: nn.Module, groups: dict[str, list[LinearSite]]) -> list[Plan]:
        return plan_merge(root, groups)

    def merge(self, root: nn.Module, plans: Sequence[Plan], inplace: bool) -> None:
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
        Restore([s.node for plan in plans for s in plan.sites])(root)  # the b get_attr nodes go with it
        for plan in plans:
            owner, _, leaf = plan.name.rpartition(".")
            (root.get_submodule(owner) if owner else root)._parameters.pop(leaf)
        CapturedModule.forget_calls(root)

    def copy(self, root: nn.Module) -> nn.Module:
        return copy_module_tree(root)

    def stack(self, root: nn.Module, stacks: dict[str, torch.Tensor]) -> None:
        for name, B in stacks.items():
            _set_param(root, name, nn.Parameter(B, requires_grad=True))
        root.meta[STACK] = next(iter(stacks.values())).shape[0]
        StackSites()(root)
        CapturedModule.forget_calls(root)  # other calls are captured again, stacked


class Restore(GraphPass):
    """Put back the call each 1LoRA node replaced (an expert term just goes): the graph
    is then op for op the un-adapted capture."""

    def __init__(self, nodes: Sequence[fx.Node]):
        super().__init__()
        self.nodes = list(dict.fromkeys(nodes))

    def run(self, gm: fx.GraphModule, graph: fx.Graph) -> bool:
        for node in self.nodes:
            _restore(graph, node)
        return bool(self.nodes)


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


def _feeds_only(node: fx.Node, calls: set[fx.Node]) -> bool:
    """Does every op that consumes ``node``'s value (through the ops that hand a weight
    on) belong to ``calls``, or only look at its shape?"""
    todo, seen = [node], {node}
    while todo:
        cur = todo.pop()
        for user in cur.users:
            if user in seen or user in calls:
                continue
            seen.add(user)
            name = op_name(user.op, user.target) if user.op in ("call_function", "call_method") else ""
            if name in SHAPE_QUERIES:
                continue
            if carries_weight(name) and user.args and user.args[0] is cur:
                todo.append(user)
                continue
            return False
    return True


def _readers_elsewhere(gm: nn.Module, sites: list[LinearSite], readers: dict[int, list[fx.Node]]) -> list[tuple[fx.Node, fx.Node]]:
    """``(get_attr, user)`` pairs through which something other than the adapted calls
    reads their weight (under any name). A transpose, cast or split that feeds only
    adapted calls (``matmul(x, t(W))``, MHA's q and kv rows) belongs to them; a shape
    query or metadata assertion reads nothing."""
    calls = {s.node for s in sites}
    calls |= {s.node.args[0] for s in sites if s.experts and s.node.target is ops.expert_term}  # the grouped matmul
    return [(node, u) for node in readers.get(id(sites[0].weight), []) for u in node.users
            if u not in calls and not _feeds_only(u, calls)
            and not (u.op in ("call_function", "call_method") and op_name(u.op, u.target) in SHAPE_QUERIES)]


def _give_own_copy(gm: nn.Module, plan: Plan, merged: nn.Parameter) -> None:
    """Register ``merged`` under the sites' weight name and send every other reader of
    the weight to a name that still holds the original."""
    first = plan.sites[0]
    weight = first.weight
    others = [n for n, p in gm.named_parameters(remove_duplicate=False) if p is weight and n != first.weight_name]
    readers = _get_attr_readers(gm)
    elsewhere = _readers_elsewhere(gm, plan.sites, readers)
    if elsewhere and not others:  # plan_merge refuses this before anything changes
        raise MergeError(f"{first.weight_name} is read by {elsewhere[0][1].format_node()} too, under its one name")
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
