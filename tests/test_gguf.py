"""GGUF export for llama.cpp (gpt/gguf_export.py): gguf's reader gives back our tensors and metadata, a file we
wrote imports back with equal logits, bad inputs are one-line errors, and (where llama-cpp-python is installed)
llama.cpp's greedy generation from the file equals ours."""

import numpy as np
import pytest
import torch

from gpt.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from gpt.chat import SPECIAL
from gpt.errors import UserError
from gpt.gguf_export import export_gguf, gguf_tensors, gpt2_tokens, import_gguf
from gpt.interop import CHAT_TEMPLATE, main
from gpt.model import GPT

gguf = pytest.importorskip("gguf")

CHAT = {"type": "tiktoken", "name": "gpt2", "special": list(SPECIAL)}


def tiny_checkpoint(tmp_path, bias=True, tokenizer=CHAT, vocab_size=50304, n_embd=32, seed=0):
    """A random tiny GPT-2-vocabulary model (vocabulary padded past the tokenizer's 50261 tokens)."""
    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=n_embd, dropout=0.0, bias=bias)
    model = GPT(**cfg)
    with torch.no_grad():  # random biases and norm gains, so a skipped or misnamed 1-D tensor shows
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(0.0, 0.1).add_(1.0 if name.endswith("ln_1.weight") else 0.0)
    path = save_checkpoint({"model": model.state_dict(), "config": {"model": {"_target_": "gpt.model.GPT", **cfg}},
                            "tokenizer": tokenizer, "step": 0}, tmp_path / "tiny.pt")
    return model.eval(), path


def read(path):
    reader = gguf.GGUFReader(str(path))
    return reader, {t.name: t for t in reader.tensors}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One tiny model exported at each --type and read once: gguf's reader parses the 50k tokens and 50k merges
    string by string (about 3-5 s a file on 2 cores), so the tests share the files."""
    tmp = tmp_path_factory.mktemp("gguf")
    model, path = tiny_checkpoint(tmp, bias=False)
    files = {kind: export_gguf(str(path), str(tmp / f"m_{kind}.gguf"), kind) for kind in ("f32", "f16", "q8_0")}
    return model, path, files, {kind: read(f) for kind, f in files.items()}


def dequantized(t) -> np.ndarray:
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))


def test_f32_tensors_and_metadata_come_back_exactly(exported):
    model, _, _, readers = exported
    reader, tensors = readers["f32"]
    ours = gguf_tensors(model)
    assert set(tensors) == set(ours)  # no output.weight: llama.cpp ties it to token_embd
    assert {"token_embd.weight", "position_embd.weight", "blk.1.attn_qkv.weight", "blk.1.ffn_down.bias",
            "output_norm.bias"} <= set(tensors)
    for name, t in tensors.items():
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        np.testing.assert_array_equal(dequantized(t), ours[name].numpy())
    # (out, in) as nn.Linear, not Conv1D's (in, out); zero biases for a model trained without them
    np.testing.assert_array_equal(dequantized(tensors["blk.0.attn_qkv.weight"]),
                                  model.transformer.h[0].attn.c_attn.weight.detach().numpy())
    assert not dequantized(tensors["blk.0.ffn_up.bias"]).any()
    f = {k: v.contents() for k, v in reader.fields.items() if not k.startswith("GGUF.")}
    assert (f["general.architecture"], f["gpt2.block_count"], f["gpt2.context_length"], f["gpt2.embedding_length"],
            f["gpt2.feed_forward_length"], f["gpt2.attention.head_count"]) == ("gpt2", 2, 64, 32, 128, 2)
    assert f["gpt2.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    tokens = f["tokenizer.ggml.tokens"]
    assert (f["tokenizer.ggml.model"], f["tokenizer.ggml.pre"], len(tokens)) == ("gpt2", "gpt-2", 50304)
    assert tokens[:50257] == gpt2_tokens() and tokens[31373] == "hello" and tokens[995] == "Ġworld"
    assert tokens[50257:50261] == SPECIAL and tokens[50261] == "[PAD50261]"
    types = f["tokenizer.ggml.token_type"]
    assert (types[0], types[50256], types[50258], types[50300]) == (1, 3, 3, 5)  # normal, control x2, unused
    assert f["tokenizer.ggml.merges"][:2] == ["Ġ t", "Ġ a"] and len(f["tokenizer.ggml.merges"]) == 50000
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"],
            f["tokenizer.ggml.eot_token_id"]) == (50256, 50256, 50260)
    assert f["tokenizer.ggml.add_bos_token"] is False
    assert f["tokenizer.chat_template"] == CHAT_TEMPLATE


# rounding bounds: f16 keeps 11 significant bits (relative error <= 2^-11); q8_0 stores each block of 32 values
# as round(x / d) * d with d = max|x| / 127 held in f16, so |error| <= d / 2 plus d's own f16 rounding
@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_f16_and_q8_0_within_their_rounding(exported, kind):
    model, _, _, readers = exported
    _, tensors = readers[kind]
    want = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[kind]
    for name, x in gguf_tensors(model).items():
        t, x = tensors[name], x.numpy()
        got = dequantized(t)
        if x.ndim == 1:  # norms and biases stay f32, as llama.cpp's converter writes them
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            np.testing.assert_array_equal(got, x)
            continue
        assert t.tensor_type == want
        if kind == "f16":
            bound = np.abs(x) * 2.0 ** -11 + 2.0 ** -24  # + the smallest subnormal step
        else:
            d = np.abs(x.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
            bound = np.broadcast_to(d * (0.5 + 127 * 2.0 ** -11) + 1e-12, (d.shape[0], 32)).reshape(x.shape)
        assert (np.abs(got - x) <= bound).all(), name
        assert not np.array_equal(got, x)  # it was rounded, so the bound is what is being tested


@pytest.mark.slow
def test_q8_0_falls_back_to_f16_for_rows_that_are_not_whole_blocks(tmp_path):
    _, path = tiny_checkpoint(tmp_path, n_embd=16)  # rows of 16 values: no q8_0 block of 32 fits
    _, tensors = read(export_gguf(str(path), str(tmp_path / "m.gguf"), "q8_0"))
    assert tensors["blk.0.attn_qkv.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert tensors["blk.0.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0  # rows of 64


@pytest.mark.slow
def test_round_trip_through_the_cli_keeps_logits(tmp_path, exported):
    model, path = exported[:2]
    assert main(["export-gguf", str(path), str(tmp_path / "m.gguf")]) == 0
    assert main(["import", str(tmp_path / "m.gguf"), str(tmp_path / "back.pt")]) == 0
    ckpt = load_checkpoint(tmp_path / "back.pt")
    assert ckpt["tokenizer"] == CHAT
    back = model_from_checkpoint(ckpt)
    idx = torch.randint(0, 50304, (2, 40))
    with torch.no_grad():
        assert torch.equal(back(idx)[0], model(idx)[0])


@pytest.mark.slow
def test_q8_0_import_is_close(tmp_path, exported):
    model, _, files, _ = exported
    back = model_from_checkpoint(load_checkpoint(import_gguf(str(files["q8_0"]), str(tmp_path / "b.pt"))))
    idx = torch.randint(0, 50304, (1, 40))
    with torch.no_grad():
        a, b = back(idx)[0], model(idx)[0]
    assert not torch.equal(a, b) and (a - b).abs().max() < 0.05 * b.abs().max()


def test_char_tokenizer_is_refused(tmp_path, capsys):
    _, path = tiny_checkpoint(tmp_path, tokenizer={"type": "char", "chars": "abcdefghij"}, vocab_size=10)
    with pytest.raises(UserError, match="char-tokenizer model cannot be exported to GGUF"):
        export_gguf(str(path), str(tmp_path / "m.gguf"))
    assert main(["export-gguf", str(path), str(tmp_path / "m.gguf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: a char-tokenizer model") and "\n" not in err
    assert not (tmp_path / "m.gguf").exists()


def test_bad_type_and_bad_files_are_one_line_errors(tmp_path):
    _, path = tiny_checkpoint(tmp_path)
    with pytest.raises(UserError, match=r"--type 'q4' is not one of \['f32', 'f16', 'q8_0'\]"):
        export_gguf(str(path), str(tmp_path / "m.gguf"), "q4")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40)
    with pytest.raises(UserError, match="could not be read as GGUF"):
        import_gguf(str(junk), str(tmp_path / "out.pt"))


def _rewrite(reader, dst, *, arch="gpt2", drop=(), extra_tensor=None, tokens=None):
    """Copy a GGUF (read by `reader`) with one thing changed (for the import checks)."""
    w = gguf.GGUFWriter(str(dst), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop:
            continue
        value = field.contents()
        if key == "tokenizer.ggml.tokens" and tokens is not None:
            value = tokens(value)
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key.replace("gpt2.", arch + "."), value, vtype, sub_type=sub)
    for t in reader.tensors:
        w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    if extra_tensor:
        w.add_tensor(extra_tensor, np.zeros((32, 50304), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


@pytest.mark.slow
@pytest.mark.parametrize("change, message", [
    (dict(arch="falcon"), "holds architecture 'falcon'; only gpt2, llama, qwen3 GGUF files import"),
    (dict(arch="llama"), "GGUF key 'llama.attention.head_count_kv' is missing"),  # a gpt2 file labelled llama
    (dict(drop=("gpt2.block_count",)), "GGUF key 'gpt2.block_count' is missing"),
    (dict(extra_tensor="output.weight"), "GGUF tensor 'output.weight' is not part of this GPT"),
    (dict(tokens=lambda t: ["x"] + t[1:]), "the GGUF vocabulary is not GPT-2's BPE"),
    (dict(tokens=lambda t: t[:50261] + ["<|tool|>"] + t[50262:]), "GGUF token 50261 '<|tool|>' is neither"),
])
def test_import_checks_the_file(tmp_path, exported, change, message):
    bad = _rewrite(exported[3]["f32"][0], tmp_path / "bad.gguf", **change)
    with pytest.raises(UserError, match=message):
        import_gguf(str(bad), str(tmp_path / "out.pt"))


@pytest.mark.slow
def test_llama_cpp_greedy_generation_equals_ours(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (it compiles llama.cpp)")
    from gpt.tokenizer import from_identity

    model, path = tiny_checkpoint(tmp_path, seed=3)
    with torch.no_grad():  # sharpen the logits so float32 vs llama.cpp's kernels cannot flip a near tie
        model.transformer.wte.weight.mul_(8.0)
    path = save_checkpoint({**load_checkpoint(path), "model": model.state_dict()}, tmp_path / "sharp.pt")
    out = export_gguf(str(path), str(tmp_path / "m.gguf"))
    tok = from_identity(CHAT)
    prompt = tok.encode("Once upon a time")
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, n_threads=1, verbose=False, logits_all=False)
    assert llm.tokenize(b"Once upon a time", add_bos=False, special=False) == prompt
    theirs = []
    for t in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        theirs.append(t)
        if len(theirs) == 32:
            break
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(32):
            ids = torch.cat([ids, model(ids)[0][:, -1:].argmax(-1)], dim=1)
    assert theirs == ids[0, len(prompt):].tolist()


# ---- Llama-style models: llama.cpp's llama (q/k permuted) and qwen3 architectures --------------------------

from gpt.gguf_export import permute, unpermute  # noqa: E402
from gpt.model import apply_rotary, rotary  # noqa: E402
from gpt.parent import model_config  # noqa: E402

LLAMA = dict(vocab_size=50304, block_size=64, n_layer=2, n_head=4, n_embd=32, mlp_hidden=64, pos="rope",
             rope_theta=500.0, norm="rmsnorm", mlp="swiglu", bias=False)


def llama_checkpoint(tmp_path, n_kv_head=2, tie=False, qk_norm=False, **over):
    torch.manual_seed(0)
    model = GPT(**{**LLAMA, **over}, n_kv_head=n_kv_head, tie_embeddings=tie, qk_norm=qk_norm)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(1.0, 0.3)
    path = save_checkpoint({"model": model.state_dict(), "config": {"model": model_config(model)},
                            "tokenizer": CHAT, "step": 0}, tmp_path / "llama.pt")
    return model.eval(), path


def ggml_rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """llama.cpp's LLAMA_ROPE_TYPE_NORM by its definition: pairs of adjacent channels (2i, 2i + 1) of each head
    turn by pos * theta^(-2i/D). x (T, D)."""
    D = x.size(-1)
    angle = pos.float()[:, None] * theta ** (-torch.arange(0, D, 2).float() / D)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2], out[..., 1::2] = x0 * angle.cos() - x1 * angle.sin(), x0 * angle.sin() + x1 * angle.cos()
    return out


def test_permuted_rows_under_ggml_rotary_equal_ours():
    """Why the llama export permutes q and k: GGML's rotary pairs adjacent rows, ours (transformers') pairs i with
    i + D/2. Rotating permuted rows the GGML way gives the permuted result of rotating ours; so attention scores
    (q . k over a head, the same permutation on both) are unchanged."""
    torch.manual_seed(0)
    n_head, D, T = 2, 8, 5
    w = torch.randn(n_head * D, 16)
    x = torch.randn(T, 16)
    pos = torch.arange(T)
    cos, sin = rotary(pos, D, 500.0)
    ours = apply_rotary((x @ w.t()).view(T, n_head, D).transpose(0, 1)[None], cos, sin)[0]  # (H, T, D)
    theirs = (x @ permute(w, n_head).t()).view(T, n_head, D)
    theirs = torch.stack([ggml_rope(theirs[:, h], pos, 500.0) for h in range(n_head)])  # (H, T, D)
    back = unpermute(theirs.transpose(0, 1).reshape(T, n_head * D).t(), n_head).t().view(T, n_head, D).transpose(0, 1)
    torch.testing.assert_close(back, ours, atol=1e-5, rtol=1e-5)
    assert torch.equal(permute(w, n_head)[:4], w[[0, 4, 1, 5]])  # head 0: rows 0, 4 are a pair, then 1, 5, ...
    assert torch.equal(unpermute(permute(w, n_head), n_head), w)


@pytest.mark.slow
@pytest.mark.parametrize("n_kv_head, tie, qk_norm, arch", [(2, False, False, "llama"), (1, True, True, "qwen3")])
def test_llama_round_trip_through_the_cli_keeps_logits(tmp_path, n_kv_head, tie, qk_norm, arch):
    model, path = llama_checkpoint(tmp_path, n_kv_head, tie, qk_norm)
    assert main(["export-gguf", str(path), str(tmp_path / "m.gguf")]) == 0
    reader, tensors = read(tmp_path / "m.gguf")
    f = {k: v.contents() for k, v in reader.fields.items() if not k.startswith("GGUF.")}
    assert (f["general.architecture"], f[f"{arch}.attention.head_count_kv"], f[f"{arch}.feed_forward_length"],
            f[f"{arch}.rope.dimension_count"], f[f"{arch}.rope.freq_base"]) == (arch, n_kv_head, 64, 8, 500.0)
    assert f[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert ("output.weight" in tensors) == (not tie) and ("blk.0.attn_q_norm.weight" in tensors) == qk_norm
    q = model.transformer.h[1].attn.c_attn.weight[:32].detach()  # q's rows of the fused c_attn
    want = permute(q, 4) if arch == "llama" else q  # llama.cpp's qwen3 rotates halves, as transformers does
    np.testing.assert_array_equal(dequantized(tensors["blk.1.attn_q.weight"]), want.numpy())
    np.testing.assert_array_equal(dequantized(tensors["blk.1.ffn_up.weight"]),
                                  model.transformer.h[1].mlp.c_fc.weight[64:].detach().numpy())  # [gate | up]
    assert main(["import", str(tmp_path / "m.gguf"), str(tmp_path / "back.pt")]) == 0
    back = model_from_checkpoint(load_checkpoint(tmp_path / "back.pt"))
    for name, t in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name
    idx = torch.randint(0, 50304, (2, 40))
    with torch.no_grad():
        assert torch.equal(back(idx)[0], model(idx)[0])


@pytest.mark.parametrize("over, message", [
    (dict(norm="layernorm"), "model.norm=layernorm has no transformers equivalent with model.pos=rope"),
    (dict(mlp="relu2"), "model.mlp=relu2 has no transformers equivalent"),
    (dict(pos="learned"), "GPT2LMHeadModel needs model.norm=layernorm"),
])
def test_options_without_a_llama_cpp_architecture_are_refused(tmp_path, capsys, over, message):
    _, path = llama_checkpoint(tmp_path, **over)
    assert main(["export-gguf", str(path), str(tmp_path / "m.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not list(tmp_path.glob("*.gguf*"))


@pytest.mark.slow
@pytest.mark.parametrize("qk_norm", [False, True])
def test_llama_cpp_logits_equal_ours_for_llama_style_models(tmp_path, qk_norm):
    """Where llama-cpp-python is installed: llama.cpp's logits from the llama file (q/k permuted) and the qwen3 file
    equal ours. q and k are scaled up so attention is peaked and depends on the rotary angles: with random 0.02
    weights it is near uniform and a file with unpermuted q/k rows gave the same greedy text (measured: with the
    scaling, unpermuted rows differ by 1.1 in the logits, permuted ones by 1.2e-6)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (it compiles llama.cpp)")
    from gpt.tokenizer import from_identity

    model, path = llama_checkpoint(tmp_path, n_kv_head=2, tie=False, qk_norm=qk_norm)
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight[:48].mul_(8.0)  # q (32 rows) and k (16 rows) of the fused c_attn
        model.lm_head.weight.mul_(8.0)
    path = save_checkpoint({**load_checkpoint(path), "model": model.state_dict()}, tmp_path / "sharp.pt")
    out = export_gguf(str(path), str(tmp_path / "m.gguf"))
    prompt = from_identity(CHAT).encode("Once upon a time, in a land far away, there lived")
    f32 = 0  # GGML_TYPE_F32: a float32 KV cache (llama.cpp's default f16 cache would round keys and values)
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, n_threads=1, verbose=False, logits_all=True,
                          type_k=f32, type_v=f32)
    llm.eval(prompt)
    theirs = torch.tensor(np.array(llm.scores[:len(prompt)]))
    with torch.no_grad():
        ours = model(torch.tensor([prompt]))[0][0]
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
