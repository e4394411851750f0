"""Write shakespeare_word_order.jsonl, the example lm-eval task shipped with the package (deterministic:
running it again gives the same file; tests/test_harness.py checks that).

Each question is a verse line of the bundled default corpus (conf/data/shakespeare.yaml), taken from the last
10% of its text: the val split that training holds out for the default char tokenizer. The context is the
speaker and the line without its last four words; the four choices are those words in their own order and in
three other orders. A model that has learned English word order (and where Shakespeare puts his commas) picks
the real ending; chance is 1/4. Every choice has the same characters, so no choice wins on length or on an
unknown character (the char tokenizer of the default run knows them all).

    python gpt/evaluation/tasks/make_shakespeare_word_order.py
"""

from __future__ import annotations

import itertools
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "shakespeare_word_order.jsonl"
QUESTIONS = 200
TAIL = 4  # words that are reordered
MIN_WORDS = 8  # a line keeps at least MIN_WORDS - TAIL words of context
VAL_FRACTION = 0.1


def held_out_text() -> str:
    """The last VAL_FRACTION of the default corpus's text, as training joins it."""
    from omegaconf import OmegaConf

    from gpt.data import Shakespeare

    plays = list(OmegaConf.load(HERE.parents[1] / "conf" / "data" / "shakespeare.yaml").plays)
    text = "".join(Shakespeare(plays=plays, val_fraction=VAL_FRACTION).documents())
    return text[len(text) - int(len(text) * VAL_FRACTION):]


def speeches(text: str) -> list[tuple[str, str]]:
    """(speaker, verse line) for every line of a speech (a 'SPEAKER:' line, its lines, a blank line)."""
    out, speaker = [], None
    for line in text.split("\n"):
        if not line.strip():
            speaker = None
        elif line.endswith(":") and speaker is None:
            speaker = line[:-1]
        elif speaker is not None:
            out.append((speaker, line.strip()))
    return out


def questions(text: str, n: int = QUESTIONS, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    lines = [(s, w) for s, line in speeches(text) if len(w := line.split()) >= MIN_WORDS]
    out = []
    for speaker, words in rng.sample(lines, len(lines)):
        tail = words[-TAIL:]
        real = " ".join(tail)
        others = sorted({" ".join(p) for p in itertools.permutations(tail)} - {real})
        if len(others) < 3:  # repeated words: too few distinct orders
            continue
        choices = rng.sample(others, 3)
        label = rng.randrange(4)
        choices.insert(label, real)
        out.append({"context": f"{speaker}:\n{' '.join(words[:-TAIL])}", "choices": choices, "label": label})
        if len(out) == n:
            return out
    raise SystemExit(f"only {len(out)} lines of {MIN_WORDS}+ words with distinct reorderings")


def render(items: list[dict]) -> str:
    return "".join(json.dumps(q, ensure_ascii=False) + "\n" for q in items)


if __name__ == "__main__":
    OUT.write_text(render(questions(held_out_text())), encoding="utf-8")
    print(f"wrote {OUT}", file=sys.stderr)
