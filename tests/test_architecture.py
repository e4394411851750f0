"""The architecture options (model.pos / norm / mlp / qk_norm / n_kv_head / tie_embeddings) against
references: rotary attention depends on relative positions only, grouped-query attention equals multi-head
attention with each key/value head repeated, SwiGLU and ReLU^2 equal their formulas, and every option keeps
the guarantees of the GPT-2 model: causality, KV-cache == uncached, padded batch rows == rows alone, ragged
(continuous-batching) steps == rows alone, activation checkpointing's gradients, int8 and LoRA."""

import math

import pytest
import torch
import torch.nn.functional as F

from gpt.errors import UserError
from gpt.generate import generate, generate_batch
from gpt.model import GPT, GPTConfig, apply_rotary, rotary

V, BLOCK = 37, 24

VARIANTS = {
    "gpt2": {},
    "rope": dict(pos="rope"),
    "rmsnorm": dict(norm="rmsnorm"),
    "swiglu": dict(mlp="swiglu"),
    "relu2": dict(mlp="relu2"),
    "qk_norm": dict(qk_norm=True),
    "gqa": dict(n_kv_head=2),
    "mqa_eager": dict(n_kv_head=1, attn_impl="eager"),
    "untied": dict(tie_embeddings=False),
    "llama": dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, tie_embeddings=False, bias=False),
    "modern_eager": dict(pos="rope", norm="rmsnorm", mlp="relu2", qk_norm=True, n_kv_head=1, attn_impl="eager"),
    "padded_vocab": dict(vocab_multiple=64, pos="rope", norm="rmsnorm", mlp="swiglu", tie_embeddings=False),
}


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=V, block_size=BLOCK, n_layer=2, n_head=4, n_embd=32, bias=True, loss_chunk_size=7)
    cfg.update(kw)
    return GPT(**cfg)


def tokens(B, T, seed=1):
    return torch.randint(V, (B, T), generator=torch.Generator().manual_seed(seed))


params = pytest.mark.parametrize("kw", list(VARIANTS.values()), ids=list(VARIANTS))


# ------------------------------------------------------------------------------- the parts, by reference


def test_rotary_scores_depend_only_on_the_distance_between_positions():
    D = 16
    q, k = torch.randn(1, 1, 1, D, dtype=torch.float64), torch.randn(1, 1, 1, D, dtype=torch.float64)

    def score(m, n):
        cm, sm = rotary(torch.tensor([m]), D, 10000.0)
        cn, sn = rotary(torch.tensor([n]), D, 10000.0)
        return (apply_rotary(q, cm.double(), sm.double()) * apply_rotary(k, cn.double(), sn.double())).sum().item()

    assert score(7, 3) == pytest.approx(score(107, 103), rel=1e-5)  # angles are float32
    assert score(7, 3) == pytest.approx(score(4, 0), rel=1e-5)
    assert score(7, 3) != pytest.approx(score(7, 5), rel=1e-3)  # another distance, another score
    # position 0 is the identity, and the rotation keeps each pair's length
    c0, s0 = rotary(torch.tensor([0]), D, 10000.0)
    torch.testing.assert_close(apply_rotary(q, c0.double(), s0.double()), q)
    c, s = rotary(torch.tensor([5]), D, 10000.0)
    torch.testing.assert_close(apply_rotary(q, c.double(), s.double()).norm(), q.norm())


def test_rotary_angles_by_hand():
    D, theta = 4, 100.0
    cos, sin = rotary(torch.tensor([[0, 3]]), D, theta)  # (B=1, 1, T=2, D/2)
    assert cos.shape == (1, 1, 2, 2)
    # pair 0 turns by p * theta^0, pair 1 by p * theta^(-2/4) = p / 10
    torch.testing.assert_close(cos[0, 0, 1], torch.tensor([math.cos(3.0), math.cos(0.3)]))
    torch.testing.assert_close(sin[0, 0, 1], torch.tensor([math.sin(3.0), math.sin(0.3)]))
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])  # pairs (x0, x2) and (x1, x3)
    y = apply_rotary(x.view(1, 1, 1, 4), cos[:, :, 1:], sin[:, :, 1:]).flatten()
    want = [1 * math.cos(3) - 3 * math.sin(3), 2 * math.cos(0.3) - 4 * math.sin(0.3),
            3 * math.cos(3) + 1 * math.sin(3), 4 * math.cos(0.3) + 2 * math.sin(0.3)]
    torch.testing.assert_close(y, torch.tensor(want))


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_grouped_query_attention_equals_multi_head_with_repeated_kv_heads(impl):
    """A GQA model (4 query heads, 2 key/value heads) gives the logits of an MHA model whose key and value
    heads are the GQA ones, each repeated for its 2 query heads."""
    gqa = tiny(3, n_kv_head=2, pos="rope", attn_impl=impl).eval()
    mha = tiny(4, pos="rope", attn_impl=impl).eval()
    state = gqa.state_dict()
    H, Hkv, D, C = 4, 2, 8, 32
    for i in range(2):
        key = f"transformer.h.{i}.attn.c_attn.weight"
        q, k, v = state[key].split([H * D, Hkv * D, Hkv * D])
        rep = [t.view(Hkv, D, C).repeat_interleave(H // Hkv, dim=0).reshape(H * D, C) for t in (k, v)]
        state[key] = torch.cat([q, *rep])
        bkey = key.replace("weight", "bias")
        qb, kb, vb = state[bkey].split([H * D, Hkv * D, Hkv * D])
        state[bkey] = torch.cat([qb, *(t.view(Hkv, D).repeat_interleave(H // Hkv, dim=0).flatten() for t in (kb, vb))])
    mha.load_state_dict(state)
    x = tokens(2, 11)
    with torch.no_grad():
        torch.testing.assert_close(gqa(x)[0], mha(x)[0], rtol=1e-5, atol=1e-5)
    assert gqa.new_cache(1).k.shape[2] == 2  # the cache holds the key/value heads only
    assert gqa.num_params() < mha.num_params()


@pytest.mark.parametrize("mlp,act", [("swiglu", None), ("relu2", lambda h: F.relu(h) ** 2),
                                     ("gelu", lambda h: F.gelu(h, approximate="tanh"))])
def test_mlp_equals_its_formula(mlp, act):
    m = tiny(5, mlp=mlp).transformer.h[0].mlp
    x = torch.randn(3, 32)
    W1, b1, W2, b2 = m.c_fc.weight, m.c_fc.bias, m.c_proj.weight, m.c_proj.bias
    h = x @ W1.T + b1
    if mlp == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        h = gate * torch.sigmoid(gate) * up
        assert m.c_fc.out_features == 2 * 128  # 8C/3 = 85.3, rounded up to a multiple of 64: 128
    else:
        h = act(h)
        assert m.c_fc.out_features == 4 * 32
    torch.testing.assert_close(m(x), h @ W2.T + b2, rtol=1e-5, atol=1e-6)


def test_rmsnorm_and_qk_norm_by_hand():
    m = tiny(6, norm="rmsnorm", qk_norm=True)
    ln = m.transformer.h[0].ln_1
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 32)
    torch.testing.assert_close(ln(x), x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * ln.weight)
    attn = m.transformer.h[0].attn
    assert attn.q_norm.weight.shape == (8,) and attn.k_norm.weight.shape == (8,)  # over each head's D channels
    assert not any("bias" in n for n, _ in m.named_parameters() if "norm" in n or "ln_" in n)


def test_parameter_names_and_count_of_a_llama_shape():
    m = tiny(**VARIANTS["llama"])
    names = {n for n, _ in m.named_parameters()}
    assert "transformer.wpe.weight" not in names and "lm_head.weight" in names and "transformer.wte.weight" in names
    assert m.lm_head.weight is not m.transformer.wte.weight
    C, L, F_, D, Hkv = 32, 2, 128, 8, 2
    per_block = 2 * C + C * (C + 2 * Hkv * D) + C * C + C * 2 * F_ + F_ * C
    assert m.num_params() == 2 * V * C + L * per_block + C  # no position table: everything counts


def test_gpt2_options_keep_the_parameter_names_and_shapes_old_checkpoints_have():
    """A GPT-2 model has exactly the state dict the model had before the options existed."""
    m = tiny(bias=True)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    want = {"transformer.wte.weight": (V, 32), "transformer.wpe.weight": (BLOCK, 32),
            "transformer.ln_f.weight": (32,), "transformer.ln_f.bias": (32,), "lm_head.weight": (V, 32)}
    for i in range(2):
        p = f"transformer.h.{i}."
        want.update({p + "ln_1.weight": (32,), p + "ln_1.bias": (32,), p + "ln_2.weight": (32,), p + "ln_2.bias": (32,),
                     p + "attn.c_attn.weight": (96, 32), p + "attn.c_attn.bias": (96,),
                     p + "attn.c_proj.weight": (32, 32), p + "attn.c_proj.bias": (32,),
                     p + "mlp.c_fc.weight": (128, 32), p + "mlp.c_fc.bias": (128,),
                     p + "mlp.c_proj.weight": (32, 128), p + "mlp.c_proj.bias": (32,)})
    assert shapes == want
    # hparams of an old checkpoint (no option keys) build the same model
    old = {k: v for k, v in m.hparams().items() if k in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd",
                                                         "dropout", "bias", "loss_chunk_size", "attn_impl")}
    GPT(**old).load_state_dict(m.state_dict())


@pytest.mark.parametrize("kw,name", [
    (dict(pos="alibi"), "model.pos"),
    (dict(norm="batchnorm"), "model.norm"),
    (dict(mlp="geglu"), "model.mlp"),
    (dict(n_kv_head=3), "model.n_kv_head"),
    (dict(n_kv_head=0), "model.n_kv_head"),
    (dict(qk_norm="yes"), "model.qk_norm"),
    (dict(tie_embeddings=1), "model.tie_embeddings"),
    (dict(mlp_hidden=0), "model.mlp_hidden"),
    (dict(rope_theta=1.0), "model.rope_theta"),
    (dict(pos="rope", n_head=4, n_embd=20), "even head size"),
])
def test_bad_option_values_are_one_clear_error(kw, name):
    cfg = dict(vocab_size=V, block_size=BLOCK, n_layer=1, n_head=4, n_embd=32)
    cfg.update(kw)
    with pytest.raises(UserError, match=name):
        GPTConfig(**cfg)


# ------------------------------------------------------------------- the guarantees, for every option


@params
def test_causality(kw):
    m = tiny(7, **kw).eval()
    x = tokens(2, BLOCK, seed=8)
    with torch.no_grad():
        base = m(x)[0]
        for t in (1, 9, BLOCK - 1):
            x2 = x.clone()
            x2[:, t] = (x2[:, t] + 5) % V
            out = m(x2)[0]
            torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-5)
            assert (out[:, t:] - base[:, t:]).abs().max() > 1e-4


@params
def test_kv_cache_logits_equal_the_full_forward(kw):
    m = tiny(9, **kw).eval()
    x = tokens(2, 17, seed=10)
    with torch.no_grad():
        full = m(x)[0]
        cache = m.new_cache(2)
        steps = [m(x[:, :6], cache=cache)[0], m(x[:, 6:9], cache=cache)[0]]  # a prefill, then a chunk
        steps += [m(x[:, t:t + 1], cache=cache)[0] for t in range(9, 17)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


@params
def test_generation_cached_equals_uncached_past_block_size(kw):
    m = tiny(11, **kw).eval()
    prompt = tokens(1, 5, seed=12)
    a = generate(m, prompt, BLOCK + 6, temperature=0.0, use_cache=True)
    b = generate(m, prompt, BLOCK + 6, temperature=0.0, use_cache=False)
    assert a.tolist() == b.tolist()


@params
def test_padded_batch_rows_equal_rows_alone(kw):
    m = tiny(13, **kw).eval()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]
    batched = generate_batch(m, prompts, 8, temperature=0.0, use_cache=True)
    alone = [generate(m, torch.tensor([p]), 8, temperature=0.0)[0, len(p):].tolist() for p in prompts]
    assert batched == alone


@params
def test_a_ragged_step_equals_each_row_alone(kw):
    m = tiny(14, **kw).eval()
    seqs = [tokens(1, n, seed=20 + n)[0].tolist() for n in (3, 9, 6)]
    with torch.no_grad():
        want = []
        for s in seqs:
            cache = m.new_cache(1)
            m(torch.tensor([s[:-1]]), cache=cache)
            want.append(m(torch.tensor([s[-1:]]), cache=cache)[0][0, -1])
        big = m.new_cache(3).zero_()
        for i, s in enumerate(seqs):
            m(torch.tensor([s[:-1]]), cache=big.rows(i, i + 1, [0]))
        view = big.rows(0, 3, [len(s) - 1 for s in seqs])
        assert view.lens is not None
        got = m(torch.tensor([[s[-1]] for s in seqs]), cache=view)[0][:, -1]
    torch.testing.assert_close(got, torch.stack(want), rtol=0, atol=1e-5)


@params
def test_a_packed_forward_equals_each_part_alone(kw):
    """GPT.packed_last_hidden over a ragged decode step (rows at positions 2, 8, 5), a prefill of two rows from
    position 0 and a one-row chunk over a filled cache, all in one cache: every row's last hidden state and every
    part's cached keys/values equal those of that part's own forward (the reference: hidden_states alone)."""
    m = tiny(21, **kw).eval()
    seqs = [tokens(1, n, seed=30 + n)[0].tolist() for n in (3, 9, 6)]
    fills, chunk = tokens(2, 7, seed=40), tokens(1, 4, seed=41)
    with torch.no_grad():
        caches = []
        for packed in (False, True):
            big = m.new_cache(6).zero_()
            for i, s in enumerate(seqs):
                m(torch.tensor([s[:-1]]), cache=big.rows(i, i + 1, [0]))
            m(tokens(1, 5, seed=42), cache=big.rows(5, 6, [0]))  # the chunk's row already holds 5 positions
            parts = [(torch.tensor([[s[-1]] for s in seqs]), big.rows(0, 3, [len(s) - 1 for s in seqs])),
                     (fills, big.rows(3, 5, [0, 0])), (chunk, big.rows(5, 6, [5]))]
            assert parts[0][1].lens is not None
            if packed:
                got = m.packed_last_hidden(parts)
            else:
                want = torch.cat([m.hidden_states(idx, view)[:, -1] for idx, view in parts])
            caches.append(big)
    assert got.shape == want.shape == (6, m.config.n_embd)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    for a, b in ((caches[0].k, caches[1].k), (caches[0].v, caches[1].v)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert [v.pos if v.lens is None else v.lens.tolist() for _, v in parts] == [[3, 9, 6], 7, 9]


@params
def test_activation_checkpointing_gives_the_same_gradients(kw):
    x, y = tokens(2, 13, seed=15), tokens(2, 13, seed=16)
    out = []
    for ckpt in (False, True):
        m = tiny(17, activation_checkpointing=ckpt, **kw).train()
        _, loss = m(x, y)
        loss.backward()
        out.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=0, atol=0)
    for n, g in out[0][1].items():
        torch.testing.assert_close(out[1][1][n], g, rtol=1e-6, atol=1e-7, msg=n)


@params
def test_every_parameter_gets_a_gradient_and_training_lowers_the_loss(kw):
    m = tiny(18, **kw).train()
    x = tokens(4, 16, seed=19)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        _, loss = m(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        if not losses:
            missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
            assert not missing
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]  # memorising one batch: every option learns


@params
def test_bf16_autocast_forward_is_close_to_float32(kw):
    m = tiny(21, **kw).eval()
    x = tokens(2, 12, seed=22)
    with torch.no_grad():
        ref = m(x)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = m(x)[0].float()
    assert (low - ref).abs().max() < 0.1 * ref.abs().max()


@params
def test_int8_model_stays_close_and_its_cache_equals_uncached(kw):
    from gpt.quantize import num_params, quantize_int8

    m = tiny(23, **kw).eval()
    q = quantize_int8(m)
    x = tokens(2, 12, seed=24)
    with torch.no_grad():
        ref, got = m(x)[0], q(x)[0]
    assert (got - ref).abs().max() < 0.05 * ref.abs().max() + 1e-3
    assert num_params(q) == m.num_params()
    prompt = tokens(1, 4, seed=25)
    assert generate(q, prompt, 10, temperature=0.0).tolist() == generate(q, prompt, 10, temperature=0.0,
                                                                          use_cache=False).tolist()


@params
def test_lora_wraps_the_same_layers_and_merges_back_exactly(kw):
    from gpt.lora import apply_lora, merge_lora

    m = tiny(26, **kw)
    x = tokens(2, 10, seed=27)
    info = apply_lora(m, r=4, alpha=8, targets=["attn.c_attn", "mlp.c_fc"])
    assert len(info["layers"]) == 4
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        _, loss = m(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        wrapped = m(x)[0]
        merged = merge_lora(m)(x)[0]
    torch.testing.assert_close(merged, wrapped, rtol=1e-5, atol=1e-5)


def test_the_config_rules_offer_exactly_the_model_tables_options():
    from gpt import schema
    from gpt.model import MLPS, NORMS, POSITIONS

    assert set(schema.RULES["model.pos"].options) == set(POSITIONS)
    assert set(schema.RULES["model.norm"].options) == set(NORMS)
    assert set(schema.RULES["model.mlp"].options) == set(MLPS)


@pytest.mark.parametrize("tie", [True, False])
def test_a_grown_vocabulary_keeps_each_matrix_and_trains_only_the_new_rows(tie):
    """Fine-tuning adds special tokens: the embedding and the output layer (one matrix or two) keep their rows,
    new rows start at that matrix's mean row, and with LoRA only the new rows of each move."""
    from gpt.lora import apply_lora, merge_lora
    from gpt.parent import grow_vocab

    m = tiny(30, tie_embeddings=tie)
    with torch.no_grad():
        m.lm_head.weight.mul_(3.0)  # untied: the two matrices differ
    g = grow_vocab(m, V + 3)
    for key in ("transformer.wte.weight", "lm_head.weight"):
        old, new = m.state_dict()[key], g.state_dict()[key]
        torch.testing.assert_close(new[:V], old, rtol=0, atol=0)
        torch.testing.assert_close(new[V:], old.mean(0, keepdim=True).expand(3, -1), rtol=0, atol=0)
    assert (g.lm_head.weight is g.transformer.wte.weight) == tie
    apply_lora(g, r=2, alpha=4, targets=["attn.c_attn"], new_rows_from=V)
    x = torch.tensor([[V, V + 1, 3, V + 2, 5]])
    g(x[:, :-1], x[:, 1:])[1].backward()
    for w in {id(w): w for w in (g.transformer.wte.weight, g.lm_head.weight)}.values():
        assert w.grad[:V].abs().sum() == 0 and w.grad[V:].abs().sum() > 0
    merge_lora(g)  # removes every row hook
    g.zero_grad()
    g(x[:, :-1], x[:, 1:])[1].backward()
    assert g.lm_head.weight.grad[:V].abs().sum() > 0
