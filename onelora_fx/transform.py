"""``transform``: capture -> find sites -> select -> rewrite -> freeze, in one call.

This is the orchestration layer; each stage lives in its own module (capture, sites,
patterns, rewrite, fallback) and knows nothing of the others' internals.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import replace
from typing import Any, Iterable, Optional, Sequence, Union

import torch
from torch import fx, nn

from . import ops
from .capture import Capture, CaptureError, capture as capture_module, own_buffers
from .fallback import OneLoRAConv1D, OneLoRALinear, adapt_modules, module_sites, structural_copy
from .patterns import Pattern, compile_pattern, describe, select
from .rewrite import AlreadyAdaptedError, adapt_graph
from .sites import LinearSite, find_sites
from .state import AdapterState, Extra, get_state, set_state

__all__ = ["transform", "sites", "adapted_sites", "is_adapted", "adapter_parameters"]

log = logging.getLogger(__name__)

Train = Union[str, Extra, Iterable[Union[str, Extra]]]


def is_adapted(module: nn.Module) -> bool:
    """Does ``module`` already carry 1LoRA vectors (graph nodes or adapted layers)?"""
    if get_state(module) is not None:
        return True
    if isinstance(module, fx.GraphModule) and any(
        n.op == "call_function" and n.target is ops.linear for n in module.graph.nodes
    ):
        return True
    return any(isinstance(m, (OneLoRALinear, OneLoRAConv1D)) for m in module.modules())


def adapted_sites(module: nn.Module) -> list[LinearSite]:
    """The sites of an adapted module (``selected`` = carries a 1LoRA vector)."""
    if isinstance(module, fx.GraphModule):
        return [replace(s, selected=s.adapted) for s in find_sites(module)]
    return module_sites(module)


def adapter_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """Every trained tensor of an adapted module: the ``b`` vectors, then ``train`` extras.

    Found from the structure (the adapted sites and the recorded extras), never by name.

    Example:
        >>> gm = transform(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), "all")
        >>> list(adapter_parameters(gm))
        ['0.onelora_b', '1.onelora_b']
    """
    out: dict[str, nn.Parameter] = {}
    for s in adapted_sites(module):
        if s.adapted and s.adapter_name not in out:
            out[s.adapter_name] = module.get_parameter(s.adapter_name)
    state = get_state(module)
    for name in state.extras if state else ():
        out[name] = module.get_parameter(name)
    return out


def _extras(train: Train) -> tuple[Extra, ...]:
    items = [train] if isinstance(train, (str, Extra)) else list(train)
    out = []
    for item in items:
        try:
            out.append(Extra(item))
        except ValueError:
            raise ValueError(
                f"train={item!r} is not one of {[e.value for e in Extra]}: 'bias' (BitFit), "
                "'norm' (normalization layers), 'head' (the output head, in full)"
            ) from None
    return tuple(dict.fromkeys(out))


def _is_norm(m: nn.Module) -> bool:
    # LayerNorm, GroupNorm, BatchNorm*, RMSNorm, LlamaRMSNorm, T5LayerNorm, ...
    return "norm" in type(m).__name__.lower()


def _extra_names(root: nn.Module, model: nn.Module, found: Sequence[LinearSite], extras: tuple[Extra, ...]) -> list[str]:
    """Names (in ``root``) of the parameters that ``extras`` ask to train."""
    present = dict(root.named_parameters(remove_duplicate=False))
    names: list[str] = []
    if Extra.BIAS in extras:
        names += [n for n in present if n.rpartition(".")[2] == "bias"]
    if Extra.NORM in extras:
        for path, m in model.named_modules():
            if _is_norm(m):
                names += [f"{path}.{p}" if path else p for p in m._parameters if m._parameters[p] is not None]
    if Extra.HEAD in extras:
        heads = [s for s in found if s.is_head and s.call_index == 0]
        if not heads:
            raise ValueError("train=('head',) but the model has no output head (see ol.sites(...).is_head)")
        for s in heads:
            names.append(s.weight_name)
            bias = f"{s.owner}.bias" if s.owner else "bias"
            if s.has_bias and bias in present:
                names.append(bias)
    return [n for n in dict.fromkeys(names) if n in present]


def _train_copies(root: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Replace each named parameter (all its aliases) by a trainable copy."""
    originals: dict[str, torch.Tensor] = {}
    copies: set[int] = set()
    for name in names:
        old = root.get_parameter(name)
        if id(old) in copies:
            continue  # an alias of one already copied (a tied weight): it is the copy now
        new = nn.Parameter(old.detach().clone(), requires_grad=True)
        for m in root.modules():
            for attr, p in m._parameters.items():
                if p is old:
                    m._parameters[attr] = new
        copies.add(id(new))
        originals[name] = old
    return originals


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"transform() takes a torch.nn.Module, got {type(model).__name__}")
    if is_adapted(model):
        raise AlreadyAdaptedError(
            f"{type(model).__name__} already carries 1LoRA vectors; adapting it again would "
            "stack a second adapter. Transform the base model, or merge first (ol.merge)."
        )


def _capture_or_fallback(model, example_inputs, example_kwargs, method, dynamic):
    try:
        return capture_module(model, example_inputs, example_kwargs, method=method, dynamic=dynamic)
    except CaptureError as e:
        if method is not Capture.AUTO:
            raise
        warnings.warn(
            f"{e}\nAdapting {type(model).__name__} at module level instead (same names, same "
            "numerics; functional linears such as F.linear on a raw parameter are not adapted).",
            stacklevel=3,
        )
        return None


def sites(
    model_or_gm: nn.Module,
    pattern: Optional[Pattern] = None,
    *,
    exclude: Optional[Pattern] = None,
    example_inputs: Optional[Sequence[Any]] = None,
    example_kwargs: Optional[dict[str, Any]] = None,
    capture: str = "auto",
) -> list[LinearSite]:
    """Every linear site of a model (captured as ``transform`` would) or adapted module.

    ``selected`` marks what ``pattern`` (default ``"all-linear"``) chooses; on an adapted
    module with no pattern, it marks the adapted sites.

    Example:
        >>> [s.name for s in sites(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))) if s.selected]
        ['0']
    """
    if not isinstance(model_or_gm, nn.Module):
        raise TypeError(f"sites() takes a torch.nn.Module, got {type(model_or_gm).__name__}")
    if is_adapted(model_or_gm):
        found = adapted_sites(model_or_gm)
        return found if pattern is None else select(found, pattern, exclude)
    cap = _capture_or_fallback(model_or_gm, example_inputs, example_kwargs, Capture(capture), True)
    found = module_sites(model_or_gm) if cap is None else find_sites(cap.gm)
    return select(found, "all-linear" if pattern is None else pattern, exclude)


def transform(
    model: nn.Module,
    pattern: Pattern = "all-linear",
    *,
    exclude: Optional[Pattern] = None,
    example_inputs: Optional[Sequence[Any]] = None,
    example_kwargs: Optional[dict[str, Any]] = None,
    dynamic: bool = True,
    capture: str = "auto",
    train: Train = (),
) -> fx.GraphModule:
    """Adapt ``model`` with 1LoRA at the linear sites ``pattern`` selects.

    Returns a module called exactly like ``model`` that computes
    ``linear(x) + b * x.sum(-1, keepdim=True)`` at every selected site, with one
    trainable ``b`` (zeros) per weight, registered next to it
    (``<owner>.onelora_b``). Base parameters are frozen and shared with ``model`` (no
    copy); ``train`` adds trainable copies of ``"bias"``, ``"norm"`` or ``"head"``
    parameters. ``model`` itself is never changed, except that its parameters are
    frozen. It is a ``torch.fx.GraphModule`` whenever a graph capture worked; with
    ``capture="auto"`` and no capture possible, it is a structural copy of ``model``
    whose ``nn.Linear`` / ``Conv1D`` layers are adapted (with a warning).

    Example:
        >>> model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> gm = transform(model)                # every linear but the head
        >>> [n for n, p in gm.named_parameters() if p.requires_grad]
        ['0.onelora_b']
        >>> x = torch.randn(3, 16)
        >>> torch.equal(gm(x), model(x))         # b starts at zero
        True

    Raises:
        TypeError: ``model`` is not a module, or a pattern has the wrong type.
        PatternError: the pattern selects nothing (the message lists the sites).
        AlreadyAdaptedError: ``model`` already carries 1LoRA.
        ValueError: export is needed and no example inputs were given.
        CaptureError: ``capture="fx"`` / ``"export"`` and that capture failed.
    """
    _check_model(model)
    compile_pattern(pattern)  # type errors before any work
    if exclude is not None:
        compile_pattern(exclude)
    extras = _extras(train)
    method = Capture(capture)
    if method is Capture.MODULE:
        raise ValueError("capture must be 'auto', 'fx' or 'export'")

    start = time.perf_counter()
    cap = _capture_or_fallback(model, example_inputs, example_kwargs, method, dynamic)
    if cap is None:
        root: nn.Module = structural_copy(model)
        buffers = own_buffers(root)
        found = module_sites(root)
        used = Capture.MODULE
    else:
        root, buffers, used = cap.gm, cap.buffers, cap.method
        found = find_sites(root)
    log.info("captured %s with %s in %.2fs: %d linear sites", type(model).__name__, used.value, time.perf_counter() - start, len(found))
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no linear sites (nn.Linear, F.linear, addmm / mm / "
            "matmul on a 2-D parameter); there is nothing for 1LoRA to adapt"
        )
    chosen = select(found, pattern, exclude)
    extra_names = _extra_names(root, model, chosen, extras)

    # Everything is checked: mutate.
    vectors = adapt_graph(root, chosen) if used is not Capture.MODULE else adapt_modules(root, chosen)
    for p in root.parameters():
        if not any(p is b for b in vectors.values()):
            p.requires_grad_(False)
    originals = _train_copies(root, extra_names)
    set_state(root, AdapterState(describe(pattern), used.value, extras, originals, buffers))
    log.info(
        "adapted %d sites (%d vectors, %d trainable parameters) in %.2fs",
        sum(s.selected for s in chosen),
        len(vectors),
        sum(p.numel() for p in root.parameters() if p.requires_grad),
        time.perf_counter() - start,
    )
    return root
