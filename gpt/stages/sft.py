"""Supervised fine-tuning on instruction / chat data with the chat template (gpt/chat.py).

The loss is the mean cross-entropy over answer tokens only: prompt tokens, role tags and padding
have target -1 (ignore_index). Examples are right-padded, so under causal attention no real token
sees padding. Evaluation reports the masked val loss and greedy exact match of the answers.
"""

from __future__ import annotations

import logging

import torch

from gpt.chat import answer_stop_ids, chat_tokenizer, encode_chat
from gpt.encoding import fit_block
from gpt.errors import UserError
from gpt.generate import generate_batch
from gpt.jsonl import read_instructions, split_val
from gpt.model import GPT
from gpt.parallel import gathered
from gpt.parent import lm_from_parent, model_config, require_kind
from gpt.scoring import chat_exact_match
from gpt.stages.common import MaskedLMObjective, positive_batch_size
from gpt.tokenizer import from_identity

log = logging.getLogger("gpt")


class SFT(MaskedLMObjective):
    """Instruction tuning objective. `parent` is a loaded language-model checkpoint."""

    name = "sft"

    def __init__(self, parent: dict, data: str, val_data: str | None = None, val_fraction: float = 0.1,
                 batch_size: int = 16, device: str = "cpu", seed: int = 0, rank: int = 0, eval_examples: int = 64,
                 max_new_tokens: int = 32, num_samples: int = 3):
        require_kind(parent, (GPT,), self.name)
        batch_size = positive_batch_size(batch_size)
        self.tokenizer = tok = chat_tokenizer(from_identity(parent["tokenizer"]))
        self.model = lm_from_parent(parent, tok.vocab_size, device)
        block = self.model.config.block_size
        train = read_instructions(data)
        val = read_instructions(val_data) if val_data else None
        self.train_convs, self.val_convs = split_val(train, val, val_fraction, seed, str(data))
        self.train = fit_block([encode_chat(tok, c) for c in self.train_convs], block, str(data), log)
        self.val = fit_block([encode_chat(tok, c) for c in self.val_convs], block, str(val_data or data), log)
        self.val_convs = [c for c in self.val_convs if len(encode_chat(tok, c)[0]) <= block + 1]
        if not any(any(m) for _, m in self.train):
            raise UserError(f"{data}: no answer tokens to learn from")
        self.batch_size, self.device, self.seed = batch_size, device, seed
        self.eval_examples, self.max_new_tokens, self.num_samples = eval_examples, max_new_tokens, num_samples
        self.generator = torch.Generator().manual_seed(seed + 1000 * rank)

    # ---- the objective interface (gpt.trainer; batches and loss from MaskedLMObjective) --------
    @torch.no_grad()
    def evaluate(self, model, iters: int, autocast) -> dict:
        with gathered(model) as plain:  # FSDP: the decode engine needs the whole weights
            em = chat_exact_match(plain, self.tokenizer, self.val_convs[: self.eval_examples], autocast,
                                  self.max_new_tokens)
        return {"val/loss": self.val_loss(model, iters, autocast), "val/exact_match": em}

    def samples(self, model, autocast) -> list[dict]:
        convs = self.val_convs[: self.num_samples]
        prompts = [encode_chat(self.tokenizer, c[:-1], generation_prompt=True)[0] for c in convs]
        with autocast():
            outs = generate_batch(model, prompts, self.max_new_tokens, temperature=0.0,
                                  stop_ids=answer_stop_ids(self.tokenizer))
        rows = []
        for c, o in zip(convs, outs):
            prompt = c[-2]["content"] if len(c) > 1 else ""
            rows.append({"prompt": prompt, "text": f"{prompt!r} -> {self.tokenizer.decode(o)!r} "
                                                   f"(reference {c[-1]['content']!r})"})
        return rows


    # ---- what the checkpoint records ----------------------------------------------------------
    def checkpoint_extra(self) -> dict:
        return {"model_config": model_config(self.model)}
