"""From the meta device to real memory: what ``to_empty`` leaves uninitialized, and
loading a base checkpoint into an adapted module.

A model built on ``meta`` (a 7B model costs nothing there) is adapted, then given real
memory with ``to_empty(device=...)`` and its checkpoint with ``load_state_dict``. The
checkpoint fills the weights and persistent buffers. Two things it cannot fill are
handled here:

* the 1LoRA vectors ``b``: zero, as at adaptation (:func:`zero_vectors`);
* non-persistent buffers (LLaMA's rotary ``inv_freq``): in no state dict, so rebuilt
  (:func:`rebuild_buffers`): from the model's own tensor when that one is real, else by
  the model's initializer for that module (Hugging Face ``_init_weights``, torchtune's
  ``rope_init()``), else named in a warning.

``load_state_dict`` of the model's own checkpoint fills the base weights, buffers and
``train`` extras (they keep the base names). The 1LoRA vectors are in no base
checkpoint, so they are not reported missing when the state dict holds none of them
(``strict=True`` holds for a base checkpoint); one that holds some but not all (another
pattern's adapter) reports the others missing. The hook :func:`install` puts on an
adapted module fills what is unset after each load.
"""

from __future__ import annotations

import warnings
from typing import Iterable

import torch
from torch import nn

from ..copying import copy_module_tree
from ..records import join
from ..state import get_state
from ..state import OneLoRAWarning

__all__ = ["install", "zero_vectors", "rebuild_buffers", "non_persistent_buffers", "note_unset", "settle", "fill_unset", "UNSET"]

#: names (vectors, non-persistent buffers) that hold no values yet: they were made on
#: the meta device. Kept in the module's ``__dict__``, copy-on-write (copies share it).
UNSET = "_onelora_unset"


def zero_vectors(vectors: Iterable[torch.Tensor]) -> None:
    with torch.no_grad():
        for b in vectors:
            if b.device.type != "meta":
                b.zero_()


def non_persistent_buffers(root: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """``{fqn: (owner module, buffer name)}`` of every non-persistent buffer."""
    out = {}
    for path, module in root.named_modules(remove_duplicate=False):
        for name in module._non_persistent_buffers_set:
            if module._buffers.get(name) is not None:
                out[join(path, name)] = (module, name)
    return out


def _from_initializer(model: nn.Module, path: str, wanted: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Run the model's own initializer on a stand-in of module ``path`` whose tensors are
    fresh memory shaped like ``wanted`` (buffers) and throwaway (parameters); return the
    buffers it filled in."""
    try:
        original = model.get_submodule(path) if path else model
    except AttributeError:
        return {}
    stand_in = copy_module_tree(original)
    device = next(iter(wanted.values())).device
    with torch.no_grad():
        for name, p in list(stand_in.named_parameters(recurse=False)):
            stand_in._parameters[name] = nn.Parameter(torch.empty_like(p, device=device), requires_grad=False)
        for name in list(stand_in._buffers):
            if stand_in._buffers[name] is not None:
                like = wanted.get(name, stand_in._buffers[name])
                stand_in._buffers[name] = torch.empty_like(like, device=device)
        if callable(getattr(stand_in, "rope_init", None)):  # torchtune's rotary embeddings
            stand_in.rope_init()
        elif callable(getattr(model, "_init_weights", None)):  # Hugging Face PreTrainedModel
            model._init_weights(stand_in)
        else:
            return {}
    return {name: stand_in._buffers[name] for name in wanted if stand_in._buffers.get(name) is not None}


def rebuild_buffers(root: nn.Module, model: nn.Module, names: Iterable[str]) -> list[str]:
    """Refill the non-persistent buffers ``names`` of ``root`` (an adapted copy of
    ``model``); returns the names it could not rebuild (after warning about them)."""
    held = non_persistent_buffers(root)
    originals = dict(model.named_buffers(remove_duplicate=False))
    by_owner: dict[str, dict[str, torch.Tensor]] = {}
    done: set[str] = set()
    with torch.no_grad():
        for fqn in names:
            if fqn not in held:
                continue
            module, leaf = held[fqn]
            source = originals.get(fqn)
            if source is not None and source.device.type != "meta":
                module._buffers[leaf].copy_(source)
                done.add(fqn)
            else:
                owner = fqn.rpartition(".")[0]
                by_owner.setdefault(owner, {})[leaf] = module._buffers[leaf]
        for owner, wanted in by_owner.items():
            for leaf, value in _from_initializer(model, owner, wanted).items():
                wanted[leaf].copy_(value)
                done.add(join(owner, leaf))
    left = [n for n in names if n in held and n not in done]
    if left:
        warnings.warn(
            f"non-persistent buffers {', '.join(left)} are in no state dict and could not be rebuilt "
            "after leaving the meta device: they hold uninitialized memory. Set them yourself "
            "(or build the model on a real device) before running it.",
            category=OneLoRAWarning, stacklevel=3,
        )
    return left


def note_unset(root: nn.Module, vectors: Iterable[str]) -> None:
    """Remember which of ``vectors`` and of the non-persistent buffers are on meta
    (their values are gone: a move back to memory must fill them)."""
    params = dict(root.named_parameters(remove_duplicate=False))
    unset = [n for n in vectors if n in params and params[n].device.type == "meta"]
    unset += [n for n, (m, leaf) in non_persistent_buffers(root).items() if m._buffers[leaf].device.type == "meta"]
    root.__dict__[UNSET] = frozenset(unset) | root.__dict__.get(UNSET, frozenset())


def after_move(root: nn.Module, vectors: Iterable[str], model: nn.Module | None) -> None:
    """After ``to`` / ``to_empty``: what went to meta lost its values; what left it
    since is filled (vectors zeroed, buffers rebuilt)."""
    note_unset(root, vectors)
    fill_unset(root, model)


def settle(root: nn.Module, names: Iterable[str]) -> None:
    """Those names hold real values now."""
    unset = root.__dict__.get(UNSET)
    if unset:
        root.__dict__[UNSET] = frozenset(unset - set(names))


def fill_unset(root: nn.Module, model: nn.Module | None) -> None:
    """Zero the vectors and rebuild the buffers that left the meta device since."""
    unset = root.__dict__.get(UNSET)
    if not unset:
        return
    params = dict(root.named_parameters(remove_duplicate=False))
    vectors = [n for n in unset if n in params and params[n].device.type != "meta"]
    zero_vectors(params[n] for n in vectors)
    held = non_persistent_buffers(root)
    buffers = [n for n in unset if n in held and held[n][0]._buffers[held[n][1]].device.type != "meta"]
    if buffers and model is not None:
        rebuild_buffers(root, model, buffers)
    settle(root, [*vectors, *buffers])


def _after_load(module: nn.Module, keys) -> None:
    state = get_state(module)
    vectors = set(state.vectors) if state is not None else set()
    missing = vectors & set(keys.missing_keys)
    if missing == vectors:
        # a base checkpoint (no vector in it): the vectors are not missing from it, so
        # strict=True holds; a state dict with some vectors but not all (another
        # pattern's adapter) reports the others missing, and strict=True refuses it
        keys.missing_keys[:] = [k for k in keys.missing_keys if k not in vectors]
    fill_unset(module, state.model if state is not None else None)


def install(root: nn.Module) -> None:
    """Register the load hook on an adapted module and note what meta left empty."""
    state = get_state(root)
    note_unset(root, state.vectors if state else ())
    root.register_load_state_dict_post_hook(_after_load)
