"""The documentation site builds without a warning, documents every public name, and the
README stays a front page (the blocks of both run in tests/test_readme.py)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import onelora_fx as ol

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_is_a_front_page():
    assert (ROOT / "README.md").stat().st_size <= 15_000


def test_every_public_name_is_in_the_api_reference():
    text = (ROOT / "docs" / "reference.md").read_text()
    documented = set(re.findall(r"^::: onelora_fx\.(\w+)$", text, re.M))
    assert documented == set(ol.__all__) - {"__version__"}


def test_the_pages_say_nothing_about_when_they_were_written():
    said = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for phrase in re.findall(r"\b(today|this round|earlier rounds?|previous round|this session|none was here)\b",
                                 page.read_text(), re.I):
            said.append(f"{page.name}: {phrase}")
    assert not said, said


def test_mkdocs_build_strict_passes(tmp_path):
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, env={"NO_MKDOCS_2_WARNING": "1",
                                                                                        **__import__("os").environ})
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "index.html").read_text().count("onelora_fx") > 30
