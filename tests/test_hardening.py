"""Isolation from the user's model, and errors that name the user's input."""

from __future__ import annotations

import io
import warnings

import pytest
import torch

import onelora_fx as ol
from handwritten import MLP
from reference import linear_layers, listing1_copy, randomize_adapters

FORMS = ["fx", "export", "module"]


def _adapt(model, capture):
    x = torch.randn(3, 8)
    return ol.transform(model, "all", capture=capture, example_inputs=(x,)), x


@pytest.mark.parametrize("capture", FORMS)
def test_hooks_on_one_side_never_fire_on_the_other(capture):
    model = MLP()
    gm, x = _adapt(model, capture)
    fired = []
    gm.get_submodule("fc1").register_forward_hook(lambda *a: fired.append("adapted"))
    gm.get_submodule("fc1").register_forward_pre_hook(lambda *a: fired.append("adapted-pre"))
    model.fc1.register_forward_hook(lambda *a: fired.append("model"))
    model(x)
    assert fired == ["model"], "a hook registered on the adapted module fired on the model"
    fired.clear()
    gm(x)
    assert "model" not in fired, "a hook registered on the model fired on the adapted module"
    if capture == "module":  # the module form runs its layers: its own hooks fire
        assert fired == ["adapted-pre", "adapted"]

    merged = ol.merge(gm)
    merged.get_submodule("fc2").register_forward_hook(lambda *a: fired.append("merged"))
    fired.clear()
    gm(x)
    model(x)
    assert "merged" not in fired, "a hook registered on merge's result fired on its input"

    calls = []
    gm.get_submodule("fc2").register_state_dict_pre_hook(lambda *a, **k: calls.append("adapted"))
    model.state_dict()
    assert calls == []
    gm.state_dict()
    assert calls == ["adapted"]


@pytest.mark.parametrize("capture", FORMS)
def test_the_adapted_module_owns_its_tree_and_shares_the_tensors(capture):
    model = MLP()
    gm, x = _adapt(model, capture)
    assert gm.get_submodule("fc1") is not model.fc1
    mine = gm.get_submodule("fc1").weight
    assert mine is not model.fc1.weight and mine.data_ptr() == model.fc1.weight.data_ptr()  # storage, not the object
    assert not mine.requires_grad and model.fc1.weight.requires_grad
    assert not hasattr(model.fc1, "onelora_b") and type(model.fc1) is torch.nn.Linear


def test_save_adapter_errors_name_the_users_path(tmp_path):
    gm, _ = _adapt(MLP(), "fx")
    missing = tmp_path / "no" / "such" / "dir" / "a.safetensors"
    with pytest.raises(ol.AdapterFileError, match=r"no/such/dir.*does not exist"):
        ol.save_adapter(gm, missing)
    with pytest.raises(ol.AdapterFileError, match=rf"{tmp_path}.*is a directory"):
        ol.save_adapter(gm, tmp_path)
    a_file = tmp_path / "plain.txt"
    a_file.write_text("x")
    with pytest.raises(ol.AdapterFileError, match=r"plain.txt/a.safetensors.*does not exist"):
        ol.save_adapter(gm, a_file / "a.safetensors")
    with pytest.raises(ol.AdapterFileError, match=r"/proc/a.safetensors"):
        ol.save_adapter(gm, "/proc/a.safetensors")  # read-only even for root
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.txt"], "no temporary file left behind"


def test_load_adapter_refuses_non_finite_values(tmp_path):
    gm, x = _adapt(MLP(), "fx")
    randomize_adapters(gm, 1)
    with torch.no_grad():
        gm.fc2.onelora_b[2] = float("nan")
    path = ol.save_adapter(gm, tmp_path / "nan.safetensors")
    target, _ = _adapt(MLP(), "fx")
    randomize_adapters(target, 2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ol.AdapterFileError, match=r"non-finite values.*fc2\.onelora_b"):
        ol.load_adapter(target, path)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


def test_a_bad_capture_name_lists_the_choices():
    with pytest.raises(ValueError, match=r"capture='jit' is not one of 'auto', 'fx', 'export', 'module'"):
        ol.transform(MLP(), capture="jit")
    with pytest.raises(ValueError, match=r"capture='jit' is not one of"):
        ol.sites(MLP(), capture="jit")


def test_a_batch_of_one_example_warns_and_other_batches_work():
    pytest.importorskip("transformers")
    from onelora_fx.tools import zoo

    model, _, _ = zoo.llama()
    model.eval()
    ids = torch.randint(0, 100, (1, 8))
    with pytest.warns(UserWarning, match=r"size 1 at input_ids dim 0.*captures a new graph"):
        gm = ol.transform(model, example_kwargs={"input_ids": ids})
    gm.eval()
    reference = listing1_copy(model, randomize_adapters(gm, 3), linear_layers(model)).eval()
    for batch in (2, 1, 3):
        other = torch.randint(0, 100, (batch, 8))
        expected = reference(input_ids=other).logits
        torch.testing.assert_close(gm(input_ids=other).logits, expected, rtol=1e-5, atol=1e-5)


def test_torch_save_of_an_export_capture_says_what_to_save_instead():
    gm, x = _adapt(MLP(), "export")
    with pytest.raises(TypeError, match=r"save gm.state_dict\(\) or the adapter \(ol.save_adapter\)"):
        torch.save(gm, io.BytesIO())
    fx_gm, _ = _adapt(MLP(), "fx")
    randomize_adapters(fx_gm, 4)
    buffer = io.BytesIO()
    torch.save(fx_gm, buffer)  # symbolic_trace graphs pickle as code
    buffer.seek(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(loaded(x), fx_gm(x))
