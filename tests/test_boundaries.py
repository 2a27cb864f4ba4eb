"""Every input understood or refused: adapter ids, PEFT files, float16 overflow, merging a
weight read elsewhere, folds that overflow, and the user's own model left as it was.
A silent wrong answer is worse than any error: each test here checks for one."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import onelora_fx as ol
from reference import randomize_adapters
from toolkit import assert_close, assert_same_state, ids, model_state, quiet_transform, tiny_llama

transformers = pytest.importorskip("transformers")

BATCH = 8
TOKENS = ids(BATCH, 6, seed=3)


@pytest.fixture(scope="module")
def stacks(tmp_path_factory):
    """A LLaMA, two single adapters, and their stack in both forms (K = 2)."""
    model = tiny_llama()
    singles, files = [], []
    for seed in range(2):
        gm = quiet_transform(model, "all-linear", example_kwargs={"input_ids": TOKENS}).eval()
        randomize_adapters(gm, seed + 1)
        singles.append(gm)
        files.append(ol.save_adapter(gm, tmp_path_factory.mktemp("a") / f"{seed}.safetensors"))
    module_form = quiet_transform(model, "all-linear", example_kwargs={"input_ids": TOKENS}, capture="module").eval()
    return model, singles, {"graph": ol.stack(singles[0], files), "module": ol.stack(module_form, files).eval()}


def expected_rows(model, singles, adapter_ids):
    rows = [(singles[k] if k >= 0 else model)(input_ids=TOKENS[i:i + 1]).logits for i, k in enumerate(adapter_ids.tolist())]
    return torch.cat(rows)


@pytest.mark.parametrize("form", ["graph", "module"])
@pytest.mark.parametrize("count", [4, 1, 16, 3])
def test_adapter_ids_of_the_wrong_length_are_refused(stacks, form, count):
    _, _, multi = stacks
    with pytest.raises(ValueError, match=rf"adapter_ids has {count} entries but the batch has {BATCH} items"):
        multi[form](input_ids=TOKENS, adapter_ids=torch.zeros(count, dtype=torch.long))


@pytest.mark.parametrize("form", ["graph", "module"])
def test_adapter_ids_bad_values_types_and_a_non_stack(stacks, form):
    model, singles, multi = stacks
    with pytest.raises(ValueError, match=r"must be in \[-1, 1\]"):
        multi[form](input_ids=TOKENS, adapter_ids=torch.full((BATCH,), 2))
    with pytest.raises(ValueError, match=r"must be in \[-1, 1\]"):
        multi[form](input_ids=TOKENS, adapter_ids=torch.full((BATCH,), -2))
    with pytest.raises(TypeError, match="1-D integer tensor"):
        multi[form](input_ids=TOKENS, adapter_ids=torch.zeros(BATCH))
    short = torch.tensor([1, -1, 0, 0, 1, -1, 1, 0], dtype=torch.int16)  # any integer dtype
    assert_close(multi[form](input_ids=TOKENS, adapter_ids=short).logits, expected_rows(model, singles, short.long()),
                 torch.float32)
    with pytest.raises(ValueError, match="adapter_ids picks each batch item's adapter in a stack"):
        singles[0](input_ids=TOKENS, adapter_ids=torch.zeros(BATCH, dtype=torch.long))


def test_unstack_takes_an_adapter_index(stacks, tmp_path):
    _, _, multi = stacks
    for bad in (-1, 2, 1.0, True):
        with pytest.raises(ValueError, match=r"index of one of the 2 adapters of the stack, 0\.\.1"):
            ol.unstack(multi["graph"], bad, tmp_path / "x.safetensors")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(length=st.sampled_from([BATCH, BATCH, BATCH, 1, 3, 16]), dtype=st.sampled_from([torch.int64, torch.int32, torch.int16,
                                                                                      torch.uint8, torch.float32]),
       values=st.lists(st.integers(-3, 3), min_size=16, max_size=16), form=st.sampled_from(["graph", "module"]))
def test_random_adapter_ids_give_each_rows_adapter_or_a_clear_error(stacks, length, dtype, values, form):
    """Never anything else: either every row is its own adapter's output, or an error
    that says what adapter_ids must be."""
    model, singles, multi = stacks
    given_ids = torch.tensor(values[:length]).to(dtype)
    try:
        out = multi[form](input_ids=TOKENS, adapter_ids=given_ids).logits
    except (ValueError, TypeError) as e:
        assert "adapter_ids" in str(e)
        ok = length == BATCH and not dtype.is_floating_point and all(-1 <= v <= 1 for v in given_ids.tolist())
        assert not ok, f"refused a valid call: {e}"
        return
    assert length == BATCH and not dtype.is_floating_point
    assert_close(out, expected_rows(model, singles, given_ids.long()), torch.float32)


def test_compiled_and_exported_stacks_check_adapter_ids(stacks, tmp_path):
    model, singles, multi = stacks
    good = torch.tensor([0, 1, -1, 0, 1, 1, -1, 0])
    compiled = torch.compile(multi["graph"], backend="onelora", dynamic=True)
    assert_close(compiled(input_ids=TOKENS, adapter_ids=good).logits, expected_rows(model, singles, good), torch.float32)
    program = ol.export(multi["graph"], example_kwargs={"input_ids": TOKENS, "adapter_ids": good}).module()
    assert_close(program(input_ids=TOKENS, adapter_ids=good)["logits"], expected_rows(model, singles, good), torch.float32)
    for run in (compiled, program):
        for bad in (torch.full((BATCH,), -2), torch.full((BATCH,), 2)):
            with pytest.raises(RuntimeError, match=r"adapter_ids must be in \[-1, 1\]"):
                run(input_ids=TOKENS, adapter_ids=bad)
        with pytest.raises(Exception, match="adapter_ids|batch|ids|size|shape"):  # torch's own shape check
            run(input_ids=TOKENS, adapter_ids=good[:4])
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------- PEFT files


def saved_peft(tmp_path: Path):
    """A 1LoRA adapter saved in the PEFT format, and a fresh module to load it into."""
    model = tiny_llama()
    gm = quiet_transform(model, "all-linear", example_kwargs={"input_ids": TOKENS})
    randomize_adapters(gm, 5)
    ol.save_peft(gm, tmp_path / "peft")
    target = quiet_transform(model, "all-linear", example_kwargs={"input_ids": TOKENS})
    return tmp_path / "peft", target, gm


@pytest.fixture
def peft_dir(tmp_path):
    return saved_peft(tmp_path)


def test_save_peft_names_its_task(peft_dir):
    config = json.loads((peft_dir[0] / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM"


@pytest.mark.parametrize("field,value", [("lora_bias", True), ("use_dora", True), ("rank_pattern", {"q_proj": 2}),
                                         ("alpha_pattern", {"q_proj": 4}), ("trainable_token_indices", [1, 2]),
                                         ("target_parameters", ["mlp.experts.gate_up_proj"])])
def test_config_fields_that_change_the_math_are_refused(peft_dir, field, value):
    directory, target, _ = peft_dir
    config = json.loads((directory / "adapter_config.json").read_text())
    config[field] = value
    (directory / "adapter_config.json").write_text(json.dumps(config))
    snap = model_state(target)
    with pytest.raises(ol.AdapterFileError, match=field):
        ol.load_peft(target, directory)
    assert_same_state(snap, model_state(target))


def test_a_tensor_it_does_not_understand_is_refused(peft_dir):
    """A lora_B bias, or LoRA on an embedding: tensors 1LoRA has no place for."""
    from safetensors.torch import load_file, save_file

    directory, target, _ = peft_dir
    tensors = load_file(str(directory / "adapter_model.safetensors"))
    for extra in ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias",
                  "base_model.model.model.embed_tokens.lora_embedding_A"):
        more = {**tensors, extra: torch.zeros(4)}
        save_file(more, str(directory / "adapter_model.safetensors"))
        snap = model_state(target)
        with pytest.raises(ol.AdapterFileError, match=extra.replace(".", r"\.")):
            ol.load_peft(target, directory)
        assert_same_state(snap, model_state(target))


def test_unreadable_peft_files_are_adapter_file_errors(peft_dir):
    directory, target, _ = peft_dir
    weights = directory / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ol.AdapterFileError, match="adapter_model.safetensors.*truncated or corrupt"):
        ol.load_peft(target, directory)
    weights.write_bytes(data)
    (directory / "adapter_config.json").write_text("{not json")
    with pytest.raises(ol.AdapterFileError, match="adapter_config.json is not readable JSON"):
        ol.load_peft(target, directory)


#: in which format each corruption must be refused (AdapterFileError); elsewhere it loads.
#: The PEFT config fields exist only in the PEFT format (in a 1LoRA file those cases change
#: nothing); a PEFT file in another float dtype loads cast, as PEFT loads it, while a 1LoRA
#: file records its dtypes and a different one is refused
REFUSED = {"truncate": "both", "drop": "both", "rename": "both", "shape": "both", "dtype": "1lora", "extra": "both",
           "config-r": "peft", "config-type": "peft", "config-alpha": "neither", "none": "neither"}


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    """:func:`saved_peft` once for the module (the corruption test copies the files)."""
    return saved_peft(tmp_path_factory.mktemp("saved"))


@pytest.mark.parametrize("peft", [False, True], ids=["1lora", "peft"])
@pytest.mark.parametrize("what", sorted(REFUSED))
@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, 10_000))
def test_random_corruptions_load_exactly_or_refuse_with_nothing_changed(saved_adapter, tmp_path_factory, what, which, peft):
    """Each corruption has one right outcome: a refusal that leaves every vector as it
    was, or the trained adapter exactly (a float64 copy of a float32 vector is the same
    numbers; a PEFT ``lora_alpha`` of 2 scales b by 2, as PEFT would)."""
    from safetensors.torch import load_file, save_file

    source, target, trained = saved_adapter
    work = tmp_path_factory.mktemp("corrupt")
    if peft:
        shutil.copytree(source, work / "peft")
        path, weights = work / "peft", work / "peft" / "adapter_model.safetensors"
        config_path = path / "adapter_config.json"
    else:
        path = weights = ol.save_adapter(trained, work / "a.safetensors")
        config_path = None
    tensors = load_file(str(weights))
    keys = sorted(tensors)
    key = keys[which % len(keys)]
    metadata = None if peft else _metadata(weights)
    if what == "truncate":
        data = weights.read_bytes()
        weights.write_bytes(data[: (which % (len(data) - 1)) + 1])
    elif what in ("drop", "rename", "shape", "dtype", "extra"):
        value = tensors.pop(key)
        if what == "rename":
            tensors[key + "_renamed"] = value
        elif what == "shape":
            tensors[key] = torch.cat([value.flatten(), value.flatten()[:1]])
        elif what == "dtype":
            tensors[key] = value.double()
        elif what == "extra":
            tensors[key] = value
            tensors["base_model.model.surprise.weight"] = torch.zeros(3)
        save_file(tensors, str(weights), metadata=metadata)
    elif what.startswith("config") and config_path is not None:
        config = json.loads(config_path.read_text())
        config.update({"config-r": {"r": 2}, "config-type": {"peft_type": "VERA"}, "config-alpha": {"lora_alpha": 2}}[what])
        config_path.write_text(json.dumps(config))
    with torch.no_grad():  # every vector set to a known value that the trained adapter does not hold
        for p in ol.adapter_parameters(target).values():
            p.fill_(float("nan"))
    snap = model_state(target)
    load = ol.load_peft if peft else ol.load_adapter
    if REFUSED[what] in ("both", "peft" if peft else "1lora"):
        with pytest.raises(ol.AdapterFileError):
            load(target, path)
        assert_same_state(snap, model_state(target), "the module a refused file was loaded into")
        return
    load(target, path)
    scale = 2.0 if what == "config-alpha" and peft else 1.0
    for name, p in ol.adapter_parameters(target).items():
        assert_close(p, trained.get_parameter(name).detach() * scale, torch.float32, name)


def _metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


# ---------------------------------------------------------------------------------- numerics


def _sum_overflow_model():
    torch.manual_seed(0)
    lin = nn.Linear(128, 4)
    return nn.Sequential(lin), torch.full((2, 3, 128), 600.0)


@pytest.mark.parametrize("capture", ["fx", "module", "compiled"])
def test_float16_row_sums_past_its_range_leave_b_zero_exact(capture):
    """128 features of 600 sum to 76800 > 65504: in float16 the 1LoRA term would be inf
    (NaN with b = 0). Computed in float32 and added once, b = 0 is the base layer."""
    model, x = _sum_overflow_model()
    gm = quiet_transform(model, "all", capture="module" if capture == "module" else "fx")
    run = torch.compile(gm, backend="onelora") if capture == "compiled" else gm
    with torch.autocast("cpu", dtype=torch.float16):
        base, out = model(x), run(x)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert torch.equal(out, base)
    with torch.no_grad():
        ol.adapter_parameters(gm)["0.onelora_b"].fill_(1e-3)  # 76800 * 1e-3 = 76.8: in range
    with torch.autocast("cpu", dtype=torch.float16):
        out = run(x)
    assert torch.isfinite(out).all()
    assert_close(out.float(), base.float() + 76.8, torch.float16)
    torch._dynamo.reset()


def test_folds_that_overflow_and_weights_that_are_not_floats_are_merge_errors():
    model = nn.Sequential(nn.Linear(4, 4))
    with torch.no_grad():
        model[0].weight.fill_(3e38)
    gm = quiet_transform(model, "all", capture="fx")
    with torch.no_grad():
        ol.adapter_parameters(gm)["0.onelora_b"].fill_(3e38)
    with pytest.raises(ol.MergeError, match="overflows torch.float32"):
        ol.merge(gm)
    from onelora_fx.fold import check

    assert "not a floating tensor" in check(torch.ones(2, 2, dtype=torch.int8), torch.zeros(2), ol.Layout.OUT_IN, "w")


@pytest.mark.parametrize("capture", ["fx", "module", "export"])
def test_a_functional_tied_head_is_refused_by_merge(capture):
    """``F.linear(h, self.embed.weight)`` with the embedding reading the same weight under
    one name: folding b would change the embedding too."""

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(16, 8)
            self.mid = nn.Linear(8, 8)

        def forward(self, ids):
            return F.linear(self.mid(self.embed(ids)), self.embed.weight)

    torch.manual_seed(0)
    model = Tied()
    example = (torch.randint(0, 16, (2, 5)),)
    gm = quiet_transform(model, "all", example_inputs=example, capture=capture)
    randomize_adapters(gm, 2)
    with pytest.raises(ol.MergeError, match="(?i)embed.weight is read by the adapted linear .* and by embedding"):
        ol.merge(gm)
    assert "embed.onelora_b" in dict(gm.named_parameters()), "nothing changed"
    merged = ol.merge(quiet_transform(model, "all-linear", example_inputs=example, capture=capture))  # the head left out
    assert torch.equal(merged(*example), model(*example))


@pytest.mark.parametrize("capture", ["auto", "module"])
def test_the_users_model_keeps_its_parameters(capture):
    """The adapted module shares storage, never Parameter objects: freezing, moving or
    re-enabling gradients on it leaves the model as it was."""
    model = tiny_llama()
    gm = quiet_transform(model, "all-linear", example_kwargs={"input_ids": TOKENS}, capture=capture)
    assert all(p.requires_grad for p in model.parameters())
    mine = dict(gm.named_parameters())
    for name, p in model.named_parameters():
        if name in mine:
            assert mine[name] is not p and mine[name].data_ptr() == p.data_ptr(), name
    gm.to(torch.float64)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(p.dtype == torch.float64 for p in gm.parameters())


# ---------------------------------------------------------------------------------- obscure errors


def test_export_refuses_a_path_where_the_example_inputs_go(tmp_path):
    gm = quiet_transform(nn.Sequential(nn.Linear(4, 4)), "all", capture="fx")
    with pytest.raises(TypeError, match=r"second argument is example_inputs .* path="):
        ol.export(gm, str(tmp_path / "model.pt2"))


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "onelora_fx", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.mark.slow
def test_cli_mistakes_are_one_line_and_exit_two(tmp_path):
    (tmp_path / "needs_args.py").write_text("import torch\ndef build(width):\n    return torch.nn.Linear(width, 2)\n")
    r = _cli("inspect", "needs_args:build", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "must be callable without arguments" in r.stderr, r.stderr
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = _cli("demo", "--quick", "--out", str(blocker / "sub"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "cannot write there" in r.stderr, r.stderr
