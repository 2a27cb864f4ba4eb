"""Questions about an adapted module, answered from its adapter state (never from names,
never by finding the sites again).

The passes above this one (merge, export, adapter files, summaries, stacks) ask these;
the site records come from the form ``transform`` recorded (see :mod:`onelora_fx.forms`).
"""

from __future__ import annotations

from dataclasses import replace

from torch import fx, nn

from . import ops
from .forms import form_of
from .forms.module.layers import is_adapted_layer
from .records import LinearSite
from .state import AdapterStateError, get_state

__all__ = ["is_adapted", "adapted_sites", "adapter_parameters"]

_ADAPTER_OPS = (ops.linear, ops.linear_rows, ops.expert_term)


def adapted_sites(module: nn.Module) -> list[LinearSite]:
    """Every site of an adapted module; ``selected`` (and ``adapted``) mark those that
    carry a 1LoRA vector. Empty for a module that is not adapted.

    Examples:
        >>> gm = transform(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), "all")  # doctest: +SKIP
        >>> [s.name for s in adapted_sites(gm) if s.adapted]                         # doctest: +SKIP
        ['0', '1']
    """
    form = form_of(module)
    return [] if form is None else [replace(s, selected=s.adapted) for s in form.sites(module)]


def _carries_adapter(module: nn.Module) -> bool:
    """A module tree holding adapted layers or adapter nodes without a state (one that
    lost it): never adapt such a module again."""
    for m in module.modules():
        if is_adapted_layer(m):
            return True
        graph = m.graph if isinstance(m, fx.GraphModule) else None
        if graph is not None and any(n.op == "call_function" and n.target in _ADAPTER_OPS for n in graph.nodes):
            return True
    return False


def is_adapted(module: nn.Module) -> bool:
    """Does ``module`` carry 1LoRA vectors (an adapter state, adapted layers or nodes)?

    Examples:
        >>> is_adapted(nn.Linear(2, 2))
        False
    """
    return get_state(module) is not None or _carries_adapter(module)


def adapter_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """Every trained tensor of an adapted module: the ``b`` vectors, then ``train`` extras.

    Read from the adapter state (the vectors and extras ``transform`` recorded), never
    found by name.

    Examples:
        >>> gm = transform(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), "all")  # doctest: +SKIP
        >>> list(adapter_parameters(gm))                                             # doctest: +SKIP
        ['0.onelora_b', '1.onelora_b']
    """
    state = get_state(module)
    if state is None:
        return {}
    out, gone = {}, []
    for name in (*state.vectors, *state.extras):
        try:
            out[name] = module.get_parameter(name)
        except AttributeError:
            gone.append(name)
    if gone:
        raise AdapterStateError(
            f"{len(gone)} trained tensor(s) that transform recorded are no longer in the module ({', '.join(gone[:4])}"
            f"{' ...' if len(gone) > 4 else ''}): a layer holding them was replaced or deleted after transform. "
            "Replace layers (quantize, swap) before ol.transform, then transform the result")
    return out
