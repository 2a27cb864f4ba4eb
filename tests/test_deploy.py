"""merge, export and adapter files: the deploy path (fold b into W, export the base graph, ship only the vectors)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import onelora_fx as ol
from handwritten import MODULES, example
from onelora_fx.tools import zoo
from reference import base_capture, compute_ops, exported_base_ops, first_tensor, folded, matrix_weights, randomize_adapters, tolerance
from toolkit import assert_close, assert_same_state, model_state, quiet_transform

needs_transformers = pytest.mark.skipif(
    __import__("importlib").util.find_spec("transformers") is None, reason="needs transformers (pip install -e '.[models]')"
)

FAMILIES = ["llama-tiny", "gpt2-tiny", "bert-tiny", "vit-tiny", "depth-anything-tiny", "dit-tiny"]


@pytest.fixture(scope="module", params=[pytest.param(f, marks=needs_transformers) for f in FAMILIES])
def family(request):
    name = request.param
    model, args, kwargs = zoo.build(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base_nodes = len(base_capture(model, args, kwargs).graph.nodes)
        base_ops = exported_base_ops(model, args, kwargs)
        gm = ol.transform(model, "all-linear", example_inputs=args, example_kwargs=kwargs)
    randomize_adapters(gm, seed=5)
    gm.eval()
    model.eval()
    return name, model, gm, args, kwargs, (base_nodes, base_ops)


def fresh_instance(model):
    """A new, randomly initialised model of the same architecture."""
    torch.manual_seed(123)
    if hasattr(model, "from_config"):  # diffusers
        return type(model).from_config(model.config)
    return type(model)(model.config)  # transformers


def out(m, args, kwargs):
    with torch.no_grad():
        return first_tensor(m(*args, **kwargs))


def test_merged_equals_adapted_and_is_the_base_graph(family):
    name, model, gm, args, kwargs, (base_nodes, base_ops) = family
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapted_before = {k: v.clone() for k, v in gm.state_dict().items()}
    merged = ol.merge(gm)
    merged.eval()
    assert_close(out(merged, args, kwargs), out(gm, args, kwargs), torch.float32)
    assert not any(n.op == "call_function" and "onelora" in str(n.target) for n in merged.graph.nodes)
    assert len(merged.graph.nodes) == base_nodes
    # op for op what torch.export makes of the model itself: no adapter op, no extra product
    assert compute_ops(merged.graph) == base_ops and any("linear" in op or "mm" in op for op in base_ops)
    # inplace=False changes neither the model nor the adapted module
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in gm.state_dict().items():
        assert torch.equal(v, adapted_before[k]), k
    # the merged state dict is the model's, and a fresh model reproduces the outputs
    fresh = fresh_instance(model)
    fresh.load_state_dict(merged.state_dict(), strict=True)
    fresh.eval()
    assert_close(out(fresh, args, kwargs), out(gm, args, kwargs), torch.float32)


def test_export_round_trip_at_other_shapes(family, tmp_path):
    name, model, gm, args, kwargs, _ = family
    path = tmp_path / f"{name}.pt2"
    ep = ol.export(gm, args, kwargs, path=path)
    assert not any("onelora" in str(n.target) for n in ep.graph.nodes)
    loaded = torch.export.load(str(path)).module()
    shapes = [(2, 8), (3, 8), (2, 11), (3, 5)] if "input_ids" in kwargs else [(2, 0), (3, 0)]
    for batch, seq in shapes:
        inputs = {}
        for k, v in kwargs.items():
            if k == "input_ids":
                inputs[k] = torch.randint(0, 100, (batch, seq))
            elif isinstance(v, torch.Tensor) and v.dim() >= 1:
                inputs[k] = torch.cat([v] * 2)[:batch] if v.dim() == 1 else torch.randn(batch, *v.shape[1:])
            else:
                inputs[k] = v
        assert_close(out(loaded, args, inputs), out(gm, args, inputs), torch.float32)  # the program computes what the adapted module does


@settings(max_examples=20, deadline=None)
@given(name=st.sampled_from(sorted(MODULES)), dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 999))
def test_merge_handwritten(name, dtype, seed):
    torch.manual_seed(seed)
    model = MODULES[name]().to(dtype)
    x = example(name, (3, 5), 8, 4, dtype, seed)
    gm = ol.transform(model, "all")
    randomize_adapters(gm, seed)
    if name == "tied_fn":  # F.linear(h, embed.weight): the embedding reads the weight under its one name
        with pytest.raises(ol.MergeError, match="embed.weight is read by the adapted linear"):
            ol.merge(gm)
        return
    merged = ol.merge(gm)
    assert len(merged.graph.nodes) == len(base_capture(model).graph.nodes)
    # the reference: W + b 1ᵀ folded by hand (float64, then the weight's dtype)
    weights = matrix_weights(model)
    reference = folded(model, gm, weights)
    if dtype == torch.float32:
        assert_close(merged(x), gm(x), torch.float32)
    # a bfloat16 weight folds in float32 and rounds once: the hand fold's weights exactly
    # (merged vs adapted would compare two bfloat16 roundings, which drift apart by more
    # than a tolerance after a few layers: the adapted module adds the term in float32)
    for weight in weights:
        assert torch.equal(merged.get_parameter(weight), reference.get_parameter(weight)), weight
    if name != "tied":  # (the hand fold also changes the embedding a tied head shares)
        assert torch.equal(merged(x), reference(x))
    if name == "tied":  # the head got its own merged copy: the embedding keeps the original
        assert merged.get_parameter("lm_head.weight") is not merged.get_parameter("embed.weight")
        assert torch.equal(merged.get_parameter("embed.weight"), model.embed.weight)
        return
    fresh = MODULES[name]().to(dtype)
    fresh.load_state_dict(merged.state_dict(), strict=True)
    assert torch.equal(fresh(x), merged(x))


def test_inplace_merge_writes_into_the_model():
    torch.manual_seed(0)
    model = MODULES["mlp"]()
    x = torch.randn(4, 8)
    gm = ol.transform(model, "all-linear", train=("bias",))
    randomize_adapters(gm, 1)
    with torch.no_grad():
        gm.fc1.bias.add_(1.0)  # a trained extra
    expected = gm(x)
    weight = model.fc1.weight
    ptr = weight.data_ptr()
    merged = ol.merge(gm, inplace=True)
    assert merged is gm
    assert model.fc1.weight is weight and weight.data_ptr() == ptr, "no new weight memory"
    torch.testing.assert_close(model(x), expected)  # the model is now the fine-tuned one
    torch.testing.assert_close(merged(x), expected)
    assert merged.fc1.bias.data_ptr() == model.fc1.bias.data_ptr()  # the trained extra went back into the model
    with pytest.raises(ol.MergeError, match="nothing to merge"):
        ol.merge(gm)


def test_tied_weight_gets_its_own_copy():
    torch.manual_seed(0)
    model = MODULES["tied"]()
    ids = torch.randint(0, 16, (2, 5))
    embed_before = model.embed.weight.clone()
    gm = ol.transform(model, "all")
    randomize_adapters(gm, 2)
    expected = gm(ids)
    merged = ol.merge(gm, inplace=True)
    torch.testing.assert_close(merged(ids), expected)
    assert torch.equal(model.embed.weight, embed_before), "the embedding keeps the original"
    assert merged.lm_head.weight is not merged.embed.weight


def test_bad_b_is_refused_and_nothing_changes():
    model = MODULES["mlp"]()
    gm = ol.transform(model, "all")
    with torch.no_grad():
        gm.fc2.onelora_b[3] = float("nan")
    before, user = model_state(gm), model_state(model)
    with pytest.raises(ol.MergeError, match=r"fc2\.onelora_b.*non-finite"):
        ol.merge(gm, inplace=True)
    assert_same_state(before, model_state(gm), "the adapted module")  # the NaN-holding b included, byte for byte
    assert_same_state(user, model_state(model), "the user's model")
    half = ol.transform(MODULES["mlp"]().half(), "all")
    with torch.no_grad():
        half.fc1.onelora_b.fill_(60000.0)
        half.fc1.weight.add_(10000.0)
    before = model_state(half)
    for inplace in (False, True):
        with pytest.raises(ol.MergeError, match="overflows"):
            ol.merge(half, inplace=inplace)
        assert_same_state(before, model_state(half), "the float16 module")


# ---------------------------------------------------------------------------------
# adapter files


def adapted_mlp(seed=0, train=()):
    torch.manual_seed(0)
    gm = ol.transform(MODULES["mlp"](), "all-linear", train=train)
    randomize_adapters(gm, seed)
    return gm


def test_adapter_round_trip_is_exact(tmp_path):
    gm = adapted_mlp(seed=3, train=("norm", "bias"))
    x = torch.randn(5, 8)
    path = ol.save_adapter(gm, tmp_path / "a.safetensors")
    fresh = adapted_mlp(seed=9, train=("norm", "bias"))
    assert not torch.equal(fresh(x), gm(x))
    ol.load_adapter(fresh, path)
    assert torch.equal(fresh(x), gm(x))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == set(ol.adapter_parameters(gm))
    assert meta["format"].startswith("onelora_fx.adapter") and meta["pattern"] == "all-linear"
    assert '"site": "fc1"' in meta["sites"]


def test_bad_adapter_files_change_nothing(tmp_path):
    gm = adapted_mlp(seed=3)
    good = ol.save_adapter(gm, tmp_path / "good.safetensors")
    target = adapted_mlp(seed=4)
    snap = model_state(target)

    other = ol.transform(MODULES["mlp"](d_hidden=12), "all-linear")  # other shapes
    shape_file = ol.save_adapter(other, tmp_path / "shape.safetensors")
    missing_file = ol.save_adapter(ol.transform(MODULES["mlp"](), "fc1"), tmp_path / "missing.safetensors")
    extra_file = ol.save_adapter(ol.transform(MODULES["mlp"](), "all"), tmp_path / "extra.safetensors")
    dtype_file = ol.save_adapter(ol.transform(MODULES["mlp"]().double(), "all-linear"), tmp_path / "dtype.safetensors")
    data = good.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) - 7])
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\xff" * 8 + data[8:])
    not_ours = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file

    save_file({"fc1.onelora_b": torch.zeros(16)}, str(not_ours))

    cases = {
        shape_file: "shape",
        missing_file: "missing from the file",
        extra_file: "not in this module",
        dtype_file: "dtype",
        truncated: "truncated or corrupt",
        corrupt: "truncated or corrupt",
        not_ours: "not an onelora_fx adapter",
    }
    for path, message in cases.items():
        with pytest.raises(ol.AdapterFileError, match=message):
            ol.load_adapter(target, path)
        assert_same_state(snap, model_state(target), str(path))
    with pytest.raises(FileNotFoundError):
        ol.load_adapter(target, tmp_path / "nope.safetensors")
    assert_same_state(snap, model_state(target))


@needs_transformers
@pytest.mark.parametrize("name", ["llama-tiny", "vit-tiny"])
def test_bfloat16_merge_rounds_once(name):
    """A bfloat16 merge folds in float32 and rounds once: every merged weight is the exact
    ``W + b 1ᵀ`` (computed here in float64) rounded to bfloat16, the best a bfloat16
    weight can hold."""
    model, args, kwargs = zoo.build(name)
    model.eval()
    model16 = copy.deepcopy(model).to(torch.bfloat16)
    kwargs16 = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in kwargs.items()}
    gm16 = quiet_transform(model16, "all-linear", example_inputs=args, example_kwargs=kwargs16)
    randomize_adapters(gm16, seed=7)
    merged16 = ol.merge(gm16).eval()
    for s in ol.sites(gm16):
        if not (s.adapted and s.call_index == 0):
            continue
        w, b = model16.get_parameter(s.weight_name).detach(), gm16.get_parameter(s.adapter_name).detach()
        delta = b.unsqueeze(-1) if s.layout is ol.Layout.OUT_IN else b.unsqueeze(-2)
        best = (w.double() + delta.double()).to(torch.bfloat16)
        assert torch.equal(merged16.get_parameter(s.weight_name), best), s.name
        assert not torch.equal(best, w), "b must change the weights"
    tol = tolerance(torch.bfloat16)
    expected = out(gm16.eval(), args, kwargs16).float()
    torch.testing.assert_close(out(merged16, args, kwargs16).float(), expected, rtol=tol["rtol"],
                               atol=tol["atol"] * max(1.0, expected.abs().max().item()))


@pytest.mark.parametrize("inplace", [False, True])
def test_float64_weights_fold_in_float64(inplace):
    """A float64 weight folds exactly as ``W + b 1ᵀ`` computed in float64 by hand (a
    float32 fold would be off by ~1e-8)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8)).double()
    gm = ol.transform(model, "all")
    randomize_adapters(gm, 3)
    expected = {f"{i}.weight": gm.get_parameter(f"{i}.weight").detach().clone() + gm.get_parameter(f"{i}.onelora_b").detach()[:, None]
                for i in (0, 2)}
    merged = ol.merge(gm, inplace=inplace)
    for name, w in expected.items():
        assert merged.get_parameter(name).dtype == torch.float64
        assert torch.equal(merged.get_parameter(name), w), name


@pytest.mark.parametrize("capture", ["auto", "module"])
def test_unmerge_gives_back_the_adapted_module_bit_for_bit(capture):
    from toolkit import randomize_norms, tiny_llama

    model = randomize_norms(tiny_llama()).eval()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    before = model_state(model)
    gm = quiet_transform(model, "all-linear", capture=capture, example_kwargs={"input_ids": ids}, train=("norm",))
    randomize_adapters(gm)
    trained = {k: v.detach().clone() for k, v in ol.adapter_parameters(gm).items()}
    merged = ol.merge(gm)
    again = ol.unmerge(merged)
    got = ol.adapter_parameters(again)
    assert got.keys() == trained.keys()
    for name, value in trained.items():
        assert torch.equal(got[name], value), name
        assert got[name] is not ol.adapter_parameters(gm)[name], "the unmerged module trains its own copy"
    for site in ol.sites(again):
        if site.adapted:
            base = model.get_parameter(site.weight_name)
            assert site.weight.data_ptr() == base.data_ptr() and torch.equal(site.weight, base), \
                "the base weight's own storage, not a re-subtraction"
    assert torch.equal(again(input_ids=ids).logits, gm(input_ids=ids).logits)
    with torch.no_grad():  # training the unmerged module leaves the merge's record alone
        next(iter(ol.adapter_parameters(again).values())).add_(1.0)
    assert torch.equal(next(iter(ol.adapter_parameters(ol.unmerge(merged)).values())), next(iter(trained.values())))
    assert_same_state(before, model_state(model))


def test_unmerge_refuses_an_in_place_merge_and_a_module_that_was_not_merged():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    gm = quiet_transform(copy.deepcopy(model), "all")
    with pytest.raises(ol.MergeError, match="not made by ol.merge"):
        ol.unmerge(gm)
    merged = ol.merge(gm, inplace=True)
    with pytest.raises(ol.MergeError, match="merged in place.*not give them back bit for bit"):
        ol.unmerge(merged)


def _safetensors_folder(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


@pytest.mark.parametrize("adapter", ["file", "peft"])
def test_merge_checkpoint_folds_a_sharded_checkpoint_as_merge_does(adapter, tmp_path):
    """Shard by shard from the files, equal bit for bit to ol.merge of the adapted model
    (folded weights and trained norms), and from_pretrained of it gives the merged logits."""
    transformers = pytest.importorskip("transformers")
    from toolkit import randomize_norms, tiny_llama

    model = randomize_norms(tiny_llama()).eval()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    model.save_pretrained(tmp_path / "base", max_shard_size="40KB")
    assert len(list((tmp_path / "base").glob("*.safetensors"))) > 2, "a sharded checkpoint"
    train = ("norm",) if adapter == "file" else ()
    gm = quiet_transform(model, "all-linear", capture="module", example_kwargs={"input_ids": ids}, train=train)
    randomize_adapters(gm)
    if adapter == "file":
        with torch.no_grad():
            gm.get_parameter("model.norm.weight").mul_(1.5)
        path = ol.save_adapter(gm, tmp_path / "adapter.safetensors")
    else:
        path = ol.save_peft(gm, tmp_path / "peft")
        gm = ol.load(model, path, capture="module", example_kwargs={"input_ids": ids})  # what PEFT's file holds
    merged = ol.merge(gm)
    out = ol.merge_checkpoint(tmp_path / "base", path, tmp_path / "merged")
    got, want = _safetensors_folder(out), merged.state_dict()
    assert got.keys() <= want.keys()
    changed = [k for k in got if not torch.equal(got[k], model.state_dict()[k])]
    assert len(changed) >= 14, "the adapted weights (and trained norm) changed"
    for key, value in got.items():
        assert torch.equal(value, want[key]), key
    back = transformers.LlamaForCausalLM.from_pretrained(out)
    torch.testing.assert_close(back(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=0, atol=0)


def test_merge_checkpoint_refuses_without_writing_anything(tmp_path):
    pytest.importorskip("transformers")
    from toolkit import tiny_llama

    model = tiny_llama(tie_word_embeddings=True)
    model.save_pretrained(tmp_path / "base")
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    gm = quiet_transform(model, "all", capture="module", example_kwargs={"input_ids": ids})  # the tied head too
    path = ol.save_adapter(gm, tmp_path / "adapter.safetensors")
    with pytest.raises(ol.AdapterFileError, match="lm_head.weight, which .* does not store.*ol.merge"):
        ol.merge_checkpoint(tmp_path / "base", path, tmp_path / "merged")
    assert not (tmp_path / "merged").exists() and not list(tmp_path.glob(".merged*"))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        ol.merge_checkpoint(tmp_path / "base", path, tmp_path / "taken")


def test_a_pt2_of_a_transformers_model_loads_where_only_torch_is_imported(tmp_path):
    """Its outputs are plain dicts (no ModelOutput pytree node recorded): a fresh process
    that imports torch alone loads and runs it; outputs='model' keeps the model's class."""
    import subprocess
    import sys

    pytest.importorskip("transformers")
    from toolkit import tiny_llama

    model = tiny_llama()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    gm = quiet_transform(model, "all-linear", example_kwargs={"input_ids": ids})
    randomize_adapters(gm)
    ol.export(gm, example_kwargs={"input_ids": ids}, path=tmp_path / "model.pt2")
    other = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(1))
    torch.save({"ids": other, "logits": gm(input_ids=other).logits.detach()}, tmp_path / "check.pt")
    script = (
        "import sys, torch\n"
        f"program = torch.export.load({str(tmp_path / 'model.pt2')!r}).module()\n"
        f"check = torch.load({str(tmp_path / 'check.pt')!r})\n"
        "out = program(input_ids=check['ids'])\n"
        "assert type(out) is dict, type(out)\n"
        "torch.testing.assert_close(out['logits'], check['logits'], rtol=1e-5, atol=1e-5)\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('transformers', 'onelora_fx')]\n"
        "print('ok')\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"})
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]
    kept = ol.export(gm, example_kwargs={"input_ids": ids}, outputs="model").module()(input_ids=other)
    assert type(kept).__name__ == "CausalLMOutputWithPast"
    with pytest.raises(ValueError, match="outputs='dict'.*'plain'.*'model'"):
        ol.export(gm, example_kwargs={"input_ids": ids}, outputs="dict")


def _onnx_run(path, inputs: dict) -> "torch.Tensor":
    """Run an ONNX file in onnxruntime; ``inputs`` flattened as torch.onnx names them."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    flat = {}
    for key, value in inputs.items():
        if isinstance(value, dict):
            flat.update({f"{key}_{k.replace('.', '_')}": v for k, v in value.items()})
        else:
            flat[key] = value
    names = [i.name for i in session.get_inputs()]
    assert set(names) == set(flat), sorted(set(names) ^ set(flat))[:4]
    return torch.from_numpy(session.run(None, {n: flat[n].numpy() for n in names})[0])


def test_onnx_serves_any_adapter_with_adapters_as_inputs_and_the_merged_model(tmp_path):
    """One ONNX file, two adapters fed as inputs in onnxruntime: each matches the eager
    adapted module (1e-5 relative) at another batch size and length; the merged model's
    file matches too."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from toolkit import randomize_norms, tiny_llama

    model = randomize_norms(tiny_llama()).eval()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    gms = []
    for seed in (1, 2):
        gm = quiet_transform(model, "all-linear", example_kwargs={"input_ids": ids})
        randomize_adapters(gm, seed)
        gms.append(gm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ol.export_onnx(gms[0], example_kwargs={"input_ids": ids}, path=tmp_path / "any.onnx", adapters="inputs")
        ol.export_onnx(gms[1], example_kwargs={"input_ids": ids}, path=tmp_path / "merged.onnx")
    other = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(1))
    for gm in gms:
        vectors = {k: v.detach() for k, v in ol.adapter_parameters(gm).items()}
        got = _onnx_run(tmp_path / "any.onnx", {"input_ids": other, "adapters": vectors})
        want = gm(input_ids=other).logits.detach()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    want = gms[1](input_ids=other).logits.detach()
    torch.testing.assert_close(_onnx_run(tmp_path / "merged.onnx", {"input_ids": other}), want, rtol=1e-5,
                               atol=1e-5 * want.abs().max().item())
    assert not torch.allclose(gms[0](input_ids=other).logits, want, atol=1e-3), "the two adapters differ"
