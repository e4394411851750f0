"""GRPO (Shao et al. 2024): reinforcement fine-tuning with a verifiable, rule-based reward.

Each rollout draws `prompts_per_rollout` prompts and samples `group_size` answers to each with the KV
cache. An answer's advantage is its reward normalised within its group, A = (r - mean_g) / (std_g + eps),
shared by its tokens. The loss per answer token is the clipped surrogate against the rollout policy
plus a KL penalty to the frozen reference (the k3 estimator, exp(d) - d - 1 with d = ref - pi):
    L = -mean_t [ min(rho A, clip(rho, 1 - eps, 1 + eps) A) - beta * KL_t ],   rho = pi / pi_rollout
Each rollout is used for `epochs` passes of minibatches. pi, pi_rollout and ref are the tempered distributions
softmax(logits / temperature) the rollouts are sampled from. Answers are cut after their end token, so no
token after it is trained.
"""

from __future__ import annotations

import copy

import torch

from gpt.chat import chat_tokenizer
from gpt.errors import UserError
from gpt.model import GPT
from gpt.parent import frozen, lm_from_parent, model_config, require_kind
from gpt.rl import (PromptSet, RolloutBuffer, answer_text, clipped_surrogate, end_id, logprobs_of, masked_mean,
                    sample_answers, sequences)
from gpt.stages.common import RolloutObjective
from gpt.tokenizer import from_identity


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """rewards (N * G,) in groups of G consecutive samples -> (r - group mean) / (group std + eps)."""
    r = rewards.view(-1, group_size)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True, unbiased=False) + eps)).view(-1)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from samples of pi: exp(d) - d - 1, d = ref - pi (>= 0)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


class GRPO(RolloutObjective):
    name = "grpo"

    def __init__(self, parent: dict, data: str, reward_fn, val_data: str | None = None, val_fraction: float = 0.1,
                 prompts_per_rollout: int = 8, group_size: int = 8, minibatch_size: int = 16, epochs: int = 2,
                 max_new_tokens: int = 8, temperature: float = 1.0, top_k: int | None = None, clip: float = 0.2,
                 beta: float = 0.04, eval_prompts: int = 64, device: str = "cpu", seed: int = 0, rank: int = 0,
                 batch_size: int | None = None):
        require_kind(parent, (GPT,), self.name)
        if group_size < 2:
            raise UserError(f"stage.group_size={group_size} must be at least 2 (advantages are relative to the group)")
        self.tokenizer = tok = chat_tokenizer(from_identity(parent["tokenizer"]))
        self.model = lm_from_parent(parent, tok.vocab_size, device)
        self.reference = frozen(copy.deepcopy(self.model))
        self.prompts = PromptSet(tok, data, val_data, val_fraction, seed, self.model.config.block_size,
                                 max_new_tokens, need_answer=True)
        self.reward_fn, self.device = reward_fn, device
        self.n_prompts, self.group, self.minibatch, self.epochs = prompts_per_rollout, group_size, minibatch_size, epochs
        self.max_new_tokens, self.temperature, self.top_k = max_new_tokens, temperature, top_k
        self.clip, self.beta, self.eval_prompts = clip, beta, eval_prompts
        self.end = end_id(tok)
        self.generator = torch.Generator().manual_seed(seed + 1000 * rank)
        self.buffer: RolloutBuffer | None = None

    @torch.no_grad()
    def rollout(self) -> RolloutBuffer:
        """Sample group_size answers for each of prompts_per_rollout prompts; score; normalise per group."""
        pick = torch.randint(len(self.prompts.train), (self.n_prompts,), generator=self.generator).tolist()
        rows = [self.prompts.train[i] for i in pick for _ in range(self.group)]
        prompts = [r["ids"] for r in rows]
        answers = sample_answers(self.model, prompts, self.max_new_tokens, self.end, self.temperature, self.top_k,
                                 self.generator)
        rewards = torch.tensor([self.reward_fn(answer_text(self.tokenizer, a, self.end), r["answer"])
                                for a, r in zip(answers, rows)], dtype=torch.float32)
        x, y = sequences(prompts, answers, self.device)
        old = logprobs_of(self.model(x)[0], y, self.temperature)
        ref = logprobs_of(self.reference(x)[0], y, self.temperature)
        self.model.train()
        self._note(reward=rewards.mean())
        adv = group_advantages(rewards, self.group).to(self.device)
        return RolloutBuffer({"x": x, "y": y, "old": old, "ref": ref, "adv": adv}, self.minibatch, self.epochs,
                             self.generator)

    def loss(self, model, batch):
        logp = logprobs_of(model(batch["x"])[0], batch["y"], self.temperature)
        mask = (batch["y"] >= 0).float()
        surr, clipped = clipped_surrogate(logp, batch["old"], batch["adv"][:, None], self.clip)
        kl = kl_k3(logp, batch["ref"])
        loss = -masked_mean(surr - self.beta * kl, mask)
        self._note(kl=masked_mean(kl.detach(), mask), clip_fraction=masked_mean(clipped.float(), mask))
        return loss, {}

    @torch.no_grad()
    def evaluate(self, model, iters: int, autocast) -> dict:
        """Greedy exact-match reward on held-out prompts (val/loss = 1 - mean reward), plus the training
        rollouts' mean reward, KL and clip fraction since the last evaluation."""
        rows = self.prompts.val[: self.eval_prompts]
        with autocast():
            answers = sample_answers(model, [r["ids"] for r in rows], self.max_new_tokens, self.end, 0.0)
        reward = sum(self.reward_fn(answer_text(self.tokenizer, a, self.end), r["answer"])
                     for a, r in zip(answers, rows)) / len(rows)
        out = {"val/loss": 1.0 - reward, "val/reward": reward}
        out.update(self._train_means())
        return out


    def checkpoint_extra(self) -> dict:
        return {"model_config": model_config(self.model)}
