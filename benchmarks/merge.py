"""Deployment cost of 1LoRA: folding speed and merged inference time, as ratios.

On a LLaMA config big enough that copying its adapted weights takes over a second
(hidden 1024, intermediate 2816, 24 layers: 1.2 GB of float32 weights):

* fold throughput: ``ol.merge(gm)`` (new weights, float32 fold) and
  ``ol.merge(gm, inplace=True)`` (written into the shared weights) against a plain
  ``torch.clone`` of the same weights, the cheapest way to produce them;
* inference: the merged graph against the un-adapted capture of the same model (target
  1.00: it is the same graph) and against the eager Hugging Face model, interleaved
  rounds, medians of per-round ratios.

    python benchmarks/merge.py
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import onelora_fx as ol  # noqa: E402
from onelora_fx.tools import zoo  # noqa: E402
from onelora_fx.state import Capture  # noqa: E402
from onelora_fx.forms import GraphForm  # noqa: E402


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--repeats", type=int, default=3, help="fold timings per method")
    parser.add_argument("--rounds", type=int, default=20, help="interleaved inference rounds")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    model, _, _ = zoo.llama(args.layers, args.hidden, args.intermediate, vocab=1024, heads=16, kv_heads=16)
    model.eval()
    ids = torch.randint(0, 1024, (2, args.seq), generator=torch.Generator().manual_seed(0))
    example = {"input_ids": ids[:, :16].clone()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base_graph = GraphForm().capture(model, (), example, True, Capture.AUTO).root.eval()  # the un-adapted capture
        gm = ol.transform(model, "all-linear", example_kwargs=example)
    with torch.no_grad():
        for b in ol.adapter_parameters(gm).values():
            b.normal_(0, 0.01)
    weights = [s.weight for s in ol.sites(gm) if s.adapted]
    gbytes = sum(w.numel() * w.element_size() for w in weights) / 1e9
    print(f"LLaMA {args.layers} layers, hidden {args.hidden}: {len(weights)} adapted weights, {gbytes:.2f} GB", file=sys.stderr)

    # fold throughput, alternating so that drift hits both alike
    clone_t, merge_t = [], []
    for _ in range(args.repeats):
        clone_t.append(timed(lambda: [w.clone() for w in weights]))
        merge_t.append(timed(lambda: ol.merge(gm)))
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
        for fn in runners.values():
            fn()
        for _ in range(args.rounds):
            order = list(runners)
            rng.shuffle(order)
            for k in order:
                times[k].append(timed(runners[k]))
    with torch.no_grad():
        max_diff = (merged(input_ids=ids).logits - gm.eval()(input_ids=ids).logits).abs().max().item()

    inplace_t = timed(lambda: ol.merge(gm, inplace=True))  # last: it changes the model
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
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
