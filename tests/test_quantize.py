"""INT8 dynamic quantization: bounded logit error, identical save/load round trip, infer.py support."""

import pytest
import torch

from conftest import run_script
from gpt.checkpoint import load_checkpoint, save_checkpoint
from gpt.errors import UserError
from gpt.generate import generate
from gpt.inference import is_quantized, load_for_inference
from gpt.model import GPT
from gpt.quantize import model_from_quantized, quantize_int8, quantized_checkpoint

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
    with torch.no_grad():  # the loss path works on a quantized lm_head too
        assert abs(q(idx, idx)[1].item() - model(idx, idx)[1].item()) < 0.05


def test_quantized_checkpoint_round_trip_is_exact(ckpt_path, tmp_path):
    ckpt = load_checkpoint(ckpt_path)
    model, _, _ = load_for_inference(str(ckpt_path), dtype="float32")
    q = quantize_int8(model)
    path = save_checkpoint(quantized_checkpoint(q, ckpt), tmp_path / "int8.pt")
    assert path.stat().st_size < 0.5 * ckpt_path.stat().st_size  # int8 weights: a smaller file
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


def test_bad_quantize_option(ckpt_path):
    with pytest.raises(UserError, match="quantize='int4'"):
        load_for_inference(str(ckpt_path), quantize="int4")


@pytest.mark.slow
def test_quantize_cli_and_infer(ckpt_path, tmp_path):
    out = tmp_path / "q.pt"
    proc = run_script("gpt/quantize.py", str(ckpt_path), str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    a = run_script("infer.py", f"ckpt={out}", "prompt=abc", "max_new_tokens=10", "seed=1", cwd=tmp_path)
    b = run_script("infer.py", f"ckpt={ckpt_path}", "quantize=int8", "prompt=abc", "max_new_tokens=10", "seed=1",
                   cwd=tmp_path)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert a.stdout == b.stdout and a.stdout.startswith("abc")
