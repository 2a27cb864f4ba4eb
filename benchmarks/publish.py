"""``--update-results``: copy a run's files from its ``--out`` folder into the committed
``benchmarks/results/`` (the copies the README quotes). One place for every benchmark."""

from __future__ import annotations

import shutil
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def publish(written: list[Path]) -> list[Path]:
    """Copy each of ``written`` into ``benchmarks/results/`` under its own name (a file
    already there is left alone); returns the copies made.

    Example:
        >>> publish([Path("benchmarks/out/merge.json")])   # doctest: +SKIP
        [PosixPath('.../benchmarks/results/merge.json')]
    """
    RESULTS.mkdir(parents=True, exist_ok=True)
    copies = []
    for path in written:
        target = RESULTS / path.name
        if path.resolve() != target.resolve():
            shutil.copyfile(path, target)
            copies.append(target)
    return copies
