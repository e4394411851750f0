"""Language-model metrics: which corpus evaluate.py scores (data= on the command line, or only the
bundled corpus a checkpoint names), its tokens split as training split them, and the token-weighted loss,
perplexity and bits per byte over every token of it."""

from __future__ import annotations

import contextlib
import math
import re

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from gpt.config import user_error_in
from gpt.data import Shakespeare, TextSource
from gpt.errors import UserError
from gpt.tokenizer import TiktokenTokenizer

SPLITS = ("all", "val", "train")


def user_source(data: DictConfig) -> tuple[TextSource, float]:
    """data= from evaluate.py's command line (a conf/data option, the user's own config) -> (source, val_fraction).

    val_fraction is evaluation's own setting, checked here: 1.0 is allowed (the whole file is the val split).
    It is left out when the source is built, whose own check is for training (which needs both splits).
    """
    from hydra.utils import instantiate

    node = OmegaConf.to_container(data, resolve=True)
    fraction = node.pop("val_fraction", 0.1)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
        raise UserError(f"data.val_fraction={fraction} must be a number in (0, 1] "
                        f"(1.0: the whole file is the val split)")
    try:
        return instantiate(node, _recursive_=False), float(fraction)
    except Exception as e:
        err = user_error_in(e)
        if err is None:
            raise
        raise UserError(f"data: {err}") from None


_PLAY = re.compile(r"[a-z0-9-]+/[a-z0-9-]+")  # a bundled play's name, e.g. tragedies/hamlet


def _shown(value, limit: int = 120) -> str:
    """A value read from a checkpoint, safe to print in one line (quoted, escaped, cut short)."""
    text = repr(value) if isinstance(value, (str, int, float, bool, type(None))) else f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit] + "..."


def checkpoint_source(ckpt: dict) -> tuple[TextSource | None, str]:
    """The checkpoint's own training corpus, when evaluate.py may re-read it -> (source or None, what it was).

    Only the bundled corpus is rebuilt, from plain values checked here (plays: names of bundled plays;
    val_fraction: a number in (0, 1)), by our own code: nothing in the checkpoint names the class, and no
    node of it is instantiated. A text file or Hugging Face dataset the checkpoint names is never read (a
    shared checkpoint must not make evaluate.py open a path or fetch a dataset): None, and a line saying
    what it was and how to pass it with data=.
    """
    config = ckpt.get("config")
    node = config.get("data") if isinstance(config, dict) else None
    node = node if isinstance(node, dict) else {}
    target, fraction = node.get("_target_"), node.get("val_fraction", 0.1)
    plain_fraction = not isinstance(fraction, bool) and isinstance(fraction, (int, float)) and 0.0 < fraction < 1.0
    if target == "gpt.data.Shakespeare":
        plays = node.get("plays")
        if not (isinstance(plays, list) and plays and all(isinstance(p, str) and _PLAY.fullmatch(p) for p in plays)
                and plain_fraction and set(node) <= {"_target_", "plays", "val_fraction", "cache_dir"}):
            return None, (f"the checkpoint's data (bundled Shakespeare) has values evaluate.py does not accept "
                          f"(plays={_shown(plays)}, val_fraction={_shown(fraction)}); pass data=shakespeare")
        return Shakespeare(plays=plays, val_fraction=float(fraction)), "the bundled Shakespeare plays"
    if target == "gpt.data.TextFiles":
        path = node.get("path")
        shown = _shown(path) if isinstance(path, str) else "<file>"
        return None, (f"the checkpoint was trained on text data.path={shown}, which evaluate.py does not re-read "
                      f"from a checkpoint; pass data=text data.path={shown} to evaluate on it")
    if target == "gpt.data.HFDataset":
        name = node.get("name")
        shown = _shown(name) if isinstance(name, str) else "<dataset>"
        return None, (f"the checkpoint was trained on dataset data.name={shown}, which evaluate.py does not "
                      f"fetch from a checkpoint; pass data=hf data.name={shown} to evaluate on it")
    return None, (f"the checkpoint names no text corpus to score (its data: {_shown(target) if target else 'none'}); "
                  f"pass data=text data.path=<file> (or data=shakespeare, data=hf data.name=...) for perplexity")


def split_tokens(source: TextSource, tokenizer, split: str, val_fraction: float | None = None) -> np.ndarray:
    """The token ids of `split` of `source`, encoded with the checkpoint's tokenizer: "all" (every token),
    "val" (the documents the cache holds out, with val_fraction, default the source's own) or "train".

    Documents are joined and split exactly as training's token cache does (gpt.data.TextSource), so the
    checkpoint's own data gives back the val tokens it was validated on; the tokenizer is never refitted.
    """
    if split not in SPLITS:
        raise UserError(f"perplexity.split={split!r} must be one of {', '.join(SPLITS)}")
    try:
        tokens = source.split_ids(tokenizer, val_fraction)[split]
    except UserError as e:
        raise UserError(f"evaluating {source.describe()}: {e}") from None
    if len(tokens) < 2:
        raise UserError(f"{source.describe()} gives {len(tokens)} {split} tokens; at least 2 are needed")
    return tokens


def utf8_bytes(tokenizer, ids: list[int]) -> int:
    """UTF-8 length of the text the tokens `ids` stand for (exact per token for tiktoken encodings,
    whose tokens may hold part of a multi-byte character)."""
    if isinstance(tokenizer, TiktokenTokenizer):
        return sum(len(b) for b in tokenizer.enc.decode_tokens_bytes(ids))
    return len(tokenizer.decode(ids).encode("utf-8"))


def windows(n: int, block_size: int, stride: int) -> list[tuple[int, int, int]]:
    """Cover the n - 1 next-token targets of a stream of n tokens, each exactly once.

    -> [(begin, end, skip)]: a window feeds tokens[begin:end] (at most block_size) and predicts
    tokens[begin+1:end+1]; its first `skip` targets were scored by the previous window and are not
    scored again. Windows start every `stride` tokens: stride = block_size gives disjoint windows,
    a smaller stride gives later targets more context at more compute.
    """
    out, begin, done = [], 0, 0
    while True:
        end = min(begin + block_size, n - 1)
        out.append((begin, end, max(0, done - begin)))
        done = end
        if end >= n - 1:
            return out
        begin += stride


@torch.no_grad()
def language_model_metrics(model, tokens: np.ndarray, tokenizer, batch_size: int = 8, stride: int | None = None,
                           autocast=contextlib.nullcontext, prefix: str = "val") -> dict:
    """Token-weighted next-token loss over a whole token stream tokens (N,).

    Windows (see `windows`) are batched (B, block_size); padding of short windows and targets already
    scored get target -1, which the model's loss ignores, so the mean loss of a batch times its number
    of scored targets is its summed NLL. Over the N - 1 targets:
        loss = total NLL / (N - 1)  (nats/token),  perplexity = exp(loss),
        bits_per_byte = total NLL / ln 2 / UTF-8 bytes of the targets' text  (comparable across tokenizers).
    """
    block = model.config.block_size
    stride = block if stride is None else int(stride)
    if not 1 <= stride <= block:
        raise UserError(f"perplexity.stride={stride} must be between 1 and model.block_size={block}")
    device = model.transformer.wte.weight.device
    model.eval()
    data = torch.as_tensor(tokens, dtype=torch.long)
    spans = windows(len(data), block, stride)
    total_nll, scored = 0.0, 0
    for first in range(0, len(spans), batch_size):
        chunk = spans[first:first + batch_size]
        x = torch.zeros(len(chunk), block, dtype=torch.long)
        y = torch.full((len(chunk), block), -1, dtype=torch.long)
        for row, (begin, end, skip) in enumerate(chunk):
            x[row, :end - begin] = data[begin:end]
            y[row, skip:end - begin] = data[begin + 1 + skip:end + 1]
        count = int((y != -1).sum())
        with autocast():
            _, loss = model(x.to(device), y.to(device))
        total_nll += float(loss) * count
        scored += count
    n_bytes = utf8_bytes(tokenizer, data[1:].tolist())
    mean = total_nll / scored
    return {f"{prefix}/loss": mean, f"{prefix}/perplexity": math.exp(mean),
            f"{prefix}/bits_per_byte": total_nll / math.log(2) / max(n_bytes, 1),
            f"{prefix}/tokens": scored, f"{prefix}/bytes": n_bytes}


def lm_data(cfg: DictConfig, ckpt: dict) -> tuple[TextSource | None, str, float | None, str]:
    """What language-model metrics score -> (source or None, split, val_fraction, a note when None).

    data= on the command line: that source, by default all of it (perplexity.split=val|train cut it at
    data.val_fraction). Without data=: the checkpoint's own corpus where evaluate.py may re-read it
    (checkpoint_source), by default its val split as training cut it.
    """
    split = cfg.perplexity.get("split")
    if cfg.get("data") is not None:
        source, fraction = user_source(cfg.data)
        return source, split or "all", fraction, ""
    source, note = checkpoint_source(ckpt)
    return source, split or "val", None, note
