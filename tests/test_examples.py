"""The training examples run as written (in-process: their ``main``), and what they print
holds: adapter-sized checkpoints, an exact resume, the default form."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest
import torch

import onelora_fx as ol

pytest.importorskip("transformers")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trainer_finetune_example(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = example("trainer_finetune").main(tmp_path)
    assert isinstance(out["gm"], torch.fx.GraphModule), "the default form"
    assert out["losses"][-1] < out["losses"][0]
    names = {p.name for p in out["checkpoint"].iterdir()}
    assert "onelora_adapter.safetensors" in names and "model.safetensors" not in names
    assert (out["checkpoint"] / "onelora_adapter.safetensors").stat().st_size <= 2 * out["adapter"].stat().st_size
    assert out["gap"] == 0.0 and out["same"]


def test_sft_trl_example_trains_the_default_form_as_the_module_form(tmp_path):
    pytest.importorskip("trl")
    sft = example("sft_trl")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = sft.main(tmp_path / "graph")
        module = sft.main(tmp_path / "module", capture="module")  # TRL's default gradient checkpointing on
    assert isinstance(graph["gm"], torch.fx.GraphModule)
    assert graph["gap"] == 0.0 and module["gap"] == 0.0, "resume from the adapter checkpoint is exact"
    got, want = ol.adapter_parameters(graph["gm"]), ol.adapter_parameters(module["gm"])
    assert got.keys() == want.keys() and all(v.abs().max() > 0 for v in want.values())
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(torch.tensor(graph["losses"]), torch.tensor(module["losses"]), rtol=1e-5, atol=1e-5)
