"""Run tracking without and with W&B: loss and learning-rate plots of runs and sweeps, the end-of-run
summary, W&B sweep groups, checkpoint artifacts and resumed run ids (offline, read back from the run files)."""

import glob
from pathlib import Path

import pytest

from conftest import TINY, run_script
from inprocess import run_here
from gpt.errors import UserError
from gpt.plots import curves, plot_folder
from gpt.runs import job_labels, read_metrics, run_summary
from gpt.tracking import MetricsFile, sweep_group
from wandb_records import read_wandb_artifacts, read_wandb_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_valid_png(path: Path) -> None:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    height, width, channels = imread(path).shape
    assert height > 100 and width > 100 and channels in (3, 4)


def fake_run(folder: Path, lr: float, overrides: list[str] | None = None) -> Path:
    """A run folder with the metrics.jsonl rows the trainer writes: log rows every 2 steps, evals every 4."""
    metrics = MetricsFile(folder / "metrics.jsonl")
    for step in range(2, 13, 2):
        metrics.write(step, {"train/loss": 4.0 - 0.2 * step * lr * 1e3, "train/lr": lr * step / 12, "train/grad_norm": 1.0,
                             "train/tokens_per_sec": 1000.0 * step, "train/tokens": step * 128,
                             "train/mfu": 0.01})
        if step % 4 == 0:
            metrics.write(step, {"val/loss": 4.1 - 0.1 * step, "train/eval_loss": 4.0, "val/best_loss": 4.1})
    if overrides is not None:
        (folder / ".hydra").mkdir()
        (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    return folder


def test_run_plots_are_valid_pngs(tmp_path):
    fake_run(tmp_path, lr=1e-3)
    paths = plot_folder(tmp_path)
    assert [p.name for p in paths] == ["loss.png", "lr.png"]
    for p in paths:
        assert p.parent == tmp_path
        assert_valid_png(p)


def test_val_loss_is_placed_at_its_tokens():
    rows = [{"step": 2, "train/loss": 3.0, "train/tokens": 256, "train/lr": 0.1}, {"step": 4, "val/loss": 2.5},
            {"step": 4, "train/loss": 2.0, "train/tokens": 512, "train/lr": 0.2}]
    c = curves(rows)
    assert c.train_by_tokens == ([256, 512], [3.0, 2.0])
    assert c.val_by_step == ([4], [2.5]) and c.val_by_tokens == ([512.0], [2.5])
    assert c.lr_by_step == ([2, 4], [0.1, 0.2])


def test_sweep_plots_overlay_jobs_labelled_by_what_differs(tmp_path):
    for job, lr in enumerate(["1e-3", "3e-4"]):
        (tmp_path / str(job)).mkdir()
        fake_run(tmp_path / str(job), float(lr), [f"optimizer.lr={lr}", "trainer.max_iters=12"])
    (tmp_path / "multirun.yaml").write_text("{}\n")
    assert job_labels([tmp_path / "0", tmp_path / "1"]) == ["optimizer.lr=1e-3", "optimizer.lr=3e-4"]
    paths = plot_folder(tmp_path)
    assert [p.parent for p in paths] == [tmp_path, tmp_path]
    for p in paths:
        assert_valid_png(p)
    assert not (tmp_path / "0" / "loss.png").exists()  # one overlaid figure, in the sweep folder


def test_plot_of_folder_without_metrics_is_user_error(tmp_path):
    with pytest.raises(UserError, match="holds no metrics.jsonl"):
        plot_folder(tmp_path)
    MetricsFile(tmp_path / "metrics.jsonl").write(0, {"summary/wall_seconds": 1.0})
    with pytest.raises(UserError, match="no train/loss or val/loss rows"):
        plot_folder(tmp_path)


def test_run_summary_of_metrics_rows(tmp_path):
    fake_run(tmp_path, lr=1e-3)
    s = run_summary(read_metrics(tmp_path / "metrics.jsonl"))
    assert s["tokens"] == 12 * 128
    assert s["tokens_per_sec"] == pytest.approx(1000 * (2 + 4 + 6 + 8 + 10 + 12) / 6)
    assert s["mfu"] == pytest.approx(0.01)
    assert (s["best_val_loss"], s["best_val_step"], s["final_val_loss"]) == pytest.approx((2.9, 12, 2.9))
    assert run_summary([]) == {}


def test_no_sweep_group_outside_a_multirun():
    assert sweep_group() is None


# ---- end to end: a two-job sweep logged to W&B offline ----------------------------------------

def wandb_file(run: Path) -> str:
    (path,) = glob.glob(str(run / "wandb" / "offline-run-*" / "run-*.wandb"))
    return path


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("sweep")
    proc = run_script("train.py", "-m", *TINY, "logger=wandb", "logger.mode=offline", "++logger.log_checkpoint=true",
                      "optimizer.lr=1e-3,2e-3", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (folder,) = [Path(p) for p in glob.glob(str(cwd / "multirun" / "*-*-*" / "*"))]
    return cwd, folder, proc


@pytest.mark.slow
def test_each_run_ends_with_plots_and_a_summary(sweep):
    _, folder, proc = sweep
    for job in ("0", "1"):
        for name in ("loss.png", "lr.png"):
            assert_valid_png(folder / job / name)
        summary = [r for r in read_metrics(folder / job / "metrics.jsonl") if "summary/tokens" in r][-1]
        assert summary["summary/tokens"] == 6 * 4 * 32  # steps x batch x block
        assert summary["summary/tokens_per_sec"] > 0 and summary["summary/peak_memory_bytes"] > 0
    for text in ("val loss", "(best", "tokens seen 768", "tokens/s", "MFU", "peak memory", "MiB",
                 f"checkpoints: {folder / '0' / 'checkpoints' / 'last.pt'}", f"plots: {folder / '1' / 'loss.png'}"):
        assert text in proc.stdout, text


@pytest.mark.slow
def test_sweep_jobs_share_a_wandb_group_and_log_their_checkpoint(sweep):
    cwd, folder, _ = sweep
    runs = [read_wandb_run(wandb_file(folder / job)) for job in ("0", "1")]
    assert runs[0]["id"] != runs[1]["id"]
    assert runs[0]["group"] == runs[1]["group"] == str(folder.relative_to(cwd))
    for job, run in zip(("0", "1"), runs):
        (model,) = [a for a in read_wandb_artifacts(wandb_file(folder / job)) if a["type"] == "model"]
        assert model["name"] == f"model-{run['id']}" and model["files"] == ["last.pt"]
        assert set(model["aliases"]) == {"latest", "step-6"}


@pytest.mark.slow
def test_plot_on_demand_overlays_the_sweep(sweep):
    cwd, folder, _ = sweep
    proc = run_here("evaluate.py", f"plot={folder}", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == [str(folder / "loss.png"), str(folder / "lr.png")]
    for name in ("loss.png", "lr.png"):
        assert_valid_png(folder / name)
    assert not (cwd / "evaluations").exists() and not (cwd / "outputs").exists()  # no evaluation run folder


@pytest.mark.slow
def test_resumed_run_continues_its_wandb_run(sweep):
    cwd, folder, _ = sweep
    first = read_wandb_run(wandb_file(folder / "0"))
    resumed = cwd / "resumed"  # a folder of its own (hydra.run.dir), so the sweep the other tests read stays as it was
    proc = run_script("train.py", *TINY, "trainer.max_iters=8", "logger=wandb", "logger.mode=offline",
                      f"resume={folder / '0'}", f"hydra.run.dir={resumed}", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert read_wandb_run(wandb_file(resumed))["id"] == first["id"]
    assert not [a for a in read_wandb_artifacts(wandb_file(resumed)) if a["type"] == "model"]  # off by default
