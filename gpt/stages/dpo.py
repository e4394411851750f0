"""Direct Preference Optimization (Rafailov et al. 2023) against a frozen reference model.

For a pair (prompt, chosen y_w, rejected y_l) with summed answer log-probs under the policy (pi) and
the frozen reference (ref), the implicit rewards are r = beta * (log pi(y|x) - log ref(y|x)) and
    loss = -log sigmoid(r_w - r_l) + nll_weight * (-log pi(y_w|x) / |y_w|),
the second term (RPO, Pang et al. 2024; TRL's rpo_alpha) the chosen answers' mean negative log-likelihood per
token: pure DPO can raise the margin by lowering both answers' likelihood, and on tasks with one right answer
(arithmetic) the policy then says the right answer less often; with nll_weight > 0 it keeps learning it.
Reference log-probs are computed once per batch without gradients. Evaluation reports the loss, the
implicit chosen / rejected rewards, preference accuracy (r_w > r_l) and how often the policy itself
gives the chosen answer the higher probability.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F

from gpt.chat import chat_tokenizer
from gpt.encoding import encode_pair, fit_block, lm_batch
from gpt.errors import UserError
from gpt.jsonl import read_pairs, split_val
from gpt.model import GPT
from gpt.parent import frozen, lm_from_parent, model_config, require_kind
from gpt.stages.common import ExampleObjective, sequence_logprob, validation_means
from gpt.tokenizer import from_identity

log = logging.getLogger("gpt")


def dpo_loss(pi_chosen: torch.Tensor, pi_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed log-probs (B,) each -> (mean loss, chosen rewards (B,), rejected rewards (B,))."""
    chosen = beta * (pi_chosen - ref_chosen)
    rejected = beta * (pi_rejected - ref_rejected)
    return -F.logsigmoid(chosen - rejected).mean(), chosen.detach(), rejected.detach()


def chosen_nll(pi_chosen: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """The chosen answers' negative log-likelihood per token, over the batch: -sum(log pi) / sum(tokens)."""
    return -pi_chosen.sum() / chosen_tokens.sum().clamp(min=1)


class DPO(ExampleObjective):
    """Preference optimisation of a language model (usually an SFT checkpoint) on {"prompt","chosen","rejected"}."""

    name = "dpo"

    def __init__(self, parent: dict, data: str, val_data: str | None = None, val_fraction: float = 0.1,
                 batch_size: int = 16, beta: float = 0.1, nll_weight: float = 0.0, device: str = "cpu", seed: int = 0,
                 rank: int = 0):
        require_kind(parent, (GPT,), self.name)
        if int(batch_size) <= 0 or float(beta) <= 0:
            raise UserError(f"stage.batch_size={batch_size} and stage.beta={beta} must be positive")
        if not float(nll_weight) >= 0:
            raise UserError(f"stage.nll_weight={nll_weight} must be >= 0 (0: plain DPO)")
        self.nll_weight = float(nll_weight)
        self.tokenizer = tok = chat_tokenizer(from_identity(parent["tokenizer"]))
        self.model = lm_from_parent(parent, tok.vocab_size, device)
        self.reference = frozen(copy.deepcopy(self.model))
        block = self.model.config.block_size
        train, val = split_val(read_pairs(data), read_pairs(val_data) if val_data else None, val_fraction, seed,
                               str(data))
        self.train = fit_block([encode_pair(tok, p) for p in train], block, str(data), log)
        self.val = fit_block([encode_pair(tok, p) for p in val], block, str(val_data or data), log)
        self.batch_size, self.beta, self.device = int(batch_size), float(beta), device
        self.generator = torch.Generator().manual_seed(seed + 1000 * rank)
        self._order = None

    def _batch(self, pairs: list) -> dict:
        x, y = lm_batch([ex for pair in pairs for ex in pair], self.device)  # rows: chosen, rejected, chosen, ...
        with torch.no_grad():
            ref = sequence_logprob(self.reference, x, y)
        return {"x": x, "y": y, "ref": ref}

    @staticmethod
    def batch_tokens(batch) -> int:
        return int((batch["y"] >= 0).sum())

    def loss(self, model, batch):
        logp = sequence_logprob(model, batch["x"], batch["y"])
        loss, chosen, rejected = dpo_loss(logp[0::2], logp[1::2], batch["ref"][0::2], batch["ref"][1::2], self.beta)
        nll = chosen_nll(logp[0::2], (batch["y"][0::2] >= 0).sum(-1))
        if self.nll_weight:
            loss = loss + self.nll_weight * nll
        return loss, {"chosen_reward": chosen.mean(), "rejected_reward": rejected.mean(),
                      "accuracy": (chosen > rejected).float().mean(),
                      "logp_accuracy": (logp[0::2] > logp[1::2]).float().mean(), "chosen_nll": nll.detach()}

    @torch.no_grad()
    def evaluate(self, model, iters: int, autocast) -> dict:
        return validation_means(self, model, iters, autocast)


    def checkpoint_extra(self) -> dict:
        return {"model_config": model_config(self.model)}
