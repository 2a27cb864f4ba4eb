"""What an adapted module remembers about its adaptation (beyond its graph and params).

Kept in ``gm.meta`` for GraphModules (survives ``copy.deepcopy``) and as an attribute on
modules adapted by the module-level fallback. Everything here is optional: a pickled
GraphModule loses ``meta``, and every pass still works from the graph alone.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import fx, nn

__all__ = ["AdapterState", "Extra", "get_state", "set_state"]

_KEY = "onelora"


class Extra(str, enum.Enum):
    """Parameters trained next to the 1LoRA vectors (``transform(..., train=...)``)."""

    #: every bias vector (BitFit)
    BIAS = "bias"
    #: every normalization layer's affine parameters (DiffFit's norms; the paper's
    #: best combination "1LoRA (norms)")
    NORM = "norm"
    #: the output head, in full (the paper trains a new classification head)
    HEAD = "head"


@dataclass
class AdapterState:
    #: the pattern the adapter was made with, as text
    pattern: str
    #: how the model was captured (``fx``, ``export`` or ``module``)
    method: str
    train: tuple[Extra, ...] = ()
    #: trained extras: name in the adapted module -> the model's tensor it was copied
    #: from (training never writes to the model; ``merge(inplace=True)`` does)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    #: buffers, copied at capture for the same reason: name -> the model's tensor
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)


def get_state(module: nn.Module) -> Optional[AdapterState]:
    if isinstance(module, fx.GraphModule):
        return module.meta.get(_KEY)
    return module.__dict__.get("_onelora_state")


def set_state(module: nn.Module, state: Optional[AdapterState]) -> None:
    if isinstance(module, fx.GraphModule):
        if state is None:
            module.meta.pop(_KEY, None)
        else:
            module.meta[_KEY] = state
    elif state is None:
        module.__dict__.pop("_onelora_state", None)
    else:
        module.__dict__["_onelora_state"] = state
