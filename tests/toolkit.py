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

__all__ = ["ids", "IDS", "tiny_llama", "tiny_llama_config", "assert_close", "randomize_norms", "quiet_transform"]


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
    ``expected``'s), the absolute part scaled by ``max(1, |expected|.max())``."""
    tol = tolerance(dtype or expected.dtype)
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
