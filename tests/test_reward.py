"""Reward model: Bradley-Terry loss by hand, scoring at the last real token, pairwise accuracy rising."""

import math

import pytest
import torch

from gpt.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from gpt.encoding import reward_batch, score_batch
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
    idx, lengths, _, _ = stage._batch(stage.val[:2])
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


def test_answer_logprob_by_hand_and_batched_equals_alone():
    """answer_logprob = sum over the answer tokens of log_softmax(plain forward logits at the position before);
    a padded batch scores each row as alone; score = head + logp_scale x that sum."""
    from gpt.heads import answer_logprob

    torch.manual_seed(0)
    model = RewardModel(answer_logp=True, vocab_size=10, block_size=16, n_layer=1, n_head=2, n_embd=16).eval()
    torch.nn.init.normal_(model.head.weight)
    model.head.logp_scale.data.fill_(0.7)
    rows = [([1, 2, 3, 4], 2), ([5, 6, 7, 8, 9, 1], 4)]
    idx, lengths, starts = reward_batch(rows, "cpu")
    with torch.no_grad():
        h = model.hidden_states(idx)
        got = answer_logprob(model.lm_head, h, idx, starts, lengths)
        for i, (ids, start) in enumerate(rows):
            logp = torch.log_softmax(model(torch.tensor([ids]))[0][0], -1)
            by_hand = sum(logp[t - 1, ids[t]].item() for t in range(start, len(ids)))
            assert got[i].item() == pytest.approx(by_hand, abs=1e-5)
            alone = model.score(torch.tensor([ids]), torch.tensor([len(ids)]), torch.tensor([start]))
            head = model.head(h[i, len(ids) - 1]).item()
            assert model.score(idx, lengths, starts)[i].item() == pytest.approx(alone.item(), abs=1e-5)
            assert alone.item() == pytest.approx(head + 0.7 * by_hand, abs=1e-5)
    with pytest.raises(ValueError, match="pass starts"):
        model.score(idx, lengths)


def test_scored_pair_moves_the_answer_start_with_a_left_cut():
    from gpt.chat import chat_tokenizer
    from gpt.encoding import encode_pair, scored_pair
    from gpt.tokenizer import CharTokenizer

    tok = chat_tokenizer(CharTokenizer("0123456789+= "))
    pair = {"prompt": "12+34=", "chosen": "46", "rejected": "47"}
    (ids, mask), _ = encode_pair(tok, pair)
    start = mask.index(True)
    assert scored_pair(tok, pair, 64)[0] == (ids, start)
    assert scored_pair(tok, pair, len(ids) - 3)[0] == (ids[3:], start - 3)
    assert scored_pair(tok, pair, 2)[0] == (ids[-2:], 1)  # the cut reaches into the answer: from the 2nd token


def test_answer_logp_reward_model_trains_its_weight_and_roundtrips(tmp_path):
    """stage.answer_logp: the weight starts at 0 (the score starts as the plain head's), is a head parameter that
    training moves, keeps the output layer trainable, and a checkpoint rebuilds the same scores."""
    parent = make_parent(tmp_path / "p.pt", tie_embeddings=False)
    rows = [{"prompt": f"{a}+{b}=", "chosen": f"{a + b}", "rejected": f"{a + b + 1}"} for a in range(5) for b in range(5)]
    data = write_jsonl(tmp_path / "t.jsonl", rows)
    stage = Reward(parent, str(data), val_data=str(data), batch_size=8, answer_logp=True)
    plain = Reward(parent, str(data), val_data=str(data), batch_size=8)
    assert stage.model.head.logp_scale.item() == 0 and stage.model.lm_head.weight.requires_grad
    batch = stage._batch(stage.val[:4])
    with torch.no_grad():
        assert torch.equal(stage.model.eval().score(*batch[:3]), plain.model.eval().score(*batch[:2]))
    opt = torch.optim.AdamW(stage.model.train().parameters(), lr=3e-3)
    for _ in range(20):
        loss, _ = stage.loss(stage.model, stage.train_batch())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert stage.model.head.logp_scale.item() != 0
    path = save_checkpoint({"model": stage.model.state_dict(), "step": 1, "tokenizer": stage.tokenizer.identity(),
                            "config": {"model": model_config(stage.model)}}, tmp_path / "r.pt")
    again = model_from_checkpoint(load_checkpoint(path))
    assert again.answer_logp and again.head.logp_scale.item() == stage.model.head.logp_scale.item()
    with torch.no_grad():
        assert torch.allclose(again.score(*batch[:3]), stage.model.eval().score(*batch[:3]), atol=1e-6)


def test_pairs_longer_than_the_block_are_dropped_by_their_longer_side(tmp_path, caplog):
    """fit_block measures a pair by its longer row: the reward model scores every token (at most block_size), DPO
    trains on ids[:-1] (block_size + 1). A pair whose rejected side alone is too long is dropped, not kept to
    fail in the forward."""
    from gpt.encoding import encode_pair, example_tokens, fit_block
    from gpt.stages.dpo import DPO

    parent = make_parent(tmp_path / "p.pt", block_size=16)
    rows = [{"prompt": "1+1=", "chosen": "2", "rejected": "3" * 40}, {"prompt": "1+2=", "chosen": "3", "rejected": "4"}]
    data = write_jsonl(tmp_path / "t.jsonl", rows)
    stage = Reward(parent, str(data), val_data=str(data), batch_size=2)
    assert len(stage.train) == 1 and example_tokens(stage.train[0]) <= 16
    loss, _ = stage.loss(stage.model, stage.train_batch())  # no "exceeds block_size" from a kept long pair
    assert torch.isfinite(loss)
    assert len(DPO(parent, str(data), val_data=str(data), batch_size=2).train) == 1
    tok = stage.tokenizer
    edge = encode_pair(tok, {"prompt": "1+1=", "chosen": "2", "rejected": "3" * 9})  # longer side: 17 = block + 1
    assert example_tokens(edge) == 17
    assert fit_block([edge, edge], 16, "x", __import__("logging").getLogger("t"), extra=1) == [edge, edge]
    with pytest.raises(UserError, match=r"x: every example is longer than the model's block_size=16 tokens"):
        fit_block([edge], 16, "x", __import__("logging").getLogger("t"), extra=0)


def test_a_checkpoint_whose_answer_logp_is_not_a_bool_is_refused(tmp_path):
    model = RewardModel(answer_logp=True, vocab_size=10, block_size=16, n_layer=1, n_head=2, n_embd=16)
    config = {**model_config(model), "answer_logp": "false"}
    path = save_checkpoint({"model": model.state_dict(), "step": 1, "config": {"model": config},
                            "tokenizer": {"type": "char", "chars": "0123456789"}}, tmp_path / "r.pt")
    with pytest.raises(UserError, match=r"answer_logp='false' must be true or false"):
        model_from_checkpoint(load_checkpoint(path))
