"""Properties beyond the fx path: every form against Listing 1, blocks of packed weights,
expert terms, the fold's blocks, call signatures, and the small readers everything relies
on (``Signature``, ``CallGraph.accepts``, ``unwrap_transpose``)."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

import onelora_fx as ol
from onelora_fx import ops
from onelora_fx.analysis.linear_ops import unwrap_transpose
from onelora_fx.forms.graph.calls import CallGraph, Signature, autocast_state
from reference import folded, listing1_copy, randomize_adapters
from toolkit import assert_close, quiet_transform

aten = torch.ops.aten


class Net(nn.Module):
    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__()
        self.a = nn.Linear(d_in, d_hidden)
        self.b = nn.Linear(d_hidden, d_hidden, bias=False)
        self.c = nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.tanh(self.a(x)))))


@settings(max_examples=12, deadline=None)
@given(form=st.sampled_from(["fx", "export", "module"]), d_in=st.integers(1, 9), d_hidden=st.integers(1, 9),
       d_out=st.integers(1, 5), chosen=st.sets(st.sampled_from(["a", "b", "c"]), min_size=1), seed=st.integers(0, 99))
def test_every_form_equals_listing1(form, d_in, d_hidden, d_out, chosen, seed):
    torch.manual_seed(seed)
    model = Net(d_in, d_hidden, d_out)
    x = torch.randn(2, 3, d_in)
    gm = quiet_transform(model, sorted(chosen), example_inputs=(x,), capture=form)
    vectors = randomize_adapters(gm, seed)
    assert set(vectors) == chosen
    assert_close(gm(x), listing1_copy(model, vectors, chosen)(x), torch.float32)


class Packed(nn.Module):
    """A packed weight used in blocks of its output rows, as MHA and fused qkv are."""

    def __init__(self, sizes: list[int], d_in: int, how: str):
        super().__init__()
        self.w = nn.Parameter(torch.randn(sum(sizes), d_in) * 0.3)
        self.bias = nn.Parameter(torch.randn(sum(sizes)) * 0.1)
        self.sizes, self.how = sizes, how

    def forward(self, x):
        if self.how == "split":
            ws, bs = self.w.split(self.sizes), self.bias.split(self.sizes)
        else:  # slices
            starts = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
            ws = [self.w[a:a + n] for a, n in zip(starts, self.sizes)]
            bs = [self.bias.narrow(0, a, n) for a, n in zip(starts, self.sizes)]
        return torch.cat([F.linear(x, w, b) * (i + 1) for i, (w, b) in enumerate(zip(ws, bs))], -1)


@settings(max_examples=15, deadline=None)
@given(sizes=st.lists(st.integers(1, 5), min_size=1, max_size=3), d_in=st.integers(1, 6),
       how=st.sampled_from(["split", "slices"]), form=st.sampled_from(["export", "module"]), seed=st.integers(0, 99))
def test_blocks_of_a_packed_weight_use_the_same_blocks_of_one_b(sizes, d_in, how, form, seed):
    torch.manual_seed(seed)
    model = Packed(sizes, d_in, how)
    x = torch.randn(3, d_in)
    gm = ol.transform(model, "all", example_inputs=(x,), capture=form)
    found = [s for s in ol.sites(gm) if s.adapted]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    expected_rows = [(a, a + n) if len(sizes) > 1 else None for a, n in zip(starts, sizes)]
    assert [s.rows for s in found] == expected_rows and len({s.adapter_name for s in found}) == 1
    assert gm.get_parameter(found[0].adapter_name).shape == (sum(sizes),)
    randomize_adapters(gm, seed)
    assert_close(gm(x), folded(model, gm, {"w"})(x), torch.float32)
    assert_close(ol.merge(gm)(x), gm(x), torch.float32)


@settings(max_examples=40, deadline=None)
@given(counts=st.lists(st.integers(0, 4), min_size=1, max_size=4), unrouted=st.integers(0, 3), d_in=st.integers(1, 5),
       d_out=st.integers(1, 4), dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 99))
def test_expert_term_adds_each_rows_own_expert(counts, unrouted, d_in, d_out, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    rows = sum(counts) + unrouted
    x = torch.randn(rows, d_in, generator=g).to(dtype)
    y = torch.randn(rows, d_out, generator=g).to(dtype)
    b = torch.randn(len(counts), d_out, generator=g)
    offsets = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
    out = ops.expert_term(y, x, offsets, b)
    expected = y.double().clone()
    row = 0
    for e, n in enumerate(counts):
        for _ in range(n):
            expected[row] += b[e].double() * x[row].double().sum()
            row += 1
    assert_close(out.double(), expected, dtype)  # rows past offs[-1] belong to no expert: unchanged
    batched = ops.expert_term(y.reshape(1, rows, d_out), x.reshape(1, rows, d_in), None, b[:1])  # bmm experts
    assert_close(batched[0].double(), y.double() + b[0].double() * x.double().sum(-1, keepdim=True), dtype)


@settings(max_examples=30, deadline=None)
@given(shape=st.lists(st.integers(1, 7), min_size=2, max_size=3), layout=st.sampled_from(list(ol.Layout)),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), chunk=st.integers(1, 30),
       seed=st.integers(0, 99))
def test_the_fold_in_blocks_is_the_whole_fold(shape, layout, dtype, chunk, seed):
    from unittest import mock

    from onelora_fx import fold

    with mock.patch.object(fold, "_CHUNK_ELEMENTS", chunk):
        _fold_equals_the_whole(fold, shape, layout, dtype, seed)


def _fold_equals_the_whole(fold, shape, layout, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g).to(dtype)
    out_dim = -2 if layout is ol.Layout.OUT_IN else -1
    b = torch.randn(*shape[:-2], shape[out_dim], generator=g)
    delta = b.unsqueeze(-1) if layout is ol.Layout.OUT_IN else b.unsqueeze(-2)
    expected = (w.double() + delta.double()).to(dtype)
    assert torch.equal(fold.fold(w, b, layout), expected)
    inplace = w.clone()
    fold.fold_into(inplace, b, layout)
    assert torch.equal(inplace, expected)
    assert fold.check(w, b, layout, "w") is None


def f(a, b, c=3, *, d=None, e=1):
    return a


@settings(max_examples=40, deadline=None)
@given(split=st.integers(0, 3), kw_order=st.permutations(["c", "d", "e"]), d=st.sampled_from([None, 5]))
def test_a_call_in_any_spelling_has_one_canonical_form(split, kw_order, d):
    sig = Signature(f)
    values = {"a": 1, "b": 2, "c": 3, "d": d, "e": 1}
    positional = [values[k] for k in ("a", "b", "c")[:split]]
    keywords = {k: values[k] for k in ("a", "b", "c")[split:]}
    keywords.update({k: values[k] for k in kw_order if k not in ("a", "b", "c")[:split]})
    args, kwargs = sig.canonical(tuple(positional), keywords)
    assert args == () and list(kwargs) == [k for k in ("a", "b", "c", "d", "e") if not (k == "d" and d is None)]
    assert all(kwargs[k] == values[k] for k in kwargs)


def test_signature_refuses_what_the_function_would():
    sig = Signature(f)
    with pytest.raises(TypeError, match="unexpected keyword argument 'z'"):
        sig.canonical((1, 2), {"z": 1})
    with pytest.raises(TypeError, match="multiple values for argument 'a'"):
        sig.canonical((1,), {"a": 1})
    with pytest.raises(TypeError, match="positional arguments"):
        sig.canonical((1, 2, 3, 4), {})


def test_call_graph_accepts_its_own_structure_only():
    from onelora_fx.compat import pytree

    x = torch.zeros(2, 3)
    leaves, spec = pytree.tree_flatten(((), {"x": x}))
    call = CallGraph.of((), {"x": x}, spec, None, dynamic=True)
    assert call.accepts(spec, [torch.zeros(5, 3)])  # another batch: dynamic
    assert not call.accepts(spec, [torch.zeros(5, 3, dtype=torch.float64)])  # dtype
    assert not call.accepts(spec, [torch.zeros(5)])  # rank
    assert not call.accepts(pytree.tree_flatten(((), {"y": x}))[1], leaves)  # structure
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_state() == (("cpu", torch.bfloat16),)
        assert not call.accepts(spec, leaves, autocast_state())  # under autocast: another graph
    ones = CallGraph.of((), {"x": torch.zeros(1, 3)}, spec, None, dynamic=True)
    assert not ones.accepts(spec, [torch.zeros(2, 3)])  # a dimension of 1 was specialized
    pinned = CallGraph.of((), {"x": x}, spec, None, dynamic=False)
    assert pinned.accepts(spec, [torch.zeros(2, 3)]) and not pinned.accepts(spec, [torch.zeros(4, 3)])


@pytest.mark.parametrize("call, ndim", [
    (("call_function", aten.t.default, ("W",)), 2),
    (("call_function", aten.numpy_T.default, ("W",)), 2),
    (("call_function", aten.mT.default, ("W",)), 3),
    (("call_function", aten.transpose.int, ("W", 0, 1)), 2),
    (("call_function", aten.transpose.int, ("W", -1, -2)), 3),
    (("call_function", aten.permute.default, ("W", [0, 2, 1])), 3),
    (("call_function", torch.swapaxes, ("W", 1, 2)), 3),
    (("call_method", "t", ("W",)), 2),
    (("call_method", "transpose", ("W", 0, 1)), 2),
    (("call_method", "permute", ("W", 1, 0)), 2),
    (("call_function", getattr, ("W", "T")), 2),
    (("call_function", getattr, ("W", "mT")), 3),
])
def test_every_transpose_spelling_is_read(call, ndim):
    assert unwrap_transpose(*call, ndim) == "W"


@pytest.mark.parametrize("call, ndim", [
    (("call_function", aten.t.default, ("W",)), 3),  # t is 2-D only
    (("call_function", aten.transpose.int, ("W", 0, 1)), 3),  # not the last two
    (("call_function", aten.permute.default, ("W", [1, 0, 2])), 3),
    (("call_function", getattr, ("W", "T")), 3),  # .T of a 3-D tensor reverses every dim
    (("call_function", aten.view.default, ("W", [4, 4])), 2),
])
def test_what_is_not_a_transpose_is_not_read_as_one(call, ndim):
    assert unwrap_transpose(*call, ndim) is None


@settings(max_examples=25, deadline=None)
@given(ids=st.lists(st.integers(-1, 2), min_size=1, max_size=5), d_in=st.integers(1, 5), d_out=st.integers(1, 4),
       rows=st.integers(1, 3), flattened=st.booleans(), seed=st.integers(0, 99))
def test_linear_rows_is_each_items_own_linear(ids, d_in, d_out, rows, flattened, seed):
    g = torch.Generator().manual_seed(seed)
    n = len(ids)
    x = torch.randn(n, rows, d_in, generator=g)
    w, bias, B = torch.randn(d_out, d_in, generator=g), torch.randn(d_out, generator=g), torch.randn(3, d_out, generator=g)
    idx = torch.tensor(ids)
    xx = x.reshape(n * rows, d_in) if flattened else x
    out = ops.linear_rows(xx, w, bias, B, idx, rows=ops.FLATTENED if flattened else ops.LEADING).reshape(n, rows, d_out)
    for i, k in enumerate(ids):
        expected = F.linear(x[i], w, bias) + (B[k] * x[i].sum(-1, keepdim=True) if k >= 0 else 0)
        assert_close(out[i], expected, torch.float32)
    assume(n > 1)
    with pytest.raises(ValueError, match="adapter_ids"):
        ops.linear_rows(x, w, bias, B, idx[:-1], rows=ops.LEADING)
