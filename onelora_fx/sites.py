"""LinearSite: every way a linear layer appears in a graph, found once.

A linear site is a call ``y = x Wᵀ + bias`` (or ``y = x W + bias``) whose weight ``W`` is a
2-D parameter of the module. In a graph it can be

=================================  ======================================================
form                               where it comes from
=================================  ======================================================
``call_module`` on ``nn.Linear``   ``torch.fx.symbolic_trace``
``F.linear`` / ``_C._nn.linear``   functional code, raw parameters (MoE routers)
``aten.linear``                    ``torch.export`` of ``nn.Linear`` / ``F.linear``
``addmm(bias, x, W)``              GPT-2's ``Conv1D`` (``W`` is ``[in, out]``)
``mm`` / ``matmul`` / ``x @ W``    hand-written projections, either layout
=================================  ======================================================

and the weight argument may be the parameter itself or its transpose (``t``,
``transpose(0, 1)``, ``permute([1, 0])``, ``.T``), which decides the layout. Everything
else in onelora_fx (patterns, rewrite, merge, summary, adapters) works from the
:class:`LinearSite` objects this module returns; nothing else inspects graph nodes to
find linears.
"""

from __future__ import annotations

import enum
import operator
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from . import ops

__all__ = ["Layout", "LinearSite", "find_sites", "adapter_name_for", "group_by_weight", "resolve_attr", "ADAPTER_SUFFIX"]

ADAPTER_SUFFIX = "onelora_b"
aten = torch.ops.aten


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
        in_features, out_features: the linear's sizes.
        layout: how the weight is stored (see :class:`Layout`).
        has_bias: the call adds a bias.
        kind: how the call appears (``nn.Linear``, ``F.linear``, ``aten.linear``,
            ``addmm``, ``mm``, ``matmul``, ``module`` for a module-level fallback).
        is_head: the call is the model's output head (see :func:`find_sites`).
        call_index, calls: this is call ``call_index`` of ``calls`` calls of the weight
            (a layer called twice, or a weight tied to another linear).
        adapted: the call already carries a 1LoRA vector.
        selected: chosen by the pattern in effect (``transform``'s, or ``sites``').
        dtype, device: the weight's.
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
    # The graph handles; everything that touches the graph goes through these.
    node: Optional[fx.Node] = field(default=None, compare=False, repr=False)
    input: Optional[fx.Node] = field(default=None, compare=False, repr=False)
    weight_arg: Optional[fx.Node] = field(default=None, compare=False, repr=False)
    bias_arg: Optional[fx.Node] = field(default=None, compare=False, repr=False)
    #: the weight argument is ``[in, out]`` as the call sees it (``ops.linear``'s flag)
    arg_transposed: bool = field(default=False, compare=False, repr=False)
    weight: Optional[torch.Tensor] = field(default=None, compare=False, repr=False)


def adapter_name_for(owner: str, attr: str) -> str:
    """``encoder.q.weight`` -> ``encoder.q.onelora_b``; ``experts.w1`` -> ``experts.w1_onelora_b``."""
    leaf = ADAPTER_SUFFIX if attr == "weight" else f"{attr}_{ADAPTER_SUFFIX}"
    return f"{owner}.{leaf}" if owner else leaf


# ---------------------------------------------------------------------------------
# Recognising one call


@dataclass
class _Call:
    kind: str
    x: fx.Node
    weight_arg: Optional[fx.Node]
    bias_arg: Any
    arg_transposed: bool  # the weight argument is [in, out]
    owner_hint: Optional[str] = None  # call_module target
    b_arg: Optional[fx.Node] = None  # adapted calls


_LINEAR_FNS = {F.linear: "F.linear", torch._C._nn.linear: "F.linear", aten.linear.default: "aten.linear"}
_ADDMM_FNS = {torch.addmm: "addmm", aten.addmm.default: "addmm"}
_MM_FNS = {
    torch.mm: "mm",
    aten.mm.default: "mm",
    torch.matmul: "matmul",
    operator.matmul: "matmul",
    aten.matmul.default: "matmul",
}
_MM_METHODS = {"mm": "mm", "matmul": "matmul", "__matmul__": "matmul"}


def _arg(node: fx.Node, pos: int, kw: str, default: Any = None) -> Any:
    if kw in node.kwargs:
        return node.kwargs[kw]
    return node.args[pos] if len(node.args) > pos else default


def _match_call(gm: fx.GraphModule, node: fx.Node) -> Optional[_Call]:
    """The linear call ``node`` makes, if any (not yet checked for a parameter weight)."""
    if node.op == "call_module":
        mod = resolve_attr(gm, node.target)
        if isinstance(mod, nn.Linear) and node.args:
            return _Call("nn.Linear", node.args[0], None, None, False, owner_hint=node.target)
        return None
    if node.op == "call_function":
        t = node.target
        if t is ops.linear:
            return _Call(
                "onelora",
                node.args[0],
                node.args[1],
                node.args[2],
                bool(_arg(node, 4, "transposed", False)),
                b_arg=node.args[3],
            )
        if t in _LINEAR_FNS:
            return _Call(_LINEAR_FNS[t], _arg(node, 0, "input"), _arg(node, 1, "weight"), _arg(node, 2, "bias"), False)
        if t in _ADDMM_FNS:
            if _arg(node, 3, "beta", 1) != 1 or _arg(node, 4, "alpha", 1) != 1:
                return None
            return _Call("addmm", _arg(node, 1, "mat1"), _arg(node, 2, "mat2"), _arg(node, 0, "input"), True)
        if t in _MM_FNS:
            return _Call(_MM_FNS[t], _arg(node, 0, "input"), _arg(node, 1, "other" if "matmul" in _MM_FNS[t] else "mat2"), None, True)
        return None
    if node.op == "call_method":
        if node.target in _MM_METHODS and len(node.args) == 2:
            return _Call(_MM_METHODS[node.target], node.args[0], node.args[1], None, True)
        if node.target == "addmm" and len(node.args) == 3 and not node.kwargs:
            return _Call("addmm", node.args[1], node.args[2], node.args[0], True)
    return None


_TRANSPOSES_FN = {aten.t.default, torch.t}
_TRANSPOSE_FN = {aten.transpose.int, torch.transpose}
_PERMUTE_FN = {aten.permute.default, torch.permute}


def _is_swap(dims: Any) -> bool:
    return isinstance(dims, (list, tuple)) and len(dims) == 2 and sorted(d % 2 for d in dims) == [0, 1]


def _unwrap_transpose(node: fx.Node) -> Optional[fx.Node]:
    """``t(W)`` / ``W.transpose(0, 1)`` / ``W.permute(1, 0)`` / ``W.T`` -> ``W``."""
    if node.op == "call_function":
        t = node.target
        if t in _TRANSPOSES_FN and len(node.args) == 1:
            return node.args[0]
        if t in _TRANSPOSE_FN and len(node.args) == 3 and _is_swap(node.args[1:]):
            return node.args[0]
        if t in _PERMUTE_FN and len(node.args) == 2 and _is_swap(node.args[1]):
            return node.args[0]
        if t is getattr and len(node.args) == 2 and node.args[1] in ("T", "mT"):
            return node.args[0]
    if node.op == "call_method":
        if node.target == "t" and len(node.args) == 1:
            return node.args[0]
        if node.target == "transpose" and len(node.args) == 3 and _is_swap(node.args[1:]):
            return node.args[0]
        if node.target == "permute" and len(node.args) in (2, 3):
            dims = node.args[1] if len(node.args) == 2 else node.args[1:]
            if _is_swap(dims):
                return node.args[0]
    return None


def resolve_attr(root: nn.Module, target: str) -> Any:
    """The object at a dotted attribute path (``get_attr`` target), or None."""
    obj: Any = root
    for part in str(target).split("."):
        if not part:
            continue
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _param_of(gm: fx.GraphModule, arg: Any) -> Optional[tuple[str, torch.Tensor, bool]]:
    """``(target, parameter, flipped)`` behind a weight argument, or None."""
    if not isinstance(arg, fx.Node):
        return None
    flipped = False
    inner = _unwrap_transpose(arg)
    if inner is not None and isinstance(inner, fx.Node):
        arg, flipped = inner, True
    if arg.op != "get_attr":
        return None
    value = resolve_attr(gm, arg.target)
    if isinstance(value, nn.Parameter) and value.dim() == 2:
        return str(arg.target), value, flipped
    return None


def _owner_of(gm: fx.GraphModule, node: fx.Node, target: str, tensor: torch.Tensor) -> tuple[str, str]:
    """Module path and attribute of a weight, as the model names it.

    Tied weights have several names (GPT-2's ``lm_head.weight`` is
    ``transformer.wte.weight``) and export keeps only one of them in the graph; the
    module that makes the call knows the right one, so ask it first.
    """
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        path = path if isinstance(path, str) else ""
        mod = resolve_attr(gm, path) if path else None
        if isinstance(mod, nn.Module):
            for attr, p in mod._parameters.items():
                if p is tensor:
                    return path, attr
    owner, _, attr = target.rpartition(".")
    return owner, attr


# ---------------------------------------------------------------------------------
# The output head


# Ops through which a projection's output still "is" the model output: shape, cast,
# activation, dropout, copies. Matched by name so aten, torch, F and Tensor-method
# spellings of the same op all count.
_PASS_THROUGH = {
    "view", "_unsafe_view", "reshape", "permute", "transpose", "t", "expand", "squeeze",
    "unsqueeze", "flatten", "unflatten", "slice", "select", "narrow", "split",
    "split_with_sizes", "chunk", "unbind", "getitem", "alias", "detach", "contiguous",
    "clone", "to", "_to_copy", "type", "float", "double", "half", "bfloat16", "relu",
    "gelu", "silu", "sigmoid", "tanh", "softmax", "_softmax", "log_softmax",
    "_log_softmax", "softplus", "elu", "leaky_relu", "hardtanh", "mish", "dropout",
    "feature_dropout", "lift_fresh_copy", "movedim", "swapaxes", "view_as", "reshape_as",
}
_PASS_THROUGH_MODULES = (
    nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.ReLU, nn.GELU, nn.SiLU,
    nn.Sigmoid, nn.Tanh, nn.Softmax, nn.LogSoftmax, nn.Softplus, nn.ELU, nn.LeakyReLU,
)
_SHAPE_QUERIES = {"sym_size", "size", "numel", "dim", "sym_numel", "sym_stride", "stride", "_assert_tensor_metadata"}


def _op_name(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_method":
        return str(t)
    if isinstance(t, torch._ops.OpOverload):
        return t.overloadpacket.__name__
    return getattr(t, "__name__", str(t))


def _passes_through(gm: fx.GraphModule, user: fx.Node) -> bool:
    if user.op == "call_module":
        return isinstance(resolve_attr(gm, user.target), _PASS_THROUGH_MODULES)
    if user.op not in ("call_function", "call_method"):
        return False
    name = _op_name(user)
    if name == "einsum":  # one operand: a permutation
        operands = user.args[1] if len(user.args) == 2 and isinstance(user.args[1], (list, tuple)) else user.args[1:]
        return len(operands) == 1
    return name in _PASS_THROUGH


def _is_head(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Does ``node``'s value reach the graph output through pass-through ops only?"""
    seen = {node}
    todo = [node]
    while todo:
        cur = todo.pop()
        for user in cur.users:
            if user in seen:
                continue
            seen.add(user)
            if user.op == "output":
                return True
            if _op_name(user) in _SHAPE_QUERIES:
                continue
            if _passes_through(gm, user):
                todo.append(user)
    return False


# ---------------------------------------------------------------------------------


def find_sites(gm: fx.GraphModule) -> list[LinearSite]:
    """Every linear site of a captured or adapted module, in graph order.

    The output head: a site is a head when its output reaches a graph output through
    shape, cast, activation and dropout ops only (``view``, ``permute``, ``to``,
    ``softmax``, ``tanh``, ...). ``lm_head`` -> logits and a ViT ``classifier`` are
    heads; the last block's ``down_proj`` is not (its output is added to the residual
    stream), nor is any projection followed by a norm, another linear or an add.

    Example:
        >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)))
        >>> [(s.name, s.is_head) for s in find_sites(gm)]
        [('0', False), ('1', True)]
    """
    found: list[tuple[fx.Node, _Call, str, torch.Tensor, bool]] = []
    for node in gm.graph.nodes:
        call = _match_call(gm, node)
        if call is None or not isinstance(call.x, fx.Node):
            continue
        if call.x.op == "get_attr":  # param @ param is not a layer applied to data
            continue
        if call.owner_hint is not None:
            weight = resolve_attr(gm, call.owner_hint).weight
            if isinstance(weight, nn.Parameter) and weight.dim() == 2:
                found.append((node, call, f"{call.owner_hint}.weight", weight, False))
            continue
        resolved = _param_of(gm, call.weight_arg)
        if resolved is None:
            continue
        target, weight, flipped = resolved
        if call.bias_arg is not None and not _is_bias_for(gm, call.bias_arg, weight, call.arg_transposed != flipped):
            continue
        found.append((node, call, target, weight, flipped))

    counts: dict[int, int] = {}
    for _, _, _, w, _ in found:
        counts[id(w)] = counts.get(id(w), 0) + 1
    seen: dict[int, int] = {}
    first_owner: dict[int, tuple[str, str]] = {}
    sites = []
    for node, call, target, weight, flipped in found:
        if call.owner_hint is not None:
            owner, attr = call.owner_hint, "weight"
        else:
            owner, attr = _owner_of(gm, node, target, weight)
        # one b per weight: its name comes from the weight's first call
        first_owner.setdefault(id(weight), (owner, attr))
        b_owner, b_attr = first_owner[id(weight)]
        param_in_out = call.arg_transposed != flipped
        layout = Layout.IN_OUT if param_in_out else Layout.OUT_IN
        out_f, in_f = (weight.shape[1], weight.shape[0]) if param_in_out else (weight.shape[0], weight.shape[1])
        index = seen.get(id(weight), 0)
        seen[id(weight)] = index + 1
        adapted = call.kind == "onelora"
        kind = node.meta.get("onelora_kind", "onelora") if adapted else call.kind
        adapter = str(call.b_arg.target) if adapted and isinstance(call.b_arg, fx.Node) else adapter_name_for(b_owner, b_attr)
        sites.append(
            LinearSite(
                name=owner if attr == "weight" else f"{owner}.{attr}" if owner else attr,
                weight_name=f"{owner}.{attr}" if owner else attr,
                owner=owner,
                attr=attr,
                adapter_name=adapter,
                in_features=int(in_f),
                out_features=int(out_f),
                layout=layout,
                has_bias=call.bias_arg is not None
                or (call.owner_hint is not None and resolve_attr(gm, call.owner_hint).bias is not None),
                kind=kind,
                is_head=_is_head(gm, node),
                call_index=index,
                calls=counts[id(weight)],
                adapted=adapted,
                dtype=weight.dtype,
                device=weight.device,
                node=node,
                input=call.x,
                weight_arg=call.weight_arg,
                bias_arg=call.bias_arg,
                arg_transposed=call.arg_transposed,
                weight=weight,
            )
        )
    return sites


def _is_bias_for(gm: fx.GraphModule, arg: Any, weight: torch.Tensor, param_in_out: bool) -> bool:
    """A bias is a 1-D vector of ``out_features`` (addmm's ``input`` may be anything)."""
    out_f = weight.shape[1] if param_in_out else weight.shape[0]
    if isinstance(arg, fx.Node):
        if arg.op == "get_attr":
            value = resolve_attr(gm, arg.target)
        else:
            value = arg.meta.get("val")
        return isinstance(value, torch.Tensor) and value.dim() == 1 and value.shape[0] == out_f
    return False


def group_by_weight(sites: Iterable[LinearSite]) -> dict[str, list[LinearSite]]:
    """Sites keyed by the ``b`` they share (one per weight)."""
    groups: dict[str, list[LinearSite]] = {}
    for s in sites:
        groups.setdefault(s.adapter_name, []).append(s)
    return groups
