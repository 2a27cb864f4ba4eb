"""Rankings and the statements drawn from them; every number comes from the results.

Two questions:

* Does the paper's ranking hold (1LoRA above BitFit and DiffFit, close to LoRA r=1 with
  fewer parameters)? Asked for each task and pre-training.
* Does the LayerNorm explanation hold? Behind a LayerNorm with a nearly uniform scale,
  ``s = x.sum(-1)`` is nearly constant, so 1LoRA acts as BitFit there. It holds on a
  task when (1) with standard pre-training the LayerNorm-fed sites' mean ``|s|/‖x‖₁`` is
  at least :data:`ORDER` times below the other sites', (2) with non-uniform scales it is
  no longer (the variant removes the effect), and (3) 1LoRA's gap to BitFit then grows
  beyond the noise. (1) and (2) but not (3): it does not hold. (1) or (2) missing: not
  tested. No LayerNorm-fed site (RMSNorm): it does not apply, and the non-uniform run
  is a control whose gap to BitFit should stay within the noise.

"Higher"/"lower" means a mean difference beyond ``sqrt(std1² + std2²)`` over seeds; a
change of a gap between pre-trainings is beyond the noise when it exceeds the two
gaps' noises combined the same way. With one seed (``--quick``) the noise is 0.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

CLOSE = 0.02  # "close to LoRA r=1": at most 2 points below it, or within the noise
ORDER = 10.0  # "s nearly constant": LayerNorm-fed |s|/|x|_1 at least this many times below the others'
RIVALS = {"bitfit": "BitFit", "difffit": "DiffFit", "lora": "LoRA r=1"}
CONTEXT = {"onelora": "1LoRA", **RIVALS, "full": "full fine-tuning"}  # methods whose move is reported
CAVEAT = ("Each pre-training is one pre-trained model (seed 0): the noise above is over fine-tuning seeds only, "
          "not over pre-trainings.")


def _compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    diff = a["test_mean"] - b["test_mean"]
    noise = math.hypot(a["test_std"], b["test_std"])
    verdict = "higher" if diff > noise else "lower" if diff < -noise else "within noise"
    return {"diff": diff, "noise": noise, "verdict": verdict}


def ranking(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """1LoRA against BitFit, DiffFit and LoRA r=1, and the paper's ranking checks."""
    one = results["onelora"]
    out: dict[str, Any] = {f"vs_{k}": _compare(one, results[k]) for k in RIVALS if k in results}
    if len(out) < len(RIVALS):
        out["holds"] = None
        return out
    group = ["onelora", *RIVALS]
    out["rank"] = 1 + sum(results[k]["test_mean"] > one["test_mean"] for k in RIVALS)
    out["order"] = sorted(group, key=lambda k: -results[k]["test_mean"])
    lora = out["vs_lora"]
    checks = {
        "above_bitfit": out["vs_bitfit"]["verdict"] == "higher",
        "above_difffit": out["vs_difffit"]["verdict"] == "higher",
        "close_to_lora": lora["diff"] >= -max(lora["noise"], CLOSE),
        "fewer_params_than_lora": one["trainable"] < results["lora"]["trainable"],
    }
    out["checks"] = checks
    out["holds"] = all(checks.values())
    return out


def _gaps(rk: dict[str, Any]) -> str:
    return "; ".join(f"{rk['vs_' + k]['diff'] * 100:+.1f} pts vs {label} ({rk['vs_' + k]['verdict']}, "
                     f"noise {rk['vs_' + k]['noise'] * 100:.1f})" for k, label in RIVALS.items())


def paper_statement(tasks: dict[str, dict[str, Any]], variant: str) -> tuple[Optional[bool], list[str]]:
    lines, verdicts = [], []
    for name, t in tasks.items():
        rk = t["variants"][variant]["ranking"]
        if rk.get("holds") is None:
            lines.append(f"{name}: not all of BitFit, DiffFit, LoRA r=1 were run; no verdict")
            continue
        verdicts.append(rk["holds"])
        lines.append(f"{name}: the paper's ranking {'HOLDS' if rk['holds'] else 'DOES NOT HOLD'}: 1LoRA "
                     + _gaps(rk) + f"; checks {rk['checks']}")
    return (all(verdicts) if verdicts else None), lines


def _move(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    change = after["diff"] - before["diff"]
    noise = math.hypot(before["noise"], after["noise"])
    return {"change": change, "noise": noise,
            "verdict": "up" if change > noise else "down" if change < -noise else "within noise"}


def explanation(task: dict[str, Any]) -> dict[str, Any]:
    """The LayerNorm explanation on one task (see the module docstring for the rule)."""
    std, var = task["variants"]["standard"], task["variants"]["nonuniform_norms"]
    if std["ranking"].get("holds") is None or var["ranking"].get("holds") is None:
        return {"status": "no verdict", "holds": None, "why": "not all of BitFit, DiffFit, LoRA r=1 were run"}

    def both(get: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
        return {"standard": get(std), "nonuniform_norms": get(var)}

    def ratio(kind: str) -> dict[str, Any]:
        return both(lambda v: v["sum_statistics"]["kinds"][kind]["abs_s_over_l1"])

    def mean(key: str) -> dict[str, Any]:
        return both(lambda v: v["methods"][key]["test_mean"])

    out: dict[str, Any] = {
        "norm_scale_cv": both(lambda v: v["norm_scales"]["mean_cv"]),
        "abs_s_over_l1": {"layernorm_fed": ratio("layernorm_fed"), "other": ratio("other")},
        "rank": both(lambda v: v["ranking"]["rank"]) | {"of": 1 + len(RIVALS)},
        "gap_moves": {k: _move(std["ranking"][f"vs_{k}"], var["ranking"][f"vs_{k}"]) for k in RIVALS},
        "test_means": {k: mean(k) for k in CONTEXT if k in std["methods"]}
        | {"pre-trained start": both(lambda v: v["before"]["mean"])},
    }
    ln, other = out["abs_s_over_l1"]["layernorm_fed"], out["abs_s_over_l1"]["other"]
    if ln["standard"] is None:
        control_ok = out["gap_moves"]["bitfit"]["verdict"] == "within noise"
        return out | {"status": "does not apply", "holds": None, "control_gap_to_bitfit_within_noise": control_ok,
                      "why": f"no adapted site reads a LayerNorm ({task['norm_kind']} does not center)"}
    checks = {
        "s_nearly_constant_with_standard_pretraining": ln["standard"] * ORDER <= other["standard"],
        "not_nearly_constant_with_nonuniform_scales": ln["nonuniform_norms"] * ORDER > other["nonuniform_norms"],
        "gap_to_bitfit_grows": out["gap_moves"]["bitfit"]["verdict"] == "up",
    }
    if not (checks["s_nearly_constant_with_standard_pretraining"]
            and checks["not_nearly_constant_with_nonuniform_scales"]):
        status, holds = "not tested", None
    else:
        status, holds = ("holds", True) if checks["gap_to_bitfit_grows"] else ("does not hold", False)
    return out | {"checks": checks, "status": status, "holds": holds}


def explanation_lines(name: str, task: dict[str, Any], ex: dict[str, Any]) -> list[str]:
    """The verdict on one task, in words, from ``explanation``'s numbers."""
    if ex["status"] == "no verdict":
        return [f"{name}: no verdict ({ex['why']})"]
    lines = _rank_lines(name, task, ex)
    s = ex["abs_s_over_l1"]
    if ex["status"] == "does not apply":
        move = ex["gap_moves"]["bitfit"]
        ctrl = f"moves {move['change'] * 100:+.1f} pts (noise {move['noise'] * 100:.1f}): " + (
            "within the noise, as predicted" if ex["control_gap_to_bitfit_within_noise"]
            else "beyond the noise, which the explanation does not predict for this model")
        lines.append(f"  the explanation DOES NOT APPLY: {ex['why']}; mean |s|/|x|_1 at the adapted sites "
                     f"{s['other']['standard']:.4f} -> {s['other']['nonuniform_norms']:.4f}. It cannot account for "
                     f"1LoRA's standing here ({_bitfit_word(task, 'standard')} BitFit with standard pre-training). "
                     f"Control: the gap to BitFit {ctrl}.")
        return lines
    lines.append(f"  mean |s|/|x|_1: LayerNorm-fed {s['layernorm_fed']['standard']:.4f} -> "
                 f"{s['layernorm_fed']['nonuniform_norms']:.4f}, other sites {s['other']['standard']:.4f} -> "
                 f"{s['other']['nonuniform_norms']:.4f}; checks {ex['checks']}")
    why = {"holds": "the LayerNorm-fed sums become input-dependent and 1LoRA gains on BitFit beyond the noise",
           "does not hold": "the LayerNorm-fed sums become input-dependent but 1LoRA does not gain on BitFit "
                            "beyond the noise",
           "not tested": "the pre-trainings do not produce the contrast in |s|/|x|_1 the test needs"}[ex["status"]]
    lines.append(f"  the explanation {ex['status'].upper()} on {name}: {why}.")
    return lines


def _rank_lines(name: str, task: dict[str, Any], ex: dict[str, Any]) -> list[str]:
    """Where 1LoRA ranks in each pre-training, how its gaps move, and how the other methods move."""
    labels = {"onelora": "1LoRA", **RIVALS}
    lines = []
    for v in task["variants"].values():
        rk = v["ranking"]
        lines.append(f"{name}, {v['label']}, norm scale CV {v['norm_scales']['mean_cv']:.3f}: 1LoRA ranks "
                     f"{rk['rank']} of {ex['rank']['of']} (" + " > ".join(labels[k] for k in rk["order"])
                     + "); " + _gaps(rk))
    moves = ex["gap_moves"]
    lines.append("  change of 1LoRA's gap from standard to non-uniform scales: " + "; ".join(
        f"vs {label} {moves[k]['change'] * 100:+.1f} pts ({moves[k]['verdict']}, noise {moves[k]['noise'] * 100:.1f})"
        for k, label in RIVALS.items()) + f"; rank {ex['rank']['standard']} -> {ex['rank']['nonuniform_norms']}")
    means = ex["test_means"]
    lines.append("  test metric %, standard -> non-uniform: " + "; ".join(
        f"{CONTEXT.get(k, k)} {m['standard'] * 100:.1f} -> {m['nonuniform_norms'] * 100:.1f}" for k, m in means.items()))
    edge = [v["label"] for v in task["variants"].values() if v["methods"]["onelora"]["best_lr_at_edge"]]
    if edge:
        lines.append("  1LoRA's selected learning rate is at the edge of its grid in: " + ", ".join(edge))
    return lines


def _bitfit_word(task: dict[str, Any], variant: str) -> str:
    verdict = task["variants"][variant]["ranking"]["vs_bitfit"]["verdict"]
    return {"higher": "above", "lower": "below", "within noise": "tied with"}[verdict]
