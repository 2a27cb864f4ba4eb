"""``torch.compile(model, backend="onelora")``: 1LoRA lowered into Inductor's kernels.

Under ``torch.compile`` an adapted call is already the paper's Listing 1 in plain ops
(:func:`onelora_fx.ops.linear` emits ``linear(x, W, bias) + b * x.sum(-1, keepdim=True)``
while Dynamo traces for a compile), which AOTAutograd differentiates and Inductor fuses:
one generated kernel computes ``s = x.sum(-1)`` and ``b * s``, the accumulator of the
GEMM's ``addmm``; backward keeps ``s`` (and the frozen weight and ``b``, which it reads),
computes ``grad_b`` and ``g @ b`` in one kernel and hands the rank-1 term to
``grad_x``'s ``addmm`` as its accumulator; no weight-sized tensor is made. That holds
with ``backend="inductor"`` too. The ``onelora`` backend adds:

1. :class:`LowerCustomOp`: a graph that holds the registered custom op
   ``torch.ops.onelora.linear`` (what ``torch.export`` of an adapted module records, and
   what a compiled ``ExportedProgram.module()`` hands Dynamo) gets it replaced by
   Listing 1 in plain ops, which Inductor fuses; ``backend="inductor"`` would call it as
   an opaque kernel;
2. counts: the Listing 1 subgraphs it hands Inductor (ours and hand-written ones, in any
   operand order and spelling of the linear and the row sum), the custom ops it lowered
   and the graphs it compiled;
3. then Inductor (``compile_fx``) with the ``mode`` / ``options`` given to
   ``torch.compile``.

Counts are in ``torch._dynamo.utils.counters["onelora"]``: ``"listing1"``,
``"lowered"``, ``"graphs"``. The rewrite happens on Dynamo's graph before Inductor sees
it, so Inductor's FX-graph cache keys on the rewritten graph: no custom Inductor pass,
nothing to version with a ``uuid``.

The backend is registered with ``torch._dynamo.register_backend`` unless
``torch.compiler.list_backends()`` already lists it, which is the case when the package
is installed: torch then finds it through the ``torch_dynamo_backends`` entry point.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Optional, Sequence

import torch
from torch import fx

from .. import ops  # noqa: F401  (registers torch.ops.onelora.linear)
from ..compat import compile_with_inductor, counters
from ..analysis.linear_ops import Kind, read_call
from ..forms.graph.passes import GraphPass

__all__ = ["onelora_backend", "lower", "LowerCustomOp", "BACKEND_NAME"]

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
    """``linear(x, W, bias) + b * x.sum(-1, keepdim=True)``: either operand order of the
    sum and of the product, the linear in any form of the linear-op table."""
    if node.op != "call_function" or node.target not in _ADD or len(node.args) != 2:
        return False
    for lin, upd in (node.args, node.args[::-1]):
        if not isinstance(lin, fx.Node):
            continue
        call = read_call(lin.op, lin.target, lin.args, lin.kwargs)
        if call is None or call.kind is Kind.GROUPED:
            continue
        if not (isinstance(upd, fx.Node) and upd.op == "call_function" and upd.target in _MUL and len(upd.args) == 2):
            continue
        if any(_is_row_sum_of(a, call.x) for a in upd.args):
            return True
    return False


class LowerCustomOp(GraphPass):
    """Replace every ``torch.ops.onelora.linear`` node by Listing 1 in plain ops
    (:func:`onelora_fx.ops.decompose`), which AOTAutograd traces through; ``s``, the
    op's second output, only served the eager backward."""

    def run(self, gm: fx.GraphModule, graph: fx.Graph) -> bool:
        self.lowered = 0
        for node in list(graph.nodes):
            if node.op == "call_function" and node.target in _OURS:
                with graph.inserting_before(node):
                    plain = graph.call_function(ops.decompose, node.args, node.kwargs)
                plain.meta = dict(node.meta)
                for user in list(node.users):
                    if user.op == "call_function" and user.target is operator.getitem and user.args[1] == 0:
                        user.replace_all_uses_with(plain)
                        graph.erase_node(user)
                if not node.users:
                    graph.erase_node(node)
                self.lowered += 1
        return self.lowered > 0


def lower(gm: fx.GraphModule) -> tuple[int, int]:
    """Lower our custom op to Listing 1 in place; returns ``(lowered, Listing 1
    subgraphs in the result)``.

    Examples:
        >>> lowered, listing1 = lower(dynamo_graph)   # doctest: +SKIP
    """
    lowering = LowerCustomOp()
    lowering(gm)
    lowered = sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is ops.decompose)
    return lowering.lowered, lowered + sum(_is_listing1(n) for n in gm.graph.nodes)


def onelora_backend(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    *,
    mode: Optional[str] = None,
    options: Optional[dict[str, Any]] = None,
) -> Callable[..., Any]:
    """The ``onelora`` compile backend: lower 1LoRA, then Inductor.

    Examples:
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
