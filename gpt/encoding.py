"""Fine-tuning records -> token ids -> padded tensors, the same way for training, evaluation and inference.

    encode_texts  texts -> ids, each cut to its last block_size tokens   (classify)
    encode_pair   a preference pair -> chosen and rejected chat examples (reward, dpo)
    fit_block     drop examples longer than the model's block
    right_pad     token lists -> one right-padded (B, T) tensor
    lm_batch      (ids, train_mask) examples -> next-token inputs and masked targets (sft, completion, dpo, rl)
    score_batch   token lists -> (ids, lengths) for the heads read at the last real token (classify, reward)
    scored_pair   a preference pair -> chosen and rejected (ids, answer start), as a reward model scores them
    reward_batch  (ids, answer start) rows -> (ids, lengths, starts) for RewardModel.score

A model scores an example the same way wherever it is scored only if the example is encoded and padded
the same way everywhere: evaluate.py and infer.py use these functions, not copies of them.
"""

from __future__ import annotations

import logging

import torch

from gpt.chat import encode_chat
from gpt.errors import UserError


def encode_texts(tok, texts: list[str], block_size: int, where: str) -> list[list[int]]:
    """Texts -> ids, keeping each text's last block_size tokens (the pooled token is the last one)."""
    out = []
    for t in texts:
        ids = tok.encode(t)
        if not ids:
            raise UserError(f"{where}: a text encodes to no tokens")
        out.append(ids[-block_size:])
    return out


def encode_pair(tok, pair: dict) -> list[tuple[list[int], list[bool]]]:
    """-> [chosen example, rejected example], each (ids, train_mask) under the chat template."""
    return [encode_chat(tok, [{"role": "user", "content": pair["prompt"]}, {"role": "assistant", "content": pair[k]}])
            for k in ("chosen", "rejected")]


def answer_start(mask: list[bool]) -> int:
    """The position of an example's first trained (answer) token: its prompt's length."""
    return mask.index(True) if True in mask else len(mask)


def scored_pair(tok, pair: dict, block_size: int) -> list[tuple[list[int], int]]:
    """-> [(chosen ids, answer start), (rejected ids, answer start)] under the chat template, each kept to its
    last block_size tokens (its answer start moved with the cut, at least 1)."""
    out = []
    for ids, mask in encode_pair(tok, pair):
        cut = max(len(ids) - block_size, 0)
        out.append((ids[cut:], max(answer_start(mask) - cut, 1)))
    return out


def example_tokens(example) -> int:
    """An example's length: its ids' (an (ids, train_mask) example) or its longest side's (a pair of them)."""
    first = example[0]
    return max(len(ids) for ids, _ in example) if isinstance(first, tuple) else len(first)


def fit_block(examples: list, block_size: int, where: str, log: logging.Logger, extra: int = 1) -> list:
    """Drop examples (or pairs of them) longer than block_size + extra tokens, with a warning; refuse if none
    are left. extra 1 where the model reads ids[:-1] (next-token training), 0 where it reads every token (a
    reward model's score)."""
    limit = block_size + extra
    kept = [e for e in examples if example_tokens(e) <= limit]
    what = f"block_size={block_size}" + (f" + {extra}" if extra else "")
    if not kept:
        raise UserError(f"{where}: every example is longer than the model's {what} tokens")
    if len(kept) < len(examples):
        log.warning("%s: %d of %d examples are longer than %s = %d tokens and were dropped", where,
                    len(examples) - len(kept), len(examples), what, limit)
    return kept


def right_pad(seqs: list[list[int]], value: int, device) -> torch.Tensor:
    """Token lists -> (B, T_max) tensor, right-padded with `value`. Under causal attention no real
    token attends to the padding after it, so right padding needs no attention mask."""
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out.to(device)


def lm_batch(examples: list[tuple[list[int], list[bool]]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, train_mask) examples -> x (B, T), y (B, T) with y = next token where it is trained, else -1
    (prompt tokens and padding are masked out of the loss)."""
    xs = [ids[:-1] for ids, _ in examples]
    ys = [[t if m else -1 for t, m in zip(ids[1:], mask[1:])] for ids, mask in examples]
    return right_pad(xs, 0, device), right_pad(ys, -1, device)


def score_batch(sequences: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (idx (B, T) right-padded, lengths (B,))."""
    return right_pad(sequences, 0, device), torch.tensor([len(s) for s in sequences], device=device)


def reward_batch(rows: list[tuple[list[int], int]], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, answer start) rows -> (idx (B, T) right-padded, lengths (B,), starts (B,)): RewardModel.score's input."""
    idx, lengths = score_batch([ids for ids, _ in rows], device)
    return idx, lengths, torch.tensor([start for _, start in rows], device=device)
