"""1LoRA adapters in the PEFT LoRA format: PEFT loads what save_peft writes, and
load_peft reads it back, and PEFT's MiSS r=1 (the same update)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

import onelora_fx as ol
from reference import randomize_adapters, tolerance
from toolkit import assert_close, quiet_transform

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from onelora_fx.tools import zoo  # noqa: E402

TOL = tolerance(torch.float32)


def adapted(name, train=()):
    model, _, kwargs = zoo.build(name)
    model.eval()
    gm = quiet_transform(model, "all-linear", example_kwargs=kwargs, train=train).eval()
    randomize_adapters(gm, 3, scale=0.2)
    return model, gm, kwargs


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny"])
def test_peft_loads_what_save_peft_writes(name, tmp_path):
    model, gm, kwargs = adapted(name)
    expected = gm(**kwargs).logits
    ol.save_peft(gm, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 1 and config["lora_alpha"] == 1
    assert config["fan_in_fan_out"] == (name == "gpt2-tiny")  # Conv1D stores [in, out]
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path)).eval()
    assert_close(peft_model(**kwargs).logits, expected, torch.float32)
    assert not torch.allclose(model(**kwargs).logits, expected, atol=1e-3), "the adapter must matter"
    fresh = adapted(name)[1]
    ol.load_peft(fresh, tmp_path)
    for k, v in ol.adapter_parameters(fresh).items():
        torch.testing.assert_close(v, ol.adapter_parameters(gm)[k])


def test_trained_biases_travel_as_peft_bias_all(tmp_path):
    """GPT-2's Conv1D layers have biases: trained with the vectors (BitFit + 1LoRA), they
    are saved as PEFT's bias="all" saves them and PEFT computes what onelora_fx does."""
    model, gm, kwargs = adapted("gpt2-tiny", train=("bias",))
    trained = [n for n in ol.adapter_parameters(gm) if n.endswith(".bias")]
    assert trained, "gpt2-tiny has biases"
    with torch.no_grad():
        for n in trained:
            gm.get_parameter(n).add_(0.05)
    expected = gm(**kwargs).logits
    ol.save_peft(gm, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["bias"] == "all"
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path)).eval()
    assert_close(peft_model(**kwargs).logits, expected, torch.float32)
    fresh = adapted("gpt2-tiny", train=("bias",))[1]
    ol.load_peft(fresh, tmp_path)
    for k, v in ol.adapter_parameters(fresh).items():
        torch.testing.assert_close(v, ol.adapter_parameters(gm)[k])


def test_trained_norms_travel_as_peft_modules_to_save(tmp_path):
    model, gm, kwargs = adapted("llama-tiny", train=("norm",))
    with torch.no_grad():
        gm.get_parameter("model.norm.weight").mul_(1.5)
    expected = gm(**kwargs).logits
    ol.save_peft(gm, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"][0] == "model.layers.0.input_layernorm"
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path)).eval()
    assert_close(peft_model(**kwargs).logits, expected, torch.float32)


def test_sites_peft_cannot_express_are_an_error_or_a_warning(tmp_path):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.router = torch.nn.Parameter(torch.randn(4, 8))
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(torch.relu(F.linear(x, self.router)))

    gm = ol.transform(Net(), "all")
    with pytest.raises(ol.AdapterFileError, match=r"not such layers: router"):
        ol.save_peft(gm, tmp_path / "a")
    assert not (tmp_path / "a").exists(), "nothing written on an error"
    with pytest.warns(UserWarning, match="left out 1 sites PEFT cannot express: router"):
        ol.save_peft(gm, tmp_path / "b", skip_unsupported=True)
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["target_modules"] == ["fc"]


def test_a_trained_miss_r1_adapter_loads_and_reproduces_peft(tmp_path):
    model, _, kwargs = zoo.build("llama-tiny")
    model.eval()
    targets = ["q_proj", "v_proj", "down_proj"]
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft.MissConfig(r=1, target_modules=targets))
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    ids = kwargs["input_ids"]
    for _ in range(3):
        logits = peft_model(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    peft_model.eval()
    peft_model.save_pretrained(tmp_path)
    expected = peft_model(**kwargs).logits
    assert not torch.allclose(expected, model(**kwargs).logits, atol=1e-4), "MiSS must have trained"
    gm = quiet_transform(model, [f"*.{t}" for t in targets], example_kwargs=kwargs).eval()
    ol.load_peft(gm, tmp_path)
    assert_close(gm(**kwargs).logits, expected, torch.float32)


def test_a_rank_2_lora_is_refused_and_nothing_changes(tmp_path):
    model, gm, kwargs = adapted("llama-tiny")
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path)
    before = {k: v.clone() for k, v in ol.adapter_parameters(gm).items()}
    with pytest.raises(ol.AdapterFileError, match=r"LoRA of rank 2.*1LoRA is the rank-1 update"):
        ol.load_peft(gm, tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in ol.adapter_parameters(gm).items())
    vera = tmp_path / "vera"
    peft.get_peft_model(copy.deepcopy(model), peft.VeraConfig(r=4, target_modules=["q_proj"])).save_pretrained(vera)
    with pytest.raises(ol.AdapterFileError, match=r"PEFT VERA adapter"):
        ol.load_peft(gm, vera)
