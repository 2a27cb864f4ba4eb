"""The compared fine-tuning methods, their learning-rate grids, and how each is built.

Every method adapts the same linear layers (every linear but the output head, as
``ol.transform(..., "all-linear")`` selects them) and trains the new head where the task
has one:

* head only; BitFit (the bias of each adapted linear); DiffFit (a per-output scale
  gamma on each adapted linear, ``gamma * (W x + beta)``, plus its bias and every norm
  layer); 1LoRA (``ol.transform``); 1LoRA + norms (``train=("norm",)``); PEFT's LoRA
  r=1, VeRA r=1 and DoRA r=1 (library defaults otherwise: LoRA alpha 8, no dropout);
  full fine-tuning; and, as a reference only, the same model trained from scratch on
  the target.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import onelora_fx as ol

from .tasks import Task, norm_parameters

VECTOR_GRID = (3e-3, 1e-2, 3e-2, 1e-1)  # head only, BitFit, VeRA
ADAPTER_GRID = (1e-3, 3e-3, 1e-2, 3e-2)  # DiffFit, 1LoRA, 1LoRA + norms, LoRA, DoRA
FULL_GRID = (3e-4, 1e-3, 3e-3, 1e-2)  # full fine-tuning, from scratch


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    grid: tuple[float, ...]
    reference: bool = False  # shown for context, not one of the compared methods
    uses_pretrained: bool = True  # False: its runs do not depend on the pre-trained model


METHODS = [
    Method("head", "head only", VECTOR_GRID),
    Method("bitfit", "BitFit", VECTOR_GRID),
    Method("difffit", "DiffFit", ADAPTER_GRID),
    Method("onelora", "1LoRA", ADAPTER_GRID),
    Method("onelora_norms", "1LoRA + norms", ADAPTER_GRID),
    Method("lora", "LoRA r=1", ADAPTER_GRID),
    Method("vera", "VeRA r=1", VECTOR_GRID),
    Method("dora", "DoRA r=1", ADAPTER_GRID),
    Method("full", "full fine-tuning", FULL_GRID),
    Method("scratch", "from scratch (reference)", FULL_GRID, reference=True, uses_pretrained=False),
]
BY_KEY = {m.key: m for m in METHODS}


@dataclass
class Adapted:
    module: nn.Module
    params: list[nn.Parameter]
    setup_s: float
    head_params: int  # trainable parameters in the output head


def adapted_linears(task: Task, gm: nn.Module, model: nn.Module) -> list[str]:
    """Module names of the linears 1LoRA adapted: every method adapts these."""
    names = sorted({s.name for s in ol.sites(gm) if s.selected})
    for n in names:
        if not isinstance(model.get_submodule(n), nn.Linear):
            raise RuntimeError(f"1LoRA site {n} is not an nn.Linear of the model; methods would not be comparable")
    if task.head in names:
        raise RuntimeError("all-linear selected the head")
    return names


def fresh_start(task: Task, pretrained: nn.Module, seed: int) -> nn.Module:
    """The model every method starts from: the pre-trained one, with a new head if the task needs one."""
    start = copy.deepcopy(pretrained)
    if task.new_head:
        torch.manual_seed(1000 + seed)
        old = start.get_submodule(task.head)
        new = nn.Linear(old.in_features, old.out_features)
        with torch.no_grad():
            old.weight.copy_(new.weight)
            old.bias.copy_(new.bias)
    return start


def _head_count(task: Task, module: nn.Module, params: list[nn.Parameter]) -> int:
    head = {id(p) for n, p in module.named_parameters() if f"{task.head}." in f".{n}"}
    return sum(p.numel() for p in params if id(p) in head)


def _frozen_copy(model: nn.Module) -> nn.Module:
    m = copy.deepcopy(model)
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def _unfreeze(params: list[nn.Parameter]) -> list[nn.Parameter]:
    for p in params:
        p.requires_grad_(True)
    return params


def _head(task: Task, model: nn.Module, always: bool = False) -> list[nn.Parameter]:
    """The output head's parameters if the task has a new head (or ``always``: "head only")."""
    return list(model.get_submodule(task.head).parameters()) if task.new_head or always else []


def _scale_output(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    return output * module.difffit_gamma


class OneLoRA:
    """One graph capture per task, pre-training and 1LoRA variant; each run resets the trained tensors."""

    def __init__(self, task: Task, pretrained: nn.Module, train: tuple[str, ...]):
        start = time.perf_counter()
        self.gm = ol.transform(copy.deepcopy(pretrained), "all-linear",
                               example_kwargs=task.kwargs(task.target["train"][0][:4]), train=train)
        self.setup_s = time.perf_counter() - start
        self.params = [p for p in self.gm.parameters() if p.requires_grad]
        self.initial = {n: p.detach().clone() for n, p in self.gm.named_parameters() if p.requires_grad}

    def reset(self, task: Task, start: nn.Module) -> None:
        with torch.no_grad():
            for n, p in self.gm.named_parameters():
                if n in self.initial:
                    p.copy_(self.initial[n])
            if task.new_head:  # the seed's fresh head, into the trainable head copy
                for n, v in start.get_submodule(task.head).named_parameters():
                    self.gm.get_parameter(f"{task.head}.{n}").copy_(v)

    def state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.gm.named_parameters() if n in self.initial}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, v in state.items():
                self.gm.get_parameter(n).copy_(v)


def onelora_variants(task: Task, start: nn.Module, keys: set[str]) -> dict[str, OneLoRA]:
    """The captured 1LoRA models: plain 1LoRA always, "1LoRA + norms" when ``keys`` has it."""
    head = ("head",) if task.new_head else ()
    out = {"onelora": OneLoRA(task, start, head)}
    if "onelora_norms" in keys:
        out["onelora_norms"] = OneLoRA(task, start, ("norm",) + head)
    return out


def build(key: str, task: Task, start: nn.Module, linears: list[str], seed: int,
          onelora: dict[str, OneLoRA]) -> Adapted:
    """The method ``key`` applied to ``start`` (the pre-trained model with the seed's head)."""
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    if key in ("onelora", "onelora_norms"):
        variant = onelora[key]
        variant.reset(task, start)
        module, params, setup = variant.gm, variant.params, variant.setup_s
        return Adapted(module, params, setup, _head_count(task, module, params))
    if key == "scratch":
        module = task.make_model()
        params = list(module.parameters())
    elif key == "full":
        module = copy.deepcopy(start)
        params = _unfreeze(list(module.parameters()))
    elif key in ("lora", "dora", "vera"):
        import peft

        extra = {"modules_to_save": [task.head]} if task.new_head else {}
        if key == "vera":
            cfg = peft.VeraConfig(r=1, target_modules=linears, projection_prng_key=seed, **extra)
        else:
            cfg = peft.LoraConfig(r=1, target_modules=linears, use_dora=key == "dora", **extra)
        module = peft.get_peft_model(_frozen_copy(start), cfg)
        params = [p for p in module.parameters() if p.requires_grad]
    else:
        module = _frozen_copy(start)
        params = _head(task, module, always=key == "head")
        if key in ("bitfit", "difffit"):
            params += [module.get_submodule(n).bias for n in linears]
        if key == "difffit":
            for n in linears:
                layer = module.get_submodule(n)
                layer.difffit_gamma = nn.Parameter(torch.ones(layer.out_features))
                layer.register_forward_hook(_scale_output)
                params.append(layer.difffit_gamma)
            params += norm_parameters(module)
        params = _unfreeze(list({id(p): p for p in params}.values()))
    return Adapted(module, params, time.perf_counter() - t0, _head_count(task, module, params))
