"""The one way onelora_fx copies a module tree: new modules, the same tensors.

Capture, the module form, ``merge(inplace=False)`` and re-captures all need a module that
can be changed (a parameter registered, a layer's class swapped, a hook added, a mode
switched) without touching the module it came from, while every parameter and buffer
stays the very same tensor object (no weight memory). :func:`copy_module_tree` is that
copy: each module of the tree is a shallow copy whose containers (``_parameters``,
``_buffers``, ``_modules``, the non-persistent set and every hook dict) are its own. A
module reachable by two paths stays one module in the copy.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Optional

from torch import fx, nn

__all__ = ["copy_module_tree", "copy_graph", "own_parameters"]


def _container_names() -> tuple[str, ...]:
    """The per-module dicts and sets ``nn.Module.__init__`` creates (parameters, buffers,
    submodules, non-persistent names, every hook dict): read from a fresh module, so a
    torch release that adds a hook dict is covered without a change here."""
    return tuple(k for k, v in vars(nn.Module()).items() if isinstance(v, (dict, set)))


_CONTAINERS = _container_names()


def copy_graph(graph: fx.Graph) -> fx.Graph:
    """A deep copy of a graph (nodes, metadata, code generator)."""
    with warnings.catch_warnings():  # torch's own pytree spec copy warns about itself
        warnings.simplefilter("ignore", FutureWarning)
        return copy.deepcopy(graph)


def _kinds(cls: type) -> tuple[type, list[tuple[Any, str]]]:
    """The class under the module form's subclasses (``_onelora_base``), and the
    subclasses over it, innermost first, as ``(rebuild, kind)``."""
    layers = []
    while "_onelora_base" in vars(cls):
        layers.append((vars(cls)["_onelora_rebuild"], vars(cls)["_onelora_kind"]))
        cls = vars(cls)["_onelora_base"]
    return cls, layers[::-1]


def _twin(module: nn.Module) -> nn.Module:
    """A shallow copy of one module with containers of its own."""
    if isinstance(module, fx.GraphModule):
        # Each GraphModule instance has a class of its own that holds its compiled
        # forward; the twin needs a new one, and a graph of its own to compile. A
        # GraphModule adapted in the module form has subclasses over that class: the
        # twin gets the same kinds of subclasses over its own.
        plain, layers = _kinds(type(module))
        twin = fx.GraphModule.__new__(plain)
    else:
        twin = type(module).__new__(type(module))
    twin.__dict__ = dict(module.__dict__)
    for key in getattr(type(module), "_onelora_uncopied", ()):  # per-instance state a copy must rebuild
        twin.__dict__.pop(key, None)
    for name in _CONTAINERS:
        value = module.__dict__.get(name)
        if value is not None:
            twin.__dict__[name] = copy.copy(value)
    if isinstance(module, fx.GraphModule):
        type(twin).__name__ = type(module).__name__  # the model's class name, as GraphModule gives it
        twin.meta = dict(module.meta)
        twin.graph = copy_graph(module.graph)  # sets owning_module and compiles forward
        for rebuild, kind in layers:
            twin.__class__ = rebuild(type(twin), kind)
    return twin


def copy_module_tree(root: nn.Module, _memo: Optional[dict[int, nn.Module]] = None) -> nn.Module:
    """A copy of ``root``'s module tree that shares every parameter and buffer tensor.

    Registering, removing or replacing a parameter, buffer, submodule or hook anywhere in
    the copy leaves ``root`` as it was, and the other way round; the tensors themselves
    are shared, so an in-place write to a weight is seen by both.

    Examples:
        >>> model = nn.Sequential(nn.Linear(4, 4))
        >>> twin = copy_module_tree(model)
        >>> twin[0] is model[0], twin[0].weight is model[0].weight
        (False, True)
    """
    memo: dict[int, nn.Module] = {} if _memo is None else _memo
    if id(root) in memo:
        return memo[id(root)]
    twin = _twin(root)
    memo[id(root)] = twin
    for name, child in list(twin._modules.items()):
        if child is not None:
            twin._modules[name] = copy_module_tree(child, memo)
    return twin


def own_parameters(root: nn.Module) -> None:
    """Give ``root`` Parameter objects of its own that share the storage of the ones it
    held (no weight memory; a tied weight stays one object).

    An adapted module freezes its base weights, moves them (``to(dtype)``), wraps them
    (FSDP): done on Parameter objects shared with the user's model, all of that would
    change the model too. Only writes into the storage are shared (``merge(inplace=True)``,
    an optimizer stepping the model). Parameter subclasses that carry state of their own
    (bitsandbytes' quantized ``Params4bit``) stay shared: they are frozen weights.
    """
    memo: dict[int, nn.Parameter] = {}
    for module in root.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in memo:
                plain = type(p) is nn.Parameter or not issubclass(type(p), nn.Parameter)
                memo[id(p)] = nn.Parameter(p.detach(), requires_grad=p.requires_grad) if plain else p
            module._parameters[name] = memo[id(p)]
