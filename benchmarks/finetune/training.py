"""The training loop every method and every pre-training shares, and evaluation.

AdamW (weight decay 0.01), linear warm-up over the first 10% of the steps then cosine
decay to zero, batches of 64 drawn with a seeded generator.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Union

import torch
from torch import nn

if TYPE_CHECKING:
    from .tasks import Task

BATCH = 64
WEIGHT_DECAY = 0.01
WARMUP = 0.1

# a list of parameters, or AdamW parameter groups (dicts) for per-group settings
Params = Union[list[nn.Parameter], list[dict[str, Any]]]


def logits_of(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, dict):
        return out["logits"]
    return out[0]


def set_mode(module: nn.Module, training: bool) -> None:
    try:
        module.train(training)
    except NotImplementedError:  # a torch.export program's module: eval mode is baked in
        pass


@torch.no_grad()
def evaluate(task: Task, module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:
    """``(metric, logits)`` of ``module`` on ``x``, in eval mode."""
    set_mode(module, False)
    logits = torch.cat([logits_of(module(**task.kwargs(xb))) for xb in x.split(512)])
    set_mode(module, True)
    return task.correct(logits, y).float().mean().item(), logits


def schedule(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine to zero (scales every group's own rate)."""
    warm = max(1, int(WARMUP * steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def fit(task: Task, module: nn.Module, params: Params, data: tuple[torch.Tensor, torch.Tensor],
        steps: int, lr: float, seed: int, progress: Callable[[str], None] | None = None,
        every_s: float = 20.0) -> float:
    """AdamW + warm-up/cosine for ``steps`` batches; returns the mean loss of the last 10% of steps.
    With ``progress``, a line ("step i/steps, loss ...") every ``every_s`` seconds."""
    x, y = data
    last = time.perf_counter()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=WEIGHT_DECAY)
    sched = schedule(opt, steps)
    g = torch.Generator().manual_seed(seed)
    set_mode(module, True)
    tail = []
    for step in range(steps):
        idx = torch.randint(0, len(x), (BATCH,), generator=g)
        loss = task.loss(logits_of(module(**task.kwargs(x[idx]))), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step >= steps - max(1, steps // 10):
            tail.append(loss.item())
        if progress is not None and time.perf_counter() - last >= every_s:
            last = time.perf_counter()
            progress(f"step {step + 1}/{steps}, loss {loss.item():.3f}")
    return statistics.fmean(tail)
