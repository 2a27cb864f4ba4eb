"""``disabled``: run an adapted module as the base model, then as it was.

A DPO reference model, or the base model's output next to the adapted one's, without a
second copy of the model: every 1LoRA vector is zero inside the block (the adapted
module then computes the base model bit for bit) and every ``train`` extra holds the
model's own values; on leaving, all of them are back, whatever happened inside.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from .state import get_state

__all__ = ["disabled"]


@contextmanager
def disabled(gm: nn.Module) -> Iterator[nn.Module]:
    """Inside the block ``gm`` computes the base model: its vectors are zero and its
    ``train`` extras hold the model's values; they are restored on leaving (memory: one
    copy of the vectors and extras).

    A backward inside the block, or through a graph recorded inside it after leaving,
    fails loudly (torch's in-place check on the restored tensors): run the base model
    under ``torch.no_grad()``, as a DPO reference is.

    Examples:
        >>> with ol.disabled(gm):                          # doctest: +SKIP
        ...     reference_logits = gm(input_ids=ids).logits
    """
    state = get_state(gm)
    if state is None:
        raise ValueError(f"disabled() takes a module adapted by onelora_fx.transform; {type(gm).__name__} is not one")
    unknown = [name for name, original in state.extras.items() if original is None]
    if unknown:
        raise ValueError(f"{type(gm).__name__} was loaded in another process: the model's own values of its trained "
                         f"extras ({', '.join(unknown[:3])}) are not known here, so it cannot run as the base model")
    vectors = {name: gm.get_parameter(name) for name in state.vectors}
    extras = {name: gm.get_parameter(name) for name in state.extras}
    saved = {name: p.detach().clone() for name, p in {**vectors, **extras}.items()}
    with torch.no_grad():
        for p in vectors.values():
            p.zero_()
        for name, p in extras.items():
            p.copy_(state.extras[name].to(p.device, p.dtype))
    try:
        yield gm
    finally:
        with torch.no_grad():
            for name, p in {**vectors, **extras}.items():
                p.copy_(saved[name])
