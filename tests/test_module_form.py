"""The module form: the model's own class, so generation with a KV cache, checkpoints,
gradient checkpointing and Hugging Face Trainer keep working; the same sites, names and
vectors as the graph form, and adapter files that load across the two."""

from __future__ import annotations

import warnings

import pytest
import torch

import onelora_fx as ol
from handwritten import MODULES, example
from reference import linear_layers, listing1_copy, randomize_adapters, tolerance
from toolkit import quiet_transform

transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))


def llama(use_cache=True):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64, use_cache=use_cache, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def forms():
    model = llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module_form = ol.transform(model, capture="module", example_kwargs={"input_ids": IDS})
        graph_form = ol.transform(model, example_kwargs={"input_ids": IDS, "use_cache": False})
    return model, module_form, graph_form


def test_the_module_form_is_the_models_class_with_the_graph_forms_sites(forms):
    model, module_form, graph_form = forms
    assert type(module_form).__name__ == "LlamaForCausalLM" and isinstance(module_form, transformers.LlamaForCausalLM)
    assert not isinstance(module_form, torch.fx.GraphModule)
    a, b = ol.sites(module_form), ol.sites(graph_form)
    key = lambda s: (s.name, s.weight_name, s.adapter_name, s.is_head, s.adapted, s.in_features, s.out_features)  # noqa: E731
    assert sorted(map(key, a)) == sorted(map(key, b))
    assert list(ol.adapter_parameters(module_form)) == list(ol.adapter_parameters(graph_form))


def test_greedy_generation_with_a_kv_cache_equals_the_graph_form_step_by_step(forms, tmp_path):
    model, module_form, graph_form = forms
    randomize_adapters(module_form, 3, scale=0.3)
    ol.load_adapter(graph_form, ol.save_adapter(module_form, tmp_path / "a.safetensors"))
    mask = torch.ones_like(IDS)
    generated = module_form.generate(IDS, attention_mask=mask, max_new_tokens=6, do_sample=False)
    sequence = IDS
    for _ in range(6):  # no cache: the whole prefix each step
        step = graph_form(input_ids=sequence, attention_mask=torch.ones_like(sequence), use_cache=False).logits[:, -1]
        sequence = torch.cat([sequence, step.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, sequence)
    plain = model.generate(IDS, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert not torch.equal(plain, generated), "the adapter must change what is generated"


def test_adapter_files_load_across_forms_both_ways(forms, tmp_path):
    model, module_form, graph_form = forms
    randomize_adapters(graph_form, 4)
    ol.load_adapter(module_form, ol.save_adapter(graph_form, tmp_path / "g.safetensors"))
    assert torch.equal(module_form(input_ids=IDS).logits, graph_form(input_ids=IDS, use_cache=False).logits)
    randomize_adapters(module_form, 5)
    ol.load_adapter(graph_form, ol.save_adapter(module_form, tmp_path / "m.safetensors"))
    assert torch.equal(module_form(input_ids=IDS).logits, graph_form(input_ids=IDS, use_cache=False).logits)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_form_of_every_linear_form_matches_listing1(name):
    """Raw F.linear parameters, x @ W, addmm, tied heads, shared layers: the module form
    adapts them where the call happens."""
    torch.manual_seed(0)
    model = MODULES[name]()
    x = example(name, (3, 5), 8, 4)
    gm = ol.transform(model, "all", capture="module")  # tied heads too: the merge case that matters
    assert isinstance(gm, type(model)) and type(gm).__name__ == type(model).__name__
    assert torch.equal(gm(x), model(x))
    bs = randomize_adapters(gm, 2)
    tol = tolerance(torch.float32)
    torch.testing.assert_close(gm(x), model.reference(x, bs), rtol=tol["rtol"], atol=tol["atol"])
    if name == "tied_fn":  # F.linear(h, embed.weight) next to the lookup, one name: merge refuses
        with pytest.raises(ol.MergeError, match="embed.weight is read by the adapted linear"):
            ol.merge(gm)
        return
    merged = ol.merge(gm)
    torch.testing.assert_close(merged(x), gm(x), rtol=tol["rtol"], atol=tol["atol"])
    assert all(type(m) is type(model.get_submodule(n)) for n, m in merged.named_modules()), "merge restores every class"


def test_checkpoints_and_activation_checkpointing(tmp_path):
    model = llama()
    gm = quiet_transform(model, capture="module", example_kwargs={"input_ids": IDS})
    randomize_adapters(gm, 6)
    gm.train()
    gm.activation_checkpointing_enable()  # transformers 5 name of gradient_checkpointing_enable
    out = gm(input_ids=IDS, labels=IDS, use_cache=False)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in ol.adapter_parameters(gm).items()}
    gm.activation_checkpointing_disable()
    gm.zero_grad()
    gm(input_ids=IDS, labels=IDS, use_cache=False).loss.backward()
    for n, p in ol.adapter_parameters(gm).items():
        torch.testing.assert_close(p.grad, grads[n])
    gm.eval()
    expected = gm(input_ids=IDS).logits
    ol.merge(gm, inplace=True)
    model.save_pretrained(tmp_path)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(reloaded(input_ids=IDS).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("capture", ["module", "auto"])
def test_hugging_face_trainer_runs_on_both_forms(capture, tmp_path):
    """``auto`` with the KV cache on (pretrained configs' default: no graph can return the
    cache object) takes the module form and trains under Trainer; the graph form under
    Trainer: tests/test_hf_stack.py."""
    from torch.utils.data import Dataset

    class Batches(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            ids = torch.randint(1, 64, (6,), generator=torch.Generator().manual_seed(i))
            mask = torch.ones(6, dtype=torch.long)
            mask[: i % 3] = 0
            return {"input_ids": ids, "attention_mask": mask, "labels": ids}

    model = llama(use_cache=capture == "auto")
    gm = quiet_transform(model, capture=capture, example_kwargs={"input_ids": IDS})
    assert not isinstance(gm, torch.fx.GraphModule)
    before = {n: p.clone() for n, p in ol.adapter_parameters(gm).items()}
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3,
                                          learning_rate=1e-2, report_to=[], save_strategy="no", logging_steps=1,
                                          use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(model=gm, args=args, train_dataset=Batches())
    result = trainer.train()
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
    moved = [n for n, p in ol.adapter_parameters(gm).items() if not torch.equal(p, before[n])]
    assert moved == list(before), "every vector trained"
    reference = listing1_copy(model, {s.name: gm.get_parameter(s.adapter_name).detach() for s in ol.sites(gm) if s.adapted},
                              linear_layers(model))
    batch = Batches()[0]
    inputs = {k: v[None] for k, v in batch.items()}
    gm.eval()
    tol = tolerance(torch.float32)
    torch.testing.assert_close(gm(**inputs).loss, reference.eval()(**inputs).loss, rtol=tol["rtol"], atol=tol["atol"])


def test_a_fused_kernel_on_an_adapted_weight_is_an_error_not_a_skip():
    """nn.MultiheadAttention hands its projection weights to one fused function; the
    module form cannot add the 1LoRA term inside it and says so at transform (the graph
    form can)."""
    torch.manual_seed(0)
    model = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
    x = torch.randn(2, 5, 16)
    with pytest.raises(ol.SiteError, match=r"self_attn\.in_proj_weight.*multi_head_attention_forward.*capture='export'"):
        ol.transform(model, "all", capture="module", example_inputs=(x,))
    graph = quiet_transform(model, "all", capture="export", example_inputs=(x,))
    randomize_adapters(graph, 1)
    assert not torch.allclose(graph(x), model(x), atol=1e-4)
