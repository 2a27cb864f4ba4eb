"""benchmarks/quality.py --quick runs end to end and writes a complete, consistent report.

About 3 minutes on 2 cores with ``--jobs 2`` (four small pre-trainings: two per task; ten methods on
each pre-trained model; one export per model). Skipped where the benchmark's extra
dependencies are not installed. Every verdict the report states is recomputed here from
the per-method numbers in the JSON.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

for module in ("transformers", "peft", "sklearn", "matplotlib", "tabulate"):
    pytest.importorskip(module)

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"
METHODS = {"head", "bitfit", "difffit", "onelora", "onelora_norms", "lora", "vera", "dora", "full", "scratch"}
TASKS = {"digits-vit", "arith-llama"}
VARIANTS = ("standard", "nonuniform_norms")
RIVALS = ("bitfit", "difffit", "lora")
ORDER = 10.0  # the explanation rule's factor (benchmarks/finetune/verdict.py)
CLOSE = 0.02
LEARNED = 0.9  # benchmarks/finetune/tasks.py: a source test metric below this is "not learned"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    # --jobs 2: the two tasks side by side, one thread each (CI has 2 cores)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--jobs", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert (out / "quality.png").stat().st_size > 10_000
    return json.loads((out / "quality.json").read_text()), proc.stdout


def finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def variants(data):
    for name, task in data["tasks"].items():
        assert set(task["variants"]) == set(VARIANTS), name
        for key in VARIANTS:
            yield f"{name}/{key}", task, task["variants"][key]


def test_both_pretrainings_ran_every_method_with_finite_numbers(report):
    data, log = report
    assert data["mode"] == "quick"
    assert set(data["tasks"]) == TASKS
    for where, _, v in variants(data):
        assert set(v["methods"]) == METHODS, where
        # whether the quick budget learns the source task depends on the CPU (its kernels'
        # rounding order) and the seed: what the benchmark guarantees is that it says so
        pre = v["pretrain"]
        assert finite(pre["source_test_metric"]) and 0.0 <= pre["source_test_metric"] <= 1.0, (where, pre)
        assert pre["learned_source"] == (pre["source_test_metric"] >= LEARNED), (where, pre)
        said = [line for line in log.splitlines() if f"[{where.split('/')[0]}] {pre['label']}: source test" in line]
        assert said and ("WARNING: the source task was not learned" in said[-1]) == (not pre["learned_source"]), (where, said)
        for key, m in v["methods"].items():
            for field in ("test_mean", "test_std", "val_mean", "seconds_mean", "best_lr"):
                assert finite(m[field]), (where, key, field, m[field])
            assert 0.0 <= m["test_mean"] <= 1.0, (where, key)
            assert m["trainable"] > 0 and len(m["runs"]) == len(m["lr_grid"]) + len(data["protocol"]["seeds"]) - 1
            assert m["test_mean"] == statistics.fmean(r["test"] for r in m["runs"] if r["lr"] == m["best_lr"])
            assert all(finite(x) and x > 0 for x in m["memory"].values()), (where, key, m["memory"])
            # only the from-scratch reference (independent of the pre-trained model) is shared
            assert ("shared" in m) == (key == "scratch" and where.endswith("nonuniform_norms")), (where, key)
    for name, task in data["tasks"].items():  # each pre-training ran its own fine-tunings
        runs = [task["variants"][k]["methods"]["onelora"]["runs"] for k in VARIANTS]
        assert runs[0] != runs[1], name


def test_parameter_counts_follow_table_1(report):
    """Per adapted linear with d outputs and k inputs: 1LoRA d, BitFit d, LoRA d + k, VeRA d + 1."""
    data, _ = report
    for where, _, v in variants(data):
        m = v["methods"]
        head = m["onelora"]["trainable_head"]
        assert m["bitfit"]["trainable"] == m["onelora"]["trainable"], where
        assert m["onelora"]["trainable"] < m["vera"]["trainable"] < m["lora"]["trainable"] < m["dora"]["trainable"]
        assert m["vera"]["trainable"] - m["onelora"]["trainable"] == len(v["adapted_linears"]), where
        others = ("bitfit", "difffit", "onelora_norms", "lora", "vera", "dora")
        assert all(m[k]["trainable_head"] == head for k in others), where


def test_1lora_moves_the_metric_from_the_pretrained_start(report):
    """On the ViT task the quick budget moves 1LoRA's target metric above the pre-trained
    start wherever we ran it (native, avx2 and default kernel dispatch). The LLaMA's 150
    quick fine-tuning steps do not (0.8% against a 0.9% start under avx2 dispatch), so
    there only finiteness is asserted (the full budget is in the README's results)."""
    data, _ = report
    for name, task in data["tasks"].items():
        v = task["variants"]["standard"]
        before = v["before"]["mean"]
        assert finite(before) and finite(v["methods"]["onelora"]["test_mean"]), name
    vit = data["tasks"]["digits-vit"]["variants"]["standard"]
    assert vit["pretrain"]["learned_source"], vit["pretrain"]
    assert vit["methods"]["onelora"]["test_mean"] > vit["before"]["mean"] + 0.01, (vit["before"], vit["methods"]["onelora"])


def test_merged_and_exported_model_gives_the_adapted_metric(report):
    data, _ = report
    for where, _, v in variants(data):
        d = v["deploy"]
        assert d["exported"] == d["adapted"] == d["merged"], (where, d)
        assert d["equal"] is True
        run = [r for r in v["methods"]["onelora"]["runs"] if (r["lr"], r["seed"]) == (d["lr"], d["seed"])]
        assert d["adapted"] == run[0]["test"], where  # the reloaded run gives its own metric again


def test_sum_statistics_are_finite_and_match_the_sites(report):
    data, _ = report
    expected_ln = {"digits-vit": 8, "arith-llama": 0}  # q/k/v and fc1 of 2 ViT layers; RMSNorm never counts
    for where, task, v in variants(data):
        stats = v["sum_statistics"]
        assert sorted(s["name"] for s in stats["sites"]) == sorted(v["adapted_linears"]), where
        for s in stats["sites"]:
            assert finite(s["abs_s_over_l1"]) and 0 <= s["abs_s_over_l1"] <= 1, (where, s)
            assert finite(s["std_s_over_l1"]) and s["std_s_over_l1"] >= 0, (where, s)
            assert (s["kind"] == "layernorm_fed") == (s["norm"] is not None), (where, s)
        kinds = stats["kinds"]
        assert kinds["layernorm_fed"]["sites"] == expected_ln[where.split("/")[0]], where
        for kind, k in kinds.items():
            these = [s["abs_s_over_l1"] for s in stats["sites"] if s["kind"] == kind]
            assert k["sites"] == len(these), (where, kind)
            if these:
                assert finite(k["abs_s_over_l1"]) and k["abs_s_over_l1"] == pytest.approx(statistics.fmean(these))
            else:
                assert k["abs_s_over_l1"] is None, (where, kind)
        scales = v["norm_scales"]
        assert finite(scales["mean_cv"]), where
        assert scales["mean_cv"] == pytest.approx(statistics.fmean(scales["layers"].values())), where
    vit = data["tasks"]["digits-vit"]["variants"]["standard"]["sum_statistics"]["kinds"]
    assert vit["layernorm_fed"]["abs_s_over_l1"] < vit["other"]["abs_s_over_l1"]  # centered inputs sum to ~Σβ


def test_nonuniform_pretraining_spreads_the_layernorm_scales(report):
    data, _ = report
    v = data["tasks"]["digits-vit"]["variants"]
    standard, spread = v["standard"]["norm_scales"]["mean_cv"], v["nonuniform_norms"]["norm_scales"]["mean_cv"]
    assert standard < 0.1 < spread and spread > 2 * standard, (standard, spread)
    assert v["nonuniform_norms"]["pretrain"]["norm_lr"] > v["standard"]["pretrain"]["norm_lr"]


def _compare(a, b):
    diff, noise = a["test_mean"] - b["test_mean"], math.hypot(a["test_std"], b["test_std"])
    return diff, noise, "higher" if diff > noise else "lower" if diff < -noise else "within noise"


def test_stated_rankings_agree_with_the_per_method_means(report):
    data, stdout = report
    for where, _, v in variants(data):
        m, rk = v["methods"], v["ranking"]
        order = sorted(["onelora", *RIVALS], key=lambda k: -m[k]["test_mean"])
        assert rk["order"] == order, where
        assert rk["rank"] == 1 + sum(m[k]["test_mean"] > m["onelora"]["test_mean"] for k in RIVALS), where
        for k in RIVALS:
            diff, noise, verdict = _compare(m["onelora"], m[k])
            assert rk[f"vs_{k}"]["diff"] == pytest.approx(diff) and rk[f"vs_{k}"]["verdict"] == verdict, (where, k)
        checks = {"above_bitfit": _compare(m["onelora"], m["bitfit"])[2] == "higher",
                  "above_difffit": _compare(m["onelora"], m["difffit"])[2] == "higher",
                  "close_to_lora": _compare(m["onelora"], m["lora"])[0]
                  >= -max(_compare(m["onelora"], m["lora"])[1], CLOSE),
                  "fewer_params_than_lora": m["onelora"]["trainable"] < m["lora"]["trainable"]}
        assert rk["checks"] == checks and rk["holds"] == all(checks.values()), where
    for key in VARIANTS:
        paper = data["paper_ranking"][key]
        assert paper["holds"] == all(t["variants"][key]["ranking"]["holds"] for t in data["tasks"].values())
        assert len(paper["statement"]) == len(TASKS)
        for line in paper["statement"]:
            name = line.split(":")[0]
            word = "HOLDS" if data["tasks"][name]["variants"][key]["ranking"]["holds"] else "DOES NOT HOLD"
            assert f"the paper's ranking {word}" in line and line in stdout, line
    assert "=== standard pre-training ===" in stdout and "non-uniform LayerNorm scales" in stdout


def test_explanation_verdict_follows_from_the_numbers(report):
    data, stdout = report
    for name, task in data["tasks"].items():
        std, var = task["variants"]["standard"], task["variants"]["nonuniform_norms"]
        ex = task["explanation"]
        moves = {}
        for k in RIVALS:
            (d0, n0, _), (d1, n1, _) = (_compare(v["methods"]["onelora"], v["methods"][k]) for v in (std, var))
            change, noise = d1 - d0, math.hypot(n0, n1)
            moves[k] = "up" if change > noise else "down" if change < -noise else "within noise"
            assert ex["gap_moves"][k]["change"] == pytest.approx(change), (name, k)
            assert ex["gap_moves"][k]["verdict"] == moves[k], (name, k)
        for key, means in ex["test_means"].items():  # the reported moves of the other methods
            if key != "pre-trained start":
                assert means == {"standard": std["methods"][key]["test_mean"],
                                 "nonuniform_norms": var["methods"][key]["test_mean"]}, (name, key)
        assert ex["rank"]["standard"] == std["ranking"]["rank"], name
        assert ex["rank"]["nonuniform_norms"] == var["ranking"]["rank"], name
        ln = [v["sum_statistics"]["kinds"]["layernorm_fed"]["abs_s_over_l1"] for v in (std, var)]
        other = [v["sum_statistics"]["kinds"]["other"]["abs_s_over_l1"] for v in (std, var)]
        if ln[0] is None:
            status = "does not apply"
            assert ex["control_gap_to_bitfit_within_noise"] == (moves["bitfit"] == "within noise"), name
        elif not (ln[0] * ORDER <= other[0] and ln[1] * ORDER > other[1]):
            status = "not tested"
        else:
            status = "holds" if moves["bitfit"] == "up" else "does not hold"
        assert ex["status"] == status, (name, ex)
        assert ex["holds"] == {"holds": True, "does not hold": False}.get(status), name
        assert f"the explanation {status.upper()}" in stdout, name
    assert data["tasks"]["digits-vit"]["explanation"]["status"] != "does not apply"
    assert data["tasks"]["arith-llama"]["explanation"]["status"] == "does not apply"
    assert data["explanation_statement"] and all(line in stdout for line in data["explanation_statement"])
