"""torch.compile(backend="onelora"): numerics, counters, full graphs, dynamic shapes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

import onelora_fx as ol
from handwritten import MLP
from onelora_fx.tools import zoo
from reference import ILoRA, randomize_adapters, tolerance
from toolkit import quiet_transform

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def check_compiled(module, run, backend="onelora", **compile_kwargs):
    """Compiled forward and gradients equal eager ones (float32 tolerance)."""
    tol = tolerance(torch.float32)
    eager_out = run(module)
    eager_out.float().square().mean().backward()
    eager_grads = grads(module)
    module.zero_grad(set_to_none=True)
    compiled = torch.compile(module, backend=backend, **compile_kwargs)
    out = run(compiled)
    out.float().square().mean().backward()
    scale = max(1.0, eager_out.abs().max().item())
    torch.testing.assert_close(out, eager_out, rtol=tol["rtol"], atol=tol["atol"] * scale)
    got = grads(module)
    assert got.keys() == eager_grads.keys() and got
    for name in got:
        g_scale = max(1.0, eager_grads[name].abs().max().item())
        torch.testing.assert_close(got[name], eager_grads[name], rtol=tol["rtol"], atol=tol["atol"] * g_scale)
    return compiled


def test_handwritten_listing1_is_recognised():
    torch.manual_seed(0)
    model = MLP()
    for p in model.parameters():
        p.requires_grad_(False)
    model.fc1 = ILoRA(model.fc1, torch.randn(16) * 0.1)
    model.fc2 = ILoRA(model.fc2, torch.randn(16) * 0.1)
    x = torch.randn(5, 8)
    check_compiled(model, lambda m: m(x), fullgraph=True)
    assert counters["onelora"]["listing1"] == 2 and counters["onelora"]["lowered"] == 0


@pytest.mark.parametrize("backend", ["onelora", "inductor"])
def test_transformed_mlp(backend):
    """Under torch.compile an adapted call is Listing 1 in plain ops, which any backend
    fuses; the onelora backend finds each one and has no custom op left to lower."""
    torch.manual_seed(0)
    gm = ol.transform(MLP(), "all")
    randomize_adapters(gm, 1)
    x = torch.randn(3, 4, 8, requires_grad=True)
    check_compiled(gm, lambda m: m(x), backend=backend, fullgraph=True)
    adapted = sum(s.adapted for s in ol.sites(gm))
    if backend == "onelora":
        assert counters["onelora"]["listing1"] == adapted == 3 and counters["onelora"]["lowered"] == 0
    assert x.grad is not None


def test_the_custom_op_of_an_exported_adapted_module_is_lowered():
    """torch.export of an adapted (unmerged) module records the custom op; compiling that
    program's module with the onelora backend lowers each one to Listing 1."""
    torch.manual_seed(0)
    gm = ol.transform(MLP(), "all")
    randomize_adapters(gm, 3)
    x = torch.randn(3, 4, 8)
    program = torch.export.export(gm.eval(), (x,), strict=False)
    ops_in_program = [n for n in program.graph.nodes if n.op == "call_function" and "onelora" in str(n.target)]
    assert len(ops_in_program) == 3, [n.format_node() for n in program.graph.nodes]
    eager = gm(x)
    compiled = torch.compile(program.module(), backend="onelora")
    tol = tolerance(torch.float32)
    torch.testing.assert_close(compiled(x), eager, rtol=tol["rtol"], atol=tol["atol"])
    assert counters["onelora"]["lowered"] == 3 and counters["onelora"]["listing1"] == 3


def test_llama_full_graph_dynamic_lengths_no_recompile():
    model, _, kwargs = zoo.build("llama-tiny")
    gm = quiet_transform(model, "all-linear", example_kwargs=kwargs)
    randomize_adapters(gm, 2)
    gm.train()
    ids = kwargs["input_ids"]
    compiled = check_compiled(gm, lambda m: m(input_ids=ids).logits, fullgraph=True, dynamic=True)
    assert counters["onelora"]["listing1"] == sum(s.adapted for s in ol.sites(gm)) == 14
    assert counters["onelora"]["graphs"] == 1
    for seq in (5, 13):  # same grad mode as the first call: only the length changes
        other = torch.randint(0, 100, (2, seq))
        expected = gm(input_ids=other).logits.detach()
        torch.testing.assert_close(compiled(input_ids=other).logits.detach(), expected, rtol=1e-5, atol=1e-5)
    assert counters["onelora"]["graphs"] == 1, "another sequence length recompiled"


def test_backend_found_through_the_entry_point_without_import():
    code = (
        "import sys, torch\n"
        "m = torch.nn.Linear(4, 3)\n"
        "y = torch.compile(m, backend='onelora')(torch.randn(2, 4))\n"
        "assert y.shape == (2, 3)\n"
        "print('loaded onelora_fx:', 'onelora_fx' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/", timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "loaded onelora_fx: True" in r.stdout
