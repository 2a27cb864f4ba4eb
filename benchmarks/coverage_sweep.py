"""Coverage sweep: every transformers architecture of four auto mappings through ``transform("all")``.

For every ``(task, model_type)`` of the installed transformers' causal-LM, seq2seq-LM,
masked-LM and image-classification auto mappings (327 rows with transformers 5.24), each in its own subprocess
(``OMP_NUM_THREADS=1``, time limit ``--timeout``, default 180 s):

1. base: the mapping's class on a tiny config (``sweep_configs.py``: 2 layers, hidden 64,
   4 experts top-2, vocab 256, ...), float32, eval, ``torch.manual_seed(0)``; every norm layer's
   parameters scaled by ``1 + 0.5 randn`` (plus ``0.1 randn``) so that a linear after a LayerNorm
   sees a non-zero ``x.sum(-1)``; inputs ``input_ids [2, 8]`` (+ ``attention_mask``,
   ``decoder_input_ids [2, 6]`` for seq2seq) or ``pixel_values [2, C, S, S]``; one forward;
2. ``ol.transform(model, "all", example_kwargs=inputs)`` (default capture), warnings recorded;
3. accounting: every ``nn.Linear`` / ``Conv1D`` the base forward calls (forward pre-hooks) holds
   the weight of an adapted site (tensor identity) or is named in a warning (any of its
   parameter names or its module path). A called linear whose weight gets no gradient from the
   outputs (a pooler nobody reads) is dead code: listed as ``dead_linears``, not a skip. Other
   2-D+ parameters no site covers are counted (``uncovered_params``, how many warnings name);
4. numerics: every ``b`` set to ``0.02 randn``; ``gm`` against the reference below on the first
   output tensor, ``allclose(rtol=1e-4, atol=1e-4 * max(1, |ref|.max()))``;
5. one backward of the sum of squares of the outputs plus a fixed random projection of them: every ``b`` that takes part (has a
   gradient in the reference) gets a finite gradient equal to the reference's
   (``allclose(rtol=1e-3, atol=1e-3 * the largest reference b gradient)``);
6. ``ol.merge(gm)`` gives ``gm``'s output (same tolerance).

Reference (written here, not in the library): a deep copy of the base model in which every
adapted weight held by a plain ``nn.Linear`` / ``Conv1D`` that the forward calls on its whole
weight (no row slice, no experts) gets a forward hook adding ``b * input.sum(-1, keepdim=True)``
to that layer's output, and every other adapted weight (raw parameters read by ``F.linear``,
expert weights, weights read in row slices, ``nn.Linear`` subclasses with their own forward)
has ``W + b 1ᵀ`` folded in by this script in float64: ``W[..., i, :] += b[..., i]`` for
``out_in``, ``W[..., :, j] += b[..., j]`` for ``in_out``. An ``nn.Embedding`` sharing a folded
weight keeps looking up the unfolded one. Its ``b`` gradients: the hooks' ``b`` (leaf tensors), and
for a folded weight its gradient summed over the input dimension.

Outcomes (one per row):
  exact          every check passed;
  clean error    an exception of a type defined in onelora_fx, or a ValueError / TypeError /
                 RuntimeError raised by a ``raise`` in onelora_fx code whose message says what to do (one of
                 the words use, pass, set, call, try, exclude, instead, install, upgrade, see);
                 ``says_what_to_do`` records whether the message has such a word;
  silent skip    a live called linear neither adapted nor named in a warning (listed);
  wrong          output beyond tolerance, a ``b`` gradient missing, non-finite or off, merge differs;
  crash          any other exception (type, first line, last onelora_fx frame), a signal, or the
                 time limit once the base model has run;
  config-failed  the tiny config, the model, or its own forward or backward (eval mode) failed,
                 onelora_fx not involved.
Target: 0 silent skips, 0 wrong, 0 crashes; every clean error says the cause and the way out.

``--libraries`` runs the same steps on the tiny models of ``sweep_libraries.py`` instead: timm,
torchvision, open_clip, diffusers, torchtune, torch.nn, and hand-written reproductions of the
patterns a graph pass can miss (rows go to ``coverage_sweep_libraries.*``). A library that cannot
be imported gives ``unavailable`` rows that say why. For these models every linear layer whose
weight the forward reads in any way (also through a function that takes the weight) and that
gets a gradient must be adapted or named in a warning.

Run it after every change to sites, forms, capture or merge (too long for CI):
    python benchmarks/coverage_sweep.py --quick          # 13 architectures, ~5 min on 2 cores
    python benchmarks/coverage_sweep.py                  # all of them: hours (20-200 s each on 2 cores)
    python benchmarks/coverage_sweep.py --sample 60      # 60 drawn at random (seed 0): about an hour
    python benchmarks/coverage_sweep.py --only rwkv,swin --fresh
    python benchmarks/coverage_sweep.py --libraries --fresh      # 35 models of other libraries, ~10 min
Rows go to ``benchmarks/out/coverage_sweep.jsonl`` as they finish (a restart resumes; ``--fresh``
reruns the selection), then ``coverage_sweep.json`` (counts + rows) and the ``coverage_sweep.txt``
table; ``--update-results`` also writes ``benchmarks/results/coverage_sweep.json``.
"""

from __future__ import annotations

import argparse, copy, importlib.util, json, os, re, subprocess, sys, threading, time, traceback, warnings  # noqa: E401
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import sweep_configs as sc  # noqa: E402
import sweep_libraries as sl  # noqa: E402

OUTCOMES = ["exact", "clean error", "silent skip", "wrong", "crash", "config-failed", "unavailable"]
QUICK = [("causal-lm", "llama"), ("causal-lm", "gpt2"), ("masked-lm", "bert"), ("seq2seq-lm", "t5"),
         ("seq2seq-lm", "bart"), ("causal-lm", "mixtral"), ("causal-lm", "qwen3_moe"), ("causal-lm", "falcon"),
         ("image-classification", "vit"), ("causal-lm", "whisper"), ("causal-lm", "deepseek_v3"),
         ("causal-lm", "gpt_oss"), ("image-classification", "convnext")]
HINT = re.compile(r"\b(use|pass|set|call|try|exclude|instead|install|upgrade|see)\b", re.I)
MARK = "@@SWEEP@@ "


class Outcome(Exception):
    """Ends a row with ``(outcome, detail)``."""


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else "")[:300]


def classify(e: BaseException) -> tuple[str, str]:
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if "onelora_fx" in f.filename.replace("\\", "/").split("/")]
    where = f" [at {Path(ours[-1].filename).name}:{ours[-1].lineno} in {ours[-1].name}]" if ours else ""
    msg = first_line(e)
    if type(e).__module__.split(".")[0] == "onelora_fx":
        return "clean error", f"{type(e).__name__}: {msg}"
    # raised by a `raise` statement of onelora_fx (not a torch kernel failing inside our code,
    # whose last Python frame is ours too: NeoMME's "Bad in-place call" once counted as clean)
    raised_here = bool(frames) and frames[-1] in ours and (frames[-1].line or "").lstrip().startswith("raise")
    if isinstance(e, (ValueError, TypeError, RuntimeError)) and raised_here and HINT.search(str(e)):
        return "clean error", f"{type(e).__name__}: {msg}"
    return "crash", f"{type(e).__name__}: {msg}{where}"


def tensors(out) -> list:
    """The tensors of a model output (``ModelOutput``, tuple, tensor), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    values = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else []
    return [t for v in values for t in tensors(v)]


def first_tensor(out):
    return next(iter(tensors(out)), None)


def square_sum(out):
    """The loss of the backward checks: the sum of squares of the outputs plus a fixed
    random projection of them (a sum of squares alone is constant for normalized outputs,
    CLIP's features: its gradients would be rounding noise)."""
    total = 0
    for i, t in enumerate(tensors(out)):
        if t.is_floating_point() and t.requires_grad:
            w = torch.randn(t.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float32)
            total = total + t.float().pow(2).sum() + (t.float() * w).sum()
    return total


def close(a, b) -> tuple[bool, str]:
    if a is None or b is None or a.shape != b.shape:
        return False, f"shape {None if a is None else tuple(a.shape)} vs {None if b is None else tuple(b.shape)}"
    atol = 1e-4 * max(1.0, b.abs().max().item())
    err = (a - b).abs().max().item()
    return torch.allclose(a, b, rtol=1e-4, atol=atol), f"max |diff| {err:.3g} (atol {atol:.3g})"


def randomize_norms(model, gen) -> None:
    with torch.no_grad():
        for m in model.modules():
            if "norm" in type(m).__name__.lower():
                for p in m.parameters(recurse=False):
                    if p.is_floating_point():
                        p.mul_(1 + 0.5 * torch.randn(p.shape, generator=gen)).add_(0.1 * torch.randn(p.shape, generator=gen))


def is_linear(m, plain: bool = False) -> bool:
    """An ``nn.Linear`` or GPT-2 ``Conv1D``; ``plain``: one whose forward is the linear itself."""
    if type(m).__name__ == "Conv1D":
        return True
    return type(m).forward is torch.nn.Linear.forward if plain else isinstance(m, torch.nn.Linear)


def named_in(name: str, text: str) -> bool:
    return re.search(r"(?<![\w.])" + re.escape(name) + r"(?!\w)", text) is not None


def reference(model, gm, adapted, called: set[str]):
    """The independent reference (see the module docstring): a deep copy with hooks and folds."""
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.requires_grad_(True)
    modules = dict(ref.named_modules(remove_duplicate=False))
    by_weight: dict[str, list] = {}
    for s in adapted:
        by_weight.setdefault(s.adapter_name, []).append(s)
    grads, folded = {}, {}  # name -> the reference's dL/db, read after a backward
    for name, calls in by_weight.items():
        s = calls[0]
        W = ref.get_parameter(s.weight_name)
        b = gm.get_parameter(name).detach().clone().requires_grad_(True)
        holders = [m for path, m in modules.items() if path in called and is_linear(m, plain=True) and m.weight is W]
        whole = all(getattr(c, "rows", None) is None and c.experts is None for c in calls)
        if holders and whole:
            for m in dict.fromkeys(holders):
                m.register_forward_hook(lambda mod, inp, out, b=b: out + b * inp[0].sum(-1, keepdim=True))
            grads[name] = lambda b=b: b.grad
            continue
        in_out = str(getattr(s.layout, "value", s.layout)) == "in_out"
        # d/db of W + b 1ᵀ: the weight's gradient summed over the input dimension
        grads[name] = lambda W=W, d=-2 if in_out else -1: None if W.grad is None else W.grad.sum(d)
        if W.shape[-1 if in_out else -2] != b.shape[-1] or (W.dim() == 3) != (b.dim() == 2):
            raise Outcome("wrong", f"b {tuple(b.shape)} does not fit {s.weight_name} {tuple(W.shape)} ({s.layout})")
        with torch.no_grad():
            folded[id(W)] = W.detach().clone()
            delta = b.double().unsqueeze(-2) if in_out else b.double().unsqueeze(-1)
            W.copy_((W.double() + delta).to(W.dtype))
    for m in modules.values():  # an embedding tied to a folded weight looks up the original
        if isinstance(m, torch.nn.Embedding) and id(m.weight) in folded:
            orig = folded[id(m.weight)]
            m.register_forward_hook(lambda mod, inp, out, w=orig: F.embedding(
                inp[0], w, mod.padding_idx, mod.max_norm, mod.norm_type, mod.scale_grad_by_freq, mod.sparse))
    return ref, grads


def live_names(model, inputs) -> set[str]:
    """Names of the parameters that get a gradient from the outputs (a copy, all trainable):
    a linear whose weight gets none is dead code for this call (a pooler nobody reads)."""
    probe = copy.deepcopy(model)
    for p in probe.parameters():
        p.requires_grad_(True)
    try:
        square_sum(probe(**inputs)).backward()
    except Exception as e:  # the base model cannot run the backward this benchmark needs
        raise RuntimeError(f"its own backward fails: {type(e).__name__}: {first_line(e)}") from None
    return {n for n, p in probe.named_parameters(remove_duplicate=False) if p.grad is not None}


def build(task: str, model_type: str, class_name: str) -> tuple[torch.nn.Module, dict]:
    """The tiny model and its inputs: a transformers architecture, or a library's model
    (``sweep_libraries.py``; ``task`` is the library)."""
    if task in sl.LIBRARIES:
        return sl.build(task, model_type)
    model, cfg = sc.build_model(task, model_type, class_name)
    return model, sc.make_inputs(task, model, cfg)


def watched_weights(model, called: set[str], live: set[str]) -> dict[str, torch.Tensor]:
    """``{name: weight}`` that must be adapted or named in a warning: every linear layer the
    forward calls, and every linear layer's weight (or ``*proj_weight`` parameter) that the
    forward reads some other way (a function that takes the weight: torchvision's fx-wrapped
    window attention, ``F.linear(x, qkv.weight, bias)``, ``nn.MultiheadAttention``) and that
    gets a gradient."""
    out = {}
    for path, m in model.named_modules():
        if is_linear(m) and (path in called or any(n in live for n in (f"{path}.weight",))):
            out[path] = m.weight
    for name, p in model.named_parameters():
        if name.endswith("proj_weight") and p.dim() == 2 and name in live:
            out[name] = p
    return out


def run_one(task: str, model_type: str, class_name: str) -> dict:
    row: dict = {"task": task, "model_type": model_type, "class": class_name}
    stage = lambda s: print(MARK + "stage " + s, file=sys.stderr, flush=True)  # noqa: E731
    stage("base")
    if task in sl.LIBRARIES and sl.unavailable(task):
        return {**row, "outcome": "unavailable", "detail": f"cannot import {task}: {sl.unavailable(task)}"}
    try:
        model, inputs = build(task, model_type, class_name)
        randomize_norms(model, torch.Generator().manual_seed(0))
        called: list[str] = []
        hooks = [m.register_forward_pre_hook(lambda mod, inp, n=n: called.append(n))
                 for n, m in model.named_modules() if is_linear(m)]
        with torch.no_grad():
            base = first_tensor(model(**inputs))
        for h in hooks:
            h.remove()
        if base is None or not torch.isfinite(base).all():
            raise ValueError("the base output is not a finite tensor")
        live = live_names(model, inputs)
    except Exception as e:
        return {**row, "outcome": "config-failed", "detail": f"{type(e).__name__}: {first_line(e)}"}
    if importlib.util.find_spec("onelora_fx") is None:
        sys.path.insert(0, str(HERE.parent))  # a checkout without an install
    import onelora_fx as ol

    called_set = set(called)
    row["linear_called"] = len(called_set)
    try:
        stage("transform")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gm = ol.transform(model, "all", example_kwargs=inputs)
            gm.eval()
            adapted = [s for s in ol.sites(gm) if s.adapted]
        text = "\n".join(str(w.message) for w in caught)
        row["warnings"] = [first_line(w.message)[:300] for w in caught if issubclass(w.category, UserWarning)]
        row["form"] = "graph" if isinstance(gm, torch.fx.GraphModule) else "module"
        ids = {id(model.get_parameter(s.weight_name)) for s in adapted}
        row["sites_adapted"] = len({s.adapter_name for s in adapted})
        names: dict[int, list[str]] = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(n)
        skipped, dead = [], []
        watched = watched_weights(model, called_set, live)
        row["linear_read"] = len(watched)
        for path, w in sorted(watched.items()):
            if id(w) not in ids and not any(named_in(n, text) for n in names.get(id(w), []) + [path]):
                alive = any(n in live for n in names.get(id(w), []))
                (skipped if alive else dead).append(path)
        row["dead_linears"] = dead
        others = [p for p in {id(p): p for p in model.parameters()}.values()
                  if p.is_floating_point() and p.dim() >= 2 and id(p) not in ids]
        row["uncovered_params"] = len(others)
        unnamed = [names[id(p)][0] for p in others if not any(named_in(n, text) for n in names[id(p)])]
        row["uncovered_named_in_warnings"] = len(others) - len(unnamed)
        row["uncovered_unnamed"] = unnamed[:8]
        if skipped:
            raise Outcome("silent skip", f"{len(skipped)} linear weight(s) read, neither adapted nor warned: " + ", ".join(skipped[:6]))
        stage("numerics")
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for _, b in sorted(ol.adapter_parameters(gm).items()):
                b.copy_(torch.randn(b.shape, generator=gen) * 0.02)
        try:
            ref, ref_grads = reference(model, gm, adapted, called_set)
            with torch.no_grad():
                want = first_tensor(ref(**inputs))
        except Outcome:
            raise
        except Exception as e:
            raise Outcome("crash", f"benchmark reference: {type(e).__name__}: {first_line(e)}")
        with torch.no_grad():
            got = first_tensor(gm(**inputs))
        row["b_effect"] = float(f"{(want - base).abs().max().item():.3g}") if want.shape == base.shape else None
        ok, how = close(got, want)
        if not ok:
            raise Outcome("wrong", f"adapted output vs reference: {how}")
        stage("backward")
        square_sum(gm(**inputs)).backward()
        square_sum(ref(**inputs)).backward()
        pairs = {name: (gm.get_parameter(name).grad, want_grad()) for name, want_grad in ref_grads.items()}
        scale = max([w.abs().max().item() for _, w in pairs.values() if w is not None and w.numel()] + [1e-12])
        bad, idle = [], 0
        for name, (g, w) in pairs.items():
            if w is None:
                idle += g is None
            elif g is None or not torch.isfinite(g).all():
                if torch.isfinite(w).all():
                    bad.append(f"{name} ({'no' if g is None else 'non-finite'} gradient)")
            elif not torch.allclose(g, w, rtol=1e-3, atol=1e-3 * scale):
                bad.append(f"{name} (gradient off by {(g - w).abs().max().item():.3g}, scale {scale:.3g})")
        row["b_without_part"] = idle
        if bad:
            raise Outcome("wrong", f"{len(bad)} b without the reference's gradient: " + ", ".join(bad[:4]))
        stage("merge")
        merged = ol.merge(gm)
        merged.eval()
        with torch.no_grad():
            ok, how = close(first_tensor(merged(**inputs)), got)
        if not ok:
            raise Outcome("wrong", f"merged output vs adapted: {how}")
        row.update(outcome="exact", detail=f"{row['sites_adapted']} weights adapted, {how}"
                   + (f"; {len(dead)} dead linear(s)" if dead else ""))
    except Outcome as o:
        row["outcome"], row["detail"] = o.args
    except Exception as e:
        row["outcome"], row["detail"] = classify(e)
        row["says_what_to_do"] = bool(HINT.search(str(e)))
    return row


def child(argv: list[str]) -> None:
    task, model_type, class_name = argv
    warnings.filterwarnings("ignore", category=FutureWarning)
    t0 = time.perf_counter()
    row = run_one(task, model_type, class_name)
    row["child_seconds"] = round(time.perf_counter() - t0, 1)
    print(MARK + json.dumps(row), flush=True)


def launch(arch: tuple[str, str, str], timeout: float) -> dict:
    task, model_type, class_name = arch
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    cmd = [sys.executable, __file__, "--one", task, model_type, class_name]
    t0 = time.perf_counter()
    row = {"task": task, "model_type": model_type, "class": class_name}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out, err, rc = (e.stdout or b""), (e.stderr or b""), None
        out, err = [x.decode(errors="replace") if isinstance(x, bytes) else x for x in (out, err)]
    lines = [ln[len(MARK):] for ln in out.splitlines() if ln.startswith(MARK)]
    stages = [ln[len(MARK) + 6:] for ln in err.splitlines() if ln.startswith(MARK + "stage ")]
    at = stages[-1] if stages else "start"
    if lines:
        row = json.loads(lines[-1])
    else:  # no result line: the time limit, a signal, an exit
        tail = ([ln for ln in err.strip().splitlines() if not ln.startswith(MARK)] or [""])[-1][:200]
        why = f"time limit {timeout:.0f} s" if rc is None else f"exit {rc}: {tail}"
        row.update(outcome="config-failed" if at in ("start", "base") else "crash", detail=f"{why} during {at}")
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def report(rows: list[dict], out: Path, stem: str = "coverage_sweep") -> str:
    from tabulate import tabulate

    table = tabulate(
        [[r["task"], r["model_type"], r["outcome"], r.get("seconds"),
          f"{r.get('sites_adapted', '-')}/{r.get('linear_read', r.get('linear_called', '-'))}", (r.get("detail") or "")[:80]]
         for r in rows],
        headers=["task", "model_type", "outcome", "s", "adapted/read", "detail"])
    counts = {o: sum(r["outcome"] == o for r in rows) for o in OUTCOMES}
    line = ", ".join(f"{o} {n}" for o, n in counts.items())  # the line for the README
    (out / f"{stem}.txt").write_text(table + "\n\n" + line + "\n")
    return table + "\n\n" + line


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--one", nargs=3, metavar=("TASK", "TYPE", "CLASS"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=HERE / "out")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per architecture")
    parser.add_argument("--only", default="", help="model types, comma-separated")
    parser.add_argument("--quick", action="store_true", help=f"{len(QUICK)} diverse architectures")
    parser.add_argument("--libraries", action="store_true",
                        help=f"the {len(sl.MODELS)} models of other libraries (sweep_libraries.py) instead of transformers")
    parser.add_argument("--sample", type=int, default=0, metavar="N",
                        help="N architectures drawn at random (seed 0: the same N every time), for a run that fits an hour")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--fresh", action="store_true", help="forget earlier rows of the selected architectures")
    parser.add_argument("--update-results", action="store_true", help="also write benchmarks/results/coverage_sweep.json")
    args = parser.parse_args(argv)
    if args.one:
        return child(args.one)
    archs = [(lib, name, "") for lib, name in sl.MODELS] if args.libraries else sc.architectures()
    if args.quick and not args.libraries:
        archs = [a for a in archs if a[:2] in QUICK]
    if args.only:
        wanted = set(args.only.split(","))
        archs = [a for a in archs if a[1] in wanted]
        if wanted - {a[1] for a in archs}:
            print(f"not in the mappings: {', '.join(sorted(wanted - {a[1] for a in archs}))}")
    if args.sample:
        import random

        picked = set(random.Random(0).sample(range(len(archs)), min(args.sample, len(archs))))
        archs = [a for i, a in enumerate(archs) if i in picked]
    selection = ("libraries" if args.libraries else "quick" if args.quick else "") + (f" only {args.only}" if args.only else "") + \
        (f" sample {args.sample} (seed 0)" if args.sample else "")
    selection = selection.strip() or "all"
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "coverage_sweep_libraries" if args.libraries else "coverage_sweep"
    log = args.out / f"{stem}.jsonl"
    rows = map(json.loads, log.read_text().splitlines()) if log.exists() else []
    done = {(r["task"], r["model_type"]): r for r in rows}
    if args.fresh:
        done = {k: r for k, r in done.items() if k not in {a[:2] for a in archs}}
        log.write_text("".join(json.dumps(r) + "\n" for r in done.values()))
    todo = [a for a in archs if a[:2] not in done]
    print(f"{len(archs)} architectures, {len(archs) - len(todo)} already in {log}", flush=True)

    lock = threading.Lock()

    def one(item):
        i, arch = item
        row = launch(arch, args.timeout)
        with lock:
            with open(log, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"[{i}/{len(todo)}] {arch[0]:<20} {arch[1]:<28} {row['outcome']:<13} {row['seconds']:6.1f}s  "
                  f"{(row.get('detail') or '')[:90]}", flush=True)
        return row

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        for row in pool.map(one, enumerate(todo, 1)):
            done[(row["task"], row["model_type"])] = row
    rows = [done[a[:2]] for a in archs if a[:2] in done]
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    if args.libraries:
        from importlib import metadata

        dists = {"timm": "timm", "torchvision": "torchvision", "open_clip": "open_clip_torch", "diffusers": "diffusers",
                 "torchtune": "torchtune"}
        for lib, dist in dists.items():
            try:
                versions[lib] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                versions[lib] = None
            if versions[lib] and sl.unavailable(lib):
                versions[lib] += f" (cannot be imported: {sl.unavailable(lib)})"
    summary = {**versions, "timeout_s": args.timeout,
               "selection": selection, "architectures_in_mappings": len(sc.architectures()),
               "counts": {o: sum(r["outcome"] == o for r in rows) for o in OUTCOMES}, "rows": rows}
    (args.out / f"{stem}.json").write_text(json.dumps(summary, indent=1) + "\n")
    if args.update_results:  # records what was run ("selection"): a sample says it is one
        (HERE / "results").mkdir(exist_ok=True)
        (HERE / "results" / f"{stem}.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(report(rows, args.out, stem))
    return summary


if __name__ == "__main__":
    main()
