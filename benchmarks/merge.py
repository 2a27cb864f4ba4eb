"""Deployment cost of 1LoRA: folding speed and merged inference time, as ratios.

On a LLaMA config big enough that copying its adapted weights takes over a second
(hidden 1024, intermediate 2816, 24 layers: 1.2 GB of float32 weights):

* fold throughput: ``ol.merge(gm)`` (new weights, float32 fold) and
  ``ol.merge(gm, inplace=True)`` (written into the shared weights) against a plain
  ``torch.clone`` of the same weights, the cheapest way to produce them;
* inference: the merged graph against the un-adapted capture of the same model (target
  1.00: it is the same graph) and against the eager Hugging Face model, interleaved
  rounds, medians of per-round ratios.

Results: ``merge.json`` in ``--out`` (default ``benchmarks/out/``, not tracked by git);
``--update-results`` also writes it into ``benchmarks/results/``, the committed copy
the README quotes (not with ``--quick``). ``--json FILE``, the earlier option, still
writes the JSON to ``FILE`` as well. Progress (one line per stage, fold repeat and
inference round, with the elapsed seconds) goes to stderr, the tables to stdout.

``--quick`` checks that everything runs, in about a minute on 2 busy cores: 4 layers,
hidden 512, intermediate 1376 (0.05 GB of adapted weights: too small for the fold
timings to mean much), 2 fold repeats, 5 inference rounds.

    OMP_NUM_THREADS=2 python benchmarks/merge.py --quick            # ~1 min
    OMP_NUM_THREADS=2 python benchmarks/merge.py                    # ~5 min on 2 busy cores
    OMP_NUM_THREADS=2 python benchmarks/merge.py --update-results   # and refresh benchmarks/results/merge.json
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import onelora_fx as ol  # noqa: E402
from publish import RESULTS, publish  # noqa: E402  (beside this script)
from onelora_fx.tools import zoo  # noqa: E402
from onelora_fx.state import Capture  # noqa: E402
from onelora_fx.forms import GraphForm  # noqa: E402

BENCHMARKS = Path(__file__).resolve().parent
DEFAULT_OUT = BENCHMARKS / "out"  # ignored by git
QUICK = {"layers": 4, "hidden": 512, "intermediate": 1376, "repeats": 2, "rounds": 5}
FULL = {"layers": 24, "hidden": 1024, "intermediate": 2816, "repeats": 3, "rounds": 20}
STARTED = time.perf_counter()


def log(line: str) -> None:
    """A progress line on stderr with the seconds since the start."""
    print(f"{time.perf_counter() - STARTED:7.1f}s  {line}", file=sys.stderr, flush=True)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="check that everything runs (~1 min): " + ", ".join(f"{k} {v}" for k, v in QUICK.items()))
    parser.add_argument("--layers", type=int, default=None, help=f"default {FULL['layers']}")
    parser.add_argument("--hidden", type=int, default=None, help=f"default {FULL['hidden']}")
    parser.add_argument("--intermediate", type=int, default=None, help=f"default {FULL['intermediate']}")
    parser.add_argument("--repeats", type=int, default=None, help=f"fold timings per method (default {FULL['repeats']})")
    parser.add_argument("--rounds", type=int, default=None, help=f"interleaved inference rounds (default {FULL['rounds']})")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="folder for merge.json (default: benchmarks/out/, not tracked by git)")
    parser.add_argument("--update-results", action="store_true",
                        help="also write benchmarks/results/merge.json (the committed copy; not with --quick)")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON to this file (earlier option)")
    args = parser.parse_args(argv)
    if args.update_results and args.quick:
        parser.error("--update-results records a full run into benchmarks/results/: not with --quick")
    if args.json and args.quick and args.json.resolve().parent == RESULTS:
        parser.error("--json into benchmarks/results/ records a full run there: not with --quick")
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    torch.manual_seed(0)

    log(f"building a LLaMA, {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}")
    model, _, _ = zoo.llama(args.layers, args.hidden, args.intermediate, vocab=1024, heads=16, kv_heads=16)
    model.eval()
    ids = torch.randint(0, 1024, (2, args.seq), generator=torch.Generator().manual_seed(0))
    example = {"input_ids": ids[:, :16].clone()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        log("capturing the un-adapted graph")
        base_graph = GraphForm().capture(model, (), example, True, Capture.AUTO).root.eval()  # the un-adapted capture
        log("ol.transform(model, 'all-linear')")
        gm = ol.transform(model, "all-linear", example_kwargs=example)
    with torch.no_grad():
        for b in ol.adapter_parameters(gm).values():
            b.normal_(0, 0.01)
    weights = [s.weight for s in ol.sites(gm) if s.adapted]
    gbytes = sum(w.numel() * w.element_size() for w in weights) / 1e9
    log(f"{len(weights)} adapted weights, {gbytes:.2f} GB")

    # fold throughput, alternating so that drift hits both alike
    clone_t, merge_t = [], []
    for r in range(args.repeats):
        clone_t.append(timed(lambda: [w.clone() for w in weights]))
        merge_t.append(timed(lambda: ol.merge(gm)))
        log(f"fold repeat {r + 1}/{args.repeats}: clone {clone_t[-1]:.2f} s, ol.merge {merge_t[-1]:.2f} s")
    merged = ol.merge(gm).eval()

    # inference: merged graph vs base capture vs eager model, interleaved
    runners = {
        "merged graph": lambda: merged(input_ids=ids),
        "base capture": lambda: base_graph(input_ids=ids),
        "eager model": lambda: model(input_ids=ids),
    }
    times = {k: [] for k in runners}
    rng = random.Random(0)
    with torch.no_grad():
        log(f"inference warm-up ({', '.join(runners)})")
        for fn in runners.values():
            fn()
        for r in range(args.rounds):
            order = list(runners)
            rng.shuffle(order)
            for k in order:
                times[k].append(timed(runners[k]))
            log(f"inference round {r + 1}/{args.rounds}")
    with torch.no_grad():
        max_diff = (merged(input_ids=ids).logits - gm.eval()(input_ids=ids).logits).abs().max().item()

    inplace_t = timed(lambda: ol.merge(gm, inplace=True))  # last: it changes the model
    log(f"ol.merge(gm, inplace=True): {inplace_t:.2f} s")
    results = {
        "adapted_weight_gb": gbytes,
        "clone_s": statistics.median(clone_t),
        "merge_s": statistics.median(merge_t),
        "merge_inplace_s": inplace_t,
        "merge_over_clone": statistics.median(m / c for m, c in zip(merge_t, clone_t)),
        "merge_inplace_over_clone": inplace_t / statistics.median(clone_t),
        "merged_over_base_capture": statistics.median(a / b for a, b in zip(times["merged graph"], times["base capture"])),
        "merged_over_eager_model": statistics.median(a / b for a, b in zip(times["merged graph"], times["eager model"])),
        "inference_ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
        "merged_vs_adapted_max_abs_diff": max_diff,
        "model": {"layers": args.layers, "hidden": args.hidden, "intermediate": args.intermediate,
                  "adapted_weights": len(weights)},
        "batch": [2, args.seq], "repeats": args.repeats, "rounds": args.rounds,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "mode": "quick" if args.quick else "default",
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch 2 x seq {args.seq}")
    print(tabulate(
        [
            ("torch.clone of the adapted weights", f"{results['clone_s']:.2f} s", "1.00"),
            ("ol.merge(gm)", f"{results['merge_s']:.2f} s", f"{results['merge_over_clone']:.2f}"),
            ("ol.merge(gm, inplace=True)", f"{results['merge_inplace_s']:.2f} s", f"{results['merge_inplace_over_clone']:.2f}"),
        ],
        headers=(f"fold {gbytes:.2f} GB", "time", "/ clone"),
    ))
    print()
    print(tabulate(
        [(k, f"{v:.1f}", f"{statistics.median(a / b for a, b in zip(times[k], times['base capture'])):.3f}",
          f"{statistics.median(a / b for a, b in zip(times[k], times['eager model'])):.3f}")
         for k, v in results["inference_ms"].items()],
        headers=("inference", "ms", "/ base capture", "/ eager model"),
    ))
    print(f"\nmerged vs adapted logits: max |diff| {max_diff:.2e}")
    args.out.mkdir(parents=True, exist_ok=True)
    written = [args.out / "merge.json"]
    written[0].write_text(json.dumps(results, indent=2))
    if args.json and args.json.resolve() != written[0].resolve():
        args.json.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(written[0], args.json)
        written.append(args.json)
    if args.update_results:
        written += publish(written[:1])
    log("wrote " + ", ".join(str(p) for p in written))
    return results


if __name__ == "__main__":
    main()
