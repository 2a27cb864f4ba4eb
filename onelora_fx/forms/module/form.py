"""The module form: a copy of the model's own class whose layers carry the vectors.

The copy (see :mod:`onelora_fx.copying`) has the model's classes, so everything the
class offers keeps working: ``generate()`` with its KV cache, ``save_pretrained()``,
``activation_checkpointing_enable()`` (``gradient_checkpointing_enable()`` before
transformers 5), Hugging Face ``Trainer``, ``fully_shard`` layer by layer. Sites are found from a graph capture whenever one works (so names, heads and
layouts are the graph form's); where none works, from the module tree: ``nn.Linear``,
GPT-2's ``Conv1D``, and Hugging Face expert modules (3-D ``gate_up_proj`` /
``up_proj`` / ``down_proj`` with ``is_transposed``), the head from
``get_output_embeddings()``. How each site is adapted is :mod:`.layers`.
"""

from __future__ import annotations

import inspect
import warnings
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn

from ...analysis.accounting import Accounting, graph_readers
from ...analysis.linear_ops import is_conv1d
from ...analysis.sites import find_sites
from ...copying import copy_module_tree, own_parameters
from ...fold import fold, fold_into
from ...quant import dequantize, is_quantized_layer, is_quantized_weight, logical_shape, own_quantized_layers, quantized_site
from ...records import Layout, LinearSite
from ...state import AlreadyAdaptedError, Capture, get_state
from ..base import Captured, Form, Plan, own_buffers, plan_merge
from ..graph.calls import Signature
from ..graph.capture import CaptureError, NeedsExample, first_line, trace
from .layers import SiteCall, SiteError, adapt_caller, adapt_layer, adapt_quantized_layer, adapt_root, adapt_stack, restore
from .record import record
from ...state import OneLoRAWarning

__all__ = ["ModuleForm", "module_sites"]

_EXPERT_WEIGHTS = ("gate_up_proj", "up_proj", "down_proj")


def _is_plain_linear(m: nn.Module) -> bool:
    # a subclass with its own forward computes something else: leave it alone
    base = getattr(type(m), "_onelora_base", type(m))
    return isinstance(m, nn.Linear) and base.forward is nn.Linear.forward


def module_sites(root: nn.Module) -> list[LinearSite]:
    """The sites a module tree shows without a graph: ``nn.Linear`` and ``Conv1D``
    layers and Hugging Face expert weights (adapted or not)."""
    head = None
    get_head = getattr(root, "get_output_embeddings", None)
    if callable(get_head):
        try:
            head = get_head()
        except NotImplementedError:  # a PreTrainedModel without an output embedding says so
            head = None
    sites = []
    for name, m in root.named_modules():
        weights = []
        if is_conv1d(m):
            weights.append(("weight", Layout.IN_OUT))
        elif _is_plain_linear(m):
            weights.append(("weight", Layout.OUT_IN))
        elif hasattr(m, "is_transposed") and hasattr(m, "num_experts"):  # @use_experts_implementation
            layout = Layout.IN_OUT if m.is_transposed else Layout.OUT_IN
            weights += [(a, layout) for a in _EXPERT_WEIGHTS if isinstance(m._parameters.get(a), nn.Parameter)]
        if is_quantized_layer(m):
            weights.append(("weight", Layout.OUT_IN))
        for attr, layout in weights:
            w = m._parameters[attr]
            sites.append(LinearSite.of(name, attr, w, layout, "module", caller=name, is_head=m is head,
                                       has_bias=len(logical_shape(w, m)) == 2 and getattr(m, "bias", None) is not None,
                                       **quantized_site(w, m)))
    return sites


def has_quantized(model: nn.Module) -> bool:
    """Does the model hold quantized linears (torchao weights, bitsandbytes layers)?"""
    return any(is_quantized_layer(m) for m in model.modules()) or \
        any(is_quantized_weight(p) for p in model.parameters())


def _plain_layer(root: nn.Module, site: LinearSite, owner: nn.Module, weight: torch.Tensor) -> None:
    """Put a merged full-precision weight where a quantized one was: into the
    ``nn.Linear`` that held a quantized tensor, or into a new ``nn.Linear`` in place of a
    quantized layer (bitsandbytes), with its bias."""
    if not is_quantized_layer(owner):
        owner._parameters[site.attr] = nn.Parameter(weight, requires_grad=False)
        return
    plain = nn.Linear(site.in_features, site.out_features, bias=owner.bias is not None, device="meta")
    plain.weight = nn.Parameter(weight, requires_grad=False)
    if owner.bias is not None:
        plain.bias = nn.Parameter(owner.bias.detach().to(weight.dtype), requires_grad=owner.bias.requires_grad)
    plain.train(owner.training)
    parent_path, _, leaf = site.owner.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    parent._modules[leaf] = plain


def _without_graph(s: LinearSite) -> LinearSite:
    return replace(s.record(), adapted=False, selected=False)


def _discover(model: nn.Module, root: nn.Module, args: tuple, kwargs: dict, dynamic: bool,
              failed: Optional[CaptureError]) -> tuple[list[LinearSite], Accounting]:
    """Sites and weight readers from a graph capture of ``model`` where one works, else
    from one recorded forward of ``root`` (the copy) with the example inputs, else (no
    example inputs, or the forward fails) from the module tree, with a warning."""
    accepts_cache = "use_cache" in inspect.signature(model.forward).parameters
    attempts = []
    if failed is None:
        attempts.append(kwargs)
    if accepts_cache and kwargs.get("use_cache") is not False:
        attempts.append({**kwargs, "use_cache": False})  # a KV cache in the output is no graph value
    if has_quantized(model):  # a graph shows no linear call on a quantized weight: record one forward
        attempts = []
    for attempt in attempts:
        try:
            a, k = Signature(model.forward).canonical(args, attempt)
            with _graphable_experts(model):
                traced = trace(model, a, k, Capture.AUTO, dynamic)
        except (CaptureError, NeedsExample) as e:
            failed = e if isinstance(e, CaptureError) else failed
            continue
        found = find_sites(traced.module)
        return [_without_graph(s) for s in found], graph_readers(traced.module, traced.module.graph, found)
    if args or kwargs:
        training = {m: m.training for m in root.modules()}
        root.eval()  # one forward to look at: no batch statistics, no dropout
        try:
            found, accounting = record(root, args, kwargs)
        except Exception as e:  # the model's own forward failed on its example
            why = f"{type(e).__name__}: {first_line(e)}"
        else:
            return [_without_graph(s) for s in found], accounting
        finally:
            for m, flag in training.items():
                m.training = flag
    else:
        why = "no example inputs were given"
    warnings.warn(
        f"the sites of {type(model).__name__} are read from its module tree only ({why}): its nn.Linear / "
        "Conv1D layers and expert modules are adapted, but a weight the model uses otherwise (F.linear on a "
        "raw parameter) cannot be seen. Pass example inputs the model runs with to find every site.",
        category=OneLoRAWarning, stacklevel=4,
    )
    return [_without_graph(s) for s in module_sites(root)], Accounting.of(model)


@contextmanager
def _graphable_experts(model: nn.Module) -> Iterator[None]:
    """transformers' eager experts are a Python loop over experts that no capture takes;
    its grouped one has the same weights and calls: find the sites on that one (the
    module form then adapts the loop at run time)."""
    can = getattr(model, "_can_set_experts_implementation", None)
    get = getattr(model, "get_experts_implementation", None)
    if not (callable(can) and callable(get) and can()):
        yield
        return
    current = get()
    eager = {k: v for k, v in current.items() if v == "eager"} if isinstance(current, dict) else current == "eager"
    if not eager:
        yield
        return
    model.set_experts_implementation("grouped_mm")
    try:
        yield
    finally:
        model.set_experts_implementation(current)


def _caller_of(root: nn.Module, s: LinearSite) -> str:
    """Where a site's call is intercepted: the innermost module that makes the call and
    holds the weight's owner. A weight read by a module that does not hold it (a weight
    passed as an argument, a tied weight under another name) is intercepted at the
    nearest module above both: the interception follows the tensor, not the path, and
    the owner's own forward (an embedding lookup) would never see the call."""
    caller = s.caller
    try:
        root.get_submodule(caller)
    except AttributeError:
        return s.owner
    while not (caller == "" or s.owner == caller or s.owner.startswith(caller + ".")):  # "" is the root
        caller = caller.rpartition(".")[0]
    return caller


def _relative(owner: str, caller: str) -> str:
    return owner[len(caller):].lstrip(".") if caller else owner


#: torch.nn layers with a fused inference kernel (eval mode, no grad) that does not call
#: their sublayers' forwards
_FAST_PATHS = (nn.TransformerEncoderLayer,)


def _inside(root: nn.Module, path: str, *kinds: type) -> Optional[str]:
    """The path of the outermost module of one of ``kinds`` on the way from ``root`` to
    ``path`` (``path`` itself included), or None."""
    parts = path.split(".") if path else []
    for i in range(len(parts) + 1):
        prefix = ".".join(parts[:i])
        try:
            m = root.get_submodule(prefix) if prefix else root
        except AttributeError:
            return None
        if isinstance(m, kinds):
            return prefix
    return None


class ModuleForm(Form):
    method = Capture.MODULE

    def __init__(self, failed: Optional[CaptureError] = None):
        self.failed = failed  # why the graph form was not taken (capture='auto')

    def capture(self, model: nn.Module, args: tuple, kwargs: dict[str, Any], dynamic: bool, method: Capture) -> Captured:
        root = copy_module_tree(model)
        own_parameters(root)
        own_quantized_layers(root)  # before any forward: bitsandbytes may repack a layer it runs
        buffers = own_buffers(root)
        sites, accounting = _discover(model, root, args, kwargs, dynamic, self.failed)
        return Captured(root, Capture.MODULE, sites, buffers, accounting)

    def sites(self, root: nn.Module) -> list[LinearSite]:
        """The site records of the adapter state, with the current weights."""
        state = get_state(root)
        out = []
        for rec in state.sites if state is not None else ():
            owner = root.get_submodule(rec.owner) if rec.owner else root
            out.append(replace(rec, weight=owner._parameters.get(rec.attr)))
        return out

    def adapt(self, root: nn.Module, sites: Sequence[LinearSite]) -> dict[str, nn.Parameter]:
        chosen = {s.adapter_name: s for s in sites if s.selected}
        fused = sorted({s.name for s in chosen.values() if _inside(root, s.owner, nn.MultiheadAttention) is not None})
        if fused:
            raise SiteError(
                f"{len(fused)} selected sites are projections of nn.MultiheadAttention ({', '.join(fused[:4])}"
                f"{', ...' if len(fused) > 4 else ''}), which computes them inside one fused function "
                "(F.multi_head_attention_forward, a native kernel in eval mode) that the module form cannot "
                "follow. Use the graph form (capture='export' with example inputs), or exclude them "
                f"(exclude={sorted({_inside(root, n, nn.MultiheadAttention) + '.*' for n in fused})!r})."
            )
        plans = []
        for name, s in chosen.items():  # requires: everything checked before anything changes
            owner = root.get_submodule(s.owner) if s.owner else root
            if hasattr(owner, name.rpartition(".")[2]):
                raise AlreadyAdaptedError(f"{name} already exists; transform the base model instead")
            calls = [t for t in sites if t.adapter_name == name]
            callers = {_caller_of(root, t) for t in calls}
            whole = s.attr == "weight" and callers == {s.owner} and s.experts is None and s.rows is None
            layer = "qlayer" if whole and is_quantized_layer(owner) else \
                "layer" if whole and (_is_plain_linear(owner) or is_conv1d(owner)) else None
            plans.append((name, s, owner, layer, callers))
        vectors: dict[str, nn.Parameter] = {}
        try:
            for name, s, owner, layer, callers in plans:
                b = replace(s, weight=owner._parameters.get(s.attr)).new_vector()
                owner.register_parameter(name.rpartition(".")[2], b)
                vectors[name] = b
                if layer == "qlayer":
                    adapt_quantized_layer(owner)
                    continue
                if layer:
                    adapt_layer(owner, in_out=s.layout is Layout.IN_OUT)
                    continue
                for caller in callers:
                    adapt_caller(root.get_submodule(caller) if caller else root, (SiteCall(_relative(s.owner, caller), s.attr),))
            for path in {_inside(root, s.owner, *_FAST_PATHS) for s in chosen.values()} - {None}:
                # torch takes a layer's fused inference path only when no torch-function
                # mode is active: under one (with nothing to intercept) it runs its
                # composite path, which calls the adapted layers, in every mode
                adapt_caller(root.get_submodule(path) if path else root, ())
            adapt_root(root)
        except Exception:  # all or nothing: the copy goes back to the model's classes
            for name, s, owner, _, _ in plans:
                owner._parameters.pop(name.rpartition(".")[2], None)
            for m in root.modules():
                restore(m)
            raise
        return vectors

    def plan(self, root: nn.Module, groups: dict[str, list[LinearSite]]) -> list[Plan]:
        return plan_merge(root, groups)

    def merge(self, root: nn.Module, plans: Sequence[Plan], inplace: bool) -> None:
        for plan in plans:
            s = plan.sites[0]
            owner = root.get_submodule(s.owner) if s.owner else root
            leaf = plan.name.rpartition(".")[2]
            b = owner._parameters[leaf].detach()
            if s.quantized:  # the full-precision weight, folded: a plain layer again
                del owner._parameters[leaf]
                _plain_layer(root, s, owner, fold(dequantize(s.weight, owner, s.dtype), b, s.layout))
                continue
            if plan.own_copy or not inplace:
                owner._parameters[s.attr] = nn.Parameter(fold(s.weight, b, s.layout), requires_grad=False)
            else:
                fold_into(s.weight, b, s.layout)
            del owner._parameters[leaf]
        for m in root.modules():  # merge folds every vector: every class goes back
            restore(m)

    def copy(self, root: nn.Module) -> nn.Module:
        return copy_module_tree(root)

    def stack(self, root: nn.Module, stacks: dict[str, torch.Tensor]) -> None:
        experts = [s.name for s in self.sites(root) if s.adapted and s.experts]
        if experts:
            raise ValueError(f"expert sites cannot be stacked ({', '.join(experts)}): a grouped matmul sorts its "
                             "rows by expert, not by batch item")
        for name, B in stacks.items():
            owner, _, leaf = name.rpartition(".")
            (root.get_submodule(owner) if owner else root)._parameters[leaf] = nn.Parameter(B, requires_grad=True)
        adapt_stack(root)
