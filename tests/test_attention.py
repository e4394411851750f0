"""Both attention implementations (SDPA and eager) agree, stay causal and work with the KV cache."""

import pytest
import torch

from gpt.errors import UserError
from gpt.generate import generate
from gpt.model import GPT


def pair(**kw):
    torch.manual_seed(0)
    a = GPT(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=16, attn_impl="sdpa", **kw)
    b = GPT(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=16, attn_impl="eager", **kw)
    b.load_state_dict(a.state_dict())
    return a, b


def test_eager_matches_sdpa_logits_and_grads():
    a, b = pair()
    x, y = torch.randint(0, 40, (3, 16)), torch.randint(0, 40, (3, 16))
    torch.testing.assert_close(a(x)[0], b(x)[0], atol=1e-5, rtol=1e-5)
    a(x, y)[1].backward()
    b(x, y)[1].backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_eager_is_causal():
    _, b = pair()
    x = torch.randint(0, 40, (1, 16))
    x2 = x.clone()
    x2[0, 10] = (x2[0, 10] + 1) % 40
    la, lb = b(x)[0], b(x2)[0]
    torch.testing.assert_close(la[:, :10], lb[:, :10])
    assert not torch.allclose(la[:, 10:], lb[:, 10:])


@pytest.mark.parametrize("kw", [dict(temperature=0.0), dict(temperature=1.0, top_k=5)])
def test_eager_kv_cache_equals_uncached_past_block_size(kw):
    _, b = pair()
    x = torch.randint(0, 40, (2, 5))
    cached = generate(b, x, 30, generator=torch.Generator().manual_seed(1), **kw)
    plain = generate(b, x, 30, generator=torch.Generator().manual_seed(1), use_cache=False, **kw)
    assert torch.equal(cached, plain)


def test_eager_chunked_prefill_with_cache_matches_full_forward():
    _, b = pair()
    b.eval()
    x = torch.randint(0, 40, (2, 12))
    full = b(x)[0]
    cache = b.new_cache(2)
    first = b(x[:, :7], cache=cache)[0]
    rest = b(x[:, 7:], cache=cache)[0]  # several new queries over a non-empty cache: needs the offset mask
    torch.testing.assert_close(torch.cat([first, rest], dim=1), full, atol=1e-5, rtol=1e-5)


def test_unknown_attn_impl_is_rejected():
    with pytest.raises(UserError, match="attn_impl='flash3'"):
        GPT(vocab_size=10, block_size=8, n_layer=1, n_head=1, n_embd=8, attn_impl="flash3")
