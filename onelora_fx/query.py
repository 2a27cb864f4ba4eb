"""Questions about an adapted module, answered from its structure (never from names).

The passes above this one (merge, export, adapter files, summaries, stacks) ask these;
each question is answered by the module's form (see :mod:`onelora_fx.forms`).
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from .forms import form_of
from .sites import LinearSite
from .state import get_state

__all__ = ["is_adapted", "adapted_sites", "adapter_parameters"]


def adapted_sites(module: nn.Module) -> list[LinearSite]:
    """Every site of an adapted module; ``selected`` (and ``adapted``) mark those that
    carry a 1LoRA vector.

    Example:
        >>> gm = transform(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), "all")  # doctest: +SKIP
        >>> [s.name for s in adapted_sites(gm) if s.adapted]                         # doctest: +SKIP
        ['0', '1']
    """
    return [replace(s, selected=s.adapted) for s in form_of(module).sites(module)]


def is_adapted(module: nn.Module) -> bool:
    """Does ``module`` carry 1LoRA vectors (graph nodes or adapted layers)?"""
    return get_state(module) is not None or any(s.adapted for s in form_of(module).sites(module))


def adapter_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """Every trained tensor of an adapted module: the ``b`` vectors, then ``train`` extras.

    Found from the structure (the adapted sites and the recorded extras), never by name.

    Example:
        >>> gm = transform(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), "all")  # doctest: +SKIP
        >>> list(adapter_parameters(gm))                                             # doctest: +SKIP
        ['0.onelora_b', '1.onelora_b']
    """
    out: dict[str, nn.Parameter] = {}
    for s in form_of(module).sites(module):
        if s.adapted and s.adapter_name not in out:
            out[s.adapter_name] = module.get_parameter(s.adapter_name)
    state = get_state(module)
    for name in state.extras if state else ():
        out[name] = module.get_parameter(name)
    return out
