"""Reward model training with the Bradley-Terry loss on {"prompt","chosen","rejected"} pairs.

The model is the parent GPT with a scalar head read at the last real token of prompt + answer
(gpt.heads.RewardModel). For rewards r_w (chosen) and r_l (rejected):
    loss = -log sigmoid(r_w - r_l)      (P(chosen preferred) = sigmoid(r_w - r_l))
Evaluation reports the loss and the pairwise accuracy (r_w > r_l) on the held-out split.

With lm_weight > 0 the loss adds lm_weight x the chosen answers' next-token NLL per token, read from the same
backbone pass through the parent's language-model head (kept in the reward model): the backbone keeps
predicting the right answer while it learns to score, which a score that must tell an answer from a near miss
needs (on the arithmetic demo it lifts the held-out near-miss accuracy; README "The demo").

With answer_logp the reward model's score adds a learned weight (starting at 0) x the answer's log-likelihood
under its own language-model head (gpt.heads.RewardModel): the model's next-token predictions, which already
tell a right answer from a near miss, become part of the score.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from gpt.chat import chat_tokenizer
from gpt.encoding import answer_start, encode_pair, fit_block, lm_batch, reward_batch
from gpt.errors import UserError
from gpt.heads import RewardModel, freeze_unused_output
from gpt.jsonl import read_pairs, split_val
from gpt.model import GPT
from gpt.parallel import call
from gpt.parent import model_config, require_kind, with_head
from gpt.stages.common import ExampleObjective, positive_batch_size, validation_means
from gpt.tokenizer import from_identity

log = logging.getLogger("gpt")


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Rewards (B,) each -> mean -log sigmoid(chosen - rejected)."""
    return -F.logsigmoid(chosen - rejected).mean()


def scores_and_logits(model: RewardModel, idx: torch.Tensor, lengths: torch.Tensor, starts: torch.Tensor,
                      lm_len: int):
    """idx (2B, T) rows chosen, rejected, ..., lengths and answer starts (2B,) -> (rewards (2B,) float32, the
    chosen rows' LM logits over their first lm_len positions (B, lm_len, V) float32, or None for lm_len 0), from
    one backbone pass."""
    h = model.hidden_states(idx)
    r = model.score_hidden(h, idx, lengths, starts)
    return r, (model.lm_head(h[0::2, :lm_len]).float() if lm_len else None)


class Reward(ExampleObjective):
    """Train a RewardModel from a language-model parent (pretrained or SFT)."""

    name = "reward"

    def __init__(self, parent: dict, data: str, val_data: str | None = None, val_fraction: float = 0.1,
                 batch_size: int = 16, lm_weight: float = 0.0, answer_logp: bool = False, device: str = "cpu",
                 seed: int = 0, rank: int = 0):
        require_kind(parent, (GPT,), self.name)
        batch_size = positive_batch_size(batch_size)
        if not float(lm_weight) >= 0:
            raise UserError(f"stage.lm_weight={lm_weight} must be >= 0 (0: the Bradley-Terry loss alone)")
        self.lm_weight = float(lm_weight)
        self.tokenizer = tok = chat_tokenizer(from_identity(parent["tokenizer"]))
        self.model = with_head(RewardModel, parent, tok.vocab_size, device, answer_logp=bool(answer_logp))
        if not self.lm_weight and not self.model.answer_logp:
            freeze_unused_output(self.model)
        block = self.model.config.block_size
        train, val = split_val(read_pairs(data), read_pairs(val_data) if val_data else None, val_fraction, seed,
                               str(data))
        # each pair -> [(chosen ids, train mask), (rejected ids, train mask)]; the chosen answer's mask marks
        # the tokens lm_weight trains on
        # the score reads every token of a pair's rows (the chosen row's NLL only their first block_size)
        self.train = fit_block([encode_pair(tok, p) for p in train], block, str(data), log, extra=0)
        self.val = fit_block([encode_pair(tok, p) for p in val], block, str(val_data or data), log, extra=0)
        self.batch_size, self.device = batch_size, device
        self.generator = torch.Generator().manual_seed(seed + 1000 * rank)
        self._order = None

    def _batch(self, pairs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (idx (2B, T) rows chosen, rejected, ..., lengths (2B,), answer starts (2B,), y (B, T): each chosen
        row's next token where the template trains on it (its answer and end marker), else -1)."""
        rows = [(ids, answer_start(mask)) for pair in pairs for ids, mask in pair]
        _, y = lm_batch([chosen for chosen, _ in pairs], self.device)  # position t predicts token t + 1
        return (*reward_batch(rows, self.device), y)

    @staticmethod
    def batch_tokens(batch) -> int:
        return int(batch[1].sum())

    def loss(self, model, batch):
        idx, lengths, starts, y = batch
        r, logits = call(model, scores_and_logits, idx, lengths, starts, y.size(1) if self.lm_weight else 0)
        loss = bradley_terry_loss(r[0::2], r[1::2])
        metrics = {"accuracy": (r[0::2] > r[1::2]).float().mean(), "margin": (r[0::2] - r[1::2]).mean()}
        if self.lm_weight:
            nll = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1)
            loss = loss + self.lm_weight * nll
            metrics["chosen_nll"] = nll.detach()
        return loss, metrics

    @torch.no_grad()
    def evaluate(self, model, iters: int, autocast) -> dict:
        return validation_means(self, model, iters, autocast)


    def checkpoint_extra(self) -> dict:
        return {"model_config": model_config(self.model)}
