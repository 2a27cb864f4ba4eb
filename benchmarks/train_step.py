"""Training-step cost of 1LoRA against the BitFit floor, the paper's Listing 1 and PEFT.

Two workloads, AdamW, every variant adapting the same layers (``train_step_variants.py``
builds them):

* ``llama``: a LLaMA with every linear but the head adapted (7 per layer);
* ``linear``: one square linear on a fixed input, loss = mean square.

Two devices (``--device``); ``--size`` picks the shapes (default: by device):

* ``cpu`` (default): one CPU thread, float32. Size ``cpu``: LLaMA hidden 512,
  intermediate 1376, 4 layers, vocab 1024, batch 4 x seq 128 (28 adapted linears);
  one 1024 x 1024 linear on [2048, 1024].
* ``cuda``: one GPU, forward and loss under ``torch.autocast("cuda", torch.bfloat16)``,
  float32 weights, gradients and AdamW state (mixed-precision training as usual).
  Size ``gpu``: LLaMA hidden 2048, intermediate 5632, 8 layers, vocab 32000, batch 8 x
  seq 512 (56 adapted linears); one 4096 x 4096 linear on [16384, 4096]. Size
  ``gpu-small``: the same with hidden 1024, intermediate 2816 and a [8192, 4096] input.
  The timing process holds every variant at once: by estimate about 40 GB of GPU memory
  for ``gpu``, 15 GB for ``gpu-small``. Without a CUDA device the script exits with
  status 2 ("no CUDA device: ...").

The floor is BitFit's cost on the adapted layers: a zero-init trainable bias on each
adapted linear, everything else frozen (the same autograd shape as 1LoRA: one vector
per layer). It is measured through the same graph capture as onelora_fx ("captured
graph", the reference for what the 1LoRA pass costs) and as the eager model.

Step time: variants run interleaved, one step each per round in a shuffled order; each
round gives a ratio to the floor's step in that round and the table reports the median
of those ratios (and their interquartile range), which cancels most of the drift of a
shared, noisy machine. On CUDA each step is timed between two ``torch.cuda.synchronize()``.

Peak memory: each variant runs again in its own process, is built, takes one warm-up
step, then three measured steps.

* CPU: glibc is told to serve big blocks from mmap (freed memory leaves the RSS at once);
  after the warm-up and ``malloc_trim`` the process resets its peak resident set size
  (``/proc/self/clear_refs``) and records ``VmHWM - VmRSS`` over the three steps: the
  memory a step adds on top of what persists between steps (model, optimizer state):
  saved activations, gradients and temporaries ("step MB").
* CUDA: the benchmark's base copy of the model is freed, ``torch.cuda.reset_peak_memory_stats()``
  runs after the warm-up, and the table reports ``torch.cuda.max_memory_allocated()``
  over the three steps: the whole training footprint, weights and optimizer state
  included ("peak MB"). The JSON also has ``peak_step_mb``, the peak minus what was
  allocated before the steps (the CPU measure's counterpart).

Compile time: first compiled step minus the median compiled step.

Results: ``train_step.json`` and ``train_step.png`` (CPU), ``train_step_cuda.json`` and
``train_step_cuda.png`` (CUDA) in ``--out`` (default ``benchmarks/out/``, not tracked by
git); ``--update-results`` also writes them into ``benchmarks/results/``, the committed
copies the README quotes (not with ``--quick``). The JSON records the device, dtype,
torch version, the mode and, on CUDA, the GPU. Progress (one line per variant built,
per round and per memory run, with the elapsed seconds) goes to stderr, the tables to
stdout.

``--quick`` checks that every variant and the memory runs work, in about 2 minutes on
2 busy cores; its ratios are not the benchmark's numbers. It runs size ``quick``
(LLaMA hidden 128, intermediate 344, 2 layers, vocab 256, batch 2 x seq 64; one
256 x 256 linear on [512, 256]), 3 rounds, one warm-up step; the ``torch.compile``
variants on the single linear only (compiling the LLaMA takes minutes with a cold
Inductor cache); the memory processes (about 20 s each, mostly imports) for the
captured floor and onelora_fx (eager) only. ``--variants``, ``--rounds``, ``--warmup``
and ``--size`` still apply.

    python benchmarks/train_step.py --quick               # CPU, both workloads, ~2 min
    python benchmarks/train_step.py                       # CPU, both workloads, ~12 min
    python benchmarks/train_step.py --update-results      # the same, and refresh benchmarks/results/
    python benchmarks/train_step.py --workload linear --rounds 5 --no-memory   # a look at one workload
    python benchmarks/train_step.py --device cuda         # GPU, bf16 autocast, size gpu
    python benchmarks/train_step.py --device cuda --size gpu-small --rounds 5  # smaller GPU
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from tabulate import tabulate
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step_variants import COMPILED_FLOOR, EAGER_FLOOR, FLOOR, SIZES, VARIANTS, Workload  # noqa: E402
from publish import publish  # noqa: E402  (beside this script)

BENCHMARKS = Path(__file__).resolve().parent
DEFAULT_OUT = BENCHMARKS / "out"  # ignored by git
STARTED = time.perf_counter()
QUICK_MEMORY = (FLOOR, "onelora_fx (eager)")  # --quick's memory processes


def log(line: str) -> None:
    """A progress line on stderr with the seconds since the start."""
    print(f"{time.perf_counter() - STARTED:7.1f}s  {line}", file=sys.stderr, flush=True)


# per device: the memory figure the table, the ratio and the plot use, its column, its axis
MEMORY = {
    "cpu": ("peak_step_mb", "step MB", "peak memory added by a training step, MB (lower is better)"),
    "cuda": ("peak_mb", "peak MB", "torch.cuda.max_memory_allocated over a step, MB (lower is better)"),
}


def make_step(model: nn.Module, w: Workload) -> Callable[[], float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()

    def step() -> float:
        w.sync()
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with w.autocast():
            loss = w.loss(model(**w.inputs))
        loss.backward()
        opt.step()
        w.sync()
        return time.perf_counter() - start

    return step


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure_memory(workload: str, variant: str, size: str, device: str) -> dict:
    """In this process: build one variant, warm up, and measure a step's peak memory."""
    torch.set_num_threads(1)
    w = Workload(workload, size, device)
    model = VARIANTS[variant](w)
    step = make_step(model, w)
    if w.device.type == "cuda":
        w.model = None  # the base copy every variant is built from: no part of training
        step()  # compile, optimizer state, allocator warm-up
        gc.collect()
        before = torch.cuda.memory_allocated(w.device)
        torch.cuda.reset_peak_memory_stats(w.device)
        for _ in range(3):
            step()
        peak = torch.cuda.max_memory_allocated(w.device)
        return {"peak_bytes": peak, "peak_step_bytes": peak - before}
    step()  # compile, optimizer state, allocator warm-up
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed memory back: RSS = live memory
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
    for _ in range(3):
        step()
    return {"peak_step_bytes": _status("VmHWM") - before}


def memory_in_subprocess(workload: str, variant: str, size: str, device: str) -> dict:
    cmd = [sys.executable, __file__, "--device", device, "--size", size, "--measure-memory", workload, variant]
    # big blocks straight from mmap, so that freeing them shows in the RSS at once
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"memory run of {variant!r} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_workload(w: Workload, size: str, rounds: int, warmup: int, memory: list[str], variants: list[str]) -> dict:
    """Times ``variants`` in interleaved rounds; measures the memory of those in ``memory``."""
    workload, device = w.name, w.device.type
    steps, trainable, compile_s = {}, {}, {}
    for i, name in enumerate(variants, 1):
        compiled = getattr(VARIANTS[name], "compiled", False)
        log(f"[{workload}] variant {i}/{len(variants)}: {name}: building, first step"
            + (" (compiles)" if compiled else "") + f", {warmup} warm-up step(s)")
        t0 = time.perf_counter()
        model = VARIANTS[name](w)
        trainable[name] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        steps[name] = make_step(model, w)
        first = steps[name]()
        warm = [steps[name]() for _ in range(warmup)]
        if compiled:
            compile_s[name] = first - statistics.median(warm)
        log(f"[{workload}] variant {i}/{len(variants)}: {name}: ready in {time.perf_counter() - t0:.1f} s")
    times: dict[str, list[float]] = {n: [] for n in steps}
    rng = random.Random(0)
    log(f"[{workload}] {rounds} interleaved rounds of {len(steps)} steps")
    for r in range(rounds):
        order = list(steps)
        rng.shuffle(order)
        for name in order:
            times[name].append(steps[name]())
        log(f"[{workload}] round {r + 1}/{rounds}")
    del model
    steps.clear()  # free the models before the memory runs (one GPU for all processes)
    gc.collect()
    if device == "cuda":
        torch._dynamo.reset()  # compiled code can hold on to its model
        torch.cuda.empty_cache()
    results = {}
    for name, ts in times.items():
        ratios = [t / f for t, f in zip(ts, times[FLOOR])]
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        results[name] = {
            "trainable_params": trainable[name],
            "step_ms": 1e3 * statistics.median(ts),
            "ratio_to_floor": statistics.median(ratios),
            "ratio_to_floor_iqr": [q[0], q[2]],
            "ratio_to_eager_floor": statistics.median(t / f for t, f in zip(ts, times[EAGER_FLOOR])),
            "compile_s": compile_s.get(name),
        }
        if COMPILED_FLOOR in times:
            results[name]["ratio_to_compiled_floor"] = statistics.median(t / f for t, f in zip(ts, times[COMPILED_FLOOR]))
    if memory:
        key = MEMORY[device][0]
        for i, name in enumerate(memory, 1):
            t0 = time.perf_counter()
            measured = memory_in_subprocess(workload, name, size, device)
            results[name].update({k.replace("_bytes", "_mb"): v / 2**20 for k, v in measured.items()})
            log(f"[{workload}] memory {i}/{len(memory)}: {name}: {results[name][key]:.1f} MB "
                f"(own process, {time.perf_counter() - t0:.1f} s)")
        for name in memory:
            results[name]["memory_to_floor"] = results[name][key] / results[FLOOR][key]
    return results


def table(results: dict, device: str) -> str:
    def fmt(v, f):
        return "" if v is None else format(v, f)

    key, column, _ = MEMORY[device]
    rows = [
        (
            name,
            f"{r['trainable_params']:,}",
            f"{r['step_ms']:.1f}",
            f"{r['ratio_to_floor']:.3f}",
            f"{r['ratio_to_floor_iqr'][0]:.2f}-{r['ratio_to_floor_iqr'][1]:.2f}",
            fmt(r.get("ratio_to_compiled_floor"), ".3f"),
            fmt(r.get(key), ".1f"),
            fmt(r.get("memory_to_floor"), ".2f"),
            fmt(r.get("compile_s"), ".1f"),
        )
        for name, r in results.items()
    ]
    return tabulate(
        rows,
        headers=("variant", "trainable", "step ms", "/ floor", "IQR", "/ compiled floor", column, "MB / floor", "compile s"),
    )


def bubble_plot(all_results: dict, path: Path, device: str, where: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, _, ylabel = MEMORY[device]
    fig, axes = plt.subplots(1, len(all_results), figsize=(8 * len(all_results), 6), squeeze=False)
    colors = plt.get_cmap("tab20").colors
    for ax, (workload, results) in zip(axes[0], all_results.items()):
        biggest = max(r["trainable_params"] for r in results.values())
        for i, (name, r) in enumerate(results.items()):
            if r.get(key) is None:
                continue
            size = 40 + 2000 * (r["trainable_params"] / biggest) ** 0.5
            ax.scatter(r["ratio_to_floor"], r[key], s=size, alpha=0.55, color=colors[i % 20],
                       label=f"{name} ({r['trainable_params']:,})")
        ax.set_xlabel("step time / BitFit floor (lower is better)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{workload} on {where}: bubble area ~ sqrt(trainable parameters)", fontsize=10)
        legend = ax.legend(fontsize=7, loc="upper left", markerscale=0.3)
        for handle in legend.legend_handles:
            handle.set_sizes([30])
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true",
                        help="check that everything runs (~2 min; see above)")
    parser.add_argument("--size", choices=tuple(SIZES), default=None,
                        help="shapes (default: quick with --quick, else cpu, or gpu on cuda)")
    parser.add_argument("--workload", choices=("llama", "linear", "both"), default="both")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 20, 3 with --quick)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 2, 1 with --quick)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", nargs="*", default=None, help="a subset of the variants (default: all)")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-process memory runs")
    parser.add_argument("--memory-variants", nargs="*", default=None,
                        help="measure the memory of these variants only (default: every timed one; the floor "
                             "is always measured, since the table divides by it)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="folder for the JSON and PNG (default: benchmarks/out/, not tracked by git)")
    parser.add_argument("--update-results", action="store_true",
                        help="also write them into benchmarks/results/ (the committed copies; not with --quick)")
    parser.add_argument("--measure-memory", nargs=2, metavar=("WORKLOAD", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.update_results and args.quick:
        parser.error("--update-results records a full run into benchmarks/results/: not with --quick")
    unknown = set(args.variants or ()).union(args.memory_variants or ()) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variant(s) {sorted(unknown)}; the variants are: {list(VARIANTS)}")
    if args.warmup is not None and args.warmup < 1:
        parser.error("--warmup must be >= 1: a compiled variant's compile time is its first step minus the warm steps'")
    rounds = args.rounds if args.rounds is not None else 3 if args.quick else 20
    warmup = args.warmup if args.warmup is not None else 1 if args.quick else 2
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print(f"no CUDA device: torch {torch.__version__} (CUDA build: {torch.version.cuda}) sees no GPU; "
              "run with --device cpu", file=sys.stderr)
        sys.exit(2)
    size = args.size or ("quick" if args.quick else "gpu" if cuda else "cpu")
    if args.measure_memory:
        print(json.dumps(measure_memory(*args.measure_memory, size, args.device)))
        return {}
    torch.set_num_threads(args.threads)
    variants = args.variants or list(VARIANTS)
    for required in (FLOOR, EAGER_FLOOR):
        if required not in variants:
            variants.insert(0, required)
    workloads = ["llama", "linear"] if args.workload == "both" else [args.workload]
    gpu = torch.cuda.get_device_name() if cuda else None
    where = f"{gpu}, bf16 autocast" if cuda else f"CPU, {args.threads} thread(s)"
    all_results, shapes = {}, {}
    started = time.perf_counter()
    log(f"size {size}, workloads {', '.join(workloads)}, {len(variants)} variants, {rounds} rounds"
        + ("" if args.no_memory else ", then one memory process per variant measured"))
    for name in workloads:
        timed, memory = variants, variants
        if args.quick:  # see the module docstring
            if name == "llama" and args.variants is None:
                timed = [v for v in variants if not getattr(VARIANTS[v], "compiled", False)]
            memory = [v for v in timed if v in QUICK_MEMORY]
        if args.memory_variants is not None:
            memory = [v for v in timed if v == FLOOR or v in args.memory_variants]
        w = Workload(name, size, args.device)
        shapes[name] = w.describe()
        log(f"[{name}] {shapes[name]}")
        all_results[name] = run_workload(w, size, rounds, warmup, [] if args.no_memory else memory, timed)
        del w
    header = (
        f"torch {torch.__version__}, {where}, {rounds} interleaved rounds, AdamW; "
        f"'/ floor' = median per-round ratio to the BitFit floor through the same capture"
    )
    print(header)
    for name, results in all_results.items():
        print(f"\n{shapes[name]} on {where}")
        print(table(results, args.device))
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    report = {
        "header": header, "device": args.device, "gpu": gpu, "cuda": torch.version.cuda if cuda else None,
        "dtype": "float32 weights, bfloat16 autocast" if cuda else "float32",
        "autocast": "bfloat16" if cuda else None, "torch": torch.__version__, "threads": args.threads,
        "size": size, "rounds": rounds, "mode": "quick" if args.quick else "default",
        "shapes": shapes, "results": all_results,
    }
    stem = "train_step_cuda" if cuda else "train_step"
    args.out.mkdir(parents=True, exist_ok=True)
    written = [args.out / f"{stem}.json"]
    written[0].write_text(json.dumps(report, indent=2))
    if not args.no_memory:
        try:
            bubble_plot(all_results, args.out / f"{stem}.png", args.device, where)
            written.append(args.out / f"{stem}.png")
        except ImportError:
            print("matplotlib is not installed: no plot", file=sys.stderr)
    if args.update_results:
        written += publish(written)
    log("wrote " + ", ".join(str(p) for p in written))
    return all_results


if __name__ == "__main__":
    main()
