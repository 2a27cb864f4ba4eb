"""What the benchmark prints and writes: the tables, the ``x.sum(-1)`` statistics, the
plot (``quality.png``) and the JSON file (``quality.json``)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .methods import BY_KEY

VARIANTS = ("standard", "nonuniform_norms")


def _pct(mean: float, std: float) -> str:
    return f"{mean * 100:.1f} ± {std * 100:.1f}"


def table(tasks: dict[str, dict[str, Any]], variant: str) -> str:
    """The method comparison on one pre-training, every task."""
    from tabulate import tabulate

    rows = []
    for name, t in tasks.items():
        v = t["variants"][variant]
        before = _pct(v["before"]["mean"], v["before"]["std"])
        rows.append([name, "(pre-trained start)", "", "", "", before, "", "", ""])
        for r in v["methods"].values():
            mem = r["memory"]
            rows.append([
                "", r["label"], f"{r['trainable']:,}", f"{r['trainable_head']:,}" if r["trainable_head"] else "",
                f"{r['best_lr']:g}" + ("*" if r["best_lr_at_edge"] else ""), _pct(r["test_mean"], r["test_std"]),
                f"{r['seconds_mean']:.1f}", f"{mem['total_mb']:.2f}", f"{mem['saved_activations_mb']:.2f}",
            ])
        d = v["deploy"]
        rows.append(["", "1LoRA merged / exported .pt2", "", "", f"{d['lr']:g}",
                     f"{d['merged'] * 100:.1f} / {d['exported'] * 100:.1f}"
                     + (" (= adapted)" if d["equal"] else f" (adapted {d['adapted'] * 100:.1f})"), "", "", ""])
    headers = ["task", "method", "trainable", "of which head", "lr", "test metric %", "time s",
               "est. train MB", "saved act. MB"]
    return tabulate(rows, headers=headers, disable_numparse=True)


def sum_table(tasks: dict[str, dict[str, Any]]) -> str:
    """Norm scale CV and mean |s|/‖x‖₁ per kind of adapted site, every task and pre-training."""
    from tabulate import tabulate

    def cell(kind: dict[str, Any], key: str) -> str:
        return "-" if kind[key] is None else f"{kind[key]:.4f}"

    rows = []
    for name, t in tasks.items():
        for v in t["variants"].values():
            k = v["sum_statistics"]["kinds"]
            ln, other = k["layernorm_fed"], k["other"]
            rows.append([name, v["label"], v["norm_scales"]["kind"], f"{v['norm_scales']['mean_cv']:.3f}",
                         f"{v['pretrain']['source_test_metric'] * 100:.1f}",
                         f"{ln['sites']}", cell(ln, "abs_s_over_l1"), cell(ln, "std_s_over_l1"),
                         f"{other['sites']}", cell(other, "abs_s_over_l1"), cell(other, "std_s_over_l1")])
    headers = ["task", "pre-training", "norm", "scale CV", "source %", "LN-fed sites", "|s|/|x|_1",
               "std s/|x|_1", "other sites", "|s|/|x|_1", "std s/|x|_1"]
    return tabulate(rows, headers=headers, disable_numparse=True)


def plot(tasks: dict[str, dict[str, Any]], path: Path) -> None:
    """The paper's figure per pre-training: metric vs time, bubble area = trainable
    parameters; the estimated memory (standard pre-training) as bars below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(VARIANTS) + 1, len(tasks), figsize=(6.8 * len(tasks), 12.5), squeeze=False,
                             gridspec_kw={"height_ratios": [2.2] * len(VARIANTS) + [1]})
    colors = dict(zip(BY_KEY, plt.get_cmap("tab10").colors))
    for col, (name, t) in enumerate(tasks.items()):
        for row, variant in enumerate(VARIANTS):
            _bubbles(axes[row][col], name, t, t["variants"][variant], colors)
        res = t["variants"]["standard"]["methods"]
        bars = axes[-1][col]
        bars.barh([r["label"] for r in res.values()], [r["memory"]["total_mb"] for r in res.values()],
                  color=[colors.get(k) for k in res], alpha=0.7)
        bars.invert_yaxis()
        bars.tick_params(axis="y", labelsize=8)
        bars.set_title("standard pre-training", fontsize=9)
        bars.set_xlabel("estimated training memory, MB (params + grads + AdamW state + saved activations)")
    fig.suptitle("Bubble area = trainable parameters (full / scratch capped). Top left, small bubble is better.",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bubbles(ax: Any, name: str, t: dict[str, Any], v: dict[str, Any], colors: dict[str, Any]) -> None:
    res = v["methods"]
    cap = 2 * max((r["trainable"] for k, r in res.items() if k not in ("full", "scratch")), default=1)
    for key, r in res.items():
        size = 1200 * min(r["trainable"], cap) / cap + 20
        x, y, err = r["seconds_mean"], r["test_mean"] * 100, r["test_std"] * 100
        ax.errorbar(x, y, yerr=err, fmt="none", ecolor="0.4", capsize=3, zorder=1)
        ax.scatter(x, y, s=size, color=colors.get(key), alpha=0.55, edgecolors="k", zorder=2,
                   marker="s" if r["reference"] else "o")
        rank = sorted(res, key=lambda k: res[k]["test_mean"]).index(key)
        ax.annotate(r["label"] + (" (capped)" if r["trainable"] > cap else ""), (x, y), fontsize=7.5,
                    xytext=(8, 6 if rank % 2 == 0 else -11), textcoords="offset points")
    ax.text(0.99, 0.02, f"pre-trained start: {v['before']['mean'] * 100:.1f}%; "
            f"norm scale CV {v['norm_scales']['mean_cv']:.3f}", transform=ax.transAxes,
            ha="right", va="bottom", fontsize=8, color="0.3")
    ax.set_xlabel("fine-tuning + validation wall time per run (s, 1 CPU thread)")
    ax.set_ylabel(f"test {t['metric']} (%), mean ± std over seeds")
    ax.set_title(f"{name}: {v['label']}\n{t['description']}", fontsize=9)
    ax.grid(alpha=0.3)


def finite_or_none(obj: Any) -> Any:
    """JSON has no NaN: a diverged run's loss is written as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def write_json(report: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(finite_or_none(report), indent=2, allow_nan=False))
