"""Adapter checkpoints: only the trained tensors, as safetensors.

A file holds the ``b`` vectors and any ``train`` extras of an adapted module, by their
names in that module, plus metadata: the format version, the pattern, each adapted
site's name and shape, and the dtypes. A 7B LLaMA adapter (all-linear) is 1.4 M
float32 values: about 5 MB (2.7 MB in bfloat16). Names are the same in the graph form
and the module form, so a file saved from one loads into the other.

:func:`load_adapter` checks the whole file against the module before it writes a single
value, so a wrong, truncated, corrupt or non-finite file leaves the module exactly as it
was. :func:`save_adapter` writes to a temporary file next to the target and renames it,
so a failed save never leaves half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..compat import is_dtensor
from ..forms.materialize import settle
from ..query import adapted_sites, adapter_parameters
from ..state import get_state

__all__ = ["save_adapter", "load_adapter", "AdapterFileError", "FORMAT", "read_adapter", "check_fits", "placed_like"]

FORMAT = "onelora_fx.adapter/1"


class AdapterFileError(ValueError):
    """An adapter file that does not fit the module, is not an adapter file, or cannot
    be written where it was asked to go."""


def _metadata(module: nn.Module) -> dict[str, str]:
    state = get_state(module)
    sites = [
        {"site": s.name, "vector": s.adapter_name, "weight": s.weight_name, "out_features": s.out_features,
         "in_features": s.in_features, "layout": s.layout.value, **({"experts": s.experts} if s.experts else {})}
        for s in adapted_sites(module)
        if s.adapted and s.call_index == 0
    ]
    return {
        "format": FORMAT,
        "pattern": state.pattern if state else "unknown",
        "train": json.dumps([getattr(e, "value", e) for e in state.train] if state else []),
        "sites": json.dumps(sites),
    }


def write_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    """safetensors ``tensors`` at ``path``, atomically; errors name ``path``."""
    from safetensors.torch import save_file

    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise AdapterFileError(f"cannot write the adapter to {path}: it is a directory; give a file name")
    if not parent.is_dir():
        raise AdapterFileError(f"cannot write the adapter to {path}: folder {parent} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=parent)
    except OSError as e:
        raise AdapterFileError(f"cannot write the adapter to {path}: {e.strerror or e} (folder {parent})") from e
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except Exception as e:
        Path(tmp).unlink(missing_ok=True)
        raise AdapterFileError(f"cannot write the adapter to {path}: {e}") from e
    return path


def _targets(module: nn.Module, index: Optional[int]) -> dict[str, torch.Tensor]:
    """The trained tensors, or adapter ``index``'s rows of a stack (``ol.stack``)."""
    state = get_state(module)
    count = len(state.stack) if state is not None else 0
    params = adapter_parameters(module)
    if not count:
        if index is not None:
            raise ValueError("index= picks one adapter of a stack (ol.stack); this module holds one adapter")
        return params
    if index is None or isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
        # no negative index: in adapter_ids, -1 is the base model, not the last adapter
        got = "" if index is None else f" (got {index!r}; -1 in adapter_ids is the base model, which has no file)"
        raise ValueError(f"this module stacks {count} adapters ({', '.join(state.stack)}): pass index=0..{count - 1}{got}")
    return {name: p[index] for name, p in params.items()}


def save_adapter(module: nn.Module, path: str | os.PathLike, *, index: Optional[int] = None,
                 timeout: float = 600.0) -> Path:
    """Write the trained tensors of an adapted module to ``path`` (safetensors); for a
    stack (``ol.stack``), those of adapter ``index``.

    Under tensor parallelism or FSDP2 (DTensor vectors) call it on every rank: the
    shards are gathered with a collective and rank 0 writes the file. With the gloo
    backend, ranks that do not call it within ``timeout`` seconds are an error naming
    them (``torch.distributed.monitored_barrier``), not a wait until the process group's
    timeout; NCCL has no such barrier, and waits.

    Examples:
        >>> ol.save_adapter(gm, "adapter.safetensors")      # doctest: +SKIP

    Raises:
        AdapterFileError: ``path`` is a directory, its folder is missing or not writable.
        ValueError: the module carries no 1LoRA vectors; ``index`` missing for a stack.
        RuntimeError: (gloo) a rank did not call it within ``timeout`` seconds.
    """
    targets = _targets(module, index)
    distributed = any(is_dtensor(p) for p in targets.values()) and torch.distributed.is_initialized()
    if distributed:
        _every_rank_here("save_adapter", timeout)
    # a DTensor (tensor parallelism, FSDP2) is gathered on every rank (a collective);
    # rank 0 writes the file the one-process module would
    tensors = {name: _gathered(p).detach().contiguous().cpu() for name, p in targets.items()}
    if not tensors:
        raise ValueError("the module carries no 1LoRA vectors: nothing to save (transform it first)")
    if not distributed or torch.distributed.get_rank() == 0:
        written = write_tensors(tensors, Path(path), _metadata(module))
    if distributed:
        torch.distributed.barrier()
    return Path(path) if distributed else written


def _every_rank_here(what: str, timeout: float) -> None:
    """Before a collective every rank must join: with gloo, check that they do."""
    import datetime

    if torch.distributed.get_backend() != "gloo":
        return  # monitored_barrier is gloo's
    try:
        torch.distributed.monitored_barrier(timeout=datetime.timedelta(seconds=timeout), wait_all_ranks=True)
    except RuntimeError as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise RuntimeError(
            f"{what} gathers the sharded vectors from every rank, and not every rank called it within {timeout:g} s "
            f"({first}): call ol.{what} on every rank (rank 0 writes the file)") from None


def _gathered(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if is_dtensor(t) else t


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and metadata of an adapter file, checked to be one (and finite)."""
    from safetensors import safe_open

    path = Path(path)
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
    bad = sorted(name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all())
    if bad:
        raise AdapterFileError(f"{path} holds non-finite values (NaN or infinity) in {', '.join(bad[:8])}; it was not loaded")
    return tensors, meta


def placed_like(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``value`` on ``target``'s device, and on its mesh with its placements when the
    target is a DTensor (every rank read the same file: no communication)."""
    if is_dtensor(target):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value.to(target.device_mesh.device_type), target.device_mesh, target.placements,
                                 src_data_rank=None)
    return value.to(target.device)


def check_fits(targets: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], where: str, meta: Optional[dict] = None) -> None:
    """Raise :class:`AdapterFileError` unless ``tensors`` has exactly ``targets``' names,
    shapes and dtypes, and ``targets`` hold memory to load into."""
    on_meta = sorted(n for n, t in targets.items() if t.device.type == "meta")
    if on_meta:  # a copy into meta is a no-op: the loaded values would be lost silently
        raise AdapterFileError(
            f"cannot load {where}: the module's 1LoRA vectors are on the meta device ({on_meta[0]}"
            f"{', ...' if len(on_meta) > 1 else ''}; the model was built there). Give it memory first "
            "(gm.to_empty(device=...), then load_state_dict of the base weights), then load the adapter; "
            "nothing was loaded")
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
        saved = f" (saved with pattern {meta.get('pattern')!r}, train={meta.get('train')})" if meta else ""
        raise AdapterFileError(f"{where} does not fit this module{saved}:\n  " + "\n  ".join(problems))


def load_adapter(module: nn.Module, path: str | os.PathLike, *, index: Optional[int] = None) -> nn.Module:
    """Load trained tensors saved by :func:`save_adapter` into an adapted module (into
    adapter ``index`` of a stack: adding an adapter to a stack changes data only).

    Everything is checked first (the file reads, its values are finite, names match
    exactly, shapes and dtypes agree); any mismatch raises :class:`AdapterFileError` and
    no tensor is changed. A file saved from the graph form loads into the module form
    of the same model and the other way round.

    Examples:
        >>> gm = ol.transform(model, "all-linear", example_kwargs=kw)   # doctest: +SKIP
        >>> ol.load_adapter(gm, "adapter.safetensors")                  # doctest: +SKIP
    """
    tensors, meta = read_adapter(path)
    targets = _targets(module, index)
    if not targets:
        raise AdapterFileError("the module carries no 1LoRA vectors: transform the base model first, then load")
    check_fits(targets, tensors, str(path), meta)
    with torch.no_grad():
        for name, p in targets.items():
            p.copy_(placed_like(tensors[name], p))
    settle(module, targets)  # loaded vectors are set, whatever meta left them
    return module
