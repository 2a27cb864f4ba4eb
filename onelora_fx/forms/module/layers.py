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
import weakref
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from ... import ops
from ...compat import pytree
from ..materialize import after_move
from ...analysis.linear_ops import Kind, is_matmul_like, read_call
from ...records import ADAPTER_SUFFIX, adapter_name_for, join
from ...quant import is_quantized_weight
from ...state import get_state
from .tracking import Derived, WeightTracker

__all__ = ["SiteCall", "SiteError", "adapt_layer", "adapt_quantized_layer", "adapt_caller", "adapt_root", "restore", "is_adapted_layer", "calls_of",
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

    def adapter_params(self) -> list[str]:
        """torchtune's ``AdapterModule`` protocol: the names (relative to this module) of
        the parameters to train and save: on the adapted root every 1LoRA vector and
        ``train=`` extra, on an adapted layer its vector."""
        state = get_state(self)  # type: ignore[arg-type]
        if state is not None:
            return [*state.vectors, *state.extras]
        return [ADAPTER_SUFFIX] if ADAPTER_SUFFIX in self._parameters else []  # type: ignore[attr-defined]

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        result = super()._apply(fn, recurse)  # type: ignore[misc]
        state = get_state(self)  # type: ignore[arg-type]
        if state is not None:
            after_move(self, state.vectors, state.model)  # type: ignore[arg-type]
        return result


#: each batch item's adapter while a stacked module form runs (see ``enter_stack``)
_ADAPTER_IDS: contextvars.ContextVar[Optional[torch.Tensor]] = contextvars.ContextVar("onelora_adapter_ids", default=None)


def _stack_ids() -> torch.Tensor:
    ids = _ADAPTER_IDS.get()
    if ids is None:
        raise ValueError("this module stacks several adapters: call it with adapter_ids=... (one entry per batch item)")
    return ids


def _batch_ids(x: torch.Tensor) -> torch.Tensor:
    """The call's ``adapter_ids``, for an input whose batch dimension its shape tells.

    The module form has no graph to read a layout from: an input whose first two
    dimensions both have the batch's size (``[S, B, E]`` with ``S == B``, sequence first
    or batch first) could be either, and guessing wrong gives items other items' adapters."""
    ids = _stack_ids()
    n = ids.shape[0]
    if n > 1 and x.dim() >= 3 and x.shape[0] == n and x.shape[1] == n:
        raise ValueError(
            f"a stacked linear of the module form got an input of shape {tuple(x.shape)} with adapter_ids of {n} "
            f"entries: its first two dimensions are both {n}, so which one is the batch cannot be told from the "
            "shape (a sequence-first [S, B, E] input has S == B here). Call it with a sequence length other than "
            "the batch size, or stack a graph form captured with capture='export', which records the layout"
        )
    return ids


def _one_or_rows(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], b: torch.Tensor, in_out: bool) -> torch.Tensor:
    """1LoRA with one vector, or with a stack of them (``[K, out]``) and the ids of the call."""
    if b.dim() == 1:
        return ops.linear(x, weight, bias, b, transposed=in_out)
    if is_quantized_weight(weight):  # the quantized call as it is, each row's term beside it
        return ops.add_rows_term(ops.linear(x, weight, bias, torch.zeros_like(b[0]), transposed=in_out), x, b,
                                 _batch_ids(x), rows=ops.BY_SHAPE)
    return ops.linear_rows(x, weight, bias, b, _batch_ids(x), transposed=in_out, rows=ops.BY_SHAPE)


def _add_term(y: torch.Tensor, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The 1LoRA term beside a call that computed ``y`` (one vector, or a stack)."""
    if b.dim() == 1:
        return ops.add_term(y, x, b)
    return ops.add_rows_term(y, x, b, _batch_ids(x), rows=ops.BY_SHAPE)


def _layer_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return _one_or_rows(x, self.weight, self.bias, getattr(self, ADAPTER_SUFFIX), self._onelora_in_out)


def _quantized_layer_forward(base: type) -> Any:
    """A quantized layer (bitsandbytes ``Linear4bit``, ``Linear8bitLt``): its own forward,
    untouched, and the 1LoRA term beside it (the term never reads the weight)."""

    def forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _add_term(base.forward(self, x, *args, **kwargs), x, getattr(self, ADAPTER_SUFFIX))

    return forward


def _batch_input(forward: Any, args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """The tensor of a call, in the order of ``forward``'s parameters, whose first
    dimension is the batch (:func:`onelora_fx.ops.batch_source`)."""
    try:
        values = list(inspect.signature(forward).bind_partial(*args, **kwargs).arguments.values())
    except (TypeError, ValueError):
        values = [*args, *kwargs.values()]
    return ops.batch_source([v for v in pytree.tree_leaves(values) if isinstance(v, torch.Tensor)])


def _stack_forward(base: type, self: nn.Module, *args: Any, adapter_ids: Optional[torch.Tensor] = None,
                   **kwargs: Any) -> Any:
    """A stacked module form's forward: ``adapter_ids``, checked against the call, goes
    to the layers for this call."""
    state = get_state(self)
    count = len(state.stack) if state is not None else 0
    if state is not None:  # names or a list: a tensor on the module's device
        adapter_ids = state.stack_ids(adapter_ids, next((p.device for p in self.parameters()), None))
    adapter_ids = ops.check_ids(adapter_ids, _batch_input(base.forward.__get__(self), args, kwargs), count)
    token = _ADAPTER_IDS.set(adapter_ids)
    try:
        return base.forward(self, *args, **kwargs)
    finally:
        _ADAPTER_IDS.reset(token)


def adapt_stack(m: nn.Module) -> None:
    """The module form's root, stacked: it takes ``adapter_ids`` (``generate`` passes it
    through too: the keyword is in the forward's signature)."""
    m.__class__ = _subclass(type(m), "stack")


def _caller_forward(base: type) -> Any:
    """The forward of a module whose own forward makes adapted calls: the class's base
    forward under :class:`SiteMode` (the base of *this* class: a stack over an adapted
    root has two of them)."""

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        with SiteMode(self):
            return base.forward(self, *args, **kwargs)

    return forward


def _rebuild(base: type, kind: str) -> nn.Module:
    cls = _subclass(base, kind)
    return cls.__new__(cls)


def _reduce_ex(self: nn.Module, protocol: int) -> Any:
    return _rebuild, (self._onelora_base, self._onelora_kind), self.__dict__


#: (id of the base class, kind) -> the subclass; weak values, so a user's class (or a
#: GraphModule's per-instance class) is freed with its last instance: the subclass holds
#: its base, so while the entry lives the id cannot be reused
_CLASSES: "weakref.WeakValueDictionary[tuple[int, str], type]" = weakref.WeakValueDictionary()


_FORWARDS = {"caller": _caller_forward, "layer": lambda base: _layer_forward, "qlayer": _quantized_layer_forward}


def _with_ids(base: type) -> Any:
    """``_stack_forward`` with the signature of ``base.forward`` plus ``adapter_ids``."""

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return _stack_forward(base, self, *args, **kwargs)

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
    cls = _CLASSES.get((id(base), kind))
    if cls is None:
        body = {"_onelora_base": base, "_onelora_kind": kind, "__reduce_ex__": _reduce_ex,
                "__module__": base.__module__, "__qualname__": base.__qualname__,
                # copying.copy_module_tree gives a GraphModule a class of its own, then
                # puts this kind of subclass over it again
                "_onelora_rebuild": staticmethod(_subclass)}
        if kind in _FORWARDS:  # "root" keeps the model's forward
            body["forward"] = _FORWARDS[kind](base)
        if kind == "root" and callable(getattr(base, "save_pretrained", None)):
            body["save_pretrained"] = _save_pretrained(base)
        elif kind == "stack":
            body["forward"] = _with_ids(base)
        bases = (base,) if issubclass(base, _OneLoRA) else (_OneLoRA, base)  # a stack of an adapted root
        cls = type(base.__name__, bases, body)
        _CLASSES[(id(base), kind)] = cls
    return cls


def _save_pretrained(base: type) -> Any:
    def save_pretrained(self: nn.Module, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``save_pretrained`` would write a checkpoint whose 1LoRA vectors
        ``from_pretrained`` drops without a word: refused, with the two ways that keep them.
        ``Trainer`` (which passes ``state_dict``) still writes its checkpoints, which its
        resume loads into the adapted module."""
        if kwargs.get("state_dict") is not None:
            return base.save_pretrained(self, save_directory, *args, **kwargs)
        raise RuntimeError(
            f"save_pretrained() of an adapted {base.__name__} would write a checkpoint that from_pretrained() "
            "loads as the base model, dropping the 1LoRA vectors. Save the adapter (ol.save_adapter(gm, path); load it "
            "back with ol.load(base_model, path)), or the fine-tuned model: ol.merge(gm, inplace=True), then "
            "model.save_pretrained(...) on the model you transformed; for Trainer checkpoints, "
            "ol.adapter_checkpoints(trainer)")

    return save_pretrained


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


def adapt_quantized_layer(m: nn.Module) -> None:
    """``m`` (a bitsandbytes quantized linear) adds 1LoRA's term to what it computes."""
    m.__class__ = _subclass(type(m), "qlayer")


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
        while isinstance(m, _OneLoRA):  # a stack over an adapted root: both go
            m.__class__ = m._onelora_base
        m.__dict__.pop("_onelora_calls", None)
        m.__dict__.pop("_onelora_in_out", None)


# ---------------------------------------------------------------------------------


class SiteMode(WeightTracker):
    """Adds the 1LoRA term to the linear calls a module's forward makes on its adapted
    weights: the weight as it is, transposed, cast, a block of its output rows (then
    with the same rows of ``b``), or one expert's slice (see the module docstring)."""

    def __init__(self, caller: nn.Module):
        super().__init__()
        self.vectors: dict[Any, torch.Tensor] = {}
        for call in calls_of(caller):
            owner = caller.get_submodule(call.owner) if call.owner else caller
            weight = owner._parameters[call.attr]
            key = join(call.owner, call.attr)
            self.track(weight, key)
            self.vectors[key] = getattr(owner, call.vector.rpartition(".")[2])

    def on_call(self, func: Any, name: str, args: tuple, kwargs: dict, used: list[Derived]) -> Any:
        call = read_call("call_function", func, args, kwargs)
        entry = self.find(call.weight) if call is not None else None
        if entry is not None and not entry.opaque:
            b = self.vectors[entry.key]
            if call.kind in (Kind.GROUPED, Kind.BMM) and entry.expert:
                return ops.expert_term(func(*args, **kwargs), call.x, call.offsets, b)
            if call.kind not in (Kind.GROUPED, Kind.BMM) and not entry.expert:
                b = b if entry.index is None else b[entry.index]
                rows, whole = entry.rows(call)
                if whole:
                    return _one_or_rows(call.x, call.weight, call.bias, b if rows is None else b[..., rows[0]:rows[1]],
                                        call.weight_in_out)
        if name == "bmm":
            out = self._gathered_bmm(func, args, kwargs)
            if out is not None:
                return out
        if is_matmul_like("call_function", func):
            # a weight multiplied where the 1LoRA term cannot be added (a fused kernel, a
            # block of its input features, an op that changed it): an error, never a
            # silently unadapted site; other reads (an embedding lookup of a tied
            # weight) are not linear calls and pass
            raise SiteError(
                f"the adapted weight {used[0].key} is passed to {name or func}, which "
                "1LoRA's module form cannot follow (it adapts linear, matmul and grouped matmul calls "
                "on the weight, its transpose, a block of its output rows or one expert's slice). Use the "
                "graph form (capture='export'), or exclude this site."
            )
        return NotImplemented

    def _gathered_bmm(self, func, args, kwargs) -> Optional[torch.Tensor]:
        """``bmm(W[ids], x)`` / ``bmm(x, W[ids])``: batched experts, one per row."""
        a, b_ = (args + (None, None))[:2]
        left, right = self.find(a), self.find(b_)
        entry, x, in_out = (left, b_, False) if left is not None else (right, a, True)
        if entry is None or entry.index is None or not isinstance(entry.index, torch.Tensor) or entry.index.dim() != 1:
            return None
        y = func(*args, **kwargs)
        s = x.sum(-1 if in_out else -2)  # [S, 1]
        term = self.vectors[entry.key].index_select(0, entry.index).to(y.dtype) * s.to(y.dtype)
        return y + (term.unsqueeze(1) if in_out else term.unsqueeze(-1))
