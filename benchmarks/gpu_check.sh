#!/usr/bin/env bash
# One check of the CUDA path on a GPU machine, everything into one log (under 8 minutes on one H100/H200):
# the environment, the CUDA tests (pytest -m gpu), then gpt2_small training tokens/s and MFU and decode speed.
#   bash benchmarks/gpu_check.sh [log file]      (from the repository root, in the project's virtualenv)
set -uo pipefail
cd "$(dirname "$0")/.."
log="${1:-gpu_check.log}"
{
  echo "== environment"
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "nvidia-smi not found"
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
  echo "== pytest -m gpu"
  timeout 300 python -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py
  echo "pytest exit code $?"
  echo "== gpt2_small training and decoding"
  timeout 240 python benchmarks/gpu_bench.py
  echo "gpu_bench exit code $?"
} 2>&1 | tee "$log"
