"""The 1LoRA graph pass: route each selected call through :func:`onelora_fx.ops.linear`.

Each selected call ``linear(x, W, bias)`` (in whichever form :mod:`sites` found it)
becomes one node ``ops.linear(x, W, bias, b, transposed=...)`` that reuses the call's
own argument nodes. The replaced call is remembered in the new node's
``meta["onelora_original"]`` as a template over those arguments, so
:func:`onelora_fx.merge` can put back the base graph op for op. An expert site keeps
its grouped matmul and gains one node after it, ``ops.expert_term(y, x, offsets, b)``;
merge removes that node again.

Each 1LoRA node records which site it is in ``meta["onelora_site"]`` (the weight's name
and the call's index), as pt2e records its annotations on nodes: later stages find the
adapted calls from these tags and the site records of the adapter state, never by
finding the sites again. A call that reads only some output rows of its weight (a split
of a packed ``in_proj_weight``) uses the same rows of the weight's one ``b``.

The passes only read ``b`` from the root module (``get_attr``); :func:`new_vectors`
creates them. A graph captured later from the same model (another call signature, a
move to another dtype) is adapted by the same passes with the vectors that exist
(:func:`adapt_like`).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence

import torch
from torch import fx, nn

from ... import ops
from ...analysis.linear_ops import op_name
from ...analysis.sites import find_sites, group_by_weight
from ...records import LinearSite, resolve_attr
from ...state import AlreadyAdaptedError
from .passes import GraphPass

__all__ = ["Original", "Rewrite", "StackSites", "new_vectors", "adapt_like", "STACK", "IDS", "SITE", "tagged_nodes"]

#: ``meta`` key of a graph module whose vectors are stacks (``[K, out]``): how many
STACK = "onelora_stack"
#: the keyword (and placeholder) that picks each batch item's adapter in a stack
IDS = "adapter_ids"
#: ``meta`` key of a 1LoRA node: the ``(weight name, call index)`` of the site it is
SITE = "onelora_site"


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
        b = group[0].new_vector()
        owner, _, leaf = name.rpartition(".")
        (root.get_submodule(owner) if owner else root).register_parameter(leaf, b)
        vectors[name] = b
    return vectors


def tagged_nodes(graph: fx.Graph) -> dict[tuple[str, int], fx.Node]:
    """The 1LoRA nodes of ``graph`` by the site they are (``meta["onelora_site"]``)."""
    return {n.meta[SITE]: n for n in graph.nodes if n.op == "call_function" and SITE in n.meta}


def _rows_of(graph: fx.Graph, b: fx.Node, rows: Optional[tuple[int, int]]) -> fx.Node:
    """``b``, or the rows of it a sliced call reads (the last dimension: this holds for a
    ``[K, out]`` stack too)."""
    if rows is None:
        return b
    return graph.call_function(operator.getitem, (b, (Ellipsis, slice(*rows))))


class Rewrite(GraphPass):
    """Route every ``selected`` site of the graph through its ``b`` (already registered
    in the module). On an error in ``requires`` nothing changes."""

    def __init__(self, sites: Sequence[LinearSite], graph: Optional[fx.Graph] = None):
        super().__init__(graph)
        self.selected = [s for s in sites if s.selected]

    def requires(self, gm: fx.GraphModule) -> None:
        graph = self.graph_of(gm)
        for s in self.selected:
            if s.adapted:
                raise AlreadyAdaptedError(f"{s.name} already carries 1LoRA ({s.adapter_name}); transform the base model instead")
            if s.node is None or s.node.graph is not graph:
                raise ValueError(f"site {s.name} does not belong to this graph; find sites on the graph you adapt")
            if not isinstance(resolve_attr(gm, s.adapter_name), nn.Parameter):
                raise ValueError(f"{s.adapter_name} is not registered; create the vectors first (new_vectors)")

    def run(self, gm: fx.GraphModule, graph: fx.Graph) -> bool:
        replaced: dict[fx.Node, fx.Node] = {}  # a site's input may be an earlier site's output
        for s in self.selected:
            node = s.node
            x = replaced.get(s.input, s.input)
            if s.experts:
                with graph.inserting_after(node):
                    b_node = graph.get_attr(s.adapter_name)
                with graph.inserting_after(b_node):
                    new = graph.call_function(ops.expert_term, (node, x, s.offsets_arg, b_node))
                node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
                new.meta = {**node.meta, "onelora_kind": s.kind, SITE: s.key}
                continue
            with graph.inserting_before(node):
                b_node = _rows_of(graph, graph.get_attr(s.adapter_name), s.rows)
                if s.kind == "nn.Linear":  # call_module: the weights become graph values
                    weight = graph.get_attr(f"{s.owner}.weight")
                    bias = graph.get_attr(f"{s.owner}.bias") if s.has_bias else None
                else:
                    weight, bias = s.weight_arg, s.bias_arg
                args = (x, weight, bias, b_node)
                new = graph.call_function(ops.linear, args, {"transposed": True} if s.arg_transposed else {})
            new.meta = {**node.meta, "onelora_kind": s.kind, SITE: s.key, "onelora_original": Original.of(node, args)}
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            replaced[node] = new
        return bool(self.selected)


def adapt_like(gm: fx.GraphModule, graph: fx.Graph) -> int:
    """Adapt a newly captured ``graph`` of ``gm`` as ``gm`` is adapted: every call of a
    weight that has a vector in ``gm`` goes through it (a stack, if ``gm`` has one)."""
    sites = [replace(s, selected=isinstance(resolve_attr(gm, s.adapter_name), nn.Parameter)) for s in find_sites(gm, graph)]
    count = sum(s.selected for s in sites)
    if count:
        Rewrite(sites, graph)(gm)
    if gm.meta.get(STACK):
        StackSites(graph)(gm)
    return count


def _same(a: Any, b: Any) -> bool:
    """Two (symbolic) sizes are the same expression."""
    return str(a) == str(b)


#: ops that move a tensor's leading dimension or reorder its rows: a flattened input
#: behind one of them does not hold each batch item's rows together
_REORDERS = {"transpose", "permute", "t", "movedim", "swapaxes", "swapdims", "numpy_T", "flip", "roll",
             "index", "index_select", "gather", "take_along_dim"}


def _moves_batch(node: fx.Node) -> bool:
    """Does this op move dimension 0 (``x.transpose(0, 1)``, ``x.t()``, ``permute(1, 0, 2)``)?"""
    name = op_name(node.op, node.target)
    args = node.args[1:]
    if name in ("t", "numpy_T"):
        return True
    if name in ("transpose", "swapaxes", "swapdims", "movedim"):
        return 0 in args[:2]
    if name == "permute":
        dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
        return bool(dims) and dims[0] != 0
    return False


def _batch_moved_before(x: fx.Node) -> Optional[fx.Node]:
    """For a graph without shapes (``symbolic_trace``): the op that left ``x``'s batch out
    of dimension 0, if the chain of first arguments behind ``x`` moves it an odd number
    of times (``self.fc(x.transpose(0, 1))``); sizes cannot tell when ``S == B``."""
    moves, node, last = 0, x, None
    while isinstance(node, fx.Node) and node.op in ("call_function", "call_method") and node.args:
        if _moves_batch(node):
            moves, last = moves + 1, node if last is None else last
        node = node.args[0]
    return last if moves % 2 else None


def _rows(x: fx.Node, batch: Any) -> str:
    """How ``x``'s rows meet the batch, read from the shapes export recorded (a graph
    without them: from its ops, then at run time from the shapes)."""
    val = x.meta.get("val")
    if not isinstance(val, torch.Tensor):
        moved = _batch_moved_before(x)
        if moved is not None:
            raise ValueError(
                f"a stacked linear reads {x.name}, which comes after {moved.format_node()}: that moves the batch out "
                "of the first dimension, so a stack cannot tell which adapter each row belongs to"
            )
    if batch is None or not isinstance(val, torch.Tensor) or val.dim() < 2:
        return ops.BY_SHAPE
    if _same(val.shape[0], batch):
        return ops.LEADING
    source = x
    while val.dim() == 2 and source.op == "call_function" and source.args:  # through reshapes to [batch, ...]
        if op_name(source.op, source.target) in _REORDERS:
            break  # rows moved across the batch (x.transpose(0, 1).reshape(S * B, E)): no item is contiguous
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


class StackSites(GraphPass):
    """Turn every adapted call into its stacked form, reading each batch item's adapter
    from a new last input ``adapter_ids``. Checks every site first."""

    def requires(self, gm: fx.GraphModule) -> None:
        graph = self.graph_of(gm)
        if any(n.op == "call_function" and n.target is ops.expert_term for n in graph.nodes):
            raise ValueError("expert sites cannot be stacked: a grouped matmul sorts its rows by expert, not by batch item")
        inputs = [n for n in graph.nodes if n.op == "placeholder"]
        tensors = [n for n in inputs if isinstance(n.meta.get("val"), torch.Tensor)]
        val = ops.batch_source([n.meta["val"] for n in tensors])
        first = next((n for n in tensors if n.meta["val"] is val), tensors[0] if tensors else None)
        self.batch = val.shape[0] if val is not None else None
        self.first = first
        self.layouts = {n: _rows(n.args[0], self.batch) for n in graph.nodes if n.op == "call_function" and n.target is ops.linear}

    def run(self, gm: fx.GraphModule, graph: fx.Graph) -> bool:
        inputs = [n for n in graph.nodes if n.op == "placeholder"]
        with graph.inserting_after(inputs[-1] if inputs else next(iter(graph.nodes))):
            ids = graph.placeholder(IDS, default_value=None)
        with graph.inserting_after(ids):
            # one check of adapter_ids per call (length, values), in eager, compiled and
            # exported programs alike
            checked = graph.call_function(ops.check_ids, (ids, self.first, gm.meta.get(STACK, 0)))
        for node, layout in self.layouts.items():
            x, weight, bias, b = node.args[:4]
            kwargs = {"transposed": node.kwargs.get("transposed", False), "rows": layout}
            with graph.inserting_before(node):
                new = graph.call_function(ops.linear_rows, (x, weight, bias, b, checked), kwargs)
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
        return True
