"""``torch.compile(model, backend="onelora")``: 1LoRA lowered into Inductor's kernels.

Dynamo hands the backend a torch-level graph. The backend

1. lowers every ``torch.ops.onelora.linear`` node (what an adapted module becomes under
   ``torch.compile``) to the paper's Listing 1 in plain ops,
   ``linear(x, W, bias) + b * x.sum(-1, keepdim=True)``, which AOTAutograd
   differentiates and Inductor fuses: one generated kernel computes ``s = x.sum(-1)``
   and ``b * s``, the accumulator of the GEMM's ``addmm``; backward keeps ``s``,
   computes ``grad_b`` and ``g @ b`` in one kernel and hands the rank-1 term to
   ``grad_x``'s ``addmm`` as its accumulator; no weight-sized tensor is made (the
   weight is frozen);
2. recognises hand-written Listing 1 subgraphs (``add(linear(x, ...), mul(b, x.sum(-1,
   keepdim=True)))``), which are already in that form, and counts them;
3. hands the graph to Inductor (``compile_fx``) with the ``mode`` / ``options`` given to
   ``torch.compile``.

What it adds over ``backend="inductor"``: on an adapted module, Inductor alone sees the
custom op as an opaque call (our eager kernel, correct but unfused with its
neighbours); the lowering lets it fuse. On a hand-written Listing 1 module it adds
nothing but the count: Inductor already produces the lean kernels.

Counts are in ``torch._dynamo.utils.counters["onelora"]``: ``"lowered"`` (our op),
``"listing1"`` (hand-written), ``"graphs"`` (graphs compiled). The rewrite happens on
Dynamo's graph before Inductor sees it, so Inductor's FX-graph cache keys on the
rewritten graph: no custom Inductor pass, nothing to version with a ``uuid``.

The backend is registered with ``torch._dynamo.register_backend`` (the documented way
to name a backend) unless ``torch.compiler.list_backends()`` already lists it, which is
the case when the package is installed: torch then finds it through the
``torch_dynamo_backends`` entry point.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Optional, Sequence

import torch
from torch import fx

from . import ops  # noqa: F401  (registers torch.ops.onelora.linear)
from .compat import compile_with_inductor, counters
from .linear_ops import Kind, kind_of

__all__ = ["onelora_backend", "lower", "BACKEND_NAME"]

BACKEND_NAME = "onelora"
_OURS = (torch.ops.onelora.linear, torch.ops.onelora.linear.default)
_SUM = (torch.sum, torch.ops.aten.sum.dim_IntList)
_MUL = (operator.mul, torch.mul, torch.ops.aten.mul.Tensor)
_ADD = (operator.add, torch.add, torch.ops.aten.add.Tensor)


def _is_row_sum_of(node: Any, x: fx.Node) -> bool:
    """``x.sum(-1, keepdim=True)`` in any spelling Dynamo records."""
    if not isinstance(node, fx.Node) or not node.args or node.args[0] is not x:
        return False
    if not ((node.op == "call_method" and node.target == "sum") or (node.op == "call_function" and node.target in _SUM)):
        return False
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
    last = x.meta.get("example_value", x.meta.get("val"))
    rank = last.dim() if isinstance(last, torch.Tensor) else None
    dims = dim if isinstance(dim, (list, tuple)) else [dim]
    return keep is True and len(dims) == 1 and (dims[0] == -1 or (rank is not None and dims[0] == rank - 1))


def _is_listing1(node: fx.Node) -> bool:
    """``linear(x, W, bias) + b * x.sum(-1, keepdim=True)`` (either operand order)."""
    if node.op != "call_function" or node.target not in _ADD or len(node.args) != 2:
        return False
    for lin, upd in (node.args, node.args[::-1]):
        if not (isinstance(lin, fx.Node) and kind_of(lin.op, lin.target) is Kind.LINEAR):
            continue
        if not (isinstance(upd, fx.Node) and upd.op == "call_function" and upd.target in _MUL and len(upd.args) == 2):
            continue
        x = lin.args[0]
        if any(_is_row_sum_of(a, x) for a in upd.args):
            return True
    return False


def lower(gm: fx.GraphModule) -> tuple[int, int]:
    """Lower our op to Listing 1 in place; returns ``(lowered, hand-written found)``.

    Example:
        >>> lowered, listing1 = lower(dynamo_graph)   # doctest: +SKIP
    """
    graph = gm.graph
    listing1 = sum(_is_listing1(n) for n in graph.nodes)
    lowered = 0
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _OURS:
            # the op returns (y, s); y is Listing 1 in plain ops (ops.decompose), which
            # AOTAutograd traces through; s only served the eager backward
            with graph.inserting_before(node):
                plain = graph.call_function(ops.decompose, node.args, node.kwargs)
            plain.meta = dict(node.meta)
            for user in list(node.users):
                if user.op == "call_function" and user.target is operator.getitem and user.args[1] == 0:
                    user.replace_all_uses_with(plain)
                    graph.erase_node(user)
            if not node.users:
                graph.erase_node(node)
            lowered += 1
    if lowered:
        graph.lint()
        gm.recompile()
    return lowered, listing1


def onelora_backend(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    *,
    mode: Optional[str] = None,
    options: Optional[dict[str, Any]] = None,
) -> Callable[..., Any]:
    """The ``onelora`` compile backend: lower 1LoRA, then Inductor.

    Example:
        >>> compiled = torch.compile(ol.transform(model), backend="onelora", fullgraph=True)  # doctest: +SKIP
    """
    lowered, listing1 = lower(gm)
    counters["onelora"]["lowered"] += lowered
    counters["onelora"]["listing1"] += listing1
    counters["onelora"]["graphs"] += 1
    return compile_with_inductor(gm, example_inputs, mode, options)


def _register() -> None:
    """Name the backend once: when the package is installed torch already lists it
    (through the entry point) and registers it itself on first use."""
    if BACKEND_NAME not in torch.compiler.list_backends(exclude_tags=()):
        torch._dynamo.register_backend(onelora_backend, name=BACKEND_NAME)


_register()
