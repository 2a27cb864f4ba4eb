"""Private torch APIs stay in one place (onelora_fx/compat.py), each with its reason."""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

import torch

PACKAGE = Path(__file__).resolve().parents[1] / "onelora_fx"
DOTTED = re.compile(r"torch(?:\.\w+)+")
# the documented way to name a torch.compile backend (torch.compiler has none)
ALLOWED = {"torch._dynamo.register_backend"}


def code_of(path: Path) -> str:
    """The file's code without comments and strings (docstrings may name private APIs)."""
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if tok.type not in (tokenize.COMMENT, tokenize.STRING):
            out.append(tok.string)
    return " ".join(out).replace(" . ", ".")


def test_private_torch_apis_are_only_in_compat():
    found = {}
    for path in PACKAGE.rglob("*.py"):
        if path.name == "compat.py":
            continue
        names = set(DOTTED.findall(code_of(path))) - ALLOWED
        uses = {n for n in names if any(part.startswith("_") and not part.startswith("__") for part in n.split(".")[1:])}
        if uses:
            found[str(path.relative_to(PACKAGE))] = sorted(uses)
    assert not found, f"private torch APIs outside onelora_fx/compat.py: {found}"


def test_every_private_api_in_compat_says_why():
    import onelora_fx.compat as compat

    text = (PACKAGE / "compat.py").read_text()
    for name in compat.__all__:
        assert name in text
    assert text.count("torch._") >= 5  # the APIs it wraps are named where they are used


def test_the_backend_is_registered_by_public_means():
    import onelora_fx  # noqa: F401

    assert "onelora" in torch.compiler.list_backends(exclude_tags=())
    assert "_COMPILER_FNS" not in (PACKAGE / "compile" / "backend.py").read_text()
