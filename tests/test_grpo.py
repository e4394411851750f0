"""GRPO: group-normalised advantages, the clipped surrogate and KL by hand, mean reward rising."""

import math

import pytest
import torch

from gpt.errors import UserError
from gpt.rl import clipped_surrogate
from gpt.stages.grpo import GRPO, group_advantages, kl_k3
from stage_helpers import make_parent, write_jsonl


def test_group_advantages_by_hand():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0]), group_size=4)
    # group 1: mean 0.25, std sqrt(0.1875) = 0.4330; group 2: all equal -> 0
    s = math.sqrt(0.1875)
    assert torch.allclose(adv[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]) / (s + 1e-4), atol=1e-5)
    assert torch.equal(adv[4:], torch.zeros(4))


def test_clipped_surrogate_and_kl_by_hand():
    logp = torch.log(torch.tensor([1.5, 0.5, 1.1]))
    old = torch.zeros(3)
    surr, clipped = clipped_surrogate(logp, old, torch.tensor([1.0, -1.0, 2.0]), clip=0.2)
    # ratio 1.5, A=1 -> min(1.5, 1.2) = 1.2 (clipped); ratio 0.5, A=-1 -> min(-0.5, -0.8) = -0.8 (clipped);
    # ratio 1.1, A=2 -> 2.2 (inside the clip range)
    assert torch.allclose(surr, torch.tensor([1.2, -0.8, 2.2]), atol=1e-6)
    assert clipped.tolist() == [True, True, False]
    d = torch.tensor([0.0, 0.5])
    assert torch.allclose(kl_k3(torch.zeros(2), d), torch.tensor([0.0, math.exp(0.5) - 1.5]))


def test_grpo_mean_reward_rises(tmp_path):
    parent = make_parent(tmp_path / "p.pt", seed=1)
    data = write_jsonl(tmp_path / "q.jsonl", [{"prompt": f"{a}+{b}=", "answer": "7"} for a in range(4) for b in range(4)])
    # the reward: the answer starts with 7; a random model does that with probability ~1/50
    grpo = GRPO(parent, str(data), reward_fn=lambda text, ans: float(text.startswith(ans)), val_data=str(data),
                prompts_per_rollout=4, group_size=8, minibatch_size=16, epochs=2, max_new_tokens=3, beta=0.01,
                eval_prompts=16)
    opt = torch.optim.AdamW(grpo.model.parameters(), lr=1e-2)
    for _ in range(40):  # 10 rollouts of 32 samples, 4 minibatch steps each
        loss, _ = grpo.loss(grpo.model, grpo.train_batch())
        opt.zero_grad()
        loss.backward()
        opt.step()
    rewards = grpo.stats["reward"]
    assert len(rewards) == 10 and len(grpo.stats["kl"]) == 40
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.2
    out = grpo.evaluate(grpo.model, 1, lambda: torch.autocast("cpu", enabled=False))
    assert out["val/reward"] > 0.5 and out["train/kl"] > 0 and 0 <= out["train/clip_fraction"] <= 1


def test_grpo_needs_reference_answers(tmp_path):
    parent = make_parent(tmp_path / "p.pt")
    data = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "1+1="}, {"prompt": "1+2="}])
    with pytest.raises(UserError, match="needs an 'answer'"):
        GRPO(parent, str(data), reward_fn=None)


def test_rollout_logprobs_are_those_of_the_tempered_sampling_distribution(tmp_path):
    """The stored rollout log-probs are log softmax(logits / T) of the sampled tokens (what the sampler drew
    from), only answer tokens up to the end token are trained, and the first update's ratio is exactly 1."""
    parent = make_parent(tmp_path / "p.pt", seed=3)
    data = write_jsonl(tmp_path / "q.jsonl", [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(4) for b in range(4)])
    grpo = GRPO(parent, str(data), reward_fn=lambda text, ans: float(text == ans), val_data=str(data),
                prompts_per_rollout=4, group_size=4, minibatch_size=16, epochs=1, max_new_tokens=5, temperature=0.5)
    buf = grpo.rollout()
    x, y, old = buf.data["x"], buf.data["y"], buf.data["old"]
    with torch.no_grad():
        logits = grpo.model(x)[0].float()
    tempered = torch.log_softmax(logits / 0.5, -1).gather(-1, y.clamp(min=0)[..., None]).squeeze(-1) * (y >= 0)
    plain = torch.log_softmax(logits, -1).gather(-1, y.clamp(min=0)[..., None]).squeeze(-1) * (y >= 0)
    assert torch.allclose(old, tempered, atol=1e-5) and not torch.allclose(old, plain, atol=1e-3)
    for row in y.tolist():  # trained targets: a contiguous answer ending at (at most) one end token
        targets = [t for t in row if t >= 0]
        assert grpo.end not in targets[:-1]
    grpo.buffer = buf
    grpo.loss(grpo.model, grpo.train_batch())
    assert grpo.stats["clip_fraction"][-1] == 0.0 and grpo.stats["kl"][-1] == pytest.approx(0.0, abs=1e-6)
