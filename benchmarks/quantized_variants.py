"""What ``quantized.py`` measures: the sizes, the synthetic task, the bases (fp32, torchao
int8, bitsandbytes NF4), the variants (1LoRA through onelora_fx, PEFT LoRA) and the memory
tools. Only ``quantized.py`` imports this module."""

from __future__ import annotations

import ctypes
import gc
import itertools
import re
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

SIZES = {
    "full": {"hidden": 1024, "intermediate": 2816, "layers": 8, "heads": 16, "kv_heads": 8, "vocab": 1024,
             "batch": 4, "seq": 128, "steps": 20, "task_tokens": 64},
    "quick": {"hidden": 256, "intermediate": 512, "layers": 2, "heads": 4, "kv_heads": 4, "vocab": 1024,
              "batch": 2, "seq": 32, "steps": 4, "task_tokens": 64},
}

#: AdamW learning rate per method family (fixed, no search)
LR = {"1lora": 1e-2, "lora": 1e-3}
#: variant -> (base, method, LoRA rank); the reference for step-time ratios is 1LoRA on the same base
VARIANTS = {
    "1lora-fp32": ("fp32", "1lora", None),
    "lora8-fp32": ("fp32", "lora", 8),
    "1lora-int8": ("int8", "1lora", None),
    "1lora-nf4": ("nf4", "1lora", None),
    "qlora8-nf4": ("nf4", "lora", 8),
    "qlora1-nf4": ("nf4", "lora", 1),
}
REFERENCE = {"fp32": "1lora-fp32", "int8": "1lora-int8", "nf4": "1lora-nf4"}
BASE_LABEL = {"fp32": "fp32", "int8": "torchao int8 weight-only", "nf4": "bitsandbytes NF4"}


# ---------------------------------------------------------------- the task
def bigram_table(size: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random sparse bigram over ``task_tokens`` of the vocabulary: each token has
    4 successors with probabilities (0.55, 0.25, 0.15, 0.05). Entropy floor ~1.1 nats."""
    g = torch.Generator().manual_seed(1234)
    tokens = torch.randperm(size["vocab"], generator=g)[: size["task_tokens"]]
    k = size["task_tokens"]
    succ = torch.stack([torch.randperm(k, generator=g)[:4] for _ in range(k)])  # [k, 4] indices into tokens
    return tokens, succ


def sample_batch(size: dict, seed: int) -> torch.Tensor:
    tokens, succ = bigram_table(size)
    g = torch.Generator().manual_seed(seed)
    probs = torch.tensor([0.55, 0.25, 0.15, 0.05])
    state = torch.randint(0, len(tokens), (size["batch"],), generator=g)
    seq = [state]
    for _ in range(size["seq"] - 1):
        pick = torch.multinomial(probs, size["batch"], replacement=True, generator=g)
        state = succ[state, pick]
        seq.append(state)
    return tokens[torch.stack(seq, 1)]  # [batch, seq] token ids


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


# ---------------------------------------------------------------- bases
def fp32_llama(size: dict) -> nn.Module:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        num_hidden_layers=size["layers"], hidden_size=size["hidden"], intermediate_size=size["intermediate"],
        num_attention_heads=size["heads"], num_key_value_heads=size["kv_heads"], vocab_size=size["vocab"],
        max_position_embeddings=max(256, size["seq"]), use_cache=False,
    )
    return transformers.LlamaForCausalLM(cfg)


def _decoder_linear(module: nn.Module, fqn: str) -> bool:
    return type(module) is nn.Linear and "lm_head" not in fqn


def to_linear4bit(lin: nn.Linear) -> nn.Module:
    """bitsandbytes NF4 (blocksize 64, nested statistics, fp32 compute) from an nn.Linear."""
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=torch.float32,
                          quant_type="nf4", compress_statistics=True, device="meta")
    q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                 compress_statistics=True, module=q).to("cpu")  # .to() quantizes
    if lin.bias is not None:
        q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    return q


def build_base(base: str, size: dict) -> nn.Module:
    """The seeded fp32 LLaMA, with every decoder linear quantized for int8 / nf4;
    embeddings, norms and the head stay fp32."""
    model = fp32_llama(size)
    if base == "int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(model, Int8WeightOnlyConfig(), filter_fn=_decoder_linear)
    elif base == "nf4":
        for name, owner in list(model.named_modules()):
            for child_name, child in list(owner.named_children()):
                if _decoder_linear(child, f"{name}.{child_name}"):
                    setattr(owner, child_name, to_linear4bit(child))
        model.is_loaded_in_4bit = True  # PEFT then picks its bitsandbytes LoRA layers (QLoRA)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ---------------------------------------------------------------- adapters
def adapt(model: nn.Module, method: str, rank, size: dict) -> tuple[nn.Module, list[nn.Parameter], str]:
    """The adapted model, its trainable tensors and a word on its form."""
    if method == "1lora":
        import onelora_fx as ol

        example = sample_batch(size, seed=99)[:2, :16]
        gm = ol.transform(model, "all-linear", example_kwargs={"input_ids": example})
        form = "onelora graph" if isinstance(gm, torch.fx.GraphModule) else "onelora module"
        return gm, list(ol.adapter_parameters(gm).values()), form
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=TARGETS, bias="none")
    peft_model = get_peft_model(model, cfg)
    layer = type(peft_model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj"))
    form = "PEFT " + f"{layer.__module__}.{layer.__name__}".removeprefix("peft.tuners.").replace(".layer.", ".")
    return peft_model, [p for p in peft_model.parameters() if p.requires_grad], form


# ---------------------------------------------------------------- memory
def rss_bytes(field: str = "VmRSS") -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE).group(1)) * 1024


def reset_peak_rss() -> None:
    """Free what can be freed, then reset VmHWM to the current RSS (Linux >= 4.0)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    Path("/proc/self/clear_refs").write_text("5")


def torch_alloc_peak(fn: Callable[[], object]) -> int:
    """Peak bytes allocated by torch on the CPU inside ``fn`` and live at once (profiler
    allocation events: +alloc / -free, cumulated in time order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # private profiler internals (kineto's raw events, the DeviceType enum): the public
    # key_averages() has no time order, which a peak needs; may need updating with torch
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch._C._autograd.DeviceType.CPU)
    return max(itertools.accumulate((nb for _, nb in events), initial=0))


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors``, looking inside torchao tensor
    subclasses (their inner tensors) and bitsandbytes quant states (nested absmax, code)."""
    seen: dict[tuple[int, int], int] = {}

    def add(t) -> None:
        if not isinstance(t, torch.Tensor):
            return
        if hasattr(t, "quant_state"):  # bnb Params4bit: packed data + its quant state
            add_state(t.quant_state)
        elif hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, nn.Parameter) and not hasattr(t, "SCB"):
            for name in t.__tensor_flatten__()[0]:
                add(getattr(t, name))
            return
        s = t.untyped_storage()
        seen[(s.data_ptr(), s.nbytes())] = s.nbytes()

    def add_state(qs) -> None:
        if qs is None:
            return
        for name in ("absmax", "code", "offset"):
            add(getattr(qs, name, None))
        add_state(getattr(qs, "state2", None))

    for t in tensors:
        add(t)
    return sum(seen.values())


def model_tensors(model: nn.Module) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers()]


def optimizer_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in opt.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
