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

from .adapters import AdapterFileError, check_fits, write_tensors
from .materialize import settle
from .query import adapted_sites, adapter_parameters
from .sites import LinearSite, adapter_name_for
from .state import Extra, get_state

__all__ = ["save_peft", "load_peft"]

PREFIX = "base_model.model."
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def _layer(module: nn.Module, s: LinearSite) -> bool:
    """Can PEFT express this site (a Linear / Conv1D calling its own weight)?"""
    try:
        owner = module.get_submodule(s.owner)
    except AttributeError:
        return False
    kind = type(getattr(type(owner), "_onelora_base", type(owner))).__name__
    layer = isinstance(owner, nn.Linear) or kind == "Conv1D" or type(owner).__name__ == "Conv1D"
    return layer and s.attr == "weight" and s.experts is None and s.caller in ("", s.owner)


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


def save_peft(gm: nn.Module, directory: str | os.PathLike, *, skip_unsupported: bool = False) -> Path:
    """Write ``gm``'s adapter as a PEFT LoRA adapter (r = 1, ``lora_alpha`` = 1).

    Example:
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
        warnings.warn(f"save_peft left out {len(unsupported)} sites PEFT cannot express: {', '.join(unsupported)}", stacklevel=2)
    kept = [s for s in sites if s.name not in unsupported]
    tensors, to_save = _tensors(gm, kept, state)
    modules = [p for p, m in model.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
    config = {
        "peft_type": "LORA", "r": 1, "lora_alpha": 1, "lora_dropout": 0.0, "use_rslora": False, "use_dora": False,
        "target_modules": _targets(sorted({s.owner for s in kept}), modules),
        "fan_in_fan_out": any(s.layout.value == "in_out" for s in kept),
        "bias": "all" if state and Extra.BIAS in state.train else "none",
        "modules_to_save": sorted(set(to_save)) or None, "init_lora_weights": True, "inference_mode": True,
        "task_type": None, "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
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
    from safetensors.torch import load_file

    if not (directory / CONFIG).is_file():
        raise AdapterFileError(f"{directory} holds no {CONFIG}: not a PEFT adapter folder")
    config = json.loads((directory / CONFIG).read_text())
    if (directory / WEIGHTS).is_file():
        return config, load_file(str(directory / WEIGHTS))
    if (directory / "adapter_model.bin").is_file():
        return config, torch.load(directory / "adapter_model.bin", map_location="cpu", weights_only=True)
    raise AdapterFileError(f"{directory} holds no {WEIGHTS}")


def _lora_vectors(config: dict[str, Any], tensors: dict[str, torch.Tensor], where: Path) -> dict[str, torch.Tensor]:
    if config.get("r") != 1 or config.get("use_dora") or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise AdapterFileError(
            f"{where} is a LoRA of rank {config.get('r')}" + (" with DoRA" if config.get("use_dora") else "")
            + (" with per-module ranks or alphas" if config.get("rank_pattern") or config.get("alpha_pattern") else "")
            + ": 1LoRA is the rank-1 update ΔW = b 1ᵀ (r = 1, lora_A constant), so it cannot be loaded as one"
        )
    scaling = float(config.get("lora_alpha", 1)) / (1.0 if config.get("use_rslora") else float(config["r"]))
    out = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        path = key[len(PREFIX):-len(".lora_A.weight")]
        if not torch.allclose(a, a.flatten()[0].expand_as(a), rtol=1e-6, atol=0):
            raise AdapterFileError(f"{where}: lora_A of {path} is not constant, so its update is not b 1ᵀ: not a 1LoRA adapter")
        b = tensors[f"{PREFIX}{path}.lora_B.weight"][:, 0].to(torch.float64) * float(a.flatten()[0]) * scaling
        out[adapter_name_for(path, "weight")] = b
    return out


def _miss_vectors(config: dict[str, Any], tensors: dict[str, torch.Tensor], where: Path) -> dict[str, torch.Tensor]:
    if config.get("r") != 1 or config.get("init_weights") == "bat":
        raise AdapterFileError(f"{where} is MiSS with r={config.get('r')}, init_weights={config.get('init_weights')!r}: "
                               "only r=1 (not 'bat') computes x.sum(-1) * miss_block, which is 1LoRA")
    out = {}
    for key, block in tensors.items():
        if key.endswith(".miss_block"):
            path = key[len(PREFIX):-len(".miss_block")]
            out[adapter_name_for(path, "weight")] = block[0].to(torch.float64)
    return out


def load_peft(gm: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load a PEFT adapter that is 1LoRA (what :func:`save_peft` writes, or a
    ``MissConfig(r=1)`` adapter) into an adapted module; checked like
    :func:`onelora_fx.load_adapter` (nothing changes on a mismatch).

    Example:
        >>> gm = ol.transform(model, ["*.q_proj", "*.v_proj"], example_kwargs=kw)   # doctest: +SKIP
        >>> ol.load_peft(gm, "my-miss-adapter")                                    # doctest: +SKIP
    """
    directory = Path(directory)
    config, tensors = _read(directory)
    kind = config.get("peft_type")
    if kind == "LORA":
        vectors = _lora_vectors(config, tensors, directory)
    elif kind == "MISS":
        vectors = _miss_vectors(config, tensors, directory)
    else:
        raise AdapterFileError(f"{directory} is a PEFT {kind} adapter; only LoRA with r = 1 and a constant lora_A, or "
                               "MiSS with r = 1, compute 1LoRA's update b 1ᵀ")
    for key, t in tensors.items():  # trained biases, norms, heads
        if ".lora_" not in key and not key.endswith(".miss_block"):
            vectors[key[len(PREFIX):].replace(".base_layer.", ".")] = t
    targets = adapter_parameters(gm)
    ready = {k: v.to(targets[k].dtype) if k in targets else v for k, v in vectors.items()}
    check_fits(targets, ready, str(directory))
    bad = [k for k, v in ready.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise AdapterFileError(f"{directory} holds non-finite values in {', '.join(bad)}; it was not loaded")
    with torch.no_grad():
        for name, p in targets.items():
            p.copy_(ready[name].to(p.device))
    settle(gm, targets)
    return gm
