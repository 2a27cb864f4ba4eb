"""Grad-mode and autocast blocks of an exported graph, inlined into it.

Pre-dispatch ``torch.export`` puts the body of a ``with torch.no_grad():`` /
``torch.enable_grad()`` / ``torch.autocast(...)`` block in a subgraph and calls it
through a higher-order op that is handed the weights as operands::

    wrap_with_set_grad_enabled(False, submod_1, x, a_weight, a_bias)

A linear inside such a body is invisible to a pass over the top graph: it would stay
unadapted, and nothing would say so (Hierarchical Reasoning Models run most of their
cycles under ``torch.no_grad()``). :func:`inline_regions` puts each body back into the
graph that calls it, between the calls that enter and leave the mode, which is what the
block was before export wrapped it::

    prev = torch.is_grad_enabled(); _set_grad_enabled(False)
    linear = aten.linear(x, a_weight, a_bias)
    _set_grad_enabled(prev)

Every later pass (sites, rewrite, merge, the compile backend) then sees the body's
linears like any other, and ``torch.export`` of the result wraps the block again. Like
the exported graph itself, the inlined block leaves the mode unrestored if an op inside
it raises.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from ...compat import REGIONS, HigherOrderOperator, enter_autocast, exit_autocast, set_grad_enabled

__all__ = ["inline_regions"]


def _region(node: fx.Node) -> int:
    """How many mode arguments precede the body, for a region op; -1 for any other node."""
    if node.op != "call_function" or not isinstance(node.target, HigherOrderOperator):
        return -1
    return REGIONS.get(node.target.name(), -1)


def _fresh_name(gm: fx.GraphModule, base: str) -> str:
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name


def _enter(graph: fx.Graph, kind: str, modes: tuple) -> tuple:
    """Nodes that enter the mode; returns what :func:`_leave` needs."""
    if kind == "wrap_with_set_grad_enabled":
        prev = graph.call_function(torch.is_grad_enabled)
        graph.call_function(set_grad_enabled, modes)
        return (prev,)
    return (graph.call_function(enter_autocast, modes),)


def _leave(graph: fx.Graph, kind: str, entered: tuple) -> None:
    graph.call_function(set_grad_enabled if kind == "wrap_with_set_grad_enabled" else exit_autocast, entered)


def inline_regions(gm: fx.GraphModule) -> int:
    """Inline every grad-mode / autocast region of ``gm`` (nested ones too); returns how
    many were inlined. ``gm`` is changed in place and recompiled when any was.

    Examples:
        >>> class M(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.a = torch.nn.Linear(4, 4)
        ...     def forward(self, x):
        ...         with torch.no_grad():
        ...             return self.a(x)
        >>> gm = torch.export.export(M(), (torch.randn(2, 4),), strict=False).module()
        >>> gm = fx.GraphModule(gm, gm.graph)
        >>> inline_regions(gm)
        1
        >>> [str(n.target) for n in gm.graph.nodes if "linear" in str(n.target)]
        ['aten.linear.default']
    """
    count = 0
    graph = gm.graph
    for node in list(graph.nodes):
        n_modes = _region(node)
        if n_modes < 0:
            continue
        kind = node.target.name()
        modes, body_node, operands = node.args[:n_modes], node.args[n_modes], node.args[n_modes + 1:]
        body = getattr(gm, body_node.target)
        count += inline_regions(body)  # a block inside a block
        env: dict[fx.Node, fx.Node] = {}
        placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(operands):
            raise AssertionError(f"{node.format_node()}: {len(operands)} operands for {len(placeholders)} inputs")
        env.update(zip(placeholders, operands))
        outputs = None
        empty = all(n.op in ("placeholder", "output") for n in body.graph.nodes)
        with graph.inserting_before(node):
            entered = () if empty else _enter(graph, kind, tuple(modes))  # (export leaves empty blocks)
            for inner in body.graph.nodes:
                if inner.op == "placeholder":
                    continue
                if inner.op == "output":
                    outputs = fx.map_arg(inner.args[0], env.__getitem__)
                    continue
                copy = graph.node_copy(inner, env.__getitem__)
                if inner.op == "get_attr":  # a subgraph of another higher-order op (cond, scan)
                    copy.target = _fresh_name(gm, inner.target.replace(".", "_"))
                    setattr(gm, copy.target, getattr(body, inner.target))
                env[inner] = copy
            if entered:
                _leave(graph, kind, entered)
        for user in list(node.users):
            if user.op != "call_function" or user.target is not operator.getitem:
                raise AssertionError(f"{node.format_node()} is read by {user.format_node()}, not by getitem")
            user.replace_all_uses_with(outputs[user.args[1]])
            graph.erase_node(user)
        graph.erase_node(node)
        if not body_node.users:
            graph.erase_node(body_node)
            if not any(n.op == "get_attr" and n.target == body_node.target for n in graph.nodes):
                delattr(gm, body_node.target)
        count += 1
    if count:
        graph.lint()
        gm.recompile()
    return count
