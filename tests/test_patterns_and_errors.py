"""Patterns (one meaning per type) and the errors users get for bad input."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import onelora_fx as ol
from handwritten import MLP, Shared


class Deep(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleDict({"q_proj": nn.Linear(8, 8), "v_proj": nn.Linear(8, 8), "up": nn.Linear(8, 8)}) for _ in range(3)
        )
        self.lm_head = nn.Linear(8, 5)

    def forward(self, x):
        for layer in self.layers:
            x = x + layer["up"](layer["q_proj"](x) * layer["v_proj"](x))
        return self.lm_head(x)


ALL = {f"layers.{i}.{p}" for i in range(3) for p in ("q_proj", "v_proj", "up")} | {"lm_head"}


def chosen(pattern, exclude=None):
    return {s.name for s in ol.sites(Deep(), pattern, exclude=exclude) if s.selected}


def test_each_pattern_type_has_one_meaning():
    assert chosen("all") == ALL
    assert chosen("all-linear") == ALL - {"lm_head"}
    assert chosen(None) == ALL - {"lm_head"}  # sites() defaults to transform's default
    assert chosen("*.q_proj") == {f"layers.{i}.q_proj" for i in range(3)}
    assert chosen("layers.1.*") == {"layers.1.q_proj", "layers.1.v_proj", "layers.1.up"}
    assert chosen(re.compile(r"layers\.[02]\.(q|v)_proj")) == {"layers.0.q_proj", "layers.0.v_proj", "layers.2.q_proj", "layers.2.v_proj"}
    # a regex is matched in full: no accidental prefix or substring matches
    with pytest.raises(ol.PatternError):
        chosen(re.compile(r"layers\.0"))
    assert chosen(lambda s: s.name.endswith("up")) == {f"layers.{i}.up" for i in range(3)}
    assert chosen(["*.q_proj", re.compile(".*v_proj")]) == {f"layers.{i}.{p}" for i in range(3) for p in ("q_proj", "v_proj")}
    assert chosen("all", exclude=["lm_head", "layers.0.*"]) == ALL - {"lm_head", "layers.0.q_proj", "layers.0.v_proj", "layers.0.up"}


@settings(max_examples=30, deadline=None)
@given(st.lists(st.sampled_from(sorted(ALL)), min_size=1, max_size=5))
def test_a_list_of_names_selects_exactly_those(names):
    assert chosen(names) == set(names)


def test_pattern_matching_nothing_lists_the_sites():
    with pytest.raises(ol.PatternError) as e:
        ol.transform(Deep(), "*.k_proj")
    text = str(e.value)
    assert "'*.k_proj'" in text and "layers.*.q_proj  (x3)" in text and "lm_head" in text


def test_exclude_that_removes_nothing_warns():
    with pytest.warns(UserWarning, match="removes nothing"):
        ol.transform(Deep(), "*.q_proj", exclude="*.k_proj")


def test_pattern_of_the_wrong_type():
    with pytest.raises(TypeError, match="a pattern is a string"):
        ol.transform(Deep(), 42)
    with pytest.raises(TypeError, match="a pattern is a string"):
        ol.transform(Deep(), "all", exclude=3.0)


def test_half_of_a_shared_weight_is_refused():
    with pytest.raises(ol.PatternError, match="shared weight"):
        ol.transform(Shared(), lambda s: s.name == "block" and s.call_index == 0)


def test_not_a_module():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        ol.transform(lambda x: x)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        ol.sites("model")


def test_already_adapted_is_refused():
    gm = ol.transform(MLP(), "all")
    with pytest.raises(ol.AlreadyAdaptedError, match="already carries 1LoRA"):
        ol.transform(gm, "all")
    import pickle

    reloaded = pickle.loads(pickle.dumps(gm))  # loses gm.meta: the graph still tells
    with pytest.raises(ol.AlreadyAdaptedError):
        ol.transform(reloaded, "all")


def test_bad_train_extra():
    with pytest.raises(ValueError, match="'bias' \\(BitFit\\)"):
        ol.transform(MLP(), train=("biases",))


def test_no_linear_at_all():
    with pytest.raises(ValueError, match="no linear sites"):
        ol.transform(nn.Sequential(nn.ReLU()))


def test_failed_transform_leaves_the_model_untouched():
    model = Deep()
    x = torch.randn(2, 8)
    expected = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    children = dict(model.named_modules())
    with pytest.raises(ol.PatternError):
        ol.transform(model, "nothing-here")
    assert all(p.requires_grad for p in model.parameters()), "nothing frozen"
    assert dict(model.named_modules()) == children and all(type(m) is type(children[n]) for n, m in model.named_modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()) and set(model.state_dict()) == set(state)
    assert torch.equal(model(x), expected)
