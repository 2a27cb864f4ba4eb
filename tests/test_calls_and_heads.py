"""Every model and every call: heads behind arithmetic, torch.nn attention, tied heads
merged in place, calls the example did not show, one tensor passed twice."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import onelora_fx as ol
from reference import first_tensor, folded, linear_layers, listing1_copy, randomize_adapters, tolerance
from toolkit import quiet_transform

transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))


def bart():
    cfg = transformers.BartConfig(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                                  decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                  max_position_embeddings=64, use_cache=False)
    return transformers.BartForConditionalGeneration(cfg), {"input_ids": IDS, "decoder_input_ids": IDS}


def t5():
    cfg = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, use_cache=False)
    return transformers.T5ForConditionalGeneration(cfg), {"input_ids": IDS, "decoder_input_ids": IDS}


def gemma2():
    cfg = transformers.Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                    final_logit_softcapping=30.0, use_cache=False)
    return transformers.Gemma2ForCausalLM(cfg), {"input_ids": IDS}


def clip():
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    return transformers.CLIPModel(cfg), {"input_ids": IDS, "pixel_values": torch.randn(2, 3, 32, 32)}


# the output heads, written out: found from the dataflow through a bias add (Bart),
# a scaling (T5), soft-capping (Gemma 2) and L2 normalization (CLIP)
HEADS = {bart: {"lm_head"}, t5: {"lm_head"}, gemma2: {"lm_head"}, clip: {"text_projection", "visual_projection"}}


@pytest.mark.parametrize("build", list(HEADS), ids=lambda f: f.__name__)
def test_heads_behind_arithmetic(build):
    torch.manual_seed(0)
    model, kwargs = build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = ol.sites(model, example_kwargs=kwargs)
    assert {s.name for s in found if s.is_head} == HEADS[build]
    assert {s.name for s in found if s.selected} == {s.name for s in found} - HEADS[build]


def test_torch_nn_transformer_layers_are_traced_through():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0), 2),
        torch.nn.Linear(32, 10),
    ).eval()
    x = torch.randn(2, 5, 32)
    gm = quiet_transform(model, "all-linear", example_inputs=(x,))
    adapted = {s.name for s in ol.sites(gm) if s.adapted}
    layer = "0.layers.{}.{}"
    assert adapted == {layer.format(i, p) for i in range(2) for p in ("self_attn.in_proj_weight", "self_attn.out_proj", "linear1", "linear2")}
    randomize_adapters(gm, 1)
    # the reference: W + b 1ᵀ folded by hand into the plain torch.nn model (its own fused
    # eval kernel then runs on the folded weights)
    weights = {f"0.layers.{i}.{p}" for i in range(2)
               for p in ("self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear1.weight", "linear2.weight")}
    expected = folded(model, gm, weights)(x)
    tol = tolerance(torch.float32)
    torch.testing.assert_close(gm.eval()(x), expected, rtol=tol["rtol"], atol=tol["atol"])
    torch.testing.assert_close(ol.merge(gm)(x), expected, rtol=tol["rtol"], atol=tol["atol"])
    assert not torch.allclose(expected, model(x), atol=1e-3)


def test_a_tied_head_merged_in_place_is_untied_in_the_model(tmp_path):
    torch.manual_seed(0)
    model, kwargs = bart()
    model.eval()
    assert model.lm_head.weight is model.model.shared.weight
    gm = quiet_transform(model, "all", example_kwargs=kwargs)
    randomize_adapters(gm, 2)
    expected = first_tensor(gm.eval()(**kwargs)).detach()
    with pytest.warns(UserWarning, match=r"lm_head.weight was tied.*tie_word_embeddings is now False"):
        ol.merge(gm, inplace=True)
    tol = tolerance(torch.float32)
    torch.testing.assert_close(model(**kwargs).logits, expected, rtol=tol["rtol"], atol=tol["atol"])
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(reloaded(**kwargs).logits, expected, rtol=tol["rtol"], atol=tol["atol"])


def adapted_llama(example: dict):
    from onelora_fx.tools import zoo

    torch.manual_seed(0)
    model, _, _ = zoo.llama()
    model.eval()
    gm = quiet_transform(model, "all-linear", example_kwargs=example)
    return model, gm.eval()


@pytest.fixture(scope="module")
def llama():
    model, gm = adapted_llama({"input_ids": IDS})
    return model, gm, listing1_copy(model, randomize_adapters(gm, 7), linear_layers(model)).eval()


def test_calls_the_example_did_not_show_are_captured_on_first_use(llama, caplog):
    model, gm, reference = llama
    mask = torch.ones_like(IDS)
    mask[0, :3] = 0
    labels = torch.randint(0, 64, IDS.shape)
    tol = tolerance(torch.float32)
    calls = [dict(input_ids=IDS, attention_mask=mask), dict(input_ids=IDS, labels=labels),
             dict(input_ids=IDS, attention_mask=mask, labels=labels), dict(input_ids=IDS, attention_mask=None)]
    with caplog.at_level("INFO", logger="onelora_fx.forms.graph.module"):
        for kwargs in calls:
            out, expected = gm(**kwargs), reference(**kwargs)
            torch.testing.assert_close(out.logits, expected.logits, rtol=tol["rtol"], atol=tol["atol"])
            if "labels" in kwargs:
                torch.testing.assert_close(out.loss, expected.loss, rtol=tol["rtol"], atol=tol["atol"])
        for kwargs in calls:  # seen before: no new capture
            gm(**kwargs)
    captured = [r for r in caplog.records if "capturing a graph for a new call" in r.message]
    assert len(captured) == 3, [r.message for r in captured]  # attention_mask=None is the example's call
    assert {n for n, _ in gm.named_parameters()} == {n for n, _ in model.named_parameters()} | set(ol.adapter_parameters(gm))


def test_new_calls_train_the_same_vectors(llama):
    """A call captured on first use reads the same b: its gradients are the example's."""
    model, gm, _ = llama
    mask = torch.ones_like(IDS)
    gm.zero_grad()
    gm(input_ids=IDS, attention_mask=mask, labels=IDS).loss.backward()
    with_mask = {n: p.grad.clone() for n, p in ol.adapter_parameters(gm).items()}
    gm.zero_grad()
    logits = gm(input_ids=IDS).logits
    F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), IDS[:, 1:].reshape(-1)).backward()
    plain = {n: p.grad.clone() for n, p in ol.adapter_parameters(gm).items()}
    gm.zero_grad()
    for name in plain:
        torch.testing.assert_close(with_mask[name], plain[name], rtol=1e-4, atol=1e-6)


def test_one_tensor_passed_twice_stays_two_inputs():
    model, gm = adapted_llama({"input_ids": IDS, "labels": IDS})
    other = torch.randint(0, 64, IDS.shape)
    out = gm(input_ids=IDS, labels=other)
    expected = model(input_ids=IDS, labels=other)
    assert torch.equal(out.logits, expected.logits), "the logits must come from input_ids, not labels"
    torch.testing.assert_close(out.loss, expected.loss)


def test_a_call_that_cannot_be_captured_says_which_and_what_to_do(llama):
    _, gm, _ = llama
    with pytest.raises(ol.CaptureError, match=r"called as \(input_ids=Tensor\[2, 8\], use_cache=True\).*KV cache.*capture='module'"):
        gm(input_ids=IDS, use_cache=True)
