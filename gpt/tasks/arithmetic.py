"""A synthetic task that needs no download: two-digit addition and subtraction with exact answers.

    python -m gpt.tasks.arithmetic <out folder> [--n 2000] [--seed 0] [--max 99]

writes, from disjoint train / val questions:
  pretrain.txt                       train equations as plain text, 4 times (a corpus to pretrain a char model on)
  sft_train.jsonl, sft_val.jsonl     {"prompt": "23+45=", "completion": "68"}
  classify_train/val.jsonl           {"text": "23+45=68", "label": "correct" | "wrong"}
  pairs_train/val.jsonl              {"prompt", "chosen": right answer, "rejected": a near miss}
  prompts_train/val.jsonl            {"prompt", "answer"} for the RL stages (exact-match reward)
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


def wrong_answer(answer: str, rng: random.Random) -> str:
    """A near miss: the right answer off by 1, 2 or 10 (never negative, never right)."""
    n = int(answer)
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


def write_task(out: str | Path, n: int = 2000, seed: int = 0, hi: int = 99) -> dict:
    """Write every file of the task into `out`; returns {name: path}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed + 1)
    train, val = make_splits(n, seed, hi)
    files = {}
    # pretraining text: the training questions' equations as plain text (no chat template); the held-out
    # questions never appear, so val exact match measures generalisation
    lines = [q + a for q, a in train]
    files["pretrain"] = out / "pretrain.txt"
    files["pretrain"].write_text("\n".join(lines * 4) + "\n")
    for split, items in (("train", train), ("val", val)):
        sft = [{"prompt": q, "completion": a} for q, a in items]
        cls, pairs = [], []
        for q, a in items:
            ok = rng.random() < 0.5
            cls.append({"text": q + (a if ok else wrong_answer(a, rng)), "label": "correct" if ok else "wrong"})
            pairs.append({"prompt": q, "chosen": a, "rejected": wrong_answer(a, rng)})
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
    args = ap.parse_args(argv)
    for name, path in write_task(args.out, args.n, args.seed, args.max).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
