"""The README stays true, read as a newcomer reads it: every Python block runs on its own
after the Quickstart, in a fresh process, and prints what the README says it prints; the
first set-up command installs everything the blocks import."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
NUMBER = re.compile(r"-?\d+\.\d+")


def blocks() -> list[tuple[str, str | None]]:
    """``(code, expected output or None)`` of each runnable ```python block: not the ones
    marked ``<!-- signature -->`` or ``<!-- sketch -->`` on the line before (signatures,
    code that needs several processes)."""
    text = README.read_text()
    found = []
    for m in re.finditer(r"(<!-- (?:sketch|signature) -->\n)?```python\n(.*?)```\n(?:\nprints\n\n```\n(.*?)```)?", text, re.S):
        if not m.group(1):
            found.append((m.group(2), m.group(3)))
    return found


def same_up_to_float_noise(actual: str, expected: str) -> bool:
    """Lines equal, except that decimals may differ in the last digits across CPUs."""
    a_lines, e_lines = actual.strip().splitlines(), expected.strip().splitlines()
    if len(a_lines) != len(e_lines):
        return False
    for a, e in zip(a_lines, e_lines):
        if NUMBER.sub("#", a) != NUMBER.sub("#", e):
            return False
        for x, y in zip(NUMBER.findall(a), NUMBER.findall(e)):
            if abs(float(x) - float(y)) > 2e-3 * max(1.0, abs(float(y))):
                return False
    return True


QUICKSTART, *SECTIONS = blocks() or [("", None)]
MARK = "\n# ---- the section's block ----\n"


def run(code: str, cwd: Path) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=900)
    assert proc.returncode == 0, f"README block failed:\n{code}\n--- stderr ---\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.mark.slow
def test_the_quickstart_runs_alone_and_prints_what_it_claims(tmp_path):
    code, expected = QUICKSTART
    assert code, "README has no python blocks"
    out = run(code, tmp_path)
    assert expected is None or same_up_to_float_noise(out, expected), f"README claims:\n{expected}\nbut it prints:\n{out}"


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(SECTIONS)), ids=lambda i: f"block{i + 2}")
def test_each_block_runs_after_the_quickstart_alone(index, tmp_path):
    """A reader jumps to the section they need: its block needs only the Quickstart."""
    code, expected = SECTIONS[index]
    out = run(QUICKSTART[0] + MARK + f"print({MARK!r})\n" + code, tmp_path)
    out = out.split(MARK, 1)[1].lstrip("\n") if MARK in out else out
    assert expected is None or same_up_to_float_noise(out, expected), f"README claims:\n{expected}\nbut it prints:\n{out}"


def _first_install_extras() -> set[str]:
    """The extras the README's first set-up command installs (``pip install -e ".[x]"``)."""
    text = README.read_text()
    command = re.search(r"<!-- ci:demo -->\n```bash\n(.*?)\n```", text, re.S).group(1)
    return set(re.search(r'pip install -e "\.\[([a-z,]+)\]"', command).group(1).split(","))


def _closure(extras: set[str]) -> set[str]:
    """The distributions an install with these extras brings (onelora-fx's own extras
    expanded), by name."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    optional = project["optional-dependencies"]
    names, todo = {re.split(r"[<>=\[ ]", d)[0].lower() for d in project["dependencies"]}, list(extras)
    while todo:
        for dep in optional[todo.pop()]:
            inner = re.match(r"onelora-fx\[([a-z,]+)\]", dep)
            if inner:
                todo.extend(inner.group(1).split(","))
            else:
                names.add(re.split(r"[<>=\[ ]", dep)[0].lower())
    return names


def test_the_first_set_up_command_installs_everything_the_blocks_import():
    provided = _closure(_first_install_extras()) | {"torch", "onelora-fx"}
    by_module = metadata.packages_distributions()
    missing = set()
    for code, _ in blocks():
        for node in ast.walk(ast.parse(code)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "onelora_fx":
                    continue
                dists = {d.lower() for d in by_module.get(top, [top])}
                if not dists & provided:
                    missing.add(f"{top} ({', '.join(sorted(dists))})")
    assert not missing, f"README blocks import what its first set-up command does not install: {sorted(missing)}"
