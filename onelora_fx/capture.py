"""nn.Module -> fx.GraphModule: ``torch.fx.symbolic_trace`` or ``torch.export``.

The captured module is a plain ``torch.fx.GraphModule`` that

* is called exactly like the model (same arguments, same output structure),
* owns its module tree (fresh container objects) but shares every parameter with the
  model: no weight is copied, so capturing a 7B model costs no weight memory;
* owns copies of the model's buffers (batch-norm statistics change in training, and
  training the capture must never change the model),
* follows ``.train()`` / ``.eval()`` (see :mod:`onelora_fx.modes`), also when it came
  from ``torch.export``, whose ``.module()`` refuses both.
"""

from __future__ import annotations

import copy
import enum
import inspect
import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn
from torch.export import Dim

from . import modes

__all__ = ["Capture", "CaptureError", "Captured", "capture", "copy_graph_module", "own_module_tree", "own_buffers"]

log = logging.getLogger(__name__)


class Capture(str, enum.Enum):
    """How a model was (or should be) captured."""

    AUTO = "auto"
    FX = "fx"
    EXPORT = "export"
    #: no graph capture worked; layers were adapted in place of the modules (fallback)
    MODULE = "module"


class CaptureError(RuntimeError):
    """No graph capture could take the model; ``reasons`` says why for each method."""

    def __init__(self, message: str, reasons: dict[str, BaseException]):
        super().__init__(message)
        self.reasons = reasons


@dataclass
class Captured:
    gm: torch.fx.GraphModule
    method: Capture
    #: buffer name -> the model's tensor (the capture holds a copy)
    buffers: dict[str, torch.Tensor]


def own_module_tree(root: nn.Module, _memo: Optional[dict[int, nn.Module]] = None) -> None:
    """Replace every submodule of ``root`` by a shallow copy that shares its tensors.

    After this, registering a parameter on a submodule of ``root`` (or swapping its
    class, or switching its mode) cannot touch the module it was copied from, while the
    parameter and buffer tensors stay the very same objects. A module reachable by two
    paths stays one module.
    """
    memo = {} if _memo is None else _memo
    for name, child in list(root._modules.items()):
        if child is None:
            continue
        if id(child) not in memo:
            twin = copy.copy(child)
            twin._parameters = dict(child._parameters)
            twin._buffers = dict(child._buffers)
            twin._non_persistent_buffers_set = set(child._non_persistent_buffers_set)
            twin._modules = dict(child._modules)
            memo[id(child)] = twin
            own_module_tree(twin, memo)
        root._modules[name] = memo[id(child)]


def copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A second GraphModule over a copy of ``gm``'s graph and module tree, sharing every
    tensor: what a pass that must not change its input works on."""
    new = torch.fx.GraphModule.__new__(torch.fx.GraphModule)  # its own class: forward lives there
    new.__dict__ = dict(gm.__dict__)
    new._parameters = dict(gm._parameters)
    new._buffers = dict(gm._buffers)
    new._modules = dict(gm._modules)
    new.meta = dict(gm.meta)
    type(new).__name__ = type(gm).__name__
    own_module_tree(new)
    with warnings.catch_warnings():  # torch's own pytree spec copy warns about itself
        warnings.simplefilter("ignore", FutureWarning)
        graph = copy.deepcopy(gm.graph)
    new.graph = graph  # sets owning_module and recompiles
    return new


def own_buffers(root: nn.Module) -> dict[str, torch.Tensor]:
    """Give ``root`` copies of its buffers; returns ``{name: the original tensor}``."""
    originals: dict[str, torch.Tensor] = {}
    slots = []  # every (module, name) holding a buffer, a shared module listed once
    for prefix, module in root.named_modules(remove_duplicate=False):
        for name, buf in module._buffers.items():
            if buf is not None:
                originals[f"{prefix}.{name}" if prefix else name] = buf
                slots.append((module, name, buf))
    copies: dict[int, torch.Tensor] = {}
    for module, name, buf in slots:
        if id(buf) not in copies:
            copies[id(buf)] = buf.clone()
        module._buffers[name] = copies[id(buf)]
    return originals


def auto_dynamic_shapes(model: nn.Module, args: tuple, kwargs: dict) -> Any:
    """Every dimension of every tensor input as ``Dim.AUTO``: torch.export keeps a dim
    dynamic unless the model pins it (channels, hidden sizes), so batch and sequence
    lengths other than the examples' work without the user naming them. Dimensions of
    size 1 stay static (torch would specialize them): use examples of 2 or more."""

    def spec(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            # size-1 dims would be specialized anyway (with a warning per dim)
            return {d: Dim.AUTO for d in range(value.dim()) if value.shape[d] != 1} or None
        if isinstance(value, (list, tuple)):
            return type(value)(spec(v) for v in value)
        if isinstance(value, dict):
            return {k: spec(v) for k, v in value.items()}
        return None

    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError:
        return None  # the example does not fit the signature: let export say so
    shapes = {}
    for name, value in bound.arguments.items():
        param = bound.signature.parameters[name]
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            shapes[name] = tuple(spec(v) for v in value)
        elif param.kind is inspect.Parameter.VAR_KEYWORD:
            shapes[name] = {k: spec(v) for k, v in value.items()}
        else:
            shapes[name] = spec(value)
    return shapes


def _trace_fx(model: nn.Module, args: tuple, kwargs: dict, dynamic: bool) -> torch.fx.GraphModule:
    return torch.fx.symbolic_trace(model)


def _trace_export(model: nn.Module, args: tuple, kwargs: dict, dynamic: bool) -> torch.fx.GraphModule:
    shapes = auto_dynamic_shapes(model, args, kwargs) if dynamic else None
    ep = torch.export.export(model, args, kwargs, dynamic_shapes=shapes, strict=False)
    exported = ep.module()
    # A plain GraphModule over the same graph: torch's .module() disables train/eval.
    gm = torch.fx.GraphModule(exported, exported.graph, class_name=type(model).__name__)
    for attr in ("_in_spec", "_out_spec"):
        if hasattr(exported, attr):
            setattr(gm, attr, getattr(exported, attr))
    return gm


@contextmanager
def _mode(model: nn.Module, training: bool) -> Iterator[None]:
    flags = {m: m.training for m in model.modules()}
    model.train(training)
    try:
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


def _trace_both_modes(trace: Callable[..., torch.fx.GraphModule], model: nn.Module, *inputs: Any) -> torch.fx.GraphModule:
    """Trace in training and in eval mode, and keep one graph that is right in both.

    A trace bakes the mode in. When the two traces differ only in the arguments
    :mod:`modes` knows (dropout flags and probabilities, batch-norm's ``training``),
    the training trace with those arguments routed through the mode node is exact in
    both modes. When the model branches on ``self.training`` in Python (DiT's label
    dropout, router jitter), no single graph is: keep the eval trace, which is what
    evaluation and deployment run, and say so.
    """
    with _mode(model, True):
        train_gm = trace(model, *inputs)
    with _mode(model, False):
        eval_gm = trace(model, *inputs)
    difference = modes.first_difference(train_gm.graph, eval_gm.graph)
    if difference is None:
        return train_gm
    warnings.warn(
        f"{type(model).__name__} runs different ops in training than in eval mode "
        f"(Python code that branches on self.training; first difference: {difference}). "
        "The adapted graph is the eval-mode one: exact for evaluation, merge and export, "
        "but training runs without train-only ops (dropout, label or layer dropout).",
        stacklevel=4,
    )
    return eval_gm


def capture(
    model: nn.Module,
    example_inputs: Optional[Sequence[Any]] = None,
    example_kwargs: Optional[dict[str, Any]] = None,
    *,
    method: Capture | str = Capture.AUTO,
    dynamic: bool = True,
) -> Captured:
    """Capture ``model`` as a GraphModule that shares its parameters.

    ``method="auto"`` tries ``torch.fx.symbolic_trace`` first (no inputs needed), then
    ``torch.export`` (needs ``example_inputs`` / ``example_kwargs``).

    Example:
        >>> cap = capture(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
        >>> cap.method
        <Capture.FX: 'fx'>

    Raises:
        ValueError: export is needed but no example inputs were given.
        CaptureError: no method could capture the model (``reasons`` has each error).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module to capture, got {type(model).__name__}")
    method = Capture(method)
    if method is Capture.MODULE:
        raise ValueError("capture='module' is not a graph capture; use 'auto', 'fx' or 'export'")
    reasons: dict[str, BaseException] = {}
    gm = None
    used = method
    if method in (Capture.AUTO, Capture.FX):
        try:
            gm = _trace_both_modes(_trace_fx, model, (), {}, dynamic)
            used = Capture.FX
        except Exception as e:  # fx raises many types (TraceError, ValueError, TypeError...)
            reasons["fx"] = e
            log.info("symbolic_trace failed for %s: %s", type(model).__name__, e)
            if method is Capture.FX:
                raise CaptureError(
                    f"torch.fx.symbolic_trace cannot capture {type(model).__name__}: "
                    f"{type(e).__name__}: {e}\nUse capture='export' with example_inputs.",
                    reasons,
                ) from e
    if gm is None:
        if example_inputs is None and example_kwargs is None:
            why = f" (symbolic_trace failed: {type(reasons['fx']).__name__}: {_first_line(reasons['fx'])})" if reasons else ""
            raise ValueError(
                f"{type(model).__name__} needs torch.export to be captured{why}; pass "
                "example_inputs=(...) and/or example_kwargs={...} as you would call the model"
            )
        # A view as example makes export guard on its base's size; give it fresh tensors.
        args, kwargs = torch.utils._pytree.tree_map_only(
            torch.Tensor,
            lambda t: t.clone() if t._base is not None else t,
            (tuple(example_inputs or ()), dict(example_kwargs or {})),
        )
        try:
            gm = _trace_both_modes(_trace_export, model, args, kwargs, dynamic)
            used = Capture.EXPORT
        except Exception as e:
            reasons["export"] = e
            detail = "\n".join(f"  {k}: {type(v).__name__}: {_first_line(v)}" for k, v in reasons.items())
            raise CaptureError(
                f"no graph capture works for {type(model).__name__}:\n{detail}\n"
                "Data-dependent Python control flow (if on a tensor value, loops over "
                "data) cannot be captured; capture='auto' falls back to adapting the "
                "nn.Linear / Conv1D modules directly.",
                reasons,
            ) from e
    own_module_tree(gm)
    _keep_non_persistent(model, gm)
    buffers = own_buffers(gm)
    modes.follow_train_eval(gm)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    gm.train(model.training)
    return Captured(gm, used, buffers)


def _keep_non_persistent(model: nn.Module, gm: nn.Module) -> None:
    """GraphModule re-registers every buffer as persistent; the model's non-persistent
    ones (rotary tables, position ids) must stay out of the state dict."""
    for path, module in model.named_modules():
        for name in module._non_persistent_buffers_set:
            fqn = f"{path}.{name}" if path else name
            owner_path, _, leaf = fqn.rpartition(".")
            try:
                owner = gm.get_submodule(owner_path)
            except AttributeError:
                continue  # the graph does not use it
            if leaf in owner._buffers:
                owner._non_persistent_buffers_set.add(leaf)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
