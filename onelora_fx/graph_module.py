"""CapturedModule: the graph form's module, called exactly like the model it came from.

A ``torch.fx.GraphModule`` whose module tree is its own (fresh containers, the model's
tensors, copies of the buffers) and which keeps the model it was captured from, so that
it can capture the model again when a graph no longer fits:

* **Calls.** An export graph serves one call structure (see :mod:`onelora_fx.calls`). A
  call the captured graphs do not serve (another keyword, a ``None``, a flag, a size-1
  dimension that was specialized) is captured on first use as another graph over the
  same tensors and adapted with the same vectors; one log line per new signature.
* **Moves.** ``to(device)`` rewrites the device constants export baked into the graphs.
  ``to(dtype)`` captures the model again at the new dtype first (on the meta device:
  no memory, and nothing changes if it fails), because a graph cannot tell the dtype
  constants derived from the weights (``.to(input_dtype)``) from the literal ones
  (an RMSNorm's ``.to(torch.float32)``). ``to_empty`` from ``meta`` zeroes the 1LoRA
  vectors and rebuilds non-persistent buffers (:mod:`onelora_fx.materialize`).

``symbolic_trace`` graphs need none of this: they take the model's calls as they are
and hold no device or dtype constants.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Callable, Optional

import torch
from torch import fx, nn

from .calls import CallGraph, Signature
from .capture import Capture, CaptureError, SharedView, Traced, first_line, trace
from .compat import GUARDS_PREFIX, pytree, route_forward, set_flat_codegen
from .copying import copy_module_tree
from .materialize import after_move
from .modes import follow_train_eval
from .rewrite import IDS, STACK, adapt_like
from .sites import join, resolve_attr
from .state import get_state

__all__ = ["CapturedModule", "Source", "MoveError"]

log = logging.getLogger(__name__)

_SOURCE = "onelora_source"
_PRIMARY = "onelora_primary"
_MORE = "_onelora_calls"  # graphs captured on first use (a cache: copies start without them)


class MoveError(RuntimeError):
    """A device or dtype move of a captured module that cannot be made."""


class Source:
    """The model a graph was captured from, and how: what a new capture needs.

    Shared, never copied: every copy of a captured module captures from one model.
    """

    def __init__(self, model: nn.Module, method: Capture, dynamic: bool):
        self.model = model
        self.method = method
        self.dynamic = dynamic
        self.signature = Signature(model.forward)

    def __deepcopy__(self, memo: dict) -> "Source":
        return self


def _tensors(root: nn.Module) -> dict[str, torch.Tensor]:
    out = dict(root.named_parameters(remove_duplicate=False))
    out.update(root.named_buffers(remove_duplicate=False))
    return out


def _set_tensor(module: nn.Module, fqn: str, value: torch.Tensor) -> None:
    owner, _, leaf = fqn.rpartition(".")
    m = module.get_submodule(owner) if owner else module
    if leaf in m._parameters:
        m._parameters[leaf] = value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False)
    else:
        m._buffers[leaf] = value


def _compile(root: nn.Module, graph: fx.Graph) -> Callable[..., Any]:
    """``forward(self, *leaves)`` for ``graph``, reading its attributes from ``self``."""
    return type(fx.GraphModule(root, graph)).forward


def _rewrite_devices(graph: fx.Graph, moves: dict[torch.device, torch.device]) -> int:
    """Replace every device constant in ``graph`` by where it moved; returns the count."""
    count = 0

    def move(a: Any) -> Any:
        nonlocal count
        if isinstance(a, torch.device) and a in moves:
            count += 1
            return moves[a]
        if isinstance(a, (list, tuple)):
            return type(a)(move(x) for x in a)
        return a

    for node in graph.nodes:
        node.args = tuple(move(a) for a in node.args)
        node.kwargs = {k: move(v) for k, v in node.kwargs.items()}
    return count


class CapturedModule(fx.GraphModule):
    """A captured graph that is called like the model and moves like it."""

    # ------------------------------------------------------------------ building

    @classmethod
    def build(cls, model: nn.Module, traced: Traced, dynamic: bool) -> "CapturedModule":
        """The module for a first capture of ``model``: its own module tree over the
        model's tensors, its own buffers, the graph following ``train()`` / ``eval()``."""
        root = cls(traced.module, traced.module.graph, class_name=type(model).__name__)
        memo: dict[int, nn.Module] = {}
        for name, child in list(root._modules.items()):
            if child is not None:
                root._modules[name] = copy_module_tree(child, memo)
        _keep_non_persistent(model, root)
        root.meta[_SOURCE] = Source(model, traced.method, dynamic)
        if traced.method is Capture.EXPORT:
            root.meta[_PRIMARY] = CallGraph.of(traced.args, traced.kwargs or {}, traced.in_spec, traced.out_spec, dynamic)
            set_flat_codegen(root.graph)
        follow_train_eval(root, root.graph)
        root.graph.eliminate_dead_code()
        root.graph.lint()
        root.recompile()
        root.train(model.training)
        return root

    @property
    def source(self) -> Optional[Source]:
        return self.__dict__.get("meta", {}).get(_SOURCE)

    def recompile(self):  # type: ignore[override]
        code = super().recompile()
        # every call goes through _call, which picks the graph that serves it
        type(self)._onelora_graph_forward = route_forward(self, _make_forward(self))
        return code

    def __reduce__(self):
        source = self.source
        if source is not None and source.method is Capture.EXPORT:
            raise TypeError(
                "a module captured with torch.export cannot be pickled (its graph holds export's "
                "guard functions); save gm.state_dict() or the adapter (ol.save_adapter) and "
                "build it again with ol.transform"
            )
        return super().__reduce__()

    def as_plain_module(self) -> nn.Module:
        """This module as a plain ``nn.Module`` (same containers, same names, called the
        same way): what ``torch.export`` must be given, because it runs any GraphModule's
        graph directly with the call's values in order, bypassing the call handling."""
        signature = getattr(type(self).forward, "__signature__", None)
        if signature is not None:
            params = list(signature.parameters.values())[1:]  # no self
            if self.meta.get(STACK):  # a stack takes one more keyword
                params.insert(next((i for i, p in enumerate(params) if p.kind is p.VAR_KEYWORD), len(params)),
                              inspect.Parameter(IDS, inspect.Parameter.KEYWORD_ONLY))
            signature = signature.replace(parameters=params)
        return SharedView(self, lambda *args, **kwargs: self._call(args, kwargs), signature)

    # ------------------------------------------------------------------ calls

    @staticmethod
    def forget_calls(root: nn.Module) -> None:
        """Drop the graphs captured on first use (after the adaptation changed): each is
        captured again, as ``root`` is now, when its call comes."""
        root.__dict__.pop(_MORE, None)

    def _call(self, args: tuple, kwargs: dict) -> Any:
        # a stack's graphs take each batch item's adapter as one more (last) input
        extra = {IDS: kwargs.pop(IDS, None)} if self.meta.get(STACK) else {}
        primary: Optional[CallGraph] = self.meta.get(_PRIMARY)
        if primary is None:  # symbolic_trace: the graph takes calls as the model does
            return type(self)._onelora_graph_forward(self, *args, **kwargs, **extra)
        args, kwargs = self.source.signature.canonical(args, kwargs)
        leaves, spec = pytree.tree_flatten((args, kwargs))
        flat = [*leaves, *extra.values()]
        if primary.accepts(spec, leaves):
            return primary.unflatten(type(self)._onelora_graph_forward(self, *flat))
        for call in self.__dict__.get(_MORE, ()):
            if call.accepts(spec, leaves):
                return call.unflatten(call.forward(self, *flat))
        call = self._capture_call(args, kwargs)
        return call.unflatten(call.forward(self, *flat))

    def _capture_call(self, args: tuple, kwargs: dict) -> CallGraph:
        source = self.source
        shown = ", ".join(f"{k}={_show(v)}" for k, v in kwargs.items())
        log.info("%s: capturing a graph for a new call (%s)", type(source.model).__name__, shown)
        try:
            traced = trace(self.shadow(), args, kwargs, Capture.EXPORT, source.dynamic)
        except CaptureError as e:
            raise CaptureError(
                f"{type(source.model).__name__} was called as ({shown}), unlike the calls captured so far, "
                f"and that call cannot be captured: {why(e)}. Call it as in the example, or adapt it "
                "with capture='module'.",
                e.reasons,
            ) from e
        graph = self._adopt(traced)
        call = CallGraph.of(args, kwargs, traced.in_spec, traced.out_spec, source.dynamic, graph=graph,
                            forward=_compile(self, graph))
        self.__dict__[_MORE] = (*self.__dict__.get(_MORE, ()), call)
        return call

    def _adopt(self, traced: Traced) -> fx.Graph:
        """Make a graph captured from :meth:`shadow` a graph of this module: attributes
        it reads, guards, the mode flag, flat inputs, and this module's adaptation."""
        graph = traced.module.graph
        graph.owning_module = self  # its targets are this module's now
        for node in graph.nodes:
            if node.op == "get_attr" and resolve_attr(self, node.target) is None:
                _register(self, str(node.target), resolve_attr(traced.module, node.target))
            elif node.op == "call_module" and str(node.target).startswith(GUARDS_PREFIX):
                name = _free_name(self, GUARDS_PREFIX)
                self.add_submodule(name, traced.module.get_submodule(str(node.target)))
                node.target = name
        follow_train_eval(self, graph)
        set_flat_codegen(graph)
        adapt_like(self, graph)
        graph.eliminate_dead_code()
        graph.lint()
        return graph

    def shadow(self, dtypes: Optional[dict[torch.dtype, torch.dtype]] = None) -> nn.Module:
        """The model's module tree over this module's current tensors, to capture from.

        With ``dtypes``, every tensor is a meta stand-in in its new dtype instead.
        """
        model = self.source.model
        shadow = copy_module_tree(model)
        current = _tensors(self)
        names: dict[int, list[str]] = {}
        for name, t in _tensors(model).items():
            names.setdefault(id(t), []).append(name)
        for group in names.values():
            value = next((current[n] for n in group if n in current), None)
            if value is None:
                value = shadow.get_parameter(group[0]) if _is_param(shadow, group[0]) else shadow.get_buffer(group[0])
            if dtypes is not None:
                meta = torch.empty_like(value, device="meta", dtype=dtypes.get(value.dtype, value.dtype))
                value = nn.Parameter(meta, requires_grad=value.requires_grad) if isinstance(value, nn.Parameter) else meta
            for n in group:
                _set_tensor(shadow, n, value)
        return shadow

    # ------------------------------------------------------------------ moves

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True):  # type: ignore[override]
        moves = _probe(self, fn)
        devices = {d: d2 for (_, d), (_, d2) in moves.items() if d != d2}
        dtypes = {t: t2 for (t, _), (t2, _) in moves.items() if t != t2 and t.is_floating_point}
        source = self.source
        recaptured = None
        if dtypes and source is not None and source.method is Capture.EXPORT:
            recaptured = self._recapture(dtypes)
        result = super()._apply(fn, recurse)
        if recaptured is not None:
            graph, primary = recaptured
            devices = {torch.device("meta"): _device_of(self), **devices}
            _rewrite_devices(graph, devices)
            self.meta[_PRIMARY] = primary
            self.__dict__.pop(_MORE, None)
            self.graph = graph
        elif devices and source is not None and source.method is Capture.EXPORT:
            if _rewrite_devices(self.graph, devices):
                self.recompile()
            more = []
            for call in self.__dict__.get(_MORE, ()):
                _rewrite_devices(call.graph, devices)
                call.forward = _compile(self, call.graph)
                more.append(call)
            self.__dict__[_MORE] = tuple(more)
        if devices:  # what went to meta lost its values, what left it gets them
            state = get_state(self)
            after_move(self, state.vectors if state else (), state.model if state else source.model if source else None)
        return result

    def _recapture(self, dtypes: dict[torch.dtype, torch.dtype]) -> tuple[fx.Graph, CallGraph]:
        """The primary call captured again with every tensor in its new dtype."""
        primary: CallGraph = self.meta[_PRIMARY]
        model = self.source.model
        args, kwargs = pytree.tree_map_only(
            torch.Tensor, lambda t: t.to(dtypes.get(t.dtype, t.dtype)), primary.example
        )
        moving = ", ".join(f"{a} -> {b}" for a, b in dtypes.items())
        try:
            traced = trace(self.shadow(dtypes), args, kwargs, Capture.EXPORT, self.source.dynamic)
        except CaptureError as e:
            raise MoveError(
                f"cannot move {type(model).__name__} ({moving}): its graph must be captured again in the "
                f"new dtype and that capture fails: {why(e)}. Nothing was changed. Cast the model, then "
                "transform it: ol.transform(model.to(dtype), ...)."
            ) from e
        graph = self._adopt(traced)
        return graph, CallGraph.of(args, kwargs, traced.in_spec, traced.out_spec, self.source.dynamic)


def why(e: CaptureError) -> str:
    reason = e.reasons.get("export") or next(iter(e.reasons.values()), e)
    from .capture import why_export_failed

    return why_export_failed(reason) if isinstance(reason, BaseException) else first_line(e)


def _make_forward(module: CapturedModule) -> Callable[..., Any]:
    def forward(self: CapturedModule, *args: Any, **kwargs: Any) -> Any:
        return self._call(args, kwargs)

    source = module.__dict__.get("meta", {}).get(_SOURCE)
    if source is not None and source.signature.signature is not None:
        params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        params += list(source.signature.signature.parameters.values())
        forward.__signature__ = inspect.Signature(params)  # what Trainer and others inspect
    return forward


def _show(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"Tensor{list(value.shape)}"
    return repr(value) if not isinstance(value, (list, tuple, dict)) else type(value).__name__


def _is_param(module: nn.Module, fqn: str) -> bool:
    owner, _, leaf = fqn.rpartition(".")
    return leaf in (module.get_submodule(owner) if owner else module)._parameters


def _register(root: nn.Module, fqn: str, value: Any) -> None:
    """Give ``root`` an attribute a newly captured graph reads: a parameter (shared,
    frozen), or a copy of a buffer (the adapted module owns its buffers)."""
    owner, _, leaf = fqn.rpartition(".")
    module = root
    for part in owner.split(".") if owner else ():
        if not hasattr(module, part):
            module.add_module(part, nn.Module())
        module = getattr(module, part)
    if isinstance(value, nn.Parameter):
        value.requires_grad_(False)
        module.register_parameter(leaf, value)
    elif isinstance(value, torch.Tensor):
        module.register_buffer(leaf, value.clone())
    else:
        setattr(module, leaf, value)


def _free_name(root: nn.Module, stem: str) -> str:
    i = 1
    while hasattr(root, f"{stem}_{i}"):
        i += 1
    return f"{stem}_{i}"


def _probe(root: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> dict[tuple, tuple]:
    """``{(dtype, device): (dtype, device)}``: what ``fn`` does to each kind of tensor
    the module holds, learnt from empty tensors before anything moves."""
    kinds = {(t.dtype, t.device) for t in _tensors(root).values() if t is not None}
    out = {}
    for dtype, device in kinds:
        probe = fn(torch.empty(0, dtype=dtype, device=device))
        out[(dtype, device)] = (probe.dtype, probe.device)
    return out


def _device_of(root: nn.Module) -> torch.device:
    for t in _tensors(root).values():
        if t.is_floating_point():
            return t.device
    return torch.device("cpu")


def _keep_non_persistent(model: nn.Module, gm: nn.Module) -> None:
    """GraphModule re-registers every buffer as persistent; the model's non-persistent
    ones (rotary tables, position ids) must stay out of the state dict."""
    for path, module in model.named_modules():
        for name in module._non_persistent_buffers_set:
            owner_path, _, leaf = join(path, name).rpartition(".")
            try:
                owner = gm.get_submodule(owner_path)
            except AttributeError:
                continue  # the graph does not use it
            if leaf in owner._buffers:
                owner._non_persistent_buffers_set.add(leaf)
