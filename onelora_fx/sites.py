"""LinearSite: every way a linear layer appears in a graph, found once.

A linear site is a call ``y = x Wᵀ + bias`` (or ``y = x W + bias``) whose weight ``W``
is a parameter of the module: 2-D for a layer, 3-D ``[E, out, in]`` / ``[E, in, out]``
for the experts of a mixture-of-experts layer applied by a grouped matmul (one site,
``experts=E``). The ops that can make such a call, and where their operands are, are
the table in :mod:`onelora_fx.linear_ops`; ``call_module`` on ``nn.Linear`` (what
``symbolic_trace`` leaves) is the one more form. The weight argument may be the
parameter itself or its transpose, which decides the layout.

:func:`find_sites` reads a graph once; patterns, the rewrite, merge, summaries and
adapter files all work from the :class:`LinearSite` objects it returns.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
from torch import fx, nn

from . import ops
from .compat import module_stack
from .heads import HeadRule
from .linear_ops import op_name, read_call, unwrap_transpose
from .norms import norm_feeding

__all__ = [
    "Layout", "LinearSite", "find_sites", "adapter_name_for", "group_by_weight", "resolve_attr",
    "join", "ADAPTER_SUFFIX",
]

ADAPTER_SUFFIX = "onelora_b"


class Layout(str, enum.Enum):
    """How a weight is stored."""

    #: ``[out, in]``, ``y = x Wᵀ`` (``nn.Linear``); merge folds ``W + b[:, None]``
    OUT_IN = "out_in"
    #: ``[in, out]``, ``y = x W`` (GPT-2 ``Conv1D``, ``x @ W``); merge folds ``W + b[None, :]``
    IN_OUT = "in_out"


@dataclass(frozen=True)
class LinearSite:
    """One linear call in a captured (or adapted) module.

    Attributes:
        name: what patterns match: the module path of the weight's owner, plus
            ``.<attr>`` when the weight is not called ``weight`` (``experts.w1``).
        weight_name: the weight's fully qualified name, as in ``state_dict()``.
        owner, attr: ``weight_name`` split at its last dot.
        adapter_name: where this weight's ``b`` lives (``<owner>.onelora_b``, or
            ``<owner>.<attr>_onelora_b``); one per weight, shared by all its calls.
        in_features, out_features: the linear's sizes (per expert for expert weights).
        layout: how the weight is stored (see :class:`Layout`).
        has_bias: the call adds a bias.
        kind: how the call appears (``nn.Linear``, ``linear``, ``addmm``, ``mm``,
            ``matmul``, ``grouped_mm``, ``module`` for a layer of the module form).
        is_head: the call is the model's output head (see :mod:`onelora_fx.heads`).
        call_index, calls: this is call ``call_index`` of ``calls`` calls of the weight
            (a layer called twice, or a weight tied to another linear).
        adapted: the call already carries a 1LoRA vector.
        selected: chosen by the pattern in effect (``transform``'s, or ``sites``').
        dtype, device: the weight's.
        experts: ``E`` for an expert weight ``[E, ...]`` (``b`` is then ``[E, out]``),
            else None.
        caller: the module path whose forward makes the call (where the module form
            intercepts it).
        norm: the LayerNorm whose output this call reads directly (through shape ops
            and dropout only), as that norm's module path, or None.
        norm_scale_cv: how far that LayerNorm's scale is from uniform (coefficient of
            variation of ``γ``; None when unknown, e.g. on the meta device).
    """

    name: str
    weight_name: str
    owner: str
    attr: str
    adapter_name: str
    in_features: int
    out_features: int
    layout: Layout
    has_bias: bool
    kind: str
    is_head: bool = False
    call_index: int = 0
    calls: int = 1
    adapted: bool = False
    selected: bool = False
    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")
    experts: Optional[int] = None
    caller: str = ""
    norm: Optional[str] = None
    norm_scale_cv: Optional[float] = None
    # The graph handles; everything that touches the graph goes through these.
    node: Optional[fx.Node] = field(default=None, compare=False, repr=False)
    input: Optional[fx.Node] = field(default=None, compare=False, repr=False)
    weight_arg: Optional[fx.Node] = field(default=None, compare=False, repr=False)
    bias_arg: Optional[fx.Node] = field(default=None, compare=False, repr=False)
    offsets_arg: Optional[fx.Node] = field(default=None, compare=False, repr=False)
    #: the weight argument is ``[in, out]`` as the call sees it (``ops.linear``'s flag)
    arg_transposed: bool = field(default=False, compare=False, repr=False)
    weight: Optional[torch.Tensor] = field(default=None, compare=False, repr=False)


def join(prefix: str, name: str) -> str:
    """``join("encoder.q", "weight") == "encoder.q.weight"``; an empty prefix adds nothing."""
    return f"{prefix}.{name}" if prefix else name


def adapter_name_for(owner: str, attr: str) -> str:
    """``encoder.q.weight`` -> ``encoder.q.onelora_b``; ``experts.w1`` -> ``experts.w1_onelora_b``."""
    return join(owner, ADAPTER_SUFFIX if attr == "weight" else f"{attr}_{ADAPTER_SUFFIX}")


def resolve_attr(root: nn.Module, target: str) -> Any:
    """The object at a dotted attribute path (``get_attr`` target), or None."""
    obj: Any = root
    for part in str(target).split("."):
        if part:
            obj = getattr(obj, part, None)
            if obj is None:
                return None
    return obj


# ---------------------------------------------------------------------------------
# Recognising one call


@dataclass
class _Found:
    node: fx.Node
    kind: str
    x: fx.Node
    weight_arg: Optional[fx.Node]
    bias_arg: Any
    offsets: Optional[fx.Node]
    arg_transposed: bool
    target: str  # the weight's get_attr target (or module path + ".weight")
    weight: torch.Tensor
    flipped: bool
    b_arg: Optional[fx.Node] = None


# ops a weight may pass through on its way to a linear call without changing what it is
_CASTS = {"to", "_to_copy", "type", "float", "half", "bfloat16", "contiguous", "alias", "detach"}


def _uncast(arg: Any) -> Any:
    while isinstance(arg, fx.Node) and arg.op in ("call_function", "call_method") and arg.args \
            and op_name(arg.op, arg.target) in _CASTS and isinstance(arg.args[0], fx.Node):
        arg = arg.args[0]
    return arg


def _param_of(root: nn.Module, arg: Any, ndim: int) -> Optional[tuple[str, torch.Tensor, bool]]:
    """``(target, parameter, flipped)`` behind a weight argument (the parameter itself,
    transposed, or cast: ``W.float().t()``), or None."""
    arg = _uncast(arg)
    if not isinstance(arg, fx.Node):
        return None
    flipped = False
    inner = unwrap_transpose(arg.op, arg.target, arg.args, ndim)
    if isinstance(inner, fx.Node):
        arg, flipped = _uncast(inner), True
    if arg.op != "get_attr":
        return None
    value = resolve_attr(root, arg.target)
    if isinstance(value, nn.Parameter) and value.dim() == ndim:
        return str(arg.target), value, flipped
    return None


def _is_bias_for(root: nn.Module, arg: Any, out_features: int) -> bool:
    """A bias is a 1-D vector of ``out_features`` (addmm's ``input`` may be anything)."""
    if not isinstance(arg, fx.Node):
        return False
    value = resolve_attr(root, arg.target) if arg.op == "get_attr" else arg.meta.get("val")
    return isinstance(value, torch.Tensor) and value.dim() == 1 and value.shape[0] == out_features


def _match(root: nn.Module, node: fx.Node) -> Optional[_Found]:
    """The linear site ``node`` is, if any."""
    if node.op == "call_module":
        mod = resolve_attr(root, node.target)
        weight = getattr(mod, "weight", None)
        if isinstance(mod, nn.Linear) and node.args and isinstance(weight, nn.Parameter) and weight.dim() == 2:
            return _Found(node, "nn.Linear", node.args[0], None, None, None, False, join(str(node.target), "weight"), weight, False)
        return None
    if node.op == "call_function" and node.target in (ops.linear, ops.linear_rows):  # adapted (one b, or a stack)
        transposed = bool(node.kwargs.get("transposed", False))
        found = _param_of(root, node.args[1], 2)
        if found is None:
            return None
        target, weight, flipped = found
        return _Found(node, "onelora", node.args[0], node.args[1], node.args[2], None, transposed, target, weight, flipped, node.args[3])
    if node.op == "call_function" and node.target is ops.expert_term:
        base = _match(root, node.args[0]) if isinstance(node.args[0], fx.Node) else None
        if base is None:
            return None
        base.node, base.b_arg, base.kind = node, node.args[3], "onelora"
        return base
    call = read_call(node.op, node.target, node.args, node.kwargs)
    if call is None or not isinstance(call.x, fx.Node) or call.x.op == "get_attr":
        return None  # param @ param is not a layer applied to data
    ndim = 3 if call.offsets is not None else 2
    found = _param_of(root, call.weight, ndim)
    if found is None:
        return None
    target, weight, flipped = found
    in_out = call.weight_in_out != flipped
    if call.bias is not None and not _is_bias_for(root, call.bias, weight.shape[-1] if in_out else weight.shape[-2]):
        return None
    return _Found(node, call.kind.value, call.x, call.weight, call.bias, call.offsets, call.weight_in_out, target, weight, flipped)


def _owner_of(root: nn.Module, f: _Found) -> tuple[str, str, str]:
    """``(owner, attr, caller)``: the weight's module path and attribute, as the model
    names them, and the module whose forward makes the call.

    Tied weights have several names (GPT-2's ``lm_head.weight`` is
    ``transformer.wte.weight``) and export keeps only one of them in the graph; the
    module that makes the call knows the right one, so ask it first.
    """
    if f.kind == "nn.Linear":
        return f.target.rpartition(".")[0], "weight", f.target.rpartition(".")[0]
    stack = module_stack(f.node)
    caller = stack[-1] if stack else ""
    mod = resolve_attr(root, caller) if caller else None
    if isinstance(mod, nn.Module):
        for attr, p in mod._parameters.items():
            if p is f.weight:
                return caller, attr, caller
    owner, _, attr = f.target.rpartition(".")
    return owner, attr, caller  # "" when the root's own forward makes the call


# ---------------------------------------------------------------------------------


def _site(root: nn.Module, f: _Found, vector: str, is_head: bool, index: int, calls: int) -> LinearSite:
    """The :class:`LinearSite` of one matched call."""
    owner, attr, caller = _owner_of(root, f)
    in_out = f.arg_transposed != f.flipped
    out_f, in_f = (f.weight.shape[-1], f.weight.shape[-2]) if in_out else (f.weight.shape[-2], f.weight.shape[-1])
    adapted = f.b_arg is not None
    norm, cv = norm_feeding(root, f.x)
    return LinearSite(
        name=owner if attr == "weight" else join(owner, attr), weight_name=join(owner, attr), owner=owner, attr=attr,
        adapter_name=str(f.b_arg.target) if adapted and isinstance(f.b_arg, fx.Node) else vector,
        in_features=int(in_f), out_features=int(out_f), layout=Layout.IN_OUT if in_out else Layout.OUT_IN,
        has_bias=f.bias_arg is not None or (f.kind == "nn.Linear" and resolve_attr(root, owner).bias is not None),
        kind=f.node.meta.get("onelora_kind", f.kind) if adapted else f.kind, is_head=is_head, call_index=index,
        calls=calls, adapted=adapted, dtype=f.weight.dtype, device=f.weight.device,
        experts=int(f.weight.shape[0]) if f.weight.dim() == 3 else None, caller=caller, norm=norm, norm_scale_cv=cv,
        node=f.node, input=f.x, weight_arg=f.weight_arg, bias_arg=f.bias_arg, offsets_arg=f.offsets,
        arg_transposed=f.arg_transposed, weight=f.weight,
    )


def find_sites(root: nn.Module, graph: Optional[fx.Graph] = None) -> list[LinearSite]:
    """Every linear site of a captured or adapted graph, in graph order.

    ``root`` is the module the graph's ``get_attr`` targets name (a GraphModule is its
    own root and graph). The output head follows :mod:`onelora_fx.heads`. Each weight
    has one ``b``, named after the weight's first call.

    Example:
        >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)))
        >>> [(s.name, s.is_head) for s in find_sites(gm)]
        [('0', False), ('1', True)]
    """
    graph = root.graph if graph is None else graph
    # a grouped matmul wrapped by an expert term is that term's site, not one of its own
    wrapped = {n.args[0] for n in graph.nodes if n.op == "call_function" and n.target is ops.expert_term}
    found = [f for f in (_match(root, n) for n in graph.nodes if n not in wrapped) if f is not None]
    calls: dict[int, list[_Found]] = {}
    for f in found:
        calls.setdefault(id(f.weight), []).append(f)
    heads = HeadRule(graph, lambda target: resolve_attr(root, target))
    vector = {w: adapter_name_for(*_owner_of(root, group[0])[:2]) for w, group in calls.items()}
    return [
        _site(root, f, vector[id(f.weight)], heads.is_head(f.node), calls[id(f.weight)].index(f), len(calls[id(f.weight)]))
        for f in found
    ]


def group_by_weight(sites: Iterable[LinearSite]) -> dict[str, list[LinearSite]]:
    """Sites keyed by the ``b`` they share (one per weight)."""
    groups: dict[str, list[LinearSite]] = {}
    for s in sites:
        groups.setdefault(s.adapter_name, []).append(s)
    return groups
