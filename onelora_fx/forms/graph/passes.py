"""One shape for every graph pass: torch.fx's ``PassBase`` (``requires`` / ``call`` /
``ensures``, returning ``PassResult(graph_module, modified)``) and one finalization.

A pass works on the graph module's own graph, or on another graph whose ``get_attr``
targets name attributes of that module (a graph captured on first use for another call
signature: :class:`~onelora_fx.forms.graph.module.CapturedModule` keeps several).
:func:`finalize` is the one clean-up step every pass that changed a graph ends with:
dead-code elimination, ``lint`` and, for the module's own graph, ``recompile``.
"""

from __future__ import annotations

import abc
from typing import Optional

from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

__all__ = ["GraphPass", "PassResult", "finalize"]


def _impure(node: fx.Node) -> bool:
    """What dead-code elimination must keep: fx's impure nodes, and the calls with which
    an exported ``torch.vmap`` enters and leaves its level (``_vmap_increment_nesting`` /
    ``_vmap_decrement_nesting``: the decrement's result is unused, yet dropping it leaves
    the level open and the next batched op fails; transformers' masks use vmap), and the
    in-place methods of a ``symbolic_trace`` graph (``t.div_(p)`` whose result is unused
    still changes ``t``: timm's stochastic depth scales its mask so)."""
    return node.is_impure() or (
        node.op == "call_function" and getattr(node.target, "__module__", "") == "torch._functorch.predispatch") or (
        node.op == "call_method" and str(node.target).endswith("_") and not str(node.target).endswith("__"))


def finalize(gm: fx.GraphModule, graph: Optional[fx.Graph] = None) -> None:
    """Dead-code elimination (keeping what :func:`_impure` says), ``lint``, and
    ``recompile`` when ``graph`` is ``gm``'s own."""
    graph = gm.graph if graph is None else graph
    graph.eliminate_dead_code(is_impure_node=_impure)
    graph.lint()
    if graph is gm.graph:
        gm.recompile()


class GraphPass(PassBase):
    """A pass over ``graph`` (default: the module's own graph).

    Subclasses implement :meth:`run` (change the graph, return whether anything
    changed), and may override ``requires`` (check the input, raise before changing
    anything) and ``ensures`` (check the result). Calling the pass runs ``requires``,
    ``run``, :func:`finalize` when something changed, then ``ensures``.

    Examples:
        >>> result = Rewrite(sites)(gm)         # doctest: +SKIP
        >>> result.modified                     # doctest: +SKIP
        True
    """

    def __init__(self, graph: Optional[fx.Graph] = None):
        super().__init__()
        self._graph = graph

    def graph_of(self, gm: fx.GraphModule) -> fx.Graph:
        return gm.graph if self._graph is None else self._graph

    @abc.abstractmethod
    def run(self, gm: fx.GraphModule, graph: fx.Graph) -> bool:
        """Change ``graph``; return whether anything changed."""

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        graph = self.graph_of(graph_module)
        modified = self.run(graph_module, graph)
        if modified:
            finalize(graph_module, graph)
        return PassResult(graph_module, modified)
