"""onelora_fx: 1LoRA fine-tuning as a PyTorch graph pass.

1LoRA (Quercia et al.) adapts a frozen linear layer ``y = W x + bias`` with one trainable
vector ``b``: ``y = linear(x, W, bias) + b * x.sum(-1, keepdim=True)``, i.e.
``ΔW = b 1ᵀ``.

Examples:
    >>> import onelora_fx as ol
    >>> gm = ol.transform(model, "all-linear", example_kwargs={"input_ids": ids})  # doctest: +SKIP
"""

import logging as _logging

from .adapters.files import AdapterFileError, load_adapter, save_adapter
from .adapters.load import load
from .adapters.peft import load_peft, save_peft
from .adapters.stack import stack, unstack
from .adapters.trainer import adapter_checkpoints
from .analysis.patterns import PatternError
from .compile import backend as _backend  # noqa: F401  (registers torch.compile(..., backend="onelora"))
from .deploy.export import ExportError, export, export_onnx
from .deploy.merge import merge, unmerge
from .deploy.offline import merge_checkpoint
from .fold import MergeError
from .forms.graph.capture import CaptureError
from .forms.graph.module import MoveError
from .forms.module.layers import SiteError
from .query import adapted_sites, adapter_parameters, is_adapted
from .records import Layout, LinearSite
from .state import AdapterStateError, AlreadyAdaptedError, Capture, Extra, OneLoRAWarning
from .summary import summary
from .switch import disabled
from .transform import sites, transform

# a library logs; the application decides what is shown (nothing, until it configures logging)
_logging.getLogger(__name__).addHandler(_logging.NullHandler())

from importlib.metadata import PackageNotFoundError as _NotInstalled, version as _version

try:
    __version__ = _version("onelora-fx")
except _NotInstalled:  # a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "transform",
    "sites",
    "summary",
    "adapter_parameters",
    "adapted_sites",
    "is_adapted",
    "disabled",
    "merge",
    "unmerge",
    "merge_checkpoint",
    "MergeError",
    "export",
    "export_onnx",
    "ExportError",
    "save_adapter",
    "load_adapter",
    "load",
    "adapter_checkpoints",
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
    "AdapterStateError",
    "OneLoRAWarning",
    "__version__",
]
