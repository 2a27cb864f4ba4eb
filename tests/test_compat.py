"""Private torch APIs stay in one place (onelora_fx/compat.py), each with its reason."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import torch

PACKAGE = Path(__file__).resolve().parents[1] / "onelora_fx"
DOTTED = re.compile(r"torch(?:\.\w+)+")
ATTRIBUTE = re.compile(r"\.(_[A-Za-z]\w*)")
# the documented way to name a torch.compile backend (torch.compiler has none)
ALLOWED = {"torch._dynamo.register_backend"}


def code_of(path: Path) -> str:
    """The file's code without comments and strings (docstrings may name private APIs)."""
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if tok.type not in (tokenize.COMMENT, tokenize.STRING):
            out.append(tok.string)
    return " ".join(out).replace(" . ", ".")


def files():
    return [p for p in PACKAGE.rglob("*.py") if p.name != "compat.py"]


def test_private_torch_apis_are_only_in_compat():
    found = {}
    for path in files():
        names = set(DOTTED.findall(code_of(path))) - ALLOWED
        uses = {n for n in names if any(part.startswith("_") and not part.startswith("__") for part in n.split(".")[1:])}
        if uses:
            found[str(path.relative_to(PACKAGE))] = sorted(uses)
    assert not found, f"private torch APIs outside onelora_fx/compat.py: {found}"


def _defined_here() -> set[str]:
    """Every private name the package defines itself (functions, classes, attributes it
    assigns, keyword arguments it declares)."""
    names = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
    return {n for n in names if n.startswith("_")}


def test_private_attributes_of_torch_objects_are_only_in_compat():
    """``module._non_persistent_buffers_set``, ``tensor._base``: a private attribute the
    package does not define itself is torch's (or a library's), and belongs in compat.py
    (or its named conventions)."""
    import onelora_fx.compat as compat

    ours = _defined_here() | set(compat.CONVENTIONS)
    found = {}
    for path in files():
        code = code_of(path)
        for allowed in ALLOWED:
            code = code.replace(allowed, "")
        used = {n for n in ATTRIBUTE.findall(code) if not n.startswith("__") and not n.startswith("_onelora")}
        foreign = sorted(used - ours)
        if foreign:
            found[str(path.relative_to(PACKAGE))] = foreign
    assert not found, f"private attributes of other libraries' objects outside onelora_fx/compat.py: {found}"


def test_every_compat_export_is_used_and_says_why():
    """Each name compat.py exports is used elsewhere in the package (else it is dead), and
    the lines that define it carry a comment or docstring saying why it is needed."""
    import onelora_fx.compat as compat

    text = (PACKAGE / "compat.py").read_text()
    code = {str(p): code_of(p) for p in files()}
    for name in set(compat.__all__) - {"CONVENTIONS"}:  # (a list this test reads)
        assert any(re.search(rf"\b{name}\b", c) for c in code.values()), f"compat.{name} is used nowhere"
        definition = re.search(rf"^(?:def {name}\b|{name} = |from \S+ import (?:\S+ as )?{name}\b)", text, re.M)
        assert definition, f"compat.{name} has no definition line"
        before = text[: definition.start()].rstrip().splitlines()[-1] if definition.start() else ""
        after = text[definition.end():].split("\n", 7)
        documented = before.lstrip().startswith("#") or any(chr(34) * 3 in line for line in after[:7])
        assert documented, f"compat.{name} says nowhere why it is needed"


def test_the_backend_is_registered_by_public_means():
    import onelora_fx  # noqa: F401

    assert "onelora" in torch.compiler.list_backends(exclude_tags=())
    assert "_COMPILER_FNS" not in (PACKAGE / "compile" / "backend.py").read_text()
