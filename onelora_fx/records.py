"""The site record: one linear call, as data, and the names derived from it.

A :class:`LinearSite` is made once, by the analysis that finds it (a graph read by
:mod:`onelora_fx.analysis.sites`, or a recorded forward of the model for the module
form), always through :meth:`LinearSite.of`. ``transform`` stores the records of every
site in the adapter state (:mod:`onelora_fx.state`), and every later stage (merge,
adapter files, summaries, stacks) reads them back instead of finding them again.

Nothing here imports the rest of the package.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch
from torch import fx, nn

__all__ = ["Layout", "LinearSite", "ADAPTER_SUFFIX", "join", "adapter_name_for", "resolve_attr", "vector_placements"]

ADAPTER_SUFFIX = "onelora_b"


class Layout(str, enum.Enum):
    """How a weight is stored."""

    #: ``[out, in]``, ``y = x Wᵀ`` (``nn.Linear``); merge folds ``W + b[:, None]``
    OUT_IN = "out_in"
    #: ``[in, out]``, ``y = x W`` (GPT-2 ``Conv1D``, ``x @ W``); merge folds ``W + b[None, :]``
    IN_OUT = "in_out"


def join(prefix: str, name: str) -> str:
    """``join("encoder.q", "weight") == "encoder.q.weight"``; an empty prefix adds nothing."""
    return f"{prefix}.{name}" if prefix else name


def adapter_name_for(owner: str, attr: str) -> str:
    """``encoder.q.weight`` -> ``encoder.q.onelora_b``; ``experts.w1`` -> ``experts.w1_onelora_b``."""
    return join(owner, ADAPTER_SUFFIX if attr == "weight" else f"{attr}_{ADAPTER_SUFFIX}")


def resolve_attr(root: nn.Module, target: str) -> Any:
    """The object at a dotted attribute path (a ``get_attr`` target), or None."""
    obj: Any = root
    for part in str(target).split("."):
        if part:
            obj = getattr(obj, part, None)
            if obj is None:
                return None
    return obj


@dataclass(frozen=True)
class LinearSite:
    """One linear call in a captured (or adapted) module.

    Attributes:
        name: what patterns match: the module path of the weight's owner, plus
            ``.<attr>`` when the weight is not called ``weight`` (``experts.w1``).
        weight_name: the weight's fully qualified name, as in ``state_dict()``.
        owner, attr: ``weight_name`` split at its last dot.
        adapter_name: where this weight's ``b`` lives (``<owner>.onelora_b``, or
            ``<owner>.<attr>_onelora_b``); one per weight, shared by all its calls.
        in_features, out_features: the call's sizes (per expert for expert weights).
        layout: how the weight is stored (see :class:`Layout`).
        has_bias: the call adds a bias.
        kind: how the call appears (``nn.Linear``, ``linear``, ``addmm``, ``mm``,
            ``matmul``, ``grouped_mm``, ``module`` for a layer of the module form).
        is_head: the call is the model's output head (see :mod:`onelora_fx.analysis.heads`).
        call_index, calls: this is call ``call_index`` of ``calls`` calls of the weight
            (a layer called twice, or a weight tied to another linear).
        adapted: the call carries a 1LoRA vector.
        selected: chosen by the pattern in effect (``transform``'s, or ``sites``').
        dtype, device: the weight's.
        experts: ``E`` for an expert weight ``[E, ...]`` (``b`` is then ``[E, out]``),
            else None.
        caller: the module path whose forward makes the call (where the module form
            intercepts it).
        norm: the LayerNorm whose output this call reads directly (through shape ops
            and dropout only), as that norm's module path, or None.
        norm_scale_cv: how far that LayerNorm's scale is from uniform (coefficient of
            variation of ``γ``; None when unknown, e.g. on the meta device).
        rows: ``(start, stop)`` when the call reads only these output rows of the
            weight (a split of a packed weight: MHA's q and kv rows of one
            ``in_proj_weight``); it then uses the same rows of the weight's one ``b``,
            whose length is ``weight_out``. None for the whole weight.
        weight_out: the weight's full output size (``b``'s length).
        quantized: the weight's storage when it is not a plain tensor (``Int8Tensor``,
            ``Params4bit``, ...): the call stays the quantized one, merge dequantizes.
    """

    name: str
    weight_name: str
    owner: str
    attr: str
    adapter_name: str
    in_features: int
    out_features: int
    layout: Layout
    has_bias: bool
    kind: str
    is_head: bool = False
    call_index: int = 0
    calls: int = 1
    adapted: bool = False
    selected: bool = False
    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")
    experts: Optional[int] = None
    caller: str = ""
    norm: Optional[str] = None
    norm_scale_cv: Optional[float] = None
    rows: Optional[tuple[int, int]] = None
    weight_out: int = 0
    quantized: Optional[str] = None
    # Handles on a live module: graph nodes (the graph form) and the weight tensor. A
    # record kept in the adapter state holds none of them (see :meth:`record`).
    node: Optional[fx.Node] = field(default=None, compare=False, repr=False)
    input: Optional[fx.Node] = field(default=None, compare=False, repr=False)
    weight_arg: Optional[fx.Node] = field(default=None, compare=False, repr=False)
    bias_arg: Optional[fx.Node] = field(default=None, compare=False, repr=False)
    offsets_arg: Optional[fx.Node] = field(default=None, compare=False, repr=False)
    #: the weight argument is ``[in, out]`` as the call sees it (``ops.linear``'s flag)
    arg_transposed: bool = field(default=False, compare=False, repr=False)
    weight: Optional[torch.Tensor] = field(default=None, compare=False, repr=False)

    @classmethod
    def of(
        cls, owner: str, attr: str, weight: torch.Tensor, layout: Layout, kind: str, *,
        shape: Optional[tuple[int, ...]] = None, rows: Optional[tuple[int, int]] = None, **more: Any,
    ) -> "LinearSite":
        """The one factory: names, sizes and expert count follow from the weight.

        ``shape`` is the weight's logical shape when its storage is packed (a 4-bit
        weight); ``rows`` the output rows a sliced call reads.

        Examples:
            >>> s = LinearSite.of("q_proj", "weight", torch.zeros(8, 4), Layout.OUT_IN, "linear")
            >>> s.name, s.adapter_name, s.in_features, s.out_features
            ('q_proj', 'q_proj.onelora_b', 4, 8)
        """
        shape = tuple(weight.shape) if shape is None else tuple(shape)
        out_f, in_f = (shape[-1], shape[-2]) if layout is Layout.IN_OUT else (shape[-2], shape[-1])
        return cls(
            name=owner if attr == "weight" else join(owner, attr), weight_name=join(owner, attr), owner=owner,
            attr=attr, adapter_name=more.pop("adapter_name", None) or adapter_name_for(owner, attr),
            in_features=int(in_f), out_features=int(rows[1] - rows[0] if rows else out_f), layout=layout,
            kind=kind, has_bias=more.pop("has_bias", False), dtype=more.pop("dtype", weight.dtype),
            device=more.pop("device", weight.device), experts=int(shape[0]) if len(shape) == 3 else None,
            rows=rows, weight_out=int(out_f), weight=weight, **more,
        )

    @property
    def vector_shape(self) -> tuple[int, ...]:
        """The shape of this weight's ``b``: ``[out]``, or ``[E, out]`` for experts."""
        return (self.experts, self.weight_out) if self.experts else (self.weight_out,)

    def new_vector(self) -> nn.Parameter:
        """A zero ``b`` for this site's weight: its dtype (the compute dtype of a quantized
        one) and device, and, when the weight is a ``DTensor`` (tensor parallelism), a
        DTensor on the same mesh placed as the weight's output dimension is: sharded
        where the output rows are (column-parallel), replicated where the input
        features are (row-parallel: each rank adds ``b * sum(x_local)`` into its partial
        output, and the reduction that already exists sums the parts into
        ``b * sum(x)``: no extra communication)."""
        weight = self.weight
        placements = vector_placements(weight, self.layout, self.vector_shape) if weight is not None else None
        if placements is None:
            return nn.Parameter(torch.zeros(self.vector_shape, dtype=self.dtype, device=self.device))
        from torch.distributed.tensor import zeros

        return nn.Parameter(zeros(self.vector_shape, dtype=self.dtype, device_mesh=weight.device_mesh, placements=placements))

    def record(self) -> "LinearSite":
        """This site as data: no graph node, no tensor (what the adapter state keeps)."""
        return replace(self, node=None, input=None, weight_arg=None, bias_arg=None, offsets_arg=None, weight=None)

    @property
    def key(self) -> tuple[str, int]:
        """What identifies a call among the records: the weight and the call's index."""
        return (self.weight_name, self.call_index)


def vector_placements(weight: torch.Tensor, layout: Layout, shape: tuple[int, ...]) -> Optional[list]:
    """The placements of ``b`` for a DTensor weight (see :meth:`LinearSite.new_vector`), or
    None for a plain weight."""
    placements = getattr(weight, "placements", None)
    if placements is None or not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import Replicate, Shard

    out_dim = weight.dim() - (1 if layout is Layout.IN_OUT else 2)  # the weight's output dimension
    to_b = {out_dim: len(shape) - 1}
    if weight.dim() == 3:
        to_b[0] = 0  # experts
    out = []
    for p in placements:
        dim = getattr(p, "dim", None) if p.is_shard() else None
        out.append(Shard(to_b[dim % weight.dim()]) if dim is not None and dim % weight.dim() in to_b else Replicate())
    return out
