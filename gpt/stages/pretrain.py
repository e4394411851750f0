"""Pretraining objective: next-token prediction on random windows of a token stream."""

from __future__ import annotations

import torch

from gpt.data import Prefetcher, TokenData, draw_starts, get_batch
from gpt.generate import generate_tokens
from gpt.stages.common import SeededObjective


class Pretrain(SeededObjective):
    """Draws (x, y) windows from `data`; loss is the model's mean next-token cross-entropy.

    Each rank samples with its own generator (seed + rank), so ranks read different data. Evaluation
    uses a generator reseeded every time, so every eval sees the same batches and losses compare.
    Training batches are assembled `prefetch` steps ahead in a background thread (default: 2 on CUDA, where
    the gather would otherwise sit between GPU steps; 0 elsewhere), drawn in the same order either way.
    """

    def __init__(self, data: TokenData, batch_size: int, block_size: int, device: str = "cpu", seed: int = 0,
                 rank: int = 0, pin_memory: bool = False, sample_prompt: str = "\n", sample_tokens: int = 200,
                 sample_temperature: float = 0.8, sample_top_k: int | None = 200, prefetch: int | None = None):
        from gpt.errors import UserError

        if int(batch_size) <= 0:
            raise UserError(f"trainer.batch_size={batch_size} must be a positive integer")
        self.data, self.batch_size, self.block_size, self.device = data, int(batch_size), int(block_size), device
        self.pin_memory = pin_memory
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed + 1000 * rank)
        self.sample = dict(prompt=sample_prompt, tokens=sample_tokens, temperature=sample_temperature, top_k=sample_top_k)
        for split in ("train", "val"):  # fail now, with a clear message, if a split is too short
            draw_starts(len(data.split(split)), 1, self.block_size, torch.Generator())
        if prefetch is None:
            prefetch = 2 if torch.device(device).type == "cuda" else 0
        self.batches = Prefetcher(data.train, self.batch_size, self.block_size, self.generator, device, pin_memory,
                                  depth=int(prefetch))
        self._waited = 0.0

    def _batch(self, split: str, generator: torch.Generator):
        return get_batch(self.data.split(split), self.batch_size, self.block_size, generator, self.device,
                         self.pin_memory)

    def train_batch(self):
        return self.batches.next()

    def data_seconds(self) -> float:
        """Seconds spent waiting for training batches since the last call (the trainer logs it per log step)."""
        waited, self._waited = self.batches.wait_seconds - self._waited, self.batches.wait_seconds
        return waited

    def state_dict(self) -> dict:
        return {"generator": self.batches.generator_state()}

    def load_state_dict(self, state: dict) -> None:
        self.batches.reset(state["generator"])

    @staticmethod
    def batch_tokens(batch) -> int:
        return batch[0].numel()

    @staticmethod
    def loss(model, batch):
        x, y = batch
        _, loss = model(x, y)
        return loss, {}

    @torch.no_grad()
    def evaluate(self, model, iters: int, autocast) -> dict:
        out = {}
        for split in ("train", "val"):
            g = torch.Generator().manual_seed(self.seed + 12345)
            losses = []
            for _ in range(iters):
                x, y = self._batch(split, g)
                with autocast():
                    _, loss = model(x, y)
                losses.append(float(loss))
            # the train split's estimate is named apart from the running train/loss of the log steps
            out["val/loss" if split == "val" else "train/eval_loss"] = sum(losses) / len(losses)
        return out

    def samples(self, model, autocast, n: int = 1) -> list[dict]:
        tok = self.data.tokenizer
        prompt = self.sample["prompt"]
        idx = torch.tensor([tok.encode(prompt)] * n, dtype=torch.long, device=self.device)
        g = torch.Generator(device=self.device).manual_seed(self.seed)
        with autocast():
            new = list(generate_tokens(model, idx, self.sample["tokens"], temperature=self.sample["temperature"],
                                       top_k=self.sample["top_k"], eot_id=tok.eot_id, generator=g))
        ids = torch.stack(new, dim=1).tolist() if new else [[] for _ in range(n)]
        return [{"prompt": prompt, "text": prompt + tok.decode([t for t in row if t != tok.eot_id])} for row in ids]
