"""``transform``: capture -> find sites -> select -> adapt -> freeze, in one call.

The orchestrator: it chooses the form once (a captured graph, or the module form when
``capture="module"`` or no graph capture works under ``"auto"``) and runs the stages
through the form's interface (:mod:`onelora_fx.forms`). Nothing imports this module but
the public API.
"""

from __future__ import annotations

import fnmatch
import logging
import time
import warnings
from dataclasses import replace
from typing import Any, Iterable, Optional, Sequence, Union

import torch
from torch import nn

from .forms.graph.capture import CaptureError, first_line, mode_note, why_export_failed
from .analysis.accounting import Accounting, warn_unadapted
from .compat import is_dtensor, is_fsdp_module
from .forms import Captured, Form, GraphForm, ModuleForm
from .forms.base import refuse_adapter_ids
from .forms.module.form import has_quantized
from .quant import is_quantized_layer, is_quantized_weight
from .forms.materialize import install as install_load_hook
from .analysis.norms import NEAR_UNIFORM_CV
from .analysis.patterns import Pattern, PatternError, compile_pattern, describe, select
from .query import adapted_sites, is_adapted
from .records import LinearSite, join
from .state import AdapterState, AlreadyAdaptedError, Capture, Extra, get_state, set_state
from .state import OneLoRAWarning

__all__ = ["transform", "sites", "inspect_sites"]

log = logging.getLogger(__name__)

Train = Union[str, Extra, Iterable[Union[str, Extra]]]


def _extras(train: Train) -> tuple[Union[Extra, str], ...]:
    """``train=`` items: an :class:`Extra`, or any other string naming modules to train in
    full (PEFT's ``modules_to_save``: a bare module name at any depth, or a glob on paths)."""
    items = [train] if isinstance(train, (str, Extra)) else list(train)
    out: list[Union[Extra, str]] = []
    for item in items:
        try:
            out.append(Extra(item))
        except ValueError:
            if not isinstance(item, str) or not item:
                raise TypeError(f"train= takes 'bias', 'norm', 'head' or module names / globs, got {item!r}") from None
            out.append(item)
    return tuple(dict.fromkeys(out))


def _modules_named(model: nn.Module, pattern: str) -> list[str]:
    """Module paths a ``train=`` name selects: as a site pattern reads a bare name or glob."""
    bare = not any(c in pattern for c in ".*?[]")
    return [path for path, _ in model.named_modules() if path and (
        (path == pattern or path.endswith("." + pattern)) if bare else fnmatch.fnmatchcase(path, pattern))]


def _is_norm(m: nn.Module) -> bool:
    # LayerNorm, GroupNorm, BatchNorm*, RMSNorm, LlamaRMSNorm, T5LayerNorm, ...
    return "norm" in type(m).__name__.lower()


def _extra_names(root: nn.Module, model: nn.Module, found: Sequence[LinearSite], extras: tuple[Union[Extra, str], ...]) -> list[str]:
    """Names (in ``root``) of the parameters that ``extras`` ask to train."""
    present = dict(root.named_parameters(remove_duplicate=False))
    names: list[str] = []
    if Extra.BIAS in extras:
        names += [n for n in present if n.rpartition(".")[2] == "bias"]
    if Extra.NORM in extras:
        for path, m in model.named_modules():
            if _is_norm(m):
                names += [join(path, p) for p in m._parameters if m._parameters[p] is not None]
    if Extra.HEAD in extras:
        heads = [s for s in found if s.is_head and s.call_index == 0]
        if not heads:
            raise ValueError("train=('head',) but the model has no output head (see ol.sites(...).is_head)")
        for s in heads:
            names.append(s.weight_name)
            if s.has_bias and join(s.owner, "bias") in present:
                names.append(join(s.owner, "bias"))
    for pattern in (e for e in extras if not isinstance(e, Extra)):
        paths = _modules_named(model, pattern)
        if not paths:
            raise ValueError(
                f"train={pattern!r} is neither one of 'bias' (BitFit), 'norm' (normalization layers), 'head' (the "
                f"output head) nor the name or glob of a module of {type(model).__name__}: pass one of those, a module "
                "name such as 'score' or a glob such as '*.classifier'")
        for path in paths:
            names += [join(path, n) for n, _ in model.get_submodule(path).named_parameters()]
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
    sharded = next((n or "the model itself" for n, m in model.named_modules() if is_fsdp_module(m)), None)
    if sharded is not None:
        # FSDP2 owns those modules' parameters (it swaps sharded and gathered tensors in
        # on every forward): an adapted copy of them would run on shards
        raise TypeError(
            f"{type(model).__name__} is already sharded with fully_shard (FSDP2; {sharded} is an FSDP module): "
            "transform the unsharded model, then call fully_shard on the adapted module's layers and on it "
            "(gm = ol.transform(model, ...); fully_shard(layer) for each layer; fully_shard(gm))")


def _take(model: nn.Module, args: tuple, kwargs: dict, method: Capture, dynamic: bool) -> tuple[Form, Captured]:
    """The model in the form ``method`` asks for (``auto``: a graph when one works), and
    that form: the one choice of form, made here once."""
    if method is Capture.MODULE:
        return ModuleForm(), ModuleForm().capture(model, args, kwargs, dynamic, method)
    if method is Capture.AUTO and has_quantized(model):
        # a captured graph shows no linear call on a quantized weight (torchao's are
        # decomposed into integer ops, bitsandbytes' do not export): the model's own class
        log.info("%s holds quantized linears: adapting it in the module form", type(model).__name__)
        return ModuleForm(), ModuleForm().capture(model, args, kwargs, dynamic, Capture.MODULE)
    layer = next((n for n, m in model.named_modules() if is_quantized_layer(m)), None)
    if layer is not None:
        # a graph capture runs the layer's own forward on the user's model, which
        # bitsandbytes may repack in place, and the graph shows no linear call to adapt
        raise CaptureError(
            f"{type(model).__name__} holds bitsandbytes quantized layers ({layer}: "
            f"{type(model.get_submodule(layer)).__name__}), which a captured graph (capture={method.value!r}) "
            "cannot adapt. Use capture='module' (or 'auto', which picks it).", {})
    parallel = next((n for n, p in model.named_parameters() if is_dtensor(p)), None)
    if parallel is not None:
        # tensor parallelism hooks the forward of the model's own linear layers, which a
        # captured graph never calls (it reads their weights with get_attr)
        if method is not Capture.AUTO:
            raise CaptureError(
                f"{type(model).__name__}'s parameters are DTensors ({parallel}: tensor parallelism or FSDP2): a "
                f"captured graph (capture={method.value!r}) does not call the parallelized modules. Use "
                "capture='module' (or 'auto', which picks it).", {})
        log.info("%s holds DTensor parameters (%s): adapting it in the module form", type(model).__name__, parallel)
        return ModuleForm(), ModuleForm().capture(model, args, kwargs, dynamic, Capture.MODULE)
    try:
        return GraphForm(), GraphForm().capture(model, args, kwargs, dynamic, method)
    except CaptureError as e:
        if method is not Capture.AUTO:
            raise
        causes = [why_export_failed(r) if k == "export" else f"{type(r).__name__}: {first_line(r)}" for k, r in e.reasons.items()]
        warnings.warn(
            f"no graph capture works for {type(model).__name__} ({'; '.join(causes)}). Adapting it in the "
            "module form instead: the model's own class with its layers adapted (same names, same "
            "numerics; generate() and save_pretrained() work).",
            category=OneLoRAWarning, stacklevel=3,
        )
        form = ModuleForm(failed=e)
        return form, form.capture(model, args, kwargs, dynamic, Capture.MODULE)


def _warn_uniform_norms(chosen: Sequence[LinearSite]) -> None:
    """1LoRA's term vanishes behind a LayerNorm whose scale is (nearly) uniform."""
    picked = [s for s in chosen if s.selected and s.call_index == 0]
    flat = [s for s in picked if s.norm is not None and s.norm_scale_cv is not None and s.norm_scale_cv < NEAR_UNIFORM_CV]
    if flat:
        warnings.warn(
            f"{len(flat)} of {len(picked)} selected sites read a LayerNorm output whose scale is nearly "
            f"uniform (coefficient of variation < {NEAR_UNIFORM_CV}; e.g. {flat[0].name} after {flat[0].norm}): "
            "there x.sum(-1) is almost the constant sum of the norm's bias, so 1LoRA's term acts as a "
            "bias only. Train the norms too (train=('norm',)) or exclude these sites.",
            category=OneLoRAWarning, stacklevel=3,
        )


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
    module with no pattern, it marks the adapted sites. Parameters read by matmul-like
    ops that are not sites are reported in one warning.

    Examples:
        >>> [s.name for s in sites(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))) if s.selected]
        ['0']
    """
    return inspect_sites(model_or_gm, pattern, exclude=exclude, example_inputs=example_inputs, example_kwargs=example_kwargs,
                   capture=capture, stacklevel=3)[0]


def inspect_sites(
    model_or_gm: nn.Module,
    pattern: Optional[Pattern] = None,
    *,
    exclude: Optional[Pattern] = None,
    example_inputs: Optional[Sequence[Any]] = None,
    example_kwargs: Optional[dict[str, Any]] = None,
    capture: str = "auto",
    stacklevel: int = 2,
) -> tuple[list[LinearSite], Optional[Accounting]]:
    """:func:`sites` and the weight accounting (what reads every weight), for
    ``onelora-fx inspect``."""
    if not isinstance(model_or_gm, nn.Module):
        raise TypeError(f"sites() takes a torch.nn.Module, got {type(model_or_gm).__name__}")
    if is_adapted(model_or_gm):
        state = get_state(model_or_gm)
        found = adapted_sites(model_or_gm)
        return (found if pattern is None else select(found, pattern, exclude)), (state.accounting if state else None)
    method = Capture.parse(capture)
    _, captured = _take(model_or_gm, tuple(example_inputs or ()), dict(example_kwargs or {}), method, True)
    warn_unadapted(model_or_gm, captured.accounting.unadapted(), stacklevel=stacklevel)
    return select(captured.sites, "all-linear" if pattern is None else pattern, exclude), captured.accounting


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
) -> nn.Module:
    """Adapt ``model`` with 1LoRA at the linear sites ``pattern`` selects.

    Returns a module called exactly like ``model`` that computes
    ``linear(x) + b * x.sum(-1, keepdim=True)`` at every selected site, with one
    trainable ``b`` (zeros) per weight, registered next to it (``<owner>.onelora_b``).
    Base parameters are shared with ``model`` (the same storage, no copy) in Parameter
    objects of the result's own, which are frozen; ``train`` adds trainable copies of
    ``"bias"``, ``"norm"`` or ``"head"`` parameters, or of every parameter of the modules
    a name or glob selects (PEFT's ``modules_to_save``: ``train=("score",)``). ``model`` itself is never changed
    (its ``requires_grad``, dtype, device, hooks and modes stay as they were).

    The result is a ``torch.fx.GraphModule`` (the graph form) when a graph capture works
    (``capture="auto"``, ``"fx"``, ``"export"``), or a copy of the model's own class with
    its layers adapted (the module form: ``capture="module"``, or ``"auto"`` when no
    graph capture works, with a warning saying why).

    Examples:
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
        ValueError: export is needed and no example inputs were given; a bad ``capture``.
        CaptureError: ``capture="fx"`` / ``"export"`` and that capture failed.
    """
    _check_model(model)
    compile_pattern(pattern)  # type errors before any work
    if exclude is not None:
        compile_pattern(exclude)
    extras = _extras(train)
    method = Capture.parse(capture)

    start = time.perf_counter()
    form, captured = _take(model, tuple(example_inputs or ()), dict(example_kwargs or {}), method, dynamic)
    root, found = captured.root, captured.sites
    log.info("captured %s (%s) in %.2fs: %d linear sites", type(model).__name__, captured.method.value,
             time.perf_counter() - start, len(found))
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no linear sites (nn.Linear, F.linear, addmm / mm / matmul on a "
            "parameter, grouped expert matmuls); there is nothing for 1LoRA to adapt"
        )
    if captured.mode_note is not None:
        log.info("%s", mode_note(model, captured.mode_note))
    warn_unadapted(model, captured.accounting.unadapted(), stacklevel=2)
    try:
        chosen = select(found, pattern, exclude)
    except PatternError as e:
        quantized = [n for n, p in model.named_parameters() if is_quantized_weight(p)]
        if quantized and captured.method is not Capture.MODULE:
            # a captured graph decomposes a quantized linear into integer ops: no site there
            raise PatternError(
                f"{e}\n{len(quantized)} quantized weights ({', '.join(quantized[:3])}{', ...' if len(quantized) > 3 else ''}) "
                f"are no sites in a captured graph (capture={captured.method.value!r}): use capture='module' "
                "(or 'auto', which picks it for quantized models)") from None
        raise
    if Extra.NORM not in extras:  # trained norms stop being uniform
        _warn_uniform_norms(chosen)
    extra_names = _extra_names(root, model, chosen, extras)

    # Everything is checked: mutate.
    vectors = form.adapt(root, chosen)
    trained = {id(b) for b in vectors.values()}
    for p in root.parameters():
        if id(p) not in trained:
            p.requires_grad_(False)
    originals = _train_copies(root, extra_names)
    records = tuple(replace(s.record(), adapted=s.selected) for s in chosen)
    set_state(root, AdapterState(describe(pattern), captured.method.value, extras, originals, captured.buffers,
                                 model, records, tuple(vectors), accounting=captured.accounting))
    install_load_hook(root)
    root.register_forward_pre_hook(refuse_adapter_ids, with_kwargs=True)
    log.info("adapted %d sites (%d vectors, %d trainable parameters) in %.2fs", sum(s.selected for s in chosen),
             len(vectors), sum(p.numel() for p in root.parameters() if p.requires_grad), time.perf_counter() - start)
    return root
