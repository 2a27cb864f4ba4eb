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
from .merge import merge
from ..query import is_adapted
from ..state import get_state

__all__ = ["export", "ExportError"]


class ExportError(RuntimeError):
    """torch.export could not take the merged module."""


def plain(value: Any) -> Any:
    """``value`` with every container torch's pytree does not know by itself turned into
    a ``dict`` of its fields (tensors, lists, tuples and dicts as they are).

    Example:
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

    Example:
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
    if example_kwargs is not None and not isinstance(example_kwargs, dict):
        raise TypeError(f"example_kwargs is a dict of keyword inputs, got {type(example_kwargs).__name__}")
    state = get_state(gm)
    stacked = state is not None and bool(state.stack)
    # a stack is exported as it is, adapter_ids an input; one adapter is merged first
    deployed = merge(gm) if is_adapted(gm) and not stacked else gm
    was_training = deployed.training
    deployed.eval()
    args = tuple(example_inputs or ())
    kwargs = dict(example_kwargs or {})
    # torch.export runs a GraphModule's graph directly; a captured module's calls must
    # go through its own call handling, which its plain view keeps
    view = getattr(deployed, "as_plain_module", None)
    target = exportable(view() if view else deployed, kwargs)
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
    leftovers = [n for n in ep.graph.nodes if "onelora" in str(n.target)]
    if leftovers and not stacked:  # merge removes every adapter node: this would be our bug
        raise ExportError(f"adapter ops survived the merge: {[n.format_node() for n in leftovers]}")
    if path is not None:
        torch.export.save(ep, os.fspath(path))
    return ep
