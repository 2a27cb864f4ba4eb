"""CapturedModule: the graph form's module, called exactly like the model it came from.

A ``torch.fx.GraphModule`` whose module tree is its own (fresh containers, the model's
tensors, copies of the buffers) and which keeps the model it was captured from, so that
it can capture the model again when a graph no longer fits:

* **Calls.** An export graph serves one call structure (see :mod:`.calls`). A call the
  captured graphs do not serve (another keyword, a ``None``, a flag, a size-1 dimension
  that was specialized, a shape guard of the graph that fails, a call under
  ``torch.autocast``) is captured on first use as another graph over the same tensors
  and adapted with the same vectors; one log line per new signature.
* **Moves.** A capture bakes in what it saw: device and dtype constants, and the Python
  branches the model took for that device and dtype (transformers' MoE code picks a
  ``histc`` input dtype by device; ``.to(torch.float32)`` is recorded as an assertion
  that the value already is). So a move to another device or dtype (``to``, ``cuda``,
  ``bfloat16``, ``to_empty`` from ``meta``) captures the model again, after the move, on
  the moved tensors (export never reads their values: garbage after ``to_empty`` is
  fine), and drops every other graph (each is captured again on first use). If that
  capture fails, :class:`MoveError` says why; the module has moved but runs no old graph
  (each call tries the capture again). ``to_empty`` from ``meta`` also zeroes the 1LoRA
  vectors and rebuilds non-persistent buffers (:mod:`onelora_fx.forms.materialize`).

``symbolic_trace`` graphs need none of this: they take the model's calls as they are
and hold no device or dtype constants.
"""

from __future__ import annotations

import inspect
import logging
import threading
import warnings
from typing import Any, Callable, Optional

import torch
from torch import fx, nn

from .calls import CallGraph, Signature, autocast_state
from ...state import Capture
from .capture import CaptureError, SharedView, Traced, first_line, trace
from ...compat import GUARDS_PREFIX, pytree, route_forward, set_flat_codegen
from ...copying import copy_module_tree
from ..materialize import after_move
from .modes import MODE_MODULE, FollowTrainEval
from .passes import finalize
from .rewrite import IDS, STACK, adapt_like
from ...records import join, resolve_attr
from ...state import get_state

__all__ = ["CapturedModule", "Source", "MoveError"]

log = logging.getLogger(__name__)

_SOURCE = "onelora_source"
_PRIMARY = "onelora_primary"
_MORE = "_onelora_calls"  # graphs captured on first use (a cache: copies start without them)
_STALE = "_onelora_stale"  # moved since the primary graph was captured, and not captured again yet
_EVAL_ONLY = "onelora_eval_only"  # the primary graph is the eval trace: training calls need their own
_FX_TRAINING = "_onelora_fx_training"  # symbolic_trace's training-mode forward, for such a model


class GuardFailed(AssertionError):
    """A captured graph's shape guards do not hold for a call: another graph serves it."""


class _Guards(nn.Module):
    """Export's guard function for a graph (``_guards_fn``), telling a guard that fails
    (the call needs another graph) from any other error."""

    #: its call returns nothing and must never be removed as dead code
    _is_impure = True

    def __init__(self, guards: nn.Module):
        super().__init__()
        self.guards = guards

    def forward(self, *args: Any) -> Any:
        try:
            return self.guards(*args)
        except AssertionError as e:
            raise GuardFailed(str(e)) from e


def _wrap_guards(root: nn.Module, graph: fx.Graph, source: nn.Module) -> None:
    """Give each guard call of ``graph`` (a submodule of ``source``) a :class:`_Guards`
    of its own in ``root``."""
    for node in graph.nodes:
        if node.op == "call_module" and str(node.target).startswith(GUARDS_PREFIX):
            guards = source.get_submodule(str(node.target))
            if isinstance(guards, _Guards):
                continue
            name = str(node.target) if root is source else _free_name(root, GUARDS_PREFIX)
            if root is source:
                root._modules[name] = _Guards(guards)
            else:
                root.add_submodule(name, _Guards(guards))
            node.target = name


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
        # one capture at a time (torch.export is not thread-safe): threads making first
        # calls with new signatures wait, and a call captured meanwhile is served
        self.lock = threading.RLock()

    def __deepcopy__(self, memo: dict) -> "Source":
        return self

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.lock = threading.RLock()


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


#: the model's attributes a captured module never answers for it: it has its own
#: (moved, cast or switched since), or they describe the model's own code
_OWN_STATE = frozenset({"device", "dtype", "training", "forward"})
#: parts of a transformers model that trainers run on their own (TRL's fused LM head runs
#: ``base_model`` and then ``get_output_embeddings()``): answered by the module-form twin
_TWIN = frozenset({"base_model", "get_output_embeddings", "get_input_embeddings", "get_decoder"})
_TWIN_KEY = "_onelora_twin"


class CapturedModule(fx.GraphModule):
    """A captured graph that is called like the model and moves like it.

    It answers for the model's plain attributes (a transformers model's ``config``,
    ``generation_config``, ``loss_type``, ``main_input_name``: what Trainer and TRL read);
    the model's methods (``generate``, ``save_pretrained``, ``gradient_checkpointing_enable``)
    would run the model without its adapter, so asking for one is an error that says
    which form has it.
    """

    #: instance state a copy (copying.copy_module_tree) must not share: the module-form
    #: twin holds this module's own vectors
    _onelora_uncopied = (_TWIN_KEY,)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            source = self.__dict__.get("meta", {}).get(_SOURCE)
            if name.startswith("_") or source is None:
                raise
        model = source.model
        if name in _TWIN and callable(getattr(type(model), "save_pretrained", None)):
            return getattr(self.module_twin(), name)
        if name in _OWN_STATE:
            raise AttributeError(f"the graph form of {type(model).__name__} (a torch.fx.GraphModule) has no attribute "
                                 f"{name!r}: it is its own module (read its parameters' device and dtype)")
        try:
            value = getattr(model, name)
        except AttributeError:
            raise AttributeError(f"the graph form of {type(model).__name__} (a torch.fx.GraphModule) has no attribute "
                                 f"{name!r}, and neither has the model") from None
        if callable(value) or isinstance(value, (nn.Module, torch.Tensor)):
            raise AttributeError(
                f"{name!r} is {'a method' if callable(value) else 'a part'} of {type(model).__name__}, which its graph "
                f"form (a torch.fx.GraphModule running the captured graph) does not have: called on the model it would "
                f"run without the adapter. Adapt with capture='module' (the model's own class, with generate(), "
                f"save_pretrained() and gradient checkpointing), or merge into the model (ol.merge(gm, inplace=True))")
        return value

    def module_twin(self) -> nn.Module:
        """The module form of the same model and sites, sharing this module's 1LoRA vectors
        and ``train=`` extras (the same Parameter objects: what it trains, this module has
        trained). Built on first use; what answers for the parts of a transformers model
        a trainer runs on their own (``base_model``, ``get_output_embeddings()``)."""
        twin = self.__dict__.get(_TWIN_KEY)
        state = get_state(self)
        if twin is not None or state is None:
            return twin if twin is not None else self
        from ...query import adapter_parameters
        from ...transform import transform

        weights = {s.weight_name for s in state.sites if s.adapted}
        with warnings.catch_warnings():  # the sites are this module's, checked below: no examples needed
            warnings.filterwarnings("ignore", message=".*no example inputs were given.*")
            twin = transform(self.shadow(), lambda site: site.weight_name in weights, capture="module",
                             train=state.train)
        mine, theirs = adapter_parameters(self), adapter_parameters(twin)
        if mine.keys() != theirs.keys():
            raise RuntimeError(f"the module form of {type(self.source.model).__name__} adapts other tensors "
                               f"({sorted(mine.keys() ^ theirs.keys())[:4]}) than its graph form: use capture='module'")
        for name, p in mine.items():
            owner, _, leaf = name.rpartition(".")
            (twin.get_submodule(owner) if owner else twin)._parameters[leaf] = p
        twin.train(self.training)
        self.__dict__[_TWIN_KEY] = twin
        return twin

    def train(self, mode: bool = True) -> "CapturedModule":  # type: ignore[override]
        twin = self.__dict__.get(_TWIN_KEY)
        if twin is not None:
            twin.train(mode)
        return super().train(mode)

    def gradient_checkpointing_enable(self, *args: Any, **kwargs: Any) -> None:
        """The graph form has no per-layer activation checkpointing: say what to do
        (Trainer and TRL call this when ``gradient_checkpointing=True``, TRL's default)."""
        raise NotImplementedError(
            f"the graph form of {type(self.source.model).__name__} has no gradient checkpointing (its graph is one "
            "captured call, not the model's layers): pass gradient_checkpointing=False (TrainingArguments, or "
            "SFTConfig, where TRL's default is True), or adapt with capture='module', whose layers are the model's own")

    def add_model_tags(self, tags: Any) -> None:
        """transformers' hub tags (TRL adds its own), kept on this module: the model is
        the user's and is not changed."""
        tags = [tags] if isinstance(tags, str) else list(tags)
        current = list(self.__dict__.get("model_tags") or getattr(self.source.model, "model_tags", None) or [])
        self.__dict__["model_tags"] = current + [t for t in tags if t not in current]

    def adapter_params(self) -> list[str]:
        """torchtune's ``AdapterModule`` protocol: the names of the parameters to train
        and save (every 1LoRA vector, then ``train=`` extras)."""
        state = get_state(self)
        return [*state.vectors, *state.extras] if state is not None else []

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
        if traced.mode_note is not None:
            root.meta[_EVAL_ONLY] = traced.mode_note
        if traced.method is Capture.EXPORT:
            root.meta[_PRIMARY] = CallGraph.of(traced.args, traced.kwargs or {}, traced.in_spec, traced.out_spec, dynamic,
                                               training=False if traced.mode_note is not None else None)
            set_flat_codegen(root.graph)
            _wrap_guards(root, root.graph, root)
        FollowTrainEval()(root)
        finalize(root)
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
        root.__dict__.pop(_FX_TRAINING, None)
        root.__dict__.pop(_TWIN_KEY, None)

    def _call(self, args: tuple, kwargs: dict) -> Any:
        # a stack's graphs take each batch item's adapter as one more (last) input
        extra = {IDS: self._stack_ids(kwargs.pop(IDS, None))} if self.meta.get(STACK) else {}
        primary: Optional[CallGraph] = self.meta.get(_PRIMARY)
        training = self.training
        if primary is None:  # symbolic_trace: the graph takes calls as the model does
            if training and self.meta.get(_EVAL_ONLY):
                return self._fx_training_forward()(self, *args, **kwargs, **extra)
            return type(self)._onelora_graph_forward(self, *args, **kwargs, **extra)
        if self.__dict__.get(_STALE):
            self._refresh()
            primary = self.meta[_PRIMARY]
        args, kwargs = self.source.signature.canonical(args, kwargs)
        leaves, spec = pytree.tree_flatten((args, kwargs))
        flat = [*leaves, *extra.values()]
        mode = autocast_state()
        runs = [(primary, type(self)._onelora_graph_forward), *((c, c.forward) for c in self.__dict__.get(_MORE, ()))]
        compiling = torch.compiler.is_compiling()
        # while torch.compile traces, nothing can be captured: a graph captured for the
        # call under autocast if there is one, else the one captured without (Dynamo
        # applies autocast to what it traces)
        modes = (mode, ()) if compiling and mode else (mode,)
        for wanted in modes:
            for call, forward in runs:
                if call.accepts(spec, leaves, wanted, training):
                    try:
                        return call.unflatten(forward(self, *flat))
                    except GuardFailed:  # its shape guards do not hold: another graph serves this call
                        continue
        if compiling:
            raise CaptureError(
                f"{type(self.source.model).__name__} was called inside torch.compile in a way no captured graph serves "
                "(another keyword, None-ness or a specialized size): call it once that way outside torch.compile "
                "first, so that its graph is captured", {})
        with self.source.lock:
            for call in self.__dict__.get(_MORE, ()):  # captured by another thread meanwhile
                if call.accepts(spec, leaves, mode, training):
                    try:
                        return call.unflatten(call.forward(self, *flat))
                    except GuardFailed:
                        continue
            call = self._capture_call(args, kwargs)
        return call.unflatten(call.forward(self, *flat))

    def _stack_ids(self, value: Any) -> Any:
        """``adapter_ids`` given by adapter names or as a list: as a tensor."""
        state = get_state(self)
        return state.stack_ids(value, _device_of(self)) if state is not None else value

    def _capture_call(self, args: tuple, kwargs: dict) -> CallGraph:
        source = self.source
        shown = ", ".join(f"{k}={_show(v)}" for k, v in kwargs.items())
        log.info("%s: capturing a graph for a new call (%s)", type(source.model).__name__, shown)
        # a training call of a model whose Python branches on self.training: its own graph
        training_only = bool(self.training and self.meta.get(_EVAL_ONLY))
        try:
            traced = trace(self.shadow(), args, kwargs, Capture.EXPORT, source.dynamic, training_only)
            if traced.mode_note is not None and self.training:  # this call branches on the mode
                traced, training_only = trace(self.shadow(), args, kwargs, Capture.EXPORT, source.dynamic, True), True
        except CaptureError as e:
            raise CaptureError(
                f"{type(source.model).__name__} was called as ({shown}), unlike the calls captured so far, "
                f"and that call cannot be captured: {why(e)}. Call it as in the example, or adapt it "
                "with capture='module'.",
                e.reasons,
            ) from e
        graph = self._adopt(traced)
        mode = True if training_only else False if traced.mode_note is not None else None
        call = CallGraph.of(args, kwargs, traced.in_spec, traced.out_spec, source.dynamic, graph=graph,
                            forward=_compile(self, graph), autocast=autocast_state(), training=mode)
        self.__dict__[_MORE] = (*self.__dict__.get(_MORE, ()), call)
        return call

    def _fx_training_forward(self) -> Callable[..., Any]:
        """The forward of a training-mode ``symbolic_trace`` graph, captured on first use
        (a model whose eval graph cannot follow the mode)."""
        forward = self.__dict__.get(_FX_TRAINING)
        if forward is not None:
            return forward
        if torch.compiler.is_compiling():
            raise CaptureError(
                f"{type(self.source.model).__name__} runs other ops in training than in eval mode, and its training "
                "graph is captured on the first training call, which cannot happen inside torch.compile: make one "
                "training call outside torch.compile first", {})
        with self.source.lock:
            forward = self.__dict__.get(_FX_TRAINING)
            if forward is None:
                log.info("%s: capturing its training-mode graph", type(self.source.model).__name__)
                traced = trace(self.shadow(), (), {}, Capture.FX, self.source.dynamic, training_only=True)
                forward = _compile(self, self._adopt(traced))
                self.__dict__[_FX_TRAINING] = forward
        return forward

    def _adopt(self, traced: Traced) -> fx.Graph:
        """Make a graph captured from :meth:`shadow` a graph of this module: attributes
        it reads, guards, the mode flag, flat inputs, and this module's adaptation."""
        graph = traced.module.graph
        graph.owning_module = self  # its targets are this module's now
        for node in graph.nodes:
            if node.op == "get_attr":
                value, mine = resolve_attr(traced.module, node.target), resolve_attr(self, node.target)
                if mine is None:
                    _register(self, str(node.target), value)
                elif not _same_value(mine, value):  # a constant of this trace under a name in use
                    node.target = _free_name(self, str(node.target))
                    _register(self, node.target, value)
            elif node.op == "call_module" and str(node.target) != MODE_MODULE and not _has_module(self, str(node.target)):
                _register(self, str(node.target), copy_module_tree(traced.module.get_submodule(str(node.target))))
        if traced.method is Capture.EXPORT:
            _wrap_guards(self, graph, traced.module)
        FollowTrainEval(graph)(self)
        if traced.method is Capture.EXPORT:
            set_flat_codegen(graph)
        adapt_like(self, graph)
        finalize(self, graph)
        return graph

    def shadow(self) -> nn.Module:
        """The model's module tree over this module's current tensors, to capture from."""
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
            for n in group:
                _set_tensor(shadow, n, value)
        return shadow

    # ------------------------------------------------------------------ moves

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True):  # type: ignore[override]
        moves = _probe(self, fn)
        devices = {d: d2 for (_, d), (_, d2) in moves.items() if d != d2}
        dtypes = {t: t2 for (t, _), (t2, _) in moves.items() if t != t2 and t.is_floating_point}
        source = self.source
        if dtypes and source is not None and source.method is Capture.EXPORT:
            self._check_dtype_move(dtypes)  # before anything moves: MoveError, nothing changed
        result = super()._apply(fn, recurse)
        if devices:  # what went to meta lost its values, what left it gets them
            state = get_state(self)
            after_move(self, state.vectors if state else (), state.model if state else source.model if source else None)
        self.__dict__.pop(_FX_TRAINING, None)  # captured again, on the moved tensors, when needed
        self.__dict__.pop(_TWIN_KEY, None)
        if (devices or dtypes) and source is not None and source.method is Capture.EXPORT:
            self.__dict__[_STALE] = {"devices": devices, "dtypes": dtypes}
            self.__dict__.pop(_MORE, None)
            self._refresh()
        return result

    def _check_dtype_move(self, dtypes: dict[torch.dtype, torch.dtype]) -> None:
        """Can the model be captured at the new dtypes? Tried on meta stand-ins (no
        memory), so a move that cannot work changes nothing."""
        primary: CallGraph = self.meta[_PRIMARY]
        shadow = self.shadow()
        for name, t in list(_tensors(shadow).items()):
            meta = torch.empty_like(t, device="meta", dtype=dtypes.get(t.dtype, t.dtype))
            _set_tensor(shadow, name, nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta)
        args, kwargs = pytree.tree_map_only(
            torch.Tensor, lambda t: torch.empty_like(t, device="meta", dtype=dtypes.get(t.dtype, t.dtype)), primary.example)
        try:
            trace(shadow, args, kwargs, Capture.EXPORT, self.source.dynamic)
        except CaptureError as e:
            moving = ", ".join(f"{a} -> {b}" for a, b in dtypes.items())
            raise MoveError(
                f"cannot move {type(self.source.model).__name__} ({moving}): its graph must be captured again in the "
                f"new dtype and that capture fails: {why(e)}. Nothing was changed. Cast the model, then transform it: "
                "ol.transform(model.to(dtype), ...)."
            ) from e

    def _refresh(self) -> None:
        """Capture the primary call again on the tensors as they are now (after a move)."""
        moved = self.__dict__[_STALE]
        primary: CallGraph = self.meta[_PRIMARY]
        device, dtypes = _device_of(self), moved["dtypes"]

        def example(t: torch.Tensor) -> torch.Tensor:
            dtype = dtypes.get(t.dtype, t.dtype)
            if t.device.type == "meta" and device.type != "meta":  # a meta example has no values
                return torch.ones(t.shape, dtype=dtype, device=device)
            return t.to(device=device, dtype=dtype)

        args, kwargs = pytree.tree_map_only(torch.Tensor, example, primary.example)
        moving = ", ".join([f"{a} -> {b}" for a, b in {**moved["devices"], **dtypes}.items()])
        try:
            traced = trace(self.shadow(), args, kwargs, Capture.EXPORT, self.source.dynamic)
        except CaptureError as e:
            raise MoveError(
                f"{type(self.source.model).__name__} was moved ({moving}), and its graph must be captured again "
                f"for the new device or dtype, which fails: {why(e)}. The module cannot run until that works; move "
                "it back, or cast the model and transform it again: ol.transform(model.to(...), ...)."
            ) from e
        graph = self._adopt(traced)
        self.meta[_PRIMARY] = CallGraph.of(args, kwargs, traced.in_spec, traced.out_spec, self.source.dynamic,
                                           training=False if traced.mode_note is not None else None)
        self.graph = graph
        del self.__dict__[_STALE]


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


def _same_value(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and (
            a.device.type == "meta" or torch.equal(a, b))
    return False


def _has_module(root: nn.Module, fqn: str) -> bool:
    try:
        root.get_submodule(fqn)
    except AttributeError:
        return False
    return True


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
