"""PPO for RLHF (Ziegler et al. 2019, Ouyang et al. 2022) against a trained reward model.

Policy: the SFT parent with a value head on the shared backbone (gpt.heads.ValueHeadGPT). Reference:
the frozen SFT parent. Each rollout samples answers with the KV cache and records, per answer token t,
the rollout policy's log-prob, the value V_t and the reference log-prob. Rewards per token are
    r_t = -kl_coef * (log pi_old(a_t) - log ref(a_t))   (+ the reward model's score s on the last token),
where, with normalize_scores (the default), s is the score standardised over the rollout, (s - mean) / std:
a Bradley-Terry reward model's scores have an arbitrary offset and scale, and unscaled scores of a few units
make the value loss (on the backbone the policy shares) swamp the policy gradient and kl_coef meaningless;
advantages come from GAE(gamma, lambda) over the answer tokens and are whitened, returns = A + V.
The loss over `epochs` passes of minibatches is
    -min(rho A, clip(rho, 1 - eps, 1 + eps) A)  +  vf_coef * 0.5 * max((V - R)^2, (V_clip - R)^2)
with rho = pi / pi_old (the rollout policy, not the reference) and V_clip = V_old + clip(V - V_old, +-cv).
pi, pi_old and ref are the tempered distributions softmax(logits / temperature) the rollouts are sampled from.
"""

from __future__ import annotations

import torch

from gpt.chat import chat_tokenizer
from gpt.checkpoint import load_checkpoint, model_from_checkpoint
from gpt.encoding import reward_batch
from gpt.heads import RewardModel, ValueHeadGPT
from gpt.model import GPT
from gpt.parent import frozen, lm_from_parent, model_config, require_kind, require_same_tokenizer, with_head
from gpt.rl import (PromptSet, RolloutBuffer, answer_text, clipped_surrogate, end_id, logprobs_of, masked_mean,
                    sample_answers, sequences)
from gpt.stages.common import RolloutObjective
from gpt.tokenizer import from_identity


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over the masked (answer) positions of each row.

    rewards, values, mask (B, T); a row's answer positions are contiguous and the episode ends after its
    last one (bootstrap value 0). -> (advantages, returns) (B, T), zero outside the mask.
    """
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, device=rewards.device)
    for t in reversed(range(T)):
        nxt_mask = mask[:, t + 1] if t + 1 < T else torch.zeros(B, device=rewards.device)
        next_value = values[:, t + 1] * nxt_mask if t + 1 < T else torch.zeros(B, device=rewards.device)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last * nxt_mask) * mask[:, t]
        adv[:, t] = last
    return adv, (adv + values) * mask


def normalized(scores: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Scores (N,) standardised over the rollout: (s - mean) / (std + eps); all zero if N < 2."""
    if scores.numel() < 2:
        return torch.zeros_like(scores)
    return (scores - scores.mean()) / (scores.std(unbiased=False) + eps)


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: float) -> torch.Tensor:
    """Per-token clipped value loss 0.5 * max((V - R)^2, (V_old + clip(V - V_old) - R)^2)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)


class PPO(RolloutObjective):
    name = "ppo"

    def __init__(self, parent: dict, data: str, reward_ckpt: str, val_data: str | None = None,
                 val_fraction: float = 0.1, prompts_per_rollout: int = 32, minibatch_size: int = 16, epochs: int = 4,
                 max_new_tokens: int = 8, temperature: float = 1.0, top_k: int | None = None, clip: float = 0.2,
                 value_clip: float = 0.2, vf_coef: float = 0.5, kl_coef: float = 0.05, gamma: float = 1.0,
                 lam: float = 0.95, eval_prompts: int = 64, answer_reward=None, normalize_scores: bool = True,
                 device: str = "cpu", seed: int = 0, rank: int = 0, batch_size: int | None = None):
        require_kind(parent, (GPT,), self.name)
        self.tokenizer = tok = chat_tokenizer(from_identity(parent["tokenizer"]))
        reward = load_checkpoint(reward_ckpt, prefer="best", map_location=device)
        require_kind(reward, (RewardModel,), self.name, role="stage.reward_ckpt")
        require_same_tokenizer({"path": parent["path"], "tokenizer": tok.identity()}, reward, "stage.reward_ckpt")
        self.reward_model = frozen(model_from_checkpoint(reward, device))
        self.reward_path = reward["path"]
        self.model = with_head(ValueHeadGPT, parent, tok.vocab_size, device)
        self.reference = frozen(lm_from_parent(parent, tok.vocab_size, device))
        # a prompt and its answer must fit the policy and the reward model that scores them
        block = min(self.model.config.block_size, self.reward_model.config.block_size)
        self.prompts = PromptSet(tok, data, val_data, val_fraction, seed, block, max_new_tokens, need_answer=False)
        self.device, self.n_prompts, self.minibatch, self.epochs = device, prompts_per_rollout, minibatch_size, epochs
        self.max_new_tokens, self.temperature, self.top_k = max_new_tokens, temperature, top_k
        self.clip, self.value_clip, self.vf_coef, self.kl_coef = clip, value_clip, vf_coef, kl_coef
        self.gamma, self.lam, self.eval_prompts, self.answer_reward = gamma, lam, eval_prompts, answer_reward
        self.normalize_scores = bool(normalize_scores)
        self.end = end_id(tok)
        self.generator = torch.Generator().manual_seed(seed + 1000 * rank)
        self.buffer: RolloutBuffer | None = None

    @torch.no_grad()
    def score(self, prompts: list[list[int]], answers: list[list[int]]) -> torch.Tensor:
        return self.reward_model.score(*reward_batch([(p + a, len(p)) for p, a in zip(prompts, answers)],
                                                     self.device))

    @torch.no_grad()
    def rollout(self) -> RolloutBuffer:
        pick = torch.randint(len(self.prompts.train), (self.n_prompts,), generator=self.generator).tolist()
        prompts = [self.prompts.train[i]["ids"] for i in pick]
        answers = sample_answers(self.model, prompts, self.max_new_tokens, self.end, self.temperature, self.top_k,
                                 self.generator)
        answers = [a or [self.end] for a in answers]  # an empty answer (max_new_tokens=0) still ends
        scores = self.score(prompts, answers)
        x, y = sequences(prompts, answers, self.device)
        mask = (y >= 0).float()
        logits, values = self.model(x, values=True)
        logp = logprobs_of(logits, y, self.temperature)
        ref = logprobs_of(self.reference(x)[0], y, self.temperature)
        values = values * mask
        kl = (logp - ref) * mask
        rewards = -self.kl_coef * kl
        last = mask.sum(1).long() + (mask.argmax(1)) - 1  # each row's last answer position
        rewards[torch.arange(len(answers)), last] += normalized(scores) if self.normalize_scores else scores
        adv, returns = gae(rewards, values, mask, self.gamma, self.lam)
        adv = whiten(adv, mask)
        self.model.train()
        self._note(reward=scores.mean(), kl=kl.sum(1).mean())
        return RolloutBuffer({"x": x, "y": y, "old_logp": logp, "old_values": values, "adv": adv, "returns": returns},
                             self.minibatch, self.epochs, self.generator)

    def loss(self, model, batch):
        logits, values = model(batch["x"], values=True)
        mask = (batch["y"] >= 0).float()
        logp = logprobs_of(logits, batch["y"], self.temperature)
        t = self.temperature if self.temperature > 0 else 1.0
        logprobs = torch.log_softmax(logits.float() / t, -1)
        surr, clipped = clipped_surrogate(logp, batch["old_logp"], batch["adv"], self.clip)
        vf = value_loss(values, batch["old_values"], batch["returns"], self.value_clip)
        policy_loss, v_loss = -masked_mean(surr, mask), masked_mean(vf, mask)
        entropy = masked_mean(-(logprobs.exp() * logprobs).sum(-1), mask)
        self._note(policy_loss=policy_loss, value_loss=v_loss, entropy=entropy,
                   clip_fraction=masked_mean(clipped.float(), mask))
        return policy_loss + self.vf_coef * v_loss, {}

    @torch.no_grad()
    def evaluate(self, model, iters: int, autocast) -> dict:
        """Greedy answers to held-out prompts scored by the reward model (val/loss = -mean score), the
        exact-match rate where the prompts carry answers, and the training rollouts' statistics."""
        rows = self.prompts.val[: self.eval_prompts]
        prompts = [r["ids"] for r in rows]
        with autocast():
            answers = sample_answers(model, prompts, self.max_new_tokens, self.end, 0.0)
        answers = [a or [self.end] for a in answers]
        reward = float(self.score(prompts, answers).mean())
        out = {"val/loss": -reward, "val/reward": reward}
        if self.answer_reward is not None and all(r["answer"] is not None for r in rows):
            out["val/exact_match"] = sum(self.answer_reward(answer_text(self.tokenizer, a, self.end), r["answer"])
                                         for a, r in zip(answers, rows)) / len(rows)
        out.update(self._train_means())
        return out


    def checkpoint_extra(self) -> dict:
        return {"model_config": model_config(self.model), "reward_model": self.reward_path}
