"""PPO: GAE on a short sequence and the clipped losses by hand, mean reward rising, wrong parents refused."""

import pytest
import torch

from gpt.errors import UserError
from gpt.heads import RewardModel
from gpt.stages.ppo import PPO, gae, normalized, value_loss, whiten
from stage_helpers import make_parent, write_jsonl


def test_gae_on_a_short_sequence_by_hand():
    # one row: a prompt position (masked), three answer tokens, one padding position
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0]])
    rewards = torch.tensor([[0.0, 0.1, -0.2, 1.0, 0.0]])
    values = torch.tensor([[0.0, 0.5, 0.4, 0.3, 0.0]])
    g, lam = 0.9, 0.8
    d3 = 1.0 - 0.3  # last token: no bootstrap
    d2 = -0.2 + g * 0.3 - 0.4
    d1 = 0.1 + g * 0.4 - 0.5
    a3 = d3
    a2 = d2 + g * lam * a3
    a1 = d1 + g * lam * a2
    adv, ret = gae(rewards, values, mask, g, lam)
    assert torch.allclose(adv, torch.tensor([[0.0, a1, a2, a3, 0.0]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[0.0, a1 + 0.5, a2 + 0.4, a3 + 0.3, 0.0]]), atol=1e-6)
    w = whiten(adv, mask)
    assert abs(float(w[mask.bool()].mean())) < 1e-6 and w[0, 0] == 0 and w[0, 4] == 0


def test_clipped_value_loss_by_hand():
    v = value_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]), torch.tensor([1.0, -1.0]), clip=0.2)
    # row 0: unclipped error 0, clipped prediction 0.2 -> 0.5 * 0.8^2 = 0.32 (the max); row 1: 0.5 * 1 = 0.5
    assert torch.allclose(v, torch.tensor([0.32, 0.5]))


@pytest.fixture
def parents(tmp_path):
    sft = make_parent(tmp_path / "sft.pt", seed=1, chat=True, stage="sft")
    reward = make_parent(tmp_path / "rm.pt", seed=2, chat=True, model_cls=RewardModel, stage="reward")
    data = write_jsonl(tmp_path / "q.jsonl", [{"prompt": f"{a}+{b}=", "answer": str(a + b)}
                                              for a in range(4) for b in range(4)])
    return sft, reward, data


def test_ppo_mean_reward_rises_against_the_reward_model(parents):
    sft, reward, data = parents
    ppo = PPO(sft, str(data), reward_ckpt=reward["path"], val_data=str(data), prompts_per_rollout=16,
              minibatch_size=8, epochs=2, max_new_tokens=3, kl_coef=0.01)
    assert not any(p.requires_grad for p in ppo.reference.parameters())
    assert not any(p.requires_grad for p in ppo.reward_model.parameters())
    opt = torch.optim.AdamW(ppo.model.parameters(), lr=1e-2)
    for _ in range(48):  # 12 rollouts of 16 answers, 2 epochs x 2 minibatches each
        loss, _ = ppo.loss(ppo.model, ppo.train_batch())
        opt.zero_grad()
        loss.backward()
        opt.step()
    rewards = ppo.stats["reward"]
    assert len(rewards) == 12 and len(ppo.stats["value_loss"]) == 48
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.3
    out = ppo.evaluate(ppo.model, 1, lambda: torch.autocast("cpu", enabled=False))
    for key in ("val/reward", "train/reward", "train/kl", "train/entropy", "train/clip_fraction", "train/value_loss"):
        assert key in out, key


def test_ppo_refuses_wrong_kinds_and_tokenizers(parents, tmp_path):
    sft, reward, data = parents
    with pytest.raises(UserError, match=r"stage.reward_ckpt=.*holds a gpt.model.GPT.*needs gpt.heads.RewardModel"):
        PPO(sft, str(data), reward_ckpt=sft["path"])
    with pytest.raises(UserError, match=r"ckpt=.*holds a gpt.heads.RewardModel.*stage=ppo needs gpt.model.GPT"):
        PPO(reward, str(data), reward_ckpt=reward["path"])
    other = make_parent(tmp_path / "rm2.pt", chat=False, model_cls=RewardModel)
    with pytest.raises(UserError, match="both must come from the same tokenizer"):
        PPO(sft, str(data), reward_ckpt=other["path"])


def test_reward_model_scores_are_standardised_over_the_rollout():
    """A Bradley-Terry score's offset and scale are arbitrary: PPO trains on (s - mean) / std of the rollout,
    so scores of a few units cannot swamp the KL penalty or the value loss on the shared backbone."""
    s = torch.tensor([10.0, 12.0, 14.0])
    assert torch.allclose(normalized(s), torch.tensor([-1.0, 0.0, 1.0]) * (3 / 8) ** 0.5 * 2, atol=1e-5)
    assert torch.allclose(normalized(s), normalized(100 * s - 7), atol=1e-5)
    assert torch.equal(normalized(torch.tensor([3.0])), torch.zeros(1))


def test_prompt_and_answer_must_fit_the_reward_models_block_too(parents, tmp_path):
    """The reward model scores prompt + answer: a reward model with a shorter context than the policy bounds the
    prompts, in one line at start, not a ValueError at the first rollout."""
    sft, _, data = parents
    short = make_parent(tmp_path / "rm_short.pt", seed=2, chat=True, model_cls=RewardModel, stage="reward",
                        block_size=8)
    with pytest.raises(UserError, match=r"exceeds the model's block_size=8") as e:
        PPO(sft, str(data), reward_ckpt=short["path"], max_new_tokens=3)
    assert "\n" not in str(e.value)
