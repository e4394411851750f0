"""Resuming fine-tuning: the example sampler continues mid-epoch, finetune.py resume= continues exactly."""

import glob

import pytest
import torch

from conftest import TINY
from inprocess import run_here
from gpt.stages.completion import Completion
from gpt.tasks.arithmetic import write_task
from gpt.runs import read_metrics
from stage_helpers import make_parent, write_jsonl


def test_example_sampler_resumes_mid_epoch(tmp_path):
    parent = make_parent(tmp_path / "p.pt")
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "ab" * (i % 5 + 1)} for i in range(10)])
    a = Completion(parent, str(data), val_data=str(data), batch_size=3, seed=7)
    for _ in range(4):  # 3 batches per epoch: one full epoch and one batch into the next
        a.train_batch()
    state = a.state_dict()
    want = [a.train_batch()[0].tolist() for _ in range(5)]
    b = Completion(parent, str(data), val_data=str(data), batch_size=3, seed=123)
    b.load_state_dict(state)
    assert [b.train_batch()[0].tolist() for _ in range(5)] == want
    fresh = Completion(parent, str(data), val_data=str(data), batch_size=3, seed=7)
    assert fresh.state_dict()["generator"].equal(torch.Generator().manual_seed(7).get_state())


def _runs(base):
    return set(glob.glob(str(base / "outputs" / "*-*-*" / "*")))


@pytest.mark.slow
def test_finetune_resume_continues_exactly(tmp_path):
    files = write_task(tmp_path / "task", n=200, seed=0, hi=20)
    proc = run_here("train.py", *TINY, "data=text", f"data.path={files['pretrain']}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (pre,) = _runs(tmp_path)
    common = [f"data={files['sft_train']}", "trainer.eval_interval=6", "trainer.eval_iters=2", "trainer.log_interval=1",
              "trainer.batch_size=8", "stage.eval_examples=4", "hardware.autocast_dtype=float32",
              "scheduler.schedule.total_iters=12", "lora.r=2"]

    def finetune(*args):
        before = _runs(tmp_path)
        proc = run_here("finetune.py", *args, *common, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        new = _runs(tmp_path) - before
        if any(a.startswith("resume=") for a in args):
            assert not new  # continued in the resumed run's folder
            return args[0].split("=", 1)[1]
        (run,) = new
        return run

    full = finetune("stage=sft", f"ckpt={pre}", "trainer.max_iters=12")
    half = finetune("stage=sft", f"ckpt={pre}", "trainer.max_iters=6")
    resumed = finetune(f"resume={half}", "trainer.max_iters=12")
    a = torch.load(f"{full}/checkpoints/last.pt", weights_only=True)
    b = torch.load(f"{resumed}/checkpoints/last.pt", weights_only=True)
    assert b["step"] == 12 and b["resumed_from"] == f"{half}/checkpoints/last.pt"
    assert b["lineage"] == a["lineage"] and b["config"]["data"] == a["config"]["data"]
    assert a["model"].keys() == b["model"].keys() and any("lora_A" in k for k in a["model"])
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    loss = lambda run: {r["step"]: r["train/loss"] for r in read_metrics(f"{run}/metrics.jsonl") if "train/loss" in r}
    assert loss(full) == loss(resumed)  # one history in one folder: steps 1-6, then 7-12
    # what the checkpoint fixes (stage, data, lora, seed) cannot change on resume: refused, never dropped
    for bad in ("data=/other/file.jsonl",):  # lora, seed and ckpt follow the same rule (gpt.run.adopt)
        proc = run_here("finetune.py", f"resume={half}", "trainer.max_iters=12", bad, cwd=tmp_path)
        assert proc.returncode == 2 and "cannot apply on resume" in proc.stderr, (bad, proc.stderr[-800:])
    # a pretraining run is not a finetune.py run
    proc = run_here("finetune.py", f"resume={pre}", cwd=tmp_path)
    assert proc.returncode == 2 and "is not a finetune.py checkpoint" in proc.stderr
