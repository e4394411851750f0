"""Sweeps whose jobs run in other processes (Hydra launcher plugins): each job its own folder inside the one
sweep folder the launcher claimed, and the sweep's summary still written."""

from __future__ import annotations

import json

import pytest

from conftest import TINY, run_script

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
