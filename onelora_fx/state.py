"""What an adapted module remembers about its adaptation (beyond its graph and params).

Kept in ``gm.meta`` for GraphModules (survives ``copy.deepcopy``) and as an attribute of
the module form's root. Everything here is optional: a pickled GraphModule loses
``meta``, and every pass still works from the graph (or the adapted layers) alone.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Any, Optional

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
    #: the model it was made from (merge in place unties a tied head there too)
    model: Optional[Any] = None
    #: every site of the model, as found at transform (the module form's record)
    sites: tuple = ()
    #: the names of the 1LoRA vectors
    vectors: tuple[str, ...] = ()
    #: a stack (``ol.stack``): the names of its adapters, in ``adapter_ids`` order
    stack: tuple[str, ...] = ()

    def __deepcopy__(self, memo: dict) -> "AdapterState":
        # the model and the originals are the model's: a copy of the adapted module
        # still comes from that model (its tensors are never copied)
        return replace(self, extras=dict(self.extras), buffers=dict(self.buffers))


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
