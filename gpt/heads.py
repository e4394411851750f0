"""GPTs with extra heads for the fine-tuning stages. Each is a GPT (so generation and checkpoints work
unchanged) plus a small `head` over the final hidden states; the backbone starts from a parent LM.

    RewardModel   scalar reward of a whole sequence, read at its last real token  (stage=reward)
                  (+ optionally the answer's log-likelihood under its own LM head)
    ValueHeadGPT  the policy LM plus a per-token value estimate                   (stage=ppo)
    Classifier    label logits of a whole sequence, read at its last real token   (stage=classify)
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt.errors import UserError
from gpt.model import GPT


def last_token(h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """h (B, T, C), lengths (B,) real tokens per right-padded row -> the hidden state of each row's last real token (B, C)."""
    return h[torch.arange(h.size(0), device=h.device), lengths - 1]


class RewardHead(nn.Linear):
    """The reward model's head: a zero-initialised (C -> 1) linear layer and, with answer_logp, the learned weight
    `logp_scale` (starting at 0) of the answer's log-likelihood in the score. One module, so its parameters are
    `head.*` like every stage's head (loaded as new, trained in full under LoRA)."""

    def __init__(self, n_embd: int, answer_logp: bool):
        super().__init__(n_embd, 1)
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)
        if answer_logp:
            self.logp_scale = nn.Parameter(torch.zeros(1))


def answer_logprob(lm_head: nn.Module, h: torch.Tensor, idx: torch.Tensor, starts: torch.Tensor,
                   lengths: torch.Tensor) -> torch.Tensor:
    """Each row's log-likelihood (float32, (B,)) of its tokens from position starts (at least 1) to its length,
    each predicted from the hidden state before it by the language-model head: sum_t log p(idx[t] | idx[:t]).
    Logits are computed at those positions only (a (rows, V) matrix, not (B, T, V))."""
    t = torch.arange(1, idx.size(1), device=idx.device)
    picked = (t >= starts.clamp(min=1)[:, None]) & (t < lengths[:, None])  # (B, T - 1): target positions
    rows = torch.arange(idx.size(0), device=idx.device)[:, None].expand_as(picked)[picked]
    nll = F.cross_entropy(lm_head(h[:, :-1][picked]).float(), idx[:, 1:][picked], reduction="none")
    return torch.zeros(idx.size(0), device=idx.device).index_add(0, rows, -nll)


class RewardModel(GPT):
    """GPT backbone + a scalar head on the last real token: score(idx, lengths) -> (B,).

    With answer_logp=True the score also reads the answer's log-likelihood under the model's own language-model
    head: score = head(last hidden state) + logp_scale x sum over the answer tokens of log p(token | before),
    where each row's answer starts at `starts` (the first token after the prompt). A one-layer head on the last
    token must recompute the answer to tell it from a near miss; the log-likelihood compares each answer token
    with the model's prediction at the position before it (README "The demo"). It is a sum, as DPO's implicit
    reward is: with a positive weight a shorter answer loses fewer terms, which the head can learn to offset."""

    def __init__(self, answer_logp: bool = False, **gpt_args):
        if not isinstance(answer_logp, bool):
            raise UserError(f"answer_logp={answer_logp!r} must be true or false")
        super().__init__(**gpt_args)
        self.answer_logp = answer_logp
        self.head = RewardHead(self.config.n_embd, self.answer_logp)

    def score(self, idx: torch.Tensor, lengths: torch.Tensor, starts: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) right-padded, lengths (B,), starts (B,) each row's first answer position (needed with
        answer_logp) -> rewards (B,) float32."""
        return self.score_hidden(self.hidden_states(idx), idx, lengths, starts)

    def score_hidden(self, h: torch.Tensor, idx: torch.Tensor, lengths: torch.Tensor,
                     starts: torch.Tensor | None) -> torch.Tensor:
        """score() from the backbone's hidden states h (B, T, C) of idx."""
        r = self.head(last_token(h, lengths)).squeeze(-1).float()
        if not self.answer_logp:
            return r
        if starts is None:
            raise ValueError("this reward model scores the answer's log-likelihood: pass starts, each row's first "
                             "answer position")
        return r + self.head.logp_scale.float() * answer_logprob(self.lm_head, h, idx, starts, lengths)

    def hparams(self) -> dict:
        return {**super().hparams(), "answer_logp": self.answer_logp}


class ValueHeadGPT(GPT):
    """The PPO policy: a GPT whose forward is unchanged (generation, infer.py) plus a value head.
    forward(idx, values=True) -> (logits (B, T, V), values (B, T)) from one pass over the shared backbone."""

    def __init__(self, **gpt_args):
        super().__init__(**gpt_args)
        self.head = nn.Linear(self.config.n_embd, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache=None, ignore_index: int = -1,
                pad: torch.Tensor | None = None, values: bool = False):
        """GPT.forward; with values=True -> (logits (B, T, V), values (B, T)) from one backbone pass (through
        forward, so DDP synchronises the value head's gradients too)."""
        if not values:
            return super().forward(idx, targets, cache, ignore_index, pad)
        h = self.hidden_states(idx, cache, pad)
        return self.lm_head(h), self.head(h).squeeze(-1).float()


class Classifier(GPT):
    """GPT backbone + a linear head over `num_labels` classes, pooled at the last real token."""

    def __init__(self, num_labels: int = 2, **gpt_args):
        super().__init__(**gpt_args)
        self.num_labels = int(num_labels)
        self.head = nn.Linear(self.config.n_embd, self.num_labels)

    def classify(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """idx (B, T) right-padded, lengths (B,) -> label logits (B, num_labels) float32."""
        return self.head(last_token(self.hidden_states(idx), lengths)).float()

    def hparams(self) -> dict:
        return {**super().hparams(), "num_labels": self.num_labels}


def freeze_unused_output(model: GPT) -> None:
    """For a head model whose loss never reads the language-model output layer (a classifier, a reward model
    without lm_weight or answer_logp): an untied lm_head gets no gradient, which DDP refuses at the next step (every trainable
    parameter must take part in each backward), so it is frozen; a tied one is the embedding, which trains."""
    if model.lm_head.weight is not model.transformer.wte.weight:
        model.lm_head.requires_grad_(False)


def model_classes() -> dict:
    """The model classes a checkpoint may name (its config's model._target_): the registry that
    gpt.checkpoint builds from and gpt.trust allows."""
    return {"gpt.model.GPT": GPT, "gpt.heads.RewardModel": RewardModel, "gpt.heads.ValueHeadGPT": ValueHeadGPT,
            "gpt.heads.Classifier": Classifier}
