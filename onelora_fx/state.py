"""What an adapted module remembers about its adaptation: the form ``transform`` chose,
the record of every site, the vectors, the trained extras.

This is the one place later stages learn what they work on: :func:`onelora_fx.forms.form_of`
reads the form from here (never from the module's type), and the queries, merge, adapter
files and stacks read the site records (never finding the sites again). It is kept in
the module's ``__dict__`` (it survives ``pickle``) and, for a GraphModule, in ``gm.meta``
too (which ``copy.deepcopy`` keeps and ``pickle`` drops).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch
from torch import fx, nn

__all__ = ["AdapterState", "AlreadyAdaptedError", "Capture", "Extra", "get_state", "set_state"]

_KEY = "onelora"


class Capture(str, enum.Enum):
    """How a model is (or was) captured."""

    AUTO = "auto"
    FX = "fx"
    EXPORT = "export"
    #: no graph: the model's own class, its layers adapted (the module form)
    MODULE = "module"

    @classmethod
    def parse(cls, value: Any) -> "Capture":
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"capture={value!r} is not one of {', '.join(repr(c.value) for c in cls)}") from None


class AlreadyAdaptedError(ValueError):
    """The module already carries 1LoRA vectors; adapting again would stack them."""


class OneLoRAWarning(UserWarning):
    """Every warning onelora_fx gives (a subclass of ``UserWarning``): filter them with
    ``warnings.filterwarnings("ignore", category=ol.OneLoRAWarning)``."""


class AdapterStateError(RuntimeError):
    """The module no longer holds what ``transform`` recorded (a layer with a vector was
    replaced or deleted afterwards)."""


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
    #: how the model was captured (``fx``, ``export`` or ``module``): the form
    method: str
    #: ``train=`` extras: :class:`Extra` values, and module names or globs trained in full
    train: tuple[Any, ...] = ()
    #: trained extras: name in the adapted module -> the model's tensor it was copied
    #: from (training never writes to the model; ``merge(inplace=True)`` does)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    #: buffers, copied at capture for the same reason: name -> the model's tensor
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    #: the model it was made from (merge in place unties a tied head there too)
    model: Optional[Any] = None
    #: every site of the model, as found at transform: records without graph nodes or
    #: tensors (:meth:`onelora_fx.records.LinearSite.record`); ``adapted`` marks those
    #: with a vector
    sites: tuple = ()
    #: the names of the 1LoRA vectors
    vectors: tuple[str, ...] = ()
    #: a stack (``ol.stack``): the names of its adapters, in ``adapter_ids`` order
    stack: tuple[str, ...] = ()
    #: every weight of the model and what reads it
    #: (:class:`onelora_fx.analysis.accounting.Accounting`): the summary's weight
    #: classes, and merge's question "does anything else read this weight?"
    accounting: Any = None

    @property
    def capture(self) -> Capture:
        return Capture(self.method)

    def stack_ids(self, value: Any, device: Optional[torch.device] = None) -> Any:
        """A stack's ``adapter_ids`` as a tensor: a tensor as given; a list names each
        batch item's adapter by name (as given to ``ol.stack``) or index, ``None`` (or
        ``-1``) for the base model.

        Examples:
            >>> AdapterState("all", "fx", stack=("legal", "support")).stack_ids(["support", None, 0]).tolist()
            [1, -1, 0]
        """
        if value is None or isinstance(value, torch.Tensor) or not isinstance(value, (list, tuple)):
            return value  # checked with the call (ops.check_ids)
        out = []
        for item in value:
            if item is None:
                out.append(-1)
            elif isinstance(item, str):
                if item not in self.stack:
                    raise ValueError(f"adapter_ids names {item!r}, which is not in this stack "
                                     f"({', '.join(map(repr, self.stack))}); use one of those names, an index, or None "
                                     "for the base model")
                out.append(self.stack.index(item))
            elif isinstance(item, int) and not isinstance(item, bool):
                out.append(item)
            else:
                raise TypeError(f"adapter_ids entries are adapter names, indices or None, got {type(item).__name__}")
        return torch.tensor(out, dtype=torch.int64, device=device)

    def __deepcopy__(self, memo: dict) -> "AdapterState":
        # the model and the originals are the model's: a copy of the adapted module
        # still comes from that model (its tensors are never copied)
        return replace(self, extras=dict(self.extras), buffers=dict(self.buffers))

    def __getstate__(self) -> dict:
        # a pickled module is a module of its own: it keeps what it is (form, sites,
        # vectors), not the model it was made from in this process
        return {**self.__dict__, "model": None, "extras": {k: None for k in self.extras}, "buffers": {}}


_ATTR = "_onelora_state"


def get_state(module: nn.Module) -> Optional[AdapterState]:
    """The adapter state of an adapted module, or None."""
    state = module.__dict__.get(_ATTR)
    if state is None:
        meta = module.__dict__.get("meta")
        state = meta.get(_KEY) if isinstance(meta, dict) else None
    return state


def set_state(module: nn.Module, state: Optional[AdapterState]) -> None:
    """Record (or with None, forget) the adapter state of ``module``."""
    meta = module.__dict__.get("meta")
    if state is None:
        module.__dict__.pop(_ATTR, None)
        if isinstance(meta, dict):
            meta.pop(_KEY, None)
        return
    module.__dict__[_ATTR] = state
    if isinstance(module, fx.GraphModule):
        meta[_KEY] = state
