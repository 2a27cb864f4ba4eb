"""1LoRA adapters in the PEFT LoRA format, which PEFT, vLLM and TGI already load.

``ΔW = b 1ᵀ`` is a rank-1 LoRA with ``lora_A = 1ᵀ`` (ones), ``lora_B = b`` and scaling 1
(``r = lora_alpha = 1``). :func:`save_peft` writes that as ``adapter_config.json`` +
``adapter_model.safetensors``; ``peft.PeftModel.from_pretrained(base, directory)`` then
computes what the adapted module computes. :func:`load_peft` reads such a directory
back, and PEFT's ``MissConfig(r=1)`` adapters, which compute the same update
(``x.sum(-1) * miss_block``). Any other PEFT adapter is refused with the reason.

PEFT adapts modules: a site is expressible when its weight is the ``weight`` of an
``nn.Linear`` or ``Conv1D`` that makes the call itself. ``train`` extras travel as
PEFT does them: biases as ``bias="all"``, norms and a head as ``modules_to_save``.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..analysis.linear_ops import is_conv1d
from .files import AdapterFileError, check_fits, placed_like, write_tensors
from ..forms.materialize import settle
from ..query import adapted_sites, adapter_parameters
from ..records import LinearSite, adapter_name_for
from ..state import Extra, get_state
from ..state import OneLoRAWarning

__all__ = ["save_peft", "load_peft"]

PREFIX = "base_model.model."
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def _layer(module: nn.Module, s: LinearSite) -> bool:
    """Can PEFT express this site (a Linear / Conv1D calling its own weight)?"""
    try:
        owner = module.get_submodule(s.owner)
    except AttributeError:
        return False
    layer = isinstance(owner, nn.Linear) or is_conv1d(owner)
    return layer and s.attr == "weight" and s.experts is None and s.rows is None and s.caller in ("", s.owner)


def _targets(paths: list[str], candidates: list[str]) -> Any:
    """``target_modules`` that select exactly ``paths``: layer names when those are
    enough (what LoRA servers expect), else full paths, else an exact regex."""

    def picks(targets: list[str]) -> set[str]:
        return {c for c in candidates if any(c == t or c.endswith("." + t) for t in targets)}

    leaves = sorted({p.rpartition(".")[2] for p in paths})
    if picks(leaves) == set(paths):
        return leaves
    if picks(sorted(paths)) == set(paths):
        return sorted(paths)
    return "^(?:" + "|".join(re.escape(p) for p in sorted(paths)) + ")$"


def _tensors(gm: nn.Module, kept: list[LinearSite], state: Any) -> tuple[dict[str, torch.Tensor], list[str]]:
    """PEFT's tensors (``lora_A`` = ones, ``lora_B`` = b, trained extras under PEFT's
    names) and the modules it saves whole (``modules_to_save``)."""
    vectors = adapter_parameters(gm)
    tensors: dict[str, torch.Tensor] = {}
    for s in kept:
        b = vectors[s.adapter_name].detach().cpu()
        tensors[f"{PREFIX}{s.owner}.lora_A.weight"] = torch.ones(1, s.in_features, dtype=b.dtype)
        tensors[f"{PREFIX}{s.owner}.lora_B.weight"] = b.reshape(-1, 1).clone()
    targets = {s.owner for s in kept}
    to_save: list[str] = []
    for name in state.extras if state else ():
        owner, _, leaf = name.rpartition(".")
        if leaf == "bias" and Extra.BIAS in state.train:  # bias="all"; a LoRA layer keeps it on base_layer
            key = f"{owner}.base_layer.bias" if owner in targets else name
        else:
            to_save.append(owner)  # a norm or the head, whole
            key = name
        tensors[PREFIX + key] = vectors[name].detach().cpu().contiguous()
    return tensors, to_save


#: PEFT's TaskType for a transformers model class, by the class name's ending
_TASKS = {"ForCausalLM": "CAUSAL_LM", "ForConditionalGeneration": "SEQ_2_SEQ_LM", "ForSeq2SeqLM": "SEQ_2_SEQ_LM",
          "ForSequenceClassification": "SEQ_CLS", "ForTokenClassification": "TOKEN_CLS",
          "ForQuestionAnswering": "QUESTION_ANS"}


def _task_type(model: nn.Module) -> Any:
    """PEFT's ``task_type`` for the model, when its class says it (else None)."""
    name = getattr(type(model), "_onelora_base", type(model)).__name__
    return next((task for suffix, task in _TASKS.items() if name.endswith(suffix)), None)


def save_peft(gm: nn.Module, directory: str | os.PathLike, *, skip_unsupported: bool = False) -> Path:
    """Write ``gm``'s adapter as a PEFT LoRA adapter (r = 1, ``lora_alpha`` = 1).

    Examples:
        >>> ol.save_peft(gm, "my-adapter")                          # doctest: +SKIP
        >>> peft.PeftModel.from_pretrained(base_model, "my-adapter")  # doctest: +SKIP

    Raises:
        AdapterFileError: a site PEFT cannot express (a raw ``F.linear`` parameter, an
            expert weight), unless ``skip_unsupported=True`` (then a warning names them).
    """
    state = get_state(gm)
    if state is not None and state.stack:
        raise AdapterFileError("save_peft() writes one adapter: write one out of the stack first (ol.unstack)")
    sites = [s for s in adapted_sites(gm) if s.adapted and s.call_index == 0]
    if not sites:
        raise AdapterFileError("the module carries no 1LoRA vectors: nothing to save (transform it first)")
    model = state.model if state is not None and state.model is not None else gm  # the model's own layers
    unsupported = [s.name for s in sites if not _layer(model, s)]
    if unsupported and not skip_unsupported:
        raise AdapterFileError(
            f"PEFT's LoRA format adapts nn.Linear / Conv1D layers only; these sites are not such layers: "
            f"{', '.join(unsupported)}. Exclude them from the pattern, or pass skip_unsupported=True to leave them out."
        )
    if unsupported:
        warnings.warn(f"save_peft left out {len(unsupported)} sites PEFT cannot express: {', '.join(unsupported)}", category=OneLoRAWarning, stacklevel=2)
    kept = [s for s in sites if s.name not in unsupported]
    tensors, to_save = _tensors(gm, kept, state)
    modules = [p for p, m in model.named_modules() if isinstance(m, nn.Linear) or is_conv1d(m)]
    config = {
        "peft_type": "LORA", "r": 1, "lora_alpha": 1, "lora_dropout": 0.0, "use_rslora": False, "use_dora": False,
        "target_modules": _targets(sorted({s.owner for s in kept}), modules),
        "fan_in_fan_out": any(s.layout.value == "in_out" for s in kept),
        "bias": "all" if state and Extra.BIAS in state.train else "none",
        "modules_to_save": sorted(set(to_save)) or None, "init_lora_weights": True, "inference_mode": True,
        "task_type": _task_type(model),
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
    }
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise AdapterFileError(f"cannot write a PEFT adapter to {directory}: it is a file; give a folder")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG).write_text(json.dumps(config, indent=2))
    except OSError as e:
        raise AdapterFileError(f"cannot write a PEFT adapter to {directory}: {e.strerror or e}") from e
    write_tensors(tensors, directory / WEIGHTS, {"format": "pt"})
    return directory


def _read(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The config and tensors of a PEFT adapter folder; every way it can be unreadable is
    an :class:`AdapterFileError` naming the file."""
    from safetensors.torch import load_file

    if not (directory / CONFIG).is_file():
        raise AdapterFileError(f"{directory} holds no {CONFIG}: not a PEFT adapter folder")
    try:
        config = json.loads((directory / CONFIG).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFileError(f"{directory / CONFIG} is not readable JSON ({type(e).__name__}: {e})") from e
    if not isinstance(config, dict):
        raise AdapterFileError(f"{directory / CONFIG} holds a {type(config).__name__}, not a PEFT config object")
    weights = directory / WEIGHTS
    try:
        if weights.is_file():
            return config, load_file(str(weights))
        if (directory / "adapter_model.bin").is_file():
            weights = directory / "adapter_model.bin"
            return config, torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors / pickle raise their own types for bad files
        raise AdapterFileError(f"{weights} is not a readable tensor file ({type(e).__name__}: {e}); it may be "
                               "truncated or corrupt") from e
    raise AdapterFileError(f"{directory} holds no {WEIGHTS}")


#: config fields that change what an adapter computes, beyond the tensors and the
#: fields read below: a load refuses any that is set, naming it
_CHANGES_THE_MATH = {
    "use_dora": "DoRA rescales the weight (a magnitude vector), which 1LoRA does not",
    "lora_bias": "a bias on lora_B adds a constant 1LoRA has no place for",
    "rank_pattern": "per-module ranks",
    "alpha_pattern": "per-module scalings",
    "trainable_token_indices": "trainable embedding rows",
    "target_parameters": "LoRA on raw parameters (PEFT's ParamWrapper) computes another update",
    "layer_replication": "replicated layers",
    "use_qalora": "QA-LoRA pools the input",
    "alora_invocation_tokens": "activated LoRA applies only after invocation tokens",
}


def _refuse_fields(config: dict[str, Any], where: Path) -> None:
    for name, why in _CHANGES_THE_MATH.items():
        if config.get(name):
            raise AdapterFileError(f"{where}: {name}={config[name]!r} ({why}); this adapter is not 1LoRA's b 1ᵀ, "
                                   "so it was not loaded")


#: ``peft.LoraConfig``'s default ``lora_alpha`` (peft 0.21, 0.22)
PEFT_DEFAULT_LORA_ALPHA = 8


def _strip(key: str, where: Path) -> str:
    if not key.startswith(PREFIX):
        raise AdapterFileError(f"{where}: tensor {key} is not under {PREFIX!r}: not a PEFT adapter of a whole model")
    return key[len(PREFIX):]


def _lora_vectors(config: dict[str, Any], tensors: dict[str, torch.Tensor], where: Path) -> tuple[dict[str, torch.Tensor], set[str]]:
    """1LoRA vectors of a LoRA r = 1 adapter with constant ``lora_A``; and the keys read."""
    if config.get("r") != 1:
        raise AdapterFileError(f"{where} is a LoRA of rank {config.get('r')}: 1LoRA is the rank-1 update ΔW = b 1ᵀ "
                               "(r = 1, lora_A constant), so it cannot be loaded as one")
    _refuse_fields(config, where)
    # a config without lora_alpha means PEFT's default, as PeftModel.from_pretrained reads it
    scaling = float(config.get("lora_alpha", PEFT_DEFAULT_LORA_ALPHA)) / (1.0 if config.get("use_rslora") else float(config["r"]))
    out, used = {}, set()
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        path = _strip(key, where)[:-len(".lora_A.weight")]
        b_key = f"{PREFIX}{path}.lora_B.weight"
        if b_key not in tensors:
            raise AdapterFileError(f"{where}: {key} has no {b_key}; the adapter file is incomplete")
        if a.dim() != 2 or a.shape[0] != 1 or tensors[b_key].dim() != 2 or tensors[b_key].shape[1] != 1:
            raise AdapterFileError(f"{where}: {path} has lora_A {tuple(a.shape)} and lora_B {tuple(tensors[b_key].shape)}, "
                                   "not the [1, in] and [out, 1] of a rank-1 LoRA")
        if not torch.allclose(a, a.flatten()[0].expand_as(a), rtol=1e-6, atol=0):
            raise AdapterFileError(f"{where}: lora_A of {path} is not constant, so its update is not b 1ᵀ: not a 1LoRA adapter")
        b = tensors[b_key][:, 0].to(torch.float64) * float(a.flatten()[0]) * scaling
        out[adapter_name_for(path, "weight")] = b
        used |= {key, b_key}
    return out, used


def _miss_vectors(config: dict[str, Any], tensors: dict[str, torch.Tensor], where: Path) -> tuple[dict[str, torch.Tensor], set[str]]:
    """1LoRA vectors of a MiSS r = 1 adapter (its default initialization); and the keys read."""
    if config.get("r") != 1 or config.get("init_weights") not in (True, False, None):
        raise AdapterFileError(f"{where} is MiSS with r={config.get('r')}, init_weights={config.get('init_weights')!r}: "
                               "only r=1 with the default init computes x.sum(-1) * miss_block, which is 1LoRA")
    out, used = {}, set()
    for key, block in tensors.items():
        if key.endswith(".miss_block"):
            if block.dim() != 2 or block.shape[0] != 1:
                raise AdapterFileError(f"{where}: {key} is {tuple(block.shape)}, not the [1, out] block of MiSS r = 1")
            out[adapter_name_for(_strip(key, where)[:-len(".miss_block")], "weight")] = block[0].to(torch.float64)
            used.add(key)
    return out, used


def read_peft(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, tuple[str, torch.Tensor]]]:
    """``(config, vectors, extras)`` of a PEFT folder holding a 1LoRA adapter: the 1LoRA
    vectors by adapter name, and every other tensor by the model's name for it (with the
    file's key, for messages). The one reader :func:`load_peft` and the offline merge use."""
    config, tensors = _read(directory)
    kind = config.get("peft_type")
    if kind == "LORA":
        vectors, used = _lora_vectors(config, tensors, directory)
    elif kind == "MISS":
        vectors, used = _miss_vectors(config, tensors, directory)
    else:
        raise AdapterFileError(f"{directory} is a PEFT {kind} adapter; only LoRA with r = 1 and a constant lora_A, or "
                               "MiSS with r = 1, compute 1LoRA's update b 1ᵀ")
    extras = {_strip(k, directory).replace(".base_layer.", "."): (k, t) for k, t in tensors.items() if k not in used}
    return config, vectors, extras


def load_peft(gm: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load a PEFT adapter that is 1LoRA (what :func:`save_peft` writes, or a
    ``MissConfig(r=1)`` adapter) into an adapted module; checked like
    :func:`onelora_fx.load_adapter` (nothing changes on a mismatch).

    Every tensor of the file is consumed (1LoRA vectors, and the trained biases, norms
    or head this module trains too) or the load is refused naming it; every config field
    that would change the update (DoRA, a LoRA bias, per-module ranks, trainable tokens,
    ...) is refused naming it.

    Examples:
        >>> gm = ol.transform(model, ["*.q_proj", "*.v_proj"], example_kwargs=kw)   # doctest: +SKIP
        >>> ol.load_peft(gm, "my-miss-adapter")                                    # doctest: +SKIP

    Raises:
        AdapterFileError: the folder or its files are unreadable, the adapter is not
            1LoRA, or it does not fit this module. Nothing is changed then.
    """
    directory = Path(directory)
    _, vectors, extras = read_peft(directory)
    targets = adapter_parameters(gm)
    for name, (key, t) in extras.items():  # trained biases, norms, heads: this module must train them too
        if name not in targets or name in vectors:
            raise AdapterFileError(
                f"{directory} holds {key}, which is neither a 1LoRA vector nor a tensor this module trains "
                "(transform with the same train=... extras); it was not loaded, nothing changed"
            )
        vectors[name] = t
    ready = {k: v.to(targets[k].dtype) if k in targets and v.is_floating_point() else v for k, v in vectors.items()}
    check_fits(targets, ready, str(directory))
    bad = [k for k, v in ready.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise AdapterFileError(f"{directory} holds non-finite values in {', '.join(bad)}; it was not loaded")
    with torch.no_grad():
        for name, p in targets.items():
            p.copy_(placed_like(ready[name], p))
    settle(gm, targets)
    return gm
