"""Many adapters in one batch (``ol.stack``): each batch item computes what its own
adapter's module computes, trains only its own adapter, and the stack exports and
compiles as data."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

import onelora_fx as ol
from reference import randomize_adapters, tolerance
from toolkit import quiet_transform

transformers = pytest.importorskip("transformers")
from onelora_fx.tools import zoo  # noqa: E402

IDS = torch.randint(0, 100, (5, 8), generator=torch.Generator().manual_seed(0))
ADAPTER_IDS = torch.tensor([2, -1, 0, 1, 2])
TOL = tolerance(torch.float32)


def singles(name: str, capture: str, k: int = 3):
    model, _, kwargs = zoo.build(name)
    model.eval()
    out = []
    for seed in range(k):
        gm = quiet_transform(model, "all-linear", example_kwargs=kwargs, capture=capture).eval()
        randomize_adapters(gm, seed + 10)
        out.append(gm)
    return model, out


@pytest.fixture(scope="module", params=[("llama-tiny", "auto"), ("llama-tiny", "module"), ("gpt2-tiny", "auto")],
                ids=lambda p: "-".join(p))
def stacked(request):
    name, capture = request.param
    model, adapters = singles(name, capture)
    return model, adapters, ol.stack(adapters[0], adapters).eval()


def test_each_row_gets_its_own_adapter_and_minus_one_the_base(stacked):
    model, adapters, multi = stacked
    out = multi(input_ids=IDS, adapter_ids=ADAPTER_IDS).logits
    for row, k in enumerate(ADAPTER_IDS.tolist()):
        expected = (adapters[k] if k >= 0 else model)(input_ids=IDS[row:row + 1]).logits
        torch.testing.assert_close(out[row:row + 1], expected, rtol=TOL["rtol"], atol=TOL["atol"])
    assert all(p.shape[0] == 3 for p in ol.adapter_parameters(multi).values()), "one [K, out] stack per weight"


def test_adapters_are_picked_by_the_names_they_were_stacked_under(stacked):
    model, adapters, multi = stacked
    named = ol.stack(adapters[0], dict(zip(["legal", "support", "chat"], adapters))).eval()
    by_name = named(input_ids=IDS, adapter_ids=["chat", None, "legal", "support", "chat"]).logits
    assert torch.equal(by_name, multi(input_ids=IDS, adapter_ids=ADAPTER_IDS).logits)
    assert torch.equal(by_name, named(input_ids=IDS, adapter_ids=[2, -1, 0, 1, 2]).logits)
    with pytest.raises(ValueError, match="'tax', which is not in this stack \\('legal', 'support', 'chat'\\)"):
        named(input_ids=IDS, adapter_ids=["tax", None, "legal", "support", "chat"])


def test_one_training_step_gives_each_adapter_the_gradient_of_its_rows(stacked):
    model, adapters, multi = stacked  # eval mode: no dropout, so both runs see the same function
    for p in ol.adapter_parameters(multi).values():
        p.grad = None
    logits = multi(input_ids=IDS, adapter_ids=ADAPTER_IDS).logits
    F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), IDS[:, 1:].reshape(-1), reduction="sum").backward()
    stacked_grads = {n: p.grad.clone() for n, p in ol.adapter_parameters(multi).items()}
    for k, gm in enumerate(adapters):
        rows = (ADAPTER_IDS == k).nonzero().flatten()
        gm.zero_grad()
        logits = gm(input_ids=IDS[rows]).logits
        F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), IDS[rows][:, 1:].reshape(-1), reduction="sum").backward()
        for name, p in ol.adapter_parameters(gm).items():
            torch.testing.assert_close(stacked_grads[name][k], p.grad, rtol=1e-4, atol=1e-6)


def test_unstack_round_trip_and_adding_an_adapter_is_data(stacked, tmp_path):
    model, adapters, multi = stacked
    for k, gm in enumerate(adapters):
        path = ol.unstack(multi, k, tmp_path / f"{k}.safetensors")
        fresh = adapters[(k + 1) % 3]
        saved = {n: p.detach().clone() for n, p in ol.adapter_parameters(fresh).items()}
        ol.load_adapter(fresh, path)
        assert all(torch.equal(p, ol.adapter_parameters(gm)[n]) for n, p in ol.adapter_parameters(fresh).items())
        with torch.no_grad():
            for n, p in ol.adapter_parameters(fresh).items():
                p.copy_(saved[n])
    ol.load_adapter(multi, tmp_path / "2.safetensors", index=0)  # adapter 0 is now adapter 2
    out = multi(input_ids=IDS[:1], adapter_ids=torch.tensor([0])).logits
    torch.testing.assert_close(out, adapters[2](input_ids=IDS[:1]).logits, rtol=TOL["rtol"], atol=TOL["atol"])
    ol.load_adapter(multi, tmp_path / "0.safetensors", index=0)


def test_bad_adapter_ids_and_merging_a_stack_are_clear_errors(stacked):
    _, _, multi = stacked
    with pytest.raises(ValueError, match=r"stacks 3 adapters: call it with adapter_ids"):
        multi(input_ids=IDS)
    with pytest.raises(ValueError, match=r"must be in \[-1, 2\]"):
        multi(input_ids=IDS, adapter_ids=torch.tensor([0, 1, 3, 0, 0]))
    with pytest.raises(ol.MergeError, match="a stack of 3 adapters has no single set of merged weights"):
        ol.merge(multi)


def test_a_stack_exports_with_adapter_ids_as_an_input(tmp_path):
    model, adapters = singles("llama-tiny", "auto")
    multi = ol.stack(adapters[0], adapters).eval()
    path = tmp_path / "multi.pt2"
    ol.export(multi, example_kwargs={"input_ids": IDS, "adapter_ids": ADAPTER_IDS}, path=path)
    loaded = torch.export.load(str(path)).module()
    other = torch.randint(0, 100, (3, 6))
    ids = torch.tensor([1, -1, 2])
    torch.testing.assert_close(loaded(input_ids=other, adapter_ids=ids)["logits"],
                               multi(input_ids=other, adapter_ids=ids).logits, rtol=TOL["rtol"], atol=TOL["atol"])


def test_a_compiled_stack_does_not_recompile_when_the_adapters_change():
    from torch._dynamo.utils import counters

    model, adapters = singles("llama-tiny", "auto")
    multi = ol.stack(adapters[0], adapters).eval()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(multi, backend="onelora", fullgraph=True)
    first = compiled(input_ids=IDS, adapter_ids=ADAPTER_IDS).logits
    torch.testing.assert_close(first, multi(input_ids=IDS, adapter_ids=ADAPTER_IDS).logits, rtol=TOL["rtol"], atol=TOL["atol"])
    frames = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        for p in ol.adapter_parameters(multi).values():
            p.mul_(2.0)
    second = compiled(input_ids=IDS, adapter_ids=torch.tensor([0, 0, 1, -1, 2])).logits
    torch.testing.assert_close(second, multi(input_ids=IDS, adapter_ids=torch.tensor([0, 0, 1, -1, 2])).logits,
                               rtol=TOL["rtol"], atol=TOL["atol"])
    assert counters["stats"]["unique_graphs"] == frames, "new adapter values or ids recompiled"
    torch._dynamo.reset()


def test_a_module_form_stack_generates_each_row_with_its_adapter():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64, pad_token_id=0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(1, 64, (3, 5), generator=torch.Generator().manual_seed(2))
    adapters = []
    for seed in range(2):
        gm = quiet_transform(model, capture="module", example_kwargs={"input_ids": ids})
        randomize_adapters(gm, seed + 1, scale=0.3)
        adapters.append(gm)
    multi = ol.stack(adapters[0], adapters)
    rows = torch.tensor([1, -1, 0])
    kwargs = dict(max_new_tokens=5, do_sample=False)
    out = multi.generate(ids, attention_mask=torch.ones_like(ids), adapter_ids=rows, **kwargs)  # KV cache, mixed batch
    for row, k in enumerate(rows.tolist()):
        single = (adapters[k] if k >= 0 else model).generate(ids[row:row + 1], attention_mask=torch.ones_like(ids[row:row + 1]),
                                                             **kwargs)
        assert torch.equal(out[row:row + 1], single)
