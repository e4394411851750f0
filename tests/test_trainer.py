"""The training loop itself (gpt/trainer.py): gradient accumulation, clipping, the float16 GradScaler, and the
refusals and continuations of resume through the real entry scripts.

Unit tests drive Trainer.train_step on a tiny float32 GPT (dropout 0) with an objective that feeds fixed
batches, and read the update off plain SGD with lr 1 (new - old = -grad), so each claim is about the gradient
the loop applied. Everything that builds a Trainer goes through `make_trainer` below."""

from __future__ import annotations

import glob
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import TINY
from inprocess import run_here
from gpt.model import GPT
from gpt.trainer import Loop, Precision, Trainer

VOCAB, BLOCK = 11, 8


def make_trainer(model: torch.nn.Module, objective, tmp_path: Path, *, lr: float = 1.0,
                 grad_accum_steps: int = 1, grad_clip: float = 0.0, dtype: str = "float32",
                 optimizer: torch.optim.Optimizer | None = None, max_iters: int = 1) -> Trainer:
    """The one place these tests construct a Trainer (plain SGD, constant lr, no logger, no progress bar)."""
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    loop = Loop(max_iters=max_iters, eval_interval=10_000, eval_iters=1, grad_accum_steps=grad_accum_steps,
                grad_clip=grad_clip)
    return Trainer(model, objective, optimizer, scheduler, loop, precision=Precision("cpu", dtype), run_dir=tmp_path,
                   progress=False)


class FixedBatches:
    """An objective that hands out the given (x, y) batches in order; loss = the model's mean next-token loss."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]):
        self.batches, self.taken = batches, 0

    def train_batch(self):
        batch = self.batches[self.taken]
        self.taken += 1
        return batch

    def loss(self, model, batch):
        x, y = batch
        _, loss = model(x, y)
        return loss, {}

    @staticmethod
    def batch_tokens(batch) -> int:
        return batch[0].numel()

    def state_dict(self) -> dict:
        return {"taken": self.taken}

    def load_state_dict(self, state: dict) -> None:
        self.taken = state["taken"]


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(vocab_size=VOCAB, block_size=BLOCK, n_layer=2, n_head=2, n_embd=16, dropout=0.0)


def random_batch(rows: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, BLOCK + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def reference_grads(model: torch.nn.Module, batch) -> dict[str, torch.Tensor]:
    """The gradient of the model's mean loss on `batch`, computed without the Trainer."""
    model.zero_grad(set_to_none=True)
    _, loss = model(*batch)
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


def test_two_micro_batches_of_b_make_the_same_step_as_one_batch_of_2b(tmp_path):
    """grad_accum_steps=2 over the two halves of a batch == one step over the whole batch. Every micro-batch
    has the same number of tokens (no ignored targets), so mean of the two means == mean over all rows.
    Tolerance: only float32 summation order differs (two partial sums then a sum, vs one reduction), about
    1e-7 relative per value; rtol 1e-5 / atol 1e-6 allows that and fails on any missing or doubled 1/2 factor."""
    x, y = random_batch(8)
    one = tiny_gpt()
    accum = tiny_gpt()
    before = params(one)
    loss_one, _, tokens_one, ok_one = make_trainer(one, FixedBatches([(x, y)]), tmp_path).train_step()
    halves = [(x[:4], y[:4]), (x[4:], y[4:])]
    loss_acc, _, tokens_acc, ok_acc = make_trainer(accum, FixedBatches(halves), tmp_path,
                                                   grad_accum_steps=2).train_step()
    assert ok_one and ok_acc and tokens_one == tokens_acc == 8 * BLOCK
    assert loss_acc == pytest.approx(loss_one, rel=1e-5)
    after_one, after_acc = params(one), params(accum)
    assert any(not torch.equal(before[k], after_one[k]) for k in before)  # the step did move the weights
    for k in before:
        torch.testing.assert_close(after_acc[k], after_one[k], rtol=1e-5, atol=1e-6, msg=k)


def test_accumulated_step_applies_the_mean_gradient_of_the_micro_batches(tmp_path):
    """With SGD lr 1 and no clipping, the weights move by exactly -(g1 + g2) / 2."""
    x, y = random_batch(8, seed=3)
    model = tiny_gpt(seed=2)
    g1 = reference_grads(model, (x[:4], y[:4]))
    g2 = reference_grads(model, (x[4:], y[4:]))
    before = params(model)
    make_trainer(model, FixedBatches([(x[:4], y[:4]), (x[4:], y[4:])]), tmp_path, grad_accum_steps=2).train_step()
    after = params(model)
    for k in before:
        torch.testing.assert_close(before[k] - after[k], (g1[k] + g2[k]) / 2, rtol=1e-5, atol=1e-6, msg=k)


def test_clipping_caps_the_applied_gradient_norm_and_reports_the_norm_before_clipping(tmp_path):
    x, y = random_batch(4, seed=5)
    model = tiny_gpt(seed=4)
    grads = reference_grads(model, (x, y))
    full = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()])))
    clip = full / 10  # well below the gradient's norm, so the clip is active
    before = params(model)
    _, norm, _, updated = make_trainer(model, FixedBatches([(x, y)]), tmp_path, grad_clip=clip).train_step()
    after = params(model)
    assert updated and norm == pytest.approx(full, rel=1e-5)  # clip_grad_norm_ returns the norm before clipping
    step = {k: before[k] - after[k] for k in before}
    applied = float(torch.linalg.vector_norm(torch.stack([s.norm() for s in step.values()])))
    assert applied == pytest.approx(clip, rel=1e-4)
    scale = clip / (full + 1e-6)  # torch's clip_coef: the direction is kept, only the length changes
    for k in before:
        torch.testing.assert_close(step[k], grads[k] * scale, rtol=1e-4, atol=1e-7, msg=k)


def test_a_clip_above_the_norm_and_no_clip_leave_the_gradient_alone(tmp_path):
    x, y = random_batch(4, seed=6)
    for clip in (0.0, 1e6):
        model = tiny_gpt(seed=4)
        grads = reference_grads(model, (x, y))
        full = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()])))
        before = params(model)
        _, norm, _, _ = make_trainer(model, FixedBatches([(x, y)]), tmp_path, grad_clip=clip).train_step()
        after = params(model)
        assert norm == pytest.approx(full, rel=1e-5)
        for k in before:
            torch.testing.assert_close(before[k] - after[k], grads[k], rtol=1e-5, atol=1e-7, msg=(clip, k))


class Overflowing(FixedBatches):
    """A finite loss whose float16-scaled gradient is not finite: the scaler's overflow, not a bad loss.
    The loss is 1e35 * sum(w): finite in float32, but its gradient times the scale (65536) is inf."""

    def __init__(self, model_batches, overflow_at: set[int]):
        super().__init__(model_batches)
        self.overflow_at = overflow_at

    def loss(self, model, batch):
        loss, metrics = super().loss(model, batch)
        if self.taken - 1 in self.overflow_at:
            loss = loss + 1e35 * model.lm_head.weight.float().sum()
        return loss, metrics


def test_the_float16_grad_scaler_skips_an_overflowing_step_and_lowers_its_scale(tmp_path):
    """Real float16 autocast and torch.amp.GradScaler on the CPU (torch 2.13 runs both there; no fake scaler):
    an overflowing step leaves weights and optimizer state untouched and halves the scale; the next,
    finite step updates the weights with the unscaled gradient."""
    x, y = random_batch(4, seed=7)
    model = tiny_gpt(seed=8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    trainer = make_trainer(model, Overflowing([(x, y), (x, y)], overflow_at={0}), tmp_path, dtype="float16",
                           optimizer=optimizer, grad_clip=1.0)
    scaler = trainer.precision.scaler
    assert trainer.precision.dtype is torch.float16 and scaler.is_enabled()
    scale = scaler.get_scale()
    before = params(model)
    loss, norm, _, updated = trainer.train_step()
    assert math.isfinite(loss) and not math.isfinite(norm)
    # the loop counts it as a step (only a non-finite loss is skipped by the loop itself under float16) ...
    assert updated
    # ... but the scaler made no update: same weights, no Adam state, half the scale
    assert all(torch.equal(before[k], v) for k, v in params(model).items())
    assert not optimizer.state and scaler.get_scale() == scale / 2
    assert all(p.grad is None for p in model.parameters())  # the overflowing gradient is not carried over
    loss, norm, _, updated = trainer.train_step()
    assert updated and math.isfinite(norm) and 0 < norm
    assert any(not torch.equal(before[k], v) for k, v in params(model).items())
    assert scaler.get_scale() == scale / 2  # growth waits growth_interval (2000) clean steps
    assert all(int(s["step"]) == 1 for s in optimizer.state.values())


def test_float16_grad_is_unscaled_before_clipping(tmp_path):
    """Under the GradScaler the reported norm is the true gradient's (unscale_ before clip_grad_norm_), not
    65536 times it: the same as float32's to float16 precision."""
    x, y = random_batch(4, seed=9)
    norms = {}
    for dtype in ("float32", "float16"):
        model = tiny_gpt(seed=10)
        norms[dtype] = make_trainer(model, FixedBatches([(x, y)]), tmp_path, dtype=dtype, grad_clip=1e9).train_step()[1]
    assert norms["float16"] == pytest.approx(norms["float32"], rel=2e-2)


# ---- resume through the entry scripts ------------------------------------------------------------------

def runs(cwd: Path) -> list[Path]:
    return sorted(Path(p) for p in glob.glob(str(cwd / "outputs" / "*-*-*" / "*")))


def one_error_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    return lines[0]


@pytest.mark.slow
def test_train_py_resume_refuses_a_corpus_whose_tokenizer_changed(tmp_path):
    """A char tokenizer is built from the corpus: when the file behind data.path now has other characters,
    the checkpoint's weights do not fit its ids, and resume says so in one line (no new run folder)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("abcdefgh\n" * 300)
    args = [*TINY, "trainer.max_iters=2", "trainer.eval_interval=2", "data=text", f"data.path={corpus}",
            "hardware.autocast_dtype=float32"]
    first = run_here("train.py", *args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    (run,) = runs(tmp_path)
    corpus.write_text("abcdefgh\nxyz\n" * 300)  # three new characters
    proc = run_here("train.py", *args, "trainer.max_iters=4", f"resume={run}", cwd=tmp_path)
    line = one_error_line(proc)
    assert "was trained with tokenizer char" in line and "use the same data= and tokenizer=" in line
    assert runs(tmp_path) == [run]


@pytest.mark.slow
def test_finetune_py_resume_refuses_a_parent_that_changed(tmp_path):
    """The resumed run's frozen reference and lineage need the parent file it started from (sha256 recorded)."""
    from stage_helpers import make_parent, write_jsonl

    parent = tmp_path / "parent.pt"
    make_parent(parent, seed=0)
    data = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": f"{i}+{i}=", "completion": str(2 * i)} for i in range(20)])
    args = ["stage=sft", f"ckpt={parent}", f"data={data}", "trainer.max_iters=2", "trainer.eval_interval=2",
            "trainer.eval_iters=1", "trainer.batch_size=4", "stage.eval_examples=2", "stage.num_samples=1",
            "hardware.autocast_dtype=float32"]
    first = run_here("finetune.py", *args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    (run,) = runs(tmp_path)
    make_parent(parent, seed=1)  # same shape, other weights: the file's hash changes
    proc = run_here("finetune.py", f"resume={run}", "trainer.max_iters=4", cwd=tmp_path)
    line = one_error_line(proc)
    assert "changed since the run started" in line and str(parent) in line
    assert runs(tmp_path) == [run]


RL_LOOP = ["trainer.eval_interval=4", "trainer.eval_iters=1", "trainer.log_interval=1",
           "hardware.autocast_dtype=float32"]  # resume takes trainer.* and hardware.* from the command line
GRPO = ["stage=grpo", *RL_LOOP, "stage.prompts_per_rollout=2", "stage.group_size=2", "stage.minibatch_size=2",
        "stage.epochs=1", "stage.max_new_tokens=3", "stage.eval_prompts=2", "seed=3"]  # 2 steps per rollout


@pytest.fixture(scope="module")
def grpo_runs(tmp_path_factory) -> dict:
    """A tiny GRPO run of 8 steps, and the same run stopped at step 3 (inside a rollout) and resumed to 8 in its
    folder -> {"full": checkpoint, "full_rows": train rows by step, 3: (the run folder, its final checkpoint,
    its train rows by step)}."""
    from stage_helpers import make_parent, write_jsonl

    tmp_path = tmp_path_factory.mktemp("grpo_resume")
    make_parent(tmp_path / "parent.pt", seed=0)
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(8)])
    common = [*GRPO, f"ckpt={tmp_path / 'parent.pt'}", f"data={data}"]

    def train_rows(run: Path) -> dict:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        return {r["step"]: r for r in rows if "train/loss" in r}

    def last(run: Path) -> dict:
        return torch.load(run / "checkpoints" / "last.pt", weights_only=True)

    (tmp_path / "full").mkdir()
    full = run_here("finetune.py", *common, "trainer.max_iters=8", cwd=tmp_path / "full")
    assert full.returncode == 0, full.stderr[-2000:]
    (full_run,) = runs(tmp_path / "full")
    out = {"full": last(full_run), "full_rows": train_rows(full_run)}
    for stop in (3,):  # inside a rollout (4 steps each): the harder case; a rollout's end is a special one
        cwd = tmp_path / f"stop{stop}"
        cwd.mkdir()
        part = run_here("finetune.py", *common, f"trainer.max_iters={stop}", cwd=cwd)
        assert part.returncode == 0, part.stderr[-2000:]
        (first,) = runs(cwd)
        resumed = run_here("finetune.py", f"resume={first}", *RL_LOOP, "trainer.max_iters=8", cwd=cwd)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert runs(cwd) == [first]  # continued in its own folder
        out[stop] = (first, last(first), train_rows(first))
    return out


@pytest.mark.slow
def test_grpo_resume_inside_a_rollout_is_the_uninterrupted_run(grpo_runs):
    """An RL stage continues from last.pt: the step count, the schedule and the training rows go on from the
    checkpoint, and resumed in the middle of a rollout (its remaining minibatches are saved) the run is the
    uninterrupted one bit for bit (losses, lr, final weights). The resume repeats
    hardware.autocast_dtype=float32: hardware.* comes from the command line, and "auto" would be bf16 autocast
    on a CPU with bf16 instructions."""
    first, ckpt, rows = grpo_runs[3]
    full, full_rows = grpo_runs["full"], grpo_runs["full_rows"]
    assert ckpt["step"] == 8 and ckpt["stage"] == "grpo"
    assert ckpt["resumed_from"] == str(first / "checkpoints" / "last.pt")
    assert sorted(rows) == [1, 2, 3, 4, 5, 6, 7, 8]  # one history in the run's folder: steps 1-3, then 4-8
    for k in rows:
        assert (rows[k]["train/loss"], rows[k]["train/lr"]) == (full_rows[k]["train/loss"], full_rows[k]["train/lr"])
    for k in full["model"]:
        assert torch.equal(ckpt["model"][k], full["model"][k]), k


# ---- found while writing these tests -----------------------------------------------------------------

def test_generating_for_no_prompts_gives_no_rows():
    """stage.num_samples=0 (allowed) asks SFT's evaluation for no samples: no rows, not a traceback."""
    from gpt.generate import generate_batch

    assert generate_batch(tiny_gpt(), [], 4) == []


def test_ddp_all_reduces_gradients_only_on_the_last_micro_step(tmp_path, monkeypatch):
    """grad_accum_steps=3 under DDP: one gradient all-reduce per optimizer step (a comm hook counts the bucket
    reductions DDP starts), not one per micro-batch. A one-process gloo group runs DDP's real reducer."""
    import torch.distributed as dist

    from gpt.distributed import DistInfo

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("MASTER_PORT", str(s.getsockname()[1]))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        x, y = random_batch(6)
        model = tiny_gpt()
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        loop = Loop(max_iters=1, eval_interval=10_000, eval_iters=1, grad_accum_steps=3, grad_clip=0.0)
        trainer = Trainer(model, FixedBatches([(x[:2], y[:2]), (x[2:4], y[2:4]), (x[4:], y[4:])]), optimizer, scheduler,
                          loop, precision=Precision("cpu", "float32"), dist_info=DistInfo(0, 0, 1, "cpu"),
                          run_dir=tmp_path, progress=False)
        calls = []

        def counting(state, bucket):
            calls.append(bucket.index())
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut

        trainer.model.register_comm_hook(None, counting)
        trainer.train_step()
        buckets = len(set(calls))
        assert buckets >= 1 and len(calls) == buckets  # each bucket reduced once: on the last micro-batch only
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("saved,world", [(1, 2), (2, 4), (2, 1), (2, 2)])
def test_resuming_on_another_number_of_processes_gives_no_two_ranks_the_same_stream(saved, world):
    """Each rank the saved run had continues its own random/sampler state; a rank it did not have keeps its fresh
    one (None). Before, every rank of a resized run took rank 0's state and all of them drew the same batches."""
    from types import SimpleNamespace

    from gpt.distributed import DistInfo
    from gpt.trainer import Trainer

    states = [{"rank": r} for r in range(saved)]
    ckpt = {"rng": states[0], **({"rng_ranks": states} if saved > 1 else {})}
    got = [Trainer._rank_rng(SimpleNamespace(dist=DistInfo(r, r, world, "cpu")), ckpt) for r in range(world)]
    assert got == [states[r] if r < saved else None for r in range(world)]
    with pytest.raises(TypeError, match="rank 1's saved state is str"):
        Trainer._rank_rng(SimpleNamespace(dist=DistInfo(1, 1, 2, "cpu")), {"rng": {}, "rng_ranks": [{}, "x"]})


@pytest.mark.parametrize("grad_clip", [0.0, 1.0])
def test_a_step_synchronises_with_the_device_once_whatever_the_accumulation(tmp_path, monkeypatch, grad_clip):
    """On a GPU each read of a tensor's value on the host waits for the device. A step reads the micro-batches'
    losses and the gradient norm once, together (the skip decision needs them); it used to read each micro-batch's
    loss as it came. Counted here through every way a tensor becomes a Python number."""
    torch.manual_seed(0)
    model = GPT(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8)
    x = torch.randint(0, 11, (8, 8))
    trainer = make_trainer(model, FixedBatches([(x[i:i + 2], x[i:i + 2]) for i in range(0, 8, 2)]), tmp_path,
                           lr=0.1, grad_accum_steps=4, grad_clip=grad_clip, max_iters=10)
    with torch.no_grad():  # the step's loss: the mean of its micro-batches' losses before the update
        expected = sum(float(model(x[i:i + 2], x[i:i + 2])[1]) for i in range(0, 8, 2)) / 4
    reads = []
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _n=name, _o=original: reads.append(_n) or _o(self, *a))
    loss, norm, tokens, updated = trainer.train_step()
    monkeypatch.undo()
    assert reads == ["tolist"] and updated and tokens == 64
    assert loss == pytest.approx(expected, rel=1e-6) and math.isfinite(norm) and norm > 0


@pytest.mark.parametrize("saved_ranks, dropped", [(2, True), (1, False)])
def test_resuming_on_another_number_of_ranks_drops_half_served_work(tmp_path, saved_ranks, dropped):
    """An RL objective's rollout half served on some ranks only would put the ranks' rollouts (collectives) at
    different steps: on another number of ranks every rank drops it (drop_partial) and all start the next one
    together; on as many ranks it is kept (a resume mid-rollout equals the uninterrupted run)."""
    from gpt.trainer import rng_state

    class Partial(FixedBatches):
        def __init__(self):
            super().__init__([])
            self.buffer = "half a rollout"

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

        def drop_partial(self):
            self.buffer = None

    torch.manual_seed(0)
    model = GPT(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8)
    objective = Partial()
    trainer = make_trainer(model, objective, tmp_path)
    state = rng_state(objective)
    ckpt = {"model": model.state_dict(), "optimizer": trainer.optimizer.state_dict(), "step": 3, "path": "last.pt",
            "scheduler": trainer.scheduler.state_dict(), "rng": state,
            **({"rng_ranks": [state] * saved_ranks} if saved_ranks > 1 else {})}
    trainer.restore(ckpt)
    assert (objective.buffer is None) is dropped and trainer.state.step == 3
