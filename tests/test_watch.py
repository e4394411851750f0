"""Watching a model train: logger.watch histograms of each parameter in the (offline) W&B run file at the
watched steps, per-group grad_norm/* and update_ratio/* in metrics.jsonl at log steps only (the groups'
gradient norms make up the global one; an SGD update ratio is lr * ||g|| / ||w||), nothing extra with
watch=null (the same numbers under DDP and FSDP: tests/test_fsdp.py)."""

from __future__ import annotations

import glob
import math

import pytest
import torch

from conftest import TINY, run_script
from gpt.errors import UserError
from gpt.model import GPT
from gpt.runs import read_metrics
from gpt.trainer import Loop, Precision, Trainer
from gpt.watch import LayerStats, group_of, histogram
from inprocess import run_here
from wandb_records import read_wandb_history

V = 11


class Toy:
    """Random token windows; the model's own loss."""

    def __init__(self):
        self.g = torch.Generator().manual_seed(0)

    def train_batch(self):
        x = torch.randint(V, (4, 9), generator=self.g)
        return x[:, :-1], x[:, 1:]

    def batch_tokens(self, batch) -> int:
        return batch[0].numel()

    def loss(self, model, batch):
        return model(*batch)[1], {}

    def evaluate(self, model, iters, autocast) -> dict:
        return {"val/loss": 1.0}

    def samples(self, model, autocast) -> list:
        return []

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Recorder:
    """A logger that keeps what it is given (`watch`, `watch_interval` as a WandbLogger holds them)."""

    def __init__(self, watch=None, watch_interval=100):
        self.watch, self.watch_interval = watch, watch_interval
        self.histograms: dict[int, dict] = {}

    def start(self, config, run_dir, resume_id=None):
        return None

    def log(self, metrics, step):
        pass

    def log_samples(self, step, rows):
        pass

    def log_histograms(self, step, histograms):
        self.histograms[step] = histograms

    def log_checkpoint(self, path, aliases=None):
        pass

    def finish(self, exit_code=0):
        pass


def make_trainer(run_dir, logger=None, layer_stats=True, max_iters=7, log_interval=3, grad_clip=1.0):
    torch.manual_seed(0)
    model = GPT(vocab_size=V, block_size=8, n_layer=2, n_head=2, n_embd=16, dropout=0.0, loss_chunk_size=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    loop = Loop(max_iters=max_iters, eval_interval=100, eval_iters=1, log_interval=log_interval,
                grad_clip=grad_clip, layer_stats=layer_stats)
    return Trainer(model, Toy(), opt, sched, loop, precision=Precision("cpu", "float32"), run_dir=run_dir,
                   logger=logger, checkpoint_meta={"config": {}, "tokenizer": {}}, progress=False)


def hooks(model: torch.nn.Module) -> int:
    """Hooks of any kind registered on the model's modules and parameters."""
    n = 0
    for m in model.modules():
        n += sum(len(getattr(m, a)) for a in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                                              "_backward_pre_hooks"))
    for p in model.parameters():
        n += len(p._backward_hooks or {}) + len(getattr(p, "_post_accumulate_grad_hooks", None) or {})
    return n


def group_rows(path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(path) if any(k.startswith("grad_norm/") for k in r)}


def test_groups_are_blocks_and_modules():
    assert group_of("transformer.h.3.attn.c_attn.weight") == "h.3"
    assert group_of("transformer.h.12.mlp.c_fc.bias") == "h.12"
    assert group_of("_orig_mod.transformer.h.0._checkpoint_wrapped_module.ln_1.weight") == "h.0"
    assert group_of("module.transformer.wte.weight") == "wte"
    assert group_of("transformer.ln_f.weight") == "ln_f"
    assert group_of("lm_head.weight") == "lm_head"


def test_histogram_counts_every_finite_value():
    t = torch.tensor([0.0, 1.0, 2.0, 3.0, float("nan"), float("inf"), 4.0])
    counts, edges = histogram(t, bins=4)
    assert sum(counts) == 5 and len(edges) == 5 and edges[0] == 0.0 and edges[-1] == 4.0
    assert histogram(torch.full((3,), 2.5)) == ([3.0], [2.5, 2.5])
    assert histogram(torch.tensor([float("nan")])) is None


def test_sgd_update_ratio_is_lr_times_gradient_over_weight_norm():
    """Plain SGD moves w by -lr * g: per group ||dw|| / ||w|| = lr * ||g|| / ||w||, computed here by hand."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model(torch.randn(5, 4)).square().sum().backward()
    stats = LayerStats(model)
    assert stats.groups == ["0", "1"]
    grads = stats.grad_norms()
    by_hand = {g: torch.cat([p.grad.flatten() for p in m.parameters()]).norm().item() for g, m in zip("01", model)}
    weights = {g: torch.cat([p.detach().flatten() for p in m.parameters()]).norm().item() for g, m in zip("01", model)}
    assert grads == pytest.approx({f"grad_norm/{g}": v for g, v in by_hand.items()}, rel=1e-6)
    stats.snapshot()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    ratios = stats.update_ratios()
    assert ratios == pytest.approx({f"update_ratio/{g}": 0.1 * by_hand[g] / weights[g] for g in "01"}, rel=1e-5)
    assert stats.update_ratios() == {}  # the copy is dropped after use


def test_group_stats_only_at_log_steps_and_their_norms_make_the_global_norm(tmp_path, monkeypatch):
    """With clipping on (grad_clip=1.0 clips these steps), the groups are measured before it: the square root
    of the sum of their squares is the logged train/grad_norm; steps that are not logged copy no weights."""
    snapshots = []
    original = LayerStats.snapshot
    monkeypatch.setattr(LayerStats, "snapshot", lambda self: (snapshots.append(1), original(self))[1])
    trainer = make_trainer(tmp_path, grad_clip=0.01)
    trainer.fit()
    rows = group_rows(tmp_path / "metrics.jsonl")
    assert sorted(rows) == [3, 6, 7] and len(snapshots) == 3  # log_interval=3 and the last step, no others
    for step, row in rows.items():
        groups = {k.split("/", 1)[1] for k in row if k.startswith("grad_norm/")}
        assert groups == {"wte", "wpe", "h.0", "h.1", "ln_f"}  # lm_head is tied to wte
        assert {k for k in row if k.startswith("update_ratio/")} == {f"update_ratio/{g}" for g in groups}
        assert row["train/grad_norm"] > 0.01  # the clip was active: the norms are taken before it
        combined = math.sqrt(sum(row[f"grad_norm/{g}"] ** 2 for g in groups))
        assert combined == pytest.approx(row["train/grad_norm"], rel=1e-5), step
        assert all(0 < row[f"update_ratio/{g}"] < 1 for g in groups)


def test_watch_null_adds_no_hook_and_takes_no_histogram(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a histogram was taken with logger.watch=null")

    monkeypatch.setattr(LayerStats, "histograms", refuse)
    logger = Recorder(watch=None, watch_interval=1)
    trainer = make_trainer(tmp_path, logger=logger)
    trainer.fit()
    assert hooks(trainer.raw_model) == 0 and logger.histograms == {}


def test_layer_stats_off_takes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(LayerStats, "__init__", lambda *a, **k: pytest.fail("LayerStats built with stats off"))
    make_trainer(tmp_path, layer_stats=False).fit()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert any("train/grad_norm" in r for r in rows)
    assert not any(k.startswith(("grad_norm/", "update_ratio/")) for r in rows for k in r)


def test_watch_gradients_only_at_its_interval(tmp_path):
    logger = Recorder(watch="gradients", watch_interval=2)
    trainer = make_trainer(tmp_path, logger=logger)
    trainer.fit()
    names = [n for n, p in trainer.raw_model.named_parameters()]
    assert sorted(logger.histograms) == [2, 4, 6]
    for step, hists in logger.histograms.items():
        assert set(hists) == {f"gradients/{n}" for n in names}, step
        counts, edges = hists["gradients/transformer.h.1.mlp.c_fc.weight"]
        assert sum(counts) == 16 * 64 and len(edges) == len(counts) + 1
    assert hooks(trainer.raw_model) == 0


@pytest.mark.slow
def test_wandb_offline_run_file_holds_the_histograms(tmp_path):
    proc = run_script("train.py", *TINY, "logger=wandb", "logger.mode=offline", "logger.watch=all",
                      "logger.watch_interval=3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = glob.glob(str(tmp_path / "outputs" / "*" / "*" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1
    run = files[0].split("/wandb/")[0]
    weights = torch.load(f"{run}/checkpoints/last.pt", weights_only=True)["model"]
    tied = weights["lm_head.weight"].data_ptr() == weights["transformer.wte.weight"].data_ptr()
    names = {k for k in weights if not (tied and k == "lm_head.weight")}  # a tied head is wte's one parameter
    watched = {}
    for row in read_wandb_history(files[0]):
        hist = {k.rsplit("/", 1)[0] for k, v in row.items() if k.endswith("/_type") and v == "histogram"}
        if hist:
            watched[row["_step"]] = hist
    assert sorted(watched) == [3, 6]
    for step, keys in watched.items():
        assert keys == {f"{kind}/{n}" for kind in ("gradients", "parameters") for n in names}, step
    rows = group_rows(f"{run}/metrics.jsonl")
    assert sorted(rows) == [2, 4, 6]  # log_interval=2: the group scalars on log rows only


def test_watch_needs_a_wandb_logger(tmp_path):
    proc = run_here("train.py", *TINY, "logger.watch=all", cwd=tmp_path)
    assert proc.returncode == 2
    assert "logger.watch='all'" in proc.stderr and "logger=wandb" in proc.stderr
    with pytest.raises(UserError, match="logger.watch_interval=0"):
        from gpt.tracking import WandbLogger

        WandbLogger(watch="all", watch_interval=0)
    proc = run_here("train.py", *TINY, "logger=wandb", "logger.mode=offline", "logger.watch=weights", cwd=tmp_path)
    assert proc.returncode == 2 and "logger.watch='weights'" in proc.stderr
