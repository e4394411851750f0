"""Tiny parent checkpoints and data files for the fine-tuning stage tests."""

import json
from pathlib import Path

import torch

from gpt.chat import chat_tokenizer
from gpt.checkpoint import load_checkpoint, save_checkpoint
from gpt.model import GPT
from gpt.parent import model_config
from gpt.tokenizer import CharTokenizer

CHARS = "0123456789+-=?abcdefghijklmnopqrstuvwxyz \n"


def make_parent(path: Path, seed: int = 0, block_size: int = 32, model_cls=GPT, stage: str = "pretrain",
                chat: bool = False, **model_args) -> dict:
    """Write a tiny random checkpoint (as train.py or finetune.py would) and load it back; chat=True gives
    its tokenizer the chat template's special tokens; model_args go to the model (e.g. tie_embeddings=False)."""
    torch.manual_seed(seed)
    tok = CharTokenizer(CHARS)
    if chat:
        tok = chat_tokenizer(tok)
    model = model_cls(vocab_size=tok.vocab_size, block_size=block_size, n_layer=1, n_head=2, n_embd=16,
                      loss_chunk_size=0, **model_args)
    if hasattr(model, "head"):
        torch.nn.init.normal_(model.head.weight)
    ckpt = {"model": model.state_dict(), "step": 0, "stage": stage, "tokenizer": tok.identity(),
            "config": {"model": model_config(model), "seed": seed,
                       "tokenizer": {"_target_": "gpt.tokenizer.CharTokenizer", "vocab_size": tok.vocab_size}}}
    save_checkpoint(ckpt, path)
    return load_checkpoint(path)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path
