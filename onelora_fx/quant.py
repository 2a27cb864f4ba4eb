"""Quantized base weights: what onelora_fx needs to know about them, in one place.

1LoRA's term ``b * x.sum(-1)`` never reads the weight, so it composes exactly with any
quantized linear: the quantized call stays as it is and the term is added beside it.
Two kinds of quantized linears run on CPUs today, and each is recognised here without
importing its library:

* **tensor-subclass weights** (torchao: ``Int8Tensor``, ``NF4Tensor``, ``Float8Tensor``,
  ``IntxUnpackedToInt8Tensor``, ...) on an ``nn.Linear``: the layer calls ``F.linear``
  with a weight that is not a plain tensor;
* **quantized layers** (bitsandbytes ``Linear4bit`` (nf4 / fp4) and ``Linear8bitLt``):
  the module's own ``forward`` runs a kernel of its library on packed storage.

:func:`dequantize` gives the plain weight (in the compute dtype), which the backward
pass and ``merge`` need.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

__all__ = ["quantized_site", "logical_numel", "is_quantized_weight", "is_quantized_layer", "weight_kind", "logical_shape", "compute_dtype", "dequantize",
           "QUANTIZED_LAYERS"]

#: the libraries whose weight classes are quantized weights
_LIBRARIES = {"torchao", "bitsandbytes"}
#: bitsandbytes layers whose forward runs on packed storage (matched by class name and module)
QUANTIZED_LAYERS = {"Linear4bit", "LinearNF4", "LinearFP4", "Linear8bitLt"}


def _plain(cls: type) -> type:
    return getattr(cls, "_onelora_base", cls)


def is_quantized_layer(module: nn.Module) -> bool:
    """A bitsandbytes quantized linear layer (adapted or not)."""
    cls = _plain(type(module))
    return cls.__name__ in QUANTIZED_LAYERS and cls.__module__.startswith("bitsandbytes")


def is_quantized_weight(t: object) -> bool:
    """A weight that is not a plain tensor: a torchao tensor subclass (wrapped as a
    Parameter or not), or bitsandbytes' packed ``Params4bit`` / ``Int8Params``."""
    # by the library the class comes from: other tensor subclasses (DTensor, FakeTensor)
    # are plain weights as far as 1LoRA is concerned
    return isinstance(t, torch.Tensor) and type(t).__module__.split(".")[0] in _LIBRARIES


def weight_kind(t: torch.Tensor, module: Optional[nn.Module] = None) -> Optional[str]:
    """The storage of a quantized weight, for a site record (``Int8Tensor``,
    ``Linear4bit``, ...), or None for a plain one."""
    if module is not None and is_quantized_layer(module):
        return _plain(type(module)).__name__
    return type(t).__name__ if is_quantized_weight(t) else None


def logical_shape(weight: torch.Tensor, module: Optional[nn.Module] = None) -> tuple[int, ...]:
    """The ``[out, in]`` shape a quantized weight stands for (bitsandbytes packs 4-bit
    weights as ``[out * in / 2, 1]``)."""
    if module is not None and is_quantized_layer(module):
        return (int(module.out_features), int(module.in_features))
    return tuple(weight.shape)


def logical_numel(weight: torch.Tensor) -> int:
    """How many values a (possibly packed) weight stands for."""
    state = getattr(weight, "quant_state", None)
    shape = getattr(state, "shape", None)
    return int(torch.Size(shape).numel()) if shape is not None else weight.numel()


def compute_dtype(weight: torch.Tensor, module: Optional[nn.Module] = None) -> torch.dtype:
    """The dtype a quantized linear computes in (and its ``b`` has)."""
    if module is not None and is_quantized_layer(module):
        state = getattr(weight, "quant_state", None)
        dtype = getattr(module, "compute_dtype", None) or getattr(state, "dtype", None)
        if dtype is None and module.bias is not None:
            dtype = module.bias.dtype
        return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32
    return weight.dtype if weight.is_floating_point() else torch.float32


def quantized_site(weight: torch.Tensor, module: Optional[nn.Module]) -> dict:
    """The ``LinearSite.of`` arguments a quantized weight needs (its logical shape,
    compute dtype and storage); none for a plain weight."""
    kind = weight_kind(weight, module)
    if kind is None:
        return {}
    return {"shape": logical_shape(weight, module), "dtype": compute_dtype(weight, module), "quantized": kind}


def dequantize(weight: torch.Tensor, module: Optional[nn.Module] = None, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The plain ``[out, in]`` weight a quantized one stands for, in ``dtype`` (default:
    the compute dtype).

    Example:
        >>> dequantize(torch.ones(2, 2)).dtype
        torch.float32
    """
    dtype = dtype or compute_dtype(weight, module)
    if module is not None and is_quantized_layer(module):
        try:
            import bitsandbytes.functional as bnb_f
        except ImportError as e:  # the layer came from elsewhere (a pickle): say what is missing
            raise ImportError(f"{type(module).__name__} weights need bitsandbytes to be read: "
                              "pip install 'onelora-fx[quant]'") from e

        state = getattr(weight, "quant_state", None)
        if state is not None:  # 4-bit
            return bnb_f.dequantize_4bit(weight.data, state).to(dtype)
        cb = weight.CB if getattr(weight, "CB", None) is not None else module.state.CB
        scb = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
        return bnb_f.int8_vectorwise_dequant(cb, scb).to(dtype)
    if not is_quantized_weight(weight):
        return weight.to(dtype)
    original = getattr(weight, "get_original_weight", None)  # torchao NF4Tensor
    if callable(original):
        return original().to(dtype)
    if callable(getattr(type(weight), "dequantize", None)):
        try:
            return weight.dequantize().to(dtype)
        except TypeError:  # a static dequantize(value, ...) of another kind
            pass
    return weight.to(dtype)
