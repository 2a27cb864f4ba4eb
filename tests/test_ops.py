"""The 1LoRA op: exactness, gradients, what backward keeps, and its traced forms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from onelora_fx import ops
from reference import DEVICES, tolerance

DTYPES = [torch.float32, torch.bfloat16, torch.float64]


def make(shape, d_in, d_out, dtype, transposed, bias, contiguous, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, d_in, generator=g).to(dtype)
    if not contiguous and x.dim() >= 2:
        x = x.transpose(0, -2).contiguous().transpose(0, -2) if x.dim() > 2 else x.t().contiguous().t()
        if x.is_contiguous():  # a size-1 dim keeps it contiguous: force strides
            x = torch.randn(*shape, d_in * 2, generator=g).to(dtype)[..., ::2]
    w = torch.randn(d_out, d_in, generator=g).to(dtype)
    w = w.t().contiguous() if transposed else w
    bvec = torch.randn(d_out, generator=g).to(dtype) if bias else None
    b = (torch.randn(d_out, generator=g) * 0.1).to(dtype)
    return x, w, bvec, b


def base(x, w, bias, transposed):
    """The call the op replaces: F.linear, or x @ W + bias for [in, out] weights."""
    if not transposed:
        return F.linear(x, w, bias)
    if x.dim() == 2 and bias is not None:
        return torch.addmm(bias, x, w)
    y = torch.matmul(x, w)
    return y if bias is None else y + bias


@settings(max_examples=120, deadline=None)
@given(
    shape=st.lists(st.integers(1, 6), min_size=0, max_size=3),
    d_in=st.integers(1, 40),
    d_out=st.integers(1, 40),
    dtype=st.sampled_from(DTYPES),
    transposed=st.booleans(),
    bias=st.booleans(),
    contiguous=st.booleans(),
    seed=st.integers(0, 2**16),
)
@pytest.mark.parametrize("device", DEVICES)
def test_zero_b_is_bit_exact_and_random_b_is_listing1(device, shape, d_in, d_out, dtype, transposed, bias, contiguous, seed):
    x, w, bvec, b = (t if t is None else t.to(device) for t in make(shape, d_in, d_out, dtype, transposed, bias, contiguous, seed))
    assume(not (transposed and x.dim() != 2 and bias is not None))  # only addmm is "x @ W + bias" in one call (2-D x)
    zero = torch.zeros_like(b)
    assert torch.equal(ops.linear(x, w, bvec, zero, transposed), base(x, w, bvec, transposed))
    expected = base(x, w, bvec, transposed) + b * x.sum(-1, keepdim=True)
    tol = tolerance(dtype)
    got = ops.linear(x, w, bvec, b, transposed)
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(got, expected, rtol=tol["rtol"], atol=tol["atol"] * scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("contiguous", [False, True])
def test_gradcheck(device, transposed, bias, contiguous):
    x, w, bvec, b = (t if t is None else t.to(device) for t in make((3, 4), 5, 6, torch.float64, transposed, bias, contiguous, 0))
    args = [x.requires_grad_(), w.requires_grad_(), bvec.requires_grad_() if bias else None, b.requires_grad_()]
    assert torch.autograd.gradcheck(lambda *a: ops.linear(*a, transposed), args)
    # the custom op returns (y, s): both outputs' gradients
    assert torch.autograd.gradcheck(lambda *a: torch.ops.onelora.linear(*a, transposed), args)


def test_backward_keeps_only_s():
    """With a frozen weight, backward keeps s = x.sum(-1) and nothing of x's size."""
    x = torch.randn(64, 32, requires_grad=True)
    w, b = torch.randn(48, 32), torch.zeros(48, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ops.linear(x, w, None, b)
    new_memory = [t for t in saved if t.untyped_storage().data_ptr() not in (w.untyped_storage().data_ptr(), b.untyped_storage().data_ptr())]
    assert [tuple(t.shape) for t in new_memory] == [(64,)]


def test_custom_op_is_registered_correctly():
    x, w, bvec, b = make((2, 3), 4, 5, torch.float32, False, True, True, 0)
    torch.library.opcheck(torch.ops.onelora.linear.default, (x, w, bvec, b, False))
    torch.library.opcheck(torch.ops.onelora.linear.default, (x, w.t().contiguous(), None, b, True))


def test_symbolic_trace_keeps_one_node():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(3, 4))
            self.b = torch.nn.Parameter(torch.zeros(3))

        def forward(self, x):
            return ops.linear(x, self.w, None, self.b)

    gm = torch.fx.symbolic_trace(M())
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [ops.linear]
