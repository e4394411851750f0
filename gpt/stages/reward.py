"""Reward model training with the Bradley-Terry loss on {"prompt","chosen","rejected"} pairs.

The model is the parent GPT with a scalar head read at the last real token of prompt + answer
(gpt.heads.RewardModel). For rewards r_w (chosen) and r_l (rejected):
    loss = -log sigmoid(r_w - r_l)      (P(chosen preferred) = sigmoid(r_w - r_l))
Evaluation reports the loss and the pairwise accuracy (r_w > r_l) on the held-out split.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from gpt.chat import chat_tokenizer
from gpt.encoding import encode_pair, fit_block, score_batch
from gpt.heads import RewardModel
from gpt.jsonl import read_pairs, split_val
from gpt.model import GPT
from gpt.parent import model_config, require_kind, with_head
from gpt.stages.common import ExampleObjective, positive_batch_size, validation_means
from gpt.tokenizer import from_identity

log = logging.getLogger("gpt")


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Rewards (B,) each -> mean -log sigmoid(chosen - rejected)."""
    return -F.logsigmoid(chosen - rejected).mean()


class Reward(ExampleObjective):
    """Train a RewardModel from a language-model parent (pretrained or SFT)."""

    name = "reward"

    def __init__(self, parent: dict, data: str, val_data: str | None = None, val_fraction: float = 0.1,
                 batch_size: int = 16, device: str = "cpu", seed: int = 0, rank: int = 0):
        require_kind(parent, (GPT,), self.name)
        batch_size = positive_batch_size(batch_size)
        self.tokenizer = tok = chat_tokenizer(from_identity(parent["tokenizer"]))
        self.model = with_head(RewardModel, parent, tok.vocab_size, device)
        block = self.model.config.block_size
        train, val = split_val(read_pairs(data), read_pairs(val_data) if val_data else None, val_fraction, seed,
                               str(data))
        # each pair -> (chosen ids, rejected ids); the template's masks are not needed for scoring
        self.train = [tuple(ids for ids, _ in p) for p in fit_block(
            [encode_pair(tok, p) for p in train], block, str(data), log)]
        self.val = [tuple(ids for ids, _ in p) for p in fit_block(
            [encode_pair(tok, p) for p in val], block, str(val_data or data), log)]
        self.batch_size, self.device = batch_size, device
        self.generator = torch.Generator().manual_seed(seed + 1000 * rank)
        self._order = None

    def _batch(self, pairs) -> tuple[torch.Tensor, torch.Tensor]:
        return score_batch([s for pair in pairs for s in pair], self.device)  # rows: chosen, rejected, ...

    @staticmethod
    def batch_tokens(batch) -> int:
        return int(batch[1].sum())

    @staticmethod
    def loss(model, batch):
        r = model.score(*batch)
        return bradley_terry_loss(r[0::2], r[1::2]), {"accuracy": (r[0::2] > r[1::2]).float().mean(),
                                                      "margin": (r[0::2] - r[1::2]).mean()}

    @torch.no_grad()
    def evaluate(self, model, iters: int, autocast) -> dict:
        return validation_means(self, model, iters, autocast)


    def checkpoint_extra(self) -> dict:
        return {"model_config": model_config(self.model)}
