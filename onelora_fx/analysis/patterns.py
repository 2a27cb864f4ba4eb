"""Patterns: every way to choose sites compiles to one predicate over LinearSite.

A pattern is one of

* ``"all-linear"``: every site but the model's output head (the paper's choice),
* ``"all"``: every site, the head too,
* a bare name (no dots, no ``*?[]``): a module's own name at any depth, as PEFT's
  ``target_modules`` reads it: ``"q_proj"`` is ``model.layers.0.self_attn.q_proj`` (and a
  top-level ``q_proj``), never ``lm_q_proj``,
* any other string: a glob (``fnmatch``, ``*`` crosses dots) on :attr:`LinearSite.name`,
  e.g. ``"*.q_proj"``, ``"encoder.layer.*.attention.*"``,
* a compiled regex (``re.compile(...)``), or a string ``"re:<regex>"``, matched with
  ``fullmatch`` on the name (PEFT reads a ``target_modules`` string as such a regex),
* a callable ``LinearSite -> bool``,
* a list or tuple of these (a site is chosen when any of them chooses it).

There is exactly one meaning per form: a string is a regex only with the ``re:`` prefix
(a glob such as ``*.q_proj`` is no regex), and a list means "any of these", each item
read by its own form.
"""

from __future__ import annotations

import fnmatch
import re
import warnings
from dataclasses import replace
from typing import Callable, Sequence, Union

from ..records import LinearSite
from .sites import group_by_weight
from ..state import OneLoRAWarning

__all__ = ["Pattern", "PatternError", "compile_pattern", "describe", "select", "PRESETS"]

Predicate = Callable[[LinearSite], bool]
Pattern = Union[str, "re.Pattern[str]", Predicate, Sequence[Union[str, "re.Pattern[str]", Predicate]]]

PRESETS: dict[str, Predicate] = {
    "all-linear": lambda site: not site.is_head,
    "all": lambda site: True,
}


#: a bare name: no dots, no glob characters
_BARE = re.compile(r"[^.*?\[\]]+")


class PatternError(ValueError):
    """A pattern that is malformed or that selects nothing."""


def compile_pattern(pattern: Pattern) -> Predicate:
    """One predicate ``LinearSite -> bool`` for any pattern.

    Examples:
        >>> pred = compile_pattern(["*.q_proj", re.compile(r".*\\.v_proj")])
        >>> [s.name for s in sites if pred(s)]   # doctest: +SKIP
        ['model.layers.0.self_attn.q_proj', 'model.layers.0.self_attn.v_proj', ...]
    """
    if isinstance(pattern, str):
        if pattern in PRESETS:
            return PRESETS[pattern]
        if pattern.startswith("re:"):
            try:
                return compile_pattern(re.compile(pattern[3:]))
            except re.error as e:
                raise PatternError(f"{pattern!r} is not a regular expression ({e})") from None
        if _BARE.fullmatch(pattern):  # a module's own name, at any depth (PEFT's target_modules)
            return lambda site: site.name == pattern or site.name.endswith("." + pattern)
        glob = pattern
        return lambda site: fnmatch.fnmatchcase(site.name, glob)
    if isinstance(pattern, re.Pattern):
        return lambda site: pattern.fullmatch(site.name) is not None
    if isinstance(pattern, (list, tuple)):
        if not pattern:
            raise PatternError("an empty list of patterns selects nothing; pass 'all-linear' for the default")
        preds = [compile_pattern(p) for p in pattern]
        return lambda site: any(p(site) for p in preds)
    if callable(pattern):
        return lambda site: bool(pattern(site))
    raise TypeError(
        f"a pattern is a string (glob or 'all-linear' / 'all'), a re.Pattern, a callable "
        f"LinearSite -> bool, or a list of these; got {type(pattern).__name__}: {pattern!r}"
    )


def describe(pattern: Pattern | None) -> str:
    """A short text for a pattern, kept in adapter files and summaries."""
    if pattern is None:
        return "none"
    if isinstance(pattern, str):
        return pattern
    if isinstance(pattern, re.Pattern):
        return f"re:{pattern.pattern}"
    if isinstance(pattern, (list, tuple)):
        return "[" + ", ".join(describe(p) for p in pattern) + "]"
    return f"callable:{getattr(pattern, '__qualname__', type(pattern).__name__)}"


def available(sites: Sequence[LinearSite]) -> str:
    """Site names with layer indices folded: ``model.layers.*.mlp.up_proj (x32)``."""
    folded: dict[str, int] = {}
    for site in sites:
        if site.call_index:
            continue
        key = re.sub(r"(?<=\.)\d+(?=\.|$)", "*", site.name)
        folded[key] = folded.get(key, 0) + 1
    lines = [f"  {name}" + (f"  (x{n})" if n > 1 else "") for name, n in folded.items()]
    heads = sorted({s.name for s in sites if s.is_head})
    if heads:
        lines.append(f"  output head (not in 'all-linear'): {', '.join(heads)}")
    return "\n".join(lines)


def select(sites: Sequence[LinearSite], pattern: Pattern, exclude: Pattern | None = None) -> list[LinearSite]:
    """``sites`` with ``selected`` set by ``pattern`` minus ``exclude``.

    Raises:
        TypeError: a pattern of the wrong type.
        PatternError: the selection is empty, chooses some calls of a shared weight
            but not others (its one ``b`` would then be half-applied), or chooses a
            weight read both as ``[out, in]`` and transposed.
    """
    include = compile_pattern(pattern)
    chosen = [include(s) for s in sites]
    if exclude is not None:
        drop = compile_pattern(exclude)
        dropped = [c and drop(s) for s, c in zip(sites, chosen)]
        if not any(dropped):
            warnings.warn(
                f"exclude={describe(exclude)!r} removes nothing from pattern={describe(pattern)!r}",
                category=OneLoRAWarning, stacklevel=3,
            )
        chosen = [c and not d for c, d in zip(chosen, dropped)]
    if not any(chosen):
        raise PatternError(
            f"pattern={describe(pattern)!r}"
            + (f" with exclude={describe(exclude)!r}" if exclude is not None else "")
            + f" selects none of the {len(sites)} linear sites. Available:\n{available(sites)}"
        )
    out = [replace(s, selected=c) for s, c in zip(sites, chosen)]
    for name, group in group_by_weight(out).items():
        flags = {s.selected for s in group}
        if len(flags) > 1:
            calls = ", ".join(f"{s.name} (call {s.call_index}: {'in' if s.selected else 'out'})" for s in group)
            raise PatternError(
                f"the pattern selects some calls of a shared weight but not others: {calls}. "
                f"1LoRA adds one vector per weight ({name}); select all its calls or none."
            )
        layouts = {s.layout for s in group if s.selected}
        if len(layouts) > 1:
            # W + b 1ᵀ read transposed is Wᵀ + 1 bᵀ: that call would get (x @ b) 1ᵀ, not a
            # 1LoRA term, so no one b can be both trained as 1LoRA and merged exactly
            calls = ", ".join(f"{s.name} (call {s.call_index}: {s.layout.value})" for s in group)
            raise PatternError(
                f"the weight {group[0].weight_name} is read both as [out, in] and transposed, as [in, out]: {calls}. "
                "1LoRA adds one vector b 1ᵀ to a weight, which a transposed read does not see as a 1LoRA term, "
                "so this weight cannot be adapted: exclude its calls (exclude=[...] with the names above)."
            )
    return out
