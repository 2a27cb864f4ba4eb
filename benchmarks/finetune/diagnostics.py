"""What 1LoRA's ``s = x.sum(-1)`` looks like at the adapted layers of a pre-trained model.

A linear layer fed straight by a LayerNorm sees ``x = γ ⊙ x̂ + β`` with ``x̂`` of zero
mean over the features, so ``s = Σ_j (γ_j - mean γ) x̂_j + Σ_j β_j``: with a nearly
uniform ``γ``, ``s`` is nearly the constant ``Σ β`` and 1LoRA's ``b * s`` is a bias there.
RMSNorm does not center, so the argument does not apply to it.

Measured here, on the pre-trained model and the target task's training inputs (all of
them, eval mode, no gradients), with forward pre-hooks on the adapted linear modules:

* per site, the mean over rows of ``|s| / ‖x‖₁`` (``‖x‖₁`` = sum of ``|x|`` over the
  features), and the spread of ``s`` over rows relative to the rows' ``‖x‖₁``
  (``std(s) / mean ‖x‖₁``: the part of ``s`` that depends on the input);
* per kind of site, the mean of those over the sites: "LayerNorm-fed" (onelora_fx's
  :class:`LinearSite.norm` names the LayerNorm that feeds it) and "other";
* the coefficient of variation of every norm layer's scale ``γ`` (onelora_fx's
  ``scale_cv``), and their mean.
"""

from __future__ import annotations

import statistics
from typing import Any, Optional

import torch
from torch import nn

import onelora_fx as ol
from onelora_fx.analysis.norms import scale_cv

from .tasks import Task
from .training import set_mode

KINDS = {"layernorm_fed": "LayerNorm-fed", "other": "other"}


def norm_scales(model: nn.Module) -> dict[str, Any]:
    """Coefficient of variation of each norm layer's scale ``γ``, and their mean."""
    layers = {name: scale_cv(getattr(m, "weight", None)) for name, m in model.named_modules()
              if "norm" in type(m).__name__.lower() and getattr(m, "weight", None) is not None}
    kinds = sorted({type(model.get_submodule(n)).__name__ for n in layers})
    return {"kind": ", ".join(kinds), "layers": layers, "mean_cv": statistics.fmean(layers.values())}


def _mean(values: list[float]) -> Optional[float]:
    return statistics.fmean(values) if values else None


@torch.no_grad()
def sum_statistics(task: Task, pretrained: nn.Module, gm: nn.Module) -> dict[str, Any]:
    """``|s| / ‖x‖₁`` at each adapted site of ``gm`` (a 1LoRA capture of ``pretrained``),
    measured on ``pretrained`` itself; per site and per kind of site."""
    sites = [s for s in ol.sites(gm) if s.selected and s.call_index == 0]
    rows: dict[str, list[torch.Tensor]] = {s.name: [] for s in sites}

    def recorder(name: str):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            rows[name].append(args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64))
        return hook

    handles = [pretrained.get_submodule(s.name).register_forward_pre_hook(recorder(s.name)) for s in sites]
    try:
        set_mode(pretrained, False)
        x, _ = task.target["train"]
        for xb in x.split(512):
            pretrained(**task.kwargs(xb))
    finally:
        for h in handles:
            h.remove()
    per_site = []
    for s in sites:
        inputs = torch.cat(rows[s.name])
        total, l1 = inputs.sum(-1), inputs.abs().sum(-1)
        per_site.append({
            "name": s.name, "kind": "layernorm_fed" if s.norm is not None else "other", "norm": s.norm,
            "norm_scale_cv": s.norm_scale_cv, "in_features": s.in_features, "rows": len(inputs),
            "abs_s_over_l1": (total.abs() / l1).mean().item(),
            "std_s_over_l1": (total.std() / l1.mean()).item(),
            "mean_s": total.mean().item(),
        })
    kinds = {}
    for kind, label in KINDS.items():
        these = [p for p in per_site if p["kind"] == kind]
        kinds[kind] = {"label": label, "sites": len(these),
                       "abs_s_over_l1": _mean([p["abs_s_over_l1"] for p in these]),
                       "std_s_over_l1": _mean([p["std_s_over_l1"] for p in these])}
    return {"data": "target train split, pre-trained model, eval mode", "kinds": kinds, "sites": per_site}
