"""Beyond one process: sweeps whose jobs run in other processes (Hydra launcher plugins: joblib, submitit), each
job its own folder inside the one sweep folder the launcher claimed; a submitit job of several tasks as one DDP
run, preempted and requeued; two torchrun "nodes" as one run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, TINY, run_script
from gpt.runs import read_metrics

pytestmark = pytest.mark.slow


def test_a_parallel_sweep_runs_its_jobs_in_one_sweep_folder(tmp_path):
    proc = run_script("train.py", "-m", "hydra/launcher=parallel", *TINY, "trainer.max_iters=2",
                      "trainer.eval_interval=2", "optimizer.lr=1e-3,3e-4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sweeps = [p for p in (tmp_path / "multirun").glob("*-*-*/*") if p.is_dir()]
    assert len(sweeps) == 1, sweeps  # the jobs did not claim folders of their own
    (sweep,) = sweeps
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    for job in ("0", "1"):
        assert (sweep / job / "checkpoints" / "last.pt").is_file()
    best = json.loads((sweep / "best_job.json").read_text())
    assert best["folder"].endswith(("/0", "/1")) and (sweep / "summary.md").is_file()
    hydra = (sweep / "0" / ".hydra" / "hydra.yaml").read_text()
    assert "hydra_plugins.hydra_joblib_launcher" in hydra and "n_jobs: 2" in hydra


def submitit_local(*args: str) -> list[str]:
    return ["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=30", *args]


def test_a_submitit_sweep_of_two_task_jobs_trains_each_as_one_ddp_run(tmp_path):
    """A -m sweep of 2 points whose jobs are multi-process (the supported way: tasks_per_node=2 with hardware=ddp):
    each job's tasks join one process group from submitit's environment (no torchrun), each optimizer step covers
    both ranks' batches, each job has its own folder in the one sweep folder, with its own setting."""
    proc = run_script("train.py", *submitit_local("hydra.launcher.tasks_per_node=2"), "hardware=ddp", *TINY,
                      "trainer.max_iters=2", "trainer.eval_interval=2", "trainer.batch_size=4", "optimizer.lr=1e-3,3e-4",
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (sweep,) = [p for p in (tmp_path / "multirun").glob("*-*-*/*") if p.is_dir()]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()) == ["0", "1"]
    lrs = []
    for job in (sweep / "0", sweep / "1"):
        rows = [r for r in read_metrics(job / "metrics.jsonl") if "train/tokens" in r]
        ckpt = torch.load(job / "checkpoints" / "last.pt", weights_only=True)
        assert rows[-1]["train/tokens"] == 2 * 4 * ckpt["config"]["model"]["block_size"] * 2  # steps x batch x block x 2
        lrs.append(ckpt["config"]["optimizer"]["lr"])
    assert sorted(lrs) == [3e-4, 1e-3]
    assert json.loads((sweep / "best_job.json").read_text())["folder"].endswith(("/0", "/1"))


def test_a_preempted_submitit_job_saves_is_requeued_and_continues(tmp_path):
    """SIGUSR2 (SLURM's preemption / time-limit notice) to the running task: the loop saves last.pt after its
    step, submitit requeues the job, and the new start continues from that last.pt in the same folder; the
    result equals an uninterrupted run's."""
    common = [*TINY, "hardware.autocast_dtype=float32", "trainer.max_iters=40", "trainer.eval_interval=2",
              "trainer.log_interval=1"]
    plain = run_script("train.py", *common, "hydra.run.dir=plain", cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr[-2000:]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *submitit_local(), *common], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not list(tmp_path.glob("multirun/*-*-*/*/0/checkpoints/last.pt")):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
            time.sleep(0.05)
        tasks = [pid for pid in subprocess.run(["pgrep", "-f", "submitit.core._submit"], capture_output=True,
                                               text=True).stdout.split()
                 if os.path.realpath(f"/proc/{pid}/cwd") == os.path.realpath(tmp_path)]  # this test's task only
        assert len(tasks) == 1, tasks
        os.kill(int(tasks[0]), signal.SIGUSR2)
        out, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-2000:]
    (job,) = tmp_path.glob("multirun/*-*-*/*/0")
    log = (job / "train.log").read_text()
    assert "requeued job: resuming from" in log, log[-2000:]
    steps = [r["step"] for r in read_metrics(job / "metrics.jsonl") if "train/loss" in r]
    assert steps == list(range(1, 41))  # one history: each step once
    a = torch.load(tmp_path / "plain" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(job / "checkpoints" / "last.pt", weights_only=True)
    assert b["step"] == 40
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_two_nodes_share_one_run_folder_and_equal_one_node_of_two(tmp_path):
    """Two torchrun invocations of one process each (two "nodes" on 127.0.0.1, c10d rendezvous) are one run:
    one folder (global rank 0 names it through torchrun's store; the nodes' clocks would each name their own),
    written by global rank 0 only, with the weights of the same two ranks started by one torchrun: exactly under
    DDP, to float32 summation order under FSDP (sharded across the nodes; AdamW, float32)."""
    common = [str(ROOT / "train.py"), *TINY, "optimizer=adamw", "hardware.autocast_dtype=float32", "model.dropout=0.0",
              "trainer.max_iters=4", "trainer.eval_interval=2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    (tmp_path / "one").mkdir()
    one = subprocess.run(["torchrun", "--standalone", "--nproc_per_node=2", *common, "hardware=ddp"],
                         cwd=tmp_path / "one", env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    (single,) = [p for p in (tmp_path / "one" / "outputs").glob("*-*-*/*") if p.is_dir()]
    a = torch.load(single / "checkpoints" / "last.pt", weights_only=True)
    for hardware in ("ddp", "fsdp"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        where = tmp_path / hardware
        where.mkdir()
        nodes = [subprocess.Popen(["torchrun", "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
                                   f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=two-nodes-{hardware}", *common,
                                   f"hardware={hardware}"], cwd=where, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
        for node in nodes:
            _, err = node.communicate(timeout=300)
            assert node.returncode == 0, err[-2000:]
        runs = [p for p in (where / "outputs").glob("*-*-*/*") if p.is_dir()]
        assert len(runs) == 1, runs
        (run,) = runs
        assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "val/loss" in r] == [2, 4]  # rank 0 only
        b = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
        assert b["config"]["hardware"].get("data_parallel", "ddp") == hardware
        for k in a["model"]:
            if hardware == "ddp":
                assert torch.equal(a["model"][k], b["model"][k]), k
            else:
                torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-5, atol=1e-6, msg=k)


def test_ddp_gradient_accumulation_equals_the_big_batch_step(tmp_path):
    """Under DDP the micro-steps before the last skip the gradient all-reduce (no_sync); the accumulated step
    of 2 micro-batches of 2 equals the step of one batch of 4 on each rank (same windows: a batch of 4 draws
    the 4 windows that two batches of 2 draw in turn). float32 and AdamW (Muon orthogonalises in bfloat16);
    tolerance: summation order only."""
    common = [*TINY, "optimizer=adamw", "hardware=ddp", "hardware.autocast_dtype=float32", "trainer.max_iters=3",
              "trainer.eval_interval=3", "model.dropout=0.0"]
    runs = {}
    for name, args in (("big", ["trainer.batch_size=4"]), ("accum", ["trainer.batch_size=2",
                                                                     "trainer.grad_accum_steps=2"])):
        proc = run_script("train.py", *common, *args, f"hydra.run.dir={name}", cwd=tmp_path, env={"OMP_NUM_THREADS": "1"},
                          prefix=["torchrun", "--standalone", "--nproc_per_node=2"])
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[name] = torch.load(tmp_path / name / "checkpoints" / "last.pt", weights_only=True)["model"]
    for k in runs["big"]:
        torch.testing.assert_close(runs["accum"][k], runs["big"][k], rtol=1e-5, atol=1e-6, msg=k)
