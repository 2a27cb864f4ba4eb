"""``W + b 1ᵀ`` in float32, cast back to the weight's dtype: the one fold.

A weight ``[out, in]`` folds ``b[:, None]``; ``[in, out]`` folds ``b[None, :]``; expert
weights ``[E, out, in]`` / ``[E, in, out]`` fold ``b[e]`` into each expert. The fold is
computed a block of rows at a time (bounded float32 scratch for a bfloat16 weight), and
every block is checked finite before anything is written: :func:`check` runs the same
blocks as :func:`fold_into` without writing, so a bad ``b`` or an overflow is found
before a weight changes.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from .sites import Layout

__all__ = ["fold", "fold_into", "check", "MergeError"]

# elements folded at a time: bounds the float32 scratch of a low-precision weight
_CHUNK_ELEMENTS = 1 << 22


class MergeError(ValueError):
    """The module cannot be merged (nothing adapted, a non-finite ``b``, an overflow)."""


def _delta(b: torch.Tensor, layout: Layout) -> torch.Tensor:
    """``b`` shaped to broadcast against one block of the weight (float32)."""
    b32 = b.detach().to(torch.float32)
    return b32.unsqueeze(-1) if layout is Layout.OUT_IN else b32.unsqueeze(-2)


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
        yield weight[start : start + rows], _delta(part.to(weight.device), layout)


def fold(weight: torch.Tensor, b: torch.Tensor, layout: Layout) -> torch.Tensor:
    """``W + b 1ᵀ`` in float32, cast back to ``weight``'s dtype (a new tensor).

    Example:
        >>> fold(torch.zeros(2, 3), torch.tensor([1.0, 2.0]), Layout.OUT_IN)
        tensor([[1., 1., 1.],
                [2., 2., 2.]])
    """
    out = torch.empty_like(weight)
    with torch.no_grad():
        for (block, delta), (target, _) in zip(_blocks(weight.detach(), b, layout), _blocks(out, b, layout)):
            target.copy_(block.to(torch.float32) + delta)
    return out


def fold_into(weight: torch.Tensor, b: torch.Tensor, layout: Layout) -> None:
    """:func:`fold` written into ``weight`` itself (no new weight memory)."""
    with torch.no_grad():
        for block, delta in _blocks(weight, b, layout):
            if block.dtype == torch.float32:
                block.add_(delta)
            else:
                block.copy_(block.to(torch.float32) + delta)


def check(weight: torch.Tensor, b: torch.Tensor, layout: Layout, name: str) -> Optional[str]:
    """Why folding ``b`` into ``weight`` must not happen (None when it may)."""
    if b.device.type == "meta" or weight.device.type == "meta":
        return f"{name} is on the meta device: load real weights before merging"
    if not torch.isfinite(b).all():
        return f"{name} has non-finite values"
    if torch.finfo(weight.dtype).max >= 1e38:
        return None  # float32 / bfloat16 hold any finite float32 sum of finite values
    for block, delta in _blocks(weight.detach(), b, layout):
        if not torch.isfinite((block.to(torch.float32) + delta).to(weight.dtype)).all():
            return f"folding {name} overflows {weight.dtype}"
    return None
