"""``W + b 1ᵀ`` in float32 (float64 for a float64 weight), cast back to the weight's
dtype: the one fold.

A ``DTensor`` weight (tensor parallelism) is folded shard by shard: ``b`` is placed as the
weight's output dimension (:func:`onelora_fx.records.vector_placements`), so each rank
folds its own rows with its own part of ``b``, and the result keeps the weight's
placements.

A weight ``[out, in]`` folds ``b[:, None]``; ``[in, out]`` folds ``b[None, :]``; expert
weights ``[E, out, in]`` / ``[E, in, out]`` fold ``b[e]`` into each expert. The fold is
computed a block of rows at a time (bounded float32 scratch for a bfloat16 weight), and
everything is checked finite before anything is written: :func:`check` bounds
``max |W| + max |b|`` with one reduction over the weight and, only when that comes near
the dtype's range (or ``W`` is not finite), runs the same blocks as :func:`fold_into`
without writing, so a bad ``b`` or an overflow is found before a weight changes.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from .compat import is_dtensor
from .records import Layout, vector_placements

__all__ = ["fold", "fold_into", "check", "MergeError"]

# elements folded at a time: bounds the float32 scratch of a low-precision weight
_CHUNK_ELEMENTS = 1 << 22


class MergeError(ValueError):
    """The module cannot be merged (nothing adapted, a non-finite ``b``, an overflow)."""


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a fold is computed in: float32, or the weight's own where it is wider
    (float64 weights fold in float64)."""
    return torch.promote_types(dtype, torch.float32)


def _delta(b: torch.Tensor, layout: Layout, dtype: torch.dtype) -> torch.Tensor:
    """``b`` shaped to broadcast against one block of the weight, in the fold's dtype."""
    wide = b.detach().to(accumulation_dtype(dtype))
    return wide.unsqueeze(-1) if layout is Layout.OUT_IN else wide.unsqueeze(-2)


def _blocks(weight: torch.Tensor, b: torch.Tensor, layout: Layout) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(block of weight rows, the matching delta)``; the rows are views into ``weight``.

    Blocks run over the leading (expert) dimension, then over the rows of a matrix.
    """
    if weight.dim() == 3:
        for e in range(weight.shape[0]):
            yield from _blocks(weight[e], b[e], layout)
        return
    rows = max(1, _CHUNK_ELEMENTS // max(1, weight.shape[1]))
    for start in range(0, weight.shape[0], rows):
        part = b[start : start + rows] if layout is Layout.OUT_IN else b
        yield weight[start : start + rows], _delta(part.to(weight.device), layout, weight.dtype)


def _local(weight: torch.Tensor, b: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """A DTensor weight's local shard and the matching local part of ``b``."""
    from torch.distributed.tensor import distribute_tensor

    want = vector_placements(weight, layout, tuple(b.shape))
    if is_dtensor(b):
        b = b if tuple(b.placements) == tuple(want) else b.redistribute(weight.device_mesh, want)
    else:
        b = distribute_tensor(b, weight.device_mesh, want, src_data_rank=None)
    return weight.to_local(), b.to_local()


def fold(weight: torch.Tensor, b: torch.Tensor, layout: Layout) -> torch.Tensor:
    """``W + b 1ᵀ`` in float32 (float64 for a float64 weight), cast back to
    ``weight``'s dtype (a new tensor).

    Examples:
        >>> fold(torch.zeros(2, 3), torch.tensor([1.0, 2.0]), Layout.OUT_IN)
        tensor([[1., 1., 1.],
                [2., 2., 2.]])
    """
    if is_dtensor(weight):
        from torch.distributed.tensor import DTensor

        local, part = _local(weight.detach(), b, layout)
        return DTensor.from_local(fold(local, part, layout), weight.device_mesh, weight.placements, run_check=False,
                                  shape=weight.shape, stride=weight.stride())
    out = torch.empty_like(weight)
    with torch.no_grad():
        for (block, delta), (target, _) in zip(_blocks(weight.detach(), b, layout), _blocks(out, b, layout)):
            target.copy_(block.to(delta.dtype) + delta)
    return out


def fold_into(weight: torch.Tensor, b: torch.Tensor, layout: Layout) -> None:
    """:func:`fold` written into ``weight`` itself (no new weight memory)."""
    if is_dtensor(weight):  # the local tensor is the DTensor's own storage
        local, part = _local(weight.detach(), b, layout)
        fold_into(local, part, layout)
        return
    with torch.no_grad():
        for block, delta in _blocks(weight, b, layout):
            if block.dtype == delta.dtype:
                block.add_(delta)
            else:
                block.copy_(block.to(delta.dtype) + delta)


def check(weight: torch.Tensor, b: torch.Tensor, layout: Layout, name: str) -> Optional[str]:
    """Why folding ``b`` into ``weight`` must not happen (None when it may): a weight on
    the meta device, one that is not a plain floating tensor, a non-finite ``b``, or a
    fold that is not finite in the weight's dtype (``3e38 + 3e38`` in float32 too)."""
    if b.device.type == "meta" or weight.device.type == "meta":
        return f"{name} is on the meta device: load real weights before merging"
    if is_dtensor(weight):  # each rank checks its shard; every rank learns whether any failed
        local, part = _local(weight.detach(), b, layout)
        problem = check(local, part, layout, name)
        failed = torch.tensor([problem is not None], dtype=torch.int32, device=local.device)
        torch.distributed.all_reduce(failed)
        return problem or (f"folding {name} fails on another rank" if failed.item() else None)
    if type(weight) not in (torch.Tensor, torch.nn.Parameter) or not weight.is_floating_point():
        return (f"{name}'s weight is a {type(weight).__name__} of {weight.dtype}, not a floating tensor: "
                "W + b 1ᵀ has no such weight to go into")
    if not torch.isfinite(b).all():
        return f"{name} has non-finite values"
    with torch.no_grad():  # one reduction over the weight, no scratch: enough unless near the dtype's range
        lo, hi = torch.aminmax(weight.detach())
        wide = accumulation_dtype(weight.dtype)
        bound = torch.maximum(lo.abs(), hi.abs()).to(wide) + b.detach().abs().max().to(wide)
    if torch.isfinite(bound) and bound.item() < torch.finfo(weight.dtype).max / 2:
        return None
    for block, delta in _blocks(weight.detach(), b, layout):  # the exact check, block by block
        folded = (block.to(delta.dtype) + delta).to(weight.dtype)
        if not torch.isfinite(folded).all():
            bad = torch.isfinite(block).all()
            return f"folding {name} overflows {weight.dtype}" if bad else f"{name}'s weight itself is not finite"
    return None
