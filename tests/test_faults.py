"""Faults the training loop must survive with nothing lost: SIGINT / SIGTERM at any moment (also a second
one, and under DDP), a kill between the writes of best.pt and last.pt, a full disk during a save, and
non-finite losses, gradients, evaluations and weights."""

import errno
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import gpt.checkpoint as checkpoint
import gpt.trainer as trainer_module
from conftest import ROOT, TINY, run_script
from gpt.checkpoint import CheckpointWriteError, remove_stale_temps, save_checkpoint
from gpt.errors import Interrupted, UserError
from gpt.model import GPT
from gpt.runs import read_metrics
from gpt.trainer import Loop, Precision, Trainer

V = 11  # vocabulary of the toy objective


class Toy:
    """A tiny objective: random token windows from its own generator (saved in checkpoints); the model's
    loss, made NaN on the loss() calls listed in `nan_at`; `hook(call)` runs inside every loss() call;
    val losses from `vals` in turn when given, else the model's loss on one fixed batch."""

    def __init__(self, seed: int = 0, nan_at=(), vals=None):
        self.g = torch.Generator().manual_seed(seed)
        self.calls, self.nan_at, self.vals, self.hook, self.sampled = 0, set(nan_at), list(vals or []), None, 0

    def train_batch(self):
        x = torch.randint(V, (4, 9), generator=self.g)
        return x[:, :-1], x[:, 1:]

    @staticmethod
    def batch_tokens(batch) -> int:
        return batch[0].numel()

    def loss(self, model, batch):
        self.calls += 1
        _, loss = model(*batch)
        if self.calls in self.nan_at:
            loss = loss * float("nan")
        if self.hook is not None:
            self.hook(self.calls)
        return loss, {}

    def evaluate(self, model, iters, autocast) -> dict:
        if self.vals:
            return {"val/loss": self.vals.pop(0)}
        x = torch.randint(V, (4, 9), generator=torch.Generator().manual_seed(1))
        return {"val/loss": float(model(x[:, :-1], x[:, 1:])[1])}

    def samples(self, model, autocast) -> list:
        self.sampled += 1
        return []

    def state_dict(self) -> dict:
        return {"g": self.g.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.g.set_state(state["g"])


def make_trainer(run_dir: Path, objective=None, max_iters: int = 8, eval_interval: int = 4, log_interval: int = 3,
                 meta: dict | None = None, **kwargs) -> Trainer:
    torch.manual_seed(0)
    model = GPT(vocab_size=V, block_size=8, n_layer=1, n_head=2, n_embd=16, dropout=0.1, loss_chunk_size=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 / (1 + i))
    loop = Loop(max_iters=max_iters, eval_interval=eval_interval, eval_iters=1, log_interval=log_interval,
                **{k: kwargs.pop(k) for k in ("skip_nonfinite", "grad_clip") if k in kwargs})
    return Trainer(model, objective or Toy(), opt, sched, loop, precision=Precision("cpu", "float32"), run_dir=run_dir,
                   checkpoint_meta={"config": {}, "tokenizer": {}, **(meta or {})}, progress=False, **kwargs)


def load(path: Path) -> dict:
    ckpt = torch.load(path, weights_only=True)
    ckpt["path"] = str(path)
    return ckpt


def resumed(run_dir: Path, source: Path, max_iters: int = 8, **kwargs) -> Trainer:
    """A fresh trainer in run_dir continuing from the checkpoint file `source`."""
    trainer = make_trainer(run_dir, max_iters=max_iters, **kwargs)
    trainer.begin(load(source), {})
    return trainer


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def rows_by_step(*paths: Path, key: str) -> dict:
    return {r["step"]: r[key] for p in paths for r in read_metrics(p) if r.get(key) is not None}


def kill_self(sig):
    os.kill(os.getpid(), sig)


# ---- signals ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_inside_the_optimizer_update_finishes_the_step_saves_and_resumes_bit_identical(tmp_path, monkeypatch,
                                                                                              sig, code):
    full = make_trainer(tmp_path / "full")
    full.fit()

    real_step, calls = torch.optim.AdamW.step, []

    def step_with_signal(self, *args, **kwargs):  # the handler runs at the first bytecode of AdamW's update
        calls.append(1)
        if len(calls) == 5:  # step 5, not an eval step
            kill_self(sig)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step_with_signal)
    trainer = make_trainer(tmp_path / "a")
    previous = signal.getsignal(sig)
    with pytest.raises(Interrupted) as e:
        trainer.fit()
    monkeypatch.undo()
    assert signal.getsignal(sig) is previous  # handlers restored
    assert e.value.exit_code == code
    last = tmp_path / "a" / "checkpoints" / "last.pt"
    assert str(e.value) == (f"interrupted at step 5 ({signal.Signals(sig).name}); saved {last}; "
                            f"resume with: python train.py resume={tmp_path / 'a'}")
    saved = load(last)
    assert saved["step"] == 5
    assert_same_state(saved["model"], trainer.raw_model.state_dict())  # the whole update is in the file
    assert all(int(s["step"]) == 5 for s in saved["optimizer"]["state"].values())

    rest = resumed(tmp_path / "b", last)
    rest.fit()
    assert_same_state(rest.raw_model.state_dict(), full.raw_model.state_dict())
    for key in ("val/loss", "train/loss"):  # the log window (3 steps) straddles the interrupt
        assert rows_by_step(tmp_path / "a" / "metrics.jsonl", tmp_path / "b" / "metrics.jsonl", key=key) == \
            rows_by_step(tmp_path / "full" / "metrics.jsonl", key=key)


def test_signal_during_an_eval_save_is_handled_after_it(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path)
    real = checkpoint.torch.save
    saves = []

    def save_with_signal(obj, f):
        saves.append(obj["step"])
        if saves == [4]:  # while best.pt of step 4 is being written
            kill_self(signal.SIGTERM)
        return real(obj, f)

    monkeypatch.setattr(torch, "save", save_with_signal)
    with pytest.raises(Interrupted, match="interrupted at step 4 "):
        trainer.fit()
    assert saves == [4]  # best.pt written once, last.pt a hard link to it: no second write
    assert load(tmp_path / "checkpoints" / "last.pt")["step"] == 4
    assert (tmp_path / "checkpoints" / "last.pt").stat().st_ino == (tmp_path / "checkpoints" / "best.pt").stat().st_ino


def test_second_signal_aborts_at_once_and_leaves_no_half_written_file(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, eval_interval=1)
    trainer.objective.hook = lambda call: kill_self(signal.SIGINT) if call == 3 else None
    before = {}
    real = torch.save

    def save_interrupted_again(obj, f):
        if obj["step"] == 3:
            before["last"] = (tmp_path / "checkpoints" / "last.pt").read_bytes()
            f.write(b"PK\x03\x04 partial")
            kill_self(signal.SIGINT)
        return real(obj, f)

    monkeypatch.setattr(torch, "save", save_interrupted_again)
    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(Interrupted) as e:
        trainer.fit()
    assert signal.getsignal(signal.SIGINT) is previous
    last = tmp_path / "checkpoints" / "last.pt"
    assert e.value.exit_code == 130
    assert str(e.value) == (f"aborted at step 3 by a second SIGINT; {last} (step 2) is intact; "
                            f"resume with: python train.py resume={tmp_path}")
    assert last.read_bytes() == before["last"] and load(last)["step"] == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best.pt", "last.pt"]


def test_finetune_runs_are_told_to_resume_with_finetune_py(tmp_path):
    trainer = make_trainer(tmp_path, meta={"lineage": {"parent": "p.pt"}})  # what finetune.py's runs record
    trainer.objective.hook = lambda call: kill_self(signal.SIGTERM) if call == 2 else None
    with pytest.raises(Interrupted, match=re.escape(f"resume with: python finetune.py resume={tmp_path}")):
        trainer.fit()


# ---- best before last, stale temp files ------------------------------------------------------------
def test_best_is_written_before_last(tmp_path, monkeypatch):
    written = []
    real = checkpoint.save_checkpoint

    real_link = trainer_module.link_or_save

    def record(obj, path):
        written.append(("write", Path(path).name))
        return real(obj, path)

    def record_link(source, target, ckpt):
        written.append(("link", Path(target).name))
        return real_link(source, target, ckpt)

    monkeypatch.setattr("gpt.trainer.save_checkpoint", record)
    monkeypatch.setattr("gpt.trainer.link_or_save", record_link)
    make_trainer(tmp_path, objective=Toy(vals=[2.0, 1.0])).fit()
    # one write per evaluation: best.pt first, last.pt a hard link to it
    assert written == [("write", "best.pt"), ("link", "last.pt")] * 2


def test_kill_between_best_and_last_loses_no_best(tmp_path, monkeypatch):
    """A kill -9 right after best.pt of step 8: last.pt holds step 4; the resumed run redoes steps 5-8, finds
    the same improvement and writes best.pt again (bit-identical weights)."""
    real = trainer_module.link_or_save

    def die_before_last(source, target, ckpt):
        if ckpt["step"] == 8 and Path(target).name == "last.pt":
            raise SystemExit("killed")
        return real(source, target, ckpt)

    monkeypatch.setattr("gpt.trainer.link_or_save", die_before_last)
    with pytest.raises(SystemExit):
        make_trainer(tmp_path / "a", objective=Toy(vals=[2.0, 1.0])).fit()
    monkeypatch.undo()
    ck = tmp_path / "a" / "checkpoints"
    assert load(ck / "last.pt")["step"] == 4 and load(ck / "best.pt")["step"] == 8
    rest = resumed(tmp_path / "b", ck / "last.pt", objective=Toy(vals=[1.0]))
    rest.fit()
    best = load(tmp_path / "b" / "checkpoints" / "best.pt")
    assert best["step"] == 8
    assert_same_state(best["model"], load(ck / "best.pt")["model"])


def test_resume_writes_the_best_that_best_pt_lacks(tmp_path):
    """Files an older version could leave (last.pt written first, killed before best.pt): last.pt records
    a best val loss that best.pt does not hold, and last.pt is that best state. Resume writes best.pt."""
    make_trainer(tmp_path / "a", objective=Toy(vals=[2.0, 1.0])).fit()
    ck = tmp_path / "a" / "checkpoints"
    old = load(ck / "last.pt")
    old.update(step=4, val_loss=5.0, best_val_loss=5.0)
    del old["monitor"]  # written before checkpoints recorded trainer.monitor
    save_checkpoint(old, ck / "best.pt")  # an older, worse best
    rest = resumed(tmp_path / "b", ck / "last.pt", max_iters=12)
    best = tmp_path / "b" / "checkpoints" / "best.pt"
    assert load(best)["step"] == 8 and load(best)["val_loss"] == 1.0  # written at once, from the restored state
    assert_same_state(load(best)["model"], load(ck / "last.pt")["model"])
    assert rest.state.best_val_loss == 1.0


def test_resume_forgets_a_best_that_no_file_holds(tmp_path):
    """last.pt records best 1.0 from a state that is gone (best.pt holds 5.0): the next evaluation better
    than 5.0 must write best.pt, where the record alone would have suppressed it."""
    make_trainer(tmp_path / "a", objective=Toy(vals=[2.0, 3.0])).fit()
    ck = tmp_path / "a" / "checkpoints"
    last = load(ck / "last.pt")
    last.update(best_val_loss=1.0)
    del last["monitor"]  # files written before checkpoints recorded trainer.monitor
    save_checkpoint(last, ck / "last.pt")
    gone = load(ck / "best.pt")
    gone.update(val_loss=5.0, best_val_loss=5.0)
    del gone["monitor"]
    save_checkpoint(gone, ck / "best.pt")
    rest = resumed(tmp_path / "b", ck / "last.pt", max_iters=12, objective=Toy(vals=[4.0]))
    assert rest.state.best_val_loss == 5.0
    rest.fit()
    best = load(tmp_path / "b" / "checkpoints" / "best.pt")
    assert best["step"] == 12 and best["val_loss"] == 4.0


def test_stale_temp_files_are_removed_on_start(tmp_path):
    source, run = tmp_path / "a" / "checkpoints", tmp_path / "b" / "checkpoints"
    make_trainer(tmp_path / "a").fit()
    run.mkdir(parents=True)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout.strip()
        stale = [source / f".last.pt.tmp-{dead}", run / f".best.pt.tmp-{dead}"]
        kept = [source / f".last.pt.tmp-{live.pid}",  # a save still in progress in another process
                source / ".notes.txt.tmp-1"]  # not a name save_checkpoint writes
        for p in [*stale, *kept]:
            p.write_bytes(b"partial")
        resumed(tmp_path / "b", source / "last.pt")
        assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
        assert remove_stale_temps(source) == []
    finally:
        live.kill()
        live.wait()


# ---- full disk ---------------------------------------------------------------------------------------
@pytest.fixture
def previous(tmp_path) -> tuple[Path, bytes]:
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    return path, path.read_bytes()


def assert_unchanged(previous) -> None:
    path, before = previous
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # the temp file is gone


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   OSError(errno.EDQUOT, "Disk quota exceeded")])
def test_full_disk_is_one_line_and_the_previous_checkpoint_is_intact(previous, monkeypatch, error):
    def partial_then_full(obj, f):
        f.write(b"PK\x03\x04 partial")
        raise error

    monkeypatch.setattr(torch, "save", partial_then_full)
    with pytest.raises(CheckpointWriteError) as e:
        save_checkpoint({"step": 2}, previous[0])
    assert str(e.value) == f"no space left on device while writing {previous[0]}; the previous checkpoint is intact"
    assert isinstance(e.value, UserError)  # the entry scripts print it as one line, exit 2
    assert_unchanged(previous)


def test_full_disk_reported_by_torchs_own_writer(previous, monkeypatch):
    def torch_style(obj, f):
        f.write(b"PK")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", torch_style)
    usage = shutil.disk_usage(previous[0].parent)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=4096))
    with pytest.raises(CheckpointWriteError, match="^no space left on device while writing .*last.pt; the prev"):
        save_checkpoint({"step": 2}, previous[0])
    assert_unchanged(previous)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1 << 40))
    with pytest.raises(CheckpointWriteError, match=r"^could not write .*last.pt \(\[enforce fail at inline_co"):
        save_checkpoint({"step": 2}, previous[0])
    assert_unchanged(previous)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_real_enospc_from_torch_save(previous, monkeypatch):
    """torch.save writing into a device that is always full (the real ENOSPC path, not a mock of it)."""
    import builtins

    monkeypatch.setattr(checkpoint, "open", lambda p, mode: builtins.open("/dev/full", mode), raising=False)
    with pytest.raises(CheckpointWriteError, match="^no space left on device while writing"):
        save_checkpoint({"step": 2, "w": torch.zeros(100_000)}, previous[0])
    assert previous[0].read_bytes() == previous[1]


def test_full_disk_during_training_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, eval_interval=2, objective=Toy(vals=[2.0, 1.0]))
    real = torch.save

    def full_from_step_4(obj, f):
        if obj["step"] >= 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f)

    monkeypatch.setattr(torch, "save", full_from_step_4)
    with pytest.raises(CheckpointWriteError, match="no space left on device while writing .*best.pt"):
        trainer.fit()
    monkeypatch.undo()
    assert load(tmp_path / "checkpoints" / "last.pt")["step"] == 2


# ---- non-finite values -------------------------------------------------------------------------------
def test_non_finite_loss_stops_without_an_update_or_a_save(tmp_path):
    trainer = make_trainer(tmp_path, objective=Toy(nan_at={6}), eval_interval=4)
    with pytest.raises(UserError) as e:
        trainer.fit()
    last = tmp_path / "checkpoints" / "last.pt"
    assert str(e.value) == ("training loss became nan at step 6; lower optimizer.lr or set trainer.grad_clip "
                            "(now 1.0), or skip up to n such steps with trainer.skip_nonfinite=n; "
                            f"{last} (step 4) is the newest checkpoint")
    assert load(last)["step"] == 4
    assert all(bool(p.isfinite().all()) for p in trainer.raw_model.parameters())


def test_skip_nonfinite_skips_then_stops(tmp_path):
    """Calls 3 and 5 are NaN: each is skipped (no update, gradients dropped, counted); the third one stops."""
    trainer = make_trainer(tmp_path, objective=Toy(nan_at={3, 5, 7}), skip_nonfinite=2, log_interval=1,
                           eval_interval=100, max_iters=8)
    weights = {}
    trainer.objective.hook = lambda call: weights.__setitem__(call, {k: v.clone() for k, v in
                                                                     trainer.raw_model.state_dict().items()})
    with pytest.raises(UserError) as e:
        trainer.fit()
    assert str(e.value).startswith("training loss became nan at step 7 (non-finite step 3; "
                                   "trainer.skip_nonfinite=2 allows 2); lower optimizer.lr")
    assert_same_state(weights[3], weights[4])  # the skipped step changed nothing
    assert_same_state(weights[5], weights[6])
    assert not torch.equal(weights[4]["lm_head.weight"], weights[5]["lm_head.weight"])  # the others trained
    assert trainer.state.skipped == 3
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["train/skipped_steps"]) for r in rows if "train/skipped_steps" in r] == [(3, 1), (5, 2)]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 4, 6]  # skipped steps are not averaged in
    assert all(math.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)


def test_skip_count_survives_resume(tmp_path):
    trainer = make_trainer(tmp_path / "a", objective=Toy(nan_at={2}), skip_nonfinite=1)
    trainer.fit()
    assert load(tmp_path / "a" / "checkpoints" / "last.pt")["skipped_steps"] == 1
    rest = resumed(tmp_path / "b", tmp_path / "a" / "checkpoints" / "last.pt", max_iters=12, skip_nonfinite=1,
                   objective=Toy(nan_at={1}))
    with pytest.raises(UserError, match="non-finite step 2; trainer.skip_nonfinite=1"):
        rest.fit()


def test_non_finite_evaluation_stops_before_sampling_or_saving(tmp_path):
    trainer = make_trainer(tmp_path, objective=Toy(vals=[2.0, float("inf")]))
    with pytest.raises(UserError) as e:
        trainer.fit()
    assert str(e.value).startswith("validation loss became inf at step 8: the weights no longer give finite outputs")
    assert trainer.objective.sampled == 1  # only the finite evaluation sampled
    last = load(tmp_path / "checkpoints" / "last.pt")
    assert last["step"] == 4 and last["val_loss"] == 2.0
    assert [r.get("val/loss") for r in read_metrics(tmp_path / "metrics.jsonl") if "val/loss" in r] == [2.0, None]


def test_non_finite_weights_are_never_written(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.fit()
    last = tmp_path / "checkpoints" / "last.pt"
    before = last.read_bytes()
    with torch.no_grad():
        trainer.raw_model.lm_head.weight[0, 0] = float("inf")
    with pytest.raises(UserError, match=r"the weights are not finite at step 8 \(.*weight\); not writing them over"):
        trainer.save(best=True)
    assert last.read_bytes() == before
    assert sorted(p.name for p in last.parent.iterdir()) == ["best.pt", "last.pt"]


@pytest.mark.parametrize("value", [-1, 1.5, "abc", True])
def test_skip_nonfinite_must_be_a_count(tmp_path, value):
    with pytest.raises(UserError, match=re.escape(f"trainer.skip_nonfinite={value!r} must be a non-negative")):
        make_trainer(tmp_path, skip_nonfinite=value)


# ---- the real entry scripts --------------------------------------------------------------------------
SMALL = [*TINY, "hardware.threads=1", "hardware.autocast_dtype=float32", "hardware.peak_flops=1e12"]
# AdamW with this learning rate moves every weight by ~1e12 at the first update, so the next loss is nan whatever the
# seed or CPU. (The default optimizer, Muon, normalises its hidden-matrix updates: there the gradient norm overflows
# first, a different message.)
ADAMW_BLOWUP = ["optimizer=adamw", "optimizer.lr=1e12"]


def start_script(script: str, *args: str, cwd: Path, prefix: list[str] | None = None) -> subprocess.Popen:
    """Like conftest.run_script, but returns the running process (to signal it)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen((prefix or [sys.executable]) + [str(ROOT / script), *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(proc: subprocess.Popen, metrics: Path, step: int, timeout: float = 240) -> bool:
    """Wait until metrics.jsonl has a row at `step` or later (True) or the process has ended (False)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        lines = metrics.read_text().split("\n")[:-1] if metrics.is_file() else []  # complete lines only
        if any(json.loads(line)["step"] >= step for line in lines if line.strip()):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    raise AssertionError(f"no row at step {step} in {metrics} after {timeout}s")


def last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_signals_at_random_moments_resume_bit_identical(tmp_path):
    """SIGINT / SIGTERM at seeded random moments (anywhere in a step: forward, backward, the optimizer update,
    an evaluation, a save), each run resumed from the folder its line names, to the same max_iters: the
    val and train losses of every step and the final weights and optimizer state equal an uninterrupted run."""
    iters = 30
    common = [*SMALL, "model.dropout=0.1", f"trainer.max_iters={iters}", "trainer.eval_interval=7",
              "trainer.log_interval=2", "scheduler.schedule.warmup_iters=4", "stage.sample_tokens=4"]
    full = run_script("train.py", *common, f"hydra.run.dir={tmp_path / 'full'}", cwd=tmp_path,
                      env={"OMP_NUM_THREADS": "1"})
    assert full.returncode == 0, full.stderr[-2000:]
    rows = read_metrics(tmp_path / "full" / "metrics.jsonl")
    times = [r["time"] for r in rows if "train/loss" in r]
    step_seconds = (times[-1] - times[0]) / (iters - 2)

    rng = random.Random(9)
    targets = sorted(rng.sample(range(3, iters - 8), 3))  # room for the sleep below before the run ends
    parts, resume, interrupts = [], [], []
    for i, target in enumerate(targets + [None]):
        run = tmp_path / f"part{i}"
        proc = start_script("train.py", *common, f"hydra.run.dir={run}", *resume, cwd=tmp_path)
        if target is not None and wait_for_step(proc, run / "metrics.jsonl", target):
            time.sleep(rng.uniform(0, 3 * step_seconds))  # a random point of a later step
            sig = rng.choice([signal.SIGINT, signal.SIGTERM])
            proc.send_signal(sig)
        _, err = proc.communicate(timeout=300)
        parts.append(run / "metrics.jsonl")
        if proc.returncode == 0:
            assert "Traceback" not in err
            break
        assert proc.returncode == 128 + sig, err[-2000:]
        m = re.fullmatch(rf"interrupted at step (\d+) \({sig.name}\); saved {re.escape(str(run))}/checkpoints/last.pt; "
                         rf"resume with: python train.py resume=(.+)", last_line(err))
        assert m and m.group(2) == str(run), err[-2000:]
        assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == int(m.group(1))
        assert not list((run / "checkpoints").glob(".*tmp*"))
        interrupts.append(int(m.group(1)))
        resume = [f"resume={m.group(2)}"]
    assert len(interrupts) >= 3, interrupts  # the signals did land mid-run
    for key in ("val/loss", "train/loss", "train/eval_loss"):
        assert rows_by_step(*parts, key=key) == rows_by_step(tmp_path / "full" / "metrics.jsonl", key=key), key
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(parts[-1].parent / "checkpoints" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == iters
    assert_same_state(a["model"], b["model"])
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert_same_state(pa, pb)


@pytest.mark.slow
def test_ddp_ranks_agree_to_stop_when_one_rank_gets_the_signal(tmp_path):
    """SIGTERM to rank 1 alone: both ranks finish the same step (one all_reduce), rank 0 saves and says so,
    nobody hangs in a collective."""
    run = tmp_path / "run"
    proc = start_script("train.py", *SMALL, "hardware=ddp", "hardware.autocast_dtype=float32", "trainer.max_iters=2000",
                        "trainer.eval_interval=1000", f"hydra.run.dir={run}", cwd=tmp_path,
                        prefix=["torchrun", "--standalone", "--nproc_per_node=2"])
    try:
        assert wait_for_step(proc, run / "metrics.jsonl", 4), proc.communicate()[1][-3000:]
        workers = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and
                   f"PPid:\t{proc.pid}\n" in (p / "status").read_text() and
                   b"RANK=1\x00" in (p / "environ").read_bytes().replace(b"LOCAL_RANK", b"")]
        assert len(workers) == 1
        os.kill(workers[0], signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    m = re.search(r"interrupted at step (\d+) \(SIGTERM\); saved \S+/last.pt; resume with: python train.py resume=",
                  err)
    assert m, err[-3000:]
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == int(m.group(1))
    assert "Traceback" not in err.split("interrupted at step")[0][-2000:]


@pytest.mark.slow
def test_non_finite_run_ends_in_one_line_without_a_checkpoint(tmp_path):
    """eval_interval=1 with a learning rate that breaks the weights at the first update: before, sampling
    from the broken model crashed with a traceback; now one line, exit 2, and no last.pt is written."""
    proc = run_script("train.py", *SMALL, "trainer.eval_interval=1", *ADAMW_BLOWUP, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert last_line(proc.stderr).startswith("error: validation loss became nan at step 1: the weights no longer")
    assert not list(tmp_path.glob("outputs/*/*/checkpoints/*.pt"))


@pytest.mark.slow
def test_skip_nonfinite_from_the_command_line(tmp_path):
    proc = run_script("train.py", *SMALL, "trainer.eval_interval=100", "trainer.max_iters=20", *ADAMW_BLOWUP,
                      "trainer.grad_clip=0", "optimizer.weight_decay=0", "trainer.skip_nonfinite=3", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    line = last_line(proc.stderr)
    assert re.match(r"error: training loss became nan at step \d+ \(non-finite step 4; trainer.skip_nonfinite=3 "
                    r"allows 3\)", line), line
    assert (proc.stdout + proc.stderr).count("skipped the update (") == 3


@pytest.mark.slow
def test_classify_with_a_diverging_lr_writes_no_nan_checkpoint(tmp_path):
    from stage_helpers import make_parent, write_jsonl

    make_parent(tmp_path / "parent.pt")
    rows = [{"text": f"{w} {i}", "label": w} for i in range(20) for w in ("yes", "no")]
    write_jsonl(tmp_path / "labels.jsonl", rows)
    proc = run_script("finetune.py", "stage=classify", f"ckpt={tmp_path / 'parent.pt'}",
                      f"data={tmp_path / 'labels.jsonl'}", "trainer.max_iters=4", "trainer.eval_interval=1",
                      "trainer.eval_iters=1", "trainer.batch_size=4", "optimizer.lr=1e12", "hardware.threads=1",
                      "hardware.autocast_dtype=float32", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert re.match(r"error: (validation|training) loss became nan at step 1", last_line(proc.stderr))
    for f in tmp_path.glob("outputs/*/*/checkpoints/*.pt"):
        assert math.isfinite(torch.load(f, weights_only=True)["val_loss"]), f


FULL_DISK = """
import errno, runpy, sys, torch
real, calls = torch.save, []
def full_disk(obj, f, *args, **kwargs):  # the first {n} saves succeed, then the disk is full
    calls.append(1)
    if len(calls) > {n}:
        f.write(b"PK partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    return real(obj, f, *args, **kwargs)
torch.save = full_disk
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_full_disk_in_a_real_run_is_one_line(tmp_path):
    wrapper = tmp_path / "full_disk.py"
    wrapper.write_text(FULL_DISK.replace("{n}", "1"))  # the first evaluation's one write succeeds
    run = tmp_path / "run"
    proc = run_script("train.py", *SMALL, f"hydra.run.dir={run}", cwd=tmp_path, prefix=[sys.executable, str(wrapper)])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert re.fullmatch(rf"error: no space left on device while writing {re.escape(str(run))}/checkpoints/"
                        rf"(best|last).pt; the previous checkpoint is intact", last_line(proc.stderr))
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 3
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt", "last.pt"]


@pytest.mark.slow
def test_kill_9_at_random_moments_loses_nothing_saved(tmp_path):
    """SIGKILL (no handler runs) at seeded random moments, some inside a save: last.pt and best.pt always load,
    best.pt holds the best that last.pt records (or a newer one), the next start removes the temp files a
    killed save left, and resuming from last.pt each time ends bit-identical to an uninterrupted run."""
    iters = 24
    common = [*SMALL, "model.dropout=0.1", f"trainer.max_iters={iters}", "trainer.eval_interval=3",
              "trainer.log_interval=3", "stage.sample_tokens=4"]
    full = run_script("train.py", *common, f"hydra.run.dir={tmp_path / 'full'}", cwd=tmp_path,
                      env={"OMP_NUM_THREADS": "1"})
    assert full.returncode == 0, full.stderr[-2000:]
    rows = read_metrics(tmp_path / "full" / "metrics.jsonl")
    times = [r["time"] for r in rows if "train/loss" in r]
    step_seconds = (times[-1] - times[0]) / (iters - 3)

    rng = random.Random(3)
    sources, killed, run = [], 0, None
    for i, target in enumerate(sorted(rng.sample(range(4, iters - 6), 2)) + [None]):
        run = tmp_path / f"part{i}"
        proc = start_script("train.py", *common, f"hydra.run.dir={run}", *[f"resume={p}" for p in sources[-1:]],
                            cwd=tmp_path)
        if target is not None and wait_for_step(proc, run / "metrics.jsonl", target):
            time.sleep(rng.uniform(0, 3 * step_seconds))
            proc.kill()
        _, err = proc.communicate(timeout=300)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, err[-2000:]
        killed += 1
        ck = run / "checkpoints"
        if (ck / "last.pt").exists():  # else killed before its first save: resume from the previous run again
            last = torch.load(ck / "last.pt", weights_only=True)
            # best.pt is written by the run that found the best: this one or one it continues
            best = next(f for f in (p / "checkpoints" / "best.pt" for p in [run, *sources[::-1]]) if f.exists())
            assert torch.load(best, weights_only=True)["val_loss"] <= last["best_val_loss"]  # (or a newer best)
            sources.append(run)
    assert killed == 2 and sources
    for source in sources:  # each was resumed from by a later start
        assert not list((source / "checkpoints").glob(".*tmp*"))
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == iters
    assert_same_state(a["model"], b["model"])
    assert rows_by_step(*(tmp_path.glob("part*/metrics.jsonl")), key="val/loss") == \
        rows_by_step(tmp_path / "full" / "metrics.jsonl", key="val/loss")


STALLED_SAVE = """
import runpy, sys, time, torch
real, calls = torch.save, []
def stalled(obj, f, *args, **kwargs):  # the first {n} saves succeed; the next one stalls half-written
    calls.append(1)
    if len(calls) > {n}:
        f.write(b"PK partial")
        f.flush()
        time.sleep(120)
    return real(obj, f, *args, **kwargs)
torch.save = stalled
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_kill_9_inside_a_save(tmp_path):
    """SIGKILL while last.pt or best.pt is half-written: the files keep the previous save, the temp file is
    left, and the resumed run removes it and trains to the end."""
    wrapper = tmp_path / "stalled_save.py"
    wrapper.write_text(STALLED_SAVE.replace("{n}", "1"))  # the second evaluation's write stalls
    first, second = tmp_path / "first", tmp_path / "second"
    proc = start_script("train.py", *SMALL, f"hydra.run.dir={first}", cwd=tmp_path,
                        prefix=[sys.executable, str(wrapper)])
    try:
        deadline = time.time() + 240
        ck = first / "checkpoints"
        while not ((ck / "last.pt").exists() and list(ck.glob(".*.pt.tmp-*"))):  # the third save has begun
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
            time.sleep(0.01)
        proc.kill()
        proc.wait()
    finally:
        proc.kill()
    assert [torch.load(ck / n, weights_only=True)["step"] for n in ("best.pt", "last.pt")] == [3, 3]
    assert len(list(ck.glob(".*.pt.tmp-*"))) == 1
    proc = run_script("train.py", *SMALL, f"hydra.run.dir={second}", f"resume={first}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not list(ck.glob(".*tmp*"))
    assert torch.load(second / "checkpoints" / "last.pt", weights_only=True)["step"] == 6
