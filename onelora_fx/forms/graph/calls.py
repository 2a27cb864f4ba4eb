"""Call signatures: which captured graph serves which call of the model.

``torch.export`` bakes a call's shape into its graph: which keywords were passed, which
were ``None``, the values of flags (``output_hidden_states=True``), each tensor's rank
and dtype, and dimensions that were 1 in the example (export specializes those; with
``dynamic=False``, every dimension). A
call that differs in any of these needs a graph of its own. A :class:`Signature` reads
a call into a canonical form (every argument by name, in the order of the model's
``forward``, ``None`` defaults left out) and a key; :class:`CallGraph` is one captured
graph with the key it serves.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ...compat import pytree

__all__ = ["Signature", "CallGraph", "describe_leaf", "static_dims", "autocast_state"]

Leaf = Any


def describe_leaf(leaf: Leaf) -> tuple:
    """What of a leaf a graph depends on: a tensor's rank and dtype, any other value."""
    if isinstance(leaf, torch.Tensor):
        return ("tensor", leaf.dim(), leaf.dtype)
    try:
        hash(leaf)
        return ("value", leaf)
    except TypeError:
        return ("value", repr(leaf))


def static_dims(leaves: list[Leaf], dynamic: bool) -> frozenset[tuple[int, int, int]]:
    """``(leaf, dim, size)`` of every dimension a graph captured from ``leaves`` is
    specialized to: those of size 1 (export always specializes them), or all of them
    when the capture is not dynamic."""
    return frozenset(
        (i, d, int(leaf.shape[d]))
        for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)
        for d in range(leaf.dim()) if not dynamic or leaf.shape[d] == 1
    )


def autocast_state() -> tuple:
    """``((device type, dtype), ...)`` of the autocast regions active now: a graph
    captured outside autocast recorded its casts (and dtype assertions) for no autocast,
    so a call under autocast needs a graph of its own."""
    # (every torch build knows both device types: no is_autocast_available, which
    # torch.compile in torch 2.11 cannot trace)
    return tuple((device, torch.get_autocast_dtype(device)) for device in ("cpu", "cuda")
                 if torch.is_autocast_enabled(device))


class Signature:
    """The calling convention of a model's ``forward``, to canonicalize calls.

    Examples:
        >>> from torch import nn
        >>> sig = Signature(nn.Linear(2, 2).forward)
        >>> sig.canonical((torch.ones(1, 2),), {})[1].keys()
        dict_keys(['input'])
    """

    def __init__(self, forward: Callable[..., Any]):
        try:
            self.signature: Optional[inspect.Signature] = inspect.signature(forward)
        except (TypeError, ValueError):
            self.signature = None
        params = list(self.signature.parameters.values()) if self.signature else []
        kinds = inspect.Parameter
        self.positional = [p.name for p in params if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)]
        self.positional_only = {p.name for p in params if p.kind is kinds.POSITIONAL_ONLY}
        self.var_positional = any(p.kind is kinds.VAR_POSITIONAL for p in params)
        self.var_keyword = any(p.kind is kinds.VAR_KEYWORD for p in params)
        self.order = {p.name: i for i, p in enumerate(params)}
        self.none_default = {p.name for p in params if p.default is None}

    def canonical(self, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        """``(args, kwargs)`` with every argument that can be named passed by name, in
        ``forward``'s order, and ``None`` left out where ``None`` is the default.

        Raises:
            TypeError: the call does not fit the signature (as calling the model would).
        """
        if self.signature is None:
            return tuple(args), dict(kwargs)
        named: dict[str, Any] = {}
        rest: list[Any] = []
        for i, value in enumerate(args):
            if i < len(self.positional):
                named[self.positional[i]] = value
            elif self.var_positional:
                rest.append(value)
            else:
                raise TypeError(f"forward() takes {len(self.positional)} positional arguments but {len(args)} were given")
        for name, value in kwargs.items():
            if name in named:
                raise TypeError(f"forward() got multiple values for argument {name!r}")
            if name not in self.order and not self.var_keyword:
                raise TypeError(f"forward() got an unexpected keyword argument {name!r}")
            named[name] = value
        kept = {k: v for k, v in named.items() if not (v is None and (k in self.none_default or k not in self.order))}
        ordered = sorted(kept, key=lambda k: (self.order.get(k, len(self.order)), k))
        positional_only = tuple(kept[k] for k in ordered if k in self.positional_only)
        return positional_only + tuple(rest), {k: kept[k] for k in ordered if k not in self.positional_only}


@dataclass
class CallGraph:
    """One captured graph and the calls it serves."""

    in_spec: Any
    out_spec: Any
    leaves: tuple  # describe_leaf of each input leaf
    static: frozenset  # static_dims of the example
    example: Any  # the example (args, kwargs), detached copies: to capture it again after a move
    graph: Any = None  # the fx.Graph (None for the primary: it is the module's own graph)
    forward: Optional[Callable[..., Any]] = field(default=None, repr=False)
    autocast: tuple = ()  # autocast_state() when it was captured
    #: None: the graph follows train() / eval(); True / False: it serves that mode only
    #: (a model whose Python branches on self.training)
    training: Optional[bool] = None

    @staticmethod
    def of(args: tuple, kwargs: dict, in_spec: Any, out_spec: Any, dynamic: bool, **rest: Any) -> "CallGraph":
        leaves = pytree.tree_leaves((args, kwargs))
        example = pytree.tree_map_only(torch.Tensor, lambda t: t.detach().clone(), (args, kwargs))
        return CallGraph(in_spec, out_spec, tuple(describe_leaf(v) for v in leaves), static_dims(leaves, dynamic), example, **rest)

    def accepts(self, spec: Any, leaves: list[Leaf], autocast: tuple = (), training: bool = False) -> bool:
        """Can this graph serve a call (by its structure, static dims and mode; its shape
        guards are checked when it runs)?"""
        if spec != self.in_spec or len(leaves) != len(self.leaves) or autocast != self.autocast:
            return False
        if self.training is not None and self.training != training:
            return False
        if any(describe_leaf(v) != d for v, d in zip(leaves, self.leaves)):
            return False
        return all(leaves[i].shape[d] == size for i, d, size in self.static)

    def unflatten(self, out: Any) -> Any:
        if self.out_spec is None:
            return out
        return pytree.tree_unflatten(list(out) if isinstance(out, (list, tuple)) else [out], self.out_spec)
