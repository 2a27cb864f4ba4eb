"""No silent skips: weights that a matmul-like op reads but that are not linear sites.

A batched expert matmul, an ``einsum`` with a weight, an LSTM, a custom op that takes a
weight: onelora_fx adapts none of these, and a user who selects ``"all"`` must hear
about them. :func:`unadapted` finds every parameter of two or more dimensions that
reaches such an op (directly, or through views, transposes, casts and indexing) at a
node that is not a site; :func:`warn_unadapted` says so once, with the share of the
model's parameters they hold.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional, Sequence

from torch import fx, nn

from .linear_ops import is_matmul_like, op_name
from .sites import LinearSite, resolve_attr

__all__ = ["unadapted", "warn_unadapted"]

# ops whose first operand flows into their result (views, casts, picking rows)
_CARRIES = {
    "view", "_unsafe_view", "reshape", "t", "transpose", "permute", "expand", "to", "_to_copy", "type",
    "contiguous", "clone", "alias", "detach", "index", "select", "slice", "unsqueeze", "squeeze",
    "getitem", "flatten", "unflatten", "float", "half", "bfloat16", "index_select", "swapaxes", "movedim",
}


# torch.nn layers that multiply by their weights inside one fused kernel
_MATMUL_MODULES = (nn.RNNBase, nn.Bilinear, nn.MultiheadAttention)


def _param_behind(root: nn.Module, arg: Any, depth: int = 12) -> Optional[str]:
    node = arg
    while isinstance(node, fx.Node) and depth > 0:
        if node.op == "get_attr":
            value = resolve_attr(root, node.target)
            return str(node.target) if isinstance(value, nn.Parameter) and value.dim() >= 2 else None
        if node.op not in ("call_function", "call_method") or op_name(node.op, node.target) not in _CARRIES:
            return None
        node = node.args[0] if node.args else None
        depth -= 1
    return None


def unadapted(root: nn.Module, graph: fx.Graph, sites: Sequence[LinearSite]) -> dict[str, str]:
    """``{parameter name: op}`` for every weight a non-site matmul-like op reads."""
    site_nodes = {s.node for s in sites}
    out: dict[str, str] = {}
    for node in graph.nodes:
        if node in site_nodes:
            continue
        if node.op == "call_module":  # a torch.nn layer symbolic_trace kept whole
            module = resolve_attr(root, str(node.target))
            if isinstance(module, _MATMUL_MODULES):
                for name, p in module.named_parameters():
                    if p.dim() >= 2:
                        out.setdefault(f"{node.target}.{name}", type(module).__name__)
            continue
        if not is_matmul_like(node.op, node.target):
            continue
        operands: list[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), operands.append)
        for operand in operands:
            name = _param_behind(root, operand)
            if name is not None:
                out.setdefault(name, op_name(node.op, node.target))
    return out


def warn_unadapted(model: nn.Module, found: dict[str, str], stacklevel: int) -> None:
    if not found:
        return
    params = dict(model.named_parameters(remove_duplicate=False))
    total = sum(p.numel() for p in model.parameters())
    held = sum(params[n].numel() for n in found if n in params)
    listed = ", ".join(f"{name} ({op})" for name, op in list(found.items())[:8]) + (" ..." if len(found) > 8 else "")
    warnings.warn(
        f"{len(found)} weight(s) of {type(model).__name__}, {100 * held / max(total, 1):.1f}% of its parameters, "
        f"are read by matmul-like ops that 1LoRA does not adapt: {listed}. They stay frozen and unadapted.",
        stacklevel=stacklevel + 1,
    )
