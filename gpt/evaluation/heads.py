"""Metrics of the head models (gpt.heads) on labelled data: a classifier's accuracy and confusion matrix,
a reward model's pairwise accuracy and margin, with inputs encoded as the stages that trained them do."""

from __future__ import annotations

from gpt.encoding import encode_texts, scored_pair
from gpt.errors import UserError
from gpt.jsonl import read_labelled, read_pairs
from gpt.scoring import pair_margins, predicted_labels


def classifier_metrics(model, tokenizer, labels: list[str], path: str, batch_size: int, autocast) -> dict:
    """Accuracy and confusion matrix (rows: true label, columns: predicted; label order `labels`) of a
    classifier checkpoint on {"text", "label"} JSONL, encoded and pooled as stage=classify does."""
    records = read_labelled(path)
    unknown = sorted({lab for _, lab in records} - set(labels))
    if unknown:
        raise UserError(f"{path}: labels {unknown} are not among the classifier's labels {labels}")
    ids = encode_texts(tokenizer, [t for t, _ in records], model.config.block_size, str(path))
    truth = [labels.index(lab) for _, lab in records]
    with autocast():
        predicted = predicted_labels(model, ids, batch_size)
    confusion = [[0] * len(labels) for _ in labels]
    for t, p in zip(truth, predicted):
        confusion[t][p] += 1
    return {"classify/accuracy": sum(t == p for t, p in zip(truth, predicted)) / len(truth),
            "classify/examples": len(truth), "classify/labels": list(labels), "classify/confusion": confusion}


def reward_metrics(model, tokenizer, path: str, batch_size: int, autocast) -> dict:
    """Pairwise accuracy (chosen scored above rejected) and mean margin of a reward checkpoint on
    {"prompt", "chosen", "rejected"} JSONL, encoded with the chat template as stage=reward does."""
    pairs = [scored_pair(tokenizer, p, model.config.block_size) for p in read_pairs(path)]
    with autocast():
        margins = pair_margins(model, pairs, batch_size)
    return {"reward/pairwise_accuracy": sum(m > 0 for m in margins) / len(margins),
            "reward/mean_margin": sum(margins) / len(margins), "reward/pairs": len(margins)}
