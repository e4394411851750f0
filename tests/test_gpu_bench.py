"""benchmarks/gpu_bench.py's code path on the CPU (--device cpu --tiny), so the GPU check script's benchmark is
exercised where there is no GPU."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_gpu_bench_runs_on_cpu_with_a_tiny_model(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_bench.py"), "--device", "cpu", "--tiny"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["what"] for r in rows] == ["train", "decode", "decode"]
    train = rows[0]
    assert train["tokens_per_sec"] > 0 and 0 < train["mfu"] < 1 and train["compile"] is False
    assert [r["batch"] for r in rows[1:]] == [1, 4] and all(r["new_tokens"] == 16 for r in rows[1:])
