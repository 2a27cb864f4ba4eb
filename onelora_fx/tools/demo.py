"""``onelora-fx demo``: the whole job on real images, offline, in about half a minute on 2 cores.

1. Pretrain a small ViT (transformers, random init) on scikit-learn's handwritten digits.
2. The target domain is the same digits as photographic negatives (``1 - x``): the
   pretrained model is near chance there.
3. Fine-tune to the target with 1LoRA (every linear but the head, plus the head, as the
   paper does), next to head-only and full fine-tuning, from the same starting point.
4. Save the 1LoRA adapter, merge it, export the merged graph to ``.pt2``, reload the file
   with plain ``torch.export.load`` and check it against the adapted module.

"train memory" is what a training step holds: weights, gradients, optimizer state and
the activations autograd saves for backward (counted with saved-tensor hooks; unique
storages). Step times are medians over the run on a shared machine: a guide, not a
benchmark (``benchmarks/train_step.py`` is the benchmark).
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import nn

__all__ = ["run"]


def _progress(done: int, total: int, label: str) -> None:
    """A progress bar on stderr (redrawn on a terminal, one line per stage otherwise)."""
    if not sys.stderr.isatty() and done != total:
        return
    width = 30
    filled = int(width * done / total)
    end = "\n" if done == total else ""
    print(f"\r{label:<26} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}", end=end, file=sys.stderr, flush=True)


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, train labels, test images, test labels); 8x8, values in [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(data.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = order[:1400], order[1400:]
    return x[train], y[train], x[test], y[test]


def negative(x: torch.Tensor) -> torch.Tensor:
    """The target domain: photographic negatives."""
    return 1.0 - x


def vit() -> nn.Module:
    import transformers

    cfg = transformers.ViTConfig(
        image_size=8, patch_size=2, num_channels=1, hidden_size=64, num_hidden_layers=3,
        num_attention_heads=4, intermediate_size=128, num_labels=10,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    return transformers.ViTForImageClassification(cfg)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(pixel_values=x).logits.argmax(-1) == y).float().mean().item()


def train_memory(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes of weights + grads + optimizer state + saved activations, unique storages."""
    seen: dict[int, int] = {}

    def count(t: torch.Tensor) -> None:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()

    def pack(t):
        count(t)
        return t

    for p in model.parameters():
        count(p)
        if p.grad is not None:
            count(p.grad)
    for state in opt.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                count(v)
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.cross_entropy(model(pixel_values=x).logits, y)
    return sum(seen.values())


def fine_tune(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, label: str) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(1)
    times = []
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        start = time.perf_counter()
        loss = F.cross_entropy(model(pixel_values=x[idx]).logits, y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
        if step % 10 == 0 or step == steps - 1:
            _progress(step + 1, steps, label)
    return {
        "trainable": sum(p.numel() for p in params),
        "step_ms": 1e3 * statistics.median(times),
        "memory": train_memory(model, opt, x[:64], y[:64]),
    }


def _llama_7b_adapter_values() -> int:
    """How many values a LLaMA-2-7B all-linear adapter holds, from a meta-device model."""
    import transformers

    from ..forms.module.form import module_sites

    cfg = transformers.LlamaConfig(
        num_hidden_layers=32, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000,
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    return sum(s.out_features for s in module_sites(model) if not s.is_head)


def _head_only(model: nn.Module) -> nn.Module:
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("classifier."))
    return model


def run(quick: bool = False, out_dir: str | Path = "onelora_demo", threads: int = 1) -> dict:
    """Run the demo; returns the numbers it prints.

    It runs on ``threads`` CPU threads (one by default): the ViT is so small that a
    second thread saves little, and on a machine shared with other work threads that
    wait for each other spin and burn time (see the README's measurements).

    Examples:
        >>> from onelora_fx.tools import demo
        >>> results = demo.run(quick=True)   # doctest: +SKIP
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(quick, out_dir)
    finally:
        torch.set_num_threads(previous)


def _run(quick: bool, out_dir: str | Path) -> dict:
    import onelora_fx as ol

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pretrain_steps, tune_steps = (60, 30) if quick else (600, 300)
    xs, ys, xs_test, ys_test = digits()
    xt, xt_test = negative(xs), negative(xs_test)
    started = time.perf_counter()

    base = vit()
    fine_tune(base, xs, ys, pretrain_steps, 3e-3, "pretrain (digits)")
    source_acc = accuracy(base, xs_test, ys_test)
    start_acc = accuracy(base, xt_test, ys_test)

    example = {"pixel_values": xt[:4]}
    methods: dict[str, tuple[Callable[[nn.Module], nn.Module], float]] = {
        "head only": (_head_only, 1e-2),
        "1LoRA + head (onelora_fx)": (lambda m: ol.transform(m, "all-linear", example_kwargs=example, train=("head",)), 1e-2),
        "full fine-tuning": (lambda m: m, 1e-3),
    }
    rows, results, adapted = [], {}, None
    for name, (prepare, lr) in methods.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = prepare(copy.deepcopy(base))
        stats = fine_tune(model, xt, ys, tune_steps, lr, name)
        stats["accuracy"] = accuracy(model, xt_test, ys_test)
        results[name] = stats
        if "1LoRA" in name:
            adapted = model
    # deploy: adapter file, merge, export, reload
    adapter = ol.save_adapter(adapted, out_dir / "adapter.safetensors")
    path = out_dir / "digits_negative.pt2"
    ol.export(adapted, example_kwargs={"pixel_values": xt[:8]}, path=path)
    reloaded = torch.export.load(str(path)).module()
    adapted.eval()
    with torch.no_grad():
        diff = (reloaded(pixel_values=xt_test)["logits"] - adapted(pixel_values=xt_test).logits).abs().max().item()
        reloaded_acc = (reloaded(pixel_values=xt_test)["logits"].argmax(-1) == ys_test).float().mean().item()

    for name, r in results.items():
        rows.append((name, f"{r['trainable']:,}", f"{r['step_ms']:.1f}", f"{r['memory'] / 2**20:.2f}", f"{100 * r['accuracy']:.1f}%"))
    print()
    print(f"ViT (3 layers, hidden 64) pretrained on digits: {100 * source_acc:.1f}% on digits, "
          f"{100 * start_acc:.1f}% on their negatives before fine-tuning ({tune_steps} steps each, AdamW, batch 64)")
    print(tabulate(rows, headers=("method", "trainable", "step ms", "train memory MB", "target accuracy")))
    print()
    print(f"adapter file: {adapter} ({adapter.stat().st_size:,} bytes)")
    values = _llama_7b_adapter_values()
    print(f"the same adapter for LLaMA-2-7B (all-linear): {values:,} values, "
          f"{values * 2 / 2**20:.1f} MiB in bfloat16 ({values * 4 / 2**20:.1f} MiB in float32)")
    print(f"exported merged program: {path} ({path.stat().st_size:,} bytes), reloaded with torch.export.load")
    print(f"reloaded vs adapted: max |logit difference| {diff:.2e}, target accuracy {100 * reloaded_acc:.1f}%")
    print(f"total time {time.perf_counter() - started:.0f} s")
    return {
        "source_accuracy": source_acc,
        "start_accuracy": start_acc,
        "methods": results,
        "reloaded_accuracy": reloaded_acc,
        "max_abs_diff": diff,
        "adapter_bytes": adapter.stat().st_size,
        "llama_7b_adapter_values": values,
    }
