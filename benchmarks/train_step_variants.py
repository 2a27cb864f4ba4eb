"""What ``train_step.py`` measures: the workloads (model, inputs, loss, device) and the
variants (BitFit floor, onelora_fx, Listing 1, PEFT, full fine-tuning). Only
``train_step.py`` imports this module."""

from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Callable, ContextManager

import torch
import torch.nn.functional as F
from torch import nn

import onelora_fx as ol
from onelora_fx.tools import zoo

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# LLaMA shape, batch x seq, and the single linear's width and rows, per --size ("quick": --quick's
# small shapes, to check that everything runs, not to measure)
SIZES = {
    "quick": dict(hidden=128, intermediate=344, layers=2, heads=4, vocab=256, batch=2, seq=64,
                  features=256, rows=512),
    "cpu": dict(hidden=512, intermediate=1376, layers=4, heads=8, vocab=1024, batch=4, seq=128,
                features=1024, rows=2048),
    "gpu-small": dict(hidden=1024, intermediate=2816, layers=8, heads=16, vocab=32000, batch=8, seq=512,
                      features=4096, rows=8192),
    "gpu": dict(hidden=2048, intermediate=5632, layers=8, heads=16, vocab=32000, batch=8, seq=512,
                features=4096, rows=16384),
}


class ILoRA(nn.Module):
    """The paper's Listing 1."""

    def __init__(self, linear):
        super().__init__()
        self.linear = linear
        self.b = nn.Parameter(torch.zeros(linear.out_features, device=linear.weight.device))

    def forward(self, x):
        ilora = self.b * x.sum(-1, keepdim=True)
        return self.linear(x) + ilora


class OneLinear(nn.Module):
    def __init__(self, features: int = 1024):
        super().__init__()
        self.lin = nn.Linear(features, features)

    def forward(self, x):
        return self.lin(x)


class Workload:
    """A base model on its device, example kwargs for capture, step inputs and the loss.

    On CUDA the forward and the loss run under bfloat16 autocast; weights, gradients and
    optimizer state stay float32."""

    def __init__(self, name: str, size: str = "cpu", device: str = "cpu"):
        self.name, self.shape, self.device = name, SIZES[size], torch.device(device)
        s = self.shape
        torch.manual_seed(0)
        if name == "llama":
            self.model, _, _ = zoo.llama(layers=s["layers"], hidden=s["hidden"], intermediate=s["intermediate"],
                                         vocab=s["vocab"], heads=s["heads"], kv_heads=s["heads"])
            ids = torch.randint(0, s["vocab"], (s["batch"], s["seq"]), generator=torch.Generator().manual_seed(0))
            ids = ids.to(self.device)
            self.inputs = {"input_ids": ids}
            self.example = {"input_ids": ids[:2, :16].clone()}
            self.targets = ids.roll(-1, dims=1)
            self.pattern = "all-linear"
            self.peft_targets = LLAMA_TARGETS
        else:
            self.model = OneLinear(s["features"])
            x = torch.randn(s["rows"], s["features"], generator=torch.Generator().manual_seed(0)).to(self.device)
            self.inputs = {"x": x}
            self.example = {"x": x[:4].clone()}
            self.targets = None
            self.pattern = "all"  # the single linear is the model's output: a head
            self.peft_targets = ["lin"]
        self.model.to(self.device).train()

    def describe(self) -> str:
        s = self.shape
        if self.name == "llama":
            return (f"LLaMA hidden {s['hidden']}, intermediate {s['intermediate']}, {s['layers']} layers, "
                    f"vocab {s['vocab']}, batch {s['batch']} x seq {s['seq']} ({7 * s['layers']} adapted linears)")
        return f"one {s['features']} x {s['features']} linear on [{s['rows']}, {s['features']}]"

    def adapted(self, model: nn.Module) -> list[str]:
        return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rpartition(".")[2] in self.peft_targets]

    def autocast(self) -> ContextManager:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def loss(self, out) -> torch.Tensor:
        out = out.logits if hasattr(out, "logits") else out
        if self.targets is None:
            return out.square().mean()
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), self.targets.reshape(-1))


# ---------------------------------------------------------------------------------
# variants: each builds a fresh model, on the workload's device, from the base model


def _freeze(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def floor(w: Workload) -> nn.Module:
    model = _freeze(copy.deepcopy(w.model))
    for path in w.adapted(model):
        lin = model.get_submodule(path)
        if lin.bias is None:
            lin.bias = nn.Parameter(torch.zeros(lin.out_features, device=lin.weight.device))
        else:
            lin.bias.requires_grad_(True)
    return model


def floor_captured(w: Workload) -> nn.Module:
    """The floor captured as ``ol.transform`` captures (auto: fx, else export; dynamic)."""
    from onelora_fx.state import Capture
    from onelora_fx.forms import GraphForm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = GraphForm().capture(floor(w), (), w.example, True, Capture.AUTO).root
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
            model = peft.get_peft_model(copy.deepcopy(w.model), cfg)
        # VeRA's shared projections are made on the CPU: bring them to the weights
        return model if w.device.type == "cpu" else model.to(w.device)

    return build


def compiled(build: Callable[[Workload], nn.Module], backend: str) -> Callable[[Workload], nn.Module]:
    def make(w: Workload) -> nn.Module:
        return torch.compile(build(w), backend=backend)

    make.compiled = True  # type: ignore[attr-defined]
    return make


FLOOR = "BitFit floor (captured graph)"
EAGER_FLOOR = "BitFit floor (eager model)"
COMPILED_FLOOR = "BitFit floor, torch.compile inductor"
VARIANTS: dict[str, Callable[[Workload], nn.Module]] = {
    FLOOR: floor_captured,
    EAGER_FLOOR: floor,
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
