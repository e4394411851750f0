"""Reward model: Bradley-Terry loss by hand, scoring at the last real token, pairwise accuracy rising."""

import math

import pytest
import torch

from gpt.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from gpt.encoding import score_batch
from gpt.heads import RewardModel
from gpt.parent import model_config
from gpt.stages.reward import Reward, bradley_terry_loss
from stage_helpers import make_parent, write_jsonl


def test_bradley_terry_by_hand():
    loss = bradley_terry_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]))
    assert loss.item() == pytest.approx((math.log1p(math.exp(-1.0)) + math.log1p(math.exp(2.0))) / 2, rel=1e-6)


def test_score_reads_the_last_real_token_and_ignores_padding():
    torch.manual_seed(0)
    model = RewardModel(vocab_size=10, block_size=16, n_layer=1, n_head=2, n_embd=16).eval()
    torch.nn.init.normal_(model.head.weight)
    idx, lengths = score_batch([[1, 2, 3], [4, 5, 6, 7, 8]], "cpu")
    both = model.score(idx, lengths)
    alone = model.score(torch.tensor([[1, 2, 3]]), torch.tensor([3]))
    assert torch.allclose(both[0], alone[0], atol=1e-5)


def test_reward_model_learns_pairs_and_roundtrips_through_a_checkpoint(tmp_path):
    parent = make_parent(tmp_path / "p.pt")
    # a preference a tiny model can generalise from 20 pairs: the chosen answer is polite
    rows = [{"prompt": f"{a}+{b}=", "chosen": f"yes {a + b}", "rejected": f"no {a + b + 1}"}
            for a in range(5) for b in range(5)]
    train = write_jsonl(tmp_path / "t.jsonl", rows[:20])
    val = write_jsonl(tmp_path / "v.jsonl", rows[20:])
    stage = Reward(parent, str(train), val_data=str(val), batch_size=10)
    ctx = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    before = stage.evaluate(stage.model, 2, ctx)
    assert before["val/loss"] == pytest.approx(math.log(2), abs=1e-6)  # zero-initialised head: r_w = r_l
    opt = torch.optim.AdamW(stage.model.parameters(), lr=3e-3)
    for _ in range(60):
        loss, _ = stage.loss(stage.model, stage.train_batch())
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = stage.evaluate(stage.model, 2, ctx)
    assert after["val/loss"] < before["val/loss"] and after["val/accuracy"] >= 0.8
    path = save_checkpoint({"model": stage.model.state_dict(), "step": 1, "tokenizer": stage.tokenizer.identity(),
                            "config": {"model": model_config(stage.model)}}, tmp_path / "r.pt")
    again = model_from_checkpoint(load_checkpoint(path))
    assert type(again) is RewardModel
    batch = stage._batch(stage.val[:2])
    assert torch.allclose(again.score(*batch), stage.model.eval().score(*batch), atol=1e-6)
