"""Training-step cost of 1LoRA against the BitFit floor and the paper's Listing 1.

Every variant trains the same LLaMA config (hidden 512, intermediate 1376, 4 layers,
batch 4 x seq 128; AdamW; one CPU thread) with the same adapted layers. The floor is
BitFit's cost on those layers: a zero-init trainable bias on each adapted linear and
everything else frozen (the same autograd shape as 1LoRA: one vector per layer). It is
measured twice: through the same graph capture as onelora_fx (the reference for what
the 1LoRA pass costs) and as the eager Hugging Face model (what a user starts from;
the exported graph runs attention with a materialized causal mask, which the eager
model skips).

Variants run interleaved, one step each per round in a shuffled order, and each round
yields a ratio to the floor's step in that round; the table reports medians of those
ratios, which cancels most of the drift of a shared, noisy machine.

    python benchmarks/train_step.py                 # default: 30 rounds
    python benchmarks/train_step.py --rounds 5      # a quick look
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import onelora_fx as ol  # noqa: E402
from onelora_fx import zoo  # noqa: E402

VOCAB = 1024


class ILoRA(nn.Module):
    """The paper's Listing 1."""

    def __init__(self, linear):
        super().__init__()
        self.linear = linear
        self.b = nn.Parameter(torch.zeros(linear.out_features))

    def forward(self, x):
        ilora = self.b * x.sum(-1, keepdim=True)
        return self.linear(x) + ilora


def llama_model() -> nn.Module:
    torch.manual_seed(0)
    model, _, _ = zoo.llama(layers=4, hidden=512, intermediate=1376, vocab=VOCAB, heads=8, kv_heads=8)
    return model


def adapted_linears(model: nn.Module) -> list[str]:
    """The layers every variant adapts: each nn.Linear but the head (all-linear)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]


def _swap(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _freeze(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def floor(base: nn.Module, example: dict) -> nn.Module:
    model = _freeze(copy.deepcopy(base))
    for path in adapted_linears(model):
        lin = model.get_submodule(path)
        lin.bias = nn.Parameter(torch.zeros(lin.out_features))
    return model


def floor_captured(base: nn.Module, example: dict) -> nn.Module:
    """The floor through the same graph capture as onelora_fx: what the 1LoRA pass
    itself costs is measured against this one."""
    from onelora_fx.capture import capture

    gm = capture(floor(base, example), (), example).gm
    for name, p in gm.named_parameters():
        p.requires_grad_(name.rpartition(".")[0] in adapted_linears(base) and name.endswith(".bias"))
    return gm


def onelora_eager(base: nn.Module, example: dict) -> nn.Module:
    return ol.transform(copy.deepcopy(base), "all-linear", example_kwargs=example)


def listing1(base: nn.Module, example: dict) -> nn.Module:
    model = _freeze(copy.deepcopy(base))
    for path in adapted_linears(model):
        _swap(model, path, ILoRA(model.get_submodule(path)))
    return model


FLOOR = "BitFit floor (captured graph)"
VARIANTS: dict[str, Callable[[nn.Module, dict], nn.Module]] = {
    FLOOR: floor_captured,
    "BitFit floor (eager model)": floor,
    "onelora_fx (eager)": onelora_eager,
    "Listing 1 wrapper (eager model)": listing1,
}


def logits(out):
    return out.logits if hasattr(out, "logits") else out


def make_step(model: nn.Module, ids: torch.Tensor) -> Callable[[], float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    targets = ids.roll(-1, dims=1)
    model.train()

    def step() -> float:
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out = logits(model(input_ids=ids))
        F.cross_entropy(out.reshape(-1, out.shape[-1]), targets.reshape(-1)).backward()
        opt.step()
        return time.perf_counter() - start

    return step


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    base = llama_model()
    ids = torch.randint(0, VOCAB, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    steps, trainable = {}, {}
    for name, build in VARIANTS.items():
        model = build(base, {"input_ids": ids[:2, :16]})
        trainable[name] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        steps[name] = make_step(model, ids)
        for _ in range(args.warmup):
            steps[name]()
    times: dict[str, list[float]] = {n: [] for n in steps}
    rng = random.Random(0)
    for r in range(args.rounds):
        order = list(steps)
        rng.shuffle(order)
        for name in order:
            times[name].append(steps[name]())
        print(f"\rround {r + 1}/{args.rounds}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    ref = times[FLOOR]
    results = {}
    for name, ts in times.items():
        ratios = [t / f for t, f in zip(ts, ref)]
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        results[name] = {
            "trainable_params": trainable[name],
            "step_ms_median": 1e3 * statistics.median(ts),
            "ratio_to_floor_median": statistics.median(ratios),
            "ratio_to_floor_iqr": [q[0], q[2]],
        }
    for key, other in (("ratio_to_eager_floor_median", "BitFit floor (eager model)"), ("ratio_to_listing1_median", "Listing 1 wrapper (eager model)")):
        for name, ts in times.items():
            results[name][key] = statistics.median(t / f for t, f in zip(ts, times[other]))
    rows = [
        (
            name,
            f"{r['trainable_params']:,}",
            f"{r['step_ms_median']:.1f}",
            f"{r['ratio_to_floor_median']:.3f}",
            f"{r['ratio_to_floor_iqr'][0]:.3f}-{r['ratio_to_floor_iqr'][1]:.3f}",
            f"{r['ratio_to_eager_floor_median']:.3f}",
            f"{r['ratio_to_listing1_median']:.3f}",
        )
        for name, r in results.items()
    ]
    print(
        f"LLaMA hidden 512, intermediate 1376, 4 layers, vocab {VOCAB}; batch {args.batch} x seq {args.seq}; "
        f"AdamW; {args.threads} thread(s); {args.rounds} interleaved rounds; torch {torch.__version__}"
    )
    print(tabulate(rows, headers=("variant", "trainable", "step ms", "/ floor", "IQR", "/ eager floor", "/ Listing 1")))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
