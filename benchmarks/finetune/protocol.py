"""The protocol: pre-trainings, the learning-rate sweep and seeds, memory, deployment.

For each task and each pre-training (:data:`.tasks.PRETRAININGS`), every method gets the
same batch size and steps; its grid is swept with the first seed, the rate with the best
validation metric is kept (the lower one on a tie), and the other seeds are run at that
rate. Reported per method: test metric mean and std over the seeds at the selected rate.
A seed sets the fresh head, the batch order and the adapters' random init; data splits
and the pre-trained models are fixed. Runs of different methods are interleaved in a
shuffled order, so a busy machine slows them alike. A method that does not use the
pre-trained model (from scratch) is run once per task and its results are shared by
both pre-trainings.

Every pre-training, fine-tuning run and deployment check is saved as soon as it is done
(:class:`.resume.Saved`); a rerun on the same folder picks them up and runs the rest.
"""

from __future__ import annotations

import copy
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import onelora_fx as ol

from .diagnostics import norm_scales, sum_statistics
from .methods import Method, OneLoRA, adapted_linears, build, fresh_start, onelora_variants
from .resume import Saved
from .tasks import PRETRAININGS, TASKS, Task, pretrain
from .training import BATCH, evaluate, fit, logits_of, set_mode
from .verdict import ranking

Log = Callable[[str], None]


@dataclass(frozen=True)
class Budget:
    seeds: tuple[int, ...]
    lr_points: tuple[int, ...]  # which points of each method's grid to sweep
    steps: dict[str, int]  # fine-tuning steps per task
    pretrain_steps: dict[str, int]


DEFAULT = Budget(seeds=(0, 1, 2), lr_points=(0, 1, 2, 3),
                 steps={"digits-vit": 150, "arith-llama": 400},
                 pretrain_steps={"digits-vit": 600, "arith-llama": 3000})
QUICK = Budget(seeds=(0,), lr_points=(1,),
               steps={"digits-vit": 60, "arith-llama": 150},
               pretrain_steps={"digits-vit": 300, "arith-llama": 1200})  # 1200: source task at 99-100%


def train_memory(task: Task, module: nn.Module, params: list[nn.Parameter]) -> dict[str, float]:
    """Estimated bytes of one training step: parameters and buffers (frozen ones included),
    gradients and AdamW state of the trainable tensors, plus the tensors autograd saves
    for backward (``saved_tensors_hooks``; storages counted once, parameters and buffers
    excluded). Not a process measurement."""
    def key(t: torch.Tensor) -> int:
        return t.untyped_storage().data_ptr()

    owned = {key(t): t.untyped_storage().nbytes() for t in list(module.parameters()) + list(module.buffers())}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if key(t) not in owned:
            saved[key(t)] = t.untyped_storage().nbytes()
        return t

    x, y = task.target["train"]
    set_mode(module, True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = task.loss(logits_of(module(**task.kwargs(x[:BATCH]))), y[:BATCH])
    loss.backward()
    for p in params:
        p.grad = None
    trainable = sum(p.numel() * p.element_size() for p in params)
    mib = 1 << 20
    parts = {
        "params_buffers_mb": sum(owned.values()) / mib,
        "grads_mb": trainable / mib,
        "adamw_state_mb": 2 * trainable / mib,
        "saved_activations_mb": sum(saved.values()) / mib,
    }
    parts["total_mb"] = sum(parts.values())
    return parts


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def deployment_check(task: Task, variant: OneLoRA, state: dict[str, torch.Tensor], lr: float,
                     seed: int) -> dict[str, Any]:
    """1LoRA at its selected rate: adapted vs merged vs exported-and-reloaded, on the test split."""
    variant.load(state)
    x, y = task.target["test"]
    adapted, ref = evaluate(task, variant.gm, x, y)
    merged_metric, _ = evaluate(task, ol.merge(variant.gm), x, y)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{task.name}.pt2"
        t0 = time.perf_counter()
        ol.export(variant.gm, (), task.kwargs(x[:4]), path=path)
        export_s = time.perf_counter() - t0
        size = path.stat().st_size
        program = torch.export.load(path).module()
        exported, logits = evaluate(task, program, x, y)
    return {
        "method": "onelora", "lr": lr, "seed": seed, "adapted": adapted, "merged": merged_metric,
        "exported": exported, "equal": adapted == merged_metric == exported,
        "max_abs_logit_diff": (logits - ref).abs().max().item(), "export_s": export_s, "pt2_bytes": size,
    }


def compare_methods(task: Task, pretrained: nn.Module, budget: Budget, methods: list[Method], log: Log,
                    shared: dict[str, dict[str, Any]], saved: Saved, where: str) -> dict[str, Any]:
    """Every method fine-tuned from ``pretrained``: the sweep, the seeds, the deployment check.
    Methods whose results are in ``shared`` (ones that ignore the pre-trained model) are not rerun;
    runs in ``saved`` (under ``where``, the task and pre-training) are not rerun either."""
    name, steps = task.name, budget.steps[task.name]
    seed0, rest = budget.seeds[0], budget.seeds[1:]
    starts = {s: fresh_start(task, pretrained, s) for s in budget.seeds}
    before = [evaluate(task, starts[s], *task.target["test"])[0] for s in budget.seeds]
    onelora = onelora_variants(task, starts[seed0], {m.key for m in methods})
    linears = adapted_linears(task, onelora["onelora"].gm, pretrained)
    log(f"[{name}] adapted linears ({len(linears)}): {', '.join(linears)}")
    stats = sum_statistics(task, pretrained, onelora["onelora"].gm)
    results: dict[str, dict[str, Any]] = {
        m.key: {"label": m.label, "reference": m.reference, "lr_grid": [m.grid[i] for i in budget.lr_points],
                "runs": []} for m in methods if m.key not in shared
    }
    to_run = [m for m in methods if m.key not in shared]
    trained_1lora: dict[tuple[float, int], dict[str, torch.Tensor]] = {}
    order = random.Random(name)
    figures = ("trainable", "trainable_head", "memory", "setup_s")  # one-off, from a method's first build
    for m in to_run:
        results[m.key].update(saved.get(f"{where}/method/{m.key}") or {})
    total = len(to_run) * len(budget.seeds) + len(to_run) * (len(budget.lr_points) - 1)
    done = sum(1 for m in to_run for k in saved.data["entries"] if k.startswith(f"{where}/run/{m.key}/"))
    if done:
        log(f"[{name}] {done} of {total} fine-tuning runs from the saved results")

    def one(m: Method, lr: float, seed: int) -> None:
        r = results[m.key]
        key = f"{where}/run/{m.key}/{lr!r}/{seed}"
        entry = saved.get(key)
        if entry is not None:
            r["runs"].append(entry["run"])
            saved.resumed += 1
            if "onelora" in entry:
                trained_1lora[(lr, seed)] = Saved.tensors_from_json(entry["onelora"])
            return
        a = build(m.key, task, starts[seed], linears, seed, onelora)
        if "trainable" not in r:
            r["trainable"] = sum(p.numel() for p in a.params)
            r["trainable_head"] = a.head_params
            r["memory"] = train_memory(task, a.module, a.params)
            r["setup_s"] = a.setup_s
            saved.put(f"{where}/method/{m.key}", {k: r[k] for k in figures})
        t0 = time.perf_counter()
        loss = fit(task, a.module, a.params, task.target["train"], steps, lr, seed)
        val, _ = evaluate(task, a.module, *task.target["val"])
        seconds = time.perf_counter() - t0
        test, _ = evaluate(task, a.module, *task.target["test"])
        run = {"lr": lr, "seed": seed, "val": val, "test": test, "seconds": seconds, "final_loss": loss}
        r["runs"].append(run)
        entry = {"run": run}
        if m.key == "onelora" and seed == seed0:  # the deployment check reloads the selected one
            trained_1lora[(lr, seed)] = onelora["onelora"].state()
            entry["onelora"] = Saved.tensors_to_json(trained_1lora[(lr, seed)])
        saved.put(key, entry)
        log(f"[{name}] {m.label:<26} lr {lr:<7g} seed {seed}  val {val:.3f}  test {test:.3f}  "
            f"loss {loss:.3f}  {seconds:5.1f} s")

    for point in budget.lr_points:  # the sweep, seed 0, methods interleaved
        for m in order.sample(to_run, len(to_run)):
            one(m, m.grid[point], seed0)
    for r in results.values():
        sweep = [x for x in r["runs"] if x["seed"] == seed0]
        best = max(sweep, key=lambda x: x["val"])  # first (lowest) rate on ties
        r["best_lr"] = best["lr"]
        r["best_lr_at_edge"] = len(r["lr_grid"]) > 1 and best["lr"] in (min(r["lr_grid"]), max(r["lr_grid"]))
    for seed in rest:
        for m in order.sample(to_run, len(to_run)):
            one(m, results[m.key]["best_lr"], seed)
    for r in results.values():
        chosen = [x for x in r["runs"] if x["lr"] == r["best_lr"]]
        r["test_mean"], r["test_std"] = mean_std([x["test"] for x in chosen])
        r["val_mean"], _ = mean_std([x["val"] for x in chosen])
        r["seconds_mean"], r["seconds_std"] = mean_std([x["seconds"] for x in chosen])
        r["test_per_seed"] = [x["test"] for x in chosen]
    for key, r in shared.items():
        results[key] = copy.deepcopy(r) | {"shared": "run once, independent of the pre-trained model"}
    results = {m.key: results[m.key] for m in methods}

    best_lr = results["onelora"]["best_lr"]
    deploy = saved.get(f"{where}/deploy")
    if deploy is None or deploy["lr"] != best_lr:
        deploy = deployment_check(task, onelora["onelora"], trained_1lora[(best_lr, seed0)], best_lr, seed0)
        saved.put(f"{where}/deploy", deploy)
    log(f"[{name}] deployment: adapted {deploy['adapted']:.4f}  merged {deploy['merged']:.4f}  "
        f"exported {deploy['exported']:.4f}  max |logit diff| {deploy['max_abs_logit_diff']:.2e}")
    b_mean, b_std = mean_std(before)
    return {
        "adapted_linears": linears,
        "norm_scales": norm_scales(pretrained),
        "sum_statistics": stats,
        "before": {"mean": b_mean, "std": b_std, "per_seed": before,
                   "note": "the start of every method: the pre-trained model"
                   + (" with the seed's fresh head" if task.new_head else "")},
        "methods": results,
        "deploy": deploy,
        "ranking": ranking(results),
    }


def run_task(name: str, budget: Budget, methods: list[Method], log: Log, saved: Saved) -> dict[str, Any]:
    """One task: each pre-training, then the comparison of every method on top of it."""
    task = TASKS[name]()
    variants: dict[str, dict[str, Any]] = {}
    shared: dict[str, dict[str, Any]] = {}
    for how in PRETRAININGS:
        label = how.label(task)
        where = f"{name}/{how.key}"

        def make(how: Any = how, label: str = label) -> tuple[nn.Module, dict[str, Any]]:
            log(f"[{name}] {label}: pre-training on the source task ({budget.pretrain_steps[name]} steps, "
                f"norm parameters at lr x{how.norm_lr_factor(task):g}, weight decay {how.norm_weight_decay:g})")
            return pretrain(task, budget.pretrain_steps[name], how,
                            progress=lambda line, label=label: log(f"[{name}] {label}: pre-training {line}"))

        def rebuild() -> nn.Module:
            torch.manual_seed(0)  # as pretrain() does before it builds the model
            return task.make_model()

        pretrained, pre, loaded = saved.model(f"{where}/pretrain", make, rebuild)
        log(f"[{name}] {label}: source test {task.metric} {pre['source_test_metric']:.3f} ({pre['seconds']:.0f} s"
            + (", from the saved results)" if loaded else ")")
            + ("" if pre["learned_source"] else "  WARNING: the source task was not learned"))
        result = compare_methods(task, pretrained, budget, methods, log, shared, saved, where)
        shared = {m.key: result["methods"][m.key] for m in methods if not m.uses_pretrained}
        kinds = result["sum_statistics"]["kinds"]
        log(f"[{name}] {label}: norm scale CV {result['norm_scales']['mean_cv']:.3f}; mean |s|/|x|_1 "
            + ", ".join(f"{k['label']} {k['abs_s_over_l1']:.4f} ({k['sites']} sites)" for k in kinds.values()
                        if k["sites"]))
        variants[how.key] = {"label": label, "pretrain": pre} | result
    pretrained_params = sum(p.numel() for p in pretrained.parameters())
    return {
        "description": task.description,
        "metric": task.metric,
        "norm_kind": task.norm_kind,
        "model": {"class": type(pretrained).__name__, "config": task.config, "parameters": pretrained_params},
        "data": {k: len(v[0]) for k, v in task.target.items()}
        | {f"source_{k}": len(v[0]) for k, v in task.source.items()},
        "steps": budget.steps[name], "batch": BATCH,
        "variants": variants,
    }
