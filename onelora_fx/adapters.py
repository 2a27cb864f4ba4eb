"""Adapter checkpoints: only the trained tensors, as safetensors.

A file holds the ``b`` vectors and any ``train`` extras of an adapted module, by their
names in that module, plus metadata: the format version, the pattern, each adapted
site's name and shape, and the dtypes. A 7B LLaMA adapter (all-linear) is 1.4 M
float32 values: about 5 MB (2.7 MB in bfloat16).

:func:`load_adapter` checks the whole file against the module before it writes a single
value, so a wrong, truncated or corrupt file leaves the module exactly as it was.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .state import get_state
from .transform import adapted_sites, adapter_parameters

__all__ = ["save_adapter", "load_adapter", "AdapterFileError", "FORMAT"]

FORMAT = "onelora_fx.adapter/1"


class AdapterFileError(ValueError):
    """An adapter file that does not fit the module (or is not an adapter file)."""


def _metadata(module: nn.Module) -> dict[str, str]:
    state = get_state(module)
    sites = [
        {"site": s.name, "vector": s.adapter_name, "weight": s.weight_name, "out_features": s.out_features,
         "in_features": s.in_features, "layout": s.layout.value}
        for s in adapted_sites(module)
        if s.adapted and s.call_index == 0
    ]
    return {
        "format": FORMAT,
        "pattern": state.pattern if state else "unknown",
        "train": json.dumps([e.value for e in state.train] if state else []),
        "sites": json.dumps(sites),
    }


def save_adapter(module: nn.Module, path: str | os.PathLike) -> Path:
    """Write the trained tensors of an adapted module to ``path`` (safetensors).

    Example:
        >>> ol.save_adapter(gm, "adapter.safetensors")      # doctest: +SKIP
    """
    from safetensors.torch import save_file

    tensors = {name: p.detach().contiguous().cpu() for name, p in adapter_parameters(module).items()}
    if not tensors:
        raise ValueError("the module carries no 1LoRA vectors: nothing to save (transform it first)")
    path = Path(path)
    save_file(tensors, str(path), metadata=_metadata(module))
    return path


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"no adapter file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise AdapterFileError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); it may be truncated or corrupt") from e
    if meta.get("format") != FORMAT:
        raise AdapterFileError(f"{path} is not an onelora_fx adapter (format {meta.get('format')!r}, expected {FORMAT!r})")
    return tensors, meta


def load_adapter(module: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load trained tensors saved by :func:`save_adapter` into an adapted module.

    Everything is checked first (the file reads, names match exactly, shapes and dtypes
    agree); any mismatch raises :class:`AdapterFileError` and no tensor is changed.

    Example:
        >>> gm = ol.transform(model, "all-linear", example_kwargs=kw)   # doctest: +SKIP
        >>> ol.load_adapter(gm, "adapter.safetensors")                  # doctest: +SKIP
    """
    path = Path(path)
    tensors, meta = _read(path)
    targets = adapter_parameters(module)
    if not targets:
        raise AdapterFileError("the module carries no 1LoRA vectors: transform the base model first, then load")
    missing = sorted(set(targets) - set(tensors))
    unexpected = sorted(set(tensors) - set(targets))
    problems = []
    if missing:
        problems.append(f"missing from the file: {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
    if unexpected:
        problems.append(f"not in this module: {', '.join(unexpected[:8])}" + (" ..." if len(unexpected) > 8 else ""))
    for name in sorted(set(targets) & set(tensors)):
        want, got = targets[name], tensors[name]
        if tuple(want.shape) != tuple(got.shape):
            problems.append(f"{name}: shape {tuple(got.shape)} in the file, {tuple(want.shape)} in the module")
        elif want.dtype != got.dtype:
            problems.append(f"{name}: dtype {got.dtype} in the file, {want.dtype} in the module")
    if problems:
        raise AdapterFileError(
            f"{path} does not fit this module (saved with pattern {meta.get('pattern')!r}, "
            f"train={meta.get('train')}):\n  " + "\n  ".join(problems)
        )
    with torch.no_grad():
        for name, p in targets.items():
            p.copy_(tensors[name].to(p.device))
    return module
