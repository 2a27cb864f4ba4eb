"""AOTInductor: the merged model as a compiled package, run without the model's code.

    python benchmarks/aoti.py [--steps 50]

A tiny LLaMA (hidden 256, 4 layers, vocabulary 1024) adapted with 1LoRA (random ``b``) is
merged and exported (``ol.export``), compiled with
``torch._inductor.aoti_compile_and_package`` into a ``.pt2`` package, and loaded with
``torch._inductor.aoti_load_package`` in a fresh process that imports only torch (no
transformers, no onelora_fx). Reported: the build time, the loaded package's output against
the eager adapted module, and forward latency (median of ``--steps`` calls, batch 4 x 64
tokens, side by side in one process) of eager, ``torch.compile`` of the merged program's
module, and the package. Results: ``benchmarks/out/aoti.json`` (``--update-results``: also
``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

_RUN = """
import json, statistics, sys, time, torch
package, check, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
runner = torch._inductor.aoti_load_package(package)
data = torch.load(check)
with torch.no_grad():
    out = runner(input_ids=data["ids"])
    times = []
    for _ in range(steps):
        t = time.perf_counter(); runner(input_ids=data["ids"]); times.append(time.perf_counter() - t)
logits = out["logits"] if isinstance(out, dict) else out[0]
print(json.dumps({"max_abs_diff": (logits - data["logits"]).abs().max().item(), "scale": data["logits"].abs().max().item(),
                  "median_s": statistics.median(times),
                  "foreign_modules": sorted({m.split(".")[0] for m in sys.modules} & {"transformers", "onelora_fx"})}))
"""


def median_time(fn, steps: int) -> float:
    times = []
    with torch.no_grad():
        fn()
        for _ in range(steps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--update-results", action="store_true")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    import transformers

    import onelora_fx as ol

    torch.manual_seed(0)
    config = transformers.LlamaConfig(num_hidden_layers=4, hidden_size=256, intermediate_size=512, num_attention_heads=8,
                                      num_key_value_heads=4, vocab_size=1024, use_cache=False)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 1024, (4, 64))
    gm = ol.transform(model, "all-linear", example_kwargs={"input_ids": ids}).eval()
    with torch.no_grad():
        for b in ol.adapter_parameters(gm).values():
            b.normal_(0, 0.02)
    ep = ol.export(gm, example_kwargs={"input_ids": ids})
    work = Path(tempfile.mkdtemp(prefix="aoti_"))
    t = time.perf_counter()
    package = torch._inductor.aoti_compile_and_package(ep, package_path=str(work / "model.pt2"))
    info: dict = {"build_s": round(time.perf_counter() - t, 1), "package_bytes": Path(package).stat().st_size}
    with torch.no_grad():
        want = gm(input_ids=ids).logits
    torch.save({"ids": ids, "logits": want}, work / "check.pt")
    run = subprocess.run([sys.executable, "-c", _RUN, package, str(work / "check.pt"), str(args.steps)],
                         capture_output=True, text=True, check=True)
    fresh = json.loads(run.stdout.strip().splitlines()[-1])
    info.update({"fresh_process_max_abs_diff": fresh["max_abs_diff"], "logits_scale": fresh["scale"],
                 "fresh_process_imports": fresh["foreign_modules"] or "torch only"})
    runner = torch._inductor.aoti_load_package(package)
    program = ep.module()
    compiled = torch.compile(program)
    info["median_s"] = {
        "eager (adapted module)": median_time(lambda: gm(input_ids=ids), args.steps),
        "eager (merged program)": median_time(lambda: program(input_ids=ids), args.steps),
        "torch.compile (merged program)": median_time(lambda: compiled(input_ids=ids), args.steps),
        "AOTInductor package": median_time(lambda: runner(input_ids=ids), args.steps),
        "AOTInductor package, fresh process": fresh["median_s"],
    }
    info.update(torch=torch.__version__, threads=torch.get_num_threads(), batch="4 x 64 tokens")
    print(json.dumps(info, indent=1))
    (HERE / "out").mkdir(exist_ok=True)
    (HERE / "out" / "aoti.json").write_text(json.dumps(info, indent=1) + "\n")
    if args.update_results:
        (HERE / "results" / "aoti.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


if __name__ == "__main__":
    main()
