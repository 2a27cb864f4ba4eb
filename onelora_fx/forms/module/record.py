"""Sites and weight readers from one recorded forward: the module form where no graph
capture works.

A model no capture takes (Python control flow on tensor values, an eager loop over
experts) still runs. :func:`record` runs it once, with the example inputs, under a
:class:`~onelora_fx.forms.module.tracking.WeightTracker` that knows every weight of two or
more dimensions, and notes each call that reads one: a linear call on the weight (as it
is, transposed, cast, a block of its output rows, one expert's slice) is a site, with
the module whose forward made it (global module hooks keep the stack of running
modules); any other reader goes to the weight accounting (a matrix product that is not
a site is named in the warning). A raw parameter that the model passes to ``F.linear``
is a site like any ``nn.Linear``. The output head is a site whose output becomes a
model output through shape, cast and activation ops only.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

from ...analysis.accounting import Accounting, Reader
from ...analysis.flow import ACTIVATIONS, CASTS, COPIES, DROPOUTS, VIEWS
from ...analysis.linear_ops import Kind, is_matmul_like, read_call
from ...compat import pytree
from ...quant import is_quantized_layer, quantized_site
from ...records import Layout, LinearSite, join
from .tracking import Derived, WeightTracker

__all__ = ["record"]

_KEEPS_OUTPUT = VIEWS | CASTS | COPIES | ACTIVATIONS | DROPOUTS | {"getitem", "__getitem__"}


@dataclass
class _Call:
    weight: str
    layout: Layout
    caller: str
    rows: Optional[tuple[int, int]]
    has_bias: bool
    expert: bool
    kind: str
    quantized: dict = field(default_factory=dict)


class _Recorder(WeightTracker):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.modules = {path: m for path, m in model.named_modules(remove_duplicate=False)}
        self.accounting = Accounting.of(model)
        self.params = dict(model.named_parameters(remove_duplicate=False))
        for name in self.accounting.names:
            self.track(self.params[name], name)
        self.paths = {id(m): path for path, m in model.named_modules(remove_duplicate=False)}
        # tensors that do not depend on the inputs: parameters and buffers
        self.constants = {id(t) for t in [*model.parameters(), *model.buffers()]}
        self.stack: list[str] = []
        self.calls: list[_Call] = []
        self.outputs: dict[int, int] = {}  # id of a tensor made from a site's output -> the call

    def caller(self) -> str:
        return self.stack[-1] if self.stack else ""

    def enter_layer(self, path: str, module: nn.Module, x: Any) -> None:
        """A quantized layer starts: it is a site (its own kernel computes the linear)."""
        weight = module._parameters.get("weight")
        self.calls.append(_Call(join(path, "weight"), Layout.OUT_IN, path, None, module.bias is not None, False,
                                "module", quantized_site(weight, module)))
        self.accounting.add(join(path, "weight"), Reader(type(module).__name__, "site", path))

    def on_call(self, func: Any, name: str, args: tuple, kwargs: dict, used: list[Derived]) -> Any:
        here = self.modules.get(self.caller())
        if here is not None and is_quantized_layer(here) and all(e.key == join(self.caller(), "weight") for e in used):
            return NotImplemented  # the quantized layer reading its own weight: the site itself
        call = read_call("call_function", func, args, kwargs)
        entry = self.find(call.weight) if call is not None else None
        if entry is not None and not entry.opaque and isinstance(call.x, torch.Tensor) and self.find(call.x) is None:
            rows, whole = entry.rows(call)
            grouped = call.kind in (Kind.GROUPED, Kind.BMM)
            if whole and grouped == entry.expert:
                in_out = call.weight_in_out != entry.flipped
                self.calls.append(_Call(entry.key, Layout.IN_OUT if in_out else Layout.OUT_IN, self.caller(), rows,
                                        call.bias is not None, entry.param.dim() == 3, call.kind.value,
                                        quantized_site(entry.param, None)))
                self.accounting.add(entry.key, Reader(call.kind.value, "site", self.caller()))
                out = func(*args, **kwargs)
                self.outputs[id(out)] = len(self.calls) - 1
                return out
        matmul = is_matmul_like("call_function", func)
        leaves = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if not matmul and all(self.find(a) is not None or id(a) in self.constants for a in leaves):
            # arithmetic on weights alone is a weight still: follow what it becomes
            out = func(*args, **kwargs)
            for o in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(o, torch.Tensor):
                    self.keep(replace(used[0], tensor=o, opaque=True))
            return out
        for e in used:
            self.accounting.add(e.key, Reader(name or str(func), "matmul" if matmul else "other", self.caller()))
        return NotImplemented

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = super().__torch_function__(func, types, args, kwargs)
        # follow a site's output through ops that keep it "the output" (for the head rule)
        name = getattr(func, "__name__", "")
        if args and isinstance(args[0], torch.Tensor) and id(args[0]) in self.outputs and name in _KEEPS_OUTPUT:
            for o in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(o, torch.Tensor):
                    self.outputs[id(o)] = self.outputs[id(args[0])]
        return out


def _name_under(names: tuple[str, ...], caller: str) -> str:
    """The name of a (tied) weight that the calling module holds, else its first name: an
    output head tied to the embedding is ``lm_head.weight`` (the head's site, named as the
    graph form names it), not ``embed_tokens.weight``, whose module never calls a linear."""
    under = [n for n in names if caller and n.startswith(caller + ".")]
    return min(under, key=lambda n: n.count(".")) if under else names[0]


def record(model: nn.Module, args: tuple, kwargs: dict) -> tuple[list[LinearSite], Accounting]:
    """The sites and the weight readers of one forward of ``model`` with these inputs.

    Raises whatever the forward raises (the caller decides what to do without it).
    """
    recorder = _Recorder(model)

    def enter(module: nn.Module, inputs: Any) -> None:
        recorder.stack.append(recorder.paths.get(id(module), recorder.caller()))
        if is_quantized_layer(module):
            recorder.enter_layer(recorder.caller(), module, inputs)

    def leave(module: nn.Module, _inputs: Any, output: Any) -> None:
        if is_quantized_layer(module) and isinstance(output, torch.Tensor):
            recorder.outputs[id(output)] = len(recorder.calls) - 1
        if recorder.stack:
            recorder.stack.pop()

    with ExitStack() as stack, torch.no_grad():
        for hook in (register_module_forward_pre_hook(enter), register_module_forward_hook(leave, always_call=True)):
            stack.callback(hook.remove)
        stack.enter_context(recorder)
        output = model(*args, **kwargs)
    heads = {recorder.outputs[id(t)] for t in pytree.tree_leaves(output)
             if isinstance(t, torch.Tensor) and id(t) in recorder.outputs}
    # one site per way a weight is called (a layer run in a loop, an expert loop: one)
    unique: dict[tuple, tuple[_Call, bool]] = {}
    for i, c in enumerate(recorder.calls):
        key = (c.weight, c.caller, c.rows, c.layout)
        head = unique[key][1] if key in unique else False
        unique[key] = (unique.get(key, (c, False))[0], head or i in heads)
    per_weight: dict[str, int] = {}
    for c, _ in unique.values():
        per_weight[c.weight] = per_weight.get(c.weight, 0) + 1
    seen: dict[str, int] = {}
    sites = []
    for c, head in unique.values():
        index = seen.get(c.weight, 0)
        seen[c.weight] = index + 1
        owner, _, attr = _name_under(recorder.accounting.names.get(c.weight, (c.weight,)), c.caller).rpartition(".")
        sites.append(LinearSite.of(owner, attr, recorder.params[c.weight], c.layout, c.kind, rows=c.rows,
                                   has_bias=c.has_bias, caller=c.caller, is_head=head, call_index=index,
                                   calls=per_weight[c.weight], **c.quantized))
    return sites, recorder.accounting
