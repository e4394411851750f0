"""Choosing and writing checkpoints (gpt/trainer.py): trainer.monitor / mode / min_delta pick best.pt, keep_top_k
keeps the k best evaluations as step files, patience stops early, all of it survives a resume; one write per
step (links for the other files), save_interval apart from evaluations, async_save equal to a synchronous save.

The objective reports a scripted sequence of metrics per evaluation, so which evaluation is best, which files
are kept and when the run stops are known in advance (the oracle is written next to each test)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from gpt.errors import UserError
from gpt.model import GPT
from gpt.runs import read_metrics
from gpt.trainer import Loop, Precision, Trainer

V = 13


class Scripted:
    """Random token windows from its own generator; evaluation i reports evals[i] (a dict of val/* metrics)."""

    def __init__(self, evals: list[dict]):
        self.g = torch.Generator().manual_seed(0)
        self.evals, self.done = evals, 0

    def train_batch(self):
        x = torch.randint(V, (2, 9), generator=self.g)
        return x[:, :-1], x[:, 1:]

    @staticmethod
    def batch_tokens(batch) -> int:
        return batch[0].numel()

    def loss(self, model, batch):
        _, loss = model(*batch)
        return loss, {}

    def evaluate(self, model, iters, autocast) -> dict:
        out = self.evals[self.done]
        self.done += 1
        return dict(out)

    def samples(self, model, autocast) -> list:
        return []

    def state_dict(self) -> dict:
        return {"g": self.g.get_state(), "done": self.done}

    def load_state_dict(self, state: dict) -> None:
        self.g.set_state(state["g"])
        self.done = state["done"]


def trainer_for(run_dir: Path, evals: list[dict], max_iters: int, **loop) -> Trainer:
    torch.manual_seed(0)
    model = GPT(vocab_size=V, block_size=8, n_layer=1, n_head=2, n_embd=16, dropout=0.0, loss_chunk_size=0)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    return Trainer(model, Scripted(evals), opt, sched, Loop(max_iters=max_iters, eval_interval=2, eval_iters=1, **loop),
                   precision=Precision("cpu", "float32"), run_dir=run_dir, checkpoint_meta={"config": {}, "tokenizer": {}},
                   progress=False)


def saved(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def em(*values: float, loss: float = 1.0) -> list[dict]:
    return [{"val/loss": loss, "val/exact_match": v} for v in values]


def test_mode_auto_minimises_losses_and_maximises_the_rest():
    assert Loop(1, 1, 1).direction == "min"
    assert Loop(1, 1, 1, monitor="val/perplexity").direction == "min"
    assert Loop(1, 1, 1, monitor="exact_match").monitor == "val/exact_match"
    assert Loop(1, 1, 1, monitor="val/exact_match").direction == "max"
    assert Loop(1, 1, 1, monitor="val/reward").direction == "max"
    assert Loop(1, 1, 1, monitor="val/loss", mode="max").direction == "max"
    loop = Loop(1, 1, 1, monitor="val/accuracy", min_delta=0.1)
    assert loop.better(0.5, None) and loop.better(0.61, 0.5) and not loop.better(0.6, 0.5)
    assert not loop.better(float("nan"), None)


@pytest.mark.parametrize("key, value", [("mode", "lowest"), ("patience", -1), ("keep_top_k", 1.5),
                                        ("min_delta", -0.1), ("min_delta", math.inf), ("monitor", "")])
def test_bad_settings_are_one_line(key, value):
    with pytest.raises(UserError, match=f"trainer.{key}="):
        Loop(1, 1, 1, **{key: value})


def test_best_pt_holds_the_highest_exact_match_not_the_lowest_loss(tmp_path):
    # evaluations at steps 2, 4, 6, 8: loss falls throughout, exact match peaks at step 4
    evals = [{"val/loss": 3.0 - i, "val/exact_match": m} for i, m in enumerate([0.1, 0.5, 0.3, 0.2])]
    trainer = trainer_for(tmp_path, evals, 8, monitor="val/exact_match")
    trainer.fit()
    best = saved(tmp_path / "checkpoints" / "best.pt")
    assert best["step"] == 4
    assert best["monitor"] == {"metric": "val/exact_match", "mode": "max", "value": 0.5, "step": 4, "stale": 0,
                               "top": []}
    last = saved(tmp_path / "checkpoints" / "last.pt")
    assert last["step"] == 8 and last["monitor"]["stale"] == 2 and last["monitor"]["step"] == 4
    assert trainer.state.best_val_loss == 0.0  # the lowest loss is still tracked for the summary


def test_default_monitor_is_the_lowest_val_loss(tmp_path):
    evals = [{"val/loss": v} for v in (2.0, 1.5, 1.7, 1.6)]
    trainer_for(tmp_path, evals, 8).fit()
    assert saved(tmp_path / "checkpoints" / "best.pt")["step"] == 4


def test_min_delta_ignores_small_improvements(tmp_path):
    evals = [{"val/loss": v} for v in (2.0, 1.95, 1.5, 1.45)]  # only step 6 beats the best by more than 0.1
    trainer_for(tmp_path, evals, 8, min_delta=0.1).fit()
    assert saved(tmp_path / "checkpoints" / "best.pt")["step"] == 6


def test_keep_top_k_keeps_the_k_best_evaluations_as_step_files(tmp_path):
    # exact match by step: 2: .1, 4: .5, 6: .3, 8: .4, 10: .2 -> top 2 at the end: steps 4 (.5) and 8 (.4)
    trainer = trainer_for(tmp_path, em(0.1, 0.5, 0.3, 0.4, 0.2), 10, monitor="val/exact_match", keep_top_k=2)
    trainer.fit()
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.glob("step-*.pt")) == ["step-000004.pt", "step-000008.pt"]
    assert trainer.state.top == [[0.5, 4], [0.4, 8]]
    assert saved(folder / "step-000008.pt")["step"] == 8 and saved(folder / "step-000004.pt")["step"] == 4
    assert not list(folder.glob(".*tmp*"))


def test_patience_stops_after_that_many_evaluations_without_improvement(tmp_path):
    # loss improves at steps 2 and 4, then not at 6 and 8: patience 2 stops at step 8 of 20
    evals = [{"val/loss": v} for v in (2.0, 1.0, 1.5, 1.2, 0.1, 0.1)]
    trainer = trainer_for(tmp_path, evals, 20, patience=2)
    trainer.fit()
    assert trainer.state.step == 8 and trainer.state.stopped_early
    assert saved(tmp_path / "checkpoints" / "last.pt")["step"] == 8
    assert max(r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")) == 8


def test_a_monitor_the_stage_does_not_report_is_one_line_and_the_step_is_kept(tmp_path):
    trainer = trainer_for(tmp_path, em(0.1), 4, monitor="val/accuracy")
    with pytest.raises(UserError, match=r"trainer.monitor='val/accuracy' is not a metric this stage reports \(it "
                                        r"reports val/loss, val/exact_match\); resume with: python train.py "
                                        r"resume=\S+ trainer.monitor=<one of them>"):
        trainer.fit()
    assert saved(tmp_path / "checkpoints" / "last.pt")["step"] == 2
    assert not (tmp_path / "checkpoints" / "best.pt").exists()


def test_monitor_state_survives_a_resume(tmp_path):
    """Stopping after 4 steps and resuming to 12 gives the uninterrupted run's best.pt, top-k files, and early stop."""
    values = (0.1, 0.5, 0.3, 0.4, 0.2, 0.2)
    settings = dict(monitor="val/exact_match", keep_top_k=2, patience=3)
    full = trainer_for(tmp_path / "full", em(*values), 12, **settings)
    full.fit()
    first = trainer_for(tmp_path / "part", em(*values), 4, **settings)
    first.fit()
    rest = trainer_for(tmp_path / "part", em(*values), 12, **settings)
    ckpt = saved(tmp_path / "part" / "checkpoints" / "last.pt")
    ckpt["path"] = str(tmp_path / "part" / "checkpoints" / "last.pt")
    rest.begin(ckpt, {})
    rest.fit()
    # oracle: best 0.5 at step 4; no improvement at 6, 8, 10 -> patience 3 stops at step 10; top 2 = steps 4, 8
    for t in (full, rest):
        assert (t.state.step, t.state.best_step, t.state.stopped_early, t.state.top) == (10, 4, True, [[0.5, 4], [0.4, 8]])
    for run in ("full", "part"):
        folder = tmp_path / run / "checkpoints"
        assert sorted(p.name for p in folder.glob("step-*.pt")) == ["step-000004.pt", "step-000008.pt"]
        assert saved(folder / "best.pt")["step"] == 4
    a, b = saved(tmp_path / "full" / "checkpoints" / "last.pt"), saved(tmp_path / "part" / "checkpoints" / "last.pt")
    assert a["monitor"] == b["monitor"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_resuming_with_another_monitor_starts_a_new_best(tmp_path, caplog):
    trainer_for(tmp_path, em(0.1, 0.5), 4).fit()  # monitored val/loss (1.0 both times: best at step 2)
    assert saved(tmp_path / "checkpoints" / "best.pt")["step"] == 2
    rest = trainer_for(tmp_path, em(0.1, 0.5, 0.2, 0.4), 8, monitor="val/exact_match")
    ckpt = saved(tmp_path / "checkpoints" / "last.pt")
    ckpt["path"] = str(tmp_path / "checkpoints" / "last.pt")
    with caplog.at_level("WARNING", logger="gpt"):
        rest.begin(ckpt, {})
    assert "chose best.pt by val/loss (min); this run monitors val/exact_match (max)" in caplog.text
    rest.fit()  # steps 6 (0.2) and 8 (0.4): the first evaluation of the new metric is the best so far
    best = saved(tmp_path / "checkpoints" / "best.pt")
    assert (best["step"], best["monitor"]["metric"], best["monitor"]["value"]) == (8, "val/exact_match", 0.4)


def writes(monkeypatch) -> list[tuple[str, int, bool]]:
    """Record every checkpoint write of gpt.trainer: (file name, step, has optimizer state)."""
    import gpt.trainer as trainer_module

    seen, real = [], trainer_module.save_checkpoint

    def record(obj, path):
        seen.append((Path(path).name, obj["step"], "optimizer" in obj))
        return real(obj, path)

    monkeypatch.setattr(trainer_module, "save_checkpoint", record)
    return seen


def test_best_and_last_of_one_step_are_one_file(tmp_path, monkeypatch):
    seen = writes(monkeypatch)
    trainer_for(tmp_path, em(0.1, 0.5), 4, monitor="val/exact_match", keep_top_k=1).fit()
    folder = tmp_path / "checkpoints"
    assert seen == [("best.pt", 2, True), ("best.pt", 4, True)]  # one write per evaluation
    inode = {p.name: p.stat().st_ino for p in folder.glob("*.pt")}
    assert inode["best.pt"] == inode["last.pt"] == inode["step-000004.pt"]


def test_save_interval_writes_last_pt_apart_from_evaluations(tmp_path, monkeypatch):
    """eval every 2 steps, last.pt every 3 (and at the end): the best of step 2 is written without optimizer
    state (not a resume point), last.pt at steps 3 and 6 and at the end (7)."""
    seen = writes(monkeypatch)
    evals = [{"val/loss": v} for v in (1.0, 2.0, 3.0, 0.5)]  # steps 2, 4, 6, 7 (the last, at max_iters)
    trainer = trainer_for(tmp_path, evals, 7, save_interval=3)
    trainer.fit()
    assert seen == [("best.pt", 2, False), ("last.pt", 3, True), ("last.pt", 6, True), ("best.pt", 7, True)]
    folder = tmp_path / "checkpoints"
    assert saved(folder / "last.pt")["step"] == 7 and folder.joinpath("last.pt").stat().st_ino == \
        folder.joinpath("best.pt").stat().st_ino


def test_a_weights_only_best_pt_is_not_a_resume_point(tmp_path):
    trainer_for(tmp_path, [{"val/loss": v} for v in (1.0, 2.0)], 4, save_interval=3).fit()
    best = saved(tmp_path / "checkpoints" / "best.pt")
    assert best["step"] == 2 and "optimizer" not in best and best["monitor"]["value"] == 1.0
    best["path"] = str(tmp_path / "checkpoints" / "best.pt")
    with pytest.raises(UserError, match="holds weights without optimizer state .* resume from the run's last.pt"):
        trainer_for(tmp_path / "b", [], 8).begin(best, {})


def test_async_save_writes_what_a_synchronous_save_writes(tmp_path):
    """The background writer saves a CPU copy of the step's state: files equal to the synchronous run's, and a
    run resumed from the asynchronous run's last.pt is the uninterrupted run."""
    values = (0.3, 0.5, 0.4, 0.6)
    sync = trainer_for(tmp_path / "sync", em(*values), 8, monitor="val/exact_match", keep_top_k=2)
    sync.fit()
    threaded = trainer_for(tmp_path / "async", em(*values), 8, monitor="val/exact_match", keep_top_k=2,
                           async_save=True)
    threaded.fit()
    assert threaded._writer is None
    for name in ("last.pt", "best.pt", "step-000004.pt", "step-000008.pt"):
        a, b = saved(tmp_path / "sync" / "checkpoints" / name), saved(tmp_path / "async" / "checkpoints" / name)
        assert a["step"] == b["step"] and a["monitor"] == b["monitor"], name
        for k in a["model"]:
            assert torch.equal(a["model"][k], b["model"][k]), (name, k)
        assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
        for i in a["optimizer"]["state"]:
            for k, v in a["optimizer"]["state"][i].items():
                assert torch.equal(v, b["optimizer"]["state"][i][k]) if isinstance(v, torch.Tensor) else v == \
                    b["optimizer"]["state"][i][k]


def test_a_failed_background_write_stops_the_run_with_its_error(tmp_path, monkeypatch):
    import gpt.trainer as trainer_module
    from gpt.checkpoint import CheckpointWriteError

    def full(obj, path):
        raise CheckpointWriteError(f"no space left on device while writing {path}; the previous checkpoint is intact")

    monkeypatch.setattr(trainer_module, "save_checkpoint", full)
    trainer = trainer_for(tmp_path, [{"val/loss": 1.0}] * 4, 8, async_save=True)
    with pytest.raises(CheckpointWriteError, match="no space left on device while writing .*best.pt"):
        trainer.fit()
    assert trainer.state.step <= 4  # stopped at the next save (step 4) at the latest, not at the end


def test_the_time_spent_waiting_for_batches_is_logged(tmp_path):
    """An objective that reports how long the loop waited for its batches (pretrain's data_seconds) gets it in
    each train/* row of metrics.jsonl."""
    trainer = trainer_for(tmp_path, [{"val/loss": 1.0}] * 2, 4, log_interval=2)
    waits = iter([0.25, 0.5])
    trainer.objective.data_seconds = lambda: next(waits)
    trainer.fit()
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "train/loss" in r]
    assert [(r["step"], r["train/data_seconds"]) for r in rows] == [(2, 0.25), (4, 0.5)]
