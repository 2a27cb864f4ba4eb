"""Models and edges beyond transformers, tried as users bring them: torch.nn layers with
fused inference kernels, fx-wrapped functions, computed biases, float64, and the edges of
stacks, files and moves. Each is exact against a reference written here, or a clear error
with nothing changed; never a silent skip."""

from __future__ import annotations

import copy
import logging
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import onelora_fx as ol
from reference import folded, randomize_adapters
from toolkit import assert_close, assert_same_state, model_state, quiet_transform


class _Branchy(nn.Module):
    """An encoder behind data-dependent control flow: no graph capture takes it."""

    def __init__(self):
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        h = self.enc(x)
        if h.abs().sum() > 0:  # data-dependent, but never near the threshold (rounding cannot flip it)
            h = h * 2
        return self.out(h)


MODES = {"train": (True, torch.enable_grad), "eval": (False, torch.enable_grad),
         "eval-no_grad": (False, torch.no_grad), "eval-inference_mode": (False, torch.inference_mode)}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_a_fused_encoder_layer_runs_the_adapted_math_in_every_mode(mode):
    """``nn.TransformerEncoderLayer`` takes a fused kernel in eval mode without grad that
    never calls its linears: the module form keeps it on its composite path, so the
    adapted layers count in every mode (the reference: W + b 1ᵀ written into a copy)."""
    torch.manual_seed(0)
    model = _Branchy()
    x = torch.randn(2, 5, 16)
    gm = quiet_transform(model, "all", exclude="enc.self_attn.*", example_inputs=(x,), capture="module")
    randomize_adapters(gm, 1, scale=0.2)
    training, context = MODES[mode]
    reference = folded(model, gm, {"enc.linear1.weight", "enc.linear2.weight", "out.weight"}).train(training)
    gm.train(training)
    with context():
        out, expected = gm(x), reference(x)
    assert_close(out, expected, torch.float32, mode)
    with torch.no_grad():
        assert not torch.allclose(out, model.train(training)(x), atol=1e-3), "b has an effect"


def test_multihead_attention_in_the_module_form_is_refused_at_transform():
    """Sites found by a graph capture but adapted in the module form: MHA's projections
    run inside one fused function the module form cannot follow: refused, naming them
    and the two ways out, with the model as it was."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), nn.Linear(16, 4)).eval()
    before = model_state(model)
    with pytest.raises(ol.SiteError, match=r"nn\.MultiheadAttention .*capture='export'.*exclude=\['0\.self_attn\.\*'\]"):
        ol.transform(model, "all", example_inputs=(torch.randn(2, 5, 16),), capture="module")
    assert_same_state(before, model_state(model))


def test_the_fallback_names_multihead_attention_weights_as_unadapted():
    """No graph capture takes the model: the recorded forward sees MHA's weights passed to
    ``multi_head_attention_forward``, which it cannot adapt: a warning names them and the
    summary counts them; the rest is adapted."""
    torch.manual_seed(0)
    model = _Branchy().eval()
    with pytest.warns(UserWarning, match=r"enc\.self_attn\.in_proj_weight \(multi_head_attention_forward\)"):
        gm = ol.transform(model, "all", example_inputs=(torch.randn(2, 5, 16),))
    assert {s.name for s in ol.sites(gm) if s.adapted} == {"enc.linear1", "enc.linear2", "out"}
    assert "unadapted: enc.self_attn.in_proj_weight" in ol.summary(gm)


@torch.fx.wrap
def window_attention(x, w_qkv, w_proj):
    """torchvision's Swin pattern: attention in a function symbolic_trace keeps whole."""
    q, k, v = F.linear(x, w_qkv).chunk(3, -1)
    return F.linear(torch.softmax(q @ k.transpose(-1, -2), -1) @ v, w_proj)


class WrappedAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24, bias=False)
        self.proj = nn.Linear(8, 8, bias=False)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(window_attention(x, self.qkv.weight, self.proj.weight))


def test_weights_read_inside_an_fx_wrapped_function_are_never_no_matrix_product(caplog):
    """symbolic_trace keeps ``window_attention`` whole: 'auto' with examples takes
    torch.export, which sees into it, and says so; without examples (or with
    capture='fx') the two weights are named unadapted, never 'no matrix product'."""
    torch.manual_seed(0)
    model = WrappedAttention()
    x = torch.randn(2, 3, 8)
    with caplog.at_level(logging.WARNING, logger="onelora_fx"):
        gm = quiet_transform(model, "all", example_inputs=(x,))
    assert "captured WrappedAttention with torch.export instead" in caplog.text
    assert "capture: export" in ol.summary(gm)
    randomize_adapters(gm, 2)
    assert_close(gm(x), folded(model, gm, {"qkv.weight", "proj.weight", "fc.weight"})(x), torch.float32)
    for how in ({}, {"capture": "fx"}):
        with pytest.warns(UserWarning, match=r"qkv\.weight \(window_attention\), proj\.weight \(window_attention\)"):
            fx_gm = ol.transform(model, "all", **how)
        assert "1 adapted (11.1% of all weight values), 0 not selected (0.0%), 0 no matrix product (0.0%), 2 unadapted" \
            in ol.summary(fx_gm), how


# ---------------------------------------------------------------------------------- edges


def mlp_adapters(k: int):
    """``k`` adapted copies of one small MLP, each with its own random vectors."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    out = []
    for seed in range(k):
        gm = ol.transform(model, "all")
        randomize_adapters(gm, seed + 1)
        out.append(gm)
    return model, out


def test_a_negative_adapter_index_is_refused(tmp_path):
    """In ``adapter_ids`` -1 is the base model: ``index=-1`` in the file functions would
    silently mean the last adapter, so it is refused, and nothing is written or changed."""
    _, adapters = mlp_adapters(2)
    multi = ol.stack(adapters[0], adapters)
    single = ol.save_adapter(adapters[1], tmp_path / "one.safetensors")
    before = model_state(multi)
    for index in (-1, 2, True):
        with pytest.raises(ValueError, match=r"pass index=0\.\.1"):
            ol.save_adapter(multi, tmp_path / f"bad{index}.safetensors", index=index)
        with pytest.raises(ValueError, match=r"pass index=0\.\.1"):
            ol.load_adapter(multi, single, index=index)
        assert not (tmp_path / f"bad{index}.safetensors").exists()
    assert_same_state(before, model_state(multi))
    ol.load_adapter(multi, single, index=0)  # index 0..K-1 works
    for name, b in ol.adapter_parameters(multi).items():
        assert torch.equal(b[0], ol.adapter_parameters(adapters[1])[name]), name


def test_a_peft_config_without_lora_alpha_means_peft_s_default(tmp_path):
    """PEFT reads a config without ``lora_alpha`` as its default (8): so does load_peft,
    checked against ``PeftModel.from_pretrained`` on the same folder."""
    peft = pytest.importorskip("peft")
    import json

    model, (gm,) = mlp_adapters(1)
    folder = ol.save_peft(gm, tmp_path / "peft") or tmp_path / "peft"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config.pop("lora_alpha") == 1
    (folder / "adapter_config.json").write_text(json.dumps(config))
    target = ol.transform(model, "all")
    ol.load_peft(target, folder)
    for name, b in ol.adapter_parameters(target).items():
        assert_close(b, 8 * ol.adapter_parameters(gm)[name].detach(), torch.float32, name)
    served = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(folder)).eval()
    x = torch.randn(4, 6)
    assert_close(target(x), served(x), torch.float32, "PEFT's own reading of the folder")


@pytest.mark.parametrize("capture", ["fx", "module"])
def test_an_adapter_is_not_loaded_into_vectors_on_meta(capture, tmp_path):
    """Loading into a model built on meta would drop the values (a copy into meta is a
    no-op) and, after ``to_empty``, leave uninitialized memory in every b: refused; after
    ``to_empty`` and the base weights, every b is zero and the file loads exactly."""
    model, (trained,) = mlp_adapters(1)
    path = ol.save_adapter(trained, tmp_path / "a.safetensors")
    with torch.device("meta"):
        empty = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    gm = quiet_transform(empty, "all", capture=capture, example_inputs=(torch.randn(2, 6, device="meta"),))
    for load in (lambda: ol.load_adapter(gm, path), lambda: ol.load_peft(gm, ol.save_peft(trained, tmp_path / "p") or tmp_path / "p")):
        with pytest.raises(ol.AdapterFileError, match="on the meta device.*to_empty"):
            load()
    gm.to_empty(device="cpu")
    gm.load_state_dict(model.state_dict(), strict=False)
    assert all(torch.equal(b, torch.zeros_like(b)) for b in ol.adapter_parameters(gm).values())
    ol.load_adapter(gm, path)
    x = torch.randn(4, 6)
    assert torch.equal(gm(x), trained(x))


@pytest.mark.parametrize("capture", ["fx", "module"])
def test_a_state_dict_with_some_vectors_reports_the_others_missing(capture):
    """A base checkpoint (no vector) loads strictly; a state dict holding another
    pattern's vectors reports the vectors it lacks, and ``strict=True`` refuses it."""
    model, _ = mlp_adapters(0)
    narrow = ol.transform(model, "0", capture=capture, example_inputs=(torch.randn(2, 6),))
    wide = ol.transform(model, "all", capture=capture, example_inputs=(torch.randn(2, 6),))
    assert wide.load_state_dict(model.state_dict(), strict=True).missing_keys == []
    result = wide.load_state_dict(narrow.state_dict(), strict=False)
    assert result.missing_keys == ["2.onelora_b"] and result.unexpected_keys == []
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"2\.onelora_b\""):
        wide.load_state_dict(narrow.state_dict(), strict=True)


@pytest.mark.parametrize("capture", ["fx", "module"])
def test_merge_in_place_refuses_a_model_cast_after_transform(capture):
    """``model.half()`` after ``transform`` gives the model new tensors: a merge in place
    would write into the adapted module's old ones and leave the model as it was."""
    model, _ = mlp_adapters(0)
    gm = ol.transform(model, "all", capture=capture, example_inputs=(torch.randn(2, 6),))
    randomize_adapters(gm, 4)
    model.half()
    before, user = model_state(gm), model_state(model)
    with pytest.raises(ol.MergeError, match=r"model's 0\.weight is no longer one of them .*model\.half\(\)"):
        ol.merge(gm, inplace=True)
    assert_same_state(before, model_state(gm), "the adapted module")
    assert_same_state(user, model_state(model), "the model")
    merged = ol.merge(gm)  # inplace=False still works
    assert_close(merged(torch.ones(2, 6)), gm(torch.ones(2, 6)), torch.float32)


def test_threads_making_first_calls_with_new_signatures_all_get_their_graphs():
    """Three threads each make a call the example did not show, at once: each is captured
    (one at a time) and equals the same call made alone afterwards."""
    pytest.importorskip("transformers")
    from concurrent.futures import ThreadPoolExecutor

    from toolkit import IDS, tiny_llama

    model = tiny_llama()
    gm = quiet_transform(model, "all-linear", example_kwargs={"input_ids": IDS}).eval()
    randomize_adapters(gm, 5)
    calls = [dict(attention_mask=torch.ones_like(IDS)), dict(output_hidden_states=True), dict(labels=IDS)]
    with ThreadPoolExecutor(3) as pool:
        outs = list(pool.map(lambda kw: gm(input_ids=IDS, **kw).logits, calls))
    for kw, out in zip(calls, outs):
        assert torch.equal(out, gm(input_ids=IDS, **kw).logits), kw


class ComputedBias(nn.Module):
    """timm's EVA / BEiT attention: qkv's bias is computed, ``cat(q_bias, 0, v_bias)``."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24, bias=False)
        self.q_bias = nn.Parameter(torch.randn(8))
        self.v_bias = nn.Parameter(torch.randn(8))
        self.register_buffer("k_bias", torch.zeros(8), persistent=False)
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        qkv = F.linear(x, self.qkv.weight, torch.cat((self.q_bias, self.k_bias, self.v_bias)))
        q, k, v = qkv.chunk(3, -1)
        return self.proj(torch.softmax(q @ k.transpose(-1, -2), -1) @ v)


@pytest.mark.parametrize("capture", ["fx", "export", "module"])
def test_a_linear_with_a_computed_bias_is_a_site(capture):
    torch.manual_seed(0)
    model = ComputedBias()
    x = torch.randn(2, 3, 8)
    gm = quiet_transform(model, "all", capture=capture, example_inputs=(x,))
    assert {s.name for s in ol.sites(gm) if s.adapted} == {"qkv", "proj"}
    assert torch.equal(gm(x), model(x))
    randomize_adapters(gm, 3)
    reference = folded(model, gm, {"qkv.weight", "proj.weight"})
    assert_close(gm(x), reference(x), torch.float32, capture)
    assert_close(ol.merge(gm)(x), reference(x), torch.float32, "merged")


class SequenceFirst(nn.Module):
    """A linear over rows flattened sequence-first: ``x.transpose(0, 1).reshape(S * B, E)``."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        b, s, e = x.shape
        h = self.fc(x.transpose(0, 1).reshape(s * b, e))
        return self.out(h.reshape(s, b, e).transpose(0, 1))


def test_a_stack_refuses_rows_flattened_sequence_first():
    """Each batch item's rows are spread over the flattened input: a stack cannot give
    them their adapter, so it refuses (it used to read them as batch-major: wrong rows)."""
    torch.manual_seed(0)
    model = SequenceFirst()
    x = torch.randn(3, 4, 8)
    adapters = []
    for seed in range(2):
        gm = quiet_transform(model, "all", example_inputs=(x,), capture="export")
        randomize_adapters(gm, seed + 1)
        adapters.append(gm)
    with pytest.raises(ValueError, match="not laid out with the batch first.*cannot tell which adapter"):
        ol.stack(adapters[0], adapters)


@pytest.mark.parametrize("how", ["file", "peft"])
def test_load_adapts_a_base_model_from_a_saved_adapter_in_one_call(how, tmp_path):
    """``ol.load`` reads which weights the adapter was trained on (any pattern, a callable
    one included) and gives the adapted model back: equal to the trained one."""
    pytest.importorskip("transformers")
    from toolkit import IDS, tiny_llama

    model = tiny_llama()
    trained = quiet_transform(model, lambda s: s.name.endswith(("q_proj", "down_proj")), example_kwargs={"input_ids": IDS})
    randomize_adapters(trained, 7)
    path = ol.save_adapter(trained, tmp_path / "a.safetensors") if how == "file" else \
        (ol.save_peft(trained, tmp_path / "peft") or tmp_path / "peft")
    before = model_state(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = ol.load(model, path, example_kwargs={"input_ids": IDS})
    assert {s.name for s in ol.sites(gm) if s.adapted} == {s.name for s in ol.sites(trained) if s.adapted}
    assert_close(gm(input_ids=IDS).logits, trained(input_ids=IDS).logits, torch.float32)
    assert_same_state(before, model_state(model))
    other = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ol.AdapterFileError, match="no linear sites of Sequential.*an adapter of this model"):
        ol.load(other, path)


def _drop_path(x, p: float, training: bool):
    """timm's stochastic depth, as timm writes it: a Python branch on the mode and an
    in-place scaling whose result is unused."""
    if p == 0.0 or not training:
        return x
    keep = 1 - p
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = x.new_empty(shape).bernoulli_(keep)
    mask.div_(keep)
    return x * mask


class _DropPathBlocks(nn.Module):
    def __init__(self, p: float = 0.5):
        super().__init__()
        self.p = p
        self.fc1, self.fc2, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        x = x + _drop_path(self.fc1(x), self.p, self.training)
        x = x + _drop_path(self.fc2(x), self.p, self.training)
        return self.head(x)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_training_runs_the_model_s_train_only_branches(capture, caplog):
    """timm's drop_path branches on self.training in Python: no one graph is right in both
    modes. Training calls run a training-mode graph (the same random masks as the model
    under the same seed, gradients exact); eval, merge and export the eval graph."""
    torch.manual_seed(0)
    model = _DropPathBlocks()
    x = torch.randn(16, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # handled, so no warning
        gm = ol.transform(model, "all", capture=capture, example_inputs=(x,))
    randomize_adapters(gm)
    reference = folded(model, gm, {"fc1.weight", "fc2.weight", "head.weight"})
    gm.train(), reference.train()
    torch.manual_seed(3)
    first = gm(x)
    first.square().sum().backward()
    torch.manual_seed(3)
    want = reference(x)
    want.square().sum().backward()
    assert_close(first, want)
    for site in ol.sites(gm):  # a folded weight's gradient, summed over its inputs, is b's
        assert_close(gm.get_parameter(site.adapter_name).grad, reference.get_parameter(site.weight_name).grad.sum(-1))
    assert not torch.equal(gm(x), first), "each training call draws new masks"
    gm.eval(), reference.eval()
    assert_close(gm(x), reference(x))
    assert torch.equal(gm(x), gm(x))
    assert_close(ol.merge(gm)(x), reference(x))
    assert not [k for k in vars(model) if "constant" in k], "tracing must not leave constants on the model"


def test_a_constant_made_in_forward_is_no_train_eval_difference(caplog):
    """symbolic_trace stores tensors the forward creates on the traced model; two traces
    named them apart, and the mode check took that for a difference between the modes."""

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) * torch.tensor(2.0)

    model = Scaled()
    before = model_state(model)
    with caplog.at_level(logging.INFO, logger="onelora_fx"):
        gm = ol.transform(model, "all", capture="fx")
    assert not [r for r in caplog.records if "different ops in training" in r.getMessage()]
    assert "onelora_eval_only" not in gm.meta
    assert_same_state(before, model_state(model))
    assert not hasattr(model, "_tensor_constant0")


class SequenceFirst3d(nn.Module):
    """A linear over a sequence-first ``[S, B, E]`` view of a batch-first input."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out(self.fc(x.transpose(0, 1)).transpose(0, 1))


@pytest.mark.parametrize("capture", ["fx", "module"])
def test_a_stack_without_recorded_shapes_refuses_a_sequence_first_input_when_s_equals_b(capture):
    """With S == B the shape [S, B, E] looks batch first: the fx form reads the transpose
    from its graph and refuses at stack time, the module form (no graph) refuses the
    ambiguous call; both used to give items each other's adapters."""
    torch.manual_seed(0)
    model = SequenceFirst3d()
    x = torch.randn(4, 4, 8)
    adapters = []
    for seed in range(2):
        gm = quiet_transform(model, "all", example_inputs=(x,), capture=capture)
        randomize_adapters(gm, seed + 1)
        adapters.append(gm)
    ids = torch.tensor([0, 1, 1, 0])
    if capture == "fx":
        with pytest.raises(ValueError, match="moves the batch out of the first dimension"):
            ol.stack(adapters[0], adapters)
        return
    multi = ol.stack(adapters[0], adapters)
    with pytest.raises(ValueError, match="first two dimensions are both 4.*capture='export'"):
        multi(x, adapter_ids=ids)
    x3 = torch.randn(4, 3, 8)  # S != B: the shape tells, and the call is exact where it runs
    with pytest.raises(ValueError, match="one entry per item of the batch"):
        multi(x3, adapter_ids=ids)


@pytest.mark.parametrize("capture", ["export", "module"])
def test_a_stack_takes_the_batch_from_inputs_embeds_not_a_broadcast_position_ids(capture):
    """``position_ids=arange(S)[None]`` comes first in LLaMA's signature and has one row
    for every item: the batch is ``inputs_embeds``'s first dimension."""
    from toolkit import randomize_norms, tiny_llama

    model = randomize_norms(tiny_llama()).eval()
    embeds = torch.randn(3, 6, model.config.hidden_size)
    kwargs = dict(inputs_embeds=embeds, position_ids=torch.arange(6)[None], use_cache=False)
    adapters = []
    for seed in range(2):
        gm = quiet_transform(model, "all", example_kwargs=kwargs, capture=capture)
        randomize_adapters(gm, seed + 1)
        adapters.append(gm)
    multi = ol.stack(adapters[0], adapters)
    ids = torch.tensor([1, -1, 0])
    got = multi(**kwargs, adapter_ids=ids).logits
    for item, which in enumerate(ids.tolist()):
        one = dict(kwargs, inputs_embeds=embeds[item:item + 1])
        want = (adapters[which] if which >= 0 else model)(**one).logits[0]
        assert_close(got[item], want)



def test_adapter_parameters_of_a_module_whose_adapted_layer_was_swapped_says_so():
    gm = quiet_transform(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), "all", capture="module")
    gm[2] = nn.Linear(4, 2)  # as a user quantizing after transform would
    with pytest.raises(ol.AdapterStateError, match=r"1 trained tensor.*2\.onelora_b.*before ol.transform"):
        ol.adapter_parameters(gm)


def test_a_model_already_sharded_with_fully_shard_is_refused_with_the_order_to_use(tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        mesh = init_device_mesh("cpu", (1,))
        fully_shard(model[0], mesh=mesh)
        fully_shard(model, mesh=mesh)
        before = model_state(model)
        for capture in ("auto", "module"):
            with pytest.raises(TypeError, match="already sharded with fully_shard.*transform the unsharded model"):
                ol.transform(model, "all", capture=capture, example_inputs=(torch.randn(2, 4),))
        assert_same_state(before, model_state(model))
    finally:
        dist.destroy_process_group()
