"""Nothing silent on any architecture: every weight accounted for, linear forms found by
dataflow (a transposed weight, a row block of a packed weight, a raw parameter in a model
no capture takes), and the families that crashed or refused: Llama 4 training, routers
that cast their weight, Qwen3-MoE moved or under autocast, shape guards, a GraphModule in
the module form. The reference is always the model with ``W + b 1ᵀ`` folded in by the
test (:func:`reference.folded`)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import onelora_fx as ol
from reference import first_tensor, folded, hooked, matrix_weights, randomize_adapters
from toolkit import IDS, assert_close, quiet_transform, randomize_norms

transformers = pytest.importorskip("transformers")


def adapted_exactly(model, kwargs=None, args=(), pattern="all", expected=None, **transform_kwargs):
    """Transform, randomize every b, and check output, gradients and merge against the
    folded reference; returns the adapted module. ``expected``: the weight names that
    must be adapted (default: :func:`matrix_weights`, what ``"all"`` must adapt)."""
    model.eval()
    randomize_norms(model)
    gm = quiet_transform(model, pattern, example_inputs=args, example_kwargs=kwargs, **transform_kwargs)
    randomize_adapters(gm, 1, scale=0.05)
    out = first_tensor(gm.eval()(*args, **(kwargs or {})))
    reference = folded(model, gm, matrix_weights(model) if expected is None else expected)
    assert_close(out, first_tensor(reference(*args, **(kwargs or {}))), torch.float32, "adapted vs folded")
    assert_close(first_tensor(ol.merge(gm)(*args, **(kwargs or {}))), out, torch.float32, "merged vs adapted")
    first_tensor(gm.train()(*args, **(kwargs or {}))).square().mean().backward()
    grads = {n: p.grad for n, p in ol.adapter_parameters(gm).items()}
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values()), grads
    return gm


def linear_weights(model):
    return {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def test_falcon_transposed_weights_are_sites():
    """``input @ self.weight.T`` is ``numpy_T`` + ``matmul`` in the exported graph."""
    cfg = transformers.FalconConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=64, use_cache=False)
    torch.manual_seed(0)
    model = transformers.FalconForCausalLM(cfg)
    gm = adapted_exactly(model, {"input_ids": IDS})
    assert {s.owner for s in ol.sites(gm) if s.adapted} == linear_weights(model)  # 8 decoder linears + the head


def test_cross_attention_rows_of_a_packed_weight_are_sites_with_one_b():
    """MHA with query != key splits ``in_proj_weight`` into q rows and kv rows before
    ``linear``: two sites, one weight, one ``b`` of the weight's full height."""
    torch.manual_seed(0)

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(8, 16)
            self.dec = nn.TransformerDecoder(nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 1)
            self.out = nn.Linear(16, 4)

        def forward(self, x, memory):
            return self.out(self.dec(self.inp(x), memory))

    model = Decoder()
    args = (torch.randn(2, 5, 8), torch.randn(2, 3, 16))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ol.sites(model, "all", example_inputs=args)
    assert not [w for w in caught if "does not adapt" in str(w.message)], [str(w.message) for w in caught]
    gm = adapted_exactly(model, None, args)
    cross = [s for s in ol.sites(gm) if s.weight_name == "dec.layers.0.multihead_attn.in_proj_weight"]
    assert [s.rows for s in cross] == [(0, 16), (16, 48)] and all(s.adapted for s in cross)
    assert gm.get_parameter(cross[0].adapter_name).shape == (48,)
    weights = {s.weight_name for s in ol.sites(gm) if s.adapted}
    assert weights == {f"{n}.weight" for n in linear_weights(model)} | {"dec.layers.0.self_attn.in_proj_weight",
                                                                      "dec.layers.0.multihead_attn.in_proj_weight"}


def test_the_fallback_finds_a_raw_parameter_read_by_f_linear():
    """A model no capture takes is recorded running once: ``F.linear(h, self.router)`` is
    a site like any ``nn.Linear``, adapted where the call happens."""

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.router = nn.Parameter(torch.randn(4, 8))
            self.out = nn.Linear(4, 3)

        def forward(self, x):
            h = self.fc(x)
            if h.sum() > 0:  # data-dependent: no graph capture
                h = h * 2
            return self.out(F.linear(h, self.router))

    torch.manual_seed(0)
    model = Branchy()
    gm = adapted_exactly(model, None, (torch.randn(3, 8),))
    assert {s.name for s in ol.sites(gm) if s.adapted} == {"fc", "router", "out"}
    assert "capture: module" in ol.summary(gm)


class _Project(nn.Module):
    def forward(self, h, w):
        return F.linear(h, w)


class _TiedBranchy(nn.Module):
    """A model no capture takes whose output head is the embedding's weight: held by the
    head under a second name (``tied``), or passed to the head as an argument."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.embed = nn.Embedding(16, 8)
        self.body = nn.Linear(8, 8)
        if how == "tied":
            self.head = nn.Linear(8, 16, bias=False)
            self.head.weight = self.embed.weight
        else:
            self.head = _Project()

    def forward(self, ids):
        h = self.body(self.embed(ids))
        if h.sum() > -1e9:  # data-dependent: no graph capture
            h = h * 2
        return self.head(h) if self.how == "tied" else self.head(h, self.embed.weight)


@pytest.mark.parametrize("how", ["tied", "passed"])
def test_a_tied_head_in_a_model_no_capture_takes_is_adapted_where_it_is_called(how):
    """The head's call is intercepted where it happens, not at the embedding that owns the
    weight (whose forward never calls a linear: its b had no effect, silently; Gemma 3n).
    Reference: the model with forward hooks adding ``b * h.sum(-1)`` to the body's and the
    head's outputs, the embedding looking up the unchanged weight."""
    torch.manual_seed(0)
    model = _TiedBranchy(how).eval()
    ids = torch.randint(0, 16, (2, 5))
    gm = quiet_transform(model, "all", example_inputs=(ids,))
    randomize_adapters(gm, 1, scale=0.05)
    vectors = ol.adapter_parameters(gm)
    head = next(s.adapter_name for s in ol.sites(gm) if s.adapted and s.weight is gm.get_submodule("embed").weight)
    assert head == ("head.onelora_b" if how == "tied" else "embed.onelora_b")
    ref, leaves = hooked(model, vectors, {"body": "body.onelora_b", "head": head})
    out, want = gm(ids), ref(ids)
    assert (want - model(ids)).abs().max() > 1e-2  # the head's b matters in the reference
    assert_close(out, want, torch.float32, "adapted vs hooks")
    out.square().sum().backward()
    want.square().sum().backward()
    for name, b in leaves.items():
        assert_close(vectors[name].grad, b.grad, torch.float32, f"{name} gradient")
    if how == "tied":  # the head's name gets its own folded copy; the embedding keeps the weight
        assert_close(ol.merge(gm)(ids), out.detach(), torch.float32, "merged vs adapted")
    else:  # one name for the lookup and the head: merge refuses, nothing changed
        with pytest.raises(ol.MergeError, match="embed.weight is read by the adapted linear"):
            ol.merge(gm)


class _Regions(nn.Module):
    """Linears inside ``torch.no_grad()`` and ``torch.autocast(enabled=False)`` blocks:
    pre-dispatch export calls such a block as a subgraph, the weights as operands."""

    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(8, 8)
        self.full = nn.Linear(8, 8)
        self.out = nn.Linear(8, 8)

    def forward(self, x):
        with torch.no_grad():
            h = self.frozen(x)
        with torch.autocast("cpu", enabled=False):
            y = self.full(x)
        return self.out(h + y)


def test_linears_in_no_grad_and_autocast_blocks_are_sites_exactly_like_the_model_runs_them(tmp_path):
    """Every linear is adapted (HRM runs most of its cycles under ``torch.no_grad()``; they
    were left unadapted, silently); the no-grad block stays no-grad: its ``b`` changes the
    output and gets no gradient, as a hook inside that block would. Reference: forward hooks
    adding ``b * x.sum(-1)``; then merge, export and the compile backend give the same."""
    torch.manual_seed(0)
    model = _Regions().eval()
    x = torch.randn(3, 8)
    # symbolic_trace would run the blocks and record none of them: it refuses, auto exports
    with pytest.raises(ol.CaptureError, match=r"changes the grad mode or autocast .*use capture='export'"):
        ol.transform(copy.deepcopy(model), "all", capture="fx")
    gm = quiet_transform(model, "all", example_inputs=(x,))
    assert "capture: export" in ol.summary(gm)
    assert {s.owner for s in ol.sites(gm) if s.adapted} == {"frozen", "full", "out"}
    randomize_adapters(gm, 1, scale=0.05)
    vectors = ol.adapter_parameters(gm)
    ref, leaves = hooked(model, vectors, {p: f"{p}.onelora_b" for p in ("frozen", "full", "out")})
    out, want = gm(x), ref(x)
    assert_close(out, want, torch.float32, "adapted vs hooks")
    out.square().sum().backward()
    want.square().sum().backward()
    assert vectors["frozen.onelora_b"].grad is None and leaves["frozen.onelora_b"].grad is None
    for name in ("full.onelora_b", "out.onelora_b"):
        assert_close(vectors[name].grad, leaves[name].grad, torch.float32, f"{name} gradient")
    assert torch.is_grad_enabled()  # the block restored the mode it changed
    assert_close(ol.merge(gm)(x), out.detach(), torch.float32, "merged vs adapted")
    program = ol.export(gm, (x,), path=tmp_path / "m.pt2")
    assert_close(torch.export.load(tmp_path / "m.pt2").module()(x), out.detach(), torch.float32, "exported")
    assert any("wrap_with_set_grad_enabled" in str(n.target) for n in program.graph.nodes)  # the block, again
    torch._dynamo.reset()
    assert_close(torch.compile(gm, backend="onelora")(x), out.detach(), torch.float32, "compiled vs adapted")


def test_a_weight_handed_to_torch_cond_is_named_as_unadapted():
    """A branch of ``torch.cond`` is a subgraph onelora_fx does not rewrite: its weight is
    said to stay unadapted (it was counted as 'no matrix product', without a word)."""
    torch.manual_seed(0)

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.c = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.c(torch.cond(x.sum() > 0, lambda x: self.a(x), lambda x: x * 2, (x,)))

    x = torch.randn(2, 8)
    with pytest.warns(UserWarning, match=r"not adapt: a\.weight \(cond\)"):
        gm = ol.transform(Branchy(), "all", example_inputs=(x,), capture="export")
    assert [s.owner for s in ol.sites(gm) if s.adapted] == ["c"]


class _Reverse(torch.autograd.Function):
    """A gradient-reversal layer: identity forward, negated backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return -g


class _Reversing(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.c = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.c(_Reverse.apply(self.a(x)))


def test_a_custom_autograd_function_is_never_captured_without_its_backward():
    """Graph captures record a custom Function's forward and drop its backward (YOSO's
    attention; here a gradient reversal, which flips the sign of ``a``'s b gradient).
    fx and export refuse, naming the Function; auto adapts the model in the module form,
    whose gradients equal forward hooks on the model itself."""
    torch.manual_seed(0)
    model, x = _Reversing().eval(), torch.randn(3, 8)
    for capture in ("fx", "export"):
        with pytest.raises(ol.CaptureError, match=r"_Reverse.* backward of its own.*use capture='module'"):
            ol.transform(copy.deepcopy(model), "all", example_inputs=(x,), capture=capture)
    with pytest.warns(UserWarning, match="module form"):
        gm = ol.transform(model, "all", example_inputs=(x,))
    assert "capture: module" in ol.summary(gm)
    randomize_adapters(gm, 1, scale=0.05)
    vectors = ol.adapter_parameters(gm)
    ref, leaves = hooked(model, vectors, {p: f"{p}.onelora_b" for p in ("a", "c")})
    out, want = gm(x), ref(x)
    assert_close(out, want, torch.float32, "adapted vs hooks")
    out.square().sum().backward()
    want.square().sum().backward()
    for name, b in leaves.items():
        assert_close(vectors[name].grad, b.grad, torch.float32, f"{name} gradient")


def test_llama4_trains_in_both_forms():
    """Llama 4 adds to a linear's output in place (``out.add_``): the op's output is no view."""
    cfg = transformers.Llama4TextConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, intermediate_size_mlp=64,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=64,
                                        num_local_experts=4, use_cache=False)
    for capture in ("auto", "module"):
        torch.manual_seed(0)
        model = transformers.Llama4ForCausalLM(cfg)
        gm = quiet_transform(model, "all-linear", example_kwargs={"input_ids": IDS}, capture=capture)
        opt = torch.optim.AdamW(ol.adapter_parameters(gm).values(), lr=1e-2)
        for _ in range(2):
            loss = F.cross_entropy(gm(input_ids=IDS).logits[:, :-1].reshape(-1, 64), IDS[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert any(b.abs().sum() > 0 for b in ol.adapter_parameters(gm).values()), capture


def test_a_router_that_casts_its_weight_merges():
    """``self.weight.type(torch.float32)`` records an ``_assert_tensor_metadata`` reading
    the weight: an assertion reads nothing, so merge folds the router as any linear."""
    cfg = transformers.Glm4MoeConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=64,
                                     n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1, use_cache=False)
    torch.manual_seed(0)
    gm = adapted_exactly(transformers.Glm4MoeForCausalLM(cfg), {"input_ids": IDS})
    assert "model.layers.1.mlp.gate" in {s.name for s in ol.sites(gm) if s.adapted}


@pytest.fixture(scope="module")
def qwen3_moe():
    cfg = transformers.Qwen3MoeConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
                                      num_experts=4, num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2,
                                      head_dim=8, vocab_size=64, use_cache=False)
    return cfg


def test_qwen3_moe_graph_form_under_autocast_and_after_moves(qwen3_moe, tmp_path):
    """A call under autocast, a move to bfloat16 and meta -> to_empty -> load each get a
    graph captured for them (never one captured for another dtype or device). Under
    autocast the reference is the model with W + b 1ᵀ folded in by hand (float32 truth,
    within the folded model's own bfloat16 error); moved to bfloat16, the two forms agree."""
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(qwen3_moe).eval()
    graph = quiet_transform(model, "all", example_kwargs={"input_ids": IDS})
    module = quiet_transform(model, "all", example_kwargs={"input_ids": IDS}, capture="module")
    randomize_adapters(graph, 3)
    ol.load_adapter(module, ol.save_adapter(graph, tmp_path / "a.safetensors"))
    # the float32 truth: W + b 1ᵀ folded by hand. bfloat16 may flip an expert choice, so
    # each bfloat16 run is held to the error the folded model itself makes in bfloat16
    reference = folded(model, graph, matrix_weights(model))
    truth = reference(input_ids=IDS).logits

    def within_budget(got, reference_low, what):
        budget = 2 * (reference_low.float() - truth).abs().max().item() + 1e-2
        error = (got.float() - truth).abs().max().item()
        assert error <= budget, f"{what}: {error:.3g} from the float32 truth, budget {budget:.3g}"

    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = graph(input_ids=IDS).logits
        within_budget(out, reference(input_ids=IDS).logits, "autocast")
        assert_close(module(input_ids=IDS).logits, out, torch.bfloat16, "autocast, module form")
    # moved to bfloat16 the router itself runs in bfloat16 and picks experts by rounded
    # scores, which a folded model rounds differently: the two forms must agree
    graph.to(torch.bfloat16)
    module.to(torch.bfloat16)
    out = graph(input_ids=IDS).logits
    assert_close(module(input_ids=IDS).logits.float(), out.float(), torch.bfloat16, "bf16, module form")
    checkpoint = {k: v.clone() for k, v in model.state_dict().items()}  # (save_pretrained splits the experts)
    with torch.device("meta"):
        big = transformers.Qwen3MoeForCausalLM(qwen3_moe)
    meta_gm = quiet_transform(big, "all", example_kwargs={"input_ids": IDS.to("meta")})
    meta_gm.to_empty(device="cpu")
    result = meta_gm.load_state_dict(checkpoint, strict=False)
    assert not result.missing_keys and not result.unexpected_keys, result
    assert torch.equal(meta_gm(input_ids=IDS).logits, model(input_ids=IDS).logits)


def test_a_failing_shape_guard_is_a_new_call_captured_on_first_use():
    class Guarded(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            y = self.lin(x)
            return y * 2 if x.shape[0] > 2 else y

    torch.manual_seed(0)
    model = Guarded()
    gm = quiet_transform(model, "all", example_inputs=(torch.randn(3, 4),), capture="export")
    randomize_adapters(gm, 2)
    reference = folded(model, gm, {"lin.weight"})
    for batch in (2, 3, 5, 1):
        x = torch.randn(batch, 4)
        assert_close(gm(x), reference(x), torch.float32, f"batch {batch}")


def test_a_graph_module_in_the_module_form_merges_saves_loads_and_stacks(tmp_path):
    """The form is what transform recorded, not the module's type."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(8, 16)
            self.w = nn.Parameter(torch.randn(16, 16) * 0.1)
            self.fc2 = nn.Linear(16, 4)

        def forward(self, x):
            return self.fc2(F.linear(torch.relu(self.fc1(x)), self.w))

    torch.manual_seed(0)
    net = Net()
    x = torch.randn(3, 8)
    gm = ol.transform(torch.fx.symbolic_trace(net), "all", capture="module")
    assert "capture: module" in ol.summary(gm)
    randomize_adapters(gm, 4)
    y = gm(x)
    assert not torch.allclose(y, net(x))
    assert_close(ol.merge(gm)(x), y, torch.float32, "merge")
    path = ol.save_adapter(gm, tmp_path / "a.safetensors")
    again = ol.transform(torch.fx.symbolic_trace(net), "all", capture="module")
    ol.load_adapter(again, path)
    assert torch.equal(again(x), y)
    multi = ol.stack(gm, [path, path])
    out = multi(x, adapter_ids=torch.tensor([0, -1, 1]))
    assert_close(out[0], y[0], torch.float32, "stack row 0")
    assert_close(out[1], net(x)[1], torch.float32, "stack row 1 is the base")


def test_every_weight_is_in_one_class_and_the_unadapted_are_named():
    """adapted / not selected / no matrix product / unadapted: summary shows the four;
    a weight read by einsum is named in the warning, an embedding is not, a dead
    branch is not a skip."""

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.proj = nn.Linear(8, 8)
            self.mix = nn.Parameter(torch.randn(8, 8))
            self.unused = nn.Linear(8, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, ids):
            h = self.proj(self.embed(ids))
            h = torch.einsum("bsd,de->bse", h, self.mix)
            dead = self.unused(h)  # noqa: F841  (its output reaches nothing)
            return self.head(h)

    with pytest.warns(UserWarning, match=r"1 weight\(s\) of Mixed, .*mix \(einsum\)") as caught:
        gm = ol.transform(Mixed(), "all-linear", example_inputs=(torch.randint(0, 10, (2, 5)),), capture="export")
    assert not any("unused" in str(w.message) or "embed" in str(w.message) for w in caught)
    text = ol.summary(gm)
    assert "1 adapted" in text and "1 not selected" in text and "2 no matrix product" in text and "1 unadapted" in text, text


def test_a_model_that_calls_vmap_keeps_its_vmap_levels_through_the_passes():
    """Export records ``torch.vmap`` as calls that enter and leave a vmap level; the
    leaving call's result is unused, and dead-code elimination must keep it anyway
    (T5Gemma 2's masks: every call of the adapted graph failed)."""

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 6)

        def forward(self, x):
            keep = torch.vmap(lambda row: row.sum() > 0)(x)
            return self.lin(x) * keep[:, None]

    torch.manual_seed(0)
    model, x = Masked(), torch.randn(4, 6)
    gm = ol.transform(model, "all", capture="export", example_inputs=(x,))
    assert torch.equal(gm(x), model(x)) and torch.equal(gm(x), model(x))  # twice: the level was left
    b = gm.get_parameter("lin.onelora_b")
    with torch.no_grad():
        b.normal_()
    expected = (model.lin(x) + b * x.sum(-1, keepdim=True)) * (x.sum(-1) > 0)[:, None]
    torch.testing.assert_close(gm(x), expected)
    torch.testing.assert_close(ol.merge(gm)(x), expected)


def test_a_weight_read_both_ways_is_refused_not_adapted_wrongly():
    """A square weight read as ``W`` by one call and as ``Wᵀ`` by another (NeoMME's
    embedding projection and its unembedding): one ``b 1ᵀ`` would reach the transposed read
    as ``1 bᵀ``, so training and merge would disagree. A PatternError says so and names
    the calls; excluding them all adapts the rest."""

    class BothWays(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8, bias=False)
            self.out = nn.Linear(8, 3)

        def forward(self, x):
            h = self.proj(x)
            return self.out(h @ self.proj.weight)  # the same weight, transposed

    model, x = BothWays(), torch.randn(2, 8)
    for capture in ("fx", "export", "module"):
        with pytest.raises(ol.PatternError, match=r"proj.weight is read both as \[out, in\] and transposed"):
            ol.transform(model, "all", capture=capture, example_inputs=(x,))
    gm = quiet_transform(model, "all", exclude="proj*", example_inputs=(x,))
    assert [s.name for s in ol.sites(gm) if s.adapted] == ["out"]
