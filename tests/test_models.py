"""The invariants (b = 0 exact, Listing 1 for random b, only b trains, the model never
changes, train/eval follow the model) on tiny random-init configs of real model families."""

from __future__ import annotations

import copy

import pytest
import torch

import onelora_fx as ol
from onelora_fx.tools import zoo
from reference import first_tensor, linear_layers, listing1_copy, randomize_adapters, tolerance
from toolkit import quiet_transform

pytest.importorskip("transformers")

# the output head each family has, found from the dataflow (see onelora_fx.analysis.heads)
HEADS = {
    "llama-tiny": {"lm_head"},
    "gpt2-tiny": {"lm_head"},
    "bert-tiny": {"pooler.dense"},  # tanh(dense(h[:, 0])) is returned as pooler_output
    "vit-tiny": {"classifier"},
    "depth-anything-tiny": set(),  # a conv head; every linear is in the backbone
    "dit-tiny": {"proj_out_2"},
}


def linear_modules(model):
    return {
        n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"
    }


@pytest.fixture(scope="module", params=sorted(HEADS))
def adapted(request):
    name = request.param
    model, args, kwargs = zoo.build(name)
    pristine = copy.deepcopy(model)
    gm = quiet_transform(model, "all-linear", example_inputs=args, example_kwargs=kwargs)
    return name, model, pristine, gm, args, kwargs


def run(m, args, kwargs, train=False):
    m.train(train)
    with torch.no_grad():
        return first_tensor(m(*args, **kwargs))


def resized(kwargs, batch, seq):
    """The example inputs at another batch size (and sequence length for token ids)."""
    out = {}
    g = torch.Generator().manual_seed(batch * 100 + seq)
    for k, v in kwargs.items():
        if k == "input_ids":
            out[k] = torch.randint(0, 100, (batch, seq), generator=g)
        elif v.dim() >= 1 and v.shape[0] == 2:
            out[k] = torch.cat([v] * batch)[:batch] if v.dim() == 1 else torch.randn(batch, *v.shape[1:], generator=g)
        else:
            out[k] = v
    return out


def test_every_linear_found_and_named(adapted):
    name, model, _, gm, _, _ = adapted
    found = ol.sites(gm)
    assert {s.name for s in found} == linear_modules(model)
    assert {s.name for s in found if s.is_head} == HEADS[name]
    # "all-linear": everything but the head
    assert {s.name for s in found if s.adapted} == linear_modules(model) - HEADS[name]
    for s in found:
        assert model.get_parameter(s.weight_name).data_ptr() == s.weight.data_ptr()  # shared storage
        if s.adapted:
            b = gm.get_parameter(s.adapter_name)
            assert s.adapter_name == s.weight_name.rpartition(".")[0] + ".onelora_b"
            assert b.shape == (s.out_features,) and b.dtype == s.weight.dtype


def test_base_state_dict_keys_unchanged(adapted):
    _, model, _, gm, _, _ = adapted
    keys = {k for k in gm.state_dict() if not k.endswith(".onelora_b")}
    assert keys == set(model.state_dict())


def test_zero_b_is_exact_at_other_shapes(adapted):
    name, model, _, gm, args, kwargs = adapted
    assert torch.equal(run(gm, args, kwargs), run(model, args, kwargs))
    for batch, seq in [(3, 5), (1, 11)]:
        other = resized(kwargs, batch, seq)
        assert torch.equal(run(gm, args, other), run(model, args, other)), (batch, seq)


def test_random_b_matches_listing1(adapted):
    name, model, _, gm, args, kwargs = adapted
    saved = {k: v.clone() for k, v in ol.adapter_parameters(gm).items()}
    try:
        bs = randomize_adapters(gm, seed=1)
        ref = listing1_copy(model, bs, linear_layers(model))
        expected = run(ref, args, kwargs)
        actual = run(gm, args, kwargs)
        assert not torch.equal(actual, run(model, args, kwargs)), "random b must change the output"
        tol = tolerance(torch.float32)
        torch.testing.assert_close(actual, expected, rtol=tol["rtol"], atol=tol["atol"] * expected.abs().max().item())
    finally:
        with torch.no_grad():
            for k, v in ol.adapter_parameters(gm).items():
                v.copy_(saved[k])


def test_training_moves_only_b(adapted):
    name, model, pristine, gm, args, kwargs = adapted
    base = {k: v.clone() for k, v in gm.state_dict().items() if not k.endswith("onelora_b")}
    b_before = {k: v.clone() for k, v in ol.adapter_parameters(gm).items()}
    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-2)
    gm.train()
    for _ in range(2):
        opt.zero_grad()
        first_tensor(gm(*args, **kwargs)).float().square().mean().backward()
        opt.step()
    grads = {n for n, p in gm.named_parameters() if p.grad is not None}
    assert grads == set(ol.adapter_parameters(gm))
    for k, v in gm.state_dict().items():
        if k in base:
            assert torch.equal(v, base[k]), f"base tensor {k} changed"
    moved = [k for k, v in ol.adapter_parameters(gm).items() if not torch.equal(v, b_before[k])]
    assert moved, "no b moved"
    # the model itself is untouched by training
    for k, v in model.state_dict().items():
        assert torch.equal(v, pristine.state_dict()[k]), k
    with torch.no_grad():
        for k, v in ol.adapter_parameters(gm).items():
            v.copy_(b_before[k])


def test_eval_matches_model_eval_and_train_follows_mode(adapted):
    name, model, _, gm, args, kwargs = adapted
    assert torch.equal(run(gm, args, kwargs, train=False), run(model, args, kwargs, train=False))
    if name in ("bert-tiny", "gpt2-tiny"):  # dropout 0.1 in these configs (0 in ViT's)
        torch.manual_seed(0)
        a = run(gm, args, kwargs, train=True)
        torch.manual_seed(1)
        b = run(gm, args, kwargs, train=True)
        assert not torch.equal(a, b), "dropout should be active after gm.train()"
        torch.manual_seed(0)
        assert torch.equal(a, run(model, args, kwargs, train=True)), "same dropout masks as the model"
