"""``summary``: a table of the linear sites and the trainable-parameter count."""

from __future__ import annotations

from typing import Sequence

from tabulate import tabulate
from torch import nn

from .sites import LinearSite
from .state import get_state
from .transform import adapted_sites

__all__ = ["summary", "site_table", "parameter_counts"]


def parameter_counts(module: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts, each tensor counted once."""
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def site_table(sites: Sequence[LinearSite], *, tablefmt: str = "simple") -> str:
    """One row per linear call: name, form, shape, head, selected, where ``b`` lives."""
    rows = [
        (
            s.name + (f" (call {s.call_index + 1}/{s.calls})" if s.calls > 1 else ""),
            s.kind,
            f"{s.in_features} -> {s.out_features}",
            s.layout.value,
            "head" if s.is_head else "",
            "yes" if s.selected else "",
            s.adapter_name if s.selected else "",
        )
        for s in sites
    ]
    return tabulate(rows, headers=("site", "form", "in -> out", "layout", "", "1LoRA", "vector"), tablefmt=tablefmt)


def summary(gm: nn.Module, *, tablefmt: str = "simple") -> str:
    """The adapted sites and trainable / total parameters of an adapted module.

    Example:
        >>> print(summary(transform(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))))  # doctest: +SKIP
        site    form       in -> out    layout   ...
    """
    found = adapted_sites(gm)
    trainable, total = parameter_counts(gm)
    state = get_state(gm)
    adapted = sum(s.selected for s in found)
    lines = [
        site_table(found, tablefmt=tablefmt),
        "",
        f"adapted sites: {adapted} of {len(found)}"
        + (f"   pattern: {state.pattern}   capture: {state.method}" if state else ""),
        f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.4f}%)",
    ]
    if state and state.train:
        lines.append("also trained: " + ", ".join(e.value for e in state.train))
    return "\n".join(lines)
