"""Capture: fx vs export, the module-level fallback, train/eval, meta models, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import onelora_fx as ol
from reference import ILoRA, randomize_adapters


class DataDependent(nn.Module):
    """`if h.sum() > 0`: neither symbolic_trace nor torch.export can take it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0:
            h = torch.relu(self.b(h))
        else:
            h = torch.tanh(self.b(h))
        return self.head(h)


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        h = self.bn(self.conv(x)).mean((2, 3))
        return self.fc(F.dropout(h, 0.3, self.training) + self.drop(h))


def test_fallback_adapts_modules_with_a_warning():
    torch.manual_seed(0)
    model = DataDependent()
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match=r"no graph capture works for DataDependent .*data-dependent Python control flow"):
        adapted = ol.transform(model, "all", example_inputs=(x,))
    assert not isinstance(adapted, torch.fx.GraphModule)
    assert {n for n, p in adapted.named_parameters() if p.requires_grad} == {
        "a.onelora_b", "b.onelora_b", "head.onelora_b",
    }
    assert torch.equal(adapted(x), model(x))
    bs = randomize_adapters(adapted, seed=3)
    ref = DataDependent()
    ref.load_state_dict(model.state_dict())
    for name in ("a", "b", "head"):
        setattr(ref, name, ILoRA(getattr(ref, name), bs[name]))
    # both branches, whatever the weights: scaled so that W x outweighs the bias in h.sum()
    linear_part = (model.a(x) - model.a.bias).sum().item()
    inputs = [x * 100 * sign * (1 if linear_part > 0 else -1) for sign in (1, -1)]
    assert [bool(model.a(t).sum() > 0) for t in inputs] == [True, False]
    for t in inputs:
        torch.testing.assert_close(adapted(t), ref(t))
    assert not hasattr(model.a, "onelora_b") and type(model.a) is nn.Linear


def test_forced_capture_never_falls_back():
    model = DataDependent()
    with pytest.raises(ol.CaptureError, match="symbolic_trace"):
        ol.transform(model, capture="fx")
    with pytest.raises(ol.CaptureError, match="export"):
        ol.transform(model, capture="export", example_inputs=(torch.randn(2, 8),))


def test_export_needs_examples():
    with pytest.raises(ValueError, match="example_inputs"):
        ol.transform(DataDependent())


@pytest.mark.parametrize("method", ["fx", "export"])
def test_batch_norm_and_dropout_follow_the_mode(method):
    torch.manual_seed(0)
    model = ConvBN()
    x = torch.randn(6, 3, 8, 8)
    gm = ol.transform(model, "all", capture=method, example_inputs=(x,))
    model.eval()
    gm.eval()
    assert torch.equal(gm(x), model(x))
    stats = model.bn.running_mean.clone()
    gm.train()
    torch.manual_seed(1)
    y_gm = gm(x)
    # training updates the adapted module's statistics, never the model's
    assert torch.equal(model.bn.running_mean, stats)
    assert not torch.equal(gm.get_buffer("bn.running_mean"), stats)
    assert int(gm.get_buffer("bn.num_batches_tracked")) == 1
    model.train()
    torch.manual_seed(1)
    y_model = model(x)
    torch.testing.assert_close(y_gm, y_model)  # same dropout masks, batch statistics
    torch.testing.assert_close(gm.get_buffer("bn.running_mean"), model.bn.running_mean)
    gm.eval()
    gm(x)
    assert int(gm.get_buffer("bn.num_batches_tracked")) == 1, "eval must not count batches"


def test_a_train_only_python_branch_runs_in_training_and_not_in_eval(caplog):
    class LabelDrop(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            if self.training:
                x = x * (torch.rand_like(x) > 0.5)
            return self.fc(x)

    model = LabelDrop()
    with caplog.at_level("INFO", logger="onelora_fx"):
        gm = ol.transform(model, "all")
    assert any("different ops in training than in eval" in r.getMessage() for r in caplog.records)
    x = torch.randn(3, 4)
    model.eval(), gm.eval()
    assert torch.equal(gm(x), model(x))
    model.train(), gm.train()
    torch.manual_seed(0)
    y_gm = gm(x)
    torch.manual_seed(0)
    assert torch.equal(y_gm, model(x)), "training runs the model's training branch"
    assert not torch.equal(y_gm, gm.eval()(x))


def test_dynamic_false_pins_shapes_and_captures_other_shapes_on_first_use(caplog):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(3, 4)
    gm = ol.transform(model, "all", capture="export", example_inputs=(x,), dynamic=False)
    assert torch.equal(gm(x), model(x))
    size = next(n for n in gm.graph.nodes if n.op == "placeholder").meta["val"].shape[0]
    assert isinstance(size, int) and size == 3, "dynamic=False: the graph is specialized to the example"
    x5 = torch.randn(5, 4)
    with caplog.at_level("INFO", logger="onelora_fx.forms.graph.module"):
        assert torch.equal(gm(x5), model(x5))
    assert any("capturing a graph for a new call (input=Tensor[5, 4])" in r.message for r in caplog.records)
    gm = ol.transform(model, "all", capture="export", example_inputs=(x,))
    with caplog.at_level("INFO", logger="onelora_fx.forms.graph.module"):
        caplog.clear()
        assert torch.equal(gm(x5), model(x5))
    assert not caplog.records, "dynamic=True: one graph serves every batch size"


_META_7B = """
import json, resource, sys, time, warnings
import torch, transformers
import onelora_fx as ol
cfg = transformers.LlamaConfig(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                               num_key_value_heads=32, vocab_size=32000, use_cache=False)
with torch.device("meta"):
    model = transformers.LlamaForCausalLM(cfg)
ids = torch.zeros(2, 16, dtype=torch.long, device="meta")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    gm = ol.transform(model, example_kwargs={"input_ids": ids})
took = time.perf_counter() - start
# ru_maxrss is in KiB on Linux, in bytes on macOS
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / (1024 ** 2 if sys.platform == "darwin" else 1024)
print(json.dumps({"seconds": took, "grown_mb": grown, "adapted": sum(s.adapted for s in ol.sites(gm)),
                  "meta": all(p.device.type == "meta" for p in gm.parameters())}))
"""


@pytest.mark.slow
def test_meta_llama_7b_dimensions():
    """A 7B-dimension LLaMA on meta is adapted without allocating its 27 GB of weights.

    Measured in a fresh process: its peak RSS before the transform is what imports and
    building the meta model cost, so the growth is the transform's own.
    """
    pytest.importorskip("transformers")
    import json
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _META_7B], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"\nmeta LLaMA 7B dims: transform took {result['seconds']:.1f}s, peak RSS grew "
          f"{result['grown_mb']:.0f} MB, {result['adapted']} sites adapted")
    assert result["adapted"] == 32 * 7 and result["meta"]
    assert result["grown_mb"] < 1024, "a 7B model's weights are 27 GB: none may be allocated"
