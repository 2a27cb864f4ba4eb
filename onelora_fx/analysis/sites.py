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

import operator
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
from torch import fx, nn

from .. import ops
from ..compat import module_stack
from ..records import Layout, LinearSite, adapter_name_for, join, resolve_attr
from .heads import HeadRule
from .flow import CASTS, COPIES, SPLITS
from .linear_ops import Kind, op_name, read_call, unwrap_transpose
from .norms import norm_feeding

__all__ = ["find_sites", "group_by_weight", "handles"]

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
    #: the output rows of the weight the call reads (a piece of a packed weight)
    rows: Optional[tuple[int, int]] = None


@dataclass
class _Path:
    """How a weight argument comes from a parameter: ``target`` (its ``get_attr``), the
    parameter, whether the argument is its transpose, and the block of each stored
    dimension the argument keeps (``{dim: (start, stop)}``, only the sliced ones)."""

    target: str
    param: torch.Tensor
    flipped: bool
    blocks: dict[int, tuple[int, int]]


def _norm_dim(dim: Any, ndim: int) -> Optional[int]:
    return dim % ndim if isinstance(dim, int) and ndim else None


def _block(node: fx.Node, name: str, size: int) -> Optional[tuple[int, int]]:
    """``(start, stop)`` a slicing node keeps of its input's sliced dimension (``size``
    elements), or None when it is not a plain contiguous block."""
    args = list(node.args)
    if name == "slice":  # aten.slice.Tensor(x, dim=0, start=None, end=None, step=1)
        start, end, step = (args[2:] + [None, None, 1][len(args) - 2:])[:3] if len(args) >= 2 else (None, None, 1)
        if step not in (None, 1) or not all(v is None or isinstance(v, int) for v in (start, end)):
            return None
        return slice(start, end).indices(size)[:2]
    if name == "narrow" and len(args) == 4 and isinstance(args[2], int) and isinstance(args[3], int):
        return args[2], args[2] + args[3]
    return None


def _pieces(node: fx.Node, name: str, size: int) -> Optional[list[tuple[int, int]]]:
    """The ``(start, stop)`` of each piece of a split: ``split_with_sizes``, ``split``
    (sizes or one size), ``chunk``."""
    args, kwargs = list(node.args), dict(node.kwargs)
    how = args[1] if len(args) > 1 else kwargs.get("split_size_or_sections", kwargs.get("split_sizes", kwargs.get("chunks")))
    if name in ("split", "split_with_sizes") and isinstance(how, (list, tuple)):
        sizes = list(how)
    elif name == "split" and isinstance(how, int) and how > 0:
        sizes = [min(how, size - i) for i in range(0, size, how)]
    elif name == "chunk" and isinstance(how, int) and how > 0:
        step = -(-size // how)
        sizes = [min(step, size - i) for i in range(0, size, step)]
    else:
        return None
    if not all(isinstance(n, int) for n in sizes) or sum(sizes) != size:
        return None
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [(a, a + n) for a, n in zip(starts, sizes)]


def _split_dim(node: fx.Node, ndim: int) -> Optional[int]:
    dim = dict(node.kwargs).get("dim", node.args[2] if len(node.args) > 2 else 0)
    return _norm_dim(dim, ndim)


def _weight_path(root: nn.Module, arg: Any, ndim: int) -> Optional[_Path]:
    """The parameter behind a weight argument, through casts and copies, transposes of
    the last two dimensions, and blocks of rows or columns (``W[a:b]``, ``narrow``, a
    piece of ``split`` / ``chunk``); None when the argument is not such a view of a
    parameter of ``ndim`` dimensions."""
    steps: list[tuple] = []  # from the argument back to the parameter
    node = arg
    for _ in range(16):
        if not isinstance(node, fx.Node):
            return None
        if node.op == "get_attr":
            break
        if node.op not in ("call_function", "call_method") or not node.args:
            return None
        name = op_name(node.op, node.target)
        source = node.args[0]
        if name in CASTS or name in COPIES or name == "alias":
            node = source
            continue
        inner = unwrap_transpose(node.op, node.target, node.args, ndim)
        if isinstance(inner, fx.Node):
            steps.append(("t",))
            node = inner
            continue
        if name in ("getitem", "__getitem__") and len(node.args) == 2:
            index = node.args[1]
            if isinstance(source, fx.Node) and source.op in ("call_function", "call_method") \
                    and op_name(source.op, source.target) in SPLITS and isinstance(index, int):
                steps.append(("piece", source, op_name(source.op, source.target), index))
                node = source.args[0] if source.args else None
                continue
            index = index if isinstance(index, tuple) else (index,)
            if not all(isinstance(i, slice) for i in index) or len(index) > ndim:
                return None
            steps.append(("index", index))
            node = source
            continue
        if name in ("slice", "narrow"):
            steps.append(("block", node, name))
            node = source
            continue
        return None
    else:
        return None
    value = resolve_attr(root, node.target)
    if not (isinstance(value, nn.Parameter) and value.dim() == ndim):
        return None
    # replay from the parameter: which stored dimension each position is, what is kept
    perm = list(range(ndim))
    shape = list(value.shape)
    blocks: dict[int, tuple[int, int]] = {}

    def keep(position: int, span: Optional[tuple[int, int]]) -> bool:
        if span is None or not 0 <= span[0] <= span[1] <= shape[position]:
            return False
        if span == (0, shape[position]):
            return True
        dim = perm[position]
        base = blocks.get(dim, (0, value.shape[dim]))[0]
        blocks[dim] = (base + span[0], base + span[1])
        shape[position] = span[1] - span[0]
        return True

    for step in reversed(steps):
        if step[0] == "t":
            perm[-2:], shape[-2:] = perm[-2:][::-1], shape[-2:][::-1]
        elif step[0] == "index":
            for position, sl in enumerate(step[1]):
                ok = sl.step in (None, 1) and all(v is None or isinstance(v, int) for v in (sl.start, sl.stop))
                if not ok or not keep(position, slice(sl.start, sl.stop).indices(shape[position])[:2]):
                    return None
        elif step[0] == "block":
            node_, name = step[1], step[2]
            dim = _norm_dim(node_.args[1] if len(node_.args) > 1 else node_.kwargs.get("dim", 0), ndim)
            if dim is None or not keep(dim, _block(node_, name, shape[dim])):
                return None
        else:  # a piece of a split
            _, split, name, index = step
            dim = _split_dim(split, ndim)
            pieces = _pieces(split, name, shape[dim]) if dim is not None else None
            if pieces is None or not 0 <= index < len(pieces) or not keep(dim, pieces[index]):
                return None
    return _Path(str(node.target), value, perm[-2:] != sorted(perm[-2:]), blocks)


def _param_of(root: nn.Module, arg: Any, ndim: int) -> Optional[tuple[str, torch.Tensor, bool]]:
    """``(target, parameter, flipped)`` behind a weight argument that is the whole
    parameter (cast, copied or transposed: ``W.float().t()``), or None."""
    path = _weight_path(root, arg, ndim)
    return None if path is None or path.blocks else (path.target, path.param, path.flipped)


def _length(root: nn.Module, arg: Any) -> Optional[int]:
    """The length of a 1-D argument (a bias): its recorded shape, or the block of a
    bias parameter it is."""
    value = arg.meta.get("val") if isinstance(arg, fx.Node) else None
    if isinstance(value, torch.Tensor):
        return int(value.shape[0]) if value.dim() == 1 else None
    path = _weight_path(root, arg, 1)
    if path is None:
        return None
    start, stop = path.blocks.get(0, (0, path.param.shape[0]))
    return stop - start


def _is_bias_for(root: nn.Module, arg: Any, out_features: int) -> bool:
    """A bias is a 1-D vector of ``out_features`` (addmm's ``input`` may be anything)."""
    return isinstance(arg, fx.Node) and _length(root, arg) == out_features


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
        found = _found(root, node, "onelora", node.args[0], node.args[1], node.args[2], None, transposed, 2)
        if found is not None:
            b = node.args[3]  # the vector, or the rows of it a sliced call reads
            found.b_arg = b.args[0] if isinstance(b, fx.Node) and b.op == "call_function" and b.target is operator.getitem else b
        return found
    if node.op == "call_function" and node.target is ops.expert_term:
        base = _match(root, node.args[0]) if isinstance(node.args[0], fx.Node) else None
        if base is None:
            return None
        base.node, base.b_arg, base.kind = node, node.args[3], "onelora"
        return base
    call = read_call(node.op, node.target, node.args, node.kwargs)
    if call is None or not isinstance(call.x, fx.Node) or call.x.op == "get_attr":
        return None  # param @ param is not a layer applied to data
    ndim = 3 if call.offsets is not None or call.kind is Kind.BMM else 2
    return _found(root, node, call.kind.value, call.x, call.weight, call.bias, call.offsets, call.weight_in_out, ndim)


def _found(root: nn.Module, node: fx.Node, kind: str, x: Any, weight_arg: Any, bias: Any, offsets: Any,
           weight_in_out: bool, ndim: int) -> Optional[_Found]:
    """A call that reads ``weight_arg`` as its weight is a site when that argument is a
    parameter, its transpose or cast, or a block of its output rows (the block of ``b``
    it then uses is the same)."""
    path = _weight_path(root, weight_arg, ndim)
    if path is None:
        return None
    in_out = weight_in_out != path.flipped
    out_dim, in_dim = (ndim - 1, ndim - 2) if in_out else (ndim - 2, ndim - 1)
    if in_dim in path.blocks or any(d not in (out_dim, in_dim) for d in path.blocks):
        return None  # a block of the input features (or of the experts) is no linear layer of this weight
    rows = path.blocks.get(out_dim)
    out_features = (rows[1] - rows[0]) if rows else path.param.shape[out_dim]
    # F.linear's third argument is its bias whatever computes it (EVA and BEiT pass
    # cat(q_bias, k_bias, v_bias)); symbolic_trace records no shapes, so its length may
    # be unknown here. addmm's input may be anything (a residual): it must be a bias.
    computed = kind in (Kind.LINEAR.value, "onelora") and isinstance(bias, fx.Node) and _length(root, bias) is None
    if bias is not None and not computed and not _is_bias_for(root, bias, out_features):
        return None
    return _Found(node, kind, x, weight_arg, bias, offsets, weight_in_out, path.target, path.param, path.flipped, rows=rows)


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
    adapted = f.b_arg is not None
    norm, cv = norm_feeding(root, f.x)
    return LinearSite.of(
        owner, attr, f.weight, Layout.IN_OUT if in_out else Layout.OUT_IN,
        f.node.meta.get("onelora_kind", f.kind) if adapted else f.kind,
        adapter_name=str(f.b_arg.target) if adapted and isinstance(f.b_arg, fx.Node) else vector,
        has_bias=f.bias_arg is not None or (f.kind == "nn.Linear" and resolve_attr(root, owner).bias is not None),
        is_head=is_head, call_index=index, calls=calls, adapted=adapted, caller=caller, norm=norm, norm_scale_cv=cv,
        rows=f.rows, node=f.node, input=f.x, weight_arg=f.weight_arg, bias_arg=f.bias_arg, offsets_arg=f.offsets,
        arg_transposed=f.arg_transposed,
    )


def find_sites(root: nn.Module, graph: Optional[fx.Graph] = None) -> list[LinearSite]:
    """Every linear site of a captured or adapted graph, in graph order.

    ``root`` is the module the graph's ``get_attr`` targets name (a GraphModule is its
    own root and graph). The output head follows :mod:`onelora_fx.heads`. Each weight
    has one ``b``, named after the weight's first call.

    Examples:
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


def handles(root: nn.Module, node: fx.Node) -> dict[str, Any]:
    """The graph handles and the weight of the call ``node`` makes (an adapted node:
    what a site record needs to act on the graph again)."""
    f = _match(root, node)
    if f is None:
        raise ValueError(f"{node.format_node()} is not a linear call")
    return dict(node=node, input=f.x, weight_arg=f.weight_arg, bias_arg=f.bias_arg, offsets_arg=f.offsets,
                arg_transposed=f.arg_transposed, weight=f.weight)


def group_by_weight(sites: Iterable[LinearSite]) -> dict[str, list[LinearSite]]:
    """Sites keyed by the ``b`` they share (one per weight)."""
    groups: dict[str, list[LinearSite]] = {}
    for s in sites:
        groups.setdefault(s.adapter_name, []).append(s)
    return groups
