"""The 1LoRA op: ``linear(x, W, bias) + b * x.sum(-1, keepdim=True)``.

Every adapted site in a graph is one call to :func:`linear`. It has one meaning and
three lowerings:

* eager: :class:`_OneLoRALinearFunction`, the lean kernel. On CPU the rank-1 term
  ``s bᵀ`` (``s = x.sum(-1)``) is written into the GEMM's accumulator before the GEMM
  runs, so the forward costs one GEMM plus one read of ``x`` (on CUDA it is added after
  the GEMM: cuBLASLt's bias epilogue would otherwise round the base layer differently);
  backward saves only ``s`` (and the weight, which autograd keeps anyway), never ``x``
  or anything of the weight's size.
* traced (``torch.compile`` / ``torch.export``): the registered custom op
  ``torch.ops.onelora.linear`` with the same kernels, a fake (meta) implementation for
  shapes, and the same backward, so the node stays findable in any captured graph.
* decomposed: :func:`decompose`, the paper's Listing 1 in plain ops, which the
  ``onelora`` compile backend puts in place of the custom op for Inductor to fuse.

Why an autograd.Function in eager and not the custom op everywhere: a custom op call
costs ~120 µs of Python dispatch on CPU against ~30 µs for the Function; over the 56
calls of a 4-layer LLaMA step that is 1-2 % of the step, the whole budget. Both share
what is saved (:func:`_save`) and how backward runs (:func:`_backward`).

Under ``torch.autocast`` the op computes what ``F.linear`` computes there: ``x``, the
weight, the bias and ``b`` are cast to the autocast dtype (float64 tensors are left
alone, as autocast does), the result is in that dtype, and ``b``'s gradient flows back
through the cast into ``b``'s own dtype.

``transposed`` says how ``weight`` is laid out: ``False`` is ``nn.Linear``'s
``[out, in]`` (``y = x Wᵀ``), ``True`` is ``[in, out]`` (``y = x W``, GPT-2's
``Conv1D``). The 1LoRA term is the same in both layouts.

Expert weights (``[E, out, in]``, used by a grouped matmul over rows sorted by expert)
get :func:`expert_term`: ``y + b[e] * x.sum(-1)`` with ``e`` each row's expert.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .compat import assert_async, check, is_dtensor, is_view
from .quant import dequantize, is_quantized_weight

__all__ = ["linear", "decompose", "expert_term", "expert_of_rows", "linear_rows", "rows_layout", "batch_source", "check_ids", "add_term",
           "add_rows_term", "LEADING", "FLATTENED", "BY_SHAPE"]


def _as_in_out(weight: Tensor, transposed: bool) -> Tensor:
    """The weight as an ``[in, out]`` matrix (a view, never a copy)."""
    return weight if transposed else weight.t()


_LOW = (torch.float16, torch.bfloat16)


def _s_dtype(dtype: torch.dtype) -> torch.dtype:
    """``s = x.sum(-1)`` is kept in float32 for float16 / bfloat16 inputs: 128 features
    of 600 already sum past float16's range (65504)."""
    return torch.float32 if dtype in _LOW else dtype


def _forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], b: Tensor, transposed: bool) -> tuple[Tensor, Tensor]:
    """Returns ``(y, s)`` with ``s = x.sum(-1)``. ``y`` is never a view (a model may
    modify a linear's output in place: Llama 4 does ``out.add_(...)``)."""
    w = _as_in_out(weight, transposed)
    out_shape = (*x.shape[:-1], w.shape[1])
    if x.dtype in _LOW:
        # float16 / bfloat16: the base layer exactly, then the 1LoRA term added once in
        # float32 (s, b * s and the sum), rounded once: b = 0 gives the base layer bit
        # for bit, and only a result out of the dtype's range can overflow
        s = x.sum(-1, dtype=torch.float32)
        y = F.linear(x, w.t(), bias)
        return torch.addcmul(y.float(), s.unsqueeze(-1), b.float()).to(x.dtype), s
    s = x.sum(-1)
    b = b.to(x.dtype)
    if x.is_contiguous():
        # The output is allocated in its final shape and the GEMM writes a 2-D view of
        # it (never a view itself). CPU: the same GEMM call as at::linear's fused path
        # (addmm with the bias as the accumulator, beta=1), with s bᵀ added to that
        # accumulator first: no extra pass over the output, and bit-identical to
        # linear() when b == 0. CUDA: cuBLASLt adds a bias in the GEMM's epilogue and
        # picks another kernel for beta=1, so an accumulator holding s bᵀ would change
        # the base layer's bits; the exact calls at::linear makes, then s bᵀ added.
        y = torch.empty(out_shape, dtype=x.dtype, device=x.device)
        y2 = y.view(-1, w.shape[1])
        s2 = s.reshape(-1)
        x2 = x.reshape(-1, x.shape[-1])
        if x.device.type != "cpu":
            if bias is None:
                torch.mm(x2, w, out=y2)
            else:
                torch.addmm(bias.to(x.dtype), x2, w, out=y2)
            y2.addr_(s2, b)
            return y, s
        if bias is None:
            torch.outer(s2, b, out=y2)
        else:
            torch.addr(bias.to(x.dtype), s2, b, out=y2)
        y2.addmm_(x2, w)
        return y, s
    # at::linear takes its matmul + add path for strided inputs; follow it exactly and
    # add the rank-1 term afterwards.
    y = F.linear(x, w.t(), bias)
    if is_view(y):
        y = y.clone()
    y.add_(s.unsqueeze(-1) * b)  # (not addcmul_: a row-parallel DTensor output is Partial)
    return y, s


def _save(ctx, x: Tensor, s: Tensor, weight: Tensor, b: Tensor, transposed: bool) -> None:
    """What backward keeps: ``s``, the weight and ``b``; ``x`` only when the weight itself
    needs a gradient (never in 1LoRA training, where the weight is frozen)."""
    ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, s, weight, b)
    ctx.transposed = transposed


def _backward(ctx, g: Tensor, grad_s: Optional[Tensor] = None) -> tuple[Optional[Tensor], ...]:
    """Gradients for ``(x, weight, bias, b, transposed)`` (``grad_s``: of the custom
    op's second output ``s = x.sum(-1)``, when something used it)."""
    x, s, weight, b = ctx.saved_tensors
    needs = ctx.needs_input_grad
    g2 = g.reshape(-1, g.shape[-1])
    w = _as_in_out(weight, ctx.transposed)
    grad_x = grad_w = grad_bias = grad_b = None
    if needs[0]:
        # dx = g Wᵀ + (g b) 1ᵀ: the rank-1 part is the GEMM's accumulator again.
        gb = torch.mv(g2, b.to(g.dtype))
        acc = gb.unsqueeze(1).expand(g2.shape[0], w.shape[0])
        grad_x = torch.addmm(acc, g2, w.t()).view(*g.shape[:-1], w.shape[0])
        if grad_s is not None:
            grad_x = grad_x + grad_s.unsqueeze(-1).to(grad_x.dtype)
    if needs[1]:
        x2 = x.reshape(-1, x.shape[-1])
        grad_w = x2.t().mm(g2) if ctx.transposed else g2.t().mm(x2)
    if needs[2]:
        grad_bias = g2.sum(0)
    if needs[3]:
        # in s's dtype (float32 for low-precision inputs: s may not fit them)
        grad_b = torch.mv(g2.t().to(s.dtype), s.reshape(-1)).to(b.dtype)
    return grad_x, grad_w, grad_bias, grad_b, None


class _OneLoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, b, transposed):  # type: ignore[override]
        y, s = _forward(x, weight, bias, b, transposed)
        _save(ctx, x, s, weight, b, transposed)
        return y

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return _backward(ctx, g)


@torch.library.custom_op("onelora::linear", mutates_args=())
def _linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], b: Tensor, transposed: bool) -> tuple[Tensor, Tensor]:
    y, s = _forward(x, weight, bias, b, transposed)
    return y, s


@_linear_op.register_fake
def _(x, weight, bias, b, transposed):
    out = weight.shape[1] if transposed else weight.shape[0]
    return x.new_empty((*x.shape[:-1], out)), x.new_empty(x.shape[:-1], dtype=_s_dtype(x.dtype))


def _setup_context(ctx, inputs, output):
    x, weight, bias, b, transposed = inputs
    _save(ctx, x, output[1], weight, b, transposed)  # s is the op's second output


def _op_backward(ctx, g, grad_s):
    return _backward(ctx, g, grad_s)


_linear_op.register_autograd(_op_backward, setup_context=_setup_context)


def _autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    device = x.device.type
    # (is_autocast_available only for other devices: torch.compile in torch 2.11 cannot
    # trace it, and every build knows cpu and cuda)
    if device not in ("cpu", "cuda") and not torch.amp.is_autocast_available(device):
        return None
    if not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


def _cast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    # autocast's rule: floating tensors other than float64 take the autocast dtype
    if t is None or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    return t.to(dtype)


def _run(x: Tensor, weight: Tensor, bias: Optional[Tensor], b: Tensor, transposed: bool) -> Tensor:
    if torch.compiler.is_exporting():
        # export keeps one findable node per site (the custom op)
        return torch.ops.onelora.linear(x, weight, bias, b, transposed)[0]
    if torch.compiler.is_compiling():
        # torch.compile: plain ops, which AOTAutograd differentiates and Inductor fuses
        # into the kernels it already runs (with backend="inductor" too)
        return decompose(x, weight, bias, b, transposed)
    if is_dtensor(weight) or is_dtensor(x):
        # tensor parallelism: plain ops, which DTensor shards (a row-parallel output is
        # Partial: each rank's b * sum(x_local) joins it before the reduction)
        return decompose(x, weight, bias, b, transposed)
    return _OneLoRALinearFunction.apply(x, weight, bias, b, transposed)


class _QuantizedLinear(torch.autograd.Function):
    """``F.linear(x, W, bias)`` with a quantized ``W`` (a torchao tensor subclass), whose
    backward keeps only ``W`` itself and dequantizes it for ``grad_x``. Called directly,
    some subclasses' linear keeps a float copy of every weight alive until backward
    (torchao's weight-only ``Int8Tensor``: more than the float model)."""

    @staticmethod
    def forward(ctx, x, weight, bias):  # type: ignore[override]
        ctx.save_for_backward(weight)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        (weight,) = ctx.saved_tensors
        grad_x = g @ dequantize(weight, dtype=g.dtype) if ctx.needs_input_grad[0] else None
        grad_bias = g.reshape(-1, g.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias


def add_term(y: Tensor, x: Tensor, b: Tensor) -> Tensor:
    """``y + b * x.sum(-1, keepdim=True)`` beside a linear call that computed ``y`` (a
    quantized one); for float16 / bfloat16 the term is computed and added in float32.
    Autograd keeps only ``s`` and ``b``."""
    if y.dtype in _LOW:
        return (y.float() + b.float() * x.sum(-1, keepdim=True, dtype=torch.float32)).to(y.dtype)
    return y + b.to(y.dtype) * x.sum(-1, keepdim=True).to(y.dtype)


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], b: Tensor, transposed: bool = False) -> Tensor:
    """1LoRA linear: ``linear(x, W, bias) + b * x.sum(-1, keepdim=True)``.

    ``weight`` is ``[out, in]`` (``transposed=False``, as ``nn.Linear``) or
    ``[in, out]`` (``transposed=True``, as GPT-2's ``Conv1D``); ``b`` has ``out``
    entries. Equal to ``F.linear(x, W, bias)`` when ``b`` is zero (bit-exact).

    Examples:
        >>> x, W, b = torch.randn(2, 3), torch.randn(4, 3), torch.ones(4)
        >>> y = linear(x, W, None, b)
        >>> torch.allclose(y, x @ W.T + b * x.sum(-1, keepdim=True))
        True
    """
    if isinstance(x, torch.fx.Proxy):
        # symbolic_trace (also when a pickled GraphModule is re-traced): one leaf node
        return x.tracer.create_proxy("call_function", linear, (x, weight, bias, b), {"transposed": transposed} if transposed else {})
    if not torch.compiler.is_compiling() and is_quantized_weight(weight):  # the quantized call, the term beside it
        w = weight if not transposed else weight.t()
        return add_term(_QuantizedLinear.apply(x, w, bias), x, b)
    dtype = _autocast_dtype(x)
    if dtype is None:
        return _run(x, weight, bias, b, transposed)
    with torch.autocast(x.device.type, enabled=False):
        return _run(_cast(x, dtype), _cast(weight, dtype), _cast(bias, dtype), _cast(b, dtype), transposed)


def decompose(x: Tensor, weight: Tensor, bias: Optional[Tensor], b: Tensor, transposed: bool = False) -> Tensor:
    """The paper's Listing 1 in plain ops (what ``torch.compile`` traces and Inductor
    fuses); for float16 / bfloat16 the term is computed and added in float32, as in the
    eager kernel."""
    y = F.linear(x, _as_in_out(weight, transposed).t(), bias)
    if x.dtype in _LOW:
        return (y.float() + b.float() * x.sum(-1, keepdim=True, dtype=torch.float32)).to(y.dtype)
    return y + b * x.sum(-1, keepdim=True)


def expert_of_rows(offsets: Tensor, rows: int) -> Tensor:
    """The expert of each row of a grouped matmul's input: rows ``[offs[e-1], offs[e])``
    belong to expert ``e``; rows at or past ``offs[-1]`` to none (index ``E``)."""
    index = torch.arange(rows, device=offsets.device, dtype=offsets.dtype)
    return torch.searchsorted(offsets, index, right=True)


def expert_term(y: Tensor, x: Tensor, offsets: Optional[Tensor], b: Tensor) -> Tensor:
    """``y`` plus each row's 1LoRA term for its expert: ``y[r] + b[e(r)] * x[r].sum()``.

    ``y`` is a grouped matmul of ``x`` (rows sorted by expert, ``offsets`` the running
    row counts) with expert weights ``[E, ...]``, or (``offsets`` None) a batched matmul
    ``bmm(x, W)`` whose batch ``e`` is expert ``e``; ``b`` is ``[E, out]``. For float16 /
    bfloat16 the term is computed and added in float32, as in :func:`linear`.

    Examples:
        >>> x, b = torch.ones(3, 2), torch.tensor([[1.0], [10.0]])
        >>> expert_term(torch.zeros(3, 1), x, torch.tensor([1, 3]), b).flatten().tolist()
        [2.0, 20.0, 20.0]
    """
    low = y.dtype in _LOW
    dtype = torch.float32 if low else y.dtype
    s = x.sum(-1, keepdim=True, dtype=dtype)
    if offsets is None:  # bmm: [E, rows, in] -> [E, rows, out]
        term = b.to(dtype).unsqueeze(1) * s
    else:
        experts = b.shape[0]
        e = expert_of_rows(offsets, x.shape[0])
        routed = (e < experts).unsqueeze(-1)
        rows = b.index_select(0, e.clamp(max=experts - 1)).to(dtype)
        term = torch.where(routed, rows * s, 0.0)
    return (y.float() + term).to(y.dtype) if low else y + term


#: how a stacked site's rows meet the batch: ``x`` is ``[batch, ..., in]`` ...
LEADING = "leading"
#: ... or ``[batch * n, in]``, each item's ``n`` rows together (GPT-2's ``Conv1D``) ...
FLATTENED = "flattened"
#: ... or either, told from the shapes at run time (no graph to read it from)
BY_SHAPE = "by_shape"


def rows_layout(x: Tensor, items: int, site: str) -> str:
    """:data:`LEADING` or :data:`FLATTENED` for a call whose batch has ``items`` items."""
    if x.dim() >= 2 and x.shape[0] == items:
        return LEADING
    if x.dim() == 2 and items and x.shape[0] % items == 0:
        return FLATTENED
    raise ValueError(
        f"{site}: adapter_ids has {items} entries but this call's input is {tuple(x.shape)}; adapter_ids "
        "needs one entry per item of the batch (the first dimension of the model's inputs)"
    )


class _RowsFunction(torch.autograd.Function):
    """:func:`linear_rows` in eager mode, as lean as :class:`_OneLoRALinearFunction`: the
    gathered rank-1 term is the GEMM's accumulator, backward keeps ``s`` and the gathered
    rows of ``B`` and reduces each item's gradient with one batched matmul. Each item's
    rows are contiguous in ``x`` (batch first, or flattened item by item)."""

    @staticmethod
    def forward(ctx, x, weight, bias, B, ids, transposed):  # type: ignore[override]
        n = ids.shape[0]
        w = _as_in_out(weight, transposed)
        out = w.shape[1]
        s = x.sum(-1).reshape(n, -1, 1)  # [n, rows per item, 1]
        chosen = _chosen(B, ids, x.dtype)
        rank1 = chosen.unsqueeze(1)
        y = torch.empty((*x.shape[:-1], out), dtype=x.dtype, device=x.device)  # never a view (see _forward)
        acc = y.view(n, -1, out)
        if bias is None:
            torch.mul(rank1, s, out=acc)
        else:
            torch.addcmul(bias.to(x.dtype), rank1, s, out=acc)
        y.view(-1, out).addmm_(x.reshape(-1, x.shape[-1]), w)
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, s, weight, chosen, ids)
        ctx.transposed, ctx.experts = transposed, B.shape[0]
        return y

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, s, weight, chosen, ids = ctx.saved_tensors
        n, out = chosen.shape
        g3 = g.reshape(n, -1, out)
        g2 = g3.reshape(-1, out)
        w = _as_in_out(weight, ctx.transposed)
        grad_x = grad_w = grad_bias = grad_B = None
        if ctx.needs_input_grad[0]:
            gb = torch.bmm(g3, chosen.to(g.dtype).unsqueeze(-1)).reshape(-1, 1)  # g · b of each row's adapter
            grad_x = torch.addmm(gb.expand(g2.shape[0], w.shape[0]), g2, w.t()).view(*g.shape[:-1], w.shape[0])
        if ctx.needs_input_grad[1]:
            x2 = x.reshape(-1, x.shape[-1])
            grad_w = x2.t().mm(g2) if ctx.transposed else g2.t().mm(x2)
        if ctx.needs_input_grad[2]:
            grad_bias = g2.sum(0)
        if ctx.needs_input_grad[3]:
            # sᵀ g per item, as a vector-matrix product over the contiguous gradient
            per_item = torch.bmm(s.to(g.dtype).transpose(1, 2), g3).squeeze(1) * (ids >= 0).unsqueeze(-1).to(g.dtype)
            grad_B = g.new_zeros(ctx.experts, out).index_add_(0, ids.clamp(min=0), per_item)
        return grad_x, grad_w, grad_bias, grad_B, None, None


def _chosen(B: Tensor, ids: Tensor, dtype: torch.dtype) -> Tensor:
    """Each item's ``b`` (zeros for id ``-1``): ``[n, out]``."""
    return B.index_select(0, ids.clamp(min=0)).to(dtype) * (ids >= 0).unsqueeze(-1).to(dtype)


def _per_row(chosen: Tensor, x: Tensor, rows: str) -> Tensor:
    """``chosen`` ``[n, out]`` laid out to broadcast against ``x``'s rows."""
    n = chosen.shape[0]
    if rows == FLATTENED:
        return chosen.unsqueeze(1).expand(n, x.shape[0] // n, chosen.shape[-1]).reshape(x.shape[0], chosen.shape[-1])
    return chosen.reshape(n, *([1] * (x.dim() - 2)), chosen.shape[-1])


def batch_source(values: Sequence[Any]) -> Optional[Any]:
    """Which of a call's inputs (tensors, or fake tensors of a graph) gives the batch size:
    the first whose first dimension is not a broadcast 1 (``position_ids`` of shape
    ``[1, S]`` beside ``inputs_embeds [B, S, E]``), else the first with a dimension.

    Examples:
        >>> batch_source([torch.zeros(1, 5), torch.zeros(3, 5, 8)]).shape[0]
        3
    """
    shaped = [v for v in values if getattr(v, "dim", None) is not None and v.dim() > 0]
    return next((v for v in shaped if not (isinstance(v.shape[0], int) and v.shape[0] == 1)), shaped[0] if shaped else None)


def check_ids(ids: Optional[Tensor], batch: Optional[Tensor], adapters: int) -> Tensor:
    """``adapter_ids`` checked against the call and the stack, as ``int64``.

    One entry per item of the batch (``batch``'s first dimension), an integer tensor,
    every value in ``[-1, adapters)``. Checked in eager calls with a ``ValueError`` /
    ``TypeError`` saying what was expected; in a compiled or exported program the same
    conditions are runtime assertions of the program (no device synchronization).

    Examples:
        >>> check_ids(torch.tensor([0, -1], dtype=torch.int16), torch.zeros(2, 5), 2).dtype
        torch.int64
    """
    if ids is None:
        raise ValueError(f"this module stacks {adapters} adapters: call it with adapter_ids=... "
                         "(one adapter index per batch item, -1 for the base model)")
    if not isinstance(ids, Tensor) or ids.dim() != 1 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"adapter_ids must be a 1-D integer tensor (one adapter index per batch item), got {_describe(ids)}")
    items = batch.shape[0] if isinstance(batch, Tensor) and batch.dim() else None
    tracing = torch.compiler.is_compiling()
    if items is not None:
        if tracing:
            check(ids.shape[0] == items, lambda: "adapter_ids needs one entry per batch item")
        elif ids.shape[0] != items:
            raise ValueError(f"adapter_ids has {ids.shape[0]} entries but the batch has {items} items: give one adapter "
                             "index per batch item (the first dimension of the model's inputs), -1 for the base model")
    ids = ids.to(torch.int64)
    in_range = ((ids >= -1) & (ids < adapters)).all()
    if tracing or ids.device.type != "cpu":
        # no host synchronization: an assertion of the program (on the device on GPUs)
        assert_async(in_range, f"adapter_ids must be in [-1, {adapters - 1}] ({adapters} adapters; -1 is the base model)")
    elif not bool(in_range):
        raise ValueError(f"adapter_ids must be in [-1, {adapters - 1}] ({adapters} adapters; -1 is the base model), "
                         f"got {ids.tolist()}")
    return ids


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dim()}-D {value.dtype} tensor"
    return f"{type(value).__name__} {value!r}"


def linear_rows(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], B: Tensor, ids: Tensor, transposed: bool = False, rows: str = LEADING
) -> Tensor:
    """Many adapters in one batch: ``linear(x) + B[ids[i]] * x[i].sum(-1)`` for row ``i``.

    ``B`` is ``[K, out]`` (one ``b`` per adapter), ``ids`` one adapter index per batch
    item (checked by :func:`check_ids`), ``-1`` for none. One gather per call; each
    item's gradient reaches only its own adapter's row of ``B``. The rank-1 term is the
    GEMM's accumulator, as in :func:`linear`; for float16 / bfloat16 it is computed and
    added in float32.

    Examples:
        >>> x, W = torch.ones(3, 2), torch.zeros(4, 2)
        >>> B = torch.stack([torch.full((4,), 1.0), torch.full((4,), 2.0)])
        >>> linear_rows(x, W, None, B, torch.tensor([1, -1, 0]))[:, 0].tolist()
        [4.0, 0.0, 2.0]
    """
    dtype = _autocast_dtype(x)
    if dtype is not None:
        with torch.autocast(x.device.type, enabled=False):
            return linear_rows(_cast(x, dtype), _cast(weight, dtype), _cast(bias, dtype), _cast(B, dtype), ids, transposed, rows)
    n = ids.shape[0]
    if rows == BY_SHAPE or not torch.compiler.is_compiling():
        rows = rows_layout(x, n, "a stacked linear") if rows == BY_SHAPE else _checked_layout(x, n, rows)
    w = _as_in_out(weight, transposed)
    if x.dtype in _LOW:  # the base layer exactly, the term added once in float32
        term = _per_row(_chosen(B, ids, torch.float32), x, rows) * x.sum(-1, keepdim=True, dtype=torch.float32)
        return (F.linear(x, w.t(), bias).float() + term).to(x.dtype)
    if not torch.compiler.is_compiling():
        return _RowsFunction.apply(x, weight, bias, B, ids, transposed)
    # compiled / exported: the same in plain ops, which Inductor fuses and export keeps
    out = w.shape[1]
    acc = (_per_row(_chosen(B, ids, x.dtype), x, rows) * x.sum(-1, keepdim=True)).expand(*x.shape[:-1], out).reshape(-1, out)
    if bias is not None:
        acc = acc + bias.to(x.dtype)
    return acc.addmm(x.reshape(-1, x.shape[-1]), w).view(*x.shape[:-1], out)


def _checked_layout(x: Tensor, items: int, rows: str) -> str:
    """A layout read from the graph, checked against this call's shapes."""
    ok = x.dim() >= 2 and x.shape[0] == items if rows == LEADING else x.dim() == 2 and items and x.shape[0] % items == 0
    if not ok:
        raise ValueError(f"a stacked linear's input is {tuple(x.shape)} for {items} batch items: adapter_ids needs one "
                         "entry per item of the batch (the first dimension of the model's inputs)")
    return rows


def add_rows_term(y: Tensor, x: Tensor, B: Tensor, ids: Tensor, rows: str = LEADING) -> Tensor:
    """:func:`add_term` for a stack: row ``i`` of the batch adds ``B[ids[i]]``'s term."""
    n = ids.shape[0]
    rows = rows_layout(x, n, "a stacked linear") if rows == BY_SHAPE else rows
    dtype = torch.float32 if y.dtype in _LOW else y.dtype
    term = _per_row(_chosen(B, ids, dtype), x, rows) * x.sum(-1, keepdim=True, dtype=dtype)
    return (y.to(dtype) + term).to(y.dtype)
