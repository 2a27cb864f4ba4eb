"""How the module form puts 1LoRA into a model's own layers.

A layer whose own ``forward`` makes its linear call (``nn.Linear``, GPT-2's ``Conv1D``)
gets a subclass whose ``forward`` is :func:`onelora_fx.ops.linear` on its weight and
``onelora_b``. Every other site (``F.linear`` on a raw parameter, a router, the experts
of a mixture-of-experts layer, a head that reads a tied embedding) is adapted where the
call happens: the calling module gets a subclass whose ``forward`` runs the original one
under :class:`SiteMode`, a ``TorchFunctionMode`` that catches the linear calls reading
an adapted weight (the op table of :mod:`onelora_fx.linear_ops`, the weight passed as
is, transposed, cast, or one expert's slice) and adds the 1LoRA term.

The subclasses keep the original class's name (Hugging Face writes it into
``config.json``); ``isinstance`` checks still hold, and pickling rebuilds them.
"""

from __future__ import annotations

import contextvars
import inspect
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .. import ops
from ..compat import pytree
from ..materialize import after_move
from ..linear_ops import Kind, is_matmul_like, read_call, unwrap_transpose
from ..sites import ADAPTER_SUFFIX, adapter_name_for, join
from ..state import get_state

__all__ = ["SiteCall", "SiteError", "adapt_layer", "adapt_caller", "adapt_root", "restore", "is_adapted_layer", "calls_of",
           "SiteMode", "adapt_stack"]


class SiteError(RuntimeError):
    """An adapted weight is used in a way 1LoRA cannot follow."""


@dataclass(frozen=True)
class SiteCall:
    """An adapted weight that a module's forward reads (module paths relative to it)."""

    owner: str  # module path of the weight's owner, relative to the caller
    attr: str

    @property
    def vector(self) -> str:
        return adapter_name_for(self.owner, self.attr)


class _OneLoRA:
    """Marks the subclasses this module makes. On the adapted root (which holds the
    adapter state), a move also fills what the meta device emptied."""

    _onelora_base: type

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        result = super()._apply(fn, recurse)  # type: ignore[misc]
        state = get_state(self)  # type: ignore[arg-type]
        if state is not None:
            after_move(self, state.vectors, state.model)  # type: ignore[arg-type]
        return result


#: each batch item's adapter while a stacked module form runs (see ``enter_stack``)
_ADAPTER_IDS: contextvars.ContextVar[Optional[torch.Tensor]] = contextvars.ContextVar("onelora_adapter_ids", default=None)


def _one_or_rows(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], b: torch.Tensor, in_out: bool) -> torch.Tensor:
    """1LoRA with one vector, or with a stack of them (``[K, out]``) and the ids of the call."""
    if b.dim() == 1:
        return ops.linear(x, weight, bias, b, transposed=in_out)
    ids = _ADAPTER_IDS.get()
    if ids is None:
        raise ValueError("this module stacks several adapters: call it with adapter_ids=... (one entry per batch item)")
    return ops.linear_rows(x, weight, bias, b, ids, transposed=in_out, rows=ops.BY_SHAPE)


def _layer_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return _one_or_rows(x, self.weight, self.bias, getattr(self, ADAPTER_SUFFIX), self._onelora_in_out)


def _stack_forward(self: nn.Module, *args: Any, adapter_ids: Optional[torch.Tensor] = None, **kwargs: Any) -> Any:
    """A stacked module form's forward: ``adapter_ids`` goes to the layers for this call."""
    token = _ADAPTER_IDS.set(adapter_ids)
    try:
        return self._onelora_base.forward(self, *args, **kwargs)
    finally:
        _ADAPTER_IDS.reset(token)


def adapt_stack(m: nn.Module) -> None:
    """The module form's root, stacked: it takes ``adapter_ids`` (``generate`` passes it
    through too: the keyword is in the forward's signature)."""
    m.__class__ = _subclass(type(m), "stack")


def _caller_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    with SiteMode(self):
        return self._onelora_base.forward(self, *args, **kwargs)


def _rebuild(base: type, kind: str) -> nn.Module:
    cls = _subclass(base, kind)
    return cls.__new__(cls)


def _reduce_ex(self: nn.Module, protocol: int) -> Any:
    return _rebuild, (self._onelora_base, self._onelora_kind), self.__dict__


_CLASSES: dict[tuple[type, str], type] = {}


_FORWARDS = {"caller": _caller_forward, "layer": _layer_forward}


def _with_ids(base: type) -> Any:
    """``_stack_forward`` with the signature of ``base.forward`` plus ``adapter_ids``."""

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return _stack_forward(self, *args, **kwargs)

    try:
        signature = inspect.signature(base.forward)
    except (TypeError, ValueError):
        return forward
    params = list(signature.parameters.values())
    at = next((i for i, p in enumerate(params) if p.kind is p.VAR_KEYWORD), len(params))
    params.insert(at, inspect.Parameter("adapter_ids", inspect.Parameter.KEYWORD_ONLY, default=None))
    forward.__signature__ = signature.replace(parameters=params)
    return forward


def _subclass(base: type, kind: str) -> type:
    if (base, kind) not in _CLASSES:
        body = {"_onelora_base": base, "_onelora_kind": kind, "__reduce_ex__": _reduce_ex,
                "__module__": base.__module__, "__qualname__": base.__qualname__}
        if kind in _FORWARDS:  # "root" keeps the model's forward
            body["forward"] = _FORWARDS[kind]
        elif kind == "stack":
            body["forward"] = _with_ids(base)
        bases = (base,) if issubclass(base, _OneLoRA) else (_OneLoRA, base)  # a stack of an adapted root
        _CLASSES[(base, kind)] = type(base.__name__, bases, body)
    return _CLASSES[(base, kind)]


def adapt_root(m: nn.Module) -> None:
    """The module form's root: the model's class, moves fill what meta emptied."""
    if not isinstance(m, _OneLoRA):
        m.__class__ = _subclass(type(m), "root")


def is_adapted_layer(m: nn.Module) -> bool:
    return isinstance(m, _OneLoRA)


def adapt_layer(m: nn.Module, in_out: bool) -> None:
    """``m`` (an ``nn.Linear`` or ``Conv1D``) computes 1LoRA with its ``onelora_b``."""
    m.__class__ = _subclass(type(m), "layer")
    m.__dict__["_onelora_in_out"] = in_out


def adapt_caller(m: nn.Module, calls: tuple[SiteCall, ...]) -> None:
    """``m``'s forward adds 1LoRA to its calls of the weights ``calls`` name."""
    if not isinstance(m, _OneLoRA):
        m.__class__ = _subclass(type(m), "caller")
    m.__dict__["_onelora_calls"] = tuple(dict.fromkeys((*m.__dict__.get("_onelora_calls", ()), *calls)))


def calls_of(m: nn.Module) -> tuple[SiteCall, ...]:
    return m.__dict__.get("_onelora_calls", ()) if isinstance(m, _OneLoRA) else ()


def restore(m: nn.Module) -> None:
    """Undo :func:`adapt_layer` / :func:`adapt_caller` / :func:`adapt_root` (used by merge)."""
    if isinstance(m, _OneLoRA):
        m.__class__ = m._onelora_base
        m.__dict__.pop("_onelora_calls", None)
        m.__dict__.pop("_onelora_in_out", None)


# ---------------------------------------------------------------------------------


@dataclass
class _Tracked:
    """A tensor that is an adapted weight, or made from one."""

    tensor: torch.Tensor
    b: torch.Tensor
    name: str
    index: Any = None  # an expert's index, or the rows' experts (gathered)
    expert: bool = False  # the tensor is still the whole [E, ...] weight


_PASS = {"size", "dim", "numel", "is_floating_point", "is_contiguous", "data_ptr", "stride",
         "__len__", "element_size", "nelement", "storage_offset", "is_complex", "untyped_storage", "__format__",
         "__repr__", "__hash__"}
_SAME = {"to", "type", "float", "half", "bfloat16", "contiguous", "detach", "clone", "_to_copy"}


class SiteMode(TorchFunctionMode):
    """Adds the 1LoRA term to the linear calls a module's forward makes on its adapted
    weights (see the module docstring)."""

    def __init__(self, caller: nn.Module):
        super().__init__()
        self.tracked: dict[int, _Tracked] = {}
        for call in calls_of(caller):
            owner = caller.get_submodule(call.owner) if call.owner else caller
            weight = owner._parameters[call.attr]
            b = getattr(owner, call.vector.rpartition(".")[2])
            self.tracked[id(weight)] = _Tracked(weight, b, join(call.owner, call.attr), expert=weight.dim() == 3)

    def _find(self, t: Any) -> Optional[_Tracked]:
        entry = self.tracked.get(id(t)) if isinstance(t, torch.Tensor) else None
        return entry if entry is not None and entry.tensor is t else None

    def _keep(self, result: torch.Tensor, entry: _Tracked, **change: Any) -> torch.Tensor:
        self.tracked[id(result)] = _Tracked(result, entry.b, entry.name, **{"index": entry.index, "expert": entry.expert, **change})
        return result

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: C901 - one dispatch table
        kwargs = kwargs or {}
        call = read_call("call_function", func, args, kwargs)
        entry = self._find(call.weight) if call is not None else None
        if entry is not None:
            if call.kind is Kind.GROUPED and entry.expert:
                return ops.expert_term(func(*args, **kwargs), call.x, call.offsets, entry.b)
            if call.kind is not Kind.GROUPED and not entry.expert:
                b = entry.b if entry.index is None else entry.b[entry.index]
                return _one_or_rows(call.x, call.weight, call.bias, b, call.weight_in_out)
        name = getattr(func, "__name__", "")
        is_property = name == "__get__"
        if is_property:  # Tensor.T, Tensor.dtype, ...: the descriptor names the property
            name = getattr(getattr(func, "__self__", None), "__name__", name)
        first = self._find(args[0]) if args else None
        if first is not None:
            if name == "__getitem__" and first.expert and first.index is None:
                return self._keep(func(*args, **kwargs), first, index=args[1], expert=False)
            transposes = name in ("T", "mT") or unwrap_transpose("call_function", func, args, args[0].dim()) is not None
            if transposes or name in _SAME:
                return self._keep(func(*args, **kwargs), first)
            if is_property or name in _PASS:  # metadata: dtype, shape, device, strides
                return func(*args, **kwargs)
        if name == "bmm":
            out = self._gathered_bmm(func, args, kwargs)
            if out is not None:
                return out
        used = [e.name for e in map(self._find, pytree.tree_leaves((args, kwargs))) if e is not None]
        if used and is_matmul_like("call_function", func):
            # a weight multiplied where the 1LoRA term cannot be added (a fused kernel):
            # an error, never a silently unadapted site; other reads (an embedding lookup
            # of a tied weight) are not linear calls and pass
            raise SiteError(
                f"the adapted weight {used[0]} is passed to {name or func}, which "
                "1LoRA's module form cannot follow (it adapts linear, matmul and grouped matmul calls "
                "on the weight, its transpose or one expert's slice). Use the graph form "
                "(capture='export'), or exclude this site."
            )
        return func(*args, **kwargs)

    def _gathered_bmm(self, func, args, kwargs) -> Optional[torch.Tensor]:
        """``bmm(W[ids], x)`` / ``bmm(x, W[ids])``: batched experts, one per row."""
        a, b_ = (args + (None, None))[:2]
        left, right = self._find(a), self._find(b_)
        entry, x, in_out = (left, b_, False) if left is not None else (right, a, True)
        if entry is None or entry.index is None or not isinstance(entry.index, torch.Tensor) or entry.index.dim() != 1:
            return None
        y = func(*args, **kwargs)
        s = x.sum(-1 if in_out else -2)  # [S, 1]
        term = entry.b.index_select(0, entry.index).to(y.dtype) * s.to(y.dtype)
        return y + (term.unsqueeze(1) if in_out else term.unsqueeze(-1))
