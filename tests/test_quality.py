"""benchmarks/quality.py --quick runs end to end and writes a complete, consistent report.

About 2-3 minutes on 2 cores (two small pre-trainings, ten methods on two tasks, one
export per task). Skipped where the benchmark's extra dependencies are not installed.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

for module in ("transformers", "peft", "sklearn", "matplotlib", "tabulate"):
    pytest.importorskip(module)

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"
METHODS = {"head", "bitfit", "difffit", "onelora", "onelora_norms", "lora", "vera", "dora", "full", "scratch"}
TASKS = {"digits-vit", "arith-llama"}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert (out / "quality.png").stat().st_size > 10_000
    return json.loads((out / "quality.json").read_text()), proc.stdout


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_every_method_has_finite_numbers(report):
    data, _ = report
    assert data["mode"] == "quick"
    assert set(data["tasks"]) == TASKS
    for name, task in data["tasks"].items():
        assert set(task["methods"]) == METHODS, name
        for key, m in task["methods"].items():
            where = f"{name}/{key}"
            for field in ("test_mean", "test_std", "val_mean", "seconds_mean", "best_lr"):
                assert finite(m[field]), (where, field, m[field])
            assert 0.0 <= m["test_mean"] <= 1.0, where
            assert m["trainable"] > 0 and m["runs"], where
            assert all(finite(v) and v > 0 for v in m["memory"].values()), (where, m["memory"])


def test_parameter_counts_follow_table_1(report):
    """Per adapted linear with d outputs and k inputs: 1LoRA d, BitFit d, LoRA d + k, VeRA d + 1."""
    data, _ = report
    for name, task in data["tasks"].items():
        m = task["methods"]
        head = m["onelora"]["trainable_head"]
        assert m["bitfit"]["trainable"] == m["onelora"]["trainable"], name
        assert m["onelora"]["trainable"] < m["vera"]["trainable"] < m["lora"]["trainable"] < m["dora"]["trainable"], name
        assert m["vera"]["trainable"] - m["onelora"]["trainable"] == len(task["adapted_linears"]), name
        assert all(m[k]["trainable_head"] == head for k in ("bitfit", "difffit", "onelora_norms", "lora", "vera", "dora"))


def test_1lora_moves_the_metric_from_the_pretrained_start(report):
    data, _ = report
    for name, task in data["tasks"].items():
        before = task["before"]["mean"]
        assert finite(before), name
        assert task["methods"]["onelora"]["test_mean"] > before + 0.01, (name, before, task["methods"]["onelora"])


def test_merged_and_exported_model_gives_the_adapted_metric(report):
    data, _ = report
    for name, task in data["tasks"].items():
        d = task["deploy"]
        assert d["exported"] == d["adapted"] == d["merged"], (name, d)
        assert d["equal"] is True
        run = [r for r in task["methods"]["onelora"]["runs"] if (r["lr"], r["seed"]) == (d["lr"], d["seed"])]
        assert d["adapted"] == run[0]["test"], name  # the reloaded run gives its own metric again


def test_ranking_verdict_is_stated(report):
    data, stdout = report
    assert data["paper_ranking_holds"] in (True, False)
    assert len(data["paper_ranking_statement"]) == len(TASKS)
    assert "Does the paper's ranking hold here" in stdout
