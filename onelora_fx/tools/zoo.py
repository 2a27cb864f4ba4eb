"""Tiny random-init models of the families the paper and our users fine-tune.

Used by the CLI (``onelora-fx inspect llama-tiny``), the tests and the benchmarks. Each
entry builds ``(model, example_args, example_kwargs)`` from a small config: nothing is
downloaded. Needs ``transformers`` (and ``diffusers`` for ``dit-tiny``).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

__all__ = ["ZOO", "build"]

Example = tuple[nn.Module, tuple, dict[str, Any]]


def _ids(vocab: int, batch: int = 2, seq: int = 8) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))


def llama(
    layers: int = 2, hidden: int = 32, intermediate: int = 64, vocab: int = 128, heads: int = 4, kv_heads: int = 2
) -> Example:
    import transformers

    cfg = transformers.LlamaConfig(
        num_hidden_layers=layers,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=256,
        use_cache=False,
    )
    return transformers.LlamaForCausalLM(cfg), (), {"input_ids": _ids(vocab)}


def gpt2() -> Example:
    import transformers

    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=128, n_positions=64, use_cache=False,
        bos_token_id=0, eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(cfg), (), {"input_ids": _ids(128)}


def bert() -> Example:
    import transformers

    cfg = transformers.BertConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        vocab_size=128, max_position_embeddings=64,
    )
    return transformers.BertModel(cfg), (), {"input_ids": _ids(128)}


def vit() -> Example:
    import transformers

    cfg = transformers.ViTConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        image_size=32, patch_size=8, num_labels=10,
    )
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return transformers.ViTForImageClassification(cfg), (), {"pixel_values": pixels}


def depth_anything() -> Example:
    import transformers

    backbone = transformers.Dinov2Config(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        image_size=28, patch_size=14, out_features=["stage1", "stage2"],
        apply_layernorm=False, reshape_hidden_states=False,
    )
    cfg = transformers.DepthAnythingConfig(
        backbone_config=backbone, reassemble_hidden_size=32, neck_hidden_sizes=[16, 32],
        fusion_hidden_size=16, head_hidden_size=8, reassemble_factors=[2, 1],
    )
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    return transformers.DepthAnythingForDepthEstimation(cfg), (), {"pixel_values": pixels}


def dit() -> Example:
    import diffusers

    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, num_layers=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10,
    )
    g = torch.Generator().manual_seed(0)
    kwargs = {
        "hidden_states": torch.randn(2, 4, 8, 8, generator=g),
        "timestep": torch.tensor([1, 5]),
        "class_labels": torch.tensor([1, 2]),
    }
    return model, (), kwargs


ZOO: dict[str, Callable[[], Example]] = {
    "llama-tiny": llama,
    "gpt2-tiny": gpt2,
    "bert-tiny": bert,
    "vit-tiny": vit,
    "depth-anything-tiny": depth_anything,
    "dit-tiny": dit,
}


def build(name: str, seed: int = 0) -> Example:
    """Build a zoo model with a fixed seed.

    Examples:
        >>> model, args, kwargs = build("llama-tiny")   # doctest: +SKIP
    """
    if name not in ZOO:
        raise KeyError(f"unknown model {name!r}; built-in models: {', '.join(ZOO)}")
    torch.manual_seed(seed)
    return ZOO[name]()
