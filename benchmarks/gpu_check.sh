#!/usr/bin/env bash
# One check of the CUDA path on a GPU machine, everything into one log, in under 8 minutes on one H100/H200:
# the environment, the CUDA tests (pytest -m gpu), then gpt2_small training tokens/s and MFU and decode speed.
#   bash benchmarks/gpu_check.sh [log file]      (from the repository root, in the project's virtualenv)
# Each part has its own time limit; together with the environment lines they stay inside the 8 minutes
# (tests/test_gpu_bench.py checks the sum), so a hung part cannot take the whole budget.
set -uo pipefail
cd "$(dirname "$0")/.."
log="${1:-gpu_check.log}"
BUDGET_S=480          # the whole script
PYTEST_TIMEOUT_S=240  # pytest -m gpu: a few tiny train.py runs (one compiled), torchrun, serve, compile checks
BENCH_TIMEOUT_S=200   # gpt2_small: compilation (~1 min), 35 training steps, fused vs compiled loss, 2 x 256 decode steps
{
  echo "== environment"
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "nvidia-smi not found"
  timeout 30 python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
  echo "== pytest -m gpu (limit ${PYTEST_TIMEOUT_S} s)"
  timeout "$PYTEST_TIMEOUT_S" python -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py
  echo "pytest exit code $? (124: over its time limit)"
  echo "== gpt2_small training and decoding (limit ${BENCH_TIMEOUT_S} s)"
  timeout "$BENCH_TIMEOUT_S" python benchmarks/gpu_bench.py
  echo "gpu_bench exit code $? (124: over its time limit)"
  echo "== done in ${SECONDS} s (budget ${BUDGET_S} s)"
} 2>&1 | tee "$log"
