"""The parts of the GPU check that run without a GPU: benchmarks/gpu_bench.py's code path on the CPU (--device cpu
--tiny: the trainer's own step with the preset's optimizer), its table of spec-sheet peaks, and gpu_check.sh's time
limits against its 8-minute budget."""

import importlib.util
import json
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT


def bench_module():
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "benchmarks" / "gpu_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_gpu_bench_runs_on_cpu_with_a_tiny_model(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_bench.py"), "--device", "cpu", "--tiny"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["what"] for r in rows] == ["train", "loss", "decode", "decode"]
    train = rows[0]
    assert train["tokens_per_sec"] > 0 and 0 < train["mfu"] < 1 and train["compile"] is False
    # train.yaml's default optimizer, through the trainer; the vocabulary padded as the preset says (500 -> 512)
    assert train["optimizer"] == "MuonAdamW" and train["fused_adamw"] is False
    assert (train["vocab"], train["vocab_rows"], train["block"]) == (500, 512, 64)
    assert train["peak_source"].startswith("measured") and "measured bf16 matmul peak" in proc.stdout
    loss = rows[1]  # both ways compute the same loss (float32 on CPU: to summation order)
    assert loss["vocab_rows"] == 512 and loss["fused_ms"] > 0 and loss["compiled_ms"] > 0
    assert loss["fused_loss"] == pytest.approx(loss["compiled_loss"], rel=1e-5) and "faster" in proc.stdout
    assert [r["batch"] for r in rows[2:]] == [1, 4] and all(r["new_tokens"] == 16 for r in rows[2:])


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835), ("NVIDIA H200", 989),
    ("NVIDIA GH200 480GB", 989), ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A100-PCIE-40GB", 312), ("NVIDIA L4", 121),
    ("NVIDIA L40S", 362), ("NVIDIA GeForce RTX 4090", 165), ("Tesla T4", None), ("cpu", None)])
def test_spec_peak_by_device_name(name, tflops):
    from gpt.trainer import spec_peak_flops

    assert spec_peak_flops(name) == (None if tflops is None else tflops * 1e12)


def test_train_mfu_divides_by_the_spec_peak_on_a_known_gpu_else_a_measured_one():
    """train.py's MFU: a named GPU in bf16/fp16 -> its spec sheet's dense peak (no measurement); a GPU in float32,
    an unknown GPU or a CPU -> the matmul peak measured on the device (here the CPU path, which runs)."""
    from gpt.trainer import peak_flops_for

    assert peak_flops_for("cuda:0", torch.bfloat16, name="NVIDIA H100 80GB HBM3") == \
        (989e12, "spec sheet dense bf16 peak of NVIDIA H100 80GB HBM3")
    assert peak_flops_for("cuda", torch.float16, name="NVIDIA A100-SXM4-80GB")[0] == 312e12
    peak, where = peak_flops_for("cpu", None)
    assert peak > 0 and where == "measured matmul peak on cpu"


def test_gpu_check_time_limits_fit_its_budget():
    text = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    limits = {k: int(v) for k, v in re.findall(r"^(\w+_S)=(\d+)", text, re.M)}
    assert limits["BUDGET_S"] <= 480  # 8 minutes on one H100/H200
    # every command of the script runs under `timeout`, and the parts' limits leave the environment lines room
    assert '"$PYTEST_TIMEOUT_S" python -m pytest' in text
    assert '"$BENCH_TIMEOUT_S" python benchmarks/gpu_bench.py' in text
    fixed = sum(int(t) for t in re.findall(r"timeout (\d+) ", text))
    assert fixed + limits["PYTEST_TIMEOUT_S"] + limits["BENCH_TIMEOUT_S"] <= limits["BUDGET_S"]
