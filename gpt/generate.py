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


def _top_p_filter(vals: torch.Tensor, top_p: float, lse: torch.Tensor | None = None) -> torch.Tensor:
    """vals (B, k) sorted descending -> the same with -inf where a token falls outside the nucleus: a token
    is dropped once the mass of the tokens before it already reaches top_p (the first is always kept).
    Probabilities are softmax(vals), or exp(vals - lse) when vals are the head of a longer row whose
    logsumexp is lse."""
    probs = torch.softmax(vals, dim=-1) if lse is None else (vals - lse).exp()
    drop = probs.cumsum(dim=-1) - probs >= top_p
    return vals.masked_fill(drop, float("-inf"))


def _nucleus(logits: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 logits (B, V) -> (vals, idx, lse): the k largest logits (B, k), descending, for a k whose
    prefix of every row holds at least top_p of the softmax mass (so every token of the nucleus), and the
    logsumexp (B, 1) of each full row; found with topk of growing k instead of a full sort of V (the nucleus
    of a peaked distribution is a few dozen tokens)."""
    V = logits.size(-1)
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    k = min(64, V)
    while True:
        vals, idx = torch.topk(logits, k, dim=-1)
        if k == V or bool(((vals - lse).exp().sum(dim=-1) >= top_p).all()):
            return vals, idx, lse
        k = min(4 * k, V)


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,). temperature 0 means greedy (argmax).

    The filters and the softmax run in float32 whatever the logits' dtype; top-k and top-p use torch.topk
    (no full sort of the vocabulary).
    """
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(dim=-1)
    use_p = top_p is not None and top_p < 1.0
    if top_k is not None and 0 < top_k < logits.size(-1):
        vals, idx = torch.topk(logits, top_k, dim=-1)  # sorted, descending
        vals = vals / temperature  # the same values as topk of logits / temperature (temperature > 0)
    elif use_p:
        vals, idx, lse = _nucleus(logits / temperature, top_p)
        vals = _top_p_filter(vals, top_p, lse)  # probabilities over the whole vocabulary
        use_p = False
    else:
        vals, idx = logits / temperature, None
    if use_p:  # after top-k: probabilities over the top_k tokens
        vals = _top_p_filter(vals, top_p)
    probs = torch.softmax(vals, dim=-1)
    choice = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
    return choice if idx is None else idx.gather(-1, choice[:, None]).squeeze(-1)


def last_logits(model: GPT, idx: torch.Tensor, cache=None, pad: torch.Tensor | None = None) -> torch.Tensor:
    """idx (B, T) -> logits (B, V) of the last position only: the output layer (the largest matmul of a
    decode step, and (T, V) for a prompt) runs on one row per sequence."""
    h = model.hidden_states(idx, cache, pad)
    return model.lm_head(h[:, -1])


@torch.no_grad()
def generate_tokens(model: GPT, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                    top_k: int | None = None, top_p: float | None = None, eot_id: int | None = None,
                    generator: torch.Generator | None = None, use_cache: bool = True,
                    pad: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
    """idx (B, T) prompt ids -> yields (B,) next ids, max_new_tokens times or until every row hit eot_id.

    pad (B,): left-padding count of each row, for prompts of different lengths batched together
    (see `left_pad`); each row then generates what it would generate alone. Rows that already
    produced eot_id keep yielding eot_id. The model runs in its own dtype (no autocast needed: load it
    with gpt.inference.load_for_inference, which casts the weights once); the sampling math is float32.
    """
    model.eval()
    block = model.config.block_size
    B, T0 = idx.shape
    seq = torch.empty(B, T0 + max_new_tokens, dtype=torch.long, device=idx.device)  # prompt + new ids, no re-allocation
    seq[:, :T0] = idx
    n = T0  # columns of seq filled so far
    cache = model.new_cache(B, block) if use_cache else None
    done = torch.zeros(B, dtype=torch.bool, device=idx.device)
    for step in range(max_new_tokens):
        # the model sees at most the last block_size columns; padding cut off on the left is gone
        lo = max(0, n - block)
        window_pad = None if pad is None else (pad - lo).clamp(min=0)
        if cache is None:
            logits = last_logits(model, seq[:, lo:n], pad=window_pad)
        elif step == 0 or cache.pos >= block:  # (re)fill the cache from the last block_size tokens
            cache.reset()
            logits = last_logits(model, seq[:, lo:n], cache, window_pad)
        else:
            logits = last_logits(model, seq[:, n - 1:n], cache, window_pad)
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        if eot_id is not None:
            nxt = nxt.masked_fill(done, eot_id)
            done |= nxt == eot_id
        seq[:, n] = nxt
        n += 1
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
    if not prompts:
        return []
    idx, pad = left_pad(prompts, device=model.transformer.wte.weight.device)
    new = list(generate_tokens(model, idx, max_new_tokens, pad=pad, **kwargs))
    rows = torch.stack(new, dim=1).tolist() if new else [[] for _ in prompts]
    eot = kwargs.get("eot_id")
    return [row[: row.index(eot)] if eot is not None and eot in row else row for row in rows]
