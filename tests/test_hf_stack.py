"""The Hugging Face training stack on the default (graph) form: what Trainer and TRL read
of a model, and Trainer's loss equal to the module form's (the model's own class)."""

from __future__ import annotations

import warnings

import pytest
import torch

import onelora_fx as ol
from reference import randomize_adapters
from toolkit import IDS, quiet_transform, tiny_llama

transformers = pytest.importorskip("transformers")


class Batches(torch.utils.data.Dataset):
    """Sequences with left padding (masked, labels -100): the token count Trainer
    normalizes the loss by depends on how the labels are shifted."""

    def __len__(self):
        return 16

    def __getitem__(self, i):
        ids = torch.randint(1, 64, (8,), generator=torch.Generator().manual_seed(i))
        mask = torch.ones(8, dtype=torch.long)
        mask[: i % 3] = 0
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def train(gm, tmp_path, steps=5):
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=steps,
                                          learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", report_to=[],
                                          save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True, seed=0)
    trainer = transformers.Trainer(model=gm, args=args, train_dataset=Batches())
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_trainer_on_the_graph_form_equals_the_module_form(tmp_path):
    """Trainer reads ``loss_type`` to count label tokens: the graph form answers for the
    model, so the logged loss and ``b`` after 5 SGD steps equal the module form's."""
    model = tiny_llama()
    results = {}
    for capture in ("auto", "module"):
        gm = quiet_transform(model, "all-linear", capture=capture, example_kwargs={"input_ids": IDS})
        losses = train(gm, tmp_path / capture)
        results[capture] = (losses, {n: p.detach().clone() for n, p in ol.adapter_parameters(gm).items()})
    (graph_losses, graph_b), (module_losses, module_b) = results["auto"], results["module"]
    assert len(graph_losses) == 5
    torch.testing.assert_close(torch.tensor(graph_losses), torch.tensor(module_losses), rtol=1e-6, atol=1e-6)
    assert graph_b.keys() == module_b.keys()
    for name in graph_b:
        assert graph_b[name].abs().sum() > 0, name
        torch.testing.assert_close(graph_b[name], module_b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_the_graph_form_answers_for_the_models_attributes_and_refuses_its_methods():
    model = tiny_llama()
    gm = quiet_transform(model, example_kwargs={"input_ids": IDS})
    assert gm.config is model.config and gm.loss_type == model.loss_type and gm.main_input_name == "input_ids"
    assert gm.generation_config is model.generation_config
    for method in ("generate", "save_pretrained"):
        with pytest.raises(AttributeError, match=rf"'{method}' is a method of LlamaForCausalLM, which its graph form .*capture='module'"):
            getattr(gm, method)
    with pytest.raises(NotImplementedError, match="no gradient checkpointing.*gradient_checkpointing=False.*capture='module'"):
        gm.gradient_checkpointing_enable()
    with pytest.raises(AttributeError, match="graph form of LlamaForCausalLM .*has no attribute 'nope'"):
        gm.nope


def _classifier(name: str):
    common = dict(num_hidden_layers=1, num_attention_heads=4, vocab_size=64, pad_token_id=0, num_labels=3)
    torch.manual_seed(0)
    if name == "gpt2":
        return transformers.GPT2ForSequenceClassification(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64,
                                                                                   pad_token_id=0, num_labels=3))
    config = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[name]
    cls = {"llama": transformers.LlamaForSequenceClassification, "qwen2": transformers.Qwen2ForSequenceClassification}[name]
    return cls(config(hidden_size=32, intermediate_size=64, num_key_value_heads=2, use_cache=False, **common))


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2"])
def test_a_decoder_classifier_s_score_layer_is_the_head_and_trains_in_full(name):
    """``score(h)[arange(B), last_token]``: the picked logits are still the projection's,
    so ``score`` is the head: "all-linear" leaves it out and ``train=("head",)`` trains it."""
    model = _classifier(name).eval()
    ids = torch.randint(1, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    gm = quiet_transform(model, "all-linear", example_kwargs={"input_ids": ids}, train=("head",))
    heads = {s.name for s in ol.sites(gm) if s.is_head}
    assert heads == {"score"}, heads
    assert not any(s.adapted for s in ol.sites(gm) if s.name == "score")
    trainable = {n for n, p in gm.named_parameters() if p.requires_grad}
    assert "score.weight" in trainable, sorted(trainable)
    before = model.score.weight.detach().clone()
    opt = torch.optim.SGD([p for p in gm.parameters() if p.requires_grad], lr=0.1)
    gm.train()
    loss = torch.nn.functional.cross_entropy(gm(input_ids=ids).logits, torch.tensor([0, 2]))
    loss.backward()
    opt.step()
    assert not torch.equal(gm.get_parameter("score.weight"), before), "the head trained"
    assert torch.equal(model.score.weight, before), "the model's own head is untouched"


PEFT_TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bert": ["query", "value"],
                "llama-regex": r".*layers\.1\..*_proj", "bert-regex": r".*attention\.self\.(query|key)"}


@pytest.mark.parametrize("name", sorted(PEFT_TARGETS))
def test_peft_style_bare_names_select_what_peft_selects(name):
    """A list of bare module names, and a regex string (``re:`` here, a plain string in
    PEFT), select the modules PEFT's own ``target_modules`` matching selects
    (``peft.tuners.tuners_utils.check_target_module_exists``)."""
    pytest.importorskip("peft")
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    from onelora_fx.tools import zoo

    model, args, kwargs = zoo.build(f"{name.split('-')[0]}-tiny")
    targets = PEFT_TARGETS[name]
    ours_pattern = f"re:{targets}" if isinstance(targets, str) else targets
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = ol.sites(model, ours_pattern, example_inputs=args or None, example_kwargs=kwargs or None)
    ours = {s.owner for s in found if s.selected}
    config = LoraConfig(target_modules=targets)
    theirs = {n for n, m in model.named_modules()
              if n and check_target_module_exists(config, n) and (isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D")}
    assert ours == theirs and len(ours) >= 2, (ours, theirs)


@pytest.mark.parametrize("capture", ["auto", "module"])
def test_disabled_runs_the_base_model_exactly_and_restores_the_adapter(capture):
    """``with ol.disabled(gm)``: the base model bit for bit (vectors zero, trained norms
    at the model's values), then the adapted module exactly as before (a DPO reference)."""
    model = tiny_llama()
    gm = quiet_transform(model, "all-linear", capture=capture, example_kwargs={"input_ids": IDS}, train=("norm",))
    randomize_adapters(gm, 3)
    with torch.no_grad():
        gm.get_parameter("model.norm.weight").mul_(1.5)
    before = {n: p.detach().clone() for n, p in ol.adapter_parameters(gm).items()}
    adapted = gm(input_ids=IDS).logits.detach()
    assert not torch.allclose(adapted, model(input_ids=IDS).logits, atol=1e-3)
    with torch.no_grad(), ol.disabled(gm):
        assert torch.equal(gm(input_ids=IDS).logits, model(input_ids=IDS).logits)
    for n, p in ol.adapter_parameters(gm).items():
        assert torch.equal(p, before[n]), n
    assert torch.equal(gm(input_ids=IDS).logits, adapted)
    with pytest.raises(ValueError, match="adapted by onelora_fx.transform"):
        with ol.disabled(model):
            pass


def _torchtune_get_adapter_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """torchtune's ``peft.get_adapter_params`` (torchtune 0.6, which does not import next
    to torchao 0.18), as torchtune writes it: each module's ``adapter_params()`` names."""
    out = {}
    for k, v in model.named_modules():
        if hasattr(v, "adapter_params") and callable(v.adapter_params):
            current = v.adapter_params()
            for n, p in v.named_parameters(recurse=True):
                if n in current:
                    out[f"{k}.{n}" if k else n] = p
    return out


@pytest.mark.parametrize("capture", ["auto", "module"])
def test_adapter_params_follows_torchtune_s_protocol(capture):
    gm = quiet_transform(tiny_llama(), "all-linear", capture=capture, example_kwargs={"input_ids": IDS}, train=("norm",))
    found = _torchtune_get_adapter_params(gm)
    expected = ol.adapter_parameters(gm)
    assert found.keys() == expected.keys() and len(found) > 14
    assert all(found[k] is expected[k] for k in found)


@pytest.mark.parametrize("capture", ["module"])  # the graph form: tests/test_examples.py
def test_adapter_checkpoints_are_adapter_sized_and_resume_exactly(capture, tmp_path):
    """6 AdamW steps with a linear schedule straight through, and 3 + resume from the
    adapter-only checkpoint + 3: the same vectors (the optimizer, scheduler and RNG come
    back through Trainer's own files, the vectors through the adapter file, with the norms
    trained too)."""
    base = tiny_llama()

    def run(out, resume=None):
        gm = quiet_transform(base, "all-linear", capture=capture, example_kwargs={"input_ids": IDS}, train=("norm",))
        args = transformers.TrainingArguments(
            output_dir=str(out), per_device_train_batch_size=4, max_steps=6, learning_rate=0.05, optim="adamw_torch",
            lr_scheduler_type="linear", report_to=[], save_strategy="steps", save_steps=3, logging_steps=1,
            use_cpu=True, disable_tqdm=True, seed=0)
        trainer = ol.adapter_checkpoints(transformers.Trainer(model=gm, args=args, train_dataset=Batches()))
        trainer.train(resume_from_checkpoint=resume)
        return gm

    straight = run(tmp_path / "straight")
    checkpoint = tmp_path / "straight" / "checkpoint-3"
    names = {p.name for p in checkpoint.iterdir()}
    assert "onelora_adapter.safetensors" in names and not names & {"model.safetensors", "pytorch_model.bin"}
    adapter = ol.save_adapter(straight, tmp_path / "adapter.safetensors").stat().st_size
    assert (checkpoint / "onelora_adapter.safetensors").stat().st_size <= 2 * adapter
    resumed = run(tmp_path / "resumed", resume=str(checkpoint))
    want, got = ol.adapter_parameters(straight), ol.adapter_parameters(resumed)
    assert any(v.abs().max() > 0 for k, v in want.items() if k.endswith("onelora_b")), "trained"
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-7, msg=name)


def test_save_pretrained_of_an_adapted_model_is_refused_and_the_ways_that_keep_b_round_trip(tmp_path):
    """from_pretrained would load the vectors' checkpoint as the base model: refused. The
    merged model's save_pretrained, and the adapter file through ol.load, round trip."""
    model = tiny_llama()
    gm = quiet_transform(model, "all-linear", capture="module", example_kwargs={"input_ids": IDS})
    randomize_adapters(gm)
    with pytest.raises(RuntimeError, match="dropping the 1LoRA vectors.*ol.save_adapter.*ol.merge"):
        gm.save_pretrained(tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    want = gm(input_ids=IDS).logits
    ol.merge(gm).save_pretrained(tmp_path / "merged")
    back = type(model).from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(back(input_ids=IDS).logits, want, rtol=1e-5, atol=1e-5)
    for capture in ("auto", "module"):
        loaded = ol.load(model, ol.save_adapter(gm, tmp_path / "adapter.safetensors"), capture=capture,
                         example_kwargs={"input_ids": IDS})
        torch.testing.assert_close(loaded(input_ids=IDS).logits, want, rtol=1e-6, atol=1e-6)


def test_train_takes_module_names_as_peft_s_modules_to_save(tmp_path):
    """``train=("score",)`` trains a classifier's new head in full (a ``b 1ᵀ`` update cannot
    learn one), is saved with the adapter and loaded back by ``ol.load``; an unknown name
    says what ``train=`` takes."""
    model = _classifier("llama")
    ids = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    gm = quiet_transform(model, "all-linear", example_kwargs={"input_ids": ids}, train=("score",))
    trained = ol.adapter_parameters(gm)
    assert "score.weight" in trained and trained["score.weight"].requires_grad
    assert "score.weight" not in {s.weight_name for s in ol.sites(gm) if s.adapted}, "the head is trained, not adapted"
    with torch.no_grad():
        trained["score.weight"].add_(1.0)
    assert not torch.equal(model.score.weight, trained["score.weight"]), "a copy: the model's head is unchanged"
    loaded = ol.load(model, ol.save_adapter(gm, tmp_path / "a.safetensors"), example_kwargs={"input_ids": ids})
    assert torch.equal(loaded(input_ids=ids).logits, gm(input_ids=ids).logits)
    with pytest.raises(ValueError, match="train='scorer' is neither.*nor the name or glob of a module"):
        quiet_transform(model, "all-linear", example_kwargs={"input_ids": ids}, train=("scorer",))


def test_the_graph_form_s_backbone_for_trainers_shares_its_vectors_and_copies_get_their_own():
    """``gm.base_model`` (TRL's fused LM head runs it) computes the adapted backbone with
    gm's own b; a copy (here: unmerge of a merge) answers with its own vectors."""
    model = tiny_llama()
    gm = quiet_transform(model, "all-linear", example_kwargs={"input_ids": IDS})
    randomize_adapters(gm)
    hidden = gm.base_model(input_ids=IDS).last_hidden_state
    logits = gm.get_output_embeddings()(hidden)
    torch.testing.assert_close(logits, gm(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)
    twin_b = ol.adapter_parameters(gm.module_twin())
    assert all(twin_b[k] is v for k, v in ol.adapter_parameters(gm).items()), "the same Parameter objects"
    again = ol.unmerge(ol.merge(gm))
    with torch.no_grad():
        for b in ol.adapter_parameters(again).values():
            b.zero_()
    torch.testing.assert_close(again.base_model(input_ids=IDS).last_hidden_state,
                               model.model(input_ids=IDS).last_hidden_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gm.base_model(input_ids=IDS).last_hidden_state, hidden, rtol=0, atol=0)
