"""The pretraining objective: batches per rank, fixed evaluation batches, resumable sampler state."""

import contextlib

import numpy as np
import torch

from gpt.data import TokenData
from gpt.model import GPT
from gpt.stages.pretrain import Pretrain
from gpt.tokenizer import CharTokenizer


def objective(rank=0, seed=0):
    tok = CharTokenizer("abcdefghij\n")
    stream = np.arange(2000, dtype=np.uint16) % 11
    data = TokenData(stream, stream[:500].copy(), tok, cache_path=None, reused=False)
    return Pretrain(data, batch_size=4, block_size=8, seed=seed, rank=rank, sample_tokens=5)


def test_ranks_draw_different_batches_and_same_rank_is_reproducible():
    a0, a1, b0 = objective(rank=0), objective(rank=1), objective(rank=0)
    x0, x1, y0 = a0.train_batch()[0], a1.train_batch()[0], b0.train_batch()[0]
    assert not torch.equal(x0, x1)
    assert torch.equal(x0, y0)


def test_sampler_state_round_trip_continues_the_same_sequence():
    a = objective()
    a.train_batch()
    state = a.state_dict()
    expected = a.train_batch()[0]
    b = objective()
    b.load_state_dict(state)
    assert torch.equal(b.train_batch()[0], expected)


def test_evaluation_uses_the_same_batches_every_time():
    obj = objective()
    torch.manual_seed(0)
    model = GPT(vocab_size=11, block_size=8, n_layer=1, n_head=1, n_embd=8).eval()
    first = obj.evaluate(model, 3, contextlib.nullcontext)
    obj.train_batch()  # training draws must not move the evaluation batches
    assert obj.evaluate(model, 3, contextlib.nullcontext) == first
    assert set(first) == {"train/eval_loss", "val/loss"}


def test_samples_start_with_the_prompt():
    obj = objective()
    model = GPT(vocab_size=11, block_size=8, n_layer=1, n_head=1, n_embd=8)
    rows = obj.samples(model, contextlib.nullcontext)
    assert rows[0]["text"].startswith("\n") and len(rows[0]["text"]) == 1 + 5


def test_precision_auto_picks_bf16_only_where_the_cpu_has_it(monkeypatch):
    from gpt import trainer

    monkeypatch.setattr(trainer, "cpu_has_fast_bf16", lambda: True)
    assert trainer.Precision("cpu", "auto").dtype is torch.bfloat16
    monkeypatch.setattr(trainer, "cpu_has_fast_bf16", lambda: False)
    assert trainer.Precision("cpu", "auto").dtype is None
    assert trainer.Precision("cpu", "float32").dtype is None
    assert not trainer.Precision("cpu", "bfloat16").scaler.is_enabled()  # GradScaler only for float16


def test_a_onednn_pin_below_bf16_counts_as_no_fast_bf16():
    """ONEDNN_MAX_CPU_ISA=AVX2 on an AMX CPU: bf16 matmuls fall back to reference code, so auto precision must
    pick float32 as on an AVX2 machine; ISAs with bf16 (or no pin) keep the CPU's own answer."""
    from gpt.precision import isa_pinned_below_bf16

    for isa in ("AVX2", "avx512_core", "AVX512_CORE_VNNI", " avx2_vnni ", "AVX2_VNNI_2"):
        assert isa_pinned_below_bf16({"ONEDNN_MAX_CPU_ISA": isa}), isa
    assert isa_pinned_below_bf16({"DNNL_MAX_CPU_ISA": "AVX2"})  # oneDNN's older name for the variable
    for env in ({}, {"ONEDNN_MAX_CPU_ISA": "ALL"}, {"ONEDNN_MAX_CPU_ISA": "DEFAULT"},
                {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_FP16"},
                {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}, {"ONEDNN_MAX_CPU_ISA": "AVX10_1_512_AMX"},
                {"ATEN_CPU_CAPABILITY": "avx2"}):
        assert not isa_pinned_below_bf16(env), env
