"""What evaluate.py generates: greedy answers to a JSONL of prompts with references (in the chat template
for a chat model), scored with gpt.evaluation.text_metrics, and a few sampled continuations."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gpt.chat import SPECIAL, answer_stop_ids, prompt_ids
from gpt.errors import UserError
from gpt.evaluation.text_metrics import text_metrics
from gpt.engine import Sampling, complete
from gpt.generate import generate_batch
from gpt.inference import encode_prompt
from gpt.jsonl import read_references


def instruction_records(path: str | Path, tokenizer) -> list[dict]:
    """instructions= -> [{"prompt", "reference", "line"}] (gpt.jsonl.read_references), every prompt checked
    against the checkpoint's tokenizer first: one it cannot encode is a UserError naming file:line."""
    records = read_references(path, "instructions")
    for r in records:
        try:
            tokenizer.encode(r["prompt"])
        except UserError as e:
            raise UserError(f"{Path(str(path)).expanduser()}:{r['line']}: {e}") from None
    return records


def cut_at_stop(text: str, stop: list[str]) -> str:
    """text up to the first occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


def is_chat(tokenizer) -> bool:
    """Whether a tokenizer carries the chat template's tokens (a finetune.py stage=sft model and its children)."""
    return all(t in tokenizer.special for t in SPECIAL)


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[str], max_new_tokens: int, stop: list[str] | None = None,
                   batch_size: int = 64) -> list[str]:
    """The greedy (temperature 0) answer to each prompt, batched as the SFT stage's evaluation batches them.

    A chat model (is_chat) gets each prompt in the chat template, as infer.py chat=true and stage=sft build
    it (gpt.chat.prompt_ids), and its answer ends at <|end|> or where it starts a new turn (as serve.py's: gpt.chat.
    answer_stop_ids); any other model continues the prompt as it
    saw text in training (gpt.inference.encode_prompt) up to end-of-text. Either way the answer is cut at
    the first of `stop` (None: a blank line for a plain language model, nothing more for a chat model).
    batch_size prompts are answered together (SFT's evaluation: its eval_examples, 64 by default, in one batch).
    """
    if is_chat(tokenizer):
        ids, ends = [prompt_ids(tokenizer, p) for p in prompts], answer_stop_ids(tokenizer)
        stop = [] if stop is None else stop
    else:
        ids = [encode_prompt(tokenizer, p, model.config.block_size, note=False) for p in prompts]
        ends, stop = answer_stop_ids(tokenizer, chat=False), ["\n\n"] if stop is None else stop
    outs: list[list[int]] = []
    for i in range(0, len(ids), batch_size):
        outs += generate_batch(model, ids[i:i + batch_size], max_new_tokens, temperature=0.0, stop_ids=ends)
    return [cut_at_stop(tokenizer.decode(o), stop) for o in outs]


def instruction_metrics(model, tokenizer, records: list[dict], max_new_tokens: int, stop: list[str] | None,
                        out_file: Path | None = None, batch_size: int = 64) -> dict:
    """Answer every prompt of `records` (instruction_records) greedily (greedy_answers) and score the answers
    against their references; each prompt, reference, answer and its scores go to out_file (JSONL)."""
    answers = greedy_answers(model, tokenizer, [r["prompt"] for r in records], max_new_tokens, stop, batch_size)
    metrics, items = text_metrics([a.strip() for a in answers], [r["reference"] for r in records])
    if out_file is not None:
        with open(out_file, "w", encoding="utf-8") as f:
            for rec, answer, item in zip(records, answers, items):
                f.write(json.dumps({"prompt": rec["prompt"], "reference": rec["reference"], "generation": answer,
                                    **item}, ensure_ascii=False) + "\n")
    return metrics


@torch.no_grad()
def sample_texts(model, tokenizer, prompt: str, num: int, max_new_tokens: int, temperature: float,
                 top_k: int | None, seed: int, autocast) -> list[str]:
    """`num` sampled continuations of `prompt` (prompt included), one batch, seeded."""
    device = model.transformer.wte.weight.device
    ids = encode_prompt(tokenizer, prompt, model.config.block_size)
    g = torch.Generator(device=device).manual_seed(seed)
    eot = tokenizer.eot_id
    with autocast():
        rows = complete(model, [ids] * num, Sampling(max_new_tokens, temperature, top_k,
                                                     stop_ids=() if eot is None else (eot,), generator=g))
    return [prompt + tokenizer.decode(r.new) for r in rows]
