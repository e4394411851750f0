"""Scores of a trained model that stages, evaluate.py and infer.py share: greedy exact match of chat
answers (stage=sft's evaluation), a classifier's label probabilities and predictions, a reward model's
chosen - rejected margins. Inputs are encoded and padded as the stages that trained the models encode
them (gpt.chat, gpt.encoding), so a score here is the score the stage measured."""

from __future__ import annotations

import torch

from gpt.chat import answer_stop_ids, encode_chat
from gpt.encoding import encode_texts, reward_batch, score_batch
from gpt.generate import generate_batch
from gpt.heads import Classifier, RewardModel


def _device(model: torch.nn.Module) -> torch.device:
    return model.transformer.wte.weight.device


@torch.no_grad()
def chat_exact_match(model, tok, conversations: list[list[dict]], autocast, max_new_tokens: int = 32) -> float:
    """Fraction of conversations whose last assistant answer the model reproduces exactly (greedy, in the
    chat template, to <|end|> or the start of a new turn, as serve.py answers: gpt.chat.answer_stop_ids; answer and
    reference compared with surrounding whitespace stripped)."""
    if not conversations:
        return float("nan")
    prompts = [encode_chat(tok, c[:-1], generation_prompt=True)[0] for c in conversations]
    with autocast():
        outs = generate_batch(model, prompts, max_new_tokens, temperature=0.0, stop_ids=answer_stop_ids(tok))
    return sum(tok.decode(o).strip() == c[-1]["content"].strip() for o, c in zip(outs, conversations)) / len(outs)


@torch.no_grad()
def label_probabilities(model: Classifier, tok, text: str) -> torch.Tensor:
    """(num_labels,) probabilities for one text (its last block_size tokens)."""
    ids = encode_texts(tok, [text], model.config.block_size, "prompt")[0]
    idx = torch.tensor([ids], device=_device(model))
    return torch.softmax(model.classify(idx, torch.tensor([len(ids)], device=idx.device)), -1)[0]


@torch.no_grad()
def predicted_labels(model: Classifier, ids: list[list[int]], batch_size: int) -> list[int]:
    """The most likely label index of each token list, batch_size lists at a time."""
    out: list[int] = []
    for i in range(0, len(ids), batch_size):
        out += model.classify(*score_batch(ids[i:i + batch_size], _device(model))).argmax(-1).tolist()
    return out


@torch.no_grad()
def pair_margins(model: RewardModel, pairs: list[list[tuple[list[int], int]]], batch_size: int) -> list[float]:
    """score(chosen) - score(rejected) of each pair of (ids, answer start) rows (gpt.encoding.scored_pair),
    batch_size pairs at a time."""
    out: list[float] = []
    for i in range(0, len(pairs), batch_size):
        rows = [s for pair in pairs[i:i + batch_size] for s in pair]  # chosen, rejected, chosen, ...
        r = model.score(*reward_batch(rows, _device(model)))
        out += (r[0::2] - r[1::2]).tolist()
    return out
