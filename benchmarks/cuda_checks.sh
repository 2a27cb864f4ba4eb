#!/usr/bin/env bash
# The checks that need a GPU, as one run on a CUDA machine (CI has none): the CUDA tests,
# then the training-step benchmark on CUDA (LLaMA workload, bf16 autocast, every variant
# timed; the memory of the eager ones that matter most measured, each in its own process:
# a compiled variant's memory process compiles again).
#
#   bash benchmarks/cuda_checks.sh [OUT]     # OUT: where logs and results go (default benchmarks/out)
#
# It runs under the machine's own python3 and torch; the repository is put on PYTHONPATH
# (the compile backend registers itself on import), nothing is installed. Each step has a
# time limit, so that a slow step still leaves the others' output.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/out}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 - <<'EOF' 2>&1 | tee "$out/cuda_env.log"
import torch, transformers
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, "
      f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}")
EOF
timeout "${TESTS_S:-180}" python3 -m pytest -q -p no:cacheprovider -k cuda tests 2>&1 | tee "$out/cuda_tests.log"
timeout "${BENCH_S:-360}" python3 benchmarks/train_step.py --device cuda --workload llama \
  --rounds "${ROUNDS:-10}" --out "$out" --memory-variants \
  "BitFit floor (eager model)" "onelora_fx (eager)" "Listing 1 wrapper (eager)" "PEFT MiSS r=1 (same update as 1LoRA)" "PEFT LoRA r=1" "full fine-tuning" \
  2>&1 | tee "$out/train_step_cuda.log"
