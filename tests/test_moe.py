"""Mixture-of-experts layers: fused expert weights ``[E, out, in]`` are sites.

Mixtral and Qwen2-MoE (tiny configs), with transformers' default experts (a grouped
matmul; graph form) and its ``eager`` experts (a Python loop over experts that no graph
capture takes; module form). The reference is independent of onelora_fx: ``ΔW = b 1ᵀ``
per expert, written into a copy of the weights by the test itself, run with the eager
expert loop.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import onelora_fx as ol
from reference import randomize_adapters, tolerance
from toolkit import quiet_transform

transformers = pytest.importorskip("transformers")

VOCAB = 64


def build(family: str, experts: str):
    common = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=VOCAB, use_cache=False, experts_implementation=experts)
    if family == "mixtral":
        cfg = transformers.MixtralConfig(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, **common)
        model = transformers.MixtralForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2MoeConfig(intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                                          num_experts=4, num_experts_per_tok=2, **common)
        model = transformers.Qwen2MoeForCausalLM(cfg)
    return model.eval()


@pytest.fixture(scope="module", params=[("mixtral", "grouped_mm"), ("mixtral", "eager"),
                                        ("qwen2_moe", "grouped_mm"), ("qwen2_moe", "eager")], ids=lambda p: "-".join(p))
def moe(request):
    family, experts = request.param
    torch.manual_seed(0)
    model = build(family, experts)
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = ol.transform(model, "all-linear", example_kwargs={"input_ids": ids})
    return family, experts, model, gm, ids, caught


def expert_sites(gm):
    return [s for s in ol.sites(gm) if s.experts]


def reference(model, gm, prefix=""):
    """The model with W_e + b_e 1ᵀ written into every adapted weight (per expert), and
    Listing 1's bias-free fold ``W + b 1ᵀ`` for the 2-D ones, run with the eager loop
    (``prefix``: where ``model`` sits in ``gm``)."""
    ref = copy.deepcopy(model)
    ref.set_experts_implementation("eager")
    with torch.no_grad():
        for s in ol.sites(gm):
            if not s.adapted or s.call_index:
                continue
            b = gm.get_parameter(s.adapter_name).detach().double()
            w = ref.get_parameter(s.weight_name.removeprefix(prefix))
            delta = b.unsqueeze(-1) if s.layout is ol.Layout.OUT_IN else b.unsqueeze(-2)
            w.copy_((w.double() + delta).to(w.dtype))
    return ref


def test_expert_weights_are_sites_with_one_b_per_expert(moe):
    family, experts, model, gm, ids, caught = moe
    found = expert_sites(gm)
    layers = model.config.num_hidden_layers
    assert sorted(s.name for s in found) == sorted(
        f"model.layers.{i}.mlp.experts.{w}" for i in range(layers) for w in ("gate_up_proj", "down_proj"))
    n_experts = model.config.num_local_experts if family == "mixtral" else model.config.num_experts
    for s in found:
        assert s.experts == n_experts and s.adapted
        b = gm.get_parameter(s.adapter_name)
        assert s.adapter_name == s.weight_name + "_onelora_b"
        assert b.shape == (n_experts, s.out_features) and b.requires_grad
    assert isinstance(gm, torch.fx.GraphModule) == (experts == "grouped_mm")
    # the expert weights are most of the model: nothing about them may go unsaid
    assert not [w for w in caught if "matmul-like ops that 1LoRA does not adapt" in str(w.message)]


def test_a_pattern_selects_the_experts():
    torch.manual_seed(0)
    model = build("mixtral", "grouped_mm")
    ids = torch.randint(0, VOCAB, (2, 8))
    chosen = [s.name for s in ol.sites(model, "*.experts.*", example_kwargs={"input_ids": ids}) if s.selected]
    assert chosen == [f"model.layers.{i}.mlp.experts.{w}" for i in range(2) for w in ("gate_up_proj", "down_proj")]


def test_random_b_matches_the_per_expert_reference(moe):
    family, experts, model, gm, ids, _ = moe
    randomize_adapters(gm, seed=5, scale=0.2)
    expected = reference(model, gm)(input_ids=ids).logits
    got = gm(input_ids=ids).logits
    assert not torch.allclose(got, model(input_ids=ids).logits, atol=1e-3), "b must change the output"
    tol = tolerance(torch.float32)
    torch.testing.assert_close(got, expected, rtol=tol["rtol"], atol=tol["atol"] * max(1.0, expected.abs().max().item()))


class _Identity(torch.autograd.Function):
    """A custom Function with its own backward: no graph capture takes a model using one."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g


class _Recorded(nn.Module):
    """An MoE that only the module form's recorded forward can adapt (as PhiMoE, whose
    router uses a custom autograd.Function)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return _Identity.apply(self.model(input_ids=input_ids).logits)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_grouped_experts_recorded_by_the_module_form_match_the_reference(family):
    """The recorded forward follows ``W.transpose(-2, -1)`` into transformers' grouped
    matmul: each expert weight stays ``[E, out, in]``, its b has ``out`` entries (PhiMoE
    crashed: its gate_up b was sized for the transpose and met down_proj's output)."""
    torch.manual_seed(0)
    model = build(family, "grouped_mm")
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    with pytest.warns(UserWarning, match="module form"):
        mf = ol.transform(_Recorded(model), "all-linear", example_kwargs={"input_ids": ids})
    found = expert_sites(mf)
    assert len(found) == 2 * model.config.num_hidden_layers
    for s in found:
        assert s.layout is ol.Layout.OUT_IN
        assert (s.out_features, s.in_features) == tuple(mf.get_parameter(s.weight_name).shape[1:])
    randomize_adapters(mf, seed=5, scale=0.2)
    expected = reference(model, mf, prefix="model.")(input_ids=ids).logits
    got = mf(input_ids=ids)
    tol = tolerance(torch.float32)
    atol = tol["atol"] * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(got, expected, rtol=tol["rtol"], atol=atol)
    torch.testing.assert_close(ol.merge(mf)(input_ids=ids), expected, rtol=tol["rtol"], atol=atol)


def test_training_moves_expert_vectors_then_merge_export_and_files_agree(moe, tmp_path):
    family, experts, model, gm, ids, _ = moe
    randomize_adapters(gm, seed=6, scale=0.05)
    before = {n: p.clone() for n, p in model.named_parameters()}
    vectors = ol.adapter_parameters(gm)
    start = {n: v.clone() for n, v in vectors.items()}
    opt = torch.optim.AdamW(vectors.values(), lr=1e-2)
    gm.train()
    losses = []
    for _ in range(4):
        logits = gm(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    gm.eval()
    assert losses[-1] < losses[0]
    moved = [s.adapter_name for s in expert_sites(gm) if not torch.equal(vectors[s.adapter_name], start[s.adapter_name])]
    assert len(moved) == len(expert_sites(gm)), "every expert vector trains"
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), "the model never changes"

    adapted = gm(input_ids=ids).logits.detach()
    tol = tolerance(torch.float32)
    atol = tol["atol"] * max(1.0, adapted.abs().max().item())
    torch.testing.assert_close(reference(model, gm)(input_ids=ids).logits, adapted, rtol=tol["rtol"], atol=atol)
    merged = ol.merge(gm)
    torch.testing.assert_close(merged(input_ids=ids).logits, adapted, rtol=tol["rtol"], atol=atol)
    assert not any(n.endswith("onelora_b") for n, _ in merged.named_parameters())

    if experts == "eager":  # a Python loop over experts exports no graph: export the grouped one
        merged.set_experts_implementation("grouped_mm")
    path = tmp_path / "moe.pt2"
    ol.export(merged, example_kwargs={"input_ids": ids}, path=path)
    other = torch.randint(0, VOCAB, (3, 6))
    torch.testing.assert_close(torch.export.load(str(path)).module()(input_ids=other)["logits"],
                               gm(input_ids=other).logits.detach(), rtol=tol["rtol"], atol=atol)
    if experts == "eager":
        merged.set_experts_implementation("eager")

    file = ol.save_adapter(gm, tmp_path / "moe.safetensors")
    fresh = quiet_transform(model, "all-linear", example_kwargs={"input_ids": ids})
    ol.load_adapter(fresh, file)
    assert torch.equal(fresh.eval()(input_ids=ids).logits, adapted)
