"""A resumed run continues its own history: `resume=<run folder or its last.pt>` runs in that folder
(gpt.config.resume_in_place), and metrics.jsonl keeps the rows up to the checkpoint's step (history_until)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import TINY
from inprocess import run_here
from gpt.config import history_until, resume_in_place
from gpt.runs import read_metrics


def fake_run(folder: Path) -> Path:
    (folder / ".hydra").mkdir(parents=True)
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "last.pt").write_bytes(b"x")
    (folder / "checkpoints" / "best.pt").write_bytes(b"x")
    (folder / "metrics.jsonl").write_text('{"step": 1}\n')
    return folder


def test_resume_of_a_run_folder_or_its_last_pt_runs_in_that_folder(tmp_path):
    run = fake_run(tmp_path / "outputs" / "d" / "t")
    for value in (str(run), str(run / "checkpoints" / "last.pt")):
        argv = resume_in_place(["train.py", f"resume={value}", "trainer.max_iters=9"])
        assert argv[:3] == ["train.py", f"resume={value}", "trainer.max_iters=9"]
        assert argv[3:] == [f"hydra.run.dir='{run}'", "hydra.output_subdir='.hydra/resume-1'"]
    (run / ".hydra" / "resume-1").mkdir()  # a second resume keeps the first one's record
    assert resume_in_place(["t", f"resume={run}"])[-1] == "hydra.output_subdir='.hydra/resume-2'"


@pytest.mark.parametrize("case", ["best.pt", "copied file", "sweep", "own run dir", "not a run", "no resume"])
def test_resume_elsewhere_keeps_the_command_line(tmp_path, case):
    run = fake_run(tmp_path / "run")
    (tmp_path / "copy.pt").write_bytes(b"x")
    argv = {"best.pt": ["t", f"resume={run}/checkpoints/best.pt"],
            "copied file": ["t", f"resume={tmp_path}/copy.pt"],
            "sweep": ["t", "-m", f"resume={run}"],
            "own run dir": ["t", f"resume={run}", "hydra.run.dir=elsewhere"],
            "not a run": ["t", f"resume={tmp_path}"],
            "no resume": ["t", "trainer.max_iters=3"]}[case]
    assert resume_in_place(argv) == argv


def test_history_until_keeps_the_rows_up_to_the_checkpoint_and_drops_summaries(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 2, "train/loss": 3.0}, {"step": 4, "val/loss": 2.5}, {"step": 4, "summary/val_loss": 2.5},
            {"step": 6, "train/loss": 2.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 8, "train/lo')  # a line cut by a kill
    history_until(path, 4)
    assert read_metrics(path) == rows[:2]
    assert not list(tmp_path.glob(".*tmp*"))


@pytest.mark.slow
def test_a_resumed_run_continues_in_its_folder_and_equals_the_uninterrupted_run(tmp_path):
    common = [*TINY, "trainer.eval_interval=4", "trainer.log_interval=2", "scheduler.schedule.total_iters=8",
              "scheduler.schedule.warmup_iters=2"]
    full = run_here("train.py", *common, "trainer.max_iters=8", "hydra.run.dir=full", cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-2000:]
    half = run_here("train.py", *common, "trainer.max_iters=4", cwd=tmp_path)
    assert half.returncode == 0, half.stderr[-2000:]
    (run,) = [p.parent.parent for p in tmp_path.glob("outputs/*-*-*/*/checkpoints/last.pt")]
    rest = run_here("train.py", *common, "trainer.max_iters=8", f"resume={run}", cwd=tmp_path)
    assert rest.returncode == 0, rest.stderr[-2000:]
    assert [p.parent.parent for p in tmp_path.glob("outputs/*-*-*/*/checkpoints/last.pt")] == [run]  # no new folder
    assert (run / ".hydra" / "resume-1" / "overrides.yaml").is_file()
    assert "trainer.max_iters=4" in (run / ".hydra" / "overrides.yaml").read_text()  # the original record stays
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("time", "eval_seconds", "train/data_seconds")  # noqa: E731
                           and "per_sec" not in k and not k.startswith("summary/") and k != "train/mfu"} for r in rows]
    mine, whole = read_metrics(run / "metrics.jsonl"), read_metrics(tmp_path / "full" / "metrics.jsonl")
    assert strip(mine) == strip(whole)  # one history: steps 2..8 once each, the same values
    assert sum(1 for r in mine if "summary/val_loss" in r) == 1
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert last["step"] == 8 and last["resumed_from"] == str(run / "checkpoints" / "last.pt")


def test_a_resume_in_another_precision_is_named():
    from gpt.run import precision_change
    from gpt.trainer import Precision

    fp32 = Precision("cpu", "float32")
    assert precision_change({"precision": "fp32"}, fp32, "float32") is None
    assert precision_change({}, fp32, "auto") is None  # checkpoints from before the field: nothing to compare
    message = precision_change({"precision": "bfloat16 autocast"}, fp32, "auto")
    assert message.startswith("the resumed run trained in bfloat16 autocast; it continues in fp32 "
                              "(hardware.autocast_dtype=auto)")
