"""The graph form: a captured graph (``torch.fx.symbolic_trace`` or ``torch.export``)
whose adapted calls go through :func:`onelora_fx.ops.linear`.

capture (one call, both modes) -> calls (which graph serves which call) -> modes
(``train()`` / ``eval()``) -> module (:class:`CapturedModule`) -> rewrite (the pass) ->
form (:class:`GraphForm`, the :class:`~onelora_fx.forms.base.Form` interface).
"""

from .form import GraphForm

__all__ = ["GraphForm"]
