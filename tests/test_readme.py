"""The README and the docs stay true, read as a newcomer reads them: every Python block runs
on its own after the Quickstart, in a fresh process, and prints what the page says it
prints; the first set-up command installs everything the blocks import."""

from __future__ import annotations

import ast
import math
import os
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
NUMBER = re.compile(r"-?\d+\.\d+(?:e[-+]?\d+)?")
#: a decimal may differ by this share of itself across CPUs (rounding order of kernels)
DECIMAL_RTOL = 2e-3
#: a number in e-notation is an error's magnitude (``1.0e-06``): it may differ by this
#: factor either way across CPUs (measured: 1.0e-06 / 1.2e-06, 3.7e-02 / 3.9e-02)
MAGNITUDE_FACTOR = 2.0


def pages() -> list[Path]:
    """The README, then the documentation's pages in the site's order (``mkdocs.yml``)."""
    nav = re.findall(r":\s*([\w\-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M)
    return [README] + [ROOT / "docs" / name for name in nav]


def blocks() -> list[tuple[str, str | None]]:
    """``(code, expected output or None)`` of each runnable ```python block of the README
    and the docs (the README's Quickstart first; a page that repeats it does not run it
    twice): not the ones marked ``<!-- signature -->`` or ``<!-- sketch -->`` on the line
    before (signatures, code that needs several processes; the pages say so)."""
    found: list[tuple[str, str | None]] = []
    for page in pages():
        text = page.read_text()
        for m in re.finditer(r"(<!-- (?:sketch|signature) -->\n)?```python\n(.*?)```\n(?:\nprints\n\n```\n(.*?)```)?", text, re.S):
            if not m.group(1) and (m.group(2), m.group(3)) not in found[:1]:
                found.append((m.group(2), m.group(3)))
    return found


def same_up_to_float_noise(actual: str, expected: str) -> bool:
    """Lines equal, except that decimals may differ in the last digits across CPUs
    (:data:`DECIMAL_RTOL`) and error magnitudes by :data:`MAGNITUDE_FACTOR`."""
    a_lines, e_lines = actual.strip().splitlines(), expected.strip().splitlines()
    if len(a_lines) != len(e_lines):
        return False
    for a, e in zip(a_lines, e_lines):
        if NUMBER.sub("#", a) != NUMBER.sub("#", e):
            return False
        for x, y in zip(NUMBER.findall(a), NUMBER.findall(e)):
            if "e" in y:
                ratio = float(x) / float(y) if float(y) else math.inf
                if not 1 / MAGNITUDE_FACTOR <= ratio <= MAGNITUDE_FACTOR:
                    return False
            elif abs(float(x) - float(y)) > DECIMAL_RTOL * max(1.0, abs(float(y))):
                return False
    return True


QUICKSTART, *SECTIONS = blocks() or [("", None)]
MARK = "\n# ---- the section's block ----\n"


def programs() -> list[str]:
    """What each test runs: the Quickstart alone, then each block after the Quickstart."""
    return [QUICKSTART[0]] + [QUICKSTART[0] + MARK + f"print({MARK!r})\n" + code for code, _ in SECTIONS]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, subprocess.CompletedProcess]:
    """Every program in a fresh process of its own (own working folder), two at a time with
    one torch thread each: the blocks are independent, and CI has 2 cores."""
    from concurrent.futures import ThreadPoolExecutor

    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def one(item: tuple[int, str]) -> subprocess.CompletedProcess:
        i, code = item
        cwd = tmp_path_factory.mktemp(f"block{i + 1}")
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=env, timeout=900)

    with ThreadPoolExecutor(2) as pool:
        return dict(enumerate(pool.map(one, enumerate(programs()))))


def output_of(runs: dict[int, subprocess.CompletedProcess], i: int) -> str:
    proc = runs[i]
    assert proc.returncode == 0, f"README block failed:\n{programs()[i]}\n--- stderr ---\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.mark.slow
def test_the_quickstart_runs_alone_and_prints_what_it_claims(runs):
    code, expected = QUICKSTART
    assert code, "README has no python blocks"
    out = output_of(runs, 0)
    assert expected is None or same_up_to_float_noise(out, expected), f"README claims:\n{expected}\nbut it prints:\n{out}"


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(SECTIONS)), ids=lambda i: f"block{i + 2}")
def test_each_block_runs_after_the_quickstart_alone(index, runs):
    """A reader jumps to the section they need: its block needs only the Quickstart."""
    _, expected = SECTIONS[index]
    out = output_of(runs, index + 1)
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


def test_the_output_comparison_tells_noise_from_a_change():
    assert same_up_to_float_noise("merged vs adapted: 1.2e-06\nloss 4.0230", "merged vs adapted: 1.0e-06\nloss 4.0226")
    assert not same_up_to_float_noise("merged vs adapted: 1.0e-03", "merged vs adapted: 1.0e-06")
    assert not same_up_to_float_noise("loss 4.1226", "loss 4.0226")
    assert not same_up_to_float_noise("14 of 15 sites", "14 of 16 sites")
    assert not same_up_to_float_noise("a\nb", "a")
