"""The 1LoRA graph pass: give each selected weight a ``b`` and route its calls through
:func:`onelora_fx.ops.linear`.

Each selected call ``linear(x, W, bias)`` (in whichever form :mod:`sites` found it)
becomes one node ``ops.linear(x, W, bias, b, transposed=...)`` that reuses the call's
own argument nodes. The replaced call is remembered in the new node's
``meta["onelora_original"]`` as a template over those arguments, so
:func:`onelora_fx.merge` can put back the base graph op for op.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import fx, nn

from . import ops
from .sites import LinearSite, group_by_weight

__all__ = ["Original", "adapt_graph", "AlreadyAdaptedError"]


class AlreadyAdaptedError(ValueError):
    """The module already carries 1LoRA vectors; adapting again would stack them."""


@dataclass(frozen=True)
class _Ref:
    """Argument ``index`` of the adapted node (templates hold no Node objects, so they
    survive ``copy.deepcopy`` of the graph)."""

    index: int


@dataclass(frozen=True)
class Original:
    """The call a 1LoRA node replaced, with node arguments as :class:`_Ref`."""

    op: str
    target: Any
    args: tuple
    kwargs: dict

    @staticmethod
    def of(node: fx.Node, new_args: Sequence[Any]) -> Optional["Original"]:
        index = {id(a): i for i, a in enumerate(new_args) if isinstance(a, fx.Node)}
        missing = []

        def ref(n: fx.Node) -> Any:
            if id(n) not in index:
                missing.append(n)
                return None
            return _Ref(index[id(n)])

        args = fx.node.map_arg(node.args, ref)
        kwargs = fx.node.map_arg(node.kwargs, ref)
        return None if missing else Original(node.op, node.target, args, dict(kwargs))

    def emit(self, graph: fx.Graph, adapted: fx.Node) -> fx.Node:
        """Insert the original call, reading its arguments from ``adapted``'s."""

        def resolve(a: Any) -> Any:
            if isinstance(a, _Ref):
                return adapted.args[a.index]
            if isinstance(a, (list, tuple)):
                return type(a)(resolve(x) for x in a)
            if isinstance(a, dict):
                return {k: resolve(v) for k, v in a.items()}
            return a

        return graph.create_node(self.op, self.target, resolve(self.args), resolve(self.kwargs))


def adapt_graph(gm: fx.GraphModule, sites: Sequence[LinearSite]) -> dict[str, nn.Parameter]:
    """Insert 1LoRA at every ``selected`` site of ``gm``; returns the new ``b`` vectors.

    Checks everything first: on any error ``gm`` is unchanged.

    Example:
        >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 8)))
        >>> chosen = [replace(s, selected=True) for s in find_sites(gm)]   # doctest: +SKIP
        >>> list(adapt_graph(gm, chosen))                                   # doctest: +SKIP
        ['0.onelora_b']
    """
    selected = [s for s in sites if s.selected]
    groups = group_by_weight(selected)
    # requires
    for s in selected:
        if s.adapted:
            raise AlreadyAdaptedError(f"{s.name} already carries 1LoRA ({s.adapter_name}); transform the base model instead")
        if s.node is None or s.node.graph is not gm.graph:
            raise ValueError(f"site {s.name} does not belong to this graph; find sites on the module you adapt")
    for name in groups:
        owner_path, _, leaf = name.rpartition(".")
        owner = gm.get_submodule(owner_path)
        if hasattr(owner, leaf):
            raise AlreadyAdaptedError(f"{name} already exists; transform the base model instead")

    # call
    vectors = {}
    for name, group in groups.items():
        first = group[0]
        owner_path, _, leaf = name.rpartition(".")
        b = nn.Parameter(torch.zeros(first.out_features, dtype=first.dtype, device=first.device))
        gm.get_submodule(owner_path).register_parameter(leaf, b)
        vectors[name] = b
    graph = gm.graph
    replaced: dict[fx.Node, fx.Node] = {}  # a site's input may be an earlier site's output
    for s in selected:
        node = s.node
        x = replaced.get(s.input, s.input)
        with graph.inserting_before(node):
            b_node = graph.get_attr(s.adapter_name)
            if s.kind == "nn.Linear":  # call_module: the weights become graph values
                weight = graph.get_attr(f"{s.owner}.weight")
                bias = graph.get_attr(f"{s.owner}.bias") if s.has_bias else None
            else:
                weight, bias = s.weight_arg, s.bias_arg
            args = (x, weight, bias, b_node)
            kwargs = {"transposed": True} if s.arg_transposed else {}
            new = graph.call_function(ops.linear, args, kwargs)
        new.meta = dict(node.meta)
        new.meta["onelora_kind"] = s.kind
        new.meta["onelora_original"] = Original.of(node, args)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        replaced[node] = new

    # ensures
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return vectors
