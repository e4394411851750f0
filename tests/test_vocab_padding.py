"""A vocabulary padded to a multiple (model.vocab_multiple): the embedding and output layer hold the padding rows,
but logits, the loss, sampling and every export cover the true vocabulary only; grown vocabularies (special tokens
added by a stage) take padding rows or grow it; checkpoints without the key load unpadded.

The padding rows are "poisoned" (huge weights) where it matters: any path that scored them would then pick them or
change the loss by a wide margin, so the checks below cannot pass by accident."""

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY
from inprocess import run_here
from gpt.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from gpt.errors import UserError
from gpt.generate import generate, generate_batch
from gpt.heads import ValueHeadGPT
from gpt.lora import apply_lora, count_parameters
from gpt.memory import activation_bytes
from gpt.model import GPT, GPTConfig, OutputHead, without_padding
from gpt.parent import grow_vocab, model_config

V, M, ROWS = 100, 64, 128  # 100 token ids in 128 rows
TINY_GPT = dict(vocab_size=V, block_size=32, n_layer=2, n_head=2, n_embd=16, vocab_multiple=M, loss_chunk_size=8)
LLAMA = dict(pos="rope", norm="rmsnorm", mlp="swiglu", mlp_hidden=48, bias=False, n_kv_head=1)


def padded(seed=0, **over) -> GPT:
    torch.manual_seed(seed)
    return GPT(**{**TINY_GPT, **over}).eval()


def poison(model: GPT, value: float = 50.0) -> GPT:
    """Padding rows of the output layer (and of an untied embedding) set to `value` everywhere: scored, they would
    dominate every logit."""
    with torch.no_grad():
        for w in (model.lm_head.weight, model.transformer.wte.weight):
            w[model.config.vocab_size:] = value
    return model


def unpadded_twin(model: GPT) -> GPT:
    """The same weights without padding rows (vocab_multiple 1): the reference computation."""
    twin = GPT(**{**model.hparams(), "vocab_multiple": 1})
    twin.load_state_dict(without_padding(model.state_dict(), model.config))
    return twin.train(model.training)


def ids(n=2, t=12, seed=3, vocab=V):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


# ---- shapes and config -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("over", [{}, {"tie_embeddings": False}, LLAMA], ids=["tied", "untied", "llama"])
def test_padding_rows_exist_and_logits_cover_the_true_vocabulary(over):
    model = poison(padded(**over))
    assert model.transformer.wte.weight.shape == (ROWS, 16) and model.lm_head.weight.shape == (ROWS, 16)
    assert isinstance(model.lm_head, OutputHead) and model.lm_head.vocab_size == V
    x = ids()
    with torch.no_grad():
        logits = model(x)[0]
        cache = model.new_cache(2)
        first, step = model(x[:, :8], cache=cache)[0], model(x[:, 8:9], cache=cache)[0]
        ref = unpadded_twin(model)(x)[0]
    assert logits.shape == (2, 12, V) and first.shape == (2, 8, V) and step.shape == (2, 1, V)
    torch.testing.assert_close(logits, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(step[:, 0], logits[:, 8], atol=1e-5, rtol=1e-5)  # KV cache == uncached
    assert logits.abs().max() < 20  # a scored padding row (weights 50) would give logits in the hundreds
    assert model.hparams()["vocab_size"] == V and model.hparams()["vocab_multiple"] == M


def test_bf16_inference_prepacks_the_padded_output_layer_and_scores_the_true_vocabulary(tmp_path):
    """load_for_inference in bf16 on a CPU prepacks every Linear for oneDNN (gpt.inference.PackedLinear); the padded
    output layer becomes a PackedOutputHead over its first V rows: logits (..., V), no padding id sampled."""
    from gpt.inference import PackedOutputHead, load_for_inference

    model = poison(padded(n_embd=32))
    path = save(model, tmp_path / "p.pt")
    packed, _, _ = load_for_inference(str(path), dtype="bfloat16")
    if torch.backends.mkldnn.is_available():
        assert type(packed.lm_head) is PackedOutputHead and packed.lm_head._packed is not None
    x = ids()
    with torch.no_grad():
        got, want = packed(x)[0].float(), model(x)[0]
    assert got.shape == want.shape == (2, 12, V)
    assert (got - want).abs().max() < 0.05 * want.abs().max()  # bf16 weights: the float logits within 5%
    assert generate(packed, x[:, :3], 15, temperature=2.0, generator=torch.Generator().manual_seed(0)).max() < V


def test_an_unpadded_model_keeps_its_plain_output_layer():
    model = padded(vocab_size=128)  # already a multiple of 64: no padding rows, the plain nn.Linear as before
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.shape == (128, 16)


def test_padded_sizes():
    cfg = lambda v, m: GPTConfig(vocab_size=v, vocab_multiple=m).padded_vocab_size  # noqa: E731
    assert cfg(50257, 64) == 50304 and cfg(50257, 1) == 50257 and cfg(128, 64) == 128 and cfg(129, 64) == 192
    assert GPTConfig(vocab_size=65).vocab_multiple == 1  # the default: no padding (old checkpoints)


@pytest.mark.parametrize("bad", [0, -64, 4097, True, 64.0, "64"])
def test_bad_vocab_multiple_is_one_line(bad):
    with pytest.raises(UserError, match=r"model\.vocab_multiple=.* must be an integer in 1\.\.4096"):
        GPT(**{**TINY_GPT, "vocab_multiple": bad})


def test_value_head_logits_cover_the_true_vocabulary():
    torch.manual_seed(0)
    model = poison(ValueHeadGPT(**TINY_GPT).eval())
    with torch.no_grad():
        logits, values = model(ids(), values=True)
    assert logits.shape == (2, 12, V) and values.shape == (2, 12) and logits.abs().max() < 20


# ---- the loss ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [8, 5, 0], ids=["fused", "fused-ragged-chunks", "unfused"])
@pytest.mark.parametrize("over", [{}, {"tie_embeddings": False}], ids=["tied", "untied"])
def test_loss_and_gradients_equal_cross_entropy_over_the_true_vocabulary(chunk, over):
    model = poison(padded(loss_chunk_size=chunk, **over)).train()
    ref_model = unpadded_twin(model)
    x, y = ids(seed=1), ids(seed=2)
    y[0, :3] = -1  # ignored targets
    _, loss = model(x, y)
    loss.backward()
    logits = ref_model(x)[0]  # the plain reference: logits over V, then F.cross_entropy
    ref = F.cross_entropy(logits.reshape(-1, V), y.reshape(-1), ignore_index=-1)
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    assert abs(loss.item() - ref.item()) < 1e-5  # with the padding in the softmax the loss would be ~50 higher
    ref_grads = dict(ref_model.named_parameters())
    for name, p in model.named_parameters():
        g, want = p.grad, ref_grads[name].grad
        if name in ("transformer.wte.weight", "lm_head.weight"):
            assert torch.count_nonzero(g[V:]) == 0, name  # the padding gets no gradient
            g = g[:V]
        torch.testing.assert_close(g, want, atol=1e-6, rtol=1e-5, msg=name)


def test_fused_loss_under_bf16_autocast_equals_the_unpadded_one():
    model = poison(padded(loss_chunk_size=6))
    twin = unpadded_twin(model)
    x, y = ids(seed=1), ids(seed=2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = model(x, y)[1], twin(x, y)[1]
    # the same bf16 products for the first V columns; only the softmax's float32 sums may round differently
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ---- sampling ----------------------------------------------------------------------------------------------------

def test_generation_never_emits_a_padding_id():
    model = poison(padded(), value=1e3)
    twin = unpadded_twin(model)
    x = ids(n=3, t=4)
    sampled = generate(model, x, 20, temperature=2.0, generator=torch.Generator().manual_seed(0))
    assert sampled.max() < V and sampled.shape == (3, 24)
    greedy = generate_batch(model, [x[0].tolist(), x[1, :2].tolist()], 20, temperature=0.0)
    assert greedy == generate_batch(twin, [x[0].tolist(), x[1, :2].tolist()], 20, temperature=0.0)
    top_p = generate(model, x, 10, temperature=1.0, top_p=0.9, top_k=50, generator=torch.Generator().manual_seed(1))
    assert top_p.max() < V


# ---- checkpoints -------------------------------------------------------------------------------------------------

def save(model: GPT, path, node: dict | None = None, tokenizer: dict | None = None):
    node = node if node is not None else model_config(model)
    return save_checkpoint({"model": model.state_dict(), "config": {"model": node},
                            "tokenizer": tokenizer or {"type": "char", "chars": "".join(chr(32 + i) for i in range(V))},
                            "step": 0}, path)


def test_checkpoint_records_the_true_vocabulary_and_the_padding(tmp_path):
    model = padded()
    path = save(model, tmp_path / "p.pt")
    ckpt = load_checkpoint(path)
    assert ckpt["config"]["model"]["vocab_size"] == V and ckpt["config"]["model"]["vocab_multiple"] == M
    back = model_from_checkpoint(ckpt)
    assert back.transformer.wte.weight.shape[0] == ROWS
    with torch.no_grad():
        torch.testing.assert_close(back(ids())[0], model(ids())[0], atol=0, rtol=0)


def test_old_checkpoint_without_the_key_loads_unpadded(tmp_path):
    torch.manual_seed(0)
    old = GPT(**{k: v for k, v in TINY_GPT.items() if k != "vocab_multiple"}).eval()
    node = {k: v for k, v in model_config(old).items() if k != "vocab_multiple"}  # written before the key existed
    back = model_from_checkpoint(load_checkpoint(save(old, tmp_path / "old.pt", node)))
    assert back.config.vocab_multiple == 1 and back.transformer.wte.weight.shape[0] == V
    with torch.no_grad():
        torch.testing.assert_close(back(ids())[0], old(ids())[0], atol=0, rtol=0)


def test_padded_weights_under_a_config_without_padding_are_one_line(tmp_path):
    model = padded()
    node = {k: v for k, v in model_config(model).items() if k != "vocab_multiple"}
    with pytest.raises(UserError, match="weights do not fit its config"):
        model_from_checkpoint(load_checkpoint(save(model, tmp_path / "bad.pt", node)))


def test_memory_estimate_counts_the_padded_rows():
    B, T, C = 2, 16, 16
    plain, pad = GPTConfig(**{**TINY_GPT, "vocab_multiple": 1}), GPTConfig(**TINY_GPT)
    # fused head: its (rows, C) float32 weight gradient kept from forward, plus one chunk of logits
    want = (ROWS - V) * (C * 4 + min(B * T, TINY_GPT["loss_chunk_size"]) * 4)
    assert activation_bytes(pad, B, T, None) - activation_bytes(plain, B, T, None) == want


# ---- exports: they cut the padding -------------------------------------------------------------------------------

GPT2_TOKENIZER = {"type": "tiktoken", "name": "gpt2"}


def gpt2_padded(tmp_path, **over):
    """A tiny GPT-2-vocabulary model padded 50257 -> 50304 rows, with poisoned padding."""
    model = poison(padded(vocab_size=50257, **over))
    return model, save(model, tmp_path / "gpt2.pt", tokenizer=GPT2_TOKENIZER)


@pytest.mark.slow
def test_hf_export_cuts_the_padding_and_transformers_logits_equal_ours(tmp_path):
    transformers = pytest.importorskip("transformers")
    from gpt.interop import export_hf, import_hf

    model, path = gpt2_padded(tmp_path)
    out = export_hf(str(path), str(tmp_path / "hf"))
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 50257
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(out)).eval()
    x = ids(vocab=50257)
    with torch.no_grad():
        ours = model(x)[0]
        torch.testing.assert_close(hf(x).logits, ours, atol=1e-4, rtol=1e-4)
        back = model_from_checkpoint(load_checkpoint(import_hf(str(out), str(tmp_path / "back.pt"))))
        torch.testing.assert_close(back(x)[0], ours, atol=1e-5, rtol=1e-5)
    assert back.transformer.wte.weight.shape[0] == 50257 and back.config.vocab_multiple == 1


@pytest.mark.parametrize("tie, qk_norm", [(True, False), (False, False), (False, True)])
def test_llama_export_cuts_the_padding(tmp_path, tie, qk_norm):
    transformers = pytest.importorskip("transformers")
    from gpt.interop import export_hf

    model = poison(padded(**LLAMA, tie_embeddings=tie, qk_norm=qk_norm))
    out = export_hf(str(save(model, tmp_path / "l.pt")), str(tmp_path / "hf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert hf.config.vocab_size == V and hf.model.embed_tokens.weight.shape == (V, 16)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x)[0], atol=1e-4, rtol=1e-4)


@pytest.mark.slow  # gguf's reader parses the 50k GPT-2 tokens one by one
@pytest.mark.parametrize("over", [{}, {**LLAMA, "n_head": 4}], ids=["gpt2", "llama"])
def test_gguf_export_cuts_the_padding_and_imports_back(tmp_path, over):
    pytest.importorskip("gguf")
    from gpt.gguf_export import export_gguf, import_gguf

    model, path = gpt2_padded(tmp_path, **over)
    file = export_gguf(str(path), str(tmp_path / "m.gguf"))
    import gguf

    reader = gguf.GGUFReader(str(file))
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert [int(d) for d in embd.shape] == [16, 50257]  # innermost first: 50257 rows, not 50304
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == 50257  # no [PAD] tokens for the padding
    back = model_from_checkpoint(load_checkpoint(import_gguf(str(file), str(tmp_path / "back.pt"))))
    x = ids(vocab=50257)
    with torch.no_grad():
        torch.testing.assert_close(back(x)[0], model(x)[0], atol=1e-5, rtol=1e-5)


def test_int8_output_layer_scores_the_true_vocabulary(tmp_path):
    from gpt.quantize import model_from_quantized, quantize_int8, quantized_checkpoint

    model = poison(padded(n_embd=64, n_head=2), value=1e3)
    q = quantize_int8(model)
    assert q.lm_head.out_features == V
    x = ids()
    with torch.no_grad():
        ref, got = model(x)[0], q(x)[0]
        assert got.shape == ref.shape == (2, 12, V)
        err = (got - ref).abs().max().item()
        assert err < 0.05 * ref.abs().max().item() + 1e-3  # int8's bound (tests/test_quantize.py), not 1e3's
        path = save_checkpoint(quantized_checkpoint(q, load_checkpoint(save(model, tmp_path / "f.pt"))),
                               tmp_path / "q.pt")
        back = model_from_quantized(load_checkpoint(path))
        torch.testing.assert_close(back(x)[0], got, atol=0, rtol=0)
        assert generate(back, x[:, :3], 15, temperature=2.0, generator=torch.Generator().manual_seed(0)).max() < V


# ---- grown vocabularies (special tokens added by a stage) ----------------------------------------------------------

@pytest.mark.parametrize("vocab, rows_after", [(V, ROWS), (ROWS, 192)], ids=["fits-in-padding", "grows-padding"])
def test_grow_vocab_takes_padding_rows_or_grows_it(vocab, rows_after):
    model = poison(padded(vocab_size=vocab))
    grown = grow_vocab(model, vocab + 4)
    assert grown.config.vocab_size == vocab + 4 and grown.transformer.wte.weight.shape[0] == rows_after
    w, old = grown.transformer.wte.weight, model.transformer.wte.weight
    assert torch.equal(w[:vocab], old[:vocab])
    # new tokens start at the mean of the real rows (the poisoned padding is not part of it)
    torch.testing.assert_close(w[vocab:vocab + 4], old[:vocab].mean(0, keepdim=True).expand(4, -1))
    x = ids(vocab=vocab)
    with torch.no_grad():
        before, after = model(x)[0], grown(x)[0]
    assert after.shape[-1] == vocab + 4
    torch.testing.assert_close(after[..., :vocab], before, atol=1e-6, rtol=1e-6)  # old tokens score as before


def test_lora_trains_only_the_new_rows_and_never_the_padding():
    parent = padded()
    same = GPT(**parent.hparams())
    unchanged = apply_lora(same, r=2, alpha=4, targets=["attn.c_attn"], new_rows_from=V)
    model = grow_vocab(parent, V + 4)
    info = apply_lora(model, r=2, alpha=4, targets=["attn.c_attn"], new_rows_from=V)
    adapters = 2 * 2 * (16 + 48)  # 2 layers x r x (in + out)
    assert unchanged["trainable"] == adapters  # no new token: the (padded) embedding stays frozen
    assert not same.transformer.wte.weight.requires_grad and model.transformer.wte.weight.requires_grad
    assert info["trainable"] == adapters + 4 * 16 == count_parameters(model)[0]
    # a few AdamW steps with the trainer's parameter groups (weight decay on, but not for the embedding LoRA marks
    # no_weight_decay): the old rows and the padding rows stay bit for bit, the new rows move
    from gpt.optim import param_groups

    before = model.transformer.wte.weight.detach().clone()
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2)
    for _ in range(3):
        x = torch.randint(0, V + 4, (2, 8))
        model(x, x)[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    after = model.transformer.wte.weight.detach()
    assert torch.equal(after[:V], before[:V]) and torch.equal(after[V + 4:], before[V + 4:])
    assert not torch.equal(after[V:V + 4], before[V:V + 4])


def test_sft_on_a_padded_parent_with_chat_tokens(tmp_path):
    from stage_helpers import CHARS, write_jsonl

    from gpt.stages.sft import SFT
    from gpt.tokenizer import CharTokenizer

    torch.manual_seed(0)
    tok = CharTokenizer(CHARS)
    parent = GPT(**{**TINY_GPT, "vocab_size": tok.vocab_size})
    path = save_checkpoint({"model": parent.state_dict(), "step": 0, "stage": "pretrain", "tokenizer": tok.identity(),
                            "config": {"model": model_config(parent), "seed": 0, "tokenizer": {
                                "_target_": "gpt.tokenizer.CharTokenizer", "vocab_size": tok.vocab_size}}},
                           tmp_path / "p.pt")
    data = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": f"{a}+{a}=", "completion": str(2 * a)} for a in range(6)])
    sft = SFT(load_checkpoint(path), str(data), val_data=str(data), batch_size=4)
    n = sft.tokenizer.vocab_size
    assert n == tok.vocab_size + 4 and sft.model.config.vocab_size == n
    assert sft.model.transformer.wte.weight.shape[0] == 64  # 42 chars + 4 chat tokens still fit in 64 rows
    loss, _ = sft.loss(sft.model, sft.train_batch())
    loss.backward()
    assert torch.isfinite(loss) and torch.count_nonzero(sft.model.lm_head.weight.grad[n:]) == 0


# ---- end to end --------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_train_resume_and_infer_with_a_padded_vocabulary(tmp_path):
    common = [*TINY, "model.vocab_multiple=64", "trainer.eval_interval=2"]
    first = run_here("train.py", *common, "trainer.max_iters=4", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    run = next(p.parent for p in tmp_path.rglob("last.pt"))
    ckpt = torch.load(run / "last.pt", weights_only=True)
    node = ckpt["config"]["model"]
    assert node["vocab_multiple"] == 64 and node["vocab_size"] == 65  # Shakespeare's 65 characters
    assert ckpt["model"]["transformer.wte.weight"].shape[0] == 128
    resumed = run_here("train.py", *common, "trainer.max_iters=6", f"resume={run}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    steps = {p.parent: torch.load(p, weights_only=True)["step"] for p in tmp_path.rglob("last.pt")}
    assert sorted(steps.values()) == [4, 6]  # the resumed run's own folder
    run = max(steps, key=steps.get)
    out = run_here("infer.py", f"ckpt={run}", "prompt=ROMEO:", "max_new_tokens=30", "temperature=2.0", cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.startswith("ROMEO:"), out.stderr[-2000:]


def test_peft_adapter_of_a_padded_lora_run_with_new_tokens(tmp_path):
    """A LoRA run on a padded parent that trained new token rows: the exported base holds the true vocabulary
    (new rows included, padding cut) and peft on it gives our merged logits."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from gpt.interop import export_peft

    lora = {"r": 2, "alpha": 4, "dropout": 0.0, "targets": ["attn.c_attn", "mlp.c_fc"]}
    model = grow_vocab(poison(padded(bias=True)), V + 4)
    apply_lora(model, **lora, new_rows_from=V)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = ids(n=4, t=12, vocab=V + 4, seed=5)
    for _ in range(3):
        loss = model(x[:, :-1], x[:, 1:])[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    tok = {"type": "char", "chars": "".join(chr(32 + i) for i in range(V + 4))}
    path = save_checkpoint({"model": model.state_dict(), "step": 3, "tokenizer": tok,
                            "config": {"model": model_config(model), "lora": lora}}, tmp_path / "lora.pt")
    out = export_peft(str(path), str(tmp_path / "adapter"))
    base = transformers.GPT2LMHeadModel.from_pretrained(str(out / "base"), dtype=torch.float32)
    assert base.config.vocab_size == V + 4
    theirs_model = peft.PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        ours, theirs = model_from_checkpoint(load_checkpoint(path))(x)[0], theirs_model(x).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_compiled_padded_llama_style_model_has_no_graph_break():
    """torch.compile (dynamo) traces the padded output layer, the fused loss with its masked padding columns and
    the Llama-style parts as one graph, with and without targets (tests/test_gpu.py checks the same on CUDA)."""
    import torch._dynamo as dynamo

    model = padded(**LLAMA, n_head=4, n_embd=64, vocab_size=500).train()
    x = ids(t=32, vocab=500)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for args in ((x, x), (x,)):
            explanation = dynamo.explain(model)(*args)
            assert explanation.graph_break_count == 0, explanation.break_reasons
