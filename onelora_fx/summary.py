"""``summary``: a table of the linear sites and the trainable-parameter count."""

from __future__ import annotations

from typing import Sequence

from tabulate import tabulate
from torch import nn

from .analysis.accounting import Accounting
from .records import LinearSite
from .state import get_state
from .query import adapted_sites

__all__ = ["summary", "site_table", "parameter_counts", "weight_lines"]


def parameter_counts(module: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts, each tensor counted once."""
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def _norm(s: LinearSite) -> str:
    """The LayerNorm a site reads and its scale's coefficient of variation."""
    if s.norm is None:
        return ""
    cv = "?" if s.norm_scale_cv is None else f"{s.norm_scale_cv:.3f}"
    return f"LayerNorm (γ cv {cv})"


def site_table(sites: Sequence[LinearSite], *, tablefmt: str = "simple") -> str:
    """One row per linear call: name, form, shape, head, the LayerNorm it reads,
    selected, where ``b`` lives."""
    rows = [
        (
            s.name + (f" (call {s.call_index + 1}/{s.calls})" if s.calls > 1 else ""),
            s.kind,
            f"{s.in_features} -> {s.out_features}" + (f" x{s.experts} experts" if s.experts else ""),
            s.layout.value,
            "head" if s.is_head else "",
            _norm(s),
            "yes" if s.selected else "",
            s.adapter_name if s.selected else "",
        )
        for s in sites
    ]
    headers = ("site", "form", "in -> out", "layout", "", "input", "1LoRA", "vector")
    return tabulate(rows, headers=headers, tablefmt=tablefmt, colalign=("left",) * len(headers))


def weight_lines(accounting: Accounting, sites: Sequence[LinearSite]) -> list[str]:
    """The weight accounting in words: how many weights (and parameters) are in each
    class, naming the unadapted ones."""
    classes = accounting.classify(sites)
    total = max(1, sum(accounting.sizes.values()))
    parts = [f"{n} {cls} ({100 * size / total:.1f}%)" for cls, n, size in accounting.summary(classes)]
    parts[0] = parts[0].replace("%)", "% of all weight values)", 1)
    lines = [f"{len(classes)} weights: " + ", ".join(parts)]
    unadapted = accounting.unadapted()
    if unadapted:
        lines.append("unadapted: " + ", ".join(f"{name} ({op})" for name, op in unadapted.items()))
    return lines


def summary(gm: nn.Module, *, tablefmt: str = "simple") -> str:
    """The adapted sites and trainable / total parameters of an adapted module.

    Examples:
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
        lines.append("also trained: " + ", ".join(getattr(e, "value", e) for e in state.train))
    if state is not None and state.accounting is not None:  # before the two lines most read last
        lines[2:2] = weight_lines(state.accounting, found)
    return "\n".join(lines)
