"""INT8 Linear layers: bounded logit error, small perplexity cost, every kernel, identical save/load round trip,
old-format checkpoints, infer.py support."""

import pytest
import torch


from inprocess import run_here
from gpt.checkpoint import load_checkpoint, save_checkpoint
from gpt.errors import UserError
from gpt.generate import generate
from gpt.inference import is_quantized, load_for_inference
from gpt.model import GPT
from gpt.quantize import Int8Linear, model_from_quantized, quantize_int8, quantized_checkpoint, quantize_weight

CFG = dict(vocab_size=97, block_size=32, n_layer=2, n_head=2, n_embd=64, dropout=0.0, bias=True)


@pytest.fixture
def ckpt_path(tmp_path):
    torch.manual_seed(0)
    model = GPT(**CFG)
    return save_checkpoint({"model": model.state_dict(), "config": {"model": {"_target_": "gpt.model.GPT", **CFG}},
                            "tokenizer": {"type": "char", "chars": "".join(chr(32 + i) for i in range(97))},
                            "step": 3}, tmp_path / "float.pt")


def test_int8_logits_stay_close_to_float(ckpt_path):
    model, _, _ = load_for_inference(str(ckpt_path), dtype="float32")
    q = quantize_int8(model)
    assert is_quantized(q) and not is_quantized(model)
    idx = torch.randint(0, 97, (2, 32))
    with torch.no_grad():
        ref, got = model(idx)[0], q(idx)[0]
    err = (got - ref).abs().max().item()
    assert err < 0.05 * ref.abs().max().item() + 1e-3, err  # int8 weights: small, bounded error
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    with torch.no_grad():  # the loss path works on a quantized lm_head too: the cross-entropy of its own logits
        lq, lf = q(idx, idx)[1].item(), model(idx, idx)[1].item()
    expected = torch.nn.functional.cross_entropy(got.reshape(-1, 97), idx.reshape(-1)).item()
    assert lq == pytest.approx(expected, rel=1e-5)
    assert abs(lq - lf) <= 2 * err + 1e-6  # cross-entropy moves at most twice the largest logit change


def test_quantized_checkpoint_round_trip_is_exact(ckpt_path, tmp_path):
    ckpt = load_checkpoint(ckpt_path)
    model, _, _ = load_for_inference(str(ckpt_path), dtype="float32")
    q = quantize_int8(model)
    path = save_checkpoint(quantized_checkpoint(q, ckpt), tmp_path / "int8.pt")
    assert path.stat().st_size < 0.5 * ckpt_path.stat().st_size  # int8 weights: a smaller file
    stored = torch.load(path, weights_only=True)["quantized"]["linears"]["lm_head"]
    assert stored["int8"].dtype is torch.int8 and stored["scales"].dtype is torch.float32  # compact, plain tensors
    back = model_from_quantized(load_checkpoint(path))
    idx = torch.randint(0, 97, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(back(idx)[0], q(idx)[0], atol=0, rtol=0)
    g = lambda m: generate(m, idx[:, :4], 40, temperature=1.0, top_k=20,  # noqa: E731
                           generator=torch.Generator().manual_seed(0))
    assert torch.equal(g(back), g(q))  # includes generation past block_size with the KV cache


def test_kv_cache_equals_uncached_for_int8(ckpt_path):
    q = quantize_int8(load_for_inference(str(ckpt_path), dtype="float32")[0])
    idx = torch.randint(0, 97, (1, 5))
    a = generate(q, idx, 20, temperature=0.0)
    b = generate(q, idx, 20, temperature=0.0, use_cache=False)
    assert torch.equal(a, b)


def test_every_linear_is_int8_and_the_embedding_stays_float(ckpt_path):
    model, _, _ = load_for_inference(str(ckpt_path), dtype="float32")
    q = quantize_int8(model)
    assert not any(isinstance(m, torch.nn.Linear) for m in q.modules())
    linears = [m for m in q.modules() if isinstance(m, Int8Linear)]
    assert len(linears) == 4 * CFG["n_layer"] + 1 and all(m.weight.dtype is torch.int8 for m in linears)
    assert torch.equal(q.transformer.wte.weight, model.transformer.wte.weight)  # the input lookup stays exact
    assert q.transformer.wte.weight.dtype is torch.float32


@pytest.mark.parametrize("kernel", [k for k in Int8Linear.KERNELS if k != "native"])  # native: test_native.py
def test_each_kernel_matches_the_dequantized_weight(kernel):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 97)
    m = Int8Linear.from_linear(lin, (kernel,))
    if m.kernel != kernel:
        pytest.skip(f"no {kernel} kernel here")
    x = torch.randn(2, 3, 64)
    ref = torch.nn.functional.linear(x, m.dequantized(), m.bias)
    with torch.no_grad():
        got = m(x)
    assert got.shape == (2, 3, 97) and got.dtype is torch.float32
    assert (got - ref).abs().max() < 0.03 * ref.abs().max()
    q, s = quantize_weight(lin.weight)  # symmetric per output channel: |w - q * s| <= s / 2
    assert q.dtype is torch.int8 and int(q.abs().max()) <= 127
    assert ((q.float() * s[:, None] - lin.weight).abs() <= s[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("kernel", [k for k in Int8Linear.KERNELS if k != "native"])
def test_rows_independent_says_whether_a_row_depends_on_its_batch_mates(kernel):
    """fbgemm quantizes a call's activations with one scale for all its rows: a row's output changes when a row
    of larger values joins it, and the layer says so (rows_independent False), so the decode engine does not pack
    joining prompts into a decode step with an int8 model on it; the other kernels treat each row alone."""
    from gpt.engine import DecodeEngine

    torch.manual_seed(0)
    m = Int8Linear.from_linear(torch.nn.Linear(64, 32), (kernel,))
    if m.kernel != kernel:
        pytest.skip(f"no {kernel} kernel here")
    x = torch.randn(1, 64)
    with torch.no_grad():
        alone, beside = m(x)[0], m(torch.cat([x, 50 * torch.randn(1, 64)]))[0]
    assert m.rows_independent == (kernel != "fbgemm")
    diff = (alone - beside).abs().max().item()  # a float matmul over 2 rows may round differently (~1e-7)
    assert diff < 1e-5 if m.rows_independent else diff > 1e-3
    model = GPT(vocab_size=48, block_size=16, n_layer=1, n_head=2, n_embd=32).eval()
    assert DecodeEngine(model, 2).pack
    model.transformer.h[0].mlp.c_fc = Int8Linear.from_linear(model.transformer.h[0].mlp.c_fc, (kernel,))
    assert DecodeEngine(model, 2).pack == m.rows_independent and not DecodeEngine(model, 2, use_cache=False).pack


def test_int8_perplexity_of_a_trained_model_stays_close(tmp_path):
    torch.manual_seed(0)
    model = GPT(**{**CFG, "n_embd": 64})
    text = torch.tensor([(i * 7 + i // 5) % 23 for i in range(4000)])  # a learnable sequence
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        ix = torch.randint(0, len(text) - 33, (16,), generator=g)
        x = torch.stack([text[i:i + 32] for i in ix])
        y = torch.stack([text[i + 1:i + 33] for i in ix])
        opt.zero_grad()
        model(x, y)[1].backward()
        opt.step()
    model.eval()
    q = quantize_int8(model)
    with torch.no_grad():
        x = torch.stack([text[i:i + 32] for i in range(0, 3000, 97)])
        y = torch.stack([text[i + 1:i + 33] for i in range(0, 3000, 97)])
        lf, lq = model(x, y)[1].item(), q(x, y)[1].item()
    assert lf < 1.5  # it learned something, so int8 has a real distribution to preserve
    assert abs(torch.tensor(lq - lf).exp().item() - 1) < 0.03, (lf, lq)  # perplexity within 3%


def test_old_and_unknown_int8_formats(ckpt_path, tmp_path):
    ckpt = load_checkpoint(ckpt_path)
    q = quantize_int8(load_for_inference(str(ckpt_path), dtype="float32")[0])
    new = quantized_checkpoint(q, ckpt)
    # the previous format (torch.ao per-channel tensors with explicit zero points) still loads
    old = {**new, "quantized": {"format": "int8-dynamic-per-channel", "linears": {
        n: {"int8": p["int8"], "scales": p["scales"], "zero_points": torch.zeros(len(p["scales"]), dtype=torch.long),
            "axis": 0, "bias": p["bias"]} for n, p in new["quantized"]["linears"].items()}}}
    back = model_from_quantized(load_checkpoint(save_checkpoint(old, tmp_path / "old.pt")))
    idx = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(back(idx)[0], q(idx)[0], atol=0, rtol=0)
    bad = {**new, "quantized": {**new["quantized"], "format": "int4-something"}}
    with pytest.raises(UserError) as e:
        model_from_quantized(bad)
    assert "\n" not in str(e.value) and "python -m gpt.quantize" in str(e.value)


def test_bad_quantize_option(ckpt_path):
    with pytest.raises(UserError, match="quantize='int4'"):
        load_for_inference(str(ckpt_path), quantize="int4")


@pytest.mark.slow
def test_quantize_cli_and_infer(ckpt_path, tmp_path):
    out = tmp_path / "q.pt"
    proc = run_here("gpt/quantize.py", str(ckpt_path), str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    a = run_here("infer.py", f"ckpt={out}", "prompt=abc", "max_new_tokens=10", "seed=1", cwd=tmp_path)
    b = run_here("infer.py", f"ckpt={ckpt_path}", "quantize=int8", "prompt=abc", "max_new_tokens=10", "seed=1",
                   cwd=tmp_path)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert a.stdout == b.stdout and a.stdout.startswith("abc")


@pytest.mark.parametrize("model_cls", ["GPT", "RewardModel"])
def test_int8_model_counts_the_parameters_of_its_float_model(model_cls, tmp_path):
    """evaluate.py prints num_params: an int8 model's Linear weights are buffers, and still count."""
    from gpt.heads import RewardModel
    from gpt.quantize import num_params

    torch.manual_seed(0)
    model = (GPT if model_cls == "GPT" else RewardModel)(**CFG).eval()
    q = quantize_int8(model)
    assert num_params(q) == num_params(model) == model.num_params()
    assert num_params(q, non_embedding=False) == model.num_params(non_embedding=False)
    # 2 blocks of (c_attn 64x192 + c_proj 64x64 + c_fc 64x256 + mlp c_proj 256x64, with biases) plus the rest
    linear = 2 * (64 * 192 + 192 + 64 * 64 + 64 + 64 * 256 + 256 + 256 * 64 + 64)
    assert num_params(q) - q.num_params() == linear + (65 if model_cls == "RewardModel" else 0)  # head: 64 + 1


def test_an_answer_logp_reward_head_stays_float_and_int8_round_trips(tmp_path):
    """The answer_logp reward head holds a third learned value (its log-likelihood weight), which an Int8Linear
    has no place for: int8 leaves that head float, quantizes the rest, and the checkpoint rebuilds the same scores."""
    from gpt.encoding import reward_batch
    from gpt.heads import RewardModel
    from gpt.parent import model_config

    torch.manual_seed(0)
    model = RewardModel(answer_logp=True, **CFG).eval()
    torch.nn.init.normal_(model.head.weight)
    model.head.logp_scale.data.fill_(0.5)
    q = quantize_int8(model)
    assert type(q.head) is type(model.head) and isinstance(q.lm_head, Int8Linear)
    batch = reward_batch([([1, 2, 3, 4, 5], 3), ([6, 7, 8], 1)], "cpu")
    with torch.no_grad():
        want, got = model.score(*batch), q.score(*batch)
        assert torch.allclose(got, want, atol=0.2) and not torch.equal(got, want)  # int8 rounding, not float
        ckpt = {"model": model.state_dict(), "step": 1, "config": {"model": model_config(model)},
                "tokenizer": {"type": "char", "chars": "".join(chr(32 + i) for i in range(97))}}
        path = save_checkpoint(quantized_checkpoint(q, ckpt), tmp_path / "int8.pt")
        assert torch.equal(model_from_quantized(load_checkpoint(path)).score(*batch), got)


@pytest.mark.parametrize("layer, grow", [("lm_head", "rows"), ("transformer.h.0.mlp.c_fc", "scales")])
def test_int8_layers_whose_shapes_do_not_fit_the_config_are_refused(ckpt_path, tmp_path, layer, grow):
    """A handed int8 file whose output layer has more rows than the vocabulary would give logits over ids no
    tokenizer has (a padded model's padding ids); any layer's shapes must be its config's: one line."""
    ckpt = load_checkpoint(ckpt_path)
    model, _, _ = load_for_inference(str(ckpt_path), dtype="float32")
    path = save_checkpoint(quantized_checkpoint(quantize_int8(model), ckpt), tmp_path / "int8.pt")
    bad = torch.load(path, weights_only=True)
    p = bad["quantized"]["linears"][layer]
    if grow == "rows":
        p["int8"] = torch.cat([p["int8"], p["int8"][:3]])
        p["scales"] = torch.cat([p["scales"], p["scales"][:3]])
    else:
        p["scales"] = p["scales"][:-1]
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(UserError, match=f"int8 layer {layer} has shapes .* not those of its model config") as e:
        model_from_quantized(load_checkpoint(tmp_path / "bad.pt"))
    assert "\n" not in str(e.value)
