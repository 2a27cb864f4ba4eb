"""nn.Module -> graph: ``torch.fx.symbolic_trace`` or ``torch.export`` (non-strict).

:func:`trace` captures one call of a model in training and in eval mode and keeps one
graph that is right in both (see :mod:`onelora_fx.modes`). It does not own anything:
:class:`onelora_fx.graph_module.CapturedModule` builds the adapted module around the
graph. ``symbolic_trace`` needs no inputs and keeps the model's calling convention;
``torch.export`` needs example inputs, bakes the call's structure in (see
:mod:`onelora_fx.calls`), and is given every input dimension as ``Dim.AUTO`` so other
batch sizes and sequence lengths work.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
from torch import fx, nn
from torch.export import Dim
from torch.overrides import TorchFunctionMode

from . import modes
from .regions import inline_regions
from ...compat import export_specs, is_view, pytree, set_grad_enabled
from ...state import Capture

__all__ = ["CaptureError", "NeedsExample", "Traced", "trace", "auto_dynamic_shapes", "first_line", "SharedView", "exportable", "mode_note"]

log = logging.getLogger(__name__)


class NeedsExample(ValueError):
    """The model needs ``torch.export`` to be captured, and no example inputs were given."""


class CaptureError(RuntimeError):
    """No graph capture could take the model; ``reasons`` says why for each method."""

    def __init__(self, message: str, reasons: dict[str, BaseException]):
        super().__init__(message)
        self.reasons = reasons


@dataclass
class Traced:
    """One captured call: the graph and the module its ``get_attr`` targets name."""

    module: fx.GraphModule
    method: Capture
    #: the call as captured, canonical (export only; fx graphs take any call)
    args: tuple = ()
    kwargs: Optional[dict[str, Any]] = None
    in_spec: Any = None
    out_spec: Any = None
    #: the model runs other ops in training than in eval mode (Python that branches on
    #: ``self.training``): the graph is the eval trace, and training calls need a graph
    #: of their own (captured with ``training=True``); the first difference, for the log
    mode_note: Optional[str] = None


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def why_export_failed(e: BaseException) -> str:
    """The cause of an export failure, said in the user's terms."""
    text = str(e)
    if "in output, which is not a known type" in text:
        kind = text.split("Found ", 1)[-1].split(" in output", 1)[0].strip("<>").replace("class '", "").strip("'")
        return (
            f"the model returns a {kind}, which torch.export cannot return (a KV cache object is "
            "no graph value); call it with use_cache=False for a graph"
        )
    if "data-dependent" in text.lower() or "GuardOnDataDependent" in type(e).__name__:
        return (
            "data-dependent Python control flow (an `if` on a tensor's value, a loop over data): "
            f"{first_line(e)}"
        )
    return f"{type(e).__name__}: {first_line(e)}"


def auto_dynamic_shapes(model: nn.Module, args: tuple, kwargs: dict) -> Any:
    """Every dimension of every tensor input as ``Dim.AUTO``: torch.export keeps a dim
    dynamic unless the model pins it (channels, hidden sizes). Dimensions of size 1
    stay static (torch would specialize them anyway, with a warning per dim), and so do
    the sizes of an image (a floating tensor of 4 or more dims: only its batch is
    dynamic): symbolic window partitions and patch grids can take torch's shape
    reasoning minutes (Swin: past the sweep's 3-minute limit on a tiny config), and another resolution is
    simply another capture."""

    def spec(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            dims = range(1) if value.is_floating_point() and value.dim() >= 4 else range(value.dim())
            return {d: Dim.AUTO for d in dims if value.shape[d] != 1} or None
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
        kind = bound.signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            shapes[name] = tuple(spec(v) for v in value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            shapes[name] = {k: spec(v) for k, v in value.items()}
        else:
            shapes[name] = spec(value)
    return shapes


def fresh_examples(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Examples export can take as given: a view gets its own storage (export would
    guard on its base's size), and a tensor passed for two inputs (``input_ids`` and
    ``labels``) is given a copy for the second, so the graph keeps two inputs."""
    seen: set[int] = set()

    def fresh(t: torch.Tensor) -> torch.Tensor:
        if id(t) in seen or is_view(t):
            t = t.clone()
        seen.add(id(t))
        return t

    return pytree.tree_map_only(torch.Tensor, fresh, (tuple(args), dict(kwargs)))


def _grad_and_autocast() -> tuple:
    """The modes a ``with`` block in a forward can change that a graph must keep."""
    return (torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
            *(torch.is_autocast_enabled(d) and torch.get_autocast_dtype(d) for d in ("cpu", "cuda")))


class _Tracer(fx.Tracer):
    """``symbolic_trace``'s tracer, except that it does not stop at a torch.nn module
    that contains linear layers (``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``):
    their linears would be invisible inside a leaf. It traces into them instead (and
    fails where their code cannot be traced, so ``capture='auto'`` takes export)."""

    def trace(self, root: Any, concrete_args: Optional[dict[str, Any]] = None) -> fx.Graph:
        self._modes = _grad_and_autocast()
        return super().trace(root, concrete_args)

    def create_node(self, *args: Any, **kwargs: Any) -> fx.Node:
        # symbolic_trace runs `with torch.no_grad():` / `torch.autocast(...)` while tracing
        # and records none of it: the graph would train what the model keeps frozen.
        # Refuse, and `capture='auto'` takes torch.export, which keeps those blocks.
        if _grad_and_autocast() != self._modes:
            function = _applied_function()
            if function is not None:
                raise RuntimeError(
                    f"{function.__module__}.{function.__qualname__} is a torch.autograd.Function with a backward of "
                    "its own, which torch.fx.symbolic_trace does not record; use capture='module'"
                )
            raise RuntimeError(
                "the forward changes the grad mode or autocast (torch.no_grad(), torch.autocast(...)), "
                "which torch.fx.symbolic_trace does not record; use capture='export'"
            )
        return super().create_node(*args, **kwargs)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if not super().is_leaf_module(m, qualname):
            return False
        if isinstance(m, nn.Linear):
            return True
        return not any(isinstance(sub, nn.Linear) for sub in m.modules()) and not any(
            p.dim() == 2 and name.endswith("proj_weight") for name, p in m.named_parameters()
        )


def _trace_fx(model: nn.Module, args: tuple, kwargs: dict, dynamic: bool) -> Traced:
    tracer = _Tracer()
    # symbolic_trace stores each tensor the forward creates (torch.tensor(...), a mask)
    # on the traced model as `_tensor_constantN`: the graph module takes them, the
    # user's model must not keep them (and a second trace would name them otherwise)
    before = set(model.__dict__)
    try:
        graph = tracer.trace(model)
        name = model.__class__.__name__ if isinstance(model, nn.Module) else model.__name__
        gm = fx.GraphModule(tracer.root, graph, name)
    except Exception as e:  # the model's own code under symbolic tracing: any type (TraceError, TypeError, ...)
        raise CaptureError(f"torch.fx.symbolic_trace cannot capture {type(model).__name__}: {type(e).__name__}: {e}",
                           {"fx": e}) from e
    finally:
        for key in set(model.__dict__) - before:
            del model.__dict__[key]
    return Traced(gm, Capture.FX)


class SharedView(nn.Module):
    """A plain module over another module's own containers (the same parameters,
    buffers and submodules under the same names) with a forward of its own: what
    ``torch.export`` is given when the module itself does not fit it."""

    def __init__(self, module: nn.Module, forward: Callable[..., Any], signature: Optional[inspect.Signature]):
        super().__init__()
        for name in ("_parameters", "_buffers", "_modules"):
            self.__dict__[name] = module.__dict__[name]
        self.training = module.training
        if signature is not None:  # export binds dynamic shapes to these names
            forward.__signature__ = signature
        self.__dict__["forward"] = forward


def exportable(model: nn.Module, kwargs: dict) -> nn.Module:
    """``model``, or a view of it whose signature names the keywords a call passes
    through ``**kwargs`` (torch.export cannot give those dynamic shapes)."""
    signature = inspect.signature(model.forward)
    params = list(signature.parameters.values())
    var = next((p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    extra = [k for k in kwargs if k not in signature.parameters]
    if var is None or not extra:
        return model
    named = [p for p in params if p is not var] + [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY) for k in extra]
    return SharedView(model, lambda *a, **k: model(*a, **k), signature.replace(parameters=named))


class _FunctionWatch(TorchFunctionMode):
    """Finds a custom ``torch.autograd.Function`` run while a model is exported.

    Non-strict ``torch.export`` records the ops of such a Function's forward and drops its
    backward: the graph's gradients would be autograd's through the forward, not the
    model's (YOSO's attention has a backward of its own; a gradient-reversal layer would
    flip a sign). Autograd runs the forward with grad mode off, switched in C++, so a
    torch call that sees grad mode off where the model's Python did not switch it off
    (``torch._C._set_grad_enabled``, which ``torch.no_grad()`` calls) is inside one; the
    Function is the ``cls`` of the ``Function.apply`` frame above it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.grad = torch.is_grad_enabled()
        self.found: Optional[type] = None

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        if func is set_grad_enabled:
            self.grad = bool(args[0])
        elif self.found is None and self.grad and not torch.is_grad_enabled():
            self.found = _applied_function()
        return func(*args, **(kwargs or {}))


def _applied_function() -> Optional[type]:
    frame = inspect.currentframe()
    while frame is not None:
        if frame.f_code.co_name == "apply" and frame.f_code.co_filename == torch.autograd.function.__file__:
            cls = frame.f_locals.get("cls")
            if isinstance(cls, type) and issubclass(cls, torch.autograd.Function):
                return cls
        frame = frame.f_back
    return None


def _trace_export(model: nn.Module, args: tuple, kwargs: dict, dynamic: bool) -> Traced:
    target = exportable(model, kwargs)
    shapes = auto_dynamic_shapes(target, args, kwargs) if dynamic else None
    with warnings.catch_warnings(), _FunctionWatch() as watch:  # torch warns about every size-1 dim it specializes
        warnings.filterwarnings("ignore", message=".*specialized.*")
        ep = torch.export.export(target, args, kwargs, dynamic_shapes=shapes, strict=False)
    if watch.found is not None:
        name = f"{watch.found.__module__}.{watch.found.__qualname__}"
        raise RuntimeError(
            f"{type(model).__name__} calls {name}, a torch.autograd.Function with a backward of its own, which "
            "torch.export does not keep (the graph's gradients would not be the model's); use capture='module', "
            "which runs it as written"
        )
    exported = ep.module()
    in_spec, out_spec = export_specs(exported.graph)
    # A plain GraphModule over the same graph: torch's .module() disables train/eval.
    gm = fx.GraphModule(exported, exported.graph, class_name=type(model).__name__)
    inline_regions(gm)  # linears under torch.no_grad() / autocast, where every pass sees them
    return Traced(gm, Capture.EXPORT, args, kwargs, in_spec, out_spec)


@contextmanager
def _mode(model: nn.Module, training: bool) -> Iterator[None]:
    flags = {m: m.training for m in model.modules()}
    model.train(training)
    try:
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


def _both_modes(how: Callable[..., Traced], model: nn.Module, args: tuple, kwargs: dict, dynamic: bool,
                training_only: bool = False) -> Traced:
    """Trace in training and in eval mode, and keep one graph that is right in both.

    A trace bakes the mode in. When the two traces differ only in the arguments
    :mod:`modes` knows (dropout flags and probabilities, batch-norm's ``training``),
    the training trace with those arguments routed through the mode node is exact in
    both modes. When the model branches on ``self.training`` in Python (timm's stochastic
    depth, DiT's label dropout, router jitter), no single graph is: keep the eval trace,
    which is what evaluation and deployment run, marked with ``mode_note``; the captured
    module runs training calls through a training trace (``training_only=True``).
    """
    with _mode(model, True):
        train = how(model, args, kwargs, dynamic)
    if training_only:
        return train
    with _mode(model, False):
        evaluation = how(model, args, kwargs, dynamic)
    difference = modes.first_difference(train.module.graph, evaluation.module.graph)
    if difference is None:
        return train
    evaluation.mode_note = difference
    return evaluation


def mode_note(model: nn.Module, difference: str) -> str:
    """The one log line for a model whose training and eval traces differ."""
    return (
        f"{type(model).__name__} runs different ops in training than in eval mode "
        f"(Python code that branches on self.training; first difference: {difference}). "
        "The adapted graph is the eval-mode one (evaluation, merge, export); training calls "
        "run a graph captured in training mode on the first of them."
    )


def trace(model: nn.Module, args: tuple, kwargs: dict, method: Capture, dynamic: bool,
          training_only: bool = False) -> Traced:
    """Capture one call of ``model`` with ``method`` (``AUTO``: fx, else export).

    ``args`` / ``kwargs`` are the canonical example (see :class:`onelora_fx.calls.Signature`);
    fx needs none. ``training_only``: the training-mode trace, for training calls of a
    model whose eval graph cannot follow the mode.

    Raises:
        ValueError: export is needed but there is no example.
        CaptureError: no method could capture the model (``reasons`` has each error).
    """
    reasons: dict[str, BaseException] = {}
    if method in (Capture.AUTO, Capture.FX):
        try:
            return _both_modes(_trace_fx, model, (), {}, dynamic, training_only)
        except CaptureError as e:  # raised for the model's code only: a bug of ours propagates
            reasons.update(e.reasons)
            if method is Capture.FX:
                hint = "" if "capture='module'" in str(e) else "\nUse capture='export' with example_inputs."
                raise CaptureError(f"{e}{hint}", reasons) from e.reasons["fx"]
            log.warning("symbolic_trace cannot capture %s (%s: %s); capturing it with torch.export instead",
                        type(model).__name__, type(reasons["fx"]).__name__, first_line(reasons["fx"]))
    if not args and not kwargs:
        why = f" (symbolic_trace failed: {type(reasons['fx']).__name__}: {first_line(reasons['fx'])})" if reasons else ""
        raise NeedsExample(
            f"{type(model).__name__} needs torch.export to be captured{why}; pass "
            "example_inputs=(...) and/or example_kwargs={...} as you would call the model"
        )
    args, kwargs = fresh_examples(args, kwargs)
    try:
        return _both_modes(_trace_export, model, args, kwargs, dynamic, training_only)
    except Exception as e:
        reasons["export"] = e
        causes = {"fx": f"{type(reasons['fx']).__name__}: {first_line(reasons['fx'])}"} if "fx" in reasons else {}
        causes["export"] = why_export_failed(e)
        detail = "\n".join(f"  {k}: {v}" for k, v in causes.items())
        raise CaptureError(f"no graph capture works for {type(model).__name__}:\n{detail}", reasons) from e
