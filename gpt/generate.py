"""Autoregressive sampling: temperature, top-k, top-p, KV-cache decoding, context cropping, end-of-text.

`generate_tokens` yields one (B,) tensor of new token ids per step so callers can stream them.
With the KV cache each step feeds only the newest token. Once the sequence outgrows block_size the
model (learned absolute positions) must see the last block_size tokens at positions 0..block_size-1,
exactly what the uncached path feeds it, so the cache is refilled from that window: cached and
uncached generation produce the same tokens for the same seed.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from gpt.model import GPT


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,). temperature 0 means greedy (argmax)."""
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.size(-1):
        vals, idx = torch.topk(logits, top_k, dim=-1)  # sorted, descending; no full sort of V
    else:
        vals, idx = torch.sort(logits, dim=-1, descending=True) if top_p is not None and top_p < 1.0 else (logits, None)
    if top_p is not None and top_p < 1.0:
        probs = torch.softmax(vals, dim=-1)
        # drop a token once the mass of the tokens before it already reaches top_p (always keep the first)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        vals = vals.masked_fill(drop, float("-inf"))
    probs = torch.softmax(vals, dim=-1)
    choice = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
    return choice if idx is None else idx.gather(-1, choice[:, None]).squeeze(-1)


@torch.no_grad()
def generate_tokens(model: GPT, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                    top_k: int | None = None, top_p: float | None = None, eot_id: int | None = None,
                    generator: torch.Generator | None = None, use_cache: bool = True,
                    pad: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
    """idx (B, T) prompt ids -> yields (B,) next ids, max_new_tokens times or until every row hit eot_id.

    pad (B,): left-padding count of each row, for prompts of different lengths batched together
    (see `left_pad`); each row then generates what it would generate alone. Rows that already
    produced eot_id keep yielding eot_id.
    """
    model.eval()
    block = model.config.block_size
    seq = idx
    cache = model.new_cache(idx.size(0), block) if use_cache else None
    done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    for step in range(max_new_tokens):
        # the model sees at most the last block_size columns; padding cut off on the left is gone
        window_pad = None if pad is None else (pad - max(0, seq.size(1) - block)).clamp(min=0)
        if cache is None:
            logits, _ = model(seq[:, -block:], pad=window_pad)
        elif step == 0 or cache.pos >= block:  # (re)fill the cache from the last block_size tokens
            cache.reset()
            logits, _ = model(seq[:, -block:], cache=cache, pad=window_pad)
        else:
            logits, _ = model(seq[:, -1:], cache=cache, pad=window_pad)
        nxt = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)
        if eot_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eot_id), nxt)
            done |= nxt == eot_id
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        yield nxt
        if eot_id is not None and bool(done.all()):
            return


def left_pad(prompts: list[list[int]], pad_id: int = 0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists of different lengths -> (idx (B, T_max) right-aligned, pad (B,) left-padding counts)."""
    width = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    for row, p in enumerate(prompts):
        idx[row, width - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
    pad = torch.tensor([width - len(p) for p in prompts], dtype=torch.long, device=device)
    return idx, pad


def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
    """idx (B, T) -> (B, T + n) with n <= max_new_tokens new ids (see generate_tokens for kwargs)."""
    new = list(generate_tokens(model, idx, max_new_tokens, **kwargs))
    return torch.cat([idx, torch.stack(new, dim=1)], dim=1) if new else idx


def generate_batch(model: GPT, prompts: list[list[int]], max_new_tokens: int, **kwargs) -> list[list[int]]:
    """Generate for several prompts of different lengths in one batch -> each prompt's new ids.

    With eot_id given, a row's ids stop before its first end-of-text.
    """
    idx, pad = left_pad(prompts, device=model.transformer.wte.weight.device)
    new = list(generate_tokens(model, idx, max_new_tokens, pad=pad, **kwargs))
    rows = torch.stack(new, dim=1).tolist() if new else [[] for _ in prompts]
    eot = kwargs.get("eot_id")
    return [row[: row.index(eot)] if eot is not None and eot in row else row for row in rows]
