"""The 1LoRA graph pass: route each selected call through :func:`onelora_fx.ops.linear`.

Each selected call ``linear(x, W, bias)`` (in whichever form :mod:`sites` found it)
becomes one node ``ops.linear(x, W, bias, b, transposed=...)`` that reuses the call's
own argument nodes. The replaced call is remembered in the new node's
``meta["onelora_original"]`` as a template over those arguments, so
:func:`onelora_fx.merge` can put back the base graph op for op. An expert site keeps
its grouped matmul and gains one node after it, ``ops.expert_term(y, x, offsets, b)``;
merge removes that node again.

The pass only reads ``b`` from the root module (``get_attr``); :func:`new_vectors`
creates them. A graph captured later from the same model (another call signature, a
move to another dtype) is adapted by the same pass with the vectors that exist.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence

import torch
from torch import fx, nn

from . import ops
from .sites import LinearSite, find_sites, group_by_weight, resolve_attr

__all__ = ["Original", "rewrite", "new_vectors", "adapt_like", "stack_graph", "AlreadyAdaptedError", "STACK", "IDS"]

#: ``meta`` key of a graph module whose vectors are stacks (``[K, out]``): how many
STACK = "onelora_stack"
#: the keyword (and placeholder) that picks each batch item's adapter in a stack
IDS = "adapter_ids"


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


def new_vectors(root: nn.Module, sites: Sequence[LinearSite]) -> dict[str, nn.Parameter]:
    """Register a zero ``b`` for every weight the ``selected`` sites use.

    Checks first (nothing is registered if any name is taken).
    """
    groups = group_by_weight(s for s in sites if s.selected)
    for name, group in groups.items():
        if group[0].adapted or resolve_attr(root, name) is not None:
            raise AlreadyAdaptedError(f"{name} already exists; transform the base model instead")
    vectors = {}
    for name, group in groups.items():
        s = group[0]
        shape = (s.experts, s.out_features) if s.experts else (s.out_features,)
        b = nn.Parameter(torch.zeros(shape, dtype=s.dtype, device=s.device))
        owner, _, leaf = name.rpartition(".")
        (root.get_submodule(owner) if owner else root).register_parameter(leaf, b)
        vectors[name] = b
    return vectors


def rewrite(root: nn.Module, graph: fx.Graph, sites: Sequence[LinearSite]) -> int:
    """Route every ``selected`` site of ``graph`` through its ``b`` (already registered
    in ``root``); returns how many calls were rewritten. On an error nothing changes."""
    selected = [s for s in sites if s.selected]
    for s in selected:  # requires
        if s.adapted:
            raise AlreadyAdaptedError(f"{s.name} already carries 1LoRA ({s.adapter_name}); transform the base model instead")
        if s.node is None or s.node.graph is not graph:
            raise ValueError(f"site {s.name} does not belong to this graph; find sites on the graph you adapt")
        if not isinstance(resolve_attr(root, s.adapter_name), nn.Parameter):
            raise ValueError(f"{s.adapter_name} is not registered; create the vectors first (new_vectors)")
    replaced: dict[fx.Node, fx.Node] = {}  # a site's input may be an earlier site's output
    for s in selected:
        node = s.node
        x = replaced.get(s.input, s.input)
        if s.experts:
            with graph.inserting_after(node):
                b_node = graph.get_attr(s.adapter_name)
            with graph.inserting_after(b_node):
                new = graph.call_function(ops.expert_term, (node, x, s.offsets_arg, b_node))
            node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
            new.meta = dict(node.meta)
            new.meta["onelora_kind"] = s.kind
            continue
        with graph.inserting_before(node):
            b_node = graph.get_attr(s.adapter_name)
            if s.kind == "nn.Linear":  # call_module: the weights become graph values
                weight = graph.get_attr(f"{s.owner}.weight")
                bias = graph.get_attr(f"{s.owner}.bias") if s.has_bias else None
            else:
                weight, bias = s.weight_arg, s.bias_arg
            args = (x, weight, bias, b_node)
            new = graph.call_function(ops.linear, args, {"transposed": True} if s.arg_transposed else {})
        new.meta = dict(node.meta)
        new.meta["onelora_kind"] = s.kind
        new.meta["onelora_original"] = Original.of(node, args)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        replaced[node] = new
    graph.eliminate_dead_code()  # ensures
    graph.lint()
    return len(selected)


def adapt_like(root: nn.Module, graph: fx.Graph) -> int:
    """Adapt a newly captured ``graph`` of ``root`` as ``root`` is adapted: every call of
    a weight that has a vector in ``root`` goes through it (a stack, if ``root`` has one)."""
    sites = [replace(s, selected=isinstance(resolve_attr(root, s.adapter_name), nn.Parameter)) for s in find_sites(root, graph)]
    count = rewrite(root, graph, sites) if any(s.selected for s in sites) else 0
    if root.meta.get(STACK) if isinstance(root, fx.GraphModule) else False:
        stack_graph(graph)
    return count


def _same(a: Any, b: Any) -> bool:
    """Two (symbolic) sizes are the same expression."""
    return str(a) == str(b)


def _rows(x: fx.Node, batch: Any) -> str:
    """How ``x``'s rows meet the batch, read from the shapes export recorded."""
    val = x.meta.get("val")
    if batch is None or not isinstance(val, torch.Tensor) or val.dim() < 2:
        return ops.BY_SHAPE
    if _same(val.shape[0], batch):
        return ops.LEADING
    source = x
    while val.dim() == 2 and source.op == "call_function" and source.args:  # through reshapes to [batch, ...]
        source = source.args[0]
        if not isinstance(source, fx.Node):
            break
        shape = getattr(source.meta.get("val"), "shape", None)
        if shape is not None and len(shape) >= 2 and _same(shape[0], batch) and _same(shape[-1], val.shape[-1]):
            return ops.FLATTENED
    raise ValueError(
        f"{x.format_node()} is not laid out with the batch first (its rows are {val.shape[0]}, the batch is {batch}): "
        "a stack cannot tell which adapter each row belongs to"
    )


def stack_graph(graph: fx.Graph) -> int:
    """Turn every adapted call of ``graph`` into its stacked form, reading each batch
    item's adapter from a new last input ``adapter_ids``. Checks every site first."""
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    first = next((n for n in inputs if isinstance(n.meta.get("val"), torch.Tensor)), None)
    batch = first.meta["val"].shape[0] if first is not None and first.meta["val"].dim() else None
    adapted = [n for n in graph.nodes if n.op == "call_function" and n.target is ops.linear]
    if any(n.op == "call_function" and n.target is ops.expert_term for n in graph.nodes):
        raise ValueError("expert sites cannot be stacked: a grouped matmul sorts its rows by expert, not by batch item")
    layouts = {n: _rows(n.args[0], batch) for n in adapted}
    with graph.inserting_after(inputs[-1] if inputs else next(iter(graph.nodes))):
        ids = graph.placeholder(IDS, default_value=None)
    for node in adapted:
        x, weight, bias, b = node.args[:4]
        kwargs = {"transposed": node.kwargs.get("transposed", False), "rows": layouts[node]}
        with graph.inserting_before(node):
            new = graph.call_function(ops.linear_rows, (x, weight, bias, b, ids), kwargs)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    graph.lint()
    return len(adapted)
