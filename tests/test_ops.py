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


def sample_inputs(dtype, full: bool):
    """The op's sample inputs, as PyTorch's OpInfo gives them: both layouts, with and
    without bias; ``full``: also shapes (a vector, a matrix, a non-contiguous batch of
    sequences) and which inputs require grad (a frozen weight, a trained one)."""
    shapes = [((), True), ((3,), True), ((2, 3), False)] if full else [((2, 3), True)]
    for shape, contiguous in shapes:
        for transposed in (False, True):
            for bias in (False, True):
                for grads in (("x,b", "x,w,bias,b") if full else ("x,w,bias,b",)):
                    x, w, bvec, b = make(shape, 4, 5, dtype, transposed, bias, contiguous, 0)
                    args = {"x": x, "w": w, "bias": bvec, "b": b}
                    for name in grads.split(","):
                        if args[name] is not None:
                            args[name].requires_grad_()
                    yield (args["x"], args["w"], args["bias"], args["b"], transposed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_custom_op_passes_opcheck_on_every_sample(dtype):
    """``torch.library.opcheck`` (schema, autograd registration, fake tensor, AOT
    dispatch) on each sample; the autograd checks run because inputs require grad."""
    samples = list(sample_inputs(dtype, full=dtype == torch.float32))  # every case in fp32, the layouts in the others
    assert len(samples) == (24 if dtype == torch.float32 else 4) and all(any(t is not None and t.requires_grad for t in a[:4]) for a in samples)
    for args in samples:
        torch.library.opcheck(torch.ops.onelora.linear.default, args)


def test_stacked_rows_and_expert_terms_pass_gradcheck():
    """The variants beside the single op: many adapters in one batch (``linear_rows``,
    its eager autograd Function; ``add_rows_term``), and each row's expert (``expert_term``,
    grouped and batched)."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)

    ids = torch.tensor([1, -1, 0])
    for transposed in (False, True):
        x, B = rand(3, 2, 4), rand(2, 5)
        w = rand(4, 5) if transposed else rand(5, 4)
        for bias in (None, rand(5)):
            args = [x, w, B] if bias is None else [x, w, B, bias]
            assert torch.autograd.gradcheck(
                lambda x, w, B, *bias: ops.linear_rows(x, w, bias[0] if bias else None, B, ids, transposed), args)
    y = rand(3, 2, 5)
    assert torch.autograd.gradcheck(lambda y, x, B: ops.add_rows_term(y, x, B, ids), [y, x, B])
    rows, experts = rand(5, 4), rand(2, 3)
    assert torch.autograd.gradcheck(lambda y, x, b: ops.expert_term(y, x, torch.tensor([2, 4]), b),
                                    [rand(5, 3), rows, experts])  # the last row routed to no expert
    assert torch.autograd.gradcheck(lambda y, x, b: ops.expert_term(y, x, None, b), [rand(2, 3, 3), rand(2, 3, 4), experts])


def test_single_op_gradgradcheck_where_defined():
    """Double backward of the decomposition (what compile and export trace) is Listing 1's."""
    x, w, bvec, b = make((2, 3), 4, 5, torch.float64, False, True, True, 0)
    args = [t.requires_grad_() for t in (x, w, bvec, b)]
    assert torch.autograd.gradgradcheck(lambda *a: ops.decompose(*a), args)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_gradients_are_listing1_under_autocast(dtype):
    """Under autocast the op's output (in ``F.linear``'s autocast dtype) and its
    gradients for x and b equal Listing 1 (``linear(x) + b * x.sum(-1)``, run under the
    same autocast; its term stays float32) within the dtype's tolerance."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, 16, generator=g)
    w, bias = torch.randn(8, 16, generator=g) * 0.2, torch.randn(8, generator=g)
    b = torch.randn(8, generator=g) * 0.1
    results = []
    for fn in (lambda x, b: ops.linear(x, w, bias, b), lambda x, b: F.linear(x, w, bias) + b * x.sum(-1, keepdim=True)):
        xi, bi = x.clone().requires_grad_(), b.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype):
            y = fn(xi, bi)
        y.float().square().mean().backward()
        results.append((y.float(), xi.grad, bi.grad))
        assert bi.grad.dtype == b.dtype
    assert results[0][0].dtype == torch.float32  # (the op's output is F.linear's under autocast: checked below)
    with torch.autocast("cpu", dtype=dtype):
        assert ops.linear(x, w, bias, b).dtype == F.linear(x, w, bias).dtype == dtype
    tol = tolerance(dtype)
    for got, want, what in zip(results[0], results[1], ("output", "x gradient", "b gradient")):
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(got, want, rtol=tol["rtol"], atol=tol["atol"] * scale, msg=what)


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
