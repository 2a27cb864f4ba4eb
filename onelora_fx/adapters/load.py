"""``load``: a base model and an adapter in one call, as ``PeftModel.from_pretrained`` does.

An adapter file (:func:`onelora_fx.save_adapter`) records the weights its vectors belong
to and the ``train`` extras; a PEFT folder (:func:`onelora_fx.save_peft`, or a MiSS r=1
adapter) names them in its tensor keys. :func:`load` adapts exactly those weights of the
model (every call of each, whatever pattern chose them when it was saved) and loads the
file, checked as :func:`onelora_fx.load_adapter` / :func:`onelora_fx.load_peft` check it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from torch import nn

from ..analysis.patterns import PatternError
from ..query import adapted_sites
from ..records import LinearSite
from ..transform import transform
from .files import AdapterFileError, load_adapter, read_adapter
from .peft import PREFIX, _read, load_peft

__all__ = ["load"]

#: the key endings that mark a 1LoRA vector in a PEFT folder (LoRA r=1, MiSS r=1)
_PEFT_VECTOR_KEYS = (".lora_A.weight", ".miss_block")


def _saved_weights(path: Path) -> tuple[set[str], Optional[list[str]]]:
    """The weight names an adapter's vectors belong to, and its ``train`` extras (None
    for a PEFT folder, which does not record ours)."""
    if path.is_dir():
        _, tensors = _read(path)
        weights = {key[len(PREFIX):-len(end)] + ".weight" for key in tensors for end in _PEFT_VECTOR_KEYS
                   if key.startswith(PREFIX) and key.endswith(end)}
        return weights, None
    _, meta = read_adapter(path)
    try:
        sites = json.loads(meta.get("sites", "[]"))
        train = json.loads(meta.get("train", "[]"))
    except json.JSONDecodeError as e:
        raise AdapterFileError(f"{path}: its metadata is not readable ({e}); load it with ol.load_adapter into a "
                               "module you transformed yourself") from e
    return {s["weight"] for s in sites}, list(train)


def load(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    example_inputs: Optional[Sequence[Any]] = None,
    example_kwargs: Optional[dict[str, Any]] = None,
    capture: str = "auto",
    train: Optional[Iterable[str]] = None,
) -> nn.Module:
    """Adapt ``model`` at the weights the adapter at ``path`` was trained on and load it.

    ``path`` is an adapter file (:func:`onelora_fx.save_adapter`) or a PEFT folder
    (:func:`onelora_fx.save_peft`, or a ``MissConfig(r=1)`` adapter). ``train`` defaults to
    the extras the file records (none for a PEFT folder). ``model`` is left as
    :func:`onelora_fx.transform` leaves it (unchanged).

    Examples:
        >>> gm = ol.load(model, "adapter.safetensors", example_kwargs={"input_ids": ids})  # doctest: +SKIP

    Raises:
        AdapterFileError: the file or folder is unreadable or holds no 1LoRA vector, or a
            weight it names is not a linear site of ``model`` (the names are listed).
    """
    path = Path(path)
    weights, recorded = _saved_weights(path)
    if not weights:
        raise AdapterFileError(f"{path} holds no 1LoRA vector: nothing to load")

    def saved(site: LinearSite) -> bool:
        return site.weight_name in weights

    try:
        gm = transform(model, saved, example_inputs=example_inputs, example_kwargs=example_kwargs, capture=capture,
                       train=tuple(recorded if train is None and recorded is not None else train or ()))
    except PatternError as e:
        raise AdapterFileError(f"{path} was trained on weights that are no linear sites of {type(model).__name__} "
                               f"({', '.join(sorted(weights)[:4])}{', ...' if len(weights) > 4 else ''}): is it an "
                               "adapter of this model?") from e
    missing = sorted(weights - {s.weight_name for s in adapted_sites(gm) if s.adapted})
    if missing:
        raise AdapterFileError(f"{path} was trained on {', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}, "
                               f"which {type(model).__name__} has no linear site for: is it an adapter of this model?")
    return load_peft(gm, path) if path.is_dir() else load_adapter(gm, path)
