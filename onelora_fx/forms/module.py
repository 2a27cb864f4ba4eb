"""The module form: a copy of the model's own class whose layers carry the vectors.

The copy (see :mod:`onelora_fx.copying`) has the model's classes, so everything the
class offers keeps working: ``generate()`` with its KV cache, ``save_pretrained()``,
``gradient_checkpointing_enable()``, Hugging Face ``Trainer``, ``fully_shard`` layer by
layer. Sites are found from a graph capture whenever one works (so names, heads and
layouts are the graph form's); where none works, from the module tree: ``nn.Linear``,
GPT-2's ``Conv1D``, and Hugging Face expert modules (3-D ``gate_up_proj`` /
``up_proj`` / ``down_proj`` with ``is_transposed``), the head from
``get_output_embeddings()``. How each site is adapted is :mod:`.layers`.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn

from ..calls import Signature
from ..capture import Capture, CaptureError, trace
from ..copying import copy_module_tree
from ..coverage import unadapted
from ..fold import fold, fold_into
from ..rewrite import AlreadyAdaptedError
from ..sites import Layout, LinearSite, adapter_name_for, find_sites, join
from ..state import get_state
from .base import Captured, Form, Plan, own_buffers
from .layers import SiteCall, adapt_caller, adapt_layer, adapt_root, adapt_stack, calls_of, restore

__all__ = ["ModuleForm", "module_sites"]

_EXPERT_WEIGHTS = ("gate_up_proj", "up_proj", "down_proj")


def _is_conv1d(m: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D, recognised without importing transformers
    w = getattr(m, "weight", None)
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and isinstance(w, nn.Parameter) and w.dim() == 2


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
        except Exception:  # some models raise NotImplementedError here
            head = None
    sites = []
    for name, m in root.named_modules():
        weights = []
        if _is_conv1d(m):
            weights.append(("weight", Layout.IN_OUT))
        elif _is_plain_linear(m):
            weights.append(("weight", Layout.OUT_IN))
        elif hasattr(m, "is_transposed") and hasattr(m, "num_experts"):  # @use_experts_implementation
            layout = Layout.IN_OUT if m.is_transposed else Layout.OUT_IN
            weights += [(a, layout) for a in _EXPERT_WEIGHTS if isinstance(m._parameters.get(a), nn.Parameter)]
        for attr, layout in weights:
            w = m._parameters[attr]
            out_f, in_f = (w.shape[-1], w.shape[-2]) if layout is Layout.IN_OUT else (w.shape[-2], w.shape[-1])
            expert = w.dim() == 3
            sites.append(LinearSite(
                name=name if attr == "weight" else join(name, attr), weight_name=join(name, attr), owner=name, attr=attr,
                adapter_name=adapter_name_for(name, attr), in_features=int(in_f), out_features=int(out_f), layout=layout,
                has_bias=not expert and getattr(m, "bias", None) is not None, kind="module", is_head=m is head,
                dtype=w.dtype, device=w.device, experts=int(w.shape[0]) if expert else None, caller=name, weight=w,
            ))
    return sites


def _without_graph(s: LinearSite) -> LinearSite:
    return replace(s, node=None, input=None, weight_arg=None, bias_arg=None, offsets_arg=None, adapted=False, selected=False)


def _discover(model: nn.Module, root: nn.Module, args: tuple, kwargs: dict, dynamic: bool,
              failed: Optional[CaptureError]) -> tuple[list[LinearSite], dict[str, str]]:
    """Sites from a graph capture of ``model`` where one works, else from the tree."""
    accepts_cache = "use_cache" in inspect.signature(model.forward).parameters
    attempts = []
    if failed is None:
        attempts.append(kwargs)
    if accepts_cache and kwargs.get("use_cache") is not False:
        attempts.append({**kwargs, "use_cache": False})  # a KV cache in the output is no graph value
    for attempt in attempts:
        try:
            a, k = Signature(model.forward).canonical(args, attempt)
            with _graphable_experts(model):
                traced = trace(model, a, k, Capture.AUTO, dynamic)
        except (CaptureError, ValueError) as e:
            failed = e if isinstance(e, CaptureError) else failed
            continue
        found = find_sites(traced.module)
        return [_without_graph(s) for s in found], unadapted(traced.module, traced.module.graph, found)
    return [_without_graph(s) for s in module_sites(root)], {}


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
    """Where a site's call is intercepted: the caller when it owns the weight or holds
    its owner, else the owner itself."""
    holds = s.caller == "" or s.owner == s.caller or s.owner.startswith(s.caller + ".")  # "" is the root
    caller = s.caller if holds else s.owner
    try:
        root.get_submodule(caller)
    except AttributeError:
        caller = s.owner
    return caller


def _relative(owner: str, caller: str) -> str:
    return owner[len(caller):].lstrip(".") if caller else owner


class ModuleForm(Form):
    method = Capture.MODULE

    def __init__(self, failed: Optional[CaptureError] = None):
        self.failed = failed  # why the graph form was not taken (capture='auto')

    def capture(self, model: nn.Module, args: tuple, kwargs: dict[str, Any], dynamic: bool, method: Capture) -> Captured:
        root = copy_module_tree(model)
        buffers = own_buffers(root)
        sites, skipped = _discover(model, root, args, kwargs, dynamic, self.failed)
        return Captured(root, Capture.MODULE, sites, buffers, skipped)

    def sites(self, root: nn.Module) -> list[LinearSite]:
        state = get_state(root)
        known = list(state.sites) if state is not None and state.sites else self._structural(root)
        out = []
        for s in known:
            owner = root.get_submodule(s.owner) if s.owner else root
            weight = owner._parameters.get(s.attr)
            adapted = isinstance(getattr(owner, s.adapter_name.rpartition(".")[2], None), nn.Parameter)
            out.append(replace(s, weight=weight, dtype=weight.dtype, device=weight.device, adapted=adapted, selected=adapted))
        return out

    def _structural(self, root: nn.Module) -> list[LinearSite]:
        """Adapted sites read from the layers alone (a module whose state was lost)."""
        found = {s.weight_name: s for s in module_sites(root)}
        for path, m in root.named_modules():
            for call in calls_of(m):
                owner = join(path, call.owner)
                w = root.get_submodule(owner)._parameters[call.attr]
                found.setdefault(join(owner, call.attr), LinearSite(
                    name=owner if call.attr == "weight" else join(owner, call.attr), weight_name=join(owner, call.attr),
                    owner=owner, attr=call.attr, adapter_name=adapter_name_for(owner, call.attr),
                    in_features=int(w.shape[-1]), out_features=int(w.shape[-2]), layout=Layout.OUT_IN, has_bias=False,
                    kind="module", experts=int(w.shape[0]) if w.dim() == 3 else None, caller=path, weight=w))
        return list(found.values())

    def adapt(self, root: nn.Module, sites: Sequence[LinearSite]) -> dict[str, nn.Parameter]:
        chosen = {s.adapter_name: s for s in sites if s.selected}
        plans = []
        for name, s in chosen.items():  # requires: everything checked before anything changes
            owner = root.get_submodule(s.owner) if s.owner else root
            if hasattr(owner, name.rpartition(".")[2]):
                raise AlreadyAdaptedError(f"{name} already exists; transform the base model instead")
            calls = [t for t in sites if t.adapter_name == name]
            callers = {_caller_of(root, t) for t in calls}
            layer = (s.attr == "weight" and callers == {s.owner} and s.experts is None
                     and (_is_plain_linear(owner) or _is_conv1d(owner)))
            plans.append((name, s, owner, layer, callers))
        vectors = {}
        for name, s, owner, layer, callers in plans:
            shape = (s.experts, s.out_features) if s.experts else (s.out_features,)
            b = nn.Parameter(torch.zeros(shape, dtype=s.dtype, device=s.device))
            owner.register_parameter(name.rpartition(".")[2], b)
            vectors[name] = b
            if layer:
                adapt_layer(owner, in_out=s.layout is Layout.IN_OUT)
                continue
            for caller in callers:
                adapt_caller(root.get_submodule(caller) if caller else root, (SiteCall(_relative(s.owner, caller), s.attr),))
        adapt_root(root)
        return vectors

    def plan(self, root: nn.Module, groups: dict[str, list[LinearSite]]) -> list[Plan]:
        names: dict[int, int] = {}
        for _, p in root.named_parameters(remove_duplicate=False):
            names[id(p)] = names.get(id(p), 0) + 1
        return [Plan(name, group, names.get(id(group[0].weight), 0) > 1) for name, group in groups.items()]

    def merge(self, root: nn.Module, plans: Sequence[Plan], inplace: bool) -> None:
        for plan in plans:
            s = plan.sites[0]
            owner = root.get_submodule(s.owner) if s.owner else root
            leaf = plan.name.rpartition(".")[2]
            b = owner._parameters[leaf].detach()
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
