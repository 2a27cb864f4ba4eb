"""1LoRA on quantized bases against PEFT's QLoRA: memory, step time and a small task's loss.

Model (size ``full``): a LLaMA, hidden 1024, intermediate 2816, 8 layers, 16 heads (8 kv
heads), vocab 1024, built in float32 from seed 0; every decoder linear (q, k, v, o, gate,
up, down: 56) is then quantized, while the embeddings, the norms and the head stay float32.
Batch 4 x seq 128, one CPU thread, AdamW (weight decay 0). Variants (``quantized_variants.py``):

* ``1lora-fp32``: ``ol.transform(model, "all-linear")`` on the float32 base (graph form);
* ``lora8-fp32``: PEFT LoRA r=8 (alpha 16) on the same 56 linears of the float32 base;
* ``1lora-int8``: 1LoRA on torchao ``Int8WeightOnlyConfig`` weights (module form);
* ``1lora-nf4``: 1LoRA on bitsandbytes ``Linear4bit`` NF4 layers (blocksize 64, nested
  statistics, float32 compute; module form);
* ``qlora8-nf4`` / ``qlora1-nf4``: PEFT LoRA r=8 (alpha 16) / r=1 (alpha 2) on the same NF4
  layers, through PEFT's bitsandbytes LoRA layers (QLoRA; no gradient checkpointing, as
  for every variant).

Task: next-token prediction on sequences drawn from a fixed random sparse bigram over 64
of the 1024 tokens (4 successors per token; entropy floor ~1.1 nats; a fresh random model
starts near ln 1024 = 6.9). Training batch i is the same for every variant; "loss 0" and
"loss N" are the loss on one fixed held-out batch before training and after the N steps
(N = 20). Learning rates are fixed per method family, AdamW 1e-2 for the 1LoRA vectors and
1e-3 for LoRA; no learning-rate search was done, so the losses only show that memory is not
bought with a broken adapter, not which method is best.

Each variant runs in its own fresh process (``--one VARIANT``) with OMP_NUM_THREADS=1:
build, one warm-up training step (creates the optimizer state), then

* persistent memory: the distinct storages of the model's parameters and buffers
  (torchao inner tensors and bitsandbytes quant states included) plus the AdamW state,
  measured after the warm-up step (gradients are freed after each step); "weights" is
  the same count on the quantized base before adapting it;
* step peak RSS: ``gc`` + ``malloc_trim``, VmHWM reset through ``/proc/self/clear_refs``,
  one step, then VmHWM minus the RSS before it (what a step adds on top of what
  persists; +-10% run to run);
* step peak alloc: the torch CPU allocator's peak in another step, from the profiler's
  allocation events (deterministic; misses autograd/Python objects and BLAS scratch);
* step time: the median over the remaining N - 2 steps (the profiled one excluded).

Rounds (``--rounds``, default 3): every variant once per round, the order rotated each
round; a step-time ratio is taken against "1LoRA on the same base" measured in the same
round, and the table reports the median over rounds (memory and losses: median too). The
verdicts are computed from the numbers.

    python benchmarks/quantized.py --quick                    # hidden 256, 2 layers, 1 round, ~2 min
    python benchmarks/quantized.py                            # full, 3 rounds: ~47 min on 2 busy cores
    python benchmarks/quantized.py --update-results           # + benchmarks/results/quantized.{json,png}

Results go to ``--out`` (default ``benchmarks/out/``, ignored through its own .gitignore):
``quantized.json`` (rewritten after every variant run; a rerun with the same ``--out``
resumes, skipping finished variant/round pairs, unless ``--fresh``), ``quantized.txt``
(table + verdicts), ``quantized.md`` (the same for the README) and ``quantized.png``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import quantized_variants as qv

MiB = 2**20
RESULTS = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------- one variant, in this process
def run_one(variant: str, size_name: str, steps: int) -> dict:
    torch.set_num_threads(1)
    size, (base, method, rank) = dict(qv.SIZES[size_name], steps=steps), qv.VARIANTS[variant]
    for name in ("bitsandbytes", "onelora_fx", "peft", "torchao", "transformers"):  # imports are no setup time
        importlib.import_module(name)

    started = time.perf_counter()
    model = qv.build_base(base, size)
    weights = qv.storage_bytes(qv.model_tensors(model))
    model, params, form = qv.adapt(model, method, rank, size)
    opt = torch.optim.AdamW(params, lr=qv.LR[method], weight_decay=0.0)
    setup_s = time.perf_counter() - started
    batches = [qv.sample_batch(size, seed=i) for i in range(size["steps"])]
    held_out = qv.sample_batch(size, seed=10_000)
    model.train()  # (bitsandbytes repacks 4-bit weights in eval mode on AVX512-BF16 CPUs)

    def eval_loss() -> float:
        with torch.no_grad():
            return qv.lm_loss(model, held_out).item()

    def step(i: int) -> float:
        loss = qv.lm_loss(model, batches[i])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    loss0 = eval_loss()
    losses = [step(0)]  # warm-up: optimizer state, lazy initialisation
    persistent = qv.storage_bytes(qv.model_tensors(model) + qv.optimizer_tensors(opt))
    qv.reset_peak_rss()
    rss_before = qv.rss_bytes()
    t = time.perf_counter()
    losses.append(step(1))
    times = [time.perf_counter() - t]
    peak_rss = qv.rss_bytes("VmHWM") - rss_before
    peak_alloc = qv.torch_alloc_peak(lambda: losses.append(step(2)))
    for i in range(3, size["steps"]):
        t = time.perf_counter()
        losses.append(step(i))
        times.append(time.perf_counter() - t)
    return {
        "variant": variant, "base": base, "method": method, "rank": rank, "form": form,
        "trainable_params": sum(p.numel() for p in params), "weights_mib": weights / MiB,
        "persistent_mib": persistent / MiB, "rss_before_step_mib": rss_before / MiB,
        "step_peak_rss_mib": peak_rss / MiB, "step_peak_alloc_mib": peak_alloc / MiB,
        "step_s": statistics.median(times), "step_times_s": times, "setup_s": setup_s,
        "loss_0": loss0, "loss_n": eval_loss(), "steps": size["steps"],
        "train_losses": losses,
    }


def run_in_subprocess(variant: str, size_name: str, steps: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", variant, "--size", size_name, "--steps", str(steps)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=7200, check=False)
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    if r.returncode != 0 or not lines:
        return {"error": f"exit {r.returncode}: {r.stderr.strip()[-3000:]}"}
    return json.loads(lines[-1])


# ---------------------------------------------------------------- the driver
def summarize(runs: dict, variants: list[str]) -> dict:
    """Median over rounds per variant; step-time ratios per round against the reference."""
    ok = {r: {v: res for v, res in by.items() if "error" not in res} for r, by in runs.items()}
    out = {}
    for v in variants:
        got = [by[v] for by in ok.values() if v in by]
        if not got:
            continue
        ref = qv.REFERENCE[qv.VARIANTS[v][0]]
        ratios = [by[v]["step_s"] / by[ref]["step_s"] for by in ok.values() if v in by and ref in by]
        s = {k: got[0][k] for k in ("base", "method", "rank", "form", "trainable_params", "steps")}
        for k in ("weights_mib", "persistent_mib", "step_peak_rss_mib", "step_peak_alloc_mib", "step_s",
                  "setup_s", "loss_0", "loss_n"):
            s[k] = statistics.median(g[k] for g in got)
        s.update(rounds=len(got), reference=ref, ratio_to_reference=statistics.median(ratios) if ratios else None,
                 ratio_per_round=ratios)
        out[v] = s
    return out


def verdicts(runs: dict, summary: dict) -> list[dict]:
    a, b = summary.get("1lora-nf4"), summary.get("qlora8-nf4")
    if a is None or b is None:
        return [{"claim": "1LoRA NF4 vs QLoRA r=8", "met": None, "numbers": "a variant is missing"}]
    ok = [by for by in runs.values() if all("error" not in by.get(v, {"error": 1}) for v in ("1lora-nf4", "qlora8-nf4"))]
    out = []
    for key, what in (("persistent_mib", "persistent"), ("step_peak_alloc_mib", "step peak (torch alloc)"),
                      ("step_peak_rss_mib", "step peak (RSS)")):
        out.append({"claim": f"1LoRA NF4 {what} memory < PEFT QLoRA r=8 (NF4)", "met": a[key] < b[key],
                    "numbers": f"{a[key]:.1f} MiB vs {b[key]:.1f} MiB ({a[key] / b[key]:.3f}x)"})
    if ok:
        time_ratio = statistics.median(by["1lora-nf4"]["step_s"] / by["qlora8-nf4"]["step_s"] for by in ok)
        out.append({"claim": "1LoRA NF4 step time <= 1.05 x QLoRA r=8", "met": time_ratio <= 1.05,
                    "numbers": f"median per-round ratio {time_ratio:.3f} ({a['step_s']:.2f} s vs {b['step_s']:.2f} s)"})
    else:
        out.append({"claim": "1LoRA NF4 step time <= 1.05 x QLoRA r=8", "met": None,
                    "numbers": "no round in which both ran without an error"})
    share = a["persistent_mib"] / a["weights_mib"]
    out.append({"claim": "1LoRA NF4 persistent memory within 5% of the NF4 weights alone", "met": share <= 1.05,
                "numbers": f"{a['persistent_mib']:.2f} MiB vs {a['weights_mib']:.2f} MiB weights ({share:.3f}x)"})
    return out


def table(summary: dict) -> str:
    from tabulate import tabulate

    def f(v, spec):
        return "" if v is None else format(v, spec)

    rows = [(v, qv.BASE_LABEL[s["base"]], s["form"],
             f"{s['trainable_params']:,}", f(s["weights_mib"], ".1f"), f(s["persistent_mib"], ".1f"),
             f(s["step_peak_rss_mib"], ".0f"), f(s["step_peak_alloc_mib"], ".0f"), f(1e3 * s["step_s"], ".0f"),
             f(s["ratio_to_reference"], ".3f"), f(s["loss_0"], ".3f"), f(s["loss_n"], ".3f"))
            for v, s in summary.items()]
    return tabulate(rows, disable_numparse=True, headers=("variant", "base", "form", "trainable", "weights MiB", "persistent MiB",
                                   "step peak RSS MiB", "step peak alloc MiB", "step ms",
                                   "time / 1LoRA same base", "loss 0", "loss N"))


def plot(summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
    colors = {"fp32": "tab:blue", "int8": "tab:green", "nf4": "tab:red"}
    biggest = max(s["trainable_params"] for s in summary.values())
    panels = (("persistent memory (weights + trainable + AdamW state), MiB", lambda s: s["persistent_mib"]),
              ("persistent + peak torch allocations in a step, MiB",
               lambda s: s["persistent_mib"] + s["step_peak_alloc_mib"]))
    for ax, (label, value) in zip(axes, panels):
        for v, s in summary.items():
            x, y, lora = s["ratio_to_reference"] or 1.0, value(s), s["method"] != "1lora"
            ax.scatter(x, y, s=60 + 1500 * (s["trainable_params"] / biggest) ** 0.5, alpha=0.5,
                       color=colors[s["base"]], marker="s" if lora else "o")
            ax.annotate(f"{v} ({s['trainable_params']:,})\nloss {s['loss_0']:.2f} -> {s['loss_n']:.2f}", (x, y),
                        xytext=(14 if lora else -14, 0), textcoords="offset points", fontsize=7, va="center",
                        ha="left" if lora else "right")
        ax.set_xlabel("step time / 1LoRA on the same base (median per-round ratio; lower is better)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.margins(x=0.5)
        ax.set_ylim(bottom=0, top=1.12 * max(value(s) for s in summary.values()))
    fig.suptitle(f"{title}\ncircles 1LoRA, squares PEFT LoRA; colour: base (blue fp32, green torchao int8, red "
                 "bitsandbytes NF4); area ~ sqrt(trainable parameters)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="size quick, 1 round: a smoke run")
    p.add_argument("--size", choices=tuple(qv.SIZES), default=None)
    p.add_argument("--rounds", type=int, default=None, help="default 3 (1 with --quick)")
    p.add_argument("--steps", type=int, default=None, help="training steps N, >= 3 (default 20; 4 with --quick)")
    p.add_argument("--variants", nargs="*", default=None, help="a subset (the references are added)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    p.add_argument("--fresh", action="store_true", help="ignore partial results in --out")
    p.add_argument("--update-results", action="store_true", help="also write benchmarks/results/quantized.*")
    p.add_argument("--one", metavar="VARIANT", choices=tuple(qv.VARIANTS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    size_name = args.size or ("quick" if args.quick else "full")
    steps = args.steps or qv.SIZES[size_name]["steps"]
    if steps < 3:
        p.error("--steps must be >= 3 (warm-up, RSS step, profiled step)")
    if args.one:
        print(json.dumps(run_one(args.one, size_name, steps)))
        return
    if args.update_results and (args.quick or size_name != "full"):
        p.error("--update-results records a full run into benchmarks/results/: not with --quick or another --size")
    rounds = args.rounds or (1 if args.quick else 3)
    wanted = args.variants or list(qv.VARIANTS)
    variants = [v for v in qv.VARIANTS if v in wanted or v in {qv.REFERENCE[qv.VARIANTS[w][0]] for w in wanted}]
    size = dict(qv.SIZES[size_name], steps=steps)
    config = {"size": size_name, "shape": size, "rounds": rounds, "variants": variants, "lr": qv.LR,
              "torch": torch.__version__, "threads": 1}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "quantized.json"
    report = json.loads(path.read_text()) if path.exists() and not args.fresh else {}
    if report.get("config") != json.loads(json.dumps(config)):  # resume only the very same run
        if report:
            print(f"{path}: made with another configuration (size, shape, rounds, variants, torch): "
                  "starting afresh", file=sys.stderr)
        report = {}
    report["config"] = config
    runs = report.setdefault("runs", {})
    started = time.time()
    for r in range(rounds):
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        for v in order:
            if "error" not in runs.get(str(r), {}).get(v, {"error": "not run"}):
                continue
            t = time.time()
            load = os.getloadavg()[0]
            res = run_in_subprocess(v, size_name, steps)
            res.update(run_s=time.time() - t, load_avg_1min=[load, os.getloadavg()[0]])
            runs.setdefault(str(r), {})[v] = res
            state = "FAILED " + res["error"].splitlines()[-1] if "error" in res else "ok"
            print(f"round {r + 1}/{rounds}  {v:11s} {time.time() - t:7.1f} s  {state}", flush=True)
            report["partial"] = True
            path.write_text(json.dumps(report, indent=1))
    summary = summarize(runs, variants)
    checks = verdicts(runs, summary)
    s = size
    title = (f"LLaMA hidden {s['hidden']}, {s['layers']} layers, vocab {s['vocab']}, batch {s['batch']} x seq "
             f"{s['seq']}, {s['steps']} AdamW steps, 1 CPU thread, torch {torch.__version__}, "
             f"median of {rounds} round(s)")
    text = table(summary)
    lines = [f"{'met' if c['met'] else 'NOT MET' if c['met'] is not None else 'n/a':8s} {c['claim']}: {c['numbers']}"
             for c in checks]
    loads = [x for by in runs.values() for res in by.values() for x in res.get("load_avg_1min", [])] or [float("nan")]
    wall = sum(res.get("run_s", 0) for by in runs.values() for res in by.values())
    load_note = (f"load average (1 min, 2 cores shared) at the start and end of each run: {min(loads):.2f} - "
                 f"{max(loads):.2f} (median {statistics.median(loads):.2f}); all runs {wall / 60:.1f} min")
    print(f"\n{title}\n{text}\n\n" + "\n".join(lines) + f"\n\n{load_note}; wall {time.time() - started:.0f} s")
    report.update(partial=False, title=title, summary=summary, verdicts=checks, table=text, load_note=load_note,
                  wall_s_all_runs=wall, wall_s_this_invocation=time.time() - started)
    path.write_text(json.dumps(report, indent=1))
    (args.out / "quantized.txt").write_text(f"{title}\n{text}\n\n" + "\n".join(lines) + f"\n{load_note}\n")
    md = "\n".join(f"* {'met' if c['met'] else 'not met'}: {c['claim']} ({c['numbers']})" for c in checks)
    (args.out / "quantized.md").write_text(f"{title}\n\n```\n{text}\n```\n\n{md}\n\n{load_note}\n")
    try:
        plot(summary, args.out / "quantized.png", title)
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
    if args.update_results:
        RESULTS.mkdir(exist_ok=True)
        shutil.copyfile(path, RESULTS / "quantized.json")
        if (args.out / "quantized.png").exists():
            shutil.copyfile(args.out / "quantized.png", RESULTS / "quantized.png")
        print(f"wrote {RESULTS / 'quantized.json'} and quantized.png")


if __name__ == "__main__":
    main()
