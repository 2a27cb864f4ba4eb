"""The one table of linear ops: which calls compute ``x Wᵀ + bias`` and where their
operands are.

A call is read the same way whether it is a graph node (``fx.Node`` arguments; site
discovery, the compile backend) or a live call (tensor arguments; the module form's
function mode): :func:`read_call` takes ``(target, args, kwargs)`` and never looks at
what the arguments are.

======================================  ========================  ===================
op                                      operands                  weight as passed
======================================  ========================  ===================
``F.linear``, ``aten.linear``           ``(x, W, bias)``          ``[out, in]``
``addmm``                               ``(bias, x, W)``          ``[in, out]``
``mm``, ``matmul``, ``@``               ``(x, W)``                ``[in, out]``
``_grouped_mm``, ``F.grouped_mm``,      ``(x, W, offs)``          ``[E, in, out]``
``transformers::grouped_mm_fallback``
======================================  ========================  ===================

A weight argument may also be its parameter transposed (``t``, ``transpose``,
``permute``, ``.T``, ``.mT``), which flips the layout: :func:`unwrap_transpose`.
"""

from __future__ import annotations

import enum
import operator
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..compat import GROUPED_MM, HigherOrderOperator, OpOverload

__all__ = ["Kind", "Call", "read_call", "unwrap_transpose", "op_name", "is_matmul_like", "argument", "is_conv1d"]

aten = torch.ops.aten


class Kind(str, enum.Enum):
    LINEAR = "linear"
    ADDMM = "addmm"
    MM = "mm"
    MATMUL = "matmul"
    GROUPED = "grouped_mm"
    #: ``bmm(x, W)`` with a 3-D weight: batch ``e`` is expert ``e`` (Llama 4's experts)
    BMM = "bmm"


_FUNCTIONS: dict[Any, Kind] = {
    F.linear: Kind.LINEAR,  # torch._C._nn.linear is this very function
    aten.linear.default: Kind.LINEAR,
    torch.addmm: Kind.ADDMM,
    aten.addmm.default: Kind.ADDMM,
    torch.Tensor.addmm: Kind.ADDMM,
    torch.mm: Kind.MM,
    aten.mm.default: Kind.MM,
    torch.Tensor.mm: Kind.MM,
    torch.matmul: Kind.MATMUL,
    operator.matmul: Kind.MATMUL,
    aten.matmul.default: Kind.MATMUL,
    torch.Tensor.matmul: Kind.MATMUL,
    torch.Tensor.__matmul__: Kind.MATMUL,
    **{f: Kind.GROUPED for f in GROUPED_MM},
    torch.bmm: Kind.BMM,
    aten.bmm.default: Kind.BMM,
    torch.Tensor.bmm: Kind.BMM,
}
if hasattr(F, "grouped_mm"):
    _FUNCTIONS[F.grouped_mm] = Kind.GROUPED
# custom ops are matched by qualified name: their library may not be loaded yet
_CUSTOM_OPS = {"transformers::grouped_mm_fallback": Kind.GROUPED}
_METHODS = {"mm": Kind.MM, "matmul": Kind.MATMUL, "__matmul__": Kind.MATMUL, "addmm": Kind.ADDMM, "bmm": Kind.BMM}

# positions and keywords of (x, weight, bias, offsets) per kind
_OPERANDS = {
    Kind.LINEAR: ((0, "input"), (1, "weight"), (2, "bias"), None),
    Kind.ADDMM: ((1, "mat1"), (2, "mat2"), (0, "input"), None),
    Kind.MM: ((0, "input"), (1, "mat2"), None, None),
    Kind.MATMUL: ((0, "input"), (1, "other"), None, None),
    Kind.GROUPED: ((0, "mat_a"), (1, "mat_b"), None, (2, "offs")),
    Kind.BMM: ((0, "input"), (1, "mat2"), None, None),
}


@dataclass
class Call:
    """The operands of one linear call (nodes in a graph, tensors in a live call)."""

    kind: Kind
    x: Any
    weight: Any
    bias: Any
    #: the weight operand is ``[in, out]`` (``[E, in, out]`` for grouped calls)
    weight_in_out: bool
    offsets: Any = None


def _qualified(target: Any) -> Optional[str]:
    if isinstance(target, OpOverload):
        return target.name()
    return getattr(target, "_qualified_op_name", None)


def kind_of(op: str, target: Any) -> Optional[Kind]:
    """The kind of a graph node (``op`` is ``"call_function"`` or ``"call_method"``) or
    of a live call (``op="call_function"``, ``target`` the function)."""
    if op == "call_method":
        return _METHODS.get(target)
    try:
        kind = _FUNCTIONS.get(target)
    except TypeError:  # an unhashable target
        return None
    return kind if kind is not None else _CUSTOM_OPS.get(_qualified(target) or "")


def argument(args: tuple, kwargs: dict, pos: int, *names: str, default: Any = None) -> Any:
    """Argument ``pos`` of a call, passed by position or by any of ``names``."""
    for name in names:
        if name in kwargs:
            return kwargs[name]
    return args[pos] if len(args) > pos else default


def _arg(args: tuple, kwargs: dict, where: Optional[tuple[int, str]], *aliases: str) -> Any:
    return None if where is None else argument(args, kwargs, where[0], where[1], *aliases)


def read_call(op: str, target: Any, args: tuple, kwargs: dict) -> Optional[Call]:
    """The operands of a linear call, or None if ``target`` is not one.

    ``addmm`` with ``beta`` or ``alpha`` other than 1 is not a linear layer and is not
    read.
    """
    kind = kind_of(op, target)
    if kind is None:
        return None
    xw, ww, bw, ow = _OPERANDS[kind]
    if kind is Kind.ADDMM and (kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1 or len(args) > 3):
        return None
    x = _arg(args, kwargs, xw, "self", "input", "mat1")
    weight = _arg(args, kwargs, ww, "other", "weight")
    if x is None or weight is None:
        return None
    return Call(kind, x, weight, _arg(args, kwargs, bw), kind is not Kind.LINEAR, _arg(args, kwargs, ow))


_TRANSPOSE = {aten.transpose.int, torch.transpose, torch.Tensor.transpose, torch.Tensor.swapaxes, torch.swapaxes,
              torch.swapdims, torch.Tensor.swapdims, aten.swapaxes.default, aten.swapdims.default}
_PERMUTE = {aten.permute.default, torch.permute, torch.Tensor.permute}
#: by name: a 2-D transpose (``t``, ``.T`` as export records it, the conjugate one) ...
_T2 = {"t", "numpy_T", "matrix_H", "T", "H"}
#: ... and a swap of the last two dimensions of any rank (``.mT``, ``.mH``, ``adjoint``)
_TLAST = {"mT", "mH", "adjoint"}


def _swaps_last_two(dims: Any, ndim: int) -> bool:
    if not (isinstance(dims, (list, tuple)) and all(isinstance(d, int) for d in dims)):
        return False
    if len(dims) == 2:  # transpose(a, b)
        return sorted(d % ndim for d in dims) == [ndim - 2, ndim - 1]
    return len(dims) == ndim and [d % ndim for d in dims] == [*range(ndim - 2), ndim - 1, ndim - 2]


def unwrap_transpose(op: str, target: Any, args: tuple, ndim: int) -> Optional[Any]:
    """``W`` when a call is ``W`` with its last two dimensions swapped, else None.

    ``ndim`` is the rank of ``W`` (2 for a linear weight, 3 for expert weights). Every
    spelling counts: ``t``, ``transpose`` / ``swapaxes`` / ``swapdims`` of the last two
    dimensions, ``permute``, ``.T`` / ``numpy_T``, ``.mT``, and the conjugating ones
    (``.H``, ``.mH``, ``adjoint``), which are transposes of a real weight.
    """
    if not args:
        return None
    if op == "call_method":
        name = target
        if name in ("transpose", "swapaxes", "swapdims") and len(args) == 3 and _swaps_last_two(args[1:], ndim):
            return args[0]
        if name == "permute":
            dims = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
            return args[0] if _swaps_last_two(tuple(dims), ndim) and len(dims) == ndim else None
    else:
        try:
            if target in _TRANSPOSE and len(args) == 3 and _swaps_last_two(args[1:], ndim):
                return args[0]
            if target in _PERMUTE and len(args) == 2 and len(args[1]) == ndim and _swaps_last_two(tuple(args[1]), ndim):
                return args[0]
        except TypeError:
            return None
        if target is getattr and len(args) == 2 and isinstance(args[1], str):  # Tensor properties in fx graphs
            name = args[1]
            return args[0] if name in _TLAST or (name in _T2 and ndim == 2) else None
    name = op_name(op, target)
    if (name in _T2 and ndim == 2 and len(args) == 1) or (name in _TLAST and len(args) == 1):
        return args[0]
    return None


def op_name(op: str, target: Any) -> str:
    """A short name for an op in any spelling (aten overload, torch function, method)."""
    if op == "call_method":
        return str(target)
    if isinstance(target, OpOverload):
        return target.overloadpacket.__name__
    return getattr(target, "__name__", str(target))


_MATMUL_LIKE = {
    "mm", "bmm", "matmul", "__matmul__", "einsum", "baddbmm", "addbmm", "addmm", "addmv", "mv",
    "linear", "bilinear", "_grouped_mm", "grouped_mm", "tensordot", "inner", "dot", "chain_matmul",
    # fused kernels that multiply by weights they are given
    "lstm", "gru", "rnn_tanh", "rnn_relu", "multi_head_attention_forward", "_native_multi_head_attention",
    "_transformer_encoder_layer_fwd",
}


def is_matmul_like(op: str, target: Any) -> bool:
    """Ops that multiply by a weight in a way a linear layer could hide in: matmuls of any
    batching, einsum, custom ops (outside aten and prims) that may take a weight, and
    higher-order ops (``cond``, ``scan``) whose subgraph is handed the weight."""
    if op not in ("call_function", "call_method"):
        return False
    if op_name(op, target) in _MATMUL_LIKE:
        return True
    if isinstance(target, HigherOrderOperator):  # a subgraph handed the weight (cond, scan, map)
        return True
    qualified = _qualified(target)
    return qualified is not None and qualified.split("::")[0] not in ("aten", "prims", "onelora")


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``transformers.pytorch_utils.Conv1D`` (``y = x W + bias``, ``W`` ``[in,
    out]``), recognised without importing transformers; an adapted one too."""
    cls = getattr(type(module), "_onelora_base", type(module))
    w = getattr(module, "weight", None)
    return cls.__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(w, nn.Parameter) and w.dim() == 2
