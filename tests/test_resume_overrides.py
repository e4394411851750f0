"""On resume, an override is applied (optimizer, schedule, loop) or refused (what the checkpoint fixes), never
silently dropped."""

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import TINY
from inprocess import run_here
from gpt.run import apply_hyperparameters
from gpt.optim import param_groups
from gpt.runs import read_metrics


def _opt_sched(model, lr=1e-3, wd=0.1, total=20, warmup=2):
    cfg = OmegaConf.create({
        "optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": lr, "betas": [0.9, 0.99],
                      "weight_decay": wd},
        "scheduler": {"_target_": "gpt.optim.lambda_scheduler", "_partial_": True,
                      "schedule": {"_target_": "gpt.optim.WarmupCosine", "warmup_iters": warmup,
                                   "total_iters": total, "min_lr_ratio": 0.1}}})
    opt = instantiate(cfg.optimizer)(param_groups(model, wd))
    return cfg, opt, instantiate(cfg.scheduler)(opt)


def _restored(steps=5, **new):
    """An optimizer and scheduler stepped `steps` times, saved, and restored into fresh ones built from a
    config with `new` settings (as Trainer.restore does), then apply_hyperparameters(new config)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    _, opt, sched = _opt_sched(model)
    for _ in range(steps):
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        sched.step()
    state = (opt.state_dict(), sched.state_dict())
    cfg, opt2, sched2 = _opt_sched(model, **new)
    opt2.load_state_dict(state[0])
    sched2.load_state_dict(state[1])
    before = [dict((k, v) for k, v in g.items() if k != "params") for g in opt2.param_groups]
    apply_hyperparameters(opt2, sched2, cfg, model)
    return before, opt2, sched2


def test_same_config_changes_nothing():
    before, opt, _ = _restored()
    assert [dict((k, v) for k, v in g.items() if k != "params") for g in opt.param_groups] == before


def test_new_lr_and_schedule_take_effect():
    from gpt.optim import WarmupCosine

    _, opt, sched = _restored(lr=5e-4, total=40, wd=0.2)
    expected = 5e-4 * WarmupCosine(2, 40, 0.1)(sched.last_epoch)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([expected, expected], rel=1e-12)
    assert sched.lr_lambdas[0].total_iters == 40 and sched.base_lrs == [5e-4, 5e-4]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.0]  # the no-decay group stays so
    sched.step()  # the next step follows the new schedule too
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4 * WarmupCosine(2, 40, 0.1)(sched.last_epoch))


@pytest.mark.slow
def test_train_py_resume_applies_lr_and_refuses_model_changes(tmp_path):
    common = [*TINY, "trainer.max_iters=4", "trainer.eval_interval=4", "trainer.log_interval=1",
              "scheduler=constant", "scheduler.schedule.warmup_iters=0"]
    first = run_here("train.py", *common, "optimizer.lr=2e-3", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-1500:]
    (run,) = [p.parent.parent for p in tmp_path.glob("outputs/*/*/checkpoints/last.pt")]
    for bad, key in (("model.n_layer=3", "model"), ("seed=5", "seed")):  # data, tokenizer: the same rule
        proc = run_here("train.py", *common, "trainer.max_iters=6", f"resume={run}", bad, cwd=tmp_path)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and "cannot apply on resume" in lines[0], proc.stderr[-800:]
        assert f"fixes {key}" in lines[0]
    assert not (run / ".hydra" / "resume-1").exists()  # a refused resume leaves no record in the run folder
    for extra, lr in (([], 2e-3), (["optimizer.lr=1e-4"], 1e-4)):  # the run's own lr unless one is typed
        new = tmp_path / f"resumed-{lr}"  # a folder of its own each time (hydra.run.dir): both start at step 4
        resumed = run_here("train.py", *common, "trainer.max_iters=6", f"resume={run}", *extra,
                             f"hydra.run.dir={new}", cwd=tmp_path)
        assert resumed.returncode == 0, resumed.stderr[-1500:]
        lrs = {r["step"]: r["train/lr"] for r in read_metrics(new / "metrics.jsonl") if "train/lr" in r}
        assert set(lrs) == {5, 6} and all(v == pytest.approx(lr) for v in lrs.values()), (extra, lrs)


@pytest.mark.parametrize("warmup, iters, warned", [(100, 6, True), (6, 6, True), (5, 6, False)])
def test_a_warmup_longer_than_the_run_is_warned_about(warmup, iters, warned):
    from gpt.run import schedule_warnings

    cfg = OmegaConf.create({"scheduler": {"schedule": {"warmup_iters": warmup}}, "trainer": {"max_iters": iters}})
    got = schedule_warnings(cfg)
    assert bool(got) == warned and all("warmup_iters" in w and "max_iters" in w for w in got)
