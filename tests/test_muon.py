"""optimizer=muon (gpt.optim.MuonAdamW): Muon for the 2-D weights inside the Transformer blocks, AdamW for the
rest, as one optimizer the loop steps, schedules, clips, scales, saves and resumes like any other."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import TINY, run_script
from gpt.lora import apply_lora
from gpt.memory import optimizer_state_bytes
from gpt.model import GPT
from gpt.optim import MuonAdamW, WarmupCosine, build_optimizer, lambda_scheduler, param_groups
from gpt.run import apply_hyperparameters
from gpt.runs import read_metrics
from inprocess import run_here

MUON = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, muon_lr=0.05, momentum=0.9, nesterov=True,
            ns_steps=5, muon_weight_decay=0.01)


def tiny(bias=True) -> GPT:
    torch.manual_seed(0)
    return GPT(vocab_size=13, block_size=16, n_layer=2, n_head=2, n_embd=16, bias=bias)


def muon(model, **kw) -> MuonAdamW:
    return build_optimizer(functools.partial(MuonAdamW, **{**MUON, **kw}), model, MUON["weight_decay"])


def backward(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 13, (3, 16), generator=g)
    model(x, x)[1].backward()


def names_of(model, group) -> set[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)] for p in group["params"]}


@pytest.mark.parametrize("bias", [True, False])
def test_hidden_matrices_go_to_muon_the_rest_to_adamw(bias):
    m = tiny(bias)
    opt = muon(m)
    matrices, rest, hidden = opt.param_groups
    assert hidden["params"] and all(p.dim() == 2 for p in hidden["params"])
    assert names_of(m, hidden) == {f"transformer.h.{i}.{mod}.weight" for i in range(2)
                                   for mod in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert names_of(m, matrices) == {"transformer.wte.weight", "transformer.wpe.weight"}  # lm_head is tied to wte
    assert all(p.dim() == 1 for p in rest["params"]) and any(n.endswith(".bias") for n in names_of(m, rest)) == bias
    every = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(every) == len(set(every)) == len({id(p) for p in m.parameters()})  # each parameter once
    # each group its own base lr and weight decay; the inner optimizers hold these very dicts
    assert [g["lr"] for g in opt.param_groups] == [1e-2, 1e-2, 0.05]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0, 0.01]
    assert opt.adamw.param_groups[0] is matrices and opt.muon.param_groups[0] is hidden
    assert isinstance(opt.muon, torch.optim.Muon) and isinstance(opt.adamw, torch.optim.AdamW)


def test_llama_style_blocks_norm_gains_and_an_untied_head():
    """rope/rmsnorm/swiglu/qk-norm/GQA with untied embeddings: Muon gets the blocks' projections whatever
    their shapes, AdamW the embedding, the separate output layer and the (1-D) q/k norms."""
    torch.manual_seed(0)
    m = GPT(vocab_size=13, block_size=16, n_layer=2, n_head=2, n_embd=16, pos="rope", norm="rmsnorm", mlp="swiglu",
            qk_norm=True, n_kv_head=1, tie_embeddings=False)
    matrices, rest, hidden = muon(m).param_groups
    in_blocks = {n for n, p in m.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2}
    assert names_of(m, hidden) == in_blocks
    assert len(hidden["params"]) == 2 * 4
    assert names_of(m, matrices) == {"transformer.wte.weight", "lm_head.weight"}
    assert "transformer.h.0.attn.q_norm.weight" in names_of(m, rest)


def test_lora_factors_and_frozen_weights_stay_out_of_muon():
    m = tiny()
    apply_lora(m, r=2, alpha=4, targets=["attn.c_attn", "mlp.c_fc"])
    matrices, rest, hidden = muon(m).param_groups
    assert not hidden["params"]  # every hidden weight is frozen under LoRA: Muon's group is there, empty
    lora = {n for n, p in m.named_parameters() if ".lora_" in n}
    assert len(lora) == 2 * 2 * 2 and names_of(m, matrices) == lora  # A and B of 2 layers x 2 blocks, in AdamW
    assert all(p.requires_grad for g in (matrices, rest) for p in g["params"])


def test_a_step_equals_muon_and_adamw_stepped_separately():
    """Three scheduled steps of MuonAdamW == torch.optim.Muon on the hidden matrices and torch.optim.AdamW on
    the rest, built by hand and stepped one after the other: bit for bit."""
    a, b = tiny(), tiny()
    opt = muon(a)
    hidden = [p for n, p in b.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2]
    ids = {id(p) for p in hidden}
    decay = [p for p in b.parameters() if p.dim() == 2 and id(p) not in ids]
    rest = [p for p in b.parameters() if p.dim() < 2]
    m_opt = torch.optim.Muon(hidden, lr=0.05, weight_decay=0.01, momentum=0.9, nesterov=True, ns_steps=5)
    a_opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                              lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
    schedule = WarmupCosine(1, 3, 0.1)
    scheds = [lambda_scheduler(o, schedule) for o in (opt, m_opt, a_opt)]
    for step in range(3):
        backward(a, step)
        backward(b, step)
        opt.step()
        a_opt.step()
        m_opt.step()
        for o in (opt, m_opt, a_opt):
            o.zero_grad(set_to_none=True)
        for s in scheds:
            s.step()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.transformer.h[0].attn.c_attn.weight, tiny().transformer.h[0].attn.c_attn.weight)
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in a_opt.param_groups + m_opt.param_groups]


def test_state_dict_round_trip_continues_bit_exact(tmp_path):
    """Save after 2 steps (through torch.save / weights_only load, as a checkpoint), restore into a fresh
    optimizer over a copy of the model: the next 2 steps equal the uninterrupted optimizer's."""
    a = tiny()
    opt = muon(a)
    for step in range(2):
        backward(a, step)
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.save({"model": a.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    state, groups = saved["optimizer"]["state"], saved["optimizer"]["param_groups"]
    assert len(groups) == 3 and all("momentum_buffer" in state[i] for i in groups[2]["params"])
    b = tiny()
    b.load_state_dict(saved["model"])
    opt_b = muon(b)
    opt_b.load_state_dict(saved["optimizer"])
    assert opt_b.muon.param_groups[0] is opt_b.param_groups[2] and opt_b.muon.state is opt_b.state is opt_b.adamw.state
    for step in range(2, 4):
        for m, o in ((a, opt), (b, opt_b)):
            backward(m, step)
            o.step()
            o.zero_grad(set_to_none=True)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name


def test_grad_scaler_steps_it_and_skips_an_overflow():
    """float16's GradScaler: unscale_ then step() on the composite equals a plain step on the true gradients
    (the scale is a power of two), and an inf gradient skips the whole update, Muon's part included."""
    a, b = tiny(), tiny()
    opt_a, opt_b = muon(a), muon(b)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 13, (3, 16), generator=g)
    scaler.scale(a(x, x)[1]).backward()
    scaler.unscale_(opt_a)
    scaler.step(opt_a)
    scaler.update()
    b(x, x)[1].backward()
    opt_b.step()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=name)
    before = copy.deepcopy(a.state_dict())
    opt_a.zero_grad(set_to_none=True)
    scaler.scale(a(x, x)[1]).backward()
    a.transformer.h[0].attn.c_attn.weight.grad[0, 0] = float("inf")
    scaler.step(opt_a)
    scaler.update()
    assert scaler.get_scale() == 2.0**9  # halved after the overflow
    for k, v in a.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_memory_estimate_counts_one_buffer_for_muon_two_for_adamw():
    m = tiny()
    opt = muon(m)
    n = lambda group: sum(p.numel() for p in group["params"])  # noqa: E731
    matrices, rest, hidden = opt.param_groups
    assert optimizer_state_bytes(opt) == 4 * (2 * n(matrices) + 2 * n(rest) + n(hidden))
    assert optimizer_state_bytes(opt) < optimizer_state_bytes(torch.optim.AdamW(m.parameters()))


def _cfg(**muon_kw):
    node = {"_target_": "gpt.optim.MuonAdamW", "_partial_": True, **MUON, **muon_kw}
    node["betas"] = list(node["betas"])
    return OmegaConf.create({
        "optimizer": node,
        "scheduler": {"_target_": "gpt.optim.lambda_scheduler", "_partial_": True,
                      "schedule": {"_target_": "gpt.optim.WarmupCosine", "warmup_iters": 2, "total_iters": 20,
                                   "min_lr_ratio": 0.1}}})


def _resumed(**new):
    """A MuonAdamW + schedule stepped 5 times, restored into fresh ones built from a config with `new`
    settings, then apply_hyperparameters (as a resume does)."""
    m = tiny()
    cfg = _cfg()
    opt = build_optimizer(instantiate(cfg.optimizer), m, cfg.optimizer.weight_decay)
    sched = instantiate(cfg.scheduler)(opt)
    for step in range(5):
        backward(m, step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
    cfg2 = _cfg(**new)
    opt2 = build_optimizer(instantiate(cfg2.optimizer), m, cfg2.optimizer.weight_decay)
    sched2 = instantiate(cfg2.scheduler)(opt2)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    before = [{k: v for k, v in g.items() if k != "params"} for g in opt2.param_groups]
    apply_hyperparameters(opt2, sched2, cfg2, m)
    return before, opt2, sched2


def test_resume_with_the_same_settings_changes_no_group():
    before, opt, _ = _resumed()
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == before
    assert [g["initial_lr"] for g in opt.param_groups] == [1e-2, 1e-2, 0.05]


def test_resume_applies_new_settings_to_each_part():
    _, opt, sched = _resumed(lr=2e-3, muon_lr=0.03, weight_decay=0.2, muon_weight_decay=0.0, momentum=0.8)
    lam = WarmupCosine(2, 20, 0.1)(sched.last_epoch)
    assert sched.base_lrs == [2e-3, 2e-3, 0.03]
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2e-3 * lam, 2e-3 * lam, 0.03 * lam], rel=1e-12)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.0, 0.0]  # the no-decay group stays so
    assert opt.param_groups[2]["momentum"] == 0.8 and opt.muon.param_groups[0] is opt.param_groups[2]


@pytest.mark.parametrize("override, key", [("optimizer.ns_steps=100", "optimizer.ns_steps=100"),
                                           ("optimizer.muon_lr=0", "optimizer.muon_lr=0"),
                                           ("optimizer.adjust_lr_fn=rms", "optimizer.adjust_lr_fn='rms'")])
def test_bad_muon_settings_are_one_line(tmp_path, override, key):
    # a process of its own: in-process (tests/inprocess.py) after the earlier files of a full run, the refused
    # run passes its checks and the test still fails on a closed sys.stderr (cause not found yet)
    proc = run_script("train.py", *TINY, "optimizer=muon", override, cwd=tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and key in lines[0], proc.stderr[-800:]


def _weights(folder: Path) -> dict:
    return torch.load(folder / "checkpoints" / "last.pt", weights_only=True)["model"]


def _losses(folder: Path) -> dict:
    return {r["step"]: r["train/loss"] for r in read_metrics(folder / "metrics.jsonl") if "train/loss" in r}


@pytest.mark.slow
def test_train_py_resume_is_bit_exact_with_accumulation_and_clipping(tmp_path):
    """train.py optimizer=muon, 8 steps straight vs 4 + resume + 4 (2 micro-batches a step, grad_clip on,
    dropout on): the same losses and the same final weights, bit for bit."""
    common = [*TINY, "optimizer=muon", "model.dropout=0.1", "trainer.grad_accum_steps=2", "trainer.grad_clip=0.5",
              "trainer.log_interval=1", "trainer.eval_interval=4", "scheduler.schedule.warmup_iters=2",
              "scheduler.schedule.total_iters=8"]
    full = run_here("train.py", *common, "trainer.max_iters=8", f"hydra.run.dir={tmp_path / 'full'}", cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-2000:]
    half = run_here("train.py", *common, "trainer.max_iters=4", f"hydra.run.dir={tmp_path / 'half'}", cwd=tmp_path)
    assert half.returncode == 0, half.stderr[-2000:]
    resumed = run_here("train.py", *common, "trainer.max_iters=8", f"resume={tmp_path / 'half'}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _losses(tmp_path / "half") == _losses(tmp_path / "full") and len(_losses(tmp_path / "full")) == 8
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "half")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ckpt = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=True)
    assert [g["initial_lr"] for g in ckpt["optimizer"]["param_groups"]] == [3e-3, 3e-3, 0.02]  # conf/optimizer/muon


@pytest.mark.slow
def test_float16_with_grad_scaler_trains(tmp_path):
    proc = run_here("train.py", *TINY, "optimizer=muon", "hardware.autocast_dtype=float16",
                    f"hydra.run.dir={tmp_path / 'fp16'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert torch.load(tmp_path / "fp16" / "checkpoints" / "last.pt", weights_only=True)["scaler"]["scale"] > 0
    assert all(v == v for v in _losses(tmp_path / "fp16").values())  # finite losses, no NaN
