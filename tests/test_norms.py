"""Where 1LoRA's term vanishes: sites that read a LayerNorm output with a uniform scale
are flagged from the graph and the parameter values, without running the model."""

from __future__ import annotations

import warnings

import pytest
import torch

import onelora_fx as ol

transformers = pytest.importorskip("transformers")
from onelora_fx.tools import zoo  # noqa: E402

VIT = {f"vit.layers.{i}.{p}": f"vit.layers.{i}.{n}" for i in range(2)
       for p, n in [("attention.q_proj", "layernorm_before"), ("attention.k_proj", "layernorm_before"),
                    ("attention.v_proj", "layernorm_before"), ("mlp.fc1", "layernorm_after")]} | {"classifier": "vit.layernorm"}
BERT = {"encoder.layer.0.attention.self.query": "embeddings.LayerNorm", "encoder.layer.0.attention.self.key": "embeddings.LayerNorm",
        "encoder.layer.0.attention.self.value": "embeddings.LayerNorm",
        "encoder.layer.0.intermediate.dense": "encoder.layer.0.attention.output.LayerNorm",
        "encoder.layer.1.attention.self.query": "encoder.layer.0.output.LayerNorm",
        "encoder.layer.1.attention.self.key": "encoder.layer.0.output.LayerNorm",
        "encoder.layer.1.attention.self.value": "encoder.layer.0.output.LayerNorm",
        "encoder.layer.1.intermediate.dense": "encoder.layer.1.attention.output.LayerNorm",
        "pooler.dense": "encoder.layer.1.output.LayerNorm"}


def transform(name, **kw):
    model, args, kwargs = zoo.build(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = ol.transform(model, "all", example_inputs=args, example_kwargs=kwargs, **kw)
    return model, gm, [str(w.message) for w in caught if "LayerNorm output" in str(w.message)]


@pytest.mark.parametrize("name, expected", [("vit-tiny", VIT), ("bert-tiny", BERT)])
def test_sites_fed_by_a_uniform_layernorm_are_flagged_and_counted(name, expected):
    model, gm, warned = transform(name)
    found = ol.sites(gm)
    assert {s.name: s.norm for s in found if s.norm} == expected
    assert all(s.norm_scale_cv == 0.0 for s in found if s.norm)  # random init: gamma = 1
    assert len(warned) == 1 and f"{len(expected)} of {len(found)} selected sites" in warned[0]
    assert "train=('norm',)" in warned[0]
    assert "LayerNorm (γ cv 0.000)" in ol.summary(gm)
    # what the flag means, measured: at those sites x.sum(-1) is the constant sum of beta
    # (0 here), tiny against the row's size, while a site not flagged sees a real sum
    seen = {}
    flagged, other = next(iter(expected)), next(s.name for s in found if not s.norm and not s.is_head)
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: seen.setdefault(n, i[0].detach()))
             for n in (flagged, other)]
    _, args, kwargs = zoo.build(name)
    with torch.no_grad():
        model.eval()(*args, **kwargs)
    for h in hooks:
        h.remove()
    ratio = {n: (x.sum(-1).abs() / x.abs().sum(-1)).max().item() for n, x in seen.items()}
    assert ratio[flagged] < 1e-5 < 1e-2 < ratio[other], ratio


def test_no_warning_for_rmsnorm_or_a_scale_far_from_uniform_or_trained_norms():
    _, gm, warned = transform("llama-tiny")
    assert warned == [] and not any(s.norm for s in ol.sites(gm))  # RMSNorm does not center
    model, args, kwargs = zoo.build("vit-tiny")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.2, 1.8, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = ol.transform(model, "all", example_kwargs=kwargs)
    assert not [w for w in caught if "LayerNorm output" in str(w.message)]
    assert all(s.norm_scale_cv > 0.3 for s in ol.sites(gm) if s.norm)
    assert transform("vit-tiny", train=("norm",))[2] == []


def test_the_flag_needs_no_forward_pass_on_meta():
    model, args, kwargs = zoo.build("vit-tiny")
    model.to("meta")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = ol.sites(model, "all", example_kwargs={k: v.to("meta") for k, v in kwargs.items()})
    assert {s.name: s.norm for s in found if s.norm} == VIT
    assert all(s.norm_scale_cv is None for s in found if s.norm), "meta holds no values: unknown"


def test_the_command_line_shows_the_flag_per_site():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "onelora_fx", "inspect", "vit-tiny"], capture_output=True, text=True,
                       cwd=root, timeout=600)
    assert r.returncode == 0, r.stderr
    line = next(line for line in r.stdout.splitlines() if line.startswith("vit.layers.0.attention.q_proj"))
    assert "LayerNorm (γ cv 0.000)" in line
    assert "vit.layers.0.attention.o_proj" in r.stdout and "LayerNorm" not in next(
        line for line in r.stdout.splitlines() if line.startswith("vit.layers.0.attention.o_proj"))
