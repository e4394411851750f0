"""GPT model: shapes, loss (fused chunked vs unfused vs by hand), gradients, causality, config checks."""

import math

import pytest
import torch

from gpt.errors import UserError
from gpt.model import GPT, GPTConfig

V, BLOCK = 23, 16


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=V, block_size=BLOCK, n_layer=2, n_head=2, n_embd=16, dropout=0.0, bias=True,
               loss_chunk_size=7)
    cfg.update(kw)
    return GPT(**cfg)


def batch(B=3, T=13, seed=1, vocab=V):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(vocab, (B, T), generator=g)
    y = torch.randint(vocab, (B, T), generator=g)
    return x, y


def grads(model):
    return {n: (p.grad.detach().clone() if p.grad is not None else None) for n, p in model.named_parameters()}


def loss_and_grads(model, x, y, chunk):
    model.config.loss_chunk_size = chunk
    model.zero_grad(set_to_none=True)
    _, loss = model(x, y)
    loss.backward()
    g = grads(model)
    model.zero_grad(set_to_none=True)
    return loss.detach(), g


# ----------------------------------------------------------------------------------------------- shapes


def test_output_shapes_and_return_convention():
    m = tiny().eval()
    x, y = batch(B=3, T=13)
    logits, loss = m(x)
    assert logits.shape == (3, 13, V) and loss is None

    m.config.loss_chunk_size = 5
    logits, loss = m(x, y)
    assert logits is None and loss.shape == () and torch.isfinite(loss)

    m.config.loss_chunk_size = 0
    logits, loss = m(x, y)
    assert logits.shape == (3, 13, V) and loss.shape == ()

    h = m.hidden_states(x)
    assert h.shape == (3, 13, 16)


def test_initial_loss_is_near_log_vocab():
    m = tiny()
    x, y = batch(B=4, T=16)
    _, loss = m(x, y)
    assert abs(loss.item() - math.log(V)) < 0.2


def test_sequence_longer_than_block_size_is_rejected():
    m = tiny()
    with pytest.raises(ValueError, match="block_size"):
        m(torch.zeros(1, BLOCK + 1, dtype=torch.long))


# ------------------------------------------------------------------------------------------------- loss


@pytest.mark.parametrize("chunk", [0, 4, 7, 1000])
def test_loss_equals_hand_computed_cross_entropy_with_ignore_index(chunk):
    m = tiny(loss_chunk_size=chunk).eval()
    x, y = batch(B=2, T=9)
    y[0, 0] = -1
    y[0, 5] = -1
    y[1, 8] = -1
    with torch.no_grad():
        logits, _ = m(x)
    logits = logits.double()
    # log-softmax by hand: z - (max + log(sum(exp(z - max))))
    mx = logits.max(dim=-1, keepdim=True).values
    logp = logits - (mx + (logits - mx).exp().sum(dim=-1, keepdim=True).log())
    total, count = 0.0, 0
    for b in range(2):
        for t in range(9):
            if y[b, t] != -1:
                total -= logp[b, t, y[b, t]].item()
                count += 1
    assert count == 15
    expected = total / count
    # sanity: including the ignored positions (as if they were class 0) would give another value
    wrong = (total - sum(logp[b, t, 0].item() for b, t in [(0, 0), (0, 5), (1, 8)])) / 18
    assert abs(wrong - expected) > 1e-3

    _, loss = m(x, y)
    assert loss.item() == pytest.approx(expected, abs=1e-5)


def test_all_targets_valid_matches_torch_cross_entropy():
    m = tiny(loss_chunk_size=5).eval()
    x, y = batch(B=2, T=11)
    with torch.no_grad():
        logits, _ = m(x)
        _, loss = m(x, y)
    ref = torch.nn.functional.cross_entropy(logits.view(-1, V), y.view(-1))
    assert loss.item() == pytest.approx(ref.item(), abs=1e-6)


def test_custom_ignore_index():
    m = tiny(loss_chunk_size=4).eval()
    x, y = batch(B=2, T=8)
    y[1, :4] = -100
    with torch.no_grad():
        logits, _ = m(x)
        _, loss = m(x, y, ignore_index=-100)
    ref = torch.nn.functional.cross_entropy(logits.view(-1, V), y.view(-1), ignore_index=-100)
    assert loss.item() == pytest.approx(ref.item(), abs=1e-6)


@pytest.mark.parametrize("chunk", [1, 5, 7, 39, 64])
def test_fused_loss_and_gradients_equal_unfused_double(chunk):
    """N = 3*13 = 39 rows; chunk sizes that divide N and that do not, and one larger than N."""
    m = tiny(seed=3).double()
    x, y = batch(B=3, T=13, seed=4)
    y[0, 2] = -1
    y[2, 12] = -1
    ref_loss, ref_g = loss_and_grads(m, x, y, chunk=0)
    loss, g = loss_and_grads(m, x, y, chunk=chunk)
    # both paths compute the logits / loss in float32 (logits.float()), so agreement is float32-tight
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6, abs=1e-7)
    assert set(g) == set(ref_g)
    for name in ref_g:
        assert g[name] is not None and ref_g[name] is not None, name
        assert g[name].dtype == torch.float64
        torch.testing.assert_close(g[name], ref_g[name], rtol=1e-5, atol=1e-8, msg=name)
    # every parameter actually receives a gradient (the tied embedding/output matrix included)
    assert all(v.abs().sum() > 0 for v in g.values())


def test_fused_backward_scales_with_upstream_gradient():
    m = tiny(seed=5).double()
    x, y = batch(seed=6)
    m.zero_grad()
    _, loss = m(x, y)
    loss.backward()
    g1 = grads(m)
    m.zero_grad(set_to_none=True)
    _, loss = m(x, y)
    (3.0 * loss).backward()
    g3 = grads(m)
    for n in g1:
        torch.testing.assert_close(g3[n], 3.0 * g1[n], rtol=1e-10, atol=1e-12, msg=n)


@pytest.mark.parametrize("chunk", [5, 64])
def test_fused_loss_under_bf16_autocast_close_to_unfused(chunk):
    m = tiny(seed=7)
    x, y = batch(B=3, T=13, seed=8)
    y[1, 3] = -1
    ref_loss, ref_g = loss_and_grads(m, x, y, chunk=0)  # fp32 reference
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m.config.loss_chunk_size = chunk
        m.zero_grad(set_to_none=True)
        _, loss = m(x, y)
    loss.backward()
    g = grads(m)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ac_ref_loss, ac_ref_g = loss_and_grads(m, x, y, chunk=0)  # unfused under the same autocast
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref_loss.item(), rel=2e-2)
    assert loss.item() == pytest.approx(ac_ref_loss.item(), rel=1e-2)
    for name in ref_g:
        assert g[name].dtype == torch.float32
        scale = ref_g[name].abs().max().item()
        assert (g[name] - ref_g[name]).abs().max().item() <= 0.1 * scale + 1e-6, name
        assert (g[name] - ac_ref_g[name]).abs().max().item() <= 0.1 * scale + 1e-6, name
        cos = torch.nn.functional.cosine_similarity(g[name].flatten(), ref_g[name].flatten(), dim=0)
        assert cos > 0.98, name


@pytest.mark.parametrize("chunk", [0, 6])
def test_loss_in_no_grad_mode(chunk):
    m = tiny(loss_chunk_size=chunk)
    x, y = batch()
    _, ref = m(x, y)
    with torch.no_grad():
        _, loss = m(x, y)
    assert not loss.requires_grad
    assert loss.item() == pytest.approx(ref.item(), abs=1e-6)
    with torch.inference_mode():
        _, loss2 = m(x, y)
    assert loss2.item() == pytest.approx(ref.item(), abs=1e-6)


# ------------------------------------------------------------------------------------------- structure


def test_causality_future_tokens_do_not_change_past_logits():
    m = tiny(seed=9).eval()
    x, _ = batch(B=2, T=BLOCK, seed=10)
    with torch.no_grad():
        base, _ = m(x)
        for t in (1, 7, BLOCK - 1):
            x2 = x.clone()
            x2[:, t] = (x2[:, t] + 5) % V
            out, _ = m(x2)
            torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-6)
            assert (out[:, t:] - base[:, t:]).abs().max() > 1e-4  # the changed position itself does change


def test_weight_tying():
    m = tiny()
    assert m.transformer.wte.weight is m.lm_head.weight
    names = [n for n, _ in m.named_parameters()]
    assert sum(1 for n in names if n.endswith("wte.weight") or n == "lm_head.weight") == 1
    with torch.no_grad():
        m.lm_head.weight[3].fill_(0.5)
    assert torch.all(m.transformer.wte.weight[3] == 0.5)


def test_bad_shapes_raise_user_error_naming_n_embd_and_n_head():
    with pytest.raises(UserError) as e:
        GPT(vocab_size=V, block_size=BLOCK, n_layer=1, n_head=3, n_embd=100)
    msg = str(e.value)
    assert "n_embd=100" in msg and "n_head=3" in msg
    with pytest.raises(UserError, match="n_embd"):
        GPTConfig(vocab_size=V, n_head=3, n_embd=100)


@pytest.mark.parametrize("kw,name", [
    (dict(vocab_size=0), "vocab_size"),
    (dict(block_size=-1), "block_size"),
    (dict(n_layer=0), "n_layer"),
    (dict(n_head=2.0), "n_head"),
    (dict(dropout=1.0), "dropout"),
    (dict(dropout=-0.1), "dropout"),
])
def test_invalid_config_values_raise_user_error(kw, name):
    cfg = dict(vocab_size=V, block_size=BLOCK, n_layer=1, n_head=2, n_embd=16)
    cfg.update(kw)
    with pytest.raises(UserError, match=name):
        GPTConfig(**cfg)


def test_dropout_eval_is_deterministic_and_train_is_not():
    m = tiny(dropout=0.3)
    x, _ = batch()
    m.eval()
    with torch.no_grad():
        a, _ = m(x)
        b, _ = m(x)
    assert torch.equal(a, b)
    m.train()
    torch.manual_seed(0)
    with torch.no_grad():
        c, _ = m(x)
        d, _ = m(x)
    assert not torch.allclose(c, d)
    assert not torch.allclose(c, a)


def test_flops_per_token_formula():
    m = tiny(bias=False)
    cfg = m.config
    unique = {id(p): p for p in m.parameters()}
    n_all = sum(p.numel() for p in unique.values())
    n = n_all - cfg.block_size * cfg.n_embd  # non-embedding: position table excluded
    assert m.num_params() == n
    assert m.num_params(non_embedding=False) == n_all
    expected = 6 * n + 12 * cfg.n_layer * cfg.block_size * cfg.n_embd
    assert m.flops_per_token() == expected > 0
    assert m.flops_per_token(8) == 6 * n + 12 * cfg.n_layer * 8 * cfg.n_embd
    assert m.flops_per_token(8) < m.flops_per_token()
    # hand count of N for this architecture (bias=False): wte + per-layer (2 LN + attn + mlp) + ln_f
    C, L = cfg.n_embd, cfg.n_layer
    assert n == V * C + L * (2 * C + 4 * C * C + 8 * C * C) + C


def test_hparams_round_trip():
    m = tiny()
    hp = m.hparams()
    assert hp["vocab_size"] == V and hp["block_size"] == BLOCK and hp["loss_chunk_size"] == 7
    m2 = GPT(**hp)
    assert m2.hparams() == hp


def test_dropout_applies_in_training_only():
    """model.dropout drops activations in training (two passes differ, and the embedding, attention and MLP
    dropouts each act) and is the identity in eval mode (the modules are then not called at all)."""
    torch.manual_seed(0)
    m = GPT(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.3)
    x = torch.randint(32, (2, 8))
    m.train()
    assert not torch.equal(m(x)[0], m(x)[0])
    for drop in (m.transformer.drop, m.transformer.h[0].attn.resid_dropout, m.transformer.h[1].mlp.dropout):
        calls = []
        handle = drop.register_forward_hook(lambda mod, args, out: calls.append(1))
        m(x)
        m.eval()
        m(x)
        m.train()
        handle.remove()
        assert calls == [1]
    m.eval()
    assert torch.equal(m(x)[0], m(x)[0])

