"""The mutation check: each deliberate breakage in :mod:`mutants` makes at least one of
its tests fail. Each mutant runs in a fresh process on a copy of the package with the one
change applied (the copy comes first on the import path, before the installed package)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mutants import MUTANTS, Mutant

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def mutated_package(mutant: Mutant, where: Path) -> Path:
    """A copy of ``onelora_fx`` under ``where`` with ``mutant`` applied."""
    shutil.copytree(ROOT / "onelora_fx", where / "onelora_fx", ignore=shutil.ignore_patterns("__pycache__"))
    target = where / mutant.path
    text = target.read_text()
    assert text.count(mutant.old) == 1, f"{mutant.name}: the text to replace is not in {mutant.path} once"
    target.write_text(text.replace(mutant.old, mutant.new))
    return where


def run_tests(package_dir: Path, args: tuple[str, ...]) -> subprocess.CompletedProcess:
    # run from the copy's folder (first on the path), the test files named by absolute path
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(package_dir), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1"}
    # where `import onelora_fx` would load from (find_spec runs no package code: no
    # seconds of imports per mutant)
    probe = "import importlib.util, sys; sys.stdout.write(importlib.util.find_spec('onelora_fx').origin)"
    imported = subprocess.run([sys.executable, "-c", probe], env=env, cwd=package_dir, capture_output=True, text=True,
                              timeout=300)
    assert imported.stdout.startswith(str(package_dir)), f"the mutated copy is not the one imported: {imported.stdout}{imported.stderr[-2000:]}"
    args = tuple(str(ROOT / a) if a.startswith("tests/") else a for a in args)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "--no-header",
                           "--rootdir", str(ROOT), *args], env=env, cwd=package_dir, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Every mutant's run, two at a time with one torch thread each (the runs are
    independent processes, and CI has 2 cores)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(mutant: Mutant) -> subprocess.CompletedProcess:
        where = tmp_path_factory.mktemp(mutant.name.replace(" ", "-").replace("'", ""))
        return run_tests(mutated_package(mutant, where), mutant.tests)

    with ThreadPoolExecutor(2) as pool:
        return dict(zip((m.name for m in MUTANTS), pool.map(one, MUTANTS)))


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.name.replace(" ", "-"))
def test_the_suite_catches_the_mutant(mutant, results):
    result = results[mutant.name]
    # exit 1: tests ran and some failed; 0 would be a mutant the tests let through, and
    # anything else (collection error, no test selected) proves nothing
    assert result.returncode == 1, f"{mutant.name}: pytest exited {result.returncode}\n{result.stdout[-3000:]}"
    assert " failed" in result.stdout.splitlines()[-1], result.stdout[-2000:]
