"""The two forms an adapted model takes, behind one interface (:class:`Form`).

* :mod:`onelora_fx.forms.graph`: a captured graph (``torch.fx.GraphModule``), called
  like the model; what ``torch.compile`` and ``torch.export`` work on best.
* :mod:`onelora_fx.forms.module`: a copy of the model's own class whose layers carry the
  vectors; ``generate()``, ``save_pretrained()``, per-layer FSDP and anything else the
  class offers keep working.

``transform`` chooses the form once; every later stage asks :func:`form_of` and calls the
same methods, whichever form it has.
"""

from torch import fx, nn

from .base import Captured, Form, Plan
from .graph import GraphForm
from .module import ModuleForm

__all__ = ["Captured", "Form", "Plan", "GraphForm", "ModuleForm", "form_of"]


def form_of(module: nn.Module) -> Form:
    """The form ``module`` is held in: a graph (any ``GraphModule``) or the module form."""
    return GraphForm() if isinstance(module, fx.GraphModule) else ModuleForm()
