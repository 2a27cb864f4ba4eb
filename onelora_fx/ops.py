"""The 1LoRA op: ``linear(x, W, bias) + b * x.sum(-1, keepdim=True)``.

Every adapted site in a graph is one call to :func:`linear`. It has one meaning and
three lowerings:

* eager: :class:`_OneLoRALinearFunction`, the lean kernel. The rank-1 term ``s bᵀ``
  (``s = x.sum(-1)``) is written into the GEMM's accumulator before the GEMM runs, so
  the forward costs one GEMM plus one read of ``x``; backward saves only ``s`` (and the
  weight, which autograd keeps anyway), never ``x`` or anything of the weight's size.
* traced (``torch.compile`` / ``torch.export``): the registered custom op
  ``torch.ops.onelora.linear`` with the same kernels, a fake (meta) implementation for
  shapes, and the same backward, so the node stays findable in any captured graph.
* decomposed: :func:`decompose`, the paper's Listing 1 in plain ops, which the
  ``onelora`` compile backend puts in place of the custom op for Inductor to fuse.

Why an autograd.Function in eager and not the custom op everywhere: a custom op call
costs ~120 µs of Python dispatch on CPU against ~30 µs for the Function; over the 56
calls of a 4-layer LLaMA step that is 1-2 % of the step, the whole budget.

``transposed`` says how ``weight`` is laid out: ``False`` is ``nn.Linear``'s
``[out, in]`` (``y = x Wᵀ``), ``True`` is ``[in, out]`` (``y = x W``, GPT-2's
``Conv1D``). The 1LoRA term is the same in both layouts.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["linear", "decompose"]


def _as_in_out(weight: Tensor, transposed: bool) -> Tensor:
    """The weight as an ``[in, out]`` matrix (a view, never a copy)."""
    return weight if transposed else weight.t()


def _forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], b: Tensor, transposed: bool) -> tuple[Tensor, Tensor]:
    """Returns ``(y, s)`` with ``s = x.sum(-1)``."""
    s = x.sum(-1)
    w = _as_in_out(weight, transposed)
    b = b.to(x.dtype)
    out_shape = (*x.shape[:-1], w.shape[1])
    if x.is_contiguous():
        # Same GEMM call as at::linear's fused path (addmm with the bias as the
        # accumulator, beta=1), with s bᵀ added to that accumulator first: no extra
        # pass over the output, and bit-identical to linear() when b == 0.
        s2 = s.reshape(-1)
        acc = torch.outer(s2, b) if bias is None else torch.addr(bias.to(x.dtype), s2, b)
        y = acc.addmm_(x.reshape(-1, x.shape[-1]), w)
        return y.view(out_shape), s
    # at::linear takes its matmul + add path for strided inputs; follow it exactly and
    # add the rank-1 term afterwards.
    y = F.linear(x, w.t(), bias)
    y.addcmul_(s.unsqueeze(-1), b)
    return y, s


def _backward(
    g: Tensor,
    x: Optional[Tensor],
    s: Tensor,
    weight: Tensor,
    b: Tensor,
    transposed: bool,
    needs: tuple[bool, ...],
) -> tuple[Optional[Tensor], ...]:
    """Gradients for ``(x, weight, bias, b)``; ``x`` is only kept when weight needs one."""
    g2 = g.reshape(-1, g.shape[-1])
    w = _as_in_out(weight, transposed)
    grad_x = grad_w = grad_bias = grad_b = None
    if needs[0]:
        # dx = g Wᵀ + (g b) 1ᵀ: the rank-1 part is the GEMM's accumulator again.
        gb = torch.mv(g2, b.to(g.dtype))
        acc = gb.unsqueeze(1).expand(g2.shape[0], w.shape[0])
        grad_x = torch.addmm(acc, g2, w.t()).view(*g.shape[:-1], w.shape[0])
    if needs[1]:
        x2 = x.reshape(-1, x.shape[-1])
        grad_w = x2.t().mm(g2) if transposed else g2.t().mm(x2)
    if needs[2]:
        grad_bias = g2.sum(0)
    if needs[3]:
        grad_b = torch.mv(g2.t(), s.reshape(-1).to(g.dtype)).to(b.dtype)
    return grad_x, grad_w, grad_bias, grad_b


class _OneLoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, b, transposed):  # type: ignore[override]
        y, s = _forward(x, weight, bias, b, transposed)
        keep_x = x if ctx.needs_input_grad[1] else None
        ctx.save_for_backward(keep_x, s, weight, b)
        ctx.transposed = transposed
        return y

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, s, weight, b = ctx.saved_tensors
        grads = _backward(g, x, s, weight, b, ctx.transposed, ctx.needs_input_grad[:4])
        return (*grads, None)


@torch.library.custom_op("onelora::linear", mutates_args=())
def _linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], b: Tensor, transposed: bool) -> Tensor:
    return _forward(x, weight, bias, b, transposed)[0]


@_linear_op.register_fake
def _(x, weight, bias, b, transposed):
    out = weight.shape[1] if transposed else weight.shape[0]
    return x.new_empty((*x.shape[:-1], out))


def _setup_context(ctx, inputs, output):
    x, weight, bias, b, transposed = inputs
    ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, x.sum(-1), weight, b)
    ctx.transposed = transposed


def _op_backward(ctx, g):
    x, s, weight, b = ctx.saved_tensors
    return (*_backward(g, x, s, weight, b, ctx.transposed, ctx.needs_input_grad[:4]), None)


_linear_op.register_autograd(_op_backward, setup_context=_setup_context)


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], b: Tensor, transposed: bool = False) -> Tensor:
    """1LoRA linear: ``linear(x, W, bias) + b * x.sum(-1, keepdim=True)``.

    ``weight`` is ``[out, in]`` (``transposed=False``, as ``nn.Linear``) or
    ``[in, out]`` (``transposed=True``, as GPT-2's ``Conv1D``); ``b`` has ``out``
    entries. Equal to ``F.linear(x, W, bias)`` when ``b`` is zero (bit-exact).

    Example:
        >>> x, W, b = torch.randn(2, 3), torch.randn(4, 3), torch.ones(4)
        >>> y = linear(x, W, None, b)
        >>> torch.allclose(y, x @ W.T + b * x.sum(-1, keepdim=True))
        True
    """
    if isinstance(x, torch.fx.Proxy):
        # symbolic_trace (also when a pickled GraphModule is re-traced): one leaf node
        return x.tracer.create_proxy("call_function", linear, (x, weight, bias, b), {"transposed": transposed} if transposed else {})
    if torch.compiler.is_compiling():
        return torch.ops.onelora.linear(x, weight, bias, b, transposed)
    return _OneLoRALinearFunction.apply(x, weight, bias, b, transposed)


def decompose(x: Tensor, weight: Tensor, bias: Optional[Tensor], b: Tensor, transposed: bool = False) -> Tensor:
    """The paper's Listing 1 in plain ops: what Inductor fuses and ``merge`` folds."""
    return F.linear(x, _as_in_out(weight, transposed).t(), bias) + b * x.sum(-1, keepdim=True)
