"""Independent references: the paper's Listing 1, and helpers to apply it by hand."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

#: every device numerical tests run on: the CPU always, CUDA where there is one
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")),
]


class ILoRA(nn.Module):
    """Listing 1 of the paper, verbatim (plus a layout switch for GPT-2's Conv1D)."""

    def __init__(self, linear: nn.Module, b: torch.Tensor):
        super().__init__()
        self.linear = linear
        self.b = nn.Parameter(b.detach().clone())

    def forward(self, x):
        ilora = self.b * x.sum(-1, keepdim=True)
        return self.linear(x) + ilora


#: the output heads of the zoo's models, the tests' tiny LLaMA and the hand-written MLP, by module name
HEAD_NAMES = ("lm_head", "classifier", "pooler.dense", "proj_out_2", "head")


def linear_layers(model: nn.Module, heads: tuple[str, ...] = HEAD_NAMES) -> set[str]:
    """The paths of ``model``'s ``nn.Linear`` (and GPT-2 ``Conv1D``) modules, except its
    heads: what ``"all-linear"`` must adapt, read from the module tree (never from
    onelora_fx, so that a layer the library misses is missed by the reference too)."""
    return {n for n, m in model.named_modules() if (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D")
            and not any(n == h or n.endswith("." + h) for h in heads)}


def matrix_weights(model: nn.Module) -> set[str]:
    """Every parameter name of two or more dimensions outside embedding tables and
    convolutions, and not named as a bias (experts' biases are ``[E, out]``; a tied head
    is listed under its own name too): what ``"all"`` must adapt in a
    model whose other matrices are all read by matrix products; read from the module tree."""
    return {f"{owner}.{name}".lstrip(".") for owner, m in model.named_modules(remove_duplicate=False)
            if not isinstance(m, (nn.Embedding, nn.modules.conv._ConvNd))
            for name, p in m.named_parameters(recurse=False) if p.dim() >= 2 and not name.endswith("bias")}


def listing1_copy(model: nn.Module, vectors: dict[str, torch.Tensor], expected: set[str]) -> nn.Module:
    """A deep copy of ``model`` with each module ``path`` in ``vectors`` wrapped by
    Listing 1 carrying that ``b`` (keys are module paths, as ``owner`` in sites).

    ``expected``: the module paths that must carry a vector, stated by the test from the
    model's definition (e.g. :func:`linear_layers`): an adapter missing one fails here."""
    missing, extra = set(expected) - set(vectors), set(vectors) - set(expected)
    assert not missing and not extra, f"adapted sites differ from the expected ones: missing {sorted(missing)}, extra {sorted(extra)}"
    ref = copy.deepcopy(model)
    for path, b in vectors.items():
        parent_path, _, leaf = path.rpartition(".")
        parent = ref.get_submodule(parent_path) if parent_path else ref
        setattr(parent, leaf, ILoRA(getattr(parent, leaf), b))
    return ref


def hooked(model, vectors, where):
    """The reference: a copy of ``model`` whose modules ``where`` (``{path: vector name}``)
    add ``b * input.sum(-1)`` to their outputs in forward hooks, ``b`` a leaf copy of that
    vector; returns ``(copy, {vector name: leaf})``."""
    ref, leaves = copy.deepcopy(model), {}
    for path, name in where.items():
        b = leaves[name] = vectors[name].detach().clone().requires_grad_(True)
        ref.get_submodule(path).register_forward_hook(lambda mod, inp, out, b=b: out + b * inp[0].sum(-1, keepdim=True))
    return ref, leaves


def randomize_adapters(gm: nn.Module, seed: int = 0, scale: float = 0.1) -> dict[str, torch.Tensor]:
    """Give every b vector random values; returns ``{site name: b}``."""
    import onelora_fx as ol

    g = torch.Generator().manual_seed(seed)
    out, done = {}, set()
    with torch.no_grad():
        for site in ol.sites(gm):
            if not site.adapted:
                continue
            b = gm.get_parameter(site.adapter_name)
            if site.adapter_name not in done:
                b.copy_((torch.randn(b.shape, generator=g) * scale).to(b.dtype))
                done.add(site.adapter_name)
            out[site.name] = b.detach().clone()
    return out


def first_tensor(out):
    """The main tensor of a model output (logits, last_hidden_state, sample, ...)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return first_tensor(out[0])
    if hasattr(out, "values"):
        return first_tensor(next(iter(v for v in out.values() if v is not None)))
    raise TypeError(type(out))


def tolerance(dtype: torch.dtype) -> dict:
    """Tolerances depend on the dtype only, never on the model."""
    return {
        torch.float64: dict(rtol=1e-10, atol=1e-10),
        torch.float32: dict(rtol=1e-5, atol=1e-5),
        torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
        torch.float16: dict(rtol=2e-3, atol=2e-3),
    }[dtype]


def base_capture(model: nn.Module, args: tuple = (), kwargs: dict | None = None) -> torch.fx.GraphModule:
    """The un-adapted capture of ``model`` (what a merged graph must equal, op for op)."""
    from onelora_fx.state import Capture
    from onelora_fx.forms import GraphForm

    return GraphForm().capture(model, tuple(args), dict(kwargs or {}), True, Capture.AUTO).root


def folded(model: nn.Module, gm: nn.Module, expected: set[str]) -> nn.Module:
    """A deep copy of ``model`` (eval mode) with ``W + b 1ᵀ`` of every adapted site of
    ``gm`` written into its weights, in float64 then cast: ``W[i, :] += b[i]`` for an
    ``[out, in]`` weight, ``W[:, j] += b[j]`` for ``[in, out]``, per expert for expert
    weights. Written here, not taken from the library's merge.

    ``expected``: the weight names that must be adapted, stated by the test from the
    model's definition (e.g. :func:`matrix_weights`): a weight the library misses fails here."""
    import onelora_fx as ol

    adapted = {s.weight_name for s in ol.sites(gm) if s.adapted}
    assert adapted == set(expected), f"adapted weights differ: missing {sorted(set(expected) - adapted)}, extra {sorted(adapted - set(expected))}"
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for s in ol.sites(gm):
            if s.adapted and s.call_index == 0:
                b = gm.get_parameter(s.adapter_name).detach().double()
                w = ref.get_parameter(s.weight_name)
                delta = b.unsqueeze(-1) if s.layout is ol.Layout.OUT_IN else b.unsqueeze(-2)
                w.copy_((w.double() + delta).to(w.dtype))
    return ref.eval()


#: aten ops that only move, view, make or check values: left out when two graphs are
#: compared op for op (a capture may drop an unused ``arange`` or add a ``contiguous``)
_BOOKKEEPING = ("sym_", "contiguous", "arange", "slice", "unsqueeze", "view", "expand", "clone", "_assert", "alias",
                "lift_fresh", "detach", "select", "squeeze", "reshape", "permute", "transpose", "t.default", "_to_copy",
                "to.", "dropout", "full", "zeros", "ones", "empty", "scalar_tensor")


def compute_ops(graph: torch.fx.Graph) -> list[str]:
    """The aten ops of ``graph`` that compute (matrix products, norms, activations,
    arithmetic, reductions), in order."""
    return [str(n.target) for n in graph.nodes if n.op == "call_function" and str(n.target).startswith("aten.")
            and not any(str(n.target)[len("aten."):].startswith(b) for b in _BOOKKEEPING)]


def exported_base_ops(model: nn.Module, args: tuple = (), kwargs: dict | None = None) -> list[str]:
    """:func:`compute_ops` of ``torch.export`` of the un-adapted model itself (every
    input dimension dynamic, dead code dropped): what a merged graph must compute, op for
    op, taken from torch, not from onelora_fx's capture."""
    from torch.export import Dim

    kwargs = dict(kwargs or {})

    def spec(v):
        return {i: Dim.AUTO for i in range(v.dim())} if isinstance(v, torch.Tensor) else None

    # every dimension dynamic, as onelora_fx captures (positional or keyword examples)
    dynamic = {k: spec(v) for k, v in kwargs.items()} if not args else tuple(spec(a) for a in args) if not kwargs else None
    was = model.training
    model.eval()
    try:
        program = torch.export.export(model, tuple(args), kwargs, dynamic_shapes=dynamic, strict=False).module()
    finally:
        model.train(was)
    program.graph.eliminate_dead_code()
    return compute_ops(program.graph)
