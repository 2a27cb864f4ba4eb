"""``merge_checkpoint``: fold an adapter into a saved checkpoint, shard by shard.

:func:`onelora_fx.merge` needs the adapted model in memory. A checkpoint bigger than the
memory at hand (torchtune's ``get_merged_lora_ckpt`` and PEFT's merge have the same
limit) can be merged from its files: each safetensors shard is read, every weight the
adapter trained is folded with the same :func:`onelora_fx.fold.fold` as
:func:`onelora_fx.merge` (float32, float64 for float64 weights, rounded once, the same
finiteness checks), trained extras (``train=`` norms, biases, heads) replace the
checkpoint's tensors, and each shard is written tensor by tensor: the header as it was,
untouched tensors copied byte for byte, each changed tensor loaded alone and folded in
place: one tensor is in memory at a time, whatever the shard size. The other files
(``config.json``, the shard index, the tokenizer) are copied. The output appears only when
every shard is written (a temporary folder renamed at the end), so a failure leaves
nothing half-merged.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from ..adapters.files import AdapterFileError, read_adapter
from ..fold import MergeError, check, fold_into
from ..records import Layout

__all__ = ["merge_checkpoint"]

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


def _adapter(path: Path) -> tuple[dict[str, tuple[torch.Tensor, Layout]], dict[str, torch.Tensor]]:
    """``({weight name: (b, layout)}, {extra name: tensor})`` of an adapter file (ours) or
    a PEFT folder holding a 1LoRA adapter."""
    if path.is_dir():
        from ..adapters.peft import read_peft

        config, vectors, extras = read_peft(path)
        layout = Layout.IN_OUT if config.get("fan_in_fan_out") else Layout.OUT_IN
        folds = {name.rpartition(".")[0] + ".weight": (b, layout) for name, b in vectors.items()}
        return folds, {name: t for name, (_, t) in extras.items()}
    tensors, meta = read_adapter(path)
    sites = json.loads(meta.get("sites", "[]"))
    folds = {s["weight"]: (tensors[s["vector"]], Layout(s["layout"])) for s in sites}
    vectors = {s["vector"] for s in sites}
    return folds, {k: t for k, t in tensors.items() if k not in vectors}


def _shards(base: Path) -> list[Path]:
    index = base / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [base / n for n in names]
    shards = sorted(base.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"{base} holds no .safetensors checkpoint (model.safetensors or its shards)")
    return shards


_CHUNK = 64 << 20
#: safetensors dtype names of the tensors a fold or an extra can go into
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _merge_shard(src: Path, dst: Path, folds: dict[str, tuple[torch.Tensor, Layout]], extras: dict[str, torch.Tensor]) -> None:
    """Write ``src`` to ``dst`` tensor by tensor: the same header (names, dtypes, shapes,
    offsets, metadata), the bytes of every untouched tensor copied as they are, and each
    folded weight or trained extra loaded alone, changed in place and written. One
    tensor in memory at a time."""
    with open(src, "rb") as fin:
        size = int.from_bytes(fin.read(8), "little")
        header_bytes = fin.read(size)
    header = json.loads(header_bytes)
    entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"][0])
    # plain reads, not safetensors' memory map: mapped pages a read touches stay in the
    # process's resident memory, which would grow to the shard's size
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fout.write(size.to_bytes(8, "little") + header_bytes)
        for name, info in entries:
            begin, end = info["data_offsets"]
            if name in folds or name in extras:
                if info["dtype"] not in _DTYPES:
                    raise MergeError(f"{name} is stored as {info['dtype']}, which a fold cannot go into")
                fin.seek(8 + size + begin)
                raw = bytearray(end - begin)
                fin.readinto(raw)
                tensor = torch.frombuffer(raw, dtype=_DTYPES[info["dtype"]]).reshape(info["shape"]) if raw else \
                    torch.empty(info["shape"], dtype=_DTYPES[info["dtype"]])
                if name in folds:
                    b, layout = folds[name]
                    b = b.to(tensor.dtype)
                    problem = check(tensor, b, layout, name)
                    if problem is not None:
                        raise MergeError(f"{problem}; nothing was written")
                    fold_into(tensor, b, layout)  # what fold computes, without a second copy
                else:
                    value = extras[name]
                    if tuple(value.shape) != tuple(tensor.shape):
                        raise AdapterFileError(f"the adapter's {name} is {tuple(value.shape)}, the checkpoint's "
                                               f"{tuple(tensor.shape)}: is it an adapter of this model?")
                    tensor.copy_(value)
                data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
                if data.nbytes != end - begin:
                    raise MergeError(f"{name}: {data.nbytes} bytes where {src.name} holds {end - begin}")
                fout.write(data)
                del tensor, data, raw
            else:
                fin.seek(8 + size + begin)
                left = end - begin
                while left:
                    chunk = fin.read(min(left, _CHUNK))
                    fout.write(chunk)
                    left -= len(chunk)


def merge_checkpoint(base: PathLike, adapter: PathLike, out: PathLike, *,
                     progress: Optional[Callable[[str], None]] = None) -> Path:
    """Write ``base`` (a safetensors checkpoint folder, e.g. what ``save_pretrained``
    writes) with ``adapter`` (an adapter file or a PEFT 1LoRA folder) folded in, to the
    new folder ``out``, one shard at a time. Equal bit for bit to :func:`onelora_fx.merge`
    of the adapted model, holding one tensor in memory at a time. ``progress`` is called with a line per shard written (the
    command line prints them).

    Examples:
        >>> ol.merge_checkpoint("llama-8b", "adapter.safetensors", "llama-8b-finetuned")   # doctest: +SKIP

    Raises:
        FileNotFoundError: ``base`` holds no safetensors checkpoint.
        FileExistsError: ``out`` exists and is not an empty folder.
        AdapterFileError: the adapter is unreadable, not 1LoRA, or names a tensor the
            checkpoint does not hold (a head tied to the embedding is not stored: merge
            the loaded model with :func:`onelora_fx.merge`).
        MergeError: a ``b`` or a folded weight is not finite. Nothing is written then.
    """
    base, adapter_path, out = Path(base), Path(adapter), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder: give a new folder for the merged checkpoint")
    shards = _shards(base)
    folds, extras = _adapter(adapter_path)
    from safetensors import safe_open

    where: dict[str, Path] = {}
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            where.update({k: shard for k in f.keys()})
    missing = sorted((set(folds) | set(extras)) - set(where))
    if missing:
        raise AdapterFileError(
            f"{adapter_path} trained {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}, which {base} does not "
            "store (a head tied to the input embedding is saved once, as the embedding): load the model, "
            "ol.load(model, adapter) and ol.merge it instead")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for i, shard in enumerate(shards, 1):
            start = time.perf_counter()
            _merge_shard(shard, tmp / shard.name, folds, extras)
            line = f"merged {shard.name} ({i}/{len(shards)}) in {time.perf_counter() - start:.1f}s"
            log.info("%s", line)
            if progress is not None:
                progress(line)
        for item in base.iterdir():  # config, index, tokenizer: as they are
            if item.is_file() and item.suffix != ".safetensors":
                shutil.copy2(item, tmp / item.name)
        if out.exists():  # an empty folder the caller made
            out.rmdir()
        tmp.replace(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
