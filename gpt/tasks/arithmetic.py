"""A synthetic task that needs no download: two-digit addition and subtraction with exact answers.

    python -m gpt.tasks.arithmetic <out folder> [--n 2000] [--seed 0] [--max 99] [--far 0.5] [--repeat 4]
                                   [--val-fraction 0.1]

writes, from disjoint train / val questions:
  pretrain.txt                       train equations as plain text, `repeat` times in fresh orders (a corpus to
                                     pretrain a char model on; the held-out questions never appear in it)
  sft_train.jsonl, sft_val.jsonl     {"prompt": "23+45=", "completion": "68"}
  classify_train/val.jsonl           {"text": "23+45=68", "label": "correct" | "wrong"}
  pairs_train/val.jsonl              {"prompt", "chosen": right answer, "rejected": a wrong answer}
  prompts_train/val.jsonl            {"prompt", "answer"} for the RL stages (exact-match reward)

A wrong answer (the rejected side of a pair, a "wrong" example to classify) is a far miss (a random number
of the answers' range, more than 10 away) with probability `far`, else a near miss (off by 1, 2 or 10, the
slips a model makes in the last digit or a carry). Near misses alone are as hard to judge as the sum itself,
which leaves a small reward model at chance; the far misses give it a gradient to start from.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def question(rng: random.Random, hi: int = 99) -> tuple[str, str]:
    """-> ("a+b=", "answer") or ("a-b=", "answer") with a >= b for subtraction (answers never negative)."""
    a, b = rng.randint(0, hi), rng.randint(0, hi)
    if rng.random() < 0.5:
        return f"{a}+{b}=", str(a + b)
    a, b = max(a, b), min(a, b)
    return f"{a}-{b}=", str(a - b)


def wrong_answer(answer: str, rng: random.Random, far: float = 0.0, hi: int = 99) -> str:
    """A wrong answer, never negative: with probability `far` a far miss (uniform over 0 .. 2 * hi, more than
    10 away from the right answer), else a near miss (off by 1, 2 or 10)."""
    n = int(answer)
    if rng.random() < far:
        cands = [c for c in range(0, 2 * hi + 1) if abs(c - n) > 10]
        if cands:
            return str(rng.choice(cands))
    for _ in range(10):
        cand = n + rng.choice([-10, -2, -1, 1, 2, 10])
        if cand >= 0 and cand != n:
            return str(cand)
    return str(n + 1)


def exact_match_reward(completion: str, answer: str) -> float:
    """The verifiable reward: 1.0 when the completion is exactly the answer (surrounding spaces ignored)."""
    return float(completion.strip() == answer.strip())


def make_splits(n: int, seed: int = 0, hi: int = 99, val_fraction: float = 0.1) -> tuple[list, list]:
    """n distinct (question, answer) pairs split into disjoint train / val lists."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must be between 0 and 1 (both splits need questions)")
    rng = random.Random(seed)
    seen: dict[str, str] = {}
    limit = 2 * (hi + 1) ** 2
    while len(seen) < min(n, limit // 2):
        q, a = question(rng, hi)
        seen.setdefault(q, a)
    items = sorted(seen.items())
    rng.shuffle(items)
    n_val = max(1, int(len(items) * val_fraction))
    return items[n_val:], items[:n_val]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def write_task(out: str | Path, n: int = 2000, seed: int = 0, hi: int = 99, far: float = 0.5,
               repeat: int = 4, val_fraction: float = 0.1) -> dict:
    """Write every file of the task into `out`; returns {name: path}. `far`: the fraction of wrong answers
    (pairs' rejected side, classify's "wrong" examples) that are far misses; `repeat`: copies of the
    training equations in pretrain.txt; `val_fraction`: the share of the questions held out."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed + 1)
    train, val = make_splits(n, seed, hi, val_fraction)
    files = {}
    # pretraining text: the training questions' equations as plain text (no chat template), each copy in
    # a fresh order; the held-out questions never appear, so val exact match measures generalisation
    lines = []
    for _ in range(repeat):
        lines += rng.sample([q + a for q, a in train], len(train))
    files["pretrain"] = out / "pretrain.txt"
    files["pretrain"].write_text("\n".join(lines) + "\n")
    for split, items in (("train", train), ("val", val)):
        sft = [{"prompt": q, "completion": a} for q, a in items]
        cls, pairs = [], []
        for q, a in items:
            ok = rng.random() < 0.5
            cls.append({"text": q + (a if ok else wrong_answer(a, rng, far, hi)), "label": "correct" if ok else "wrong"})
            pairs.append({"prompt": q, "chosen": a, "rejected": wrong_answer(a, rng, far, hi)})
        for name, rows in (("sft", sft), ("classify", cls), ("pairs", pairs),
                           ("prompts", [{"prompt": q, "answer": a} for q, a in items])):
            files[f"{name}_{split}"] = out / f"{name}_{split}.jsonl"
            write_jsonl(files[f"{name}_{split}"], rows)
    return files


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="folder to write the files into")
    ap.add_argument("--n", type=int, default=2000, help="distinct questions (train + val)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max", type=int, default=99, help="largest operand")
    ap.add_argument("--far", type=float, default=0.5, help="fraction of wrong answers that are far misses")
    ap.add_argument("--repeat", type=int, default=4, help="copies of the training equations in pretrain.txt")
    ap.add_argument("--val-fraction", type=float, default=0.1, help="share of the questions held out")
    args = ap.parse_args(argv)
    if not 0 < args.val_fraction < 1:
        ap.error(f"--val-fraction {args.val_fraction} must be between 0 and 1")
    for name, path in write_task(args.out, args.n, args.seed, args.max, args.far, args.repeat,
                                 args.val_fraction).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
