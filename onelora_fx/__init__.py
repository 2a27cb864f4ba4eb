"""onelora_fx: 1LoRA fine-tuning as a PyTorch graph pass.

1LoRA (Quercia et al.) adapts a frozen linear layer ``y = W x + bias`` with one trainable
vector ``b``: ``y = linear(x, W, bias) + b * x.sum(-1, keepdim=True)``, i.e.
``ΔW = b 1ᵀ``.

Example:
    >>> import onelora_fx as ol
    >>> gm = ol.transform(model, "all-linear", example_kwargs={"input_ids": ids})  # doctest: +SKIP
"""

from . import backend as _backend  # noqa: F401  (registers torch.compile(..., backend="onelora"))
from .adapters import AdapterFileError, load_adapter, save_adapter
from .capture import Capture, CaptureError
from .export import ExportError, export
from .fold import MergeError
from .forms.layers import SiteError
from .graph_module import MoveError
from .merge import merge
from .patterns import PatternError
from .peft_io import load_peft, save_peft
from .query import adapted_sites, adapter_parameters, is_adapted
from .rewrite import AlreadyAdaptedError
from .sites import Layout, LinearSite
from .stack import stack, unstack
from .state import Extra
from .summary import summary
from .transform import sites, transform

__all__ = [
    "transform",
    "sites",
    "summary",
    "adapter_parameters",
    "adapted_sites",
    "is_adapted",
    "merge",
    "MergeError",
    "export",
    "ExportError",
    "save_adapter",
    "load_adapter",
    "stack",
    "unstack",
    "save_peft",
    "load_peft",
    "AdapterFileError",
    "LinearSite",
    "Layout",
    "Extra",
    "Capture",
    "CaptureError",
    "MoveError",
    "SiteError",
    "PatternError",
    "AlreadyAdaptedError",
]
