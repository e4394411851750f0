"""Batched generation of prompts with different lengths: each row equals generating it alone."""

import pytest
import torch

from gpt.generate import generate, generate_batch, left_pad
from gpt.model import GPT


def model(impl):
    torch.manual_seed(0)
    return GPT(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32, attn_impl=impl).eval()


def test_left_pad():
    idx, pad = left_pad([[1, 2], [3, 4, 5, 6], [7]], pad_id=0)
    assert idx.tolist() == [[0, 0, 1, 2], [3, 4, 5, 6], [0, 0, 0, 7]]
    assert pad.tolist() == [2, 0, 3]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_batched_rows_equal_single_generation(impl, use_cache):
    m = model(impl)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]
    batched = generate_batch(m, prompts, 25, temperature=0.0, use_cache=use_cache)  # runs past block_size 16
    alone = [generate(m, torch.tensor([p]), 25, temperature=0.0)[0, len(p):].tolist() for p in prompts]
    assert batched == alone


def test_padded_logits_equal_unpadded_logits():
    m = model("sdpa")
    short = torch.tensor([[5, 6, 7]])
    idx, pad = left_pad([[5, 6, 7], [1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        alone = m(short)[0]
        padded = m(idx, pad=pad)[0]
    torch.testing.assert_close(padded[0, 3:], alone[0], atol=1e-5, rtol=1e-5)  # real positions agree
    assert torch.isfinite(padded).all()  # padding rows stay finite


def test_batch_stops_each_row_at_end_of_text():
    m = model("eager")
    prompts = [[1, 2], [3, 4, 5]]
    free = generate_batch(m, prompts, 12, temperature=0.0)
    # declare as end-of-text the first new token of row 0 that differs from all before it
    k = next(i for i in range(1, len(free[0])) if free[0][i] not in free[0][:i])
    eot = free[0][k]
    rows = generate_batch(m, prompts, 12, temperature=0.0, eot_id=eot)
    assert rows[0] == free[0][:k] and len(rows[0]) > 0
    assert rows[1] == (free[1][: free[1].index(eot)] if eot in free[1] else free[1])
