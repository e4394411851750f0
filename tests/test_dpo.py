"""DPO: the loss against hand-computed values, the frozen reference, accuracy rising on a tiny run."""

import math

import pytest
import torch

from gpt.errors import UserError
from gpt.stages.dpo import DPO, dpo_loss
from stage_helpers import make_parent, write_jsonl


def test_dpo_loss_by_hand():
    loss, chosen, rejected = dpo_loss(torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0]),
                                      torch.tensor([-1.5, -2.0]), torch.tensor([-1.5, -2.0]), beta=0.1)
    # row 0: 0.1 * ((-1 + 1.5) - (-2 + 1.5)) = 0.1;  row 1: 0.1 * ((-3 + 2) - (-1 + 2)) = -0.2
    expected = (math.log1p(math.exp(-0.1)) + math.log1p(math.exp(0.2))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert torch.allclose(chosen, torch.tensor([0.05, -0.1])) and torch.allclose(rejected, torch.tensor([-0.05, 0.1]))


def pairs(n):
    return [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)} for a in range(n) for b in range(n)]


def test_dpo_raises_preference_accuracy_and_keeps_reference_frozen(tmp_path):
    parent = make_parent(tmp_path / "p.pt")
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs(4))
    dpo = DPO(parent, str(data), val_data=str(data), batch_size=8, beta=0.5)
    ref_before = [p.clone() for p in dpo.reference.parameters()]
    assert all(not p.requires_grad for p in dpo.reference.parameters())
    ctx = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    before = dpo.evaluate(dpo.model, 4, ctx)
    assert before["val/loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at the start
    assert before["val/accuracy"] == 0.0 and before["val/chosen_reward"] == pytest.approx(0.0, abs=1e-6)
    opt = torch.optim.AdamW(dpo.model.parameters(), lr=3e-3)
    for _ in range(40):
        loss, _ = dpo.loss(dpo.model, dpo.train_batch())
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = dpo.evaluate(dpo.model, 4, ctx)
    assert after["val/loss"] < before["val/loss"] - 0.1
    assert after["val/accuracy"] > 0.8 and after["val/chosen_reward"] > after["val/rejected_reward"]
    assert all(torch.equal(a, b) for a, b in zip(ref_before, dpo.reference.parameters()))


def test_dpo_refuses_bad_pairs_and_wrong_parent(tmp_path):
    parent = make_parent(tmp_path / "p.pt")
    same = write_jsonl(tmp_path / "same.jsonl", [{"prompt": "1+1=", "chosen": "2", "rejected": "2"}])
    with pytest.raises(UserError, match=r"same\.jsonl:1: 'chosen' and 'rejected' are the same"):
        DPO(parent, str(same))
    parent["config"]["model"]["_target_"] = "gpt.heads.Classifier"
    with pytest.raises(UserError, match="stage=dpo needs gpt.model.GPT"):
        DPO(parent, str(same))


def test_nll_weight_adds_the_chosen_answers_nll_per_token_by_hand(tmp_path):
    """stage.nll_weight: loss = DPO + w * (-sum log pi(chosen) / chosen tokens), the chosen answers' log-probs
    computed here token by token with the model's own softmax."""
    parent = make_parent(tmp_path / "p.pt")
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs(3))
    plain = DPO(parent, str(data), val_data=str(data), batch_size=4, beta=0.5)
    rpo = DPO(parent, str(data), val_data=str(data), batch_size=4, beta=0.5, nll_weight=0.7)
    batch = plain.train_batch()
    with torch.no_grad():
        base, stats = plain.loss(plain.model, batch)
        both, _ = rpo.loss(rpo.model, batch)
        x, y = batch["x"][0::2], batch["y"][0::2]  # the chosen rows
        logp = torch.log_softmax(plain.model(x)[0].float(), dim=-1)
        mask = y >= 0
        picked = logp.gather(-1, y.clamp(min=0)[..., None])[..., 0]
        nll = -(picked * mask).sum() / mask.sum()
    assert stats["chosen_nll"].item() == pytest.approx(nll.item(), rel=1e-5)
    assert both.item() == pytest.approx(base.item() + 0.7 * nll.item(), rel=1e-5)
    with pytest.raises(UserError, match="stage.nll_weight=-1"):
        DPO(parent, str(data), nll_weight=-1)
