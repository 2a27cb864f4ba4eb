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


def listing1_copy(model: nn.Module, vectors: dict[str, torch.Tensor]) -> nn.Module:
    """A deep copy of ``model`` with each module ``path`` in ``vectors`` wrapped by
    Listing 1 carrying that ``b`` (keys are module paths, as ``owner`` in sites)."""
    ref = copy.deepcopy(model)
    for path, b in vectors.items():
        parent_path, _, leaf = path.rpartition(".")
        parent = ref.get_submodule(parent_path) if parent_path else ref
        setattr(parent, leaf, ILoRA(getattr(parent, leaf), b))
    return ref


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


def folded(model: nn.Module, gm: nn.Module) -> nn.Module:
    """A deep copy of ``model`` (eval mode) with ``W + b 1ᵀ`` of every adapted site of
    ``gm`` written into its weights, in float64 then cast: ``W[i, :] += b[i]`` for an
    ``[out, in]`` weight, ``W[:, j] += b[j]`` for ``[in, out]``, per expert for expert
    weights. Written here, not taken from the library's merge."""
    import onelora_fx as ol

    ref = copy.deepcopy(model)
    with torch.no_grad():
        for s in ol.sites(gm):
            if s.adapted and s.call_index == 0:
                b = gm.get_parameter(s.adapter_name).detach().double()
                w = ref.get_parameter(s.weight_name)
                delta = b.unsqueeze(-1) if s.layout is ol.Layout.OUT_IN else b.unsqueeze(-2)
                w.copy_((w.double() + delta).to(w.dtype))
    return ref.eval()
