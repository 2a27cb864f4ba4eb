"""Offline merge of a checkpoint of at least 2 GB: peak memory against the largest shard.

    python benchmarks/offline_merge.py [--gb 2.2] [--shards 5]

Writes a synthetic safetensors checkpoint (float32 ``[4096, 4096]`` "linear" weights in
``--shards`` shards with an index, as ``save_pretrained`` shards a model) and an adapter
file with a ``b`` for every weight (in a child process), then runs ``onelora-fx merge`` in
another child and reads that child's peak resident memory (``ru_maxrss``). The parent holds
no tensors until then: a forked child's high-water mark starts at its parent's size.
Target: peak <= largest shard + 300 MB (the interpreter with torch and onelora_fx imported
is about 320 MB of it). Also checks one folded weight against ``W + b 1ᵀ`` computed here in float64.
Results: ``benchmarks/out/offline_merge.json`` (``--update-results``: also ``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIDE = 4096


def build(folder: Path, gb: float, shards: int) -> tuple[dict, Path]:
    import torch
    from safetensors.torch import save_file

    n = int(gb * 1e9 / (SIDE * SIDE * 4)) + 1
    per = -(-n // shards)
    weight_map, sizes = {}, []
    g = torch.Generator().manual_seed(0)
    vectors, sites = {}, []
    for s in range(shards):
        names = [f"layers.{i}.proj.weight" for i in range(s * per, min(n, (s + 1) * per))]
        tensors = {name: torch.randn(SIDE, SIDE, generator=g) * 0.02 for name in names}
        shard = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file(tensors, str(folder / shard), metadata={"format": "pt"})
        sizes.append((folder / shard).stat().st_size)
        weight_map.update({name: shard for name in names})
        for name in names:
            owner = name.rpartition(".")[0]
            vectors[f"{owner}.onelora_b"] = torch.randn(SIDE, generator=g) * 0.02
            sites.append({"site": owner, "vector": f"{owner}.onelora_b", "weight": name, "out_features": SIDE,
                          "in_features": SIDE, "layout": "out_in"})
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": sum(sizes)},
                                                                    "weight_map": weight_map}))
    (folder / "config.json").write_text("{}")
    adapter = folder.parent / "adapter.safetensors"
    from onelora_fx.adapters.files import FORMAT

    save_file(vectors, str(adapter), metadata={"format": FORMAT, "pattern": "all", "train": "[]", "sites": json.dumps(sites)})
    return {"weights": n, "shards": shards, "checkpoint_bytes": sum(sizes), "largest_shard_bytes": max(sizes)}, adapter


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=2.2)
    parser.add_argument("--shards", type=int, default=5)
    parser.add_argument("--update-results", action="store_true")
    parser.add_argument("--build", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.build:  # the child that writes the checkpoint
        info, _ = build(Path(args.build), args.gb, args.shards)
        print(json.dumps(info))
        return info
    work = Path(tempfile.mkdtemp(prefix="offline_merge_"))
    try:
        base = work / "base"
        base.mkdir()
        t = time.perf_counter()
        made = subprocess.run([sys.executable, __file__, "--build", str(base), "--gb", str(args.gb), "--shards",
                               str(args.shards)], capture_output=True, text=True, check=True)
        info = json.loads(made.stdout.strip().splitlines()[-1])
        adapter = work / "adapter.safetensors"
        info["build_s"] = round(time.perf_counter() - t, 1)
        # the command as `onelora-fx merge` runs it, reporting its own peak (RUSAGE_SELF: the
        # parent's RUSAGE_CHILDREN would take the build child's peak as well)
        launcher = ("import resource, sys; from onelora_fx.tools.cli import main; rc = main(sys.argv[1:]); "
                    "print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
        t = time.perf_counter()
        run = subprocess.run([sys.executable, "-c", launcher, "merge", str(base), str(adapter), str(work / "out")],
                             capture_output=True, text=True)
        info["merge_s"] = round(time.perf_counter() - t, 1)
        if run.returncode != 0:
            raise SystemExit(run.stderr)
        peak = int(next(ln for ln in run.stdout.splitlines() if ln.startswith("MAXRSS")).split()[1]) * 1024  # KiB
        info["peak_rss_bytes"] = peak
        info["peak_minus_largest_shard_mb"] = round((peak - info["largest_shard_bytes"]) / 1e6, 1)
        info["target"] = "peak <= largest shard + 300 MB"
        info["met"] = peak <= info["largest_shard_bytes"] + 300e6
        import torch
        from safetensors import safe_open

        with safe_open(str(base / f"model-00001-of-{args.shards:05d}.safetensors"), framework="pt") as f:
            w = f.get_tensor("layers.0.proj.weight")
        with safe_open(str(adapter), framework="pt") as f:
            b = f.get_tensor("layers.0.proj.onelora_b")
        with safe_open(str(work / "out" / f"model-00001-of-{args.shards:05d}.safetensors"), framework="pt") as f:
            got = f.get_tensor("layers.0.proj.weight")
        want = (w.double() + b.double()[:, None]).float()
        info["layers.0 folded exactly"] = bool(torch.equal(got, want))
        info["torch"] = torch.__version__
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(info, indent=1))
    (HERE / "out").mkdir(exist_ok=True)
    (HERE / "out" / "offline_merge.json").write_text(json.dumps(info, indent=1) + "\n")
    if args.update_results:
        (HERE / "results" / "offline_merge.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


if __name__ == "__main__":
    main()
