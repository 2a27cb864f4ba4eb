"""Many adapters in one batch: what ``ol.stack`` costs against one adapter, and PEFT's
mixed-adapter batches against its own single adapter.

A LLaMA (hidden 256, 2 layers; about 0.4 s per training step on one thread), a
batch of 256 sequences of 16 tokens, and K adapters in {1, 8, 64, 256} mixed row by row
(row i takes adapter i mod K). Measured, side by side in interleaved rounds (medians of
per-round ratios, the machine being shared and noisy):

* onelora_fx inference: ``ol.stack`` of K adapters (one gather per site) over the same
  model with one adapter (``gm``), both in ``torch.no_grad``;
* onelora_fx training: one AdamW step of the stack (every tenant's rows train its own
  adapter) over one step of the single-adapter module;
* PEFT inference, the peer: ``PeftModel(..., adapter_names=[one name per row])`` with K
  LoRA r=1 adapters (PEFT runs one sub-batch per adapter) over the same model with one
  LoRA r=1 adapter and no ``adapter_names``. PEFT's mixed batches are inference only.

Target: K = 256 costs at most 1.05x one adapter, in inference and in training.

Results: ``multi_adapter.json`` and ``multi_adapter.png`` in ``--out`` (default
``benchmarks/out/``, not tracked by git); ``--update-results`` also writes them into
``benchmarks/results/``, the committed copies the README quotes (not with ``--quick``).
Progress (one line per stage and per round, with the elapsed seconds) goes to stderr,
the tables to stdout. ``--quick``: K in {1, 8}, 3 rounds, to check that everything
runs (its ratios are not the benchmark's numbers).

    python benchmarks/multi_adapter.py --quick           # ~1 min on 2 busy cores
    python benchmarks/multi_adapter.py                   # about 2 minutes on one thread (more when busy)
    python benchmarks/multi_adapter.py --update-results  # the same, and refresh benchmarks/results/
    python benchmarks/multi_adapter.py --out DIR         # DIR/multi_adapter.json, .png
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import onelora_fx as ol  # noqa: E402
from publish import publish  # noqa: E402  (beside this script)

BENCHMARKS = Path(__file__).resolve().parent
DEFAULT_OUT = BENCHMARKS / "out"  # ignored by git
BATCH, SEQ, VOCAB = 256, 16, 512
STARTED = time.perf_counter()


def log(line: str) -> None:
    """A progress line on stderr with the seconds since the start."""
    print(f"{time.perf_counter() - STARTED:7.1f}s  {line}", file=sys.stderr, flush=True)


def llama() -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=4, vocab_size=VOCAB, use_cache=False)
    return transformers.LlamaForCausalLM(cfg).eval()


def vectors(gm: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g) * 0.02 for n, p in ol.adapter_parameters(gm).items()}


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def step(module: torch.nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor, **extra) -> None:
    logits = module(input_ids=ids, **extra).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    opt.zero_grad()
    loss.backward()
    opt.step()


def onelora_cases(model, ids, ks) -> dict[str, Callable[[], object]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = ol.transform(model, "all-linear", example_kwargs={"input_ids": ids[:2]})
    with torch.no_grad():
        for n, v in vectors(gm, 0).items():
            gm.get_parameter(n).copy_(v)
    cases = {}
    opt_one = torch.optim.AdamW(ol.adapter_parameters(gm).values(), lr=1e-4)
    cases["onelora infer single"] = lambda: _no_grad(gm, input_ids=ids)
    cases["onelora train single"] = lambda: step(gm, opt_one, ids)
    for k in ks:
        log(f"onelora_fx: ol.stack of {k} adapter(s)")
        files = [vectors(gm, seed) for seed in range(k)]
        multi = _stack(gm, files)
        rows = torch.arange(BATCH) % k
        opt = torch.optim.AdamW(ol.adapter_parameters(multi).values(), lr=1e-4)
        cases[f"onelora infer {k}"] = lambda m=multi, r=rows: _no_grad(m, input_ids=ids, adapter_ids=r)
        cases[f"onelora train {k}"] = lambda m=multi, r=rows, o=opt: step(m, o, ids, adapter_ids=r)
    return cases


def _stack(gm, adapters: list[dict[str, torch.Tensor]]) -> torch.nn.Module:
    """A stack of ``len(adapters)`` vector sets (built from modules of the same base)."""
    multi = ol.stack(gm, [gm] * len(adapters))
    with torch.no_grad():
        for n, p in ol.adapter_parameters(multi).items():
            p.copy_(torch.stack([a[n] for a in adapters]))
    return multi


def _no_grad(module, **kwargs):
    with torch.no_grad():
        return module(**kwargs)


def peft_cases(model, ids, ks) -> dict[str, Callable[[], object]]:
    import copy

    import peft

    cases = {}
    for k in [1, *ks]:
        log(f"PEFT: a model with {k} LoRA r=1 adapter(s)")
        pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=1, target_modules="all-linear", init_lora_weights=False),
                                 adapter_name="a0")
        for i in range(1, k):
            pm.add_adapter(f"a{i}", peft.LoraConfig(r=1, target_modules="all-linear", init_lora_weights=False))
        pm.eval()
        names = [f"a{i % k}" for i in range(BATCH)]
        if k == 1:
            cases["peft infer 1"] = lambda m=pm: _no_grad(m, input_ids=ids)
        else:
            cases[f"peft infer {k}"] = lambda m=pm, n=names: _no_grad(m, input_ids=ids, adapter_names=n)
    return cases


def measure(cases: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    log(f"warm-up: one call of each of the {len(cases)} cases")
    for fn in cases.values():  # warm up
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(rounds):
        order = list(cases)
        order = order[r % len(order):] + order[: r % len(order)]  # rotate: no variant always first
        for name in order:
            times[name].append(timed(cases[name]))
        log(f"round {r + 1}/{rounds}")
    return times


def ratios(times: dict[str, list[float]], name: str, base: str) -> tuple[float, float, float]:
    per_round = sorted(a / b for a, b in zip(times[name], times[base]))
    q = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else [per_round[0]] * 3
    return statistics.median(per_round), q[0], q[2]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, key in [("onelora_fx stack, inference", "onelora infer"), ("onelora_fx stack, training step", "onelora train"),
                       ("PEFT mixed batch, inference", "peft infer")]:
        pts = [(r["K"], r[key]) for r in rows if r.get(key) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("adapters K mixed in one batch of 256 rows")
    ax.set_ylabel("time / one adapter (same system)")
    ax.axhline(1.05, color="grey", linestyle="--", linewidth=1, label="target 1.05x")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("Many adapters in one batch (LLaMA hidden 256, 2 layers, CPU, 1 thread)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="K in {1, 8}, 3 rounds (~1 min)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 15, 3 with --quick)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="folder for the JSON and PNG (default: benchmarks/out/, not tracked by git)")
    parser.add_argument("--update-results", action="store_true",
                        help="also write them into benchmarks/results/ (the committed copies; not with --quick)")
    args = parser.parse_args(argv)
    if args.update_results and args.quick:
        parser.error("--update-results records a full run into benchmarks/results/: not with --quick")
    torch.set_num_threads(1)
    ks = [8] if args.quick else [8, 64, 256]
    rounds = args.rounds if args.rounds is not None else 3 if args.quick else 15
    log(f"K in {[1, *ks]}, {rounds} rounds; building the LLaMA and ol.transform")
    model = llama()
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    cases = {**onelora_cases(model, ids, [1, *ks]), **peft_cases(model, ids, ks)}
    times = measure(cases, rounds)
    rows = []
    for k in [1, *ks]:
        row = {"K": k}
        for what, base in [("onelora infer", "onelora infer single"), ("onelora train", "onelora train single"),
                           ("peft infer", "peft infer 1")]:
            name = f"{what} {k}"
            if name in times and (k > 1 or what != "peft infer"):
                med, lo, hi = ratios(times, name, base)
                row[what], row[what + " IQR"] = med, (lo, hi)
                row[what + " ms"] = 1000 * statistics.median(times[name])
            elif k == 1 and what == "peft infer":
                row[what], row[what + " ms"] = 1.0, 1000 * statistics.median(times["peft infer 1"])
        rows.append(row)
    header = ["K", "onelora infer ms", "/ 1 adapter", "onelora train ms", "/ 1 adapter", "PEFT infer ms", "/ 1 adapter"]
    table = tabulate([[r["K"], f"{r['onelora infer ms']:.1f}", f"{r['onelora infer']:.3f}", f"{r['onelora train ms']:.1f}",
                       f"{r['onelora train']:.3f}", f"{r['peft infer ms']:.1f}", f"{r['peft infer']:.3f}"] for r in rows],
                     headers=header)
    last = rows[-1]
    verdict = {
        "inference": last["onelora infer"] <= 1.05, "training": last["onelora train"] <= 1.05,
        "K": last["K"], "peft_inference": last["peft infer"],
    }
    print(f"LLaMA hidden 256, 2 layers, batch {BATCH} x {SEQ}, {rounds} rounds, 1 thread (medians of per-round ratios)")
    print(table)
    print(f"\nK = {last['K']}: onelora_fx inference {last['onelora infer']:.3f}x, training {last['onelora train']:.3f}x one "
          f"adapter (target <= 1.05x: inference {'met' if verdict['inference'] else 'not met'}, training "
          f"{'met' if verdict['training'] else 'not met'}); PEFT mixed-batch inference {last['peft infer']:.2f}x its one adapter")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"rows": rows, "verdict": verdict, "rounds": rounds, "batch": [BATCH, SEQ], "torch": torch.__version__,
              "machine": platform.processor() or platform.machine(), "mode": "quick" if args.quick else "default"}
    written = [args.out / "multi_adapter.json", args.out / "multi_adapter.png"]
    written[0].write_text(json.dumps(result, indent=2))
    plot(rows, written[1])
    if args.update_results:
        written += publish(written)
    log("wrote " + ", ".join(str(p) for p in written))
    return result


if __name__ == "__main__":
    main()
