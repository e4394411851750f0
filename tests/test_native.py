"""gpt.native's compiled decode kernels (gpt/csrc/decode.cpp): equal to a float32 matmul up to the order of the
float32 sums, used by PackedLinear (bf16) and Int8Linear (int8) for calls of a few rows only, and a clean
fallback to torch's kernels wherever they cannot be built or used."""

import copy
import logging

import pytest
import torch
import torch.nn.functional as F

from gpt import native
from gpt.engine import last_logits
from gpt.inference import NativeLinear, NativeOutputHead, PackedLinear, native_linears, pack_linears
from gpt.model import GPT
from gpt.quantize import Int8Linear, quantize_int8, quantize_weight


@pytest.fixture(scope="module")
def kernels():
    k = native.kernels()
    if k is None:
        pytest.skip(f"native decode kernels unavailable here: {native.reason()}")
    return k


@pytest.fixture
def fresh_state(monkeypatch):
    """native.kernels() decides again (and decides for this test only)."""
    monkeypatch.setattr(native, "_state", {})


# K: a multiple of 16, below it, a tail of 1 and of 15; N: partial blocks of 1 to 3 rows; M: 1 to 4 and one more
SHAPES = [(1, 8, 16), (1, 13, 37), (2, 5, 1), (3, 64, 384), (4, 7, 15), (5, 130, 33), (9, 3, 48)]


@pytest.mark.parametrize("M,N,K", SHAPES)
def test_bf16_kernel_equals_a_float32_matmul_of_the_same_values(kernels, M, N, K):
    torch.manual_seed(M * 100 + N)
    x, w, b = torch.randn(M, K), torch.randn(N, K).bfloat16(), torch.randn(N)
    want = F.linear(x, w.float(), b)  # float32 products of the bf16 weight are exact; only the sums' order differs
    got = kernels.linear_bf16(x, w, b)
    assert got.dtype is torch.float32 and got.shape == (M, N)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * K ** 0.5)
    nobias = kernels.linear_bf16(x, w, None)
    torch.testing.assert_close(nobias, want - b, rtol=1e-5, atol=1e-5 * K ** 0.5)
    # bf16 input, bf16 bias -> bf16 output: the float32 result rounded once (at most one bf16 step away from the
    # rounding of `want`, where the two float32 sums straddle a rounding boundary)
    xb, bb = x.bfloat16(), b.bfloat16()
    got = kernels.linear_bf16(xb, w, bb)
    want = F.linear(xb.float(), w.float(), bb.float())
    assert got.dtype is torch.bfloat16
    step = want.abs().clamp(min=1e-30) * 2.0 ** -7  # one bf16 ulp or less
    assert ((got.float() - want).abs() <= step + 1e-6).all()


@pytest.mark.parametrize("M,N,K", SHAPES)
def test_int8_kernel_equals_the_dequantized_matmul(kernels, M, N, K):
    torch.manual_seed(M * 100 + N)
    q, s = quantize_weight(torch.randn(N, K))
    x, b = torch.randn(M, K), torch.randn(N)
    want = F.linear(x, q.float() * s[:, None], b)
    got = kernels.linear_int8(x, q, s, b)
    assert got.dtype is torch.float32 and got.shape == (M, N)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * K ** 0.5)
    torch.testing.assert_close(kernels.linear_int8(x.bfloat16(), q, s, None), F.linear(x.bfloat16().float(), q.float() * s[:, None]),
                               rtol=1e-5, atol=1e-5 * K ** 0.5)


@pytest.mark.parametrize("M,N,K", SHAPES + [(16, 70, 384), (13, 9, 31)])
def test_f32_kernel_equals_torchs_matmul(kernels, M, N, K):
    torch.manual_seed(M * 100 + N)
    x, w, b = torch.randn(M, K), torch.randn(N, K), torch.randn(N)
    got = kernels.linear_f32(x, w, b)
    assert got.dtype is torch.float32 and got.shape == (M, N)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5 * K ** 0.5)  # the sums' order differs
    torch.testing.assert_close(kernels.linear_f32(x, w, None), F.linear(x, w), rtol=1e-5, atol=1e-5 * K ** 0.5)
    xb = x.bfloat16()  # a bf16 input is widened exactly
    torch.testing.assert_close(kernels.linear_f32(xb, w, b), F.linear(xb.float(), w, b), rtol=1e-5, atol=1e-5 * K ** 0.5)


def test_a_rows_f32_result_does_not_depend_on_its_batch_mates(kernels):
    """Every output element is one dot product summed in one order, whatever the number of rows in the call (1 to 16,
    in groups of 1 to 4): within decode steps of at most 16 rows, a row gets exactly the values it gets alone."""
    torch.manual_seed(0)
    for N, K in ((37, 200), (5, 17), (70, 384), (1, 15)):
        x, w, b = torch.randn(16, K), torch.randn(N, K), torch.randn(N)
        full = kernels.linear_f32(x, w, b)
        for i in range(16):
            for j in range(i + 1, 17):
                assert torch.equal(kernels.linear_f32(x[i:j], w, b), full[i:j]), (N, K, i, j)


def test_float32_layers_send_up_to_16_rows_to_the_kernel_and_keep_their_parameters(kernels):
    torch.manual_seed(0)
    model = GPT(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=32, vocab_multiple=64).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert native_linears(model) == 4 + 1
    head, fc = model.lm_head, model.transformer.h[0].mlp.c_fc
    assert type(head) is NativeOutputHead and type(fc) is NativeLinear and fc._native is kernels
    assert head.weight is model.transformer.wte.weight  # still tied
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    spy = fc._native = head._native = _Spy(kernels)
    with torch.no_grad():
        for rows in (1, 4, 16, 17):
            x = torch.randn(rows, 1, 32)
            torch.testing.assert_close(fc(x), F.linear(x, fc.weight, fc.bias), rtol=1e-5, atol=1e-5)
            logits = head(x)
            assert logits.shape == (rows, 1, 50)  # the padding rows are never scored
            torch.testing.assert_close(logits, F.linear(x, head.weight[:50]), rtol=1e-5, atol=1e-5)
        assert spy.rows == [1, 1, 4, 4, 16, 16]  # 17 rows (a prompt's prefill): torch's matmul
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast decides the dtype: torch's path
            assert fc(torch.randn(1, 32)).dtype is torch.bfloat16
    x = torch.randn(1, 32, requires_grad=True)
    fc(x).sum().backward()  # autograd: plain F.linear, never the kernel
    assert x.grad is not None and spy.rows == [1, 1, 4, 4, 16, 16]
    with pytest.raises(RuntimeError):  # not read as two rows of 32
        fc(torch.randn(1, 64))
    again = copy.deepcopy(model)  # the kernel is attached again, not copied
    assert type(again.lm_head) is NativeOutputHead and again.lm_head._native is kernels
    other = GPT(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=32).eval()
    state = torch.get_rng_state()
    assert native_linears(other) == 5
    assert torch.equal(torch.get_rng_state(), state)  # attaching draws from a generator of its own
    lin = torch.nn.Linear(32, 7)
    assert native_linears(torch.nn.Sequential(lin)) == 1
    lin.bias = torch.nn.Parameter(torch.randn(14)[::2], requires_grad=False)  # a strided bias: torch's path
    with torch.no_grad():
        x = torch.randn(1, 32)
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias))
    if pack_linears(again.to(torch.bfloat16)) == 5:  # cast to bf16 later: prepacked as a plain model would be
        assert type(again.lm_head).__name__ == "PackedOutputHead" and type(again.transformer.h[0].mlp.c_fc) is PackedLinear


def test_float32_decode_with_the_kernels_equals_torchs_and_load_for_inference_uses_them(kernels, tmp_path):
    from gpt.checkpoint import save_checkpoint
    from gpt.engine import DecodeEngine, Sampling
    from gpt.inference import load_for_inference

    torch.manual_seed(0)
    cfg = dict(vocab_size=40, block_size=32, n_layer=2, n_head=2, n_embd=32)
    ref = GPT(**cfg).eval()
    path = save_checkpoint({"model": ref.state_dict(), "config": {"model": {"_target_": "gpt.model.GPT", **cfg}},
                            "tokenizer": {"type": "char", "chars": "".join(chr(48 + i) for i in range(40))},
                            "step": 1}, tmp_path / "m.pt")
    model = load_for_inference(str(path), dtype="float32")[0]
    assert sum(isinstance(m, NativeLinear) for m in model.modules()) == 4 * 2 + 1
    # rows joining a running batch (continuous batching): each row's logits at every step against the reference
    # model's (torch's matmuls), both engines fed the same tokens
    seen = {}

    def record(name):
        def sample(logits, temperature, top_k, top_p, generator):
            seen.setdefault(name, []).append(logits.clone())
            return logits.argmax(-1)
        return sample

    engines = {name: DecodeEngine(m, 4, sample=record(name)) for name, m in (("native", model), ("torch", ref))}
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10], [11]]
    for step in range(12):
        for e in engines.values():
            if step < len(prompts):
                e.add([prompts[step]], Sampling(max_tokens=8, temperature=0.0))
            e.step()
    for a, b in zip(seen["native"], seen["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert len(seen["native"]) >= 12


def test_kernels_refuse_bad_arguments_with_a_message(kernels):
    w = torch.randn(4, 16).bfloat16()
    with pytest.raises(RuntimeError, match="x \\(M, K\\) and weight \\(N, K\\) expected"):
        kernels.linear_bf16(torch.randn(1, 8), w, None)
    with pytest.raises(RuntimeError, match="weight expected"):
        kernels.linear_bf16(torch.randn(1, 16), w.float(), None)
    with pytest.raises(RuntimeError, match="vector expected"):
        kernels.linear_bf16(torch.randn(1, 16), w, torch.randn(3))
    with pytest.raises(RuntimeError, match="weight expected"):
        kernels.linear_int8(torch.randn(1, 16), w, torch.ones(4), None)


class _Spy:
    """Wraps the kernel module and counts the rows of each call."""

    def __init__(self, inner):
        self.inner, self.rows = inner, []

    def __getattr__(self, name):
        fn = getattr(self.inner, name)

        def call(x, *args):
            self.rows.append(x.size(0))
            return fn(x, *args)
        return call


def test_bf16_layers_send_a_few_rows_to_the_kernel_and_more_to_onednn(kernels):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(48, 40), torch.nn.Linear(40, 9000, bias=False)).bfloat16().eval()
    if pack_linears(model) != 2:
        pytest.skip("oneDNN cannot prepack bf16 weights here")
    block, wide = model
    assert isinstance(block, PackedLinear) and block._native is kernels and block._native_rows == 4
    # an output-layer-wide matmul: one row to the kernel on a CPU without AMX, none with it (native.max_rows)
    amx = "amx_bf16" in native.cpu_flags()
    assert (wide._native is None, wide._native_rows) == ((True, 0) if amx else (False, 1))
    spy = block._native = _Spy(kernels)
    with torch.no_grad():
        for rows in (1, 3, 4, 5, 16):
            x = torch.randn(rows, 1, 48).bfloat16()
            got = block(x)
            want = F.linear(x.float(), block.weight.float(), block.bias.float())
            assert got.shape == (rows, 1, 40) and got.dtype is torch.bfloat16
            torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
    assert spy.rows == [1, 3, 4]  # the 5- and 16-row calls went to oneDNN
    with torch.enable_grad():  # autograd: plain F.linear, never the kernel
        block.weight.requires_grad_(True)
        block(torch.randn(1, 48).bfloat16()).sum().backward()
    assert spy.rows == [1, 3, 4] and block.weight.grad is not None


def test_int8_layers_send_a_few_rows_to_the_kernel_and_more_to_the_other_kernel(kernels):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 96)
    m = Int8Linear.from_linear(lin)
    assert m._native is kernels and "native (up to 4 rows)" in repr(m)
    assert Int8Linear.from_linear(lin, ("fbgemm", "dequant"))._native is None  # not asked for
    spy = m._native = _Spy(kernels)
    with torch.no_grad():
        for rows in (1, 2, 4, 6):
            x = torch.randn(rows, 64)
            torch.testing.assert_close(m(x), F.linear(x, m.dequantized(), m.bias), rtol=0.03, atol=0.03)
    assert spy.rows == [1, 2, 4]
    out = Int8Linear.from_linear(torch.nn.Linear(64, 9000))
    if "amx_bf16" in native.cpu_flags():
        assert out._native is None and "native" not in repr(out)
    else:
        assert out._native is kernels and "native (up to 1 row), then fbgemm" in repr(out)


def test_output_layer_wide_matmuls_take_the_kernel_for_one_row_where_the_cpu_has_no_amx(monkeypatch):
    """native.max_rows: block-sized layers take up to 4 rows anywhere; a layer wider than 8192 outputs one row on a
    CPU without AMX (measured faster there), none on one with it (oneDNN / fbgemm measured faster)."""
    monkeypatch.setattr(native, "cpu_flags", lambda: frozenset({"avx512f", "avx512bw", "avx512vl", "amx_bf16"}))
    assert (native.max_rows(1536), native.max_rows(8192), native.max_rows(50304)) == (4, 4, 0)
    monkeypatch.setattr(native, "cpu_flags", lambda: frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_bf16"}))
    assert (native.max_rows(1536), native.max_rows(8192), native.max_rows(50304)) == (4, 4, 1)


@pytest.mark.parametrize("vocab", [96, 8300])  # 8300: an output layer wider than 8192 (native.max_rows: 1 row or none)
def test_a_decode_step_with_the_kernels_gives_the_logits_of_torchs_kernels(kernels, vocab):
    """Whole models, one token at a time over a KV cache: bf16 (PackedLinear) and int8 (Int8Linear) with the native
    kernel for their one-row matmuls, against the same model without it: bf16 on oneDNN (equal up to bf16 rounding),
    int8 on the dequantized float32 matmul (fbgemm would quantize the activations too; equal up to float32 sums)."""
    torch.manual_seed(0)
    cfg = dict(vocab_size=vocab, block_size=32, n_layer=2, n_head=2, n_embd=64, bias=True)
    bf16 = GPT(**cfg).eval().requires_grad_(False).to(torch.bfloat16)
    if pack_linears(bf16) != 4 * 2 + 1:
        pytest.skip("oneDNN cannot prepack bf16 weights here")
    int8 = quantize_int8(GPT(**cfg))
    int8_ref = copy.deepcopy(int8)
    for model, prefer in ((int8, ("native", "dequant")), (int8_ref, ("dequant",))):  # the prompt's 6 rows: dequant
        for m in model.modules():
            if isinstance(m, Int8Linear):
                m.prefer = prefer
                m.setup()
    bf16_ref = copy.deepcopy(bf16)  # PackedLinear repacks on copy
    for m in bf16_ref.modules():
        m._native = None
    prompt = torch.randint(0, vocab, (1, 6))
    head = 1 if native.max_rows(vocab) else 0  # a narrow output layer always; a wide one on a CPU without AMX
    assert vocab < 8192 or head == (0 if "amx_bf16" in native.cpu_flags() else 1)
    for model, ref, tol in ((bf16, bf16_ref, 0.01), (int8, int8_ref, 1e-5)):  # bf16: an ulp or two
        layers = [m for m in model.modules() if getattr(m, "_native", None) is not None]
        assert len(layers) == 4 * 2 + head  # every block matmul, and the output layer where it takes the kernel
        assert not any(getattr(m, "_native", None) for m in ref.modules())
        runs = []
        for m in (model, ref):
            cache, out = m.new_cache(1), []
            with torch.no_grad():
                logits = last_logits(m, prompt, cache)
                for t in range(5):
                    out.append(logits.float())
                    logits = last_logits(m, prompt[:, t:t + 1], cache)  # one row: the kernel's calls
            runs.append(torch.cat(out))
        assert (runs[0] - runs[1]).abs().max() <= tol * runs[1].abs().max()


def test_switched_off_by_the_environment(fresh_state, monkeypatch):
    monkeypatch.setenv(native.ENV, "0")
    assert native.kernels() is None and native.reason() == f"{native.ENV}=0"
    lin = torch.nn.Linear(32, 16).bfloat16().eval()
    if pack_linears(torch.nn.Sequential(lin)) == 1:
        assert lin._native is None  # oneDNN only
    assert Int8Linear.from_linear(torch.nn.Linear(32, 16))._native is None


def test_a_failed_build_falls_back_with_one_log_line(fresh_state, monkeypatch, caplog):
    monkeypatch.delenv(native.ENV, raising=False)
    monkeypatch.setattr(native, "unavailable_reason", lambda: None)

    command = "[1/2] c++ -MMD -MF decode.o.d " + " ".join(f"-isystem /include/{i}" for i in range(40))
    def no_compiler():  # ninja's message: the long compile command first, the compiler's error last
        raise RuntimeError(f"Error building extension 'gpt_decode':\n{command}\nFAILED: decode.o\n c++: not found")
    monkeypatch.setattr(native, "_build", no_compiler)
    with caplog.at_level(logging.INFO, logger="gpt.native"):
        assert native.kernels() is None
        assert native.kernels() is None  # decided once
    reason = native.reason()
    assert reason.startswith("...") and reason.endswith("FAILED: decode.o c++: not found") and len(reason) <= 303
    lines = [r.getMessage() for r in caplog.records if "not used" in r.getMessage()]
    assert lines == [f"native decode kernels not used ({reason}): torch's kernels decode instead"]
    assert "\n" not in lines[0]
    m = Int8Linear.from_linear(torch.nn.Linear(32, 16))
    x = torch.randn(1, 32)
    assert m._native is None and torch.allclose(m(x), F.linear(x, m.dequantized(), m.bias), atol=0.05)


def test_unavailable_where_the_cpu_lacks_avx512(monkeypatch):
    monkeypatch.delenv(native.ENV, raising=False)
    monkeypatch.setattr(native.platform, "system", lambda: "Linux")
    monkeypatch.setattr(native.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(native, "cpu_flags", lambda: {"avx2", "fma", "avx512f"})
    assert native.unavailable_reason() == "this CPU lacks avx512bw, avx512vl"
    monkeypatch.setattr(native.platform, "machine", lambda: "aarch64")
    assert "not Linux on aarch64" in native.unavailable_reason()


def test_layers_keep_autograd_dtypes_and_shape_errors_of_their_torch_paths(kernels):
    """A few rows that need a gradient, a float16 or float64 input, or the wrong width never reach the kernel."""
    torch.manual_seed(0)
    m = Int8Linear.from_linear(torch.nn.Linear(32, 16), ("native", "dequant"))
    assert m._native is kernels
    x = torch.randn(1, 32, requires_grad=True)
    m(x).sum().backward()  # the dequantized matmul, differentiable in x (fbgemm's is not)
    assert x.grad is not None and x.grad.abs().sum() > 0
    for dtype in (torch.float16, torch.float64):
        assert m(torch.randn(1, 32, dtype=dtype)).shape == (1, 16)
    with pytest.raises(RuntimeError):  # not read as two rows of 32
        m(torch.randn(1, 64))
    seq = torch.nn.Sequential(torch.nn.Linear(32, 16)).bfloat16()
    if pack_linears(seq) != 1:
        pytest.skip("oneDNN cannot prepack bf16 weights here")
    lin = seq[0]
    lin.weight.requires_grad_(False)
    lin.bias.requires_grad_(True)  # a trainable bias alone still needs autograd
    lin(torch.randn(1, 32).bfloat16()).sum().backward()
    assert lin.bias.grad is not None
    with pytest.raises(RuntimeError):
        lin(torch.randn(1, 64).bfloat16())


def test_a_lock_left_by_a_killed_build_does_not_hang_the_next_build(fresh_state, monkeypatch, tmp_path):
    """torch's build lock stays behind a build that was killed, and torch would wait on it forever; under its own
    lock native removes it before building."""
    import torch.utils.cpp_extension as ext

    monkeypatch.delenv(native.ENV, raising=False)
    monkeypatch.setattr(native, "unavailable_reason", lambda: None)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = native.build_directory(native.extension_name())
    folder.mkdir(parents=True)
    (folder / "lock").touch()
    seen = []

    def build(**kw):
        seen.append((folder / "lock").exists())
        return "built"
    monkeypatch.setattr(ext, "load", build)
    assert native.kernels() == "built" and seen == [False]


@pytest.mark.parametrize("dtype,cache_dtype,H,Hkv", [(torch.float32, torch.float32, 4, 4), (torch.bfloat16, torch.bfloat16, 4, 2),
                                                     (torch.float32, torch.bfloat16, 6, 3), (torch.bfloat16, torch.float32, 2, 1)])
def test_attention_kernel_writes_the_cache_and_equals_sdpa(kernels, dtype, cache_dtype, H, Hkv):
    torch.manual_seed(H * 10 + Hkv)
    B, D, L = 2, 32, 40
    for pos in (0, 17, L - 1):
        kc, vc = torch.randn(B, Hkv, L, D).to(cache_dtype), torch.randn(B, Hkv, L, D).to(cache_dtype)
        qkv = torch.randn(B, (H + 2 * Hkv) * D).to(dtype)
        k_want, v_want = kc.clone(), vc.clone()
        q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=1)
        k_want[:, :, pos], v_want[:, :, pos] = k.view(B, Hkv, D).to(cache_dtype), v.view(B, Hkv, D).to(cache_dtype)
        want = F.scaled_dot_product_attention(q.float().view(B, H, 1, D), k_want[:, :, :pos + 1].float(),
                                              v_want[:, :, :pos + 1].float(), enable_gqa=True).view(B, H * D)
        got = kernels.attend_new(qkv, kc, vc, H, pos, None)
        assert got.dtype is dtype and got.shape == (B, H * D)
        assert torch.equal(kc, k_want) and torch.equal(vc, v_want)  # the new keys and values, nothing else
        tol = 1e-5 if dtype is torch.float32 else 2.0 ** -7 * want.abs().max().item()  # bf16 output: one rounding
        assert (got.float() - want).abs().max() <= tol


def test_attention_kernel_takes_each_rows_own_length(kernels):
    """Rows at different positions (a ragged cache: rows that joined a running batch at different times): row b
    writes at lens[b] and attends over its own keys 0 .. lens[b] only, as SDPA of that row alone does."""
    torch.manual_seed(1)
    H, Hkv, D, L = 4, 2, 32, 30
    lens = torch.tensor([3, 17, 0, 29])
    kc, vc = torch.randn(4, Hkv, L, D), torch.randn(4, Hkv, L, D)
    qkv = torch.randn(4, (H + 2 * Hkv) * D)
    k_want, v_want = kc.clone(), vc.clone()
    got = kernels.attend_new(qkv, kc, vc, H, 0, lens)
    for b, n in enumerate(lens.tolist()):
        q, k, v = qkv[b].split([H * D, Hkv * D, Hkv * D])
        k_want[b, :, n], v_want[b, :, n] = k.view(Hkv, D), v.view(Hkv, D)
        want = F.scaled_dot_product_attention(q.view(1, H, 1, D), k_want[b:b + 1, :, :n + 1], v_want[b:b + 1, :, :n + 1],
                                              enable_gqa=True)
        torch.testing.assert_close(got[b], want.view(H * D), rtol=1e-5, atol=1e-5)
    assert torch.equal(kc, k_want) and torch.equal(vc, v_want)
    with pytest.raises(RuntimeError, match="outside the cache"):
        kernels.attend_new(qkv, kc, vc, H, 0, torch.tensor([0, 1, 2, L]))


def test_attention_kernel_refuses_what_it_cannot_do(kernels):
    kc = torch.zeros(1, 2, 8, 32)
    with pytest.raises(RuntimeError, match="outside the cache"):
        kernels.attend_new(torch.randn(1, 6 * 32), kc, kc.clone(), 2, 8, None)
    with pytest.raises(RuntimeError, match="shapes do not fit"):
        kernels.attend_new(torch.randn(1, 5 * 32), kc, kc.clone(), 2, 0, None)
    odd = torch.zeros(1, 2, 8, 24)  # head size not a multiple of 16
    with pytest.raises(RuntimeError, match="shapes do not fit"):
        kernels.attend_new(torch.randn(1, 6 * 24), odd, odd.clone(), 2, 0, None)


@pytest.mark.parametrize("arch", [{}, {"n_kv_head": 1}, {"pos": "rope"}, {"qk_norm": True}, {"attn_impl": "eager"}])
def test_decode_with_the_attention_kernel_equals_decode_without_it(kernels, arch, monkeypatch):
    """Models whose attention the kernel serves (learned positions, GQA) decode to the same logits and cache as
    without it; for the others (rotary positions, QK-norm, explicit attention) the flag changes nothing at all."""
    from gpt.inference import native_attention

    torch.manual_seed(0)
    cfg = dict(vocab_size=64, block_size=24, n_layer=2, n_head=2, n_embd=64, **arch)
    model = GPT(**cfg).eval()
    served = copy.deepcopy(model)
    served_kernel = not any(arch.get(k) for k in ("pos", "qk_norm", "attn_impl"))
    assert native_attention(served) == (2 if served_kernel else 0)
    assert all(m.attn.native_decode == served_kernel for m in served.transformer.h)
    if not served_kernel:  # the flag set anyway: the step's own checks still keep these layers off the kernel
        for m in served.transformer.h:
            m.attn.native_decode = True
    prompt = torch.randint(0, 64, (2, 5))
    spy = _Spy(kernels)
    monkeypatch.setattr(native, "loaded", lambda: spy)
    runs = []
    for m in (model, served):
        cache, out = m.new_cache(2), []
        with torch.no_grad():
            logits = last_logits(m, prompt, cache)
            for t in range(24 - 5):
                out.append(logits)
                logits = last_logits(m, logits.argmax(-1, keepdim=True), cache)
            with pytest.raises(ValueError, match="exceeds block_size|KV cache overflow"):
                last_logits(m, logits.argmax(-1, keepdim=True), cache)
        runs.append((torch.stack(out), cache.k.clone(), cache.v.clone()))
    (a, ka, va), (b, kb, vb) = runs
    assert len(spy.rows) == (2 * (24 - 5) if served_kernel else 0)  # 2 layers x 19 one-token steps of 2 rows
    assert set(spy.rows) <= {2}
    if served_kernel:
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(kb, ka, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(vb, va, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(a, b) and torch.equal(ka, kb) and torch.equal(va, vb)


def test_load_for_inference_turns_the_attention_kernel_on(kernels, tmp_path):
    from gpt.checkpoint import save_checkpoint
    from gpt.inference import load_for_inference

    cfg = dict(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=32)
    ckpt_path = save_checkpoint({"model": GPT(**cfg).state_dict(), "config": {"model": {"_target_": "gpt.model.GPT", **cfg}},
                                 "tokenizer": {"type": "char", "chars": "".join(chr(48 + i) for i in range(40))},
                                 "step": 1}, tmp_path / "m.pt")
    for kw in ({"dtype": "float32"}, {"dtype": "auto"}, {"quantize": "int8"}):
        model = load_for_inference(str(ckpt_path), **kw)[0]
        assert all(b.attn.native_decode for b in model.transformer.h), kw


@pytest.mark.parametrize("B,V,k", [(1, 50304, 50), (3, 1000, 7), (2, 17, 17), (1, 65, 1), (4, 3000, 200)])
def test_topk_kernel_equals_torch_topk(kernels, B, V, k):
    torch.manual_seed(V + k)
    x = torch.randn(B, V)
    vals, idx, finite = kernels.topk(x, k)
    want = torch.topk(x, k)
    assert finite and torch.equal(vals, want.values) and torch.equal(idx, want.indices)  # no ties in random floats
    ties = torch.zeros(1, 40)
    ties[0, 30:] = 1.0
    vals, idx, _ = kernels.topk(ties, 12)
    assert idx.tolist() == [list(range(30, 40)) + [0, 1]]  # among equal values the lower index first


def test_engine_topk_takes_the_kernel_and_leaves_a_nan_row_to_torch(kernels, monkeypatch):
    from gpt import engine

    spy = _Spy(kernels)
    monkeypatch.setattr(native, "loaded", lambda: spy)
    torch.manual_seed(0)
    x = torch.randn(2, 50304)
    vals, idx = engine.topk(x, 50)
    assert spy.rows == [2] and torch.equal(vals, torch.topk(x, 50).values)
    x[1, 123] = float("nan")  # torch.topk ranks NaN first; the sampler then refuses the row
    vals, idx = engine.topk(x, 50)
    assert spy.rows == [2, 2] and idx[1, 0] == 123 and torch.isnan(vals[1, 0])
    with pytest.raises(RuntimeError, match="probability tensor contains"):
        engine.sample_next(x, 1.0, 50, None, [(torch.Generator().manual_seed(0), 2)])


def test_seeded_sampling_draws_the_same_tokens_with_the_kernel_where_logits_have_no_ties(kernels, monkeypatch):
    """(Among exactly equal logits, as bf16 ones have, the kernel's top-k orders them by index, torch.topk in no
    specified order, so seeded draws may differ there, as they did between torch.topk and the two-stage top-k.)"""
    from gpt import engine

    torch.manual_seed(0)
    logits = torch.randn(3, 5000) * 3
    draws = []
    for loaded in (lambda: None, lambda: kernels):
        monkeypatch.setattr(native, "loaded", loaded)
        g = torch.Generator().manual_seed(7)
        draws.append([engine.sample_next(logits, 0.8, 40, 0.9, g).tolist() for _ in range(20)])
    assert draws[0] == draws[1]


def test_a_ragged_decode_step_with_the_attention_kernel_equals_the_one_without(kernels):
    """The decode engine's rows at different positions (continuous batching): the kernel takes each row's own
    length, with the logits and cache of the masked SDPA path."""
    from gpt.engine import DecodeEngine, Sampling
    from gpt.inference import native_attention

    torch.manual_seed(0)
    model = GPT(vocab_size=64, block_size=40, n_layer=2, n_head=2, n_embd=64).eval()
    served = copy.deepcopy(model)
    native_attention(served)
    ragged = []

    class Spy:  # records whether each attention call had rows at different positions
        def __getattr__(self, name):
            return getattr(kernels, name)

        def attend_new(self, *args):
            ragged.append(args[-1] is not None)
            return kernels.attend_new(*args)

    spy = Spy()
    outs = []
    for m in (model, served):
        engine = DecodeEngine(m, 3)
        rows = [engine.add([[1, 2, 3, 4, 5][:n]], Sampling(12, temperature=0.0))[0] for n in (5, 2)]
        for _ in range(3):  # the third row joins later, at another position
            engine.step()
        rows += engine.add([[7, 8, 9]], Sampling(12, temperature=0.0))
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(native, "loaded", lambda: spy)
            while not engine.idle:
                engine.step()
        outs.append([r.new for r in rows])
    assert outs[0] == outs[1] and any(ragged) and not all(ragged)  # greedy: the same tokens; ragged steps served


def test_large_k_and_fp16_and_autograd_stay_with_torch(kernels, monkeypatch):
    """k above NATIVE_TOPK (top-p grows k towards the vocabulary: the kernel's sorted insertion is for small k), a
    float16 model's attention, and attention that needs a gradient take torch's ops."""
    from gpt import engine
    from gpt.inference import native_attention

    spy = _Spy(kernels)
    monkeypatch.setattr(native, "loaded", lambda: spy)
    x = torch.randn(2, 5000)
    engine.topk(x, engine.NATIVE_TOPK + 1)
    assert spy.rows == []
    engine.topk(x, engine.NATIVE_TOPK)
    assert spy.rows == [2]
    torch.manual_seed(0)
    model = GPT(vocab_size=32, block_size=16, n_layer=1, n_head=2, n_embd=32).eval()
    native_attention(model)
    for dtype in (torch.float16,):
        half = copy.deepcopy(model).to(dtype)
        cache = half.new_cache(1)
        with torch.no_grad():
            last_logits(half, torch.tensor([[1, 2, 3]]), cache)
            last_logits(half, torch.tensor([[4]]), cache)  # one token: would be the kernel's, but not float16
    assert spy.rows == [2]
    cache = model.new_cache(1)
    last_logits(model, torch.tensor([[1, 2, 3]]), cache)
    out = last_logits(model, torch.tensor([[4]]), cache)  # autograd on: torch's attention
    out.sum().backward()
    assert spy.rows == [2] and model.transformer.h[0].attn.c_attn.weight.grad is not None


def test_suspended_does_not_stop_a_later_load(fresh_state, monkeypatch):
    monkeypatch.delenv(native.ENV, raising=False)
    with native.suspended():
        assert native.loaded() is None
    k = native.kernels()
    if k is None:
        pytest.skip(f"native decode kernels unavailable here: {native.reason()}")
    assert native.loaded() is k
    with native.suspended():
        assert native.loaded() is None and native.kernels() is k
    assert native.loaded() is k


def test_a_failed_build_is_not_tried_again_until_its_folder_is_deleted(fresh_state, monkeypatch, tmp_path):
    """The first process to fail leaves the reason in the build folder; later ones read it instead of building."""
    import torch.utils.cpp_extension as ext

    monkeypatch.delenv(native.ENV, raising=False)
    monkeypatch.setattr(native, "unavailable_reason", lambda: None)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    calls = []

    def fail(**kw):
        calls.append(kw["name"])
        raise RuntimeError("Error building extension: c++: not found")
    monkeypatch.setattr(ext, "load", fail)
    assert native.kernels() is None and calls == [native.extension_name()]
    folder = native.build_directory(native.extension_name())
    assert (folder / native.FAILED).read_text() == "Error building extension: c++: not found\n"
    native._state.clear()  # another process
    assert native.kernels() is None and len(calls) == 1
    assert native.reason() == (f"an earlier build failed (Error building extension: c++: not found); delete {folder} "
                               "to build again")
    import shutil

    shutil.rmtree(folder)
    native._state.clear()
    assert native.kernels() is None and len(calls) == 2  # tried again


def test_a_built_module_is_imported_without_building_again(kernels, fresh_state, monkeypatch):
    """Once built, the module is imported from the build folder as it is: no ninja run, no rebuild for a copy of the
    source at another path (an installed wheel's, a second clone's)."""
    import torch.utils.cpp_extension as ext

    def no_build(**kw):
        raise AssertionError("built again")
    monkeypatch.setattr(ext, "load", no_build)
    module = native.kernels()
    assert module is not None and module.__name__ == native.extension_name()
    x, w = torch.randn(1, 16), torch.randn(4, 16).bfloat16()
    torch.testing.assert_close(module.linear_bf16(x, w, None), kernels.linear_bf16(x, w, None))


def test_layers_swapped_between_kinds_keep_no_stale_kernel_state(kernels):
    """A packed bf16 model cast to float32 and given the float32 kernel (and back), or a layer whose swap failed,
    holds no other kind's kernel state: it deep-copies and saves, and computes as plain F.linear."""
    import io

    torch.manual_seed(0)
    model = GPT(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=32).eval().requires_grad_(False)
    ref = copy.deepcopy(model)
    if pack_linears(model.to(torch.bfloat16)) != 5:
        pytest.skip("oneDNN cannot prepack bf16 weights here")
    copy.deepcopy(model)  # a packed float32 layer re-packs on load (oneDNN alone: the bf16 kernel does not apply)
    assert native_linears(model.float()) == 5
    assert not any("_packed" in vars(m) for m in model.modules())
    again = copy.deepcopy(model)
    torch.save(again, io.BytesIO())
    x = torch.randint(0, 50, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(again(x)[0], ref(x)[0], rtol=1e-2, atol=1e-2)  # bf16-rounded weights, float32
    assert pack_linears(again.to(torch.bfloat16)) == 5 and not any(type(m) is NativeLinear for m in again.modules())
    copy.deepcopy(again)


def test_release_idle_threads_lets_the_calling_threads_openmp_helpers_go():
    """A thread's idle OpenMP helpers (the pool its torch ops started) go, and its next parallel op starts them again
    with the same result. (Why it matters, measured in benchmarks: a decode step in serve.py's worker thread ran
    ~1.5x slower while the event loop's idle pool stayed.)"""
    import os
    import threading

    if native._find_omp_pause() is None or (os.cpu_count() or 1) < 2:
        pytest.skip("no OpenMP runtime with omp_pause_resource_all here, or one CPU only")
    a, b = torch.randn(1 << 20), torch.randn(1 << 20)  # big enough for a parallel region
    seen = {}

    def run():
        torch.set_num_threads(2)  # (the tests' fixture sets one thread, and restores the count afterwards)
        want = torch.add(a, b)  # this thread now has a pool of helpers
        seen["before"] = len(os.listdir("/proc/self/task"))
        seen["released"] = native.release_idle_threads()
        seen["after"] = len(os.listdir("/proc/self/task"))
        seen["same"] = torch.equal(torch.add(a, b), want)  # the pool starts again
        seen["again"] = len(os.listdir("/proc/self/task"))

    t = threading.Thread(target=run)
    t.start()
    t.join()
    import ctypes

    torch_gomp = [line.split()[-1] for line in open("/proc/self/maps")
                  if "libgomp" in line and line.split()[-1].startswith(os.path.dirname(torch.__file__))]
    if torch_gomp:  # torch's own runtime, not another libgomp the process may hold
        ours = ctypes.cast(native._find_omp_pause(), ctypes.c_void_p).value
        assert ours == ctypes.cast(ctypes.CDLL(torch_gomp[0]).omp_pause_resource_all, ctypes.c_void_p).value
    assert seen["released"] and seen["same"]
    assert seen["after"] == seen["before"] - 1  # its helper gone
    assert seen["again"] == seen["before"]
