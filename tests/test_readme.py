"""The README stays true: its Python blocks run, and print what it says they print."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
NUMBER = re.compile(r"-?\d+\.\d+")


def blocks():
    """(code, expected output or None) for each ```python block not marked as a sketch
    (``<!-- sketch -->`` on the line before: signatures, not programs)."""
    text = README.read_text()
    for m in re.finditer(r"(<!-- sketch -->\n)?```python\n(.*?)```\n(?:\nprints\n\n```\n(.*?)```)?", text, re.S):
        if not m.group(1):
            yield m.group(2), m.group(3)


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


@pytest.mark.slow
def test_readme_python_blocks_run_and_print_what_they_claim():
    found = list(blocks())
    assert found, "README has no python blocks"
    namespace = {"__name__": "__readme__"}  # later blocks go on from earlier ones, as a reader would
    for code, expected in found:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, str(README), "exec"), namespace)
        if expected is not None:
            assert same_up_to_float_noise(out.getvalue(), expected), f"README claims:\n{expected}\nbut it prints:\n{out.getvalue()}"
