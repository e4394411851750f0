"""hardware=fsdp (FSDP2 fully_shard per block + root) under torchrun on CPU (gloo): the same run as DDP, a single
checkpoint file any script loads, resume exact and on another number of processes."""

from __future__ import annotations

import glob
import math
import os
import subprocess

import pytest
import torch

from conftest import ROOT, TINY, run_script
from gpt.runs import read_metrics
from inprocess import run_here
from test_watch import group_rows
from wandb_records import read_wandb_history

# AdamW: these runs must agree to float32 summation order. Muon (the default) orthogonalises in bfloat16, where
# such differences become bfloat16 roundings; tests/test_muon_parallel.py covers Muon under DDP and FSDP.
LOOP = [*TINY, "optimizer=adamw", "hardware.autocast_dtype=float32", "model.dropout=0.0", "trainer.log_interval=1"]
TORCHRUN = ["torchrun", "--standalone", "--nproc_per_node=2"]


def torchrun(cwd, *args):
    proc = run_script("train.py", *args, cwd=cwd, env={"OMP_NUM_THREADS": "1"}, prefix=TORCHRUN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def losses(folder) -> dict:
    return {r["step"]: r["train/loss"] for r in read_metrics(folder / "metrics.jsonl") if "train/loss" in r}


def weights(folder) -> dict:
    return torch.load(folder / "checkpoints" / "last.pt", weights_only=True)["model"]


# the runs also watch the model (per-group norms at log steps, histograms every 3 steps), which changes no number
# of the training: one pair of torchrun runs serves both kinds of test
WATCH = ["logger=wandb", "logger.mode=offline", "logger.watch=all", "logger.watch_interval=3"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("fsdp")
    torchrun(base, "hardware=ddp", *LOOP, *WATCH, "hydra.run.dir=ddp")
    torchrun(base, "hardware=fsdp", *LOOP, *WATCH, "hydra.run.dir=fsdp")
    return base


@pytest.mark.slow
def test_fsdp_trains_as_ddp_does(runs):
    """Two ranks, the same batches per rank: FSDP's 6 training losses and final weights equal DDP's up to
    float32 summation order (reduce-scatter vs all-reduce), rtol 1e-5."""
    a, b = losses(runs / "ddp"), losses(runs / "fsdp")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), step
    wa, wb = weights(runs / "ddp"), weights(runs / "fsdp")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.slow
def test_an_fsdp_checkpoint_is_one_file_that_samples_and_resumes_anywhere(runs, tmp_path):
    """(Resume under FSDP equal to the uninterrupted run, bit for bit: tests/test_muon_parallel.py, whose
    default optimizer holds both Muon and AdamW state.)"""
    ckpt = torch.load(runs / "fsdp" / "checkpoints" / "last.pt", weights_only=True)
    assert all(isinstance(k, int) for k in ckpt["optimizer"]["state"])  # torch's own format, not sharded
    proc = run_here("infer.py", f"ckpt={runs / 'fsdp'}", "prompt=ROMEO:", "max_new_tokens=8", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("ROMEO:"), proc.stderr[-2000:]
    # a single process (no FSDP) continues an FSDP checkpoint
    one = run_here("train.py", *LOOP, "trainer.max_iters=8", f"resume={runs / 'fsdp' / 'checkpoints' / 'last.pt'}",
                   f"hydra.run.dir={tmp_path / 'single'}", cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-2000:]
    assert torch.load(tmp_path / "single" / "checkpoints" / "last.pt", weights_only=True)["step"] == 8


@pytest.mark.slow
@pytest.mark.parametrize("hardware", ["ddp", "fsdp"])
def test_group_norms_under_ddp_and_fsdp(runs, hardware):
    """Watching under torchrun: rank 0 logs; under FSDP each rank's shards are summed: the groups make the global
    norm, and match DDP's (the same batches: float32 summation order apart, rtol 1e-4); histograms at the watched
    steps (tests/test_watch.py covers one process)."""
    rows = group_rows(runs / hardware / "metrics.jsonl")
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    ddp = group_rows(runs / "ddp" / "metrics.jsonl")
    for step, row in rows.items():
        norms = {k: v for k, v in row.items() if k.startswith(("grad_norm/", "update_ratio/"))}
        assert math.sqrt(sum(v ** 2 for k, v in norms.items() if k.startswith("grad_norm/"))) == pytest.approx(
            row["train/grad_norm"], rel=1e-5)
        assert norms == pytest.approx({k: ddp[step][k] for k in norms}, rel=1e-4) and len(norms) == 10
    files = glob.glob(str(runs / hardware / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1  # rank 0's
    steps = {r["_step"] for r in read_wandb_history(files[0]) if any(k.startswith("gradients/") for k in r)}
    assert steps == {3, 6}


def test_fsdp_shards_any_script_and_only_under_torchrun_with_hardware_fsdp():
    """Nothing is refused under hardware=fsdp any more (every finetune.py stage runs: tests/test_fsdp_finetune.py);
    without torchrun, or with hardware=ddp, the model is left as it is."""
    from omegaconf import OmegaConf

    from gpt.distributed import DistInfo
    from gpt.run import shard_for_fsdp

    fsdp = OmegaConf.create({"hardware": {"data_parallel": "fsdp"}})
    ddp = OmegaConf.create({"hardware": {"data_parallel": "ddp"}})
    model = torch.nn.Linear(2, 2)
    assert shard_for_fsdp(model, fsdp, DistInfo(0, 0, 1, "cpu")) is None  # one process
    assert shard_for_fsdp(model, ddp, DistInfo(0, 0, 2, "cpu")) is None
    assert type(model) is torch.nn.Linear


def test_the_structure_kept_for_decoding_copies_no_weights(monkeypatch):
    """gpt.parallel.meta_copy (what FSDP keeps to decode with gathered weights): meta parameters and buffers,
    tying kept, the LoRA/head structure the same, and no tensor of the model copied on the way (a deepcopy of the
    model used to hold a second set of its weights on every rank for a moment)."""
    from gpt.heads import Classifier
    from gpt.parallel import meta_copy

    model = Classifier(num_labels=3, vocab_size=50, block_size=8, n_layer=2, n_head=2, n_embd=16)
    model.register_buffer("scale", torch.ones(4))

    def refuse(self, memo):
        raise AssertionError("a tensor of the model was copied")

    monkeypatch.setattr(torch.Tensor, "__deepcopy__", refuse)
    monkeypatch.setattr(torch.nn.Parameter, "__deepcopy__", refuse)
    plain = meta_copy(model)
    monkeypatch.undo()
    assert all(p.is_meta for p in plain.parameters()) and all(b.is_meta for b in plain.buffers())
    assert plain.lm_head.weight is plain.transformer.wte.weight and type(plain) is Classifier
    assert [(n, p.shape, p.requires_grad) for n, p in plain.named_parameters()] == [
        (n, p.shape, p.requires_grad) for n, p in model.named_parameters()]
    assert not any(p.is_meta for p in model.parameters())


ONE_GLOBAL_BATCH = """
import json, sys
import torch, torch.distributed as dist
from gpt import parallel
from gpt.model import GPT, Block

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
model = GPT(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
parallel.shard(model, Block, mixed_precision=False)  # what hardware=fsdp does to the model
opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
batch = torch.load(sys.argv[1])
part = batch.size(1) // world  # each rank its rows of each global batch (steps x rows x tokens)
losses = []
for x, y in zip(batch[:, :, :-1], batch[:, :, 1:]):
    x, y = x[rank * part:(rank + 1) * part], y[rank * part:(rank + 1) * part]
    _, loss = model(x, y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    losses.append(float(mean) / world)
state = parallel.full_model_state(model)
if rank == 0:
    torch.save({"losses": losses, "model": state}, sys.argv[2])
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_fsdp_over_two_ranks_equals_one_process_on_the_same_global_batch(tmp_path):
    """FSDP2 over 2 ranks (gloo), each taking half of every global batch, against one process taking the whole
    batch: the same 6 losses and final weights to float32 summation order (reduce-scatter of the two halves'
    mean gradients vs one backward over the batch), rtol 1e-5. SGD with momentum, whose step is proportional to
    the gradient, so a reduction that summed instead of averaging, or missed a rank, shows (Adam's would hide a
    scale). float32, no dropout."""
    torch.manual_seed(1)
    steps = torch.randint(0, 50, (6, 8, 17))  # 6 steps of a global batch of 8 windows of 16 + 1 tokens
    torch.save(steps, tmp_path / "batch.pt")
    (tmp_path / "fsdp.py").write_text(ONE_GLOBAL_BATCH)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([*TORCHRUN, str(tmp_path / "fsdp.py"), str(tmp_path / "batch.pt"), str(tmp_path / "out.pt")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded = torch.load(tmp_path / "out.pt", weights_only=True)

    from gpt.model import GPT

    torch.manual_seed(0)
    model = GPT(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    losses = []
    for x, y in zip(steps[:, :, :-1], steps[:, :, 1:]):
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    assert sharded["losses"] == pytest.approx(losses, rel=1e-5)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(sharded["model"][k], v, rtol=1e-5, atol=1e-6, msg=k)
