"""Shared test settings: offline libraries, caches and W&B folders inside temp dirs, tiny configs."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Tiny model and loop for end-to-end runs of the real entry scripts (seconds on 2 CPU cores).
TINY = [
    "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
    "trainer.max_iters=6", "trainer.eval_interval=3", "trainer.eval_iters=2", "trainer.log_interval=2",
    "trainer.batch_size=4", "stage.sample_tokens=20",
]


@pytest.fixture(autouse=True)
def _offline_env(monkeypatch, tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "cache"
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("GPT_CACHE_DIR", str(cache))  # token caches shared by the tests of one session
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    # gpt.native's compiled kernels: one build per machine, also for subprocesses that get a HOME of their own
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", os.environ.get("TORCH_EXTENSIONS_DIR")
                       or str(Path.home() / ".cache" / "torch_extensions"))
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path_factory.getbasetemp() / "wandb"))


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread avoids thread-pool contention on a 2-core machine (so do the entry
    scripts that end-to-end tests start in subprocesses: run_script sets OMP_NUM_THREADS=1)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run_script(script: str, *args: str, cwd: Path, env: dict | None = None, timeout: int = 300,
               prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run an entry script of the project (train.py, infer.py, ...) in `cwd`; returns the finished process."""
    # one intra-op thread unless the caller says otherwise: tiny models, and with pytest-xdist one worker per core
    # already uses every core (two threads per process on a busy 2-core machine made a tiny model's training
    # steps up to 40x slower: 208 against 8,133 tokens/s measured)
    full_env = {"OMP_NUM_THREADS": "1", **os.environ, **(env or {})}
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    cmd = (prefix or [sys.executable]) + [str(ROOT / script), *args]
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def _closed_streams() -> set[str]:
    """The standard streams, and the streams of the handlers on loggers, that are closed."""
    bad = {name for name in ("stdout", "stderr", "__stdout__", "__stderr__")
           if getattr(sys, name) is not None and getattr(sys, name).closed}
    loggers = [logging.root, *(g for g in logging.root.manager.loggerDict.values() if isinstance(g, logging.Logger))]
    for logger in loggers:
        for handler in logger.handlers:
            if getattr(getattr(handler, "stream", None), "closed", False):
                bad.add(f"logger {logger.name!r}: {handler!r}")
    return bad


@pytest.fixture(autouse=True)
def _streams_left_open(request):
    """Fail the test that closes a standard stream or leaves a log handler on a closed stream (a capsys stream,
    say): the tests after it would fail with 'I/O operation on closed file' or '--- Logging error ---' far
    from the cause. Costs ~0.1 ms a test."""
    before = _closed_streams()
    yield
    new = _closed_streams() - before
    assert not new, f"{request.node.nodeid} closed or left handlers on closed streams: {sorted(new)}"
