"""Inference weights dtype (load_for_inference dtype=auto|float32|bfloat16|float16): cast once, no autocast;
prepacked bf16 Linear layers; float32 KV cache on CPU; bf16 cached decoding close to bf16 uncached."""

import copy

import pytest
import torch
import torch.nn.functional as F

import gpt.inference as inference

from inprocess import run_here
from gpt.checkpoint import save_checkpoint
from gpt.errors import UserError
from gpt.generate import generate, last_logits
from gpt.inference import PackedLinear, load_for_inference, resolve_dtype
from gpt.model import GPT

CFG = dict(vocab_size=97, block_size=32, n_layer=2, n_head=2, n_embd=64, dropout=0.0, bias=True)
CHARS = "".join(chr(32 + i) for i in range(97))


@pytest.fixture
def ckpt_path(tmp_path):
    torch.manual_seed(0)
    model = GPT(**CFG)
    with torch.no_grad():  # larger weights than GPT-2's init: peaked, input-dependent distributions
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    return save_checkpoint({"model": model.state_dict(), "config": {"model": {"_target_": "gpt.model.GPT", **CFG}},
                            "tokenizer": {"type": "char", "chars": CHARS}, "step": 3}, tmp_path / "float.pt")


def test_auto_follows_the_hardware(monkeypatch):
    monkeypatch.setattr(inference, "cpu_has_fast_bf16", lambda: True)
    assert resolve_dtype("auto", "cpu") is torch.bfloat16
    assert resolve_dtype(None, "cpu") is torch.bfloat16
    monkeypatch.setattr(inference, "cpu_has_fast_bf16", lambda: False)
    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype("auto", "cpu", int8=True) is torch.float32
    assert resolve_dtype("float16", "cpu") is torch.float16
    assert resolve_dtype(torch.bfloat16, "cpu") is torch.bfloat16


@pytest.mark.parametrize("bad", ["int4", "fp8", "bf16x"])
def test_bad_dtype_is_a_one_line_user_error(bad):
    with pytest.raises(UserError) as e:
        resolve_dtype(bad, "cpu")
    msg = str(e.value)
    assert "\n" not in msg and f"dtype={bad!r}" in msg
    assert all(name in msg for name in ("auto", "float32", "bfloat16", "float16"))


def test_int8_keeps_float32_activations(ckpt_path):
    with pytest.raises(UserError, match="int8"):
        load_for_inference(str(ckpt_path), quantize="int8", dtype="bfloat16")
    model, _, _ = load_for_inference(str(ckpt_path), quantize="int8", dtype="auto")
    assert model.transformer.wte.weight.dtype is torch.float32


def test_float32_is_the_exact_checkpoint(ckpt_path):
    model, _, ckpt = load_for_inference(str(ckpt_path), dtype="float32")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    # plain Linear layers, or NativeLinear ones (gpt.native's float32 few-row kernel, same parameters) where it runs
    from gpt.inference import NativeLinear, NativeOutputHead
    from gpt.model import OutputHead
    kinds = {type(m) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    assert kinds <= {torch.nn.Linear, OutputHead, NativeLinear, NativeOutputHead} and not any(
        getattr(m, "_packed", None) is not None for m in model.modules())
    for k, v in model.state_dict().items():
        assert v.dtype is torch.float32 and torch.equal(v, ckpt["model"][k]), k


def test_bfloat16_weights_are_cast_once_and_packed(ckpt_path):
    ref, _, _ = load_for_inference(str(ckpt_path), dtype="float32")
    model, _, _ = load_for_inference(str(ckpt_path), dtype="bfloat16")
    assert all(p.dtype is torch.bfloat16 for p in model.parameters())
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if torch.backends.mkldnn.is_available():
        assert all(type(m) is PackedLinear and m._packed is not None for m in linears)
    idx = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for m in linears:  # the prepacked matmul gives F.linear's numbers
            x = torch.randn(3, m.in_features, dtype=torch.bfloat16)
            torch.testing.assert_close(m(x), F.linear(x, m.weight, m.bias), rtol=1e-2, atol=1e-2)
        got, want = model(idx)[0].float(), ref(idx)[0]
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9
    twin = copy.deepcopy(model)  # deepcopy (and pickling) repacks instead of failing on the oneDNN tensor
    with torch.no_grad():
        assert torch.equal(twin(idx)[0], model(idx)[0])


def test_packed_linear_falls_back_when_weights_change(ckpt_path):
    model, _, _ = load_for_inference(str(ckpt_path), dtype="bfloat16")
    m = model.transformer.h[0].mlp.c_fc
    x = torch.randn(1, m.in_features, dtype=torch.bfloat16)
    with torch.no_grad():
        m.weight.mul_(2)  # changed in place after packing: the stale packed copy must not be used
        torch.testing.assert_close(m(x), F.linear(x, m.weight, m.bias))


def test_cpu_kv_cache_dtype_follows_the_attention_kernel(ckpt_path):
    """bf16 weights: SDPA reads a bf16 cache (faster on CPU than float32), explicit attention a float32 one (its
    bf16 matmuls are the slow ones); float32 weights keep a float32 cache; an explicit dtype wins."""
    model, _, _ = load_for_inference(str(ckpt_path), dtype="bfloat16")
    assert model.config.attn_impl == "sdpa"
    cache = model.new_cache(1)
    assert cache.k.dtype is torch.bfloat16 and cache.v.dtype is torch.bfloat16
    assert model.new_cache(1, dtype=torch.float32).k.dtype is torch.float32
    model.config.attn_impl = "eager"
    assert model.new_cache(1).k.dtype is torch.float32 and model.new_cache(1).v.dtype is torch.float32
    plain, _, _ = load_for_inference(str(ckpt_path), dtype="float32")
    assert plain.new_cache(1).k.dtype is torch.float32


def test_bf16_cached_logits_close_to_uncached(ckpt_path):
    model, _, _ = load_for_inference(str(ckpt_path), dtype="bfloat16")
    seq = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(seq)[0].float()
        cache = model.new_cache(2)
        steps = [last_logits(model, seq[:, :4], cache).float()]
        for t in range(4, 32):
            steps.append(last_logits(model, seq[:, t:t + 1], cache).float())
    got = torch.stack(steps, dim=1)
    want = full[:, 3:]
    assert (got - want).abs().max() < 0.03 * want.abs().max(), (got - want).abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.95


def test_bf16_cached_greedy_generation_agrees_with_uncached_logits(ckpt_path):
    """Greedy bf16 decoding with the KV cache, past block_size (cache refills): every token it picks is the
    argmax of the uncached model's logits for the same prefix, or within bf16 rounding of it (a near tie;
    the paths round differently, so once such a tie flips the two generations go separate ways)."""
    model, _, _ = load_for_inference(str(ckpt_path), dtype="bfloat16")
    idx = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(2))
    seq = generate(model, idx, 60, temperature=0.0)
    block = model.config.block_size
    exact = 0
    with torch.no_grad():
        for t in range(5, seq.size(1)):
            ref = last_logits(model, seq[:, max(0, t - block):t]).float()  # uncached, teacher-forced
            picked = ref.gather(1, seq[:, t:t + 1]).squeeze(1)
            best = ref.max(dim=1).values
            assert torch.all(best - picked <= 0.02 * ref.abs().max(dim=1).values), (t, best - picked)
            exact += int((ref.argmax(1) == seq[:, t]).sum())
    assert exact >= 0.9 * 2 * 60


@pytest.mark.slow
def test_infer_dtype_option(ckpt_path, tmp_path):
    bad = run_here("infer.py", f"ckpt={ckpt_path}", "dtype=int4", cwd=tmp_path)
    assert bad.returncode == 2
    err = bad.stderr.strip().splitlines()
    assert len(err) == 1 and "dtype='int4'" in err[0] and "bfloat16" in err[0], bad.stderr
    common = [f"ckpt={ckpt_path}", "prompt=abc", "max_new_tokens=40", "seed=1"]
    a = run_here("infer.py", *common, "dtype=float32", cwd=tmp_path)
    b = run_here("infer.py", *common, "dtype=float32", "use_cache=false", cwd=tmp_path)
    d = run_here("infer.py", *common, "dtype=bfloat16", cwd=tmp_path)
    assert all(p.returncode == 0 for p in (a, b, d)), a.stderr + b.stderr + d.stderr
    assert a.stdout == b.stdout and a.stdout.startswith("abc")
    assert d.stdout.startswith("abc") and len(d.stdout) > 3
