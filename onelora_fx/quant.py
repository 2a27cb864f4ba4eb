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

bitsandbytes changes a 4-bit layer in place on its first forward in eval mode with an
input that needs no gradient, on a CPU with AVX512-BF16: the weight is repacked for a CPU
kernel that has no backward (``weight.data`` ``[out * in / 2, 1]`` -> ``[out, in / 2]``,
``quant_state.absmax`` rounded to bfloat16 and transposed, ``packing_format_for_cpu``
set). :func:`own_quantized_layers` keeps that from ever happening to the user's layers
through an adapted copy, and unpacks a weight the user's own inference already repacked
into tensors of the copy's own (:func:`unpacked_4bit`).

:func:`dequantize` gives the plain weight (in the compute dtype), which the backward
pass and ``merge`` need.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from torch import nn

from .compat import subclass_over, unpack_bnb_cpu_weight

__all__ = ["quantized_site", "logical_numel", "is_quantized_weight", "is_quantized_layer", "weight_kind", "logical_shape", "compute_dtype", "dequantize",
           "QUANTIZED_LAYERS", "is_cpu_packed", "unpacked_4bit", "own_quantized_layers"]

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

    Examples:
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

        if getattr(weight, "quant_state", None) is not None:  # 4-bit
            return bnb_f.dequantize_4bit(*unpacked_4bit(weight)).to(dtype)
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


def is_cpu_packed(weight: object) -> bool:
    """A bitsandbytes 4-bit weight in the layout of its CPU inference kernel (repacked by
    a forward in eval mode without gradients on a CPU with AVX512-BF16)."""
    return bool(getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False))


def unpacked_4bit(weight: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """A bitsandbytes 4-bit weight's codes and ``QuantState`` in the standard layout
    (``[out * in / 2, 1]``, absmax in row order), which ``dequantize_4bit`` and the
    training kernels read. A weight in the CPU-packed layout is unpacked into new
    tensors and a new state: ``weight`` and its ``quant_state`` are left as they are. The
    values are those the packed layer computes with (its absmax is bfloat16; widening it
    to float32 is exact).

    Examples:
        >>> unpacked_4bit(torch.zeros(2, 1))[1] is None   # not a 4-bit weight: as it is
        True
    """
    state = getattr(weight, "quant_state", None)
    if not is_cpu_packed(weight):
        return weight.data, state
    # bitsandbytes' own inverse, on a copy of the state (it assigns the state's fields)
    fresh = copy.copy(state)
    # its inverse re-quantizes a double-quantized absmax (lossy) and leaves a plain one
    # in the packed order ([in / blocksize, out], bfloat16): neither is what the packed
    # layer computes with, so the absmax is put back in row order here, unquantized
    fresh.original_nested = False
    data, fresh = unpack_bnb_cpu_weight(weight.data, fresh)
    fresh.absmax = state.absmax.t().reshape(-1).float()
    fresh.nested = False
    return data, fresh


def own_quantized_layers(root: nn.Module) -> None:
    """Give each bitsandbytes layer of ``root`` (a module-tree copy of the user's model)
    a weight object and quantization state of its own, over the same storage.

    bitsandbytes changes its layers on forward by assignment: ``Linear8bitLt`` moves
    ``CB`` / ``SCB`` from its weight into ``state`` on the first call, ``Linear4bit``
    repacks its weight for the CPU inference kernel (no backward) in eval mode on CPUs
    with AVX512-BF16. Done to objects the copy shares, that would change the user's
    layers. Here the copy's layers hold their own objects, never repack (the flag is
    the copy's own), and a weight the user's own inference repacked already is unpacked
    into new tensors (the 4-bit size) for the copy; the user's stays as it is.
    """
    for m in root.modules():
        if not is_quantized_layer(m) or not isinstance(m._parameters.get("weight"), torch.Tensor):
            continue
        w = m._parameters["weight"]
        data, state = unpacked_4bit(w) if is_cpu_packed(w) else (w.data, copy.copy(getattr(w, "quant_state", None)))
        own = subclass_over(w, data)
        if state is not None:
            own.quant_state = state
        if "module" in vars(w):
            own.module = m
        m._parameters["weight"] = own
        if vars(m).get("quant_state") is not None:
            m.quant_state = state
        if vars(m).get("state") is not None:  # Linear8bitLt's MatmulLtState
            m.state = copy.copy(m.state)
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
