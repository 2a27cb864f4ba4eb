"""The two forms an adapted model takes, behind one interface (:class:`Form`).

* :mod:`onelora_fx.forms.graph`: a captured graph (``torch.fx.GraphModule``), called
  like the model; what ``torch.compile`` and ``torch.export`` work on best.
* :mod:`onelora_fx.forms.module`: a copy of the model's own class whose layers carry the
  vectors; ``generate()``, ``save_pretrained()``, per-layer FSDP and anything else the
  class offers keep working.

``transform`` chooses the form once and records it in the adapter state; every later
stage asks :func:`form_of`, which reads that record (never the module's type), and calls
the same methods whichever form it has. An ``fx.GraphModule`` adapted in the module form
is a module form.
"""

from typing import Optional

from torch import nn

from ..state import Capture, get_state
from .base import Captured, Form, Plan
from .graph import GraphForm
from .module import ModuleForm

__all__ = ["Captured", "Form", "Plan", "GraphForm", "ModuleForm", "form_of", "form_for"]


def form_for(method: Capture) -> Form:
    """The form a capture method makes: ``fx`` / ``export`` a graph, ``module`` the module form."""
    return ModuleForm() if Capture(method) is Capture.MODULE else GraphForm()


def form_of(module: nn.Module) -> Optional[Form]:
    """The form an adapted module is held in, as ``transform`` recorded it; None for a
    module that is not adapted."""
    state = get_state(module)
    return None if state is None else form_for(state.capture)
