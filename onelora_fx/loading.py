"""Loading a base checkpoint into an adapted module, the meta-device flow included.

``load_state_dict`` of the model's own checkpoint fills the base weights, buffers and
``train`` extras (they keep the base names). The 1LoRA vectors are in no base
checkpoint, so they are not reported missing (``strict=True`` holds for a base
checkpoint); and after ``to_empty`` from the meta device, the vectors and non-persistent
buffers that hold no values yet are zeroed and rebuilt (:mod:`onelora_fx.materialize`).
"""

from __future__ import annotations

from torch import nn

from .materialize import fill_unset, note_unset
from .query import adapter_parameters
from .state import get_state

__all__ = ["install"]


def _after_load(module: nn.Module, keys) -> None:
    state = get_state(module)
    vectors = set(adapter_parameters(module)) - set(state.extras if state else ())
    keys.missing_keys[:] = [k for k in keys.missing_keys if k not in vectors]
    fill_unset(module, state.model if state is not None else None)


def install(root: nn.Module) -> None:
    """Register the load hook on an adapted module and note what meta left empty."""
    state = get_state(root)
    note_unset(root, state.vectors if state else ())
    root.register_load_state_dict_post_hook(_after_load)
