"""Where 1LoRA's term vanishes: linear layers that read a LayerNorm's output directly.

A LayerNorm outputs ``x = γ ⊙ x̂ + β`` with ``x̂`` centered over the features, so

    s = x.sum(-1) = Σ_j (γ_j - mean γ) x̂_j + Σ_j β_j

With a uniform scale (``γ = 1``, as at initialization and nearly so after short
pre-training) ``s`` is the constant ``Σ β``: 1LoRA's ``b * s`` is then a bias (BitFit
by another name), and exactly zero when ``β = 0``. RMSNorm does not center, so it has no
such effect. :func:`norm_feeding` finds the LayerNorm behind a site's input from the
graph alone, and how far its scale is from uniform from the parameter values; nothing
is run.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import fx, nn

from .linear_ops import op_name

__all__ = ["norm_feeding", "scale_cv", "NEAR_UNIFORM_CV"]

#: a LayerNorm scale whose coefficient of variation is below this counts as uniform
NEAR_UNIFORM_CV = 0.1

# ops between a norm and a linear that keep each row's sum over the features a sum of
# the norm's output: shape ops on the leading dimensions, casts, copies and dropout
_KEEPS_ROWS = {
    "view", "_unsafe_view", "reshape", "flatten", "contiguous", "clone", "to", "_to_copy",
    "type", "float", "half", "bfloat16", "alias", "detach", "dropout", "feature_dropout",
    "slice", "select", "narrow", "squeeze", "unsqueeze", "expand", "getitem",
}
_LAYER_NORMS = {"layer_norm", "native_layer_norm"}


def scale_cv(gamma: Optional[torch.Tensor]) -> Optional[float]:
    """Coefficient of variation of a LayerNorm scale (0.0 without one); None on meta."""
    if gamma is None:
        return 0.0
    if gamma.device.type == "meta":
        return None
    g = gamma.detach().to(torch.float64)
    mean = g.mean().abs().item()
    return float("inf") if mean == 0 else g.std(unbiased=False).item() / mean


def _last_dim_kept(node: fx.Node, source: Any) -> bool:
    """On graphs with shapes (export), a shape op must keep the feature dimension."""
    out, inp = node.meta.get("val"), getattr(source, "meta", {}).get("val")
    if isinstance(out, torch.Tensor) and isinstance(inp, torch.Tensor) and out.dim() and inp.dim():
        return out.shape[-1] == inp.shape[-1]
    return True


def _layer_norm_of(root: nn.Module, node: fx.Node, resolve: Callable[[str], Any]) -> Optional[tuple[str, Optional[torch.Tensor]]]:
    """``(module path, γ)`` when ``node`` is a LayerNorm over the last dimension."""
    if node.op == "call_module":
        mod = resolve(str(node.target))
        if isinstance(mod, nn.LayerNorm) and len(mod.normalized_shape) == 1:
            return str(node.target), mod.weight
        return None
    if node.op != "call_function" or op_name(node.op, node.target) not in _LAYER_NORMS:
        return None
    shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
    if not isinstance(shape, (list, tuple)) or len(shape) != 1:
        return None
    weight = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
    if isinstance(weight, fx.Node) and weight.op == "get_attr":
        return str(weight.target).rpartition(".")[0], resolve(str(weight.target))
    return (node.name, None) if weight is None else None


def norm_feeding(root: nn.Module, x: Any) -> tuple[Optional[str], Optional[float]]:
    """``(LayerNorm path, scale CV)`` when ``x`` comes straight from a LayerNorm, else
    ``(None, None)``.

    Examples:
        >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 2)))
        >>> norm_feeding(gm, next(n for n in gm.graph.nodes if n.target == "1").args[0])
        ('0', 0.0)
    """
    from ..records import resolve_attr

    def resolve(target: str) -> Any:
        return resolve_attr(root, target)

    node = x
    while isinstance(node, fx.Node):
        found = _layer_norm_of(root, node, resolve)
        if found is not None:
            path, gamma = found
            return path, scale_cv(gamma)
        if node.op == "call_module" and isinstance(resolve(str(node.target)), nn.Dropout):
            node = node.args[0] if node.args else None
            continue
        if node.op not in ("call_function", "call_method") or op_name(node.op, node.target) not in _KEEPS_ROWS:
            return None, None
        if op_name(node.op, node.target) == "getitem" and not _getitem_of_norm(node):
            return None, None
        source = node.args[0] if node.args else None
        if not _last_dim_kept(node, source):
            return None, None
        node = source
    return None, None


def _getitem_of_norm(node: fx.Node) -> bool:
    """``native_layer_norm(...)[0]`` (the output, not the statistics) or slicing rows."""
    source = node.args[0] if node.args else None
    if isinstance(source, fx.Node) and op_name(source.op, source.target) == "native_layer_norm":
        return len(node.args) > 1 and node.args[1] == 0
    return True
