"""Following weights at run time: what the module form sees instead of a graph.

A :class:`WeightTracker` is a ``TorchFunctionMode`` that knows some parameters and
follows every tensor made from one of them by an op that hands a weight on (a view, a
cast, a copy, a transpose, a block of rows or columns, a piece of a split, one expert's
slice of an expert weight; the table is :mod:`onelora_fx.analysis.flow`). For each such
tensor it knows the parameter, whether it is transposed, and which block of each stored
dimension it keeps: the run-time twin of the graph analysis in
:mod:`onelora_fx.analysis.sites`. The module form adds 1LoRA's term through it
(:class:`~onelora_fx.forms.module.layers.SiteMode`); the fallback records one forward
with it (:mod:`.record`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch
from torch.overrides import TorchFunctionMode

from ...analysis.flow import SHAPE_QUERIES, carries_weight
from ...compat import pytree
from ...analysis.linear_ops import Call

__all__ = ["Derived", "WeightTracker"]

# metadata reads: not a use of a weight's values
_METADATA = SHAPE_QUERIES | {
    "data_ptr", "__len__", "element_size", "nelement", "storage_offset", "is_complex", "untyped_storage",
    "__format__", "__repr__", "__hash__", "__get__",
}
_PROPERTIES = {"T", "mT", "H", "mH"}


@dataclass
class Derived:
    """A tensor made from a tracked parameter."""

    tensor: torch.Tensor
    key: Any  # what the tracker calls the parameter
    param: torch.Tensor
    #: the tensor is the parameter's transpose (its last two dimensions swapped)
    flipped: bool = False
    #: the block of each stored dimension it keeps, ``{dim: (start, stop)}``
    blocks: dict[int, tuple[int, int]] = field(default_factory=dict)
    #: an expert's index (an int, or a tensor of each row's expert) into a 3-D weight
    index: Any = None
    #: the tensor is the whole ``[E, ...]`` expert weight
    expert: bool = False
    #: made by an op whose effect on the weight cannot be followed (a linear call on it
    #: is refused, never adapted wrongly)
    opaque: bool = False

    def rows(self, call: Call) -> tuple[Optional[tuple[int, int]], bool]:
        """``(output rows the call reads, whether it reads the input features whole)``."""
        if self.param.dim() != 2:
            return None, not self.blocks
        position_out = 1 if call.weight_in_out else 0
        out_dim = position_out if not self.flipped else 1 - position_out
        return self.blocks.get(out_dim), (1 - out_dim) not in self.blocks


def _shares(a: torch.Tensor, b: torch.Tensor) -> bool:
    try:
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and a.device == b.device
    except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
        return False


def _view_of(src: torch.Tensor, out: torch.Tensor) -> Optional[tuple[bool, dict[int, tuple[int, int]]]]:
    """``(flipped, blocks)`` of a 2-D view ``out`` of a 2-D ``src`` (positions of
    ``src``), read from strides and offsets; None when it is not a block or a transposed
    block of ``src``."""
    if src.dim() != 2 or out.dim() != 2 or src.shape[-1] == 0 or src.shape[0] == 0:
        return None
    if src.is_contiguous():
        base, transposed_src = src, False
    elif src.t().is_contiguous():
        base, transposed_src = src.t(), True
    else:
        return None
    rows, cols = base.stride()[0], 1
    offset = out.storage_offset() - base.storage_offset()
    start_r, start_c = divmod(offset, rows)
    if out.stride() == (rows, cols):
        flipped, span = False, ((start_r, start_r + out.shape[0]), (start_c, start_c + out.shape[1]))
    elif out.stride() == (cols, rows):
        flipped, span = True, ((start_r, start_r + out.shape[1]), (start_c, start_c + out.shape[0]))
    else:
        return None
    if span[0][1] > base.shape[0] or span[1][1] > base.shape[1]:
        return None
    blocks = {d: s for d, s in enumerate(span) if s != (0, base.shape[d])}
    if transposed_src:  # positions of src are the base's, swapped
        blocks = {1 - d: s for d, s in blocks.items()}
        flipped = not flipped
    return flipped, blocks


def derive(entry: Derived, src: torch.Tensor, out: Any) -> Optional[Derived]:
    """What ``out`` (made from ``src``, which ``entry`` describes) is of the parameter."""
    if not isinstance(out, torch.Tensor):
        return None
    if entry.expert or entry.index is not None or entry.param.dim() != 2:
        # expert weights: a cast or copy keeps what it is, a transpose of the last two
        # dims flips it (transformers' grouped experts multiply by W.transpose(-2, -1));
        # anything else is opaque
        if out.dim() != src.dim() or out.shape[:-2] != src.shape[:-2]:
            return replace(entry, tensor=out, opaque=True)
        if _shares(src, out) and src.dim() >= 2 and src.stride(-2) != src.stride(-1):
            swapped = out.stride()[-2:] == src.stride()[-2:][::-1]
            if not swapped and out.stride()[-2:] != src.stride()[-2:]:
                return replace(entry, tensor=out, opaque=True)
        else:
            swapped = out.shape[-2:] != src.shape[-2:]
        if out.shape[-2:] != (src.shape[-2:][::-1] if swapped else src.shape[-2:]):
            return replace(entry, tensor=out, opaque=True)
        return replace(entry, tensor=out, flipped=entry.flipped != swapped)
    if _shares(src, out) and out.dim() == 2:
        view = _view_of(src, out)
        if view is None:
            return replace(entry, tensor=out, opaque=True)
        flipped, local = view
        perm = [1, 0] if entry.flipped else [0, 1]  # position of src -> stored dimension
        blocks = dict(entry.blocks)
        for position, (start, stop) in local.items():
            dim = perm[position]
            base = blocks.get(dim, (0, entry.param.shape[dim]))[0]
            blocks[dim] = (base + start, base + stop)
        return replace(entry, tensor=out, flipped=entry.flipped != flipped, blocks=blocks)
    if out.shape == src.shape:  # a cast or a copy
        return replace(entry, tensor=out)
    return replace(entry, tensor=out, opaque=True)


class WeightTracker(TorchFunctionMode):
    """Follows tensors made from the parameters it is given (see the module docstring).

    Subclasses get each call with its tracked arguments from :meth:`on_call`; what it
    returns (not ``NotImplemented``) is the call's result.
    """

    def __init__(self) -> None:
        super().__init__()
        self.tracked: dict[int, Derived] = {}

    def track(self, param: torch.Tensor, key: Any) -> None:
        self.tracked[id(param)] = Derived(param, key, param, expert=param.dim() == 3)

    def find(self, t: Any) -> Optional[Derived]:
        entry = self.tracked.get(id(t)) if isinstance(t, torch.Tensor) else None
        return entry if entry is not None and entry.tensor is t else None

    def keep(self, entry: Optional[Derived]) -> None:
        if entry is not None:
            self.tracked[id(entry.tensor)] = entry

    def on_call(self, func: Any, name: str, args: tuple, kwargs: dict, used: list[Derived]) -> Any:
        """Handle a call that reads tracked tensors other than as a view or cast."""
        return NotImplemented

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "__get__":  # a property (Tensor.T, .dtype, ...): the descriptor names it
            name = getattr(getattr(func, "__self__", None), "__name__", name)
        first = self.find(args[0]) if args else None
        if first is not None:
            if name in _PROPERTIES or (carries_weight(name) and name not in ("getitem",)):
                return self._follow(func, first, args, kwargs, name)
            if name == "__getitem__":
                return self._follow(func, first, args, kwargs, name)
            if name in _METADATA:
                return func(*args, **kwargs)
        used = [e for e in map(self.find, pytree.tree_leaves((args, kwargs))) if e is not None]
        if used:
            result = self.on_call(func, name, args, kwargs, used)
            if result is not NotImplemented:
                return result
        return func(*args, **kwargs)

    def _follow(self, func: Any, entry: Derived, args: tuple, kwargs: dict, name: str) -> Any:
        out = func(*args, **kwargs)
        src = args[0]
        if name == "__getitem__" and entry.expert and entry.index is None and entry.param.dim() == 3:
            index = args[1]
            if isinstance(index, int) or (isinstance(index, torch.Tensor) and index.dim() <= 1 and not index.is_floating_point()):
                self.keep(replace(entry, tensor=out, index=index, expert=False))
                return out
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        for o in outputs:
            self.keep(derive(entry, src, o))
        return out
