"""Optimizer parameter groups and learning-rate multiplier schedules."""

import math

import pytest
import torch

from gpt.model import GPT
from gpt.optim import WarmupConstant, WarmupCosine, lambda_scheduler, param_groups


def tiny(bias=True):
    torch.manual_seed(0)
    return GPT(vocab_size=13, block_size=16, n_layer=2, n_head=2, n_embd=16, bias=bias)


@pytest.mark.parametrize("bias", [True, False])
def test_param_groups_decay_matrices_only(bias):
    m = tiny(bias)
    decay, no_decay = param_groups(m, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids_decay = {id(p) for p in decay["params"]}
    ids_no = {id(p) for p in no_decay["params"]}
    assert not ids_decay & ids_no
    names = {id(p): n for n, p in m.named_parameters()}
    assert ids_decay | ids_no == set(names)  # every parameter exactly once (tied wte/lm_head counted once)
    assert len(decay["params"]) == len(ids_decay) and len(no_decay["params"]) == len(ids_no)
    assert all(p.dim() == 2 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])
    decay_names = {names[i] for i in ids_decay}
    no_names = {names[i] for i in ids_no}
    assert "transformer.wpe.weight" in decay_names
    assert "transformer.h.0.attn.c_attn.weight" in decay_names and "transformer.h.1.mlp.c_fc.weight" in decay_names
    assert "transformer.ln_f.weight" in no_names and "transformer.h.0.ln_1.weight" in no_names
    assert any(n.endswith("wte.weight") or n == "lm_head.weight" for n in decay_names)
    assert any(n.endswith(".bias") for n in no_names) == bias
    # 4 Linear weights per layer + wpe + tied wte; 2 LN per layer + ln_f (+ their biases and 4 Linear biases)
    assert len(ids_decay) == 4 * 2 + 2
    assert len(ids_no) == (2 * 2 + 1) * (2 if bias else 1) + (4 * 2 if bias else 0)


def test_param_groups_skip_frozen_parameters_and_work_with_adamw():
    m = tiny()
    m.transformer.wpe.weight.requires_grad_(False)
    m.transformer.ln_f.weight.requires_grad_(False)
    groups = param_groups(m, 0.5)
    all_ids = {id(p) for g in groups for p in g["params"]}
    assert id(m.transformer.wpe.weight) not in all_ids and id(m.transformer.ln_f.weight) not in all_ids
    opt = torch.optim.AdamW(groups, lr=1e-3)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.5, 0.0]


def test_warmup_cosine_values():
    s = WarmupCosine(warmup_iters=10, total_iters=110, min_lr_ratio=0.1)
    assert s(0) == pytest.approx(1 / 11)
    assert s(4) == pytest.approx(5 / 11)
    assert s(9) == pytest.approx(10 / 11)
    assert s(10) == pytest.approx(1.0)  # end of warmup: peak
    assert s(35) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert s(60) == pytest.approx(0.55)  # midpoint of the decay
    assert s(109) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 99 / 100)))
    assert s(110) == pytest.approx(0.1)
    assert s(111) == pytest.approx(0.1) and s(10_000) == pytest.approx(0.1)
    values = [s(i) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay
    warm = [s(i) for i in range(0, 11)]
    assert all(a < b for a, b in zip(warm, warm[1:]))  # monotone warmup


def test_warmup_cosine_without_warmup_and_zero_floor():
    s = WarmupCosine(warmup_iters=0, total_iters=4, min_lr_ratio=0.0)
    assert [s(i) for i in range(6)] == pytest.approx([1.0, 0.5 + 0.5 * math.cos(math.pi / 4), 0.5,
                                                      0.5 - 0.5 * math.cos(math.pi / 4), 0.0, 0.0])


def test_warmup_constant_values():
    s = WarmupConstant(warmup_iters=4)
    assert [s(i) for i in range(7)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 1.0])
    assert WarmupConstant()(0) == 1.0 and WarmupConstant(0)(100) == 1.0


def test_lambda_scheduler_applies_multiplier_and_resumes():
    m = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    sched = lambda_scheduler(opt, WarmupCosine(2, 10, 0.1))
    sch = WarmupCosine(2, 10, 0.1)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.5 * sch(i) for i in range(6)])
    state = sched.state_dict()

    opt2 = torch.optim.SGD(m.parameters(), lr=0.5)
    sched2 = lambda_scheduler(opt2, WarmupCosine(2, 10, 0.1))
    sched2.load_state_dict(state)
    assert sched2.last_epoch == 6
    assert sched2.get_last_lr() == pytest.approx([0.5 * sch(6)])
