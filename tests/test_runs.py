"""Finding runs (gpt.runs): the `latest` links, listing run folders, the best job of a sweep, and the line that
says which checkpoint file was loaded and why (gpt.checkpoint)."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY
from inprocess import run_here
from gpt.checkpoint import choose_checkpoint, load_checkpoint, save_checkpoint
from gpt.runs import (_restore_latest, describe_run, main, point_latest, rank_jobs, run_folders, runs_table,
                      summarise_sweep)


def fake_run(folder: Path, rows: list[dict], overrides=("optimizer.lr=0.001",), name="train", mtime=None) -> Path:
    """A run folder as Hydra and MetricsFile leave it (no checkpoint needed to list it)."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "hydra.yaml").write_text(
        f"hydra:\n  job:\n    name: {name}\n  runtime:\n    choices:\n      model: nano\n      stage: pretrain\n")
    (folder / ".hydra" / "config.yaml").write_text("model:\n  n_layer: 2\n  n_embd: 32\ntrainer:\n  max_iters: 8\n")
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if mtime is not None:
        os.utime(folder / ".hydra" / "config.yaml", (mtime, mtime))
    return folder


def finished(best: float, final: float, **summary) -> list[dict]:
    return [{"step": 4, "train/tokens": 400, "train/tokens_per_sec": 1000.0},
            {"step": 4, "val/loss": best}, {"step": 8, "val/loss": final},
            {"step": 8, **{f"summary/{k}": v for k, v in {"val_loss": final, "best_val_loss": best,
                                                           "tokens_per_sec": 900.0, **summary}.items()}}]


# ---- latest -------------------------------------------------------------------------------------------------
def test_latest_is_a_relative_link_replaced_atomically(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a, b = Path("outputs/d/t1"), Path("outputs/d/t2")
    a.mkdir(parents=True), b.mkdir(parents=True)
    assert point_latest("outputs", a) == Path("outputs/latest")
    assert os.readlink("outputs/latest") == "d/t1"  # relative: the outputs folder can move
    point_latest("outputs", b)
    assert os.readlink("outputs/latest") == "d/t2" and Path("outputs/latest").resolve() == b.resolve()
    assert sorted(p.name for p in Path("outputs").iterdir()) == ["d", "latest"]  # no temp link left
    assert point_latest("outputs", tmp_path / "elsewhere") is None  # a run folder outside outputs/: untouched
    assert os.readlink("outputs/latest") == "d/t2"


def test_latest_goes_back_when_the_run_folder_was_removed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("outputs/d/old").mkdir(parents=True)
    point_latest("outputs", "outputs/d/old")
    point_latest("outputs", "outputs/d/new")  # the new run folder is gone already (refused on bad input)
    _restore_latest(Path("outputs/latest"), "d/new", "d/old")
    assert os.readlink("outputs/latest") == "d/old"
    Path("outputs/d/old").rmdir(), Path("outputs/d").rmdir()
    _restore_latest(Path("outputs/latest"), "d/old", None)
    assert not Path("outputs").exists()  # nothing left: no dangling link, no empty folder


def test_latest_is_kept_while_its_run_folder_exists(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("outputs/d/new").mkdir(parents=True)
    point_latest("outputs", "outputs/d/new")
    _restore_latest(Path("outputs/latest"), "d/new", None)
    assert os.readlink("outputs/latest") == "d/new"


# ---- listing ------------------------------------------------------------------------------------------------
def test_listing_reads_the_files_of_each_run(tmp_path, capsys):
    done = fake_run(tmp_path / "outputs" / "d" / "t1", finished(1.5, 1.6), mtime=1000)
    running = fake_run(tmp_path / "outputs" / "d" / "t2", finished(1.7, 1.8)[:3], mtime=2000)
    with open(running / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "val/lo')  # a kill in the middle of a write
    broken = fake_run(tmp_path / "multirun" / "d" / "t" / "0", [], mtime=3000)
    (broken / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    os.symlink("d/t2", tmp_path / "outputs" / "latest")

    folders = run_folders([tmp_path / "outputs", tmp_path / "multirun"])
    assert folders == [done, running, broken]  # newest last; the latest link is not a second row
    rows = {Path(r["folder"]).name: r for r in map(describe_run, folders)}
    assert rows["t1"] | {"folder": None, "started": None} == {
        "folder": None, "started": None, "script": "train", "stage": "pretrain", "model": "nano n_layer=2 n_embd=32",
        "overrides": ["optimizer.lr=0.001"], "max_iters": 8, "step": 8, "final_val_loss": 1.6, "best_val_loss": 1.5,
        "monitor": None, "monitor_mode": None, "best_monitor": None, "tokens_per_sec": 900.0, "status": "finished"}
    assert rows["t2"]["status"] == "unfinished" and rows["t2"]["best_val_loss"] == 1.7 and rows["t2"]["step"] == 8
    assert rows["0"]["status"] == "unreadable" and "line 2 is not JSON" in rows["0"]["error"]

    table = runs_table([rows["t1"], rows["t2"], rows["0"]]).splitlines()
    assert table[0].split()[:3] == ["folder", "script", "model"]
    assert "8/8" in table[1] and "1.6000" in table[1] and table[1].endswith("finished")
    assert table[3].endswith("unreadable (ValueError: metrics.jsonl line 2 is not JSON)")

    assert main([str(tmp_path / "outputs"), "--json"]) == 0
    assert [r["status"] for r in json.loads(capsys.readouterr().out)] == ["finished", "unfinished"]
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "'" + str(tmp_path / "nowhere") + "' is not a folder" in capsys.readouterr().err


def test_the_monitored_metric_gets_a_column_where_a_run_names_one(tmp_path):
    run = fake_run(tmp_path / "r", finished(1.5, 1.6, monitor="val/exact_match", monitor_mode="max", best_monitor=0.25))
    table = runs_table([describe_run(run)])
    assert "best monitored" in table and "val/exact_match 0.2500" in table


# ---- the best job of a sweep --------------------------------------------------------------------------------
def test_jobs_rank_by_the_monitored_metric_in_its_direction():
    jobs = [{"folder": "0", "monitor": "val/exact_match", "monitor_mode": "max", "best_monitor": 0.2, "best_val_loss": 1.0},
            {"folder": "1", "monitor": "val/exact_match", "monitor_mode": "max", "best_monitor": 0.6, "best_val_loss": 2.0},
            {"folder": "2", "status": "unfinished"}]
    ranked, metric, mode = rank_jobs(jobs)
    assert ([j["folder"] for j in ranked], metric, mode) == (["1", "0"], "val/exact_match", "max")
    for j in jobs:
        j.pop("monitor", None)
    ranked, metric, mode = rank_jobs(jobs)  # summaries written before trainer.monitor: the lowest val loss
    assert ([j["folder"] for j in ranked], metric, mode) == (["0", "1"], "val/loss", "min")


def test_sweep_summary_records_the_best_job(tmp_path):
    for job, (best, lr) in enumerate([(1.9, "1e-3"), (1.4, "2e-3"), (1.6, "3e-3")]):
        fake_run(tmp_path / str(job), finished(best, best + 0.1), overrides=(f"optimizer.lr={lr}", "seed=1"))
    text, best = summarise_sweep(tmp_path)
    assert best == {"folder": str(tmp_path / "1"), "overrides": ["optimizer.lr=2e-3", "seed=1"], "metric": "val/loss",
                    "mode": "min", "value": 1.4}
    assert json.loads((tmp_path / "best_job.json").read_text()) == best
    assert (tmp_path / "summary.md").read_text() == text
    assert "| 1 | optimizer.lr=2e-3 | 1.5000 | 1.4000 | 8 | finished |" in text  # labels: only what differs
    assert text.endswith(f"best job: {tmp_path / '1'} (val/loss 1.4000, min)\n")


# ---- which checkpoint file, and why --------------------------------------------------------------------------
def tiny_checkpoint(path: Path, step: int, **extra) -> Path:
    config = {"model": {"_target_": "gpt.model.GPT", "n_layer": 1}}
    return save_checkpoint({"model": {"w": torch.zeros(1)}, "config": config, "tokenizer": {}, "step": step, **extra}, path)


def test_the_loaded_file_and_the_reason_are_logged(tmp_path, caplog, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpts = tmp_path / "outputs" / "d" / "t" / "checkpoints"
    tiny_checkpoint(ckpts / "best.pt", 600, val_loss=1.6,
                    monitor={"metric": "val/exact_match", "mode": "max", "value": 0.375, "step": 600})
    tiny_checkpoint(ckpts / "last.pt", 800, val_loss=1.7)
    os.symlink("d/t", tmp_path / "outputs" / "latest")
    with caplog.at_level(logging.INFO, logger="gpt.checkpoint"):
        ckpt = load_checkpoint("outputs/latest")
        load_checkpoint("outputs/d/t", prefer="last")
    assert ckpt["path"] == "outputs/d/t/checkpoints/best.pt"  # the link resolved: lineage names the real run
    assert caplog.messages == [
        "checkpoint: outputs/d/t/checkpoints/best.pt (best.pt of the run folder: highest val/exact_match 0.3750 "
        "at step 600; pass outputs/d/t/checkpoints/last.pt for the final weights)",
        "checkpoint: outputs/d/t/checkpoints/last.pt (last.pt of the run folder, step 800)"]


def test_older_checkpoints_give_their_val_loss_as_the_reason(tmp_path, caplog):
    tiny_checkpoint(tmp_path / "checkpoints" / "best.pt", 300, val_loss=1.25)
    with caplog.at_level(logging.INFO, logger="gpt.checkpoint"):
        load_checkpoint(tmp_path)
    assert caplog.messages == [f"checkpoint: {tmp_path}/checkpoints/best.pt (best.pt of the run folder: "
                               f"lowest val/loss 1.2500 at step 300)"]
    (tmp_path / "checkpoints" / "best.pt").unlink()
    tiny_checkpoint(tmp_path / "checkpoints" / "last.pt", 300)
    assert choose_checkpoint(tmp_path)[1] == "last.pt of the run folder: it has no best.pt"


# ---- end to end ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_latest_run_and_sweep_end_to_end(tmp_path):
    first = run_here("train.py", *TINY, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    (run,) = (tmp_path / "outputs").glob("*-*-*/*")
    assert os.readlink(tmp_path / "outputs" / "latest") == str(run.relative_to(tmp_path / "outputs"))
    bad = run_here("train.py", "trainer.max_iters=0", cwd=tmp_path)  # refused: its folder is removed
    assert bad.returncode == 2 and (tmp_path / "outputs" / "latest").resolve() == run.resolve()

    infer = run_here("infer.py", "ckpt=outputs/latest", "max_new_tokens=5", "prompt=AB", cwd=tmp_path)
    assert infer.returncode == 0, infer.stderr[-2000:]
    assert f"checkpoint: {run.relative_to(tmp_path)}/checkpoints/best.pt (best.pt of the run folder" in infer.stderr
    assert "checkpoint:" not in infer.stdout

    sweep = run_here("train.py", "-m", *TINY, "optimizer.lr=1e-3,3e-3", cwd=tmp_path)
    assert sweep.returncode == 0, sweep.stderr[-2000:]
    (folder,) = (tmp_path / "multirun").glob("*-*-*/*")
    assert (tmp_path / "multirun" / "latest").resolve() == folder.resolve()
    assert (tmp_path / "outputs" / "latest").resolve() == run.resolve()  # a sweep's jobs do not move it
    best = json.loads((folder / "best_job.json").read_text())
    losses = {j: describe_run(folder / j)["best_val_loss"] for j in ("0", "1")}
    assert tmp_path / best["folder"] == folder / min(losses, key=losses.get) and best["value"] == min(losses.values())
    assert f"best job: {best['folder']}" in sweep.stdout and (folder / "summary.md").read_text() in sweep.stdout

    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    listing = subprocess.run([sys.executable, "-m", "gpt.runs", "--json"], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=120)
    assert listing.returncode == 0, listing.stderr[-2000:]
    rows = json.loads(listing.stdout)
    assert [Path(r["folder"]) for r in rows] == [run.relative_to(tmp_path), (folder / "0").relative_to(tmp_path),
                                                 (folder / "1").relative_to(tmp_path)]
    assert all(r["status"] == "finished" and r["step"] == r["max_iters"] == 6 for r in rows)
