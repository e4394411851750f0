"""Reward model: Bradley-Terry loss by hand, scoring at the last real token, pairwise accuracy rising."""

import math

import pytest
import torch

from gpt.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from gpt.encoding import score_batch
from gpt.errors import UserError
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
    idx, lengths, _ = stage._batch(stage.val[:2])
    assert torch.allclose(again.score(idx, lengths), stage.model.eval().score(idx, lengths), atol=1e-6)


def test_lm_weight_adds_the_chosen_answers_nll_from_the_same_pass(tmp_path):
    """loss = Bradley-Terry on model.score + lm_weight x the chosen answers' masked next-token NLL, the latter
    equal to the SFT loss of the chosen examples (gpt.encoding.lm_batch through the plain forward)."""
    from gpt.encoding import lm_batch

    parent = make_parent(tmp_path / "p.pt")
    rows = [{"prompt": f"{a}+{b}=", "chosen": f"{a + b}", "rejected": f"{a + b + 10}"} for a in range(3) for b in range(4)]
    data = write_jsonl(tmp_path / "t.jsonl", rows)
    plain = Reward(parent, str(data), val_data=str(data), batch_size=6)
    mixed = Reward(parent, str(data), val_data=str(data), batch_size=6, lm_weight=0.5)
    torch.manual_seed(0)
    torch.nn.init.normal_(mixed.model.head.weight)  # scores that differ, so the Bradley-Terry term is not ln 2
    model = mixed.model.eval()
    pairs = mixed.val[:6]
    batch = mixed._batch(pairs)
    with torch.no_grad():
        loss, metrics = mixed.loss(model, batch)
        bt, _ = plain.loss(model, batch)
        r = model.score(*batch[:2])
        x, y = lm_batch([chosen for chosen, _ in pairs], "cpu")
        _, nll = model(x, y, ignore_index=-1)
    assert bt.item() == pytest.approx(bradley_terry_loss(r[0::2], r[1::2]).item(), rel=1e-6)
    assert metrics["chosen_nll"].item() == pytest.approx(nll.item(), rel=1e-5)
    assert loss.item() == pytest.approx(bt.item() + 0.5 * nll.item(), rel=1e-5)
    assert (batch[2] >= 0).sum() == sum(sum(mask[1:]) for (_, mask), _ in pairs)  # answer and end marker only
    with pytest.raises(UserError, match=r"stage.lm_weight=-1 must be >= 0"):
        Reward(parent, str(data), lm_weight=-1)


@pytest.mark.parametrize("lm_weight, frozen", [(0.0, True), (1.0, False)])
def test_an_untied_output_layer_is_frozen_unless_lm_weight_reads_it(tmp_path, lm_weight, frozen):
    """(DDP needs a gradient for every trainable parameter in each backward; see tests/test_classify.py.)"""
    parent = make_parent(tmp_path / "p.pt", tie_embeddings=False)
    rows = [{"prompt": f"{a}+{b}=", "chosen": f"{a + b}", "rejected": f"{a + b + 1}"} for a in range(4) for b in range(4)]
    stage = Reward(parent, str(write_jsonl(tmp_path / "t.jsonl", rows)), batch_size=4, lm_weight=lm_weight)
    assert stage.model.lm_head.weight.requires_grad is not frozen
    loss, _ = stage.loss(stage.model, stage.train_batch())
    loss.backward()
    assert all(p.grad is not None for p in stage.model.parameters() if p.requires_grad)
