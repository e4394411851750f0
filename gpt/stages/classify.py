"""Sequence classification on {"text", "label"} JSONL: the parent GPT with a linear head over the
hidden state of the last real token (gpt.heads.Classifier), cross-entropy loss, accuracy on the
held-out split. The label names (sorted) are stored in the checkpoint next to the head."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from gpt.encoding import encode_texts, score_batch
from gpt.errors import UserError
from gpt.heads import Classifier, freeze_unused_output
from gpt.jsonl import read_labelled, split_val
from gpt.model import GPT
from gpt.parallel import call
from gpt.parent import model_config, require_kind, with_head
from gpt.stages.common import ExampleObjective, positive_batch_size, validation_means
from gpt.tokenizer import from_identity

log = logging.getLogger("gpt")


class Classify(ExampleObjective):
    name = "classify"

    def __init__(self, parent: dict, data: str, val_data: str | None = None, val_fraction: float = 0.1,
                 batch_size: int = 16, device: str = "cpu", seed: int = 0, rank: int = 0):
        require_kind(parent, (GPT,), self.name)
        batch_size = positive_batch_size(batch_size)
        self.tokenizer = tok = from_identity(parent["tokenizer"])
        train, val = split_val(read_labelled(data), read_labelled(val_data) if val_data else None, val_fraction,
                               seed, str(data))
        self.labels = sorted({lab for _, lab in train})
        if len(self.labels) < 2:
            raise UserError(f"{data}: found only the label(s) {self.labels}; classification needs at least two")
        unseen = sorted({lab for _, lab in val} - set(self.labels))
        if unseen:
            raise UserError(f"{val_data or data}: validation labels {unseen} never occur in the training data "
                            f"(labels {self.labels})")
        self.model = with_head(Classifier, parent, tok.vocab_size, device, num_labels=len(self.labels))
        freeze_unused_output(self.model)
        block = self.model.config.block_size
        index = {lab: i for i, lab in enumerate(self.labels)}
        self.train = list(zip(encode_texts(tok, [t for t, _ in train], block, str(data)), [index[lab] for _, lab in train]))
        self.val = list(zip(encode_texts(tok, [t for t, _ in val], block, str(val_data or data)),
                            [index[lab] for _, lab in val]))
        self.batch_size, self.device = batch_size, device
        self.generator = torch.Generator().manual_seed(seed + 1000 * rank)
        self._order = None

    def _batch(self, rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx, lengths = score_batch([ids for ids, _ in rows], self.device)
        return idx, lengths, torch.tensor([lab for _, lab in rows], device=self.device)

    @staticmethod
    def batch_tokens(batch) -> int:
        return int(batch[1].sum())

    @staticmethod
    def loss(model, batch):
        idx, lengths, labels = batch
        logits = call(model, Classifier.classify, idx, lengths)  # through the forward of a DDP / FSDP model
        return F.cross_entropy(logits, labels), {"accuracy": (logits.argmax(-1) == labels).float().mean()}

    @torch.no_grad()
    def evaluate(self, model, iters: int, autocast) -> dict:
        return validation_means(self, model, iters, autocast)


    def checkpoint_extra(self) -> dict:
        return {"model_config": model_config(self.model), "labels": list(self.labels)}

