"""Weight accounting: every weight of the model, and what reads it. Nothing silent.

Every floating parameter of two or more dimensions is, after ``transform``, exactly one
of (:class:`WeightClass`):

* **adapted**: a linear site reads it and the pattern selected it;
* **not selected**: a linear site reads it and the pattern left it out;
* **no matrix product**: only ops that are not matrix products read it (an embedding
  lookup, a convolution, a normalization, elementwise arithmetic), or nothing does (a
  branch the forward never takes);
* **unadapted**: a matrix product that is not a linear site, or an op onelora_fx cannot
  follow (a custom op, a fused kernel, a batched matmul, a call the capture kept whole
  such as an ``fx.wrap``-ped function), reads it. These are named in the one warning
  ``transform`` gives, with their share of the model's parameters.

The readers come from one analysis for both forms: a captured graph
(:func:`graph_readers`: from each ``get_attr`` through the ops that hand a weight on, see
:mod:`.flow`, to the op that consumes it) or, in the module form where no graph capture
works, one recorded forward (:mod:`onelora_fx.forms.module.record`). ``merge`` asks the
same readers whether anything but its sites reads a weight it folds.
"""

from __future__ import annotations

import enum
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import torch
from torch import fx, nn

from ..quant import is_quantized_weight, logical_numel
from ..records import LinearSite, join, resolve_attr
from .flow import SHAPE_QUERIES, carries_weight
from .linear_ops import Kind, is_matmul_like, kind_of, op_name
from ..state import OneLoRAWarning

__all__ = ["WeightClass", "Reader", "Accounting", "graph_readers", "warn_unadapted"]


class WeightClass(str, enum.Enum):
    ADAPTED = "adapted"
    NOT_SELECTED = "not selected"
    NO_MATMUL = "no matrix product"
    UNADAPTED = "unadapted"


@dataclass(frozen=True)
class Reader:
    """One op that reads (part of) a weight."""

    #: the op, as a short name (``linear``, ``embedding``, ``einsum``, ``LSTM``)
    op: str
    #: ``site`` (a linear site's weight), ``matmul`` (a matrix product or an op we
    #: cannot follow, not a site) or ``other`` (no matrix product)
    kind: str
    #: where: the graph node, or the module path whose forward made the call
    where: str = ""
    #: a call the capture did not trace into (an ``fx.wrap``-ped function, a leaf module
    #: of another library): it may multiply by the weight, and another capture may see in
    opaque: bool = False


# torch.nn layers that multiply by their weights inside one fused kernel
_MATMUL_MODULES = (nn.RNNBase, nn.Bilinear, nn.MultiheadAttention)


def _opaque(target: object) -> bool:
    """A call the capture kept whole whose code is not torch's or Python's own (an
    ``fx.wrap``-ped function of a model library, a leaf module of another library)."""
    module = getattr(target, "__module__", None) or ""
    return module.split(".")[0] not in ("torch", "_operator", "operator", "builtins", "math", "onelora_fx")


def _weights(model: nn.Module) -> dict[int, list[str]]:
    """``id(parameter) -> every name`` of the floating parameters with >= 2 dims (a
    quantized weight counts as the floating weight it stands for)."""
    out: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if is_quantized_weight(p) or (p.dim() >= 2 and (p.is_floating_point() or p.is_complex())):
            out.setdefault(id(p), []).append(name)
    return out


@dataclass
class Accounting:
    """The readers of every weight (by its first name), and the names of each weight."""

    names: dict[str, tuple[str, ...]] = field(default_factory=dict)
    readers: dict[str, list[Reader]] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)

    @staticmethod
    def of(model: nn.Module) -> "Accounting":
        acc = Accounting()
        params = dict(model.named_parameters(remove_duplicate=False))
        for names in _weights(model).values():
            acc.names[names[0]] = tuple(names)
            acc.readers[names[0]] = []
            acc.sizes[names[0]] = logical_numel(params[names[0]])
        return acc

    def canonical(self, name: str) -> Optional[str]:
        for first, names in self.names.items():
            if name in names:
                return first
        return None

    def add(self, name: str, reader: Reader) -> None:
        first = self.canonical(name)
        if first is not None and reader not in self.readers[first]:
            self.readers[first].append(reader)

    def classify(self, sites: Sequence[LinearSite]) -> dict[str, WeightClass]:
        """Each weight's class once ``sites`` carry their selection."""
        selected: dict[str, bool] = {}
        for s in sites:
            first = self.canonical(s.weight_name)
            if first is not None:
                selected[first] = selected.get(first, False) or s.selected
        out = {}
        for name, readers in self.readers.items():
            if any(r.kind == "matmul" for r in readers):
                out[name] = WeightClass.UNADAPTED
            elif name in selected:
                out[name] = WeightClass.ADAPTED if selected[name] else WeightClass.NOT_SELECTED
            else:
                out[name] = WeightClass.NO_MATMUL
        return out

    def unadapted(self) -> dict[str, str]:
        """``{weight: op}`` of the weights a matrix product that is no site reads."""
        return {name: next(r.op for r in readers if r.kind == "matmul")
                for name, readers in self.readers.items() if any(r.kind == "matmul" for r in readers)}

    def opaque(self) -> dict[str, str]:
        """``{weight: op}`` of the weights read by calls the capture kept whole."""
        return {name: next(r.op for r in readers if r.opaque)
                for name, readers in self.readers.items() if any(r.opaque for r in readers)}

    def others(self, weight_name: str) -> list[Reader]:
        """What else reads a weight besides its linear sites (for merge)."""
        first = self.canonical(weight_name)
        return [r for r in self.readers.get(first, []) if r.kind != "site"] if first else []

    def summary(self, classes: dict[str, WeightClass]) -> list[tuple[str, int, int]]:
        """``(class, weights, parameters)`` for each class, in :class:`WeightClass` order."""
        return [(c.value, sum(1 for v in classes.values() if v is c),
                 sum(self.sizes[n] for n, v in classes.items() if v is c)) for c in WeightClass]


def _node_args(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), found.append)
    return found


def graph_readers(root: nn.Module, graph: fx.Graph, sites: Iterable[LinearSite]) -> Accounting:
    """The readers of every weight of ``root`` in ``graph``.

    From each ``get_attr`` of a weight, the value is followed through the ops that hand
    a weight on (views, casts, copies, transposes, slices and splits) to each op that
    consumes it: a site's call (the node ``sites`` name), a shape query or metadata
    assertion (not a reader), a matrix product or an op outside aten (``matmul``), or
    anything else (``other``). A ``call_module`` node reads its module's weights (the
    module is a linear site, a fused torch.nn layer, or another layer).
    """
    acc = Accounting.of(root)
    by_id = {id(p): n for n, p in root.named_parameters(remove_duplicate=False)}
    site_nodes: dict[fx.Node, LinearSite] = {}
    for s in sites:
        if s.node is not None:
            site_nodes[s.node] = s
            if s.experts and s.node.op == "call_function" and s.node.args and isinstance(s.node.args[0], fx.Node) \
                    and s.node.args[0].op == "call_function" and _is_grouped(s.node.args[0]):
                site_nodes[s.node.args[0]] = s  # the grouped matmul an expert term wraps

    from_inputs: set[fx.Node] = set()  # what depends on the model's inputs (topological order: one pass)
    for node in graph.nodes:
        if node.op == "placeholder" or any(a in from_inputs for a in _node_args(node)):
            from_inputs.add(node)

    def visit(start: fx.Node, name: str) -> None:
        seen, todo = {start}, [start]
        while todo:
            cur = todo.pop()
            for user in cur.users:
                if user in seen:
                    continue
                seen.add(user)
                if user in site_nodes:
                    acc.add(name, Reader(site_nodes[user].kind, "site", user.name))
                    continue
                if user.op == "output":
                    acc.add(name, Reader("output", "other", user.name))
                    continue
                if user.op not in ("call_function", "call_method"):
                    acc.add(name, Reader(str(user.target), "other", user.name))
                    continue
                op = op_name(user.op, user.target)
                if op in SHAPE_QUERIES:
                    continue
                if carries_weight(op) and user.args and user.args[0] is cur:
                    todo.append(user)
                    continue
                if user.op == "call_function" and _opaque(user.target):
                    acc.add(name, Reader(op, "matmul", user.name, opaque=True))
                elif is_matmul_like(user.op, user.target):
                    acc.add(name, Reader(op, "matmul", user.name))
                elif user not in from_inputs:
                    # arithmetic on weights alone (a weight rescaled, two weights combined)
                    # is a weight still: follow it to what reads it
                    todo.append(user)
                else:
                    acc.add(name, Reader(op, "other", user.name))

    for node in graph.nodes:
        if node.op == "get_attr":
            value = resolve_attr(root, node.target)
            if isinstance(value, torch.Tensor) and id(value) in by_id:
                visit(node, by_id[id(value)])
        elif node.op == "call_module":
            module = resolve_attr(root, str(node.target))
            if not isinstance(module, nn.Module):
                continue
            if node in site_nodes:
                acc.add(join(str(node.target), "weight"), Reader("nn.Linear", "site", node.name))
                continue
            opaque = _opaque(type(module))
            kind = "matmul" if isinstance(module, _MATMUL_MODULES) or opaque else "other"
            for pname, p in module.named_parameters():
                if id(p) in by_id:
                    acc.add(by_id[id(p)], Reader(type(module).__name__, kind, node.name, opaque=opaque))
    return acc


def _is_grouped(node: fx.Node) -> bool:
    return kind_of(node.op, node.target) in (Kind.GROUPED, Kind.BMM)


def warn_unadapted(model: nn.Module, found: dict[str, str], stacklevel: int) -> None:
    """The one warning naming the weights a matrix product reads that are no sites."""
    if not found:
        return
    params = dict(model.named_parameters(remove_duplicate=False))
    total = sum(p.numel() for p in model.parameters())
    held = sum(params[n].numel() for n in found if n in params)
    listed = ", ".join(f"{name} ({op})" for name, op in found.items())
    warnings.warn(
        f"{len(found)} weight(s) of {type(model).__name__}, {100 * held / max(total, 1):.1f}% of its parameters, "
        f"are read by matmul-like ops that 1LoRA does not adapt: {listed}. They stay frozen and unadapted.",
        category=OneLoRAWarning, stacklevel=stacklevel + 1,
    )
