"""GPTs with extra heads for the fine-tuning stages. Each is a GPT (so generation and checkpoints work
unchanged) plus a small `head` over the final hidden states; the backbone starts from a parent LM.

    RewardModel   scalar reward of a whole sequence, read at its last real token  (stage=reward)
    ValueHeadGPT  the policy LM plus a per-token value estimate                   (stage=ppo)
    Classifier    label logits of a whole sequence, read at its last real token   (stage=classify)
"""

from __future__ import annotations

import torch
import torch.nn as nn

from gpt.model import GPT


def last_token(h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """h (B, T, C), lengths (B,) real tokens per right-padded row -> the hidden state of each row's last real token (B, C)."""
    return h[torch.arange(h.size(0), device=h.device), lengths - 1]


class RewardModel(GPT):
    """GPT backbone + a scalar head on the last real token: score(idx, lengths) -> (B,)."""

    def __init__(self, **gpt_args):
        super().__init__(**gpt_args)
        self.head = nn.Linear(self.config.n_embd, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def score(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """idx (B, T) right-padded, lengths (B,) -> rewards (B,) float32."""
        return self.head(last_token(self.hidden_states(idx), lengths)).squeeze(-1).float()


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
    without lm_weight): an untied lm_head gets no gradient, which DDP refuses at the next step (every trainable
    parameter must take part in each backward), so it is frozen; a tied one is the embedding, which trains."""
    if model.lm_head.weight is not model.transformer.wte.weight:
        model.lm_head.requires_grad_(False)


def model_classes() -> dict:
    """The model classes a checkpoint may name (its config's model._target_): the registry that
    gpt.checkpoint builds from and gpt.trust allows."""
    return {"gpt.model.GPT": GPT, "gpt.heads.RewardModel": RewardModel, "gpt.heads.ValueHeadGPT": ValueHeadGPT,
            "gpt.heads.Classifier": Classifier}
