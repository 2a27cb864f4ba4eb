"""The tests' one toolkit: tiny models, example inputs, and comparisons whose tolerance
depends on the dtype only (never on the model), scaled by the size of what is compared.

The independent references (the paper's Listing 1, folding ``W + b 1ᵀ`` by hand) are in
:mod:`reference`.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from reference import tolerance

__all__ = ["ids", "IDS", "tiny_llama", "tiny_llama_config", "assert_close", "randomize_norms", "quiet_transform",
           "model_state", "assert_same_state"]


def ids(batch: int = 2, seq: int = 8, vocab: int = 64, seed: int = 0, low: int = 0) -> torch.Tensor:
    """Token ids from their own generator (never the global one)."""
    return torch.randint(low, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


#: the token ids most tests use: batch 2, length 8, vocabulary 64
IDS = ids()


def tiny_llama_config(**overrides: Any):
    """A 2-layer LLaMA config, hidden 32, vocabulary 64, no KV cache unless asked."""
    import transformers

    settings = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=64, use_cache=False)
    settings.update(overrides)
    return transformers.LlamaConfig(**settings)


def tiny_llama(seed: int = 0, **overrides: Any) -> nn.Module:
    """A random-init :func:`tiny_llama_config` LLaMA, in eval mode."""
    import transformers

    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: Optional[torch.dtype] = None, msg: str = "") -> None:
    """``actual`` equals ``expected`` within the tolerance of ``dtype`` (default:
    ``expected``'s), the absolute part scaled by ``max(1, |expected|.max())``. Float16 /
    bfloat16 values are compared in float32 (the tolerance stays the low dtype's)."""
    tol = tolerance(dtype or expected.dtype)
    if {actual.dtype, expected.dtype} & {torch.float16, torch.bfloat16}:
        actual, expected = actual.float(), expected.float()
    scale = max(1.0, expected.detach().abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=tol["rtol"], atol=tol["atol"] * scale,
                               msg=(lambda m: f"{msg}: {m}") if msg else None)


def randomize_norms(model: nn.Module, seed: int = 0, spread: float = 0.5) -> nn.Module:
    """Give every normalization layer a scale far from uniform (and a random shift).

    A linear fed by a LayerNorm with weight 1 and bias 0 sees ``x.sum(-1) ~ 0``: its
    ``b`` gradient is rounding noise, so gradients compared there prove nothing.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if "norm" not in type(m).__name__.lower():
                continue
            for name, p in m.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=g).to(p.dtype)
                if name == "weight":
                    p.mul_(1 + spread * noise)
                else:
                    p.add_(0.1 * noise)
    return model


def quiet_transform(model: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
    """``ol.transform`` with its warnings silenced (for tests about something else)."""
    import warnings

    import onelora_fx as ol

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ol.transform(model, *args, **kwargs)


def _value_state(value: Any, depth: int = 0) -> Any:
    """What can change in one attribute value: a tensor's bytes, shape, strides, dtype and
    class; an object with fields of its own (a bitsandbytes ``QuantState``) field by
    field; plain values as they are."""
    flatten = getattr(type(value), "__tensor_flatten__", None)
    if isinstance(value, torch.Tensor) and callable(flatten) and depth < 3:  # a tensor subclass (torchao): its parts
        names, context = value.__tensor_flatten__()
        return (type(value).__name__, tuple(value.shape), repr(context),
                {n: _value_state(getattr(value, n), depth + 1) for n in names})
    if isinstance(value, torch.Tensor):
        t = value.detach()
        return ("tensor", type(value).__name__, tuple(t.shape), t.stride(), t.dtype, t.device.type,
                t.clone() if t.device.type != "meta" else None)
    if isinstance(value, (bool, int, float, str, type(None), torch.dtype, torch.device, torch.Size)):
        return value
    if isinstance(value, (list, tuple)) and depth < 3:
        return tuple(_value_state(v, depth + 1) for v in value)
    if hasattr(value, "__dict__") and depth < 3 and not isinstance(value, (nn.Module, type)):
        return (type(value).__name__, {k: _value_state(v, depth + 1) for k, v in sorted(vars(value).items())})
    return type(value).__name__


def model_state(model: nn.Module) -> dict[str, Any]:
    """Everything of ``model`` a library could change in place: every parameter and buffer
    (bytes, shape, strides, dtype, class, requires_grad, and the fields a quantized weight
    carries: ``quant_state``, ``CB``/``SCB``), and each module's plain attributes (mode,
    flags such as bitsandbytes' ``support_avx512bf16_for_cpu``, ``compute_dtype``, a
    module-level ``quant_state``). Compare two with :func:`assert_same_state`."""
    out: dict[str, Any] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        for key, value in vars(m).items():
            if key.startswith("_") and key not in ("_parameters", "_buffers"):
                continue
            if key in ("_parameters", "_buffers"):
                for pname, p in value.items():
                    fields = {k: _value_state(v) for k, v in sorted(vars(p).items())} if p is not None else {}
                    out[f"{name}.{pname}"] = (_value_state(p), getattr(p, "requires_grad", None), fields)
            else:
                out[f"{name}:{key}"] = _value_state(value)
    return out


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).contiguous().view(torch.uint8)


def _diff(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                    and a.shape == b.shape and torch.equal(_bytes(a), _bytes(b)))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() != b.keys() or any(_diff(a[k], b[k]) for k in a)
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) != len(b) or any(_diff(x, y) for x, y in zip(a, b))
    return a != b


def assert_same_state(before: dict[str, Any], after: dict[str, Any], what: str = "the model") -> None:
    """Two :func:`model_state` snapshots are equal bit for bit (NaN equal to NaN: the bytes
    are compared)."""
    changed = sorted(k for k in before.keys() | after.keys() if k not in before or k not in after or _diff(before[k], after[k]))
    assert not changed, f"{what} changed: {changed[:10]}{' ...' if len(changed) > 10 else ''}"
