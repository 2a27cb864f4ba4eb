"""Every private torch API onelora_fx touches, in one place, each with the reason (and
the one lookup of an optional part of torch, :func:`is_dtensor`).

Everything else in the package uses public torch APIs, plus the long-standing
conventions every adapter library relies on (:data:`CONVENTIONS`): ``nn.Module``'s
``_parameters`` / ``_buffers`` / ``_modules`` dicts (to put a tensor in a slot without
registering it anew) and its ``_non_persistent_buffers_set`` (which buffers a state dict
leaves out), ``nn.Module._apply`` (the one method every ``to`` / ``cuda`` / ``to_empty``
goes through: how a module follows its moves), transformers' ``_init_weights`` (how a
model rebuilds a buffer no checkpoint holds), and ``torch._dynamo.register_backend``,
which is private by name but the documented way to name a ``torch.compile`` backend
(``torch.compiler`` has none).

When a torch release moves one of these, this file is the one to change; ``.ci/compat``
runs the whole test suite on the newest torch these machines install, so such a release
shows up here first.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Optional, Sequence

import torch
from torch import fx

__all__ = [
    "CONVENTIONS",
    "aoti_compile_and_package",
    "GROUPED_MM",
    "HigherOrderOperator",
    "REGIONS",
    "assert_async",
    "check",
    "is_dtensor",
    "GUARDS_PREFIX",
    "OpOverload",
    "counters",
    "compile_with_inductor",
    "enter_autocast",
    "exit_autocast",
    "export_specs",
    "is_view",
    "module_stack",
    "pytree",
    "route_forward",
    "set_grad_enabled",
    "set_flat_codegen",
    "subclass_over",
    "unpack_bnb_cpu_weight",
]

#: private names used outside this file by convention (see the module docstring)
# (and a named tuple's ``_fields``: the documented way to read its field names)
CONVENTIONS = frozenset({"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "_apply",
                         "_init_weights", "_fields"})

# torch.utils._pytree: export records a model's input and output structure as its
# TreeSpec; flattening a call the same way is how a call meets its graph. There is no
# public pytree module in torch 2.13 (torch.utils.pytree is planned).
from torch.utils import _pytree as pytree  # noqa: E402

# torch._ops.OpOverload: the type of ``torch.ops.ns.op.overload``; telling an overload
# from a Python function is how a graph node's op is named (no public alias exists).
OpOverload = torch._ops.OpOverload

# torch._dynamo.utils.counters: the counter table torch.compile's own passes count in and
# tests read; the ``onelora`` backend counts its rewrites there (no public counters API).
from torch._dynamo.utils import counters  # noqa: E402


def compile_with_inductor(
    gm: fx.GraphModule, example_inputs: Sequence[Any], mode: Optional[str], options: Optional[dict[str, Any]]
) -> Callable[..., Any]:
    """Hand a Dynamo graph to Inductor with ``torch.compile``'s ``mode`` / ``options``.

    ``torch._inductor.compile_fx.compile_fx`` is what ``backend="inductor"`` runs; it is
    the only entry point that takes a graph plus config patches (``list_mode_options``
    turns a ``mode`` name into those patches, as ``torch.compile`` does).
    """
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    patches = dict(list_mode_options(mode) if mode and mode != "default" else {})
    patches.update(options or {})
    return compile_fx(gm, list(example_inputs), config_patches=patches or None)


def export_specs(graph: fx.Graph) -> tuple[Optional[pytree.TreeSpec], Optional[pytree.TreeSpec]]:
    """``(in_spec, out_spec)`` of a graph from ``ExportedProgram.module()``.

    Export's unlifted graph flattens its call with a private code generator
    (``_PyTreeCodeGen``) that keeps both specs in ``pytree_info``.
    """
    info = getattr(graph._codegen, "pytree_info", None)
    if info is None:
        return None, None
    return info.in_spec, info.out_spec


def set_flat_codegen(graph: fx.Graph) -> None:
    """Make a graph's ``forward`` take its placeholders flat (``forward(self, a, b)``).

    ``fx.graph.CodeGen`` is the default code generator; it is public in use but not in
    ``torch.fx.__all__``. The specs removed here are kept by the caller.
    """
    graph.set_codegen(fx.graph.CodeGen())


def module_stack(node: fx.Node) -> list[str]:
    """The module paths a node was traced under, outermost first.

    ``node.meta["nn_module_stack"]`` is ``{key: (path, type)}`` on export and fx graphs;
    its layout is internal to torch.
    """
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for value in stack.values():
        path = value[0] if isinstance(value, tuple) and value else value
        if isinstance(path, str):
            out.append(path)
    return out


# torch._grouped_mm (and its aten overload): the grouped matmul transformers calls for
# mixture-of-experts layers where F.grouped_mm does not exist; an expert site can be
# either, so both are in the linear-op table.
GROUPED_MM = (torch._grouped_mm, torch.ops.aten._grouped_mm.default)

# torch._ops.HigherOrderOperator: the type of ``torch.ops.higher_order.*`` (``cond``,
# ``scan``, ``wrap_with_set_grad_enabled``): ops that run a subgraph they are given.
# Telling them apart is how accounting names a weight handed to a body it cannot follow.
HigherOrderOperator = torch._ops.HigherOrderOperator


# The blocks pre-dispatch ``torch.export`` wraps in a higher-order op: a
# ``with torch.no_grad()`` / ``torch.enable_grad()`` / ``torch.autocast(...)`` block in a
# forward becomes ``wrap_with_set_grad_enabled(enabled, body, *operands)`` /
# ``wrap_with_autocast(device_type, dtype, enabled, cache_enabled, body, *operands)``
# (torch._export.passes.replace_set_grad_with_hop_pass / replace_autocast_with_hop_pass);
# for each op name, how many mode arguments precede the body. The names are torch's.
REGIONS = {"wrap_with_set_grad_enabled": 1, "wrap_with_autocast": 4}
# torch._C._set_grad_enabled: how such a block is entered and left inline; the call
# pre-dispatch tracing records before it wraps the block, kept by fx's dead-code
# elimination and by Dynamo (torch.set_grad_enabled is a context manager class).
set_grad_enabled = torch._C._set_grad_enabled
# torch.amp._enter_autocast: the same for an autocast block (returns the mode to leave).
enter_autocast = torch.amp._enter_autocast
# torch.amp._exit_autocast: leaves the mode _enter_autocast returned.
exit_autocast = torch.amp._exit_autocast

# ExportedProgram.module() checks a call's shape guards in a submodule it names
# "_guards_fn" (torch.export._unlift); a second graph of the same module needs its own.
GUARDS_PREFIX = "_guards_fn"


def is_view(t: torch.Tensor) -> bool:
    """Does ``t`` view another tensor's storage? (``Tensor._base``; export guards on a
    view's base size, so an example that is a view gets its own storage.)"""
    return t._base is not None


def route_forward(gm: fx.GraphModule, forward: Callable[..., Any]) -> Callable[..., Any]:
    """Put ``forward`` in front of a GraphModule's compiled graph; returns the compiled one.

    Each GraphModule instance has a class of its own, and ``recompile()`` sets the graph's
    generated code as that class's ``forward`` (so that instances never share code). A
    module that must see every call first (to choose among graphs) replaces it there,
    after each recompile.
    """
    cls = type(gm)
    generated = cls.forward
    cls.forward = forward
    return generated


# torch._check: a condition on (symbolic) sizes that torch.compile and torch.export keep
# as a runtime assertion of the program instead of a guard or a graph break; documented
# in the export guide, private by name (no public alias in torch 2.13).
check = torch._check

# torch._assert_async: an assertion on a tensor's value that does not synchronize with
# the host (a device-side assert on GPUs) and that compiled and exported programs keep
# (aten._assert_async.msg); how adapter_ids are range-checked without a sync.
assert_async = torch._assert_async


def is_dtensor(t: object) -> bool:
    """Is ``t`` a ``torch.distributed.tensor.DTensor`` (public, but importing
    ``torch.distributed.tensor`` on every call is not free: the class is looked up once
    it is loaded)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def aoti_compile_and_package(program: Any, path: str) -> str:
    """``torch._inductor.aoti_compile_and_package``: AOTInductor's packaging entry point as
    torch's AOTInductor documentation gives it (private by name, no public alias in torch
    2.13). Imported on use: importing Inductor takes seconds."""
    import torch._inductor

    return torch._inductor.aoti_compile_and_package(program, package_path=path)


def is_fsdp_module(m: object) -> bool:
    """Has ``fully_shard`` (FSDP2) been applied to ``m`` (it swaps in a subclass)?"""
    module = sys.modules.get("torch.distributed.fsdp")
    return module is not None and isinstance(m, getattr(module, "FSDPModule", ()))


def subclass_over(t: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """A new tensor of ``t``'s class (a Parameter subclass: bitsandbytes' ``Params4bit``,
    ``Int8Params``) over ``data``, with ``t``'s Python fields.

    ``torch.Tensor._make_subclass`` is how ``nn.Parameter.__new__`` itself builds one;
    calling the subclass's own constructor instead would run its ``__new__``, which for
    bitsandbytes quantizes again or drops its state.
    """
    out = torch.Tensor._make_subclass(type(t), data, t.requires_grad)
    out.__dict__.update(vars(t))
    return out


def unpack_bnb_cpu_weight(data: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
    """bitsandbytes' inverse of its CPU repacking of a 4-bit weight (the codes back in
    the standard order; ``state``'s fields are assigned, so pass a copy).

    ``bitsandbytes.functional._convert_weight_packed_for_cpu_inverse`` is private, but it
    is the only code that knows the packed order (bitsandbytes 0.50 has no public unpack).
    """
    import bitsandbytes.functional as bnb_f

    return bnb_f._convert_weight_packed_for_cpu_inverse(data, state)
