"""Training-step cost of 1LoRA against the BitFit floor, the paper's Listing 1 and PEFT.

Two workloads, one CPU thread, AdamW:

* ``llama``: LLaMA hidden 512, intermediate 1376, 4 layers, vocab 1024, batch 4 x seq
  128, every linear but the head adapted (28 layers);
* ``linear``: one 1024 x 1024 linear on a [2048, 1024] input, loss = mean square.

The floor is BitFit's cost on the adapted layers: a zero-init trainable bias on each
adapted linear, everything else frozen (the same autograd shape as 1LoRA: one vector
per layer). It is measured through the same graph capture as onelora_fx ("captured
graph", the reference for what the 1LoRA pass costs) and as the eager model.

Step time: variants run interleaved, one step each per round in a shuffled order; each
round gives a ratio to the floor's step in that round and the table reports the median
of those ratios (and their interquartile range), which cancels most of the drift of a
shared, noisy machine.

Peak memory: each variant runs again in its own process (glibc told to serve big
blocks from mmap, so freed memory leaves the RSS at once). After building, one warm-up
step and ``malloc_trim``, the process resets its peak resident set size
(``/proc/self/clear_refs``) and records ``VmHWM - VmRSS`` over three steps: the memory a
step adds on top of what persists between steps (model, optimizer state): saved
activations, gradients and temporaries.

Compile time: first compiled step minus the median compiled step.

    python benchmarks/train_step.py                       # both workloads, ~12 min
    python benchmarks/train_step.py --workload linear --rounds 5 --no-memory   # quick look
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import time
import warnings
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
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ILoRA(nn.Module):
    """The paper's Listing 1."""

    def __init__(self, linear):
        super().__init__()
        self.linear = linear
        self.b = nn.Parameter(torch.zeros(linear.out_features))

    def forward(self, x):
        ilora = self.b * x.sum(-1, keepdim=True)
        return self.linear(x) + ilora


class OneLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(1024, 1024)

    def forward(self, x):
        return self.lin(x)


# ---------------------------------------------------------------------------------
# workloads: (base model, example kwargs for capture, step inputs, loss, adapted names)


class Workload:
    def __init__(self, name: str, batch: int = 4, seq: int = 128):
        self.name = name
        torch.manual_seed(0)
        if name == "llama":
            self.model, _, _ = zoo.llama(layers=4, hidden=512, intermediate=1376, vocab=VOCAB, heads=8, kv_heads=8)
            ids = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(0))
            self.inputs = {"input_ids": ids}
            self.example = {"input_ids": ids[:2, :16].clone()}
            self.targets = ids.roll(-1, dims=1)
            self.pattern = "all-linear"
            self.peft_targets = LLAMA_TARGETS
        else:
            self.model = OneLinear()
            self.inputs = {"x": torch.randn(2048, 1024, generator=torch.Generator().manual_seed(0))}
            self.example = {"x": self.inputs["x"][:4].clone()}
            self.targets = None
            self.pattern = "all"  # the single linear is the model's output: a head
            self.peft_targets = ["lin"]
        self.model.train()

    def adapted(self, model: nn.Module) -> list[str]:
        return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rpartition(".")[2] in self.peft_targets]

    def loss(self, out) -> torch.Tensor:
        out = out.logits if hasattr(out, "logits") else out
        if self.targets is None:
            return out.square().mean()
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), self.targets.reshape(-1))


# ---------------------------------------------------------------------------------
# variants


def _freeze(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def floor(w: Workload) -> nn.Module:
    model = _freeze(copy.deepcopy(w.model))
    for path in w.adapted(model):
        lin = model.get_submodule(path)
        if lin.bias is None:
            lin.bias = nn.Parameter(torch.zeros(lin.out_features))
        else:
            lin.bias.requires_grad_(True)
    return model


def floor_captured(w: Workload) -> nn.Module:
    from onelora_fx.capture import capture

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = capture(floor(w), (), w.example).gm
    for name, p in gm.named_parameters():
        p.requires_grad_(name.endswith(".bias") and name.rpartition(".")[0] in w.adapted(w.model))
    return gm


def onelora(w: Workload) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ol.transform(copy.deepcopy(w.model), w.pattern, example_kwargs=w.example)


def listing1(w: Workload) -> nn.Module:
    model = _freeze(copy.deepcopy(w.model))
    for path in w.adapted(model):
        parent, _, leaf = path.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, leaf, ILoRA(getattr(owner, leaf)))
    return model


def full(w: Workload) -> nn.Module:
    model = copy.deepcopy(w.model)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def peft_variant(kind: str, **kw) -> Callable[[Workload], nn.Module]:
    def build(w: Workload) -> nn.Module:
        import peft

        cfg = {
            "lora": lambda: peft.LoraConfig(r=1, lora_alpha=1, target_modules=w.peft_targets, **kw),
            "dora": lambda: peft.LoraConfig(r=1, lora_alpha=1, target_modules=w.peft_targets, use_dora=True),
            "vera": lambda: peft.VeraConfig(r=1, target_modules=w.peft_targets),
            "miss": lambda: peft.MissConfig(r=1, target_modules=w.peft_targets),
        }[kind]()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return peft.get_peft_model(copy.deepcopy(w.model), cfg)

    return build


def compiled(build: Callable[[Workload], nn.Module], backend: str) -> Callable[[Workload], nn.Module]:
    def make(w: Workload) -> nn.Module:
        return torch.compile(build(w), backend=backend)

    make.compiled = True  # type: ignore[attr-defined]
    return make


FLOOR = "BitFit floor (captured graph)"
COMPILED_FLOOR = "BitFit floor, torch.compile inductor"
VARIANTS: dict[str, Callable[[Workload], nn.Module]] = {
    FLOOR: floor_captured,
    "BitFit floor (eager model)": floor,
    "onelora_fx (eager)": onelora,
    COMPILED_FLOOR: compiled(floor_captured, "inductor"),
    "onelora_fx, torch.compile onelora": compiled(onelora, "onelora"),
    "onelora_fx, torch.compile inductor": compiled(onelora, "inductor"),
    "Listing 1 wrapper (eager)": listing1,
    "PEFT MiSS r=1 (same update as 1LoRA)": peft_variant("miss"),
    "PEFT LoRA r=1": peft_variant("lora", lora_dropout=0.0),
    "PEFT LoRA r=1, dropout 0.05": peft_variant("lora", lora_dropout=0.05),
    "PEFT VeRA r=1": peft_variant("vera"),
    "PEFT DoRA r=1": peft_variant("dora"),
    "full fine-tuning": full,
}


def make_step(model: nn.Module, w: Workload) -> Callable[[], float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()

    def step() -> float:
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        w.loss(model(**w.inputs)).backward()
        opt.step()
        return time.perf_counter() - start

    return step


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure_memory(workload: str, variant: str) -> dict:
    """In this process: build one variant, warm up, and measure a step's peak memory."""
    torch.set_num_threads(1)
    w = Workload(workload)
    model = VARIANTS[variant](w)
    step = make_step(model, w)
    step()  # compile, optimizer state, allocator warm-up
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed memory back: RSS = live memory
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
    for _ in range(3):
        step()
    return {"peak_step_bytes": _status("VmHWM") - before}


def memory_in_subprocess(workload: str, variant: str) -> float:
    cmd = [sys.executable, __file__, "--measure-memory", workload, variant]
    # big blocks straight from mmap, so that freeing them shows in the RSS at once
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"memory run of {variant!r} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])["peak_step_bytes"]


def run_workload(workload: str, rounds: int, warmup: int, memory: bool, variants: list[str]) -> dict:
    w = Workload(workload)
    steps, trainable, compile_s = {}, {}, {}
    for name in variants:
        print(f"[{workload}] building {name}", file=sys.stderr, flush=True)
        model = VARIANTS[name](w)
        trainable[name] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        steps[name] = make_step(model, w)
        first = steps[name]()
        warm = [steps[name]() for _ in range(warmup)]
        if getattr(VARIANTS[name], "compiled", False):
            compile_s[name] = first - statistics.median(warm)
    times: dict[str, list[float]] = {n: [] for n in steps}
    rng = random.Random(0)
    for r in range(rounds):
        order = list(steps)
        rng.shuffle(order)
        for name in order:
            times[name].append(steps[name]())
        print(f"\r[{workload}] round {r + 1}/{rounds}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    results = {}
    for name, ts in times.items():
        ratios = [t / f for t, f in zip(ts, times[FLOOR])]
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        results[name] = {
            "trainable_params": trainable[name],
            "step_ms": 1e3 * statistics.median(ts),
            "ratio_to_floor": statistics.median(ratios),
            "ratio_to_floor_iqr": [q[0], q[2]],
            "ratio_to_eager_floor": statistics.median(t / f for t, f in zip(ts, times["BitFit floor (eager model)"])),
            "compile_s": compile_s.get(name),
        }
        if COMPILED_FLOOR in times:
            results[name]["ratio_to_compiled_floor"] = statistics.median(t / f for t, f in zip(ts, times[COMPILED_FLOOR]))
    if memory:
        for name in variants:
            print(f"[{workload}] memory of {name}", file=sys.stderr, flush=True)
            results[name]["peak_step_mb"] = memory_in_subprocess(workload, name) / 2**20
        floor_mb = results[FLOOR]["peak_step_mb"]
        for name in variants:
            results[name]["memory_to_floor"] = results[name]["peak_step_mb"] / floor_mb
    return results


def table(results: dict) -> str:
    def fmt(v, f):
        return "" if v is None else format(v, f)

    rows = [
        (
            name,
            f"{r['trainable_params']:,}",
            f"{r['step_ms']:.1f}",
            f"{r['ratio_to_floor']:.3f}",
            f"{r['ratio_to_floor_iqr'][0]:.2f}-{r['ratio_to_floor_iqr'][1]:.2f}",
            fmt(r.get("ratio_to_compiled_floor"), ".3f"),
            fmt(r.get("peak_step_mb"), ".1f"),
            fmt(r.get("memory_to_floor"), ".2f"),
            fmt(r.get("compile_s"), ".1f"),
        )
        for name, r in results.items()
    ]
    return tabulate(
        rows,
        headers=("variant", "trainable", "step ms", "/ floor", "IQR", "/ compiled floor", "step MB", "MB / floor", "compile s"),
    )


def bubble_plot(all_results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(all_results), figsize=(8 * len(all_results), 6), squeeze=False)
    colors = plt.get_cmap("tab20").colors
    for ax, (workload, results) in zip(axes[0], all_results.items()):
        biggest = max(r["trainable_params"] for r in results.values())
        for i, (name, r) in enumerate(results.items()):
            if r.get("peak_step_mb") is None:
                continue
            size = 40 + 2000 * (r["trainable_params"] / biggest) ** 0.5
            ax.scatter(r["ratio_to_floor"], r["peak_step_mb"], s=size, alpha=0.55, color=colors[i % 20],
                       label=f"{name} ({r['trainable_params']:,})")
        ax.set_xlabel("step time / BitFit floor (lower is better)")
        ax.set_ylabel("peak memory added by a training step, MB (lower is better)")
        ax.set_title(f"{workload}: bubble area ~ sqrt(trainable parameters)")
        legend = ax.legend(fontsize=7, loc="upper left", markerscale=0.3)
        for handle in legend.legend_handles:
            handle.set_sizes([30])
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=("llama", "linear", "both"), default="both")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", nargs="*", default=None, help="a subset of the variants (default: all)")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-process memory runs")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="JSON and PNG go here")
    parser.add_argument("--measure-memory", nargs=2, metavar=("WORKLOAD", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure_memory:
        print(json.dumps(measure_memory(*args.measure_memory)))
        return {}
    torch.set_num_threads(args.threads)
    variants = args.variants or list(VARIANTS)
    for required in (FLOOR, "BitFit floor (eager model)"):
        if required not in variants:
            variants.insert(0, required)
    workloads = ["llama", "linear"] if args.workload == "both" else [args.workload]
    all_results = {}
    started = time.perf_counter()
    for workload in workloads:
        all_results[workload] = run_workload(workload, args.rounds, args.warmup, not args.no_memory, variants)
    header = (
        f"torch {torch.__version__}, {args.threads} thread(s), {args.rounds} interleaved rounds, AdamW; "
        f"'/ floor' = median per-round ratio to the BitFit floor through the same capture"
    )
    print(header)
    for workload, results in all_results.items():
        print()
        print({"llama": "LLaMA hidden 512, intermediate 1376, 4 layers, batch 4 x seq 128 (28 adapted linears)",
               "linear": "one 1024 x 1024 linear on [2048, 1024]"}[workload])
        print(table(results))
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_step.json").write_text(json.dumps({"header": header, "results": all_results}, indent=2))
    if not args.no_memory:
        try:
            bubble_plot(all_results, args.out / "train_step.png")
        except ImportError:
            print("matplotlib is not installed: no plot", file=sys.stderr)
    return all_results


if __name__ == "__main__":
    main()
