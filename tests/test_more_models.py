"""Models no issue named, tried as users bring them: other mixtures of experts (one with
biased, transposed experts; one whose router casts its weight), other encoder-decoders,
torch.nn's own layers. The reference is the model with ``W + b 1ᵀ`` written into its
weights by the test itself; a site left out must be said, never silent."""

from __future__ import annotations

import warnings

import pytest
import torch

import onelora_fx as ol
from reference import first_tensor, folded, matrix_weights, randomize_adapters, tolerance

transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
COMMON = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, vocab_size=64, use_cache=False)


def qwen3_moe():
    cfg = transformers.Qwen3MoeConfig(intermediate_size=48, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                                      head_dim=8, **COMMON)
    return transformers.Qwen3MoeForCausalLM(cfg), {"input_ids": IDS}, (), 4


def olmoe():
    cfg = transformers.OlmoeConfig(intermediate_size=48, num_experts=4, num_experts_per_tok=2, **COMMON)
    return transformers.OlmoeForCausalLM(cfg), {"input_ids": IDS}, (), 4


def gpt_oss(experts="grouped_mm"):
    cfg = transformers.GptOssConfig(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, head_dim=8,
                                    sliding_window=8, layer_types=["full_attention"] * 2, experts_implementation=experts,
                                    **COMMON)
    return transformers.GptOssForCausalLM(cfg), {"input_ids": IDS}, (), 4


def gpt_oss_eager():
    return gpt_oss("eager")


def deepseek_v3():
    common = {**COMMON, "num_key_value_heads": 4}
    cfg = transformers.DeepseekV3Config(intermediate_size=48, moe_intermediate_size=24, n_routed_experts=4,
                                        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16,
                                        q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_group=1,
                                        topk_group=1, **common)
    return transformers.DeepseekV3ForCausalLM(cfg), {"input_ids": IDS}, (), 2  # its router casts its weight to float32


def mbart():
    cfg = transformers.MBartConfig(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                                   decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                   max_position_embeddings=64, use_cache=False)
    return transformers.MBartForConditionalGeneration(cfg), {"input_ids": IDS, "decoder_input_ids": IDS}, (), 0


def whisper():
    cfg = transformers.WhisperConfig(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                                     decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8,
                                     pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
                                     max_source_positions=16, max_target_positions=16, use_cache=False)
    return transformers.WhisperForConditionalGeneration(cfg), {"input_features": torch.randn(2, 8, 32),
                                                                "decoder_input_ids": IDS[:, :4]}, (), 0


def torch_transformer():
    model = torch.nn.Transformer(d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32,
                                 dropout=0.0, batch_first=True)
    return model, {}, (torch.randn(2, 5, 16), torch.randn(2, 4, 16)), 0


BUILDERS = [qwen3_moe, olmoe, gpt_oss, gpt_oss_eager, deepseek_v3, mbart, whisper, torch_transformer]


@pytest.mark.parametrize("build", BUILDERS, ids=lambda f: f.__name__)
def test_every_linear_adapted_and_exact(build):
    torch.manual_seed(0)
    model, kwargs, args, expert_sites = build()
    model.eval()
    linear_weights = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = ol.transform(model, "all", example_inputs=args, example_kwargs=kwargs)
    assert not [w for w in caught if "1LoRA does not adapt" in str(w.message)], "every weight is a site"
    found = ol.sites(gm)
    assert sum(1 for s in found if s.experts) == expert_sites
    assert linear_weights <= {s.owner for s in found}, linear_weights - {s.owner for s in found}
    assert all(s.adapted for s in found)
    gm.eval()
    randomize_adapters(gm, 1, scale=0.05)
    out, expected = first_tensor(gm(*args, **kwargs)), first_tensor(folded(model, gm, matrix_weights(model))(*args, **kwargs))
    assert not torch.allclose(out, first_tensor(model(*args, **kwargs)), atol=1e-3)
    tol = tolerance(torch.float32)
    torch.testing.assert_close(out, expected, rtol=tol["rtol"], atol=tol["atol"] * max(1.0, expected.abs().max().item()))


def test_an_lstm_is_named_not_skipped():
    class LSTMHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = torch.nn.LSTM(8, 16, batch_first=True)
            self.fc = torch.nn.Linear(16, 3)

        def forward(self, x):
            return self.fc(self.lstm(x)[0])

    with pytest.warns(UserWarning, match=r"2 weight\(s\) of LSTMHead, 89.6% of its parameters.*lstm.weight_ih_l0 \(LSTM\)"):
        ol.transform(LSTMHead(), "all")
