"""Plain-text fine-tuning: every document is wrapped as <|bos|> text <|endoftext|> and the loss covers
all of it (the text and its end token). Data: JSONL {"text"} records, or a .txt file whose documents are
separated by blank lines.

A document longer than the model's block is cut into windows of block_size + 1 tokens that overlap by
one token, so every token is a target exactly once; only the first window starts with <|bos|> and only
the last ends with <|endoftext|>. Short documents are right-padded (padding is masked out of the loss and,
under causal attention, never seen by a real token), so no document attends to another.

The end token is GPT-2's own <|endoftext|> for the gpt2 encoding (no new row) and a new special token
for the char vocabulary; infer.py then starts prompts with <|bos|> and stops at <|endoftext|>.
"""

from __future__ import annotations

import torch

from gpt.errors import UserError
from gpt.generate import generate_batch
from gpt.jsonl import read_texts, split_val
from gpt.model import GPT
from gpt.parent import lm_from_parent, model_config, require_kind
from gpt.stages.common import MaskedLMObjective, positive_batch_size
from gpt.tokenizer import BOS, EOT, from_identity, with_special_tokens


def document_windows(ids: list[int], block_size: int) -> list[list[int]]:
    """A document's ids (bos + text + eos) -> windows of at most block_size + 1 tokens, consecutive
    windows overlapping by one token, so each token after the first is predicted exactly once."""
    step = block_size
    return [ids[i: i + block_size + 1] for i in range(0, max(len(ids) - 1, 1), step)]


def encode_document(tok, text: str, bos: int, eos: int) -> list[int]:
    return [bos] + tok.encode(text) + [eos]


class Completion(MaskedLMObjective):
    """Fine-tuning on plain documents wrapped in BOS/EOS. `parent` is a language-model checkpoint."""

    name = "completion"

    def __init__(self, parent: dict, data: str, val_data: str | None = None, val_fraction: float = 0.1,
                 batch_size: int = 16, device: str = "cpu", seed: int = 0, rank: int = 0, num_samples: int = 3,
                 sample_tokens: int = 64, prompt_fraction: float = 0.3):
        require_kind(parent, (GPT,), self.name)
        batch_size = positive_batch_size(batch_size)
        if not 0.0 <= float(prompt_fraction) < 1.0:
            raise UserError(f"stage.prompt_fraction={prompt_fraction} must be in [0, 1)")
        self.tokenizer = tok = with_special_tokens(from_identity(parent["tokenizer"]), [BOS, EOT])
        self.bos, self.eos = tok.bos_id, tok.eot_id
        self.model = lm_from_parent(parent, tok.vocab_size, device)
        block = self.model.config.block_size
        train = read_texts(data)
        val = read_texts(val_data) if val_data else None
        self.train_texts, self.val_texts = split_val(train, val, val_fraction, seed, str(data))
        self.train = self._examples(self.train_texts, block)
        self.val = self._examples(self.val_texts, block)
        self.batch_size, self.device, self.seed = batch_size, device, seed
        self.num_samples, self.sample_tokens, self.prompt_fraction = num_samples, sample_tokens, prompt_fraction
        self.generator = torch.Generator().manual_seed(seed + 1000 * rank)

    def _examples(self, texts: list[str], block: int) -> list[tuple[list[int], list[bool]]]:
        out = []
        for t in texts:
            for w in document_windows(encode_document(self.tokenizer, t, self.bos, self.eos), block):
                out.append((w, [True] * len(w)))
        return out

    # ---- the objective interface (gpt.trainer; batches and loss from MaskedLMObjective) --------
    @torch.no_grad()
    def evaluate(self, model, iters: int, autocast) -> dict:
        return {"val/loss": self.val_loss(model, iters, autocast)}

    def samples(self, model, autocast) -> list[dict]:
        """Greedy continuations of the first prompt_fraction of a few held-out documents, to the end token."""
        texts = self.val_texts[: self.num_samples]
        prompts = []
        for t in texts:
            ids = self.tokenizer.encode(t)
            prompts.append([self.bos] + ids[: int(len(ids) * self.prompt_fraction)])
        block = self.model.config.block_size
        prompts = [p[-block:] for p in prompts]
        with autocast():
            outs = generate_batch(model, prompts, self.sample_tokens, temperature=0.0, eot_id=self.eos)
        rows = []
        for p, o in zip(prompts, outs):
            prompt = self.tokenizer.decode(p[1:] if p[0] == self.bos else p)
            rows.append({"prompt": prompt, "text": f"{prompt!r} -> {self.tokenizer.decode(o)!r}"})
        return rows

    # ---- what the checkpoint records ----------------------------------------------------------
    def checkpoint_extra(self) -> dict:
        return {"model_config": model_config(self.model),
                "document_tokens": {"bos": BOS, "eos": EOT}}
