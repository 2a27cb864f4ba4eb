"""``export``: the merged graph as a ``torch.export`` program, saved as ``.pt2``.

The program is exported from the *merged* module, so it holds no adapter op and costs
exactly what the base model costs; a plain ``torch.export.load`` reads the file back, in a
process that imports only torch: outputs of classes torch does not know (transformers'
``ModelOutput``, dataclasses, named tuples) are exported as plain dicts of their fields, so
the file records no pytree node of another library (``outputs="model"`` keeps the model's
classes, which the loading process must then import).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..forms.graph.capture import SharedView, auto_dynamic_shapes, exportable, why_export_failed
from .. import ops
from .merge import merge
from ..query import adapter_parameters, is_adapted
from ..state import get_state

__all__ = ["export", "export_onnx", "ExportError", "ADAPTERS"]

#: the keyword of a program exported with ``adapters="inputs"``: ``{name: tensor}`` of
#: every trained tensor (names as :func:`onelora_fx.adapter_parameters` gives them)
ADAPTERS = "adapters"


class ExportError(RuntimeError):
    """torch.export could not take the merged module."""


def plain(value: Any) -> Any:
    """``value`` with every container torch's pytree does not know by itself turned into
    a ``dict`` of its fields (tensors, lists, tuples and dicts as they are).

    Examples:
        >>> from collections import namedtuple
        >>> plain(namedtuple("Out", "logits")(torch.zeros(1)))
        {'logits': tensor([0.])}
    """
    if isinstance(value, torch.Tensor) or value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):  # ModelOutput is an OrderedDict subclass
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return {k: plain(v) for k, v in zip(value._fields, value)}
    if type(value) in (tuple, list):
        return type(value)(plain(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return value


def _decomposed_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], b: torch.Tensor,
                       transposed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``onelora::linear`` in plain ops (the paper's Listing 1), with its second output,
    ``x.sum(-1)``: what ONNX and ExecuTorch lower, having no kernel of ours."""
    return ops.decompose(x, weight, bias, b, transposed), x.sum(-1, dtype=ops._s_dtype(x.dtype))


def _adapters_as_inputs(module: nn.Module, names: Sequence[str]) -> nn.Module:
    """A view of ``module`` that takes its trained tensors as the keyword ``adapters``."""
    from torch.func import functional_call

    try:
        signature = inspect.signature(module.forward)
        params = list(signature.parameters.values())
        at = next((i for i, p in enumerate(params) if p.kind is p.VAR_KEYWORD), len(params))
        params.insert(at, inspect.Parameter(ADAPTERS, inspect.Parameter.KEYWORD_ONLY))
        signature = signature.replace(parameters=params)
    except (TypeError, ValueError):
        signature = None

    def forward(*args: Any, adapters: dict[str, torch.Tensor], **kwargs: Any) -> Any:
        if set(adapters) != set(names):
            raise ValueError(f"{ADAPTERS}= needs exactly the tensors {sorted(names)[:3]}...; got {sorted(adapters)[:3]}...")
        return functional_call(module, adapters, args, kwargs)

    return SharedView(module, forward, signature)


def _plain_outputs(module: nn.Module) -> nn.Module:
    """A view of ``module`` (same parameters and names) whose outputs are :func:`plain`."""
    try:
        signature = inspect.signature(module.forward)
    except (TypeError, ValueError):
        signature = None
    return SharedView(module, lambda *args, **kwargs: plain(module(*args, **kwargs)), signature)


def export(
    gm: nn.Module,
    example_inputs: Optional[Sequence[Any]] = (),
    example_kwargs: Optional[dict[str, Any]] = None,
    path: Optional[str | os.PathLike] = None,
    *,
    dynamic: bool = True,
    outputs: str = "plain",
    adapters: str = "merged",
) -> torch.export.ExportedProgram:
    """Merge ``gm`` (without changing it), export the result, and save it at ``path``.

    Every input dimension is exported as ``Dim.AUTO`` (``dynamic=True``): batch and
    sequence lengths other than the examples' work in the saved program. The program is
    exported in eval mode (no dropout). A stack (``ol.stack``) is exported unmerged, with
    ``adapter_ids`` (in ``example_kwargs``) as an input of the program.

    ``outputs="plain"`` (default) exports a transformers ``ModelOutput`` (or any class
    torch's pytree does not know) as a dict of its fields: ``out["logits"]``, and the
    file loads where only torch is imported. ``outputs="model"`` keeps the model's own
    output classes (``out.logits``); loading then needs their library imported first.

    ``adapters="merged"`` (default) folds the adapter into the weights: the base model's
    program, at its cost. ``adapters="inputs"`` keeps it apart: the program takes every
    trained tensor as the keyword ``adapters`` (``{name: tensor}``, the names of
    :func:`onelora_fx.adapter_parameters`), and the 1LoRA op is decomposed into plain ops,
    so one artifact serves any adapter of the model (in ONNX Runtime and ExecuTorch too).

    Examples:
        >>> ep = ol.export(gm, example_kwargs={"input_ids": ids}, path="model.pt2")  # doctest: +SKIP
        >>> torch.export.load("model.pt2").module()(input_ids=ids)                   # doctest: +SKIP
    """
    if not isinstance(gm, nn.Module):
        raise TypeError(f"export() takes a module, got {type(gm).__name__}")
    if isinstance(example_inputs, (str, os.PathLike)):
        raise TypeError(
            f"export(gm, {example_inputs!r}): the second argument is example_inputs (a tuple of positional "
            f"inputs); pass the file as path=: ol.export(gm, example_inputs, example_kwargs, path={str(example_inputs)!r})"
        )
    if outputs not in ("plain", "model"):
        raise ValueError(f"outputs={outputs!r}: pass 'plain' (dicts, loadable with only torch) or 'model' (the "
                         "model's own output classes)")
    if adapters not in ("merged", "inputs"):
        raise ValueError(f"adapters={adapters!r}: pass 'merged' (folded into the weights) or 'inputs' (the trained "
                         "tensors as inputs of the program, one artifact for any adapter)")
    if example_kwargs is not None and not isinstance(example_kwargs, dict):
        raise TypeError(f"example_kwargs is a dict of keyword inputs, got {type(example_kwargs).__name__}")
    state = get_state(gm)
    stacked = state is not None and bool(state.stack)
    as_inputs = adapters == "inputs"
    if as_inputs and (state is None or stacked):
        raise ValueError("adapters='inputs' exports an adapted module with one adapter (ol.transform's result); "
                         + ("a stack already takes adapter_ids" if stacked else "this module carries no adapter"))
    # a stack is exported as it is, adapter_ids an input; one adapter is merged first
    deployed = merge(gm) if is_adapted(gm) and not stacked and not as_inputs else gm
    was_training = deployed.training
    deployed.eval()
    args = tuple(example_inputs or ())
    kwargs = dict(example_kwargs or {})
    # torch.export runs a GraphModule's graph directly; a captured module's calls must
    # go through its own call handling, which its plain view keeps
    view = getattr(deployed, "as_plain_module", None)
    target = exportable(view() if view else deployed, kwargs)
    if as_inputs:
        trained = {k: v.detach() for k, v in adapter_parameters(gm).items()}
        target = _adapters_as_inputs(target, list(trained))
        kwargs[ADAPTERS] = trained
    if outputs == "plain":
        target = _plain_outputs(target)
    shapes = auto_dynamic_shapes(target, args, kwargs) if dynamic else None
    try:
        ep = torch.export.export(target, args, kwargs, dynamic_shapes=shapes, strict=False)
    except Exception as e:
        what = "stack" if stacked else "merged module"
        raise ExportError(f"torch.export failed on the {what} of {type(deployed).__name__}: {why_export_failed(e)}") from e
    finally:
        deployed.train(was_training)
    if as_inputs:
        table = torch.export.default_decompositions()
        table[torch.ops.onelora.linear.default] = _decomposed_linear
        ep = ep.run_decompositions(table)
    leftovers = [n for n in ep.graph.nodes if n.op == "call_function" and "onelora" in str(n.target)]
    if leftovers and not stacked:  # merge and the decomposition remove every adapter node: this would be our bug
        raise ExportError(f"adapter ops survived the merge: {[n.format_node() for n in leftovers]}")
    if path is not None:
        torch.export.save(ep, os.fspath(path))
    return ep


def export_onnx(
    gm: nn.Module,
    example_inputs: Optional[Sequence[Any]] = (),
    example_kwargs: Optional[dict[str, Any]] = None,
    path: Optional[str | os.PathLike] = None,
    *,
    dynamic: bool = True,
    adapters: str = "merged",
) -> Any:
    """:func:`export`, then ``torch.onnx.export`` of the program (``dynamo=True``): an ONNX
    model of the merged module, or with ``adapters="inputs"`` one whose extra inputs are
    the trained tensors (swap adapters by feeding other values). Returns torch's
    ``ONNXProgram``; saved at ``path`` when given.

    Examples:
        >>> onnx = ol.export_onnx(gm, example_kwargs={"input_ids": ids}, path="model.onnx", adapters="inputs")  # doctest: +SKIP

    Raises:
        ImportError: ``onnx`` / ``onnxscript`` are not installed (``pip install 'onelora-fx[deploy]'``).
    """
    try:
        import onnx  # noqa: F401  (torch.onnx's dynamo exporter needs both)
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ImportError(f"export_onnx needs {e.name}: pip install 'onelora-fx[deploy]'") from None
    ep = export(gm, example_inputs, example_kwargs, dynamic=dynamic, adapters=adapters)
    program = torch.onnx.export(ep, dynamo=True, verbose=False)
    if path is not None:
        program.save(os.fspath(path))
    return program
