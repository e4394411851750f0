"""Generation for library callers: `generate_tokens` streams a static batch, `generate` and `generate_batch`
return whole results. All three are thin wrappers over the one decode engine (gpt.engine), which owns the KV
cache, the context-window refill rule (cached and uncached generation give the same tokens for the same seed)
and the sampling rules (`sample_next`, re-exported here).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from gpt.engine import DecodeEngine, Sampling, complete, last_logits, sample_next
from gpt.model import GPT

__all__ = ["generate", "generate_batch", "generate_tokens", "last_logits", "left_pad", "sample_next"]


def _sample(*args):
    """This module's sample_next, looked up at each call (tests replace it to script the sampled tokens)."""
    return sample_next(*args)


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
    if max_new_tokens <= 0:
        return
    rows = idx.tolist()
    if pad is not None:
        rows = [r[p:] for r, p in zip(rows, pad.tolist())]
    engine = DecodeEngine(model, len(rows), use_cache, _sample)
    group = engine.add(rows, Sampling(max_new_tokens, temperature, top_k, top_p,
                                      () if eot_id is None else (eot_id,), generator=generator))[0].group
    while not group.done:
        engine.step()
        if group.last is None:  # sampling failed
            raise group.rows[0].error
        yield group.last


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

    With eot_id given, a row's ids stop before its first end-of-text; with stop_ids, before the first of them (a chat
    answer's: gpt.chat.answer_stop_ids).
    """
    eot, use_cache = kwargs.pop("eot_id", None), kwargs.pop("use_cache", True)
    stops = tuple(kwargs.pop("stop_ids", ())) + (() if eot is None else (eot,))
    sampling = Sampling(max_new_tokens, stop_ids=stops, **kwargs)
    return [r.new for r in complete(model, prompts, sampling, use_cache, _sample)]
