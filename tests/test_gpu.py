"""The CUDA path (pytest -m gpu; every test skips where CUDA is not available, so CI on CPU stays green).
benchmarks/gpu_check.sh runs these and the throughput benchmark on a GPU machine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import TINY, run_script
from gpt.runs import read_metrics

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available on this machine")
pytestmark = [pytest.mark.gpu, cuda]

GPU = ["hardware=gpu", "hardware.compile=false", *TINY]
CONF = Path(__file__).resolve().parents[1] / "gpt" / "conf"


def one_run(base: Path) -> Path:
    (run,) = [p for p in (base / "outputs").glob("*-*-*/*") if p.is_dir()]
    return run


@pytest.fixture(scope="module")
def cuda_run(tmp_path_factory):
    """A tiny run trained on CUDA in bf16 with fused AdamW (hardware=gpu), 30 steps."""
    base = tmp_path_factory.mktemp("cuda_run")
    proc = run_script("train.py", *GPU, "trainer.max_iters=30", "trainer.eval_interval=15", "trainer.log_interval=5",
                      cwd=base)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return one_run(base)


def test_bf16_training_on_cuda_lowers_the_loss(cuda_run):
    rows = [r for r in read_metrics(cuda_run / "metrics.jsonl") if "train/loss" in r]
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]
    ckpt = torch.load(cuda_run / "checkpoints" / "last.pt", weights_only=True, map_location="cpu")
    assert ckpt["precision"] == "bfloat16 autocast" and ckpt["config"]["hardware"]["fused_adamw"] is True


def test_a_cuda_checkpoint_samples_and_evaluates_on_cuda_and_on_cpu(cuda_run, tmp_path):
    for device in ("cuda", "cpu"):
        proc = run_script("infer.py", f"ckpt={cuda_run}", "prompt=ROMEO:", "max_new_tokens=8", f"device={device}",
                          cwd=tmp_path)
        assert proc.returncode == 0 and proc.stdout.startswith("ROMEO:"), proc.stderr[-2000:]
    proc = run_script("evaluate.py", f"ckpt={cuda_run}", "device=cuda", "perplexity.max_tokens=2000", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_float16_grad_scaler_skips_an_overflowing_step_on_cuda(tmp_path):
    from gpt.model import GPT
    from gpt.trainer import Loop, Precision, Trainer

    class Overflow:
        """Batches of random ids; the first step's loss is scaled past float16's range (its gradients overflow)."""
        calls = 0

        def train_batch(self):
            x = torch.randint(0, 32, (2, 9), device="cuda")
            return x[:, :-1], x[:, 1:]

        def loss(self, model, batch):
            self.calls += 1
            _, loss = model(*batch)
            return loss * (1e30 if self.calls == 1 else 1.0), {}

        batch_tokens = staticmethod(lambda batch: batch[0].numel())
        state_dict = staticmethod(lambda: {})
        load_state_dict = staticmethod(lambda state: None)

    torch.manual_seed(0)
    model = GPT(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=16).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    trainer = Trainer(model, Overflow(), optimizer, scheduler, Loop(max_iters=2, eval_interval=100, eval_iters=1),
                      precision=Precision("cuda", "float16"), run_dir=tmp_path, progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scale = trainer.precision.scaler.get_scale()
    trainer.train_step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the step was skipped
    assert trainer.precision.scaler.get_scale() < scale
    trainer.train_step()
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_compiled_forward_and_loss_have_no_graph_break():
    """torch.compile sees the model's forward with the fused output layer + loss as one graph (a break there would
    cost speed on every step)."""
    import torch._dynamo as dynamo

    from gpt.model import GPT

    model = GPT(vocab_size=512, block_size=64, n_layer=2, n_head=2, n_embd=64).cuda()
    x = torch.randint(0, 512, (2, 64), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        explanation = dynamo.explain(model)(x, x)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_compiled_llama_style_model_with_a_padded_vocabulary_has_no_graph_break():
    """The same for the Llama-style parts (rotary, RMSNorm, SwiGLU, grouped-query attention, untied) with the output
    layer padded to a multiple of 64 (the masked padding columns in the fused loss), with and without targets."""
    import torch._dynamo as dynamo

    from gpt.model import GPT

    model = GPT(vocab_size=500, block_size=64, n_layer=2, n_head=4, n_embd=64, pos="rope", norm="rmsnorm", mlp="swiglu",
                n_kv_head=2, tie_embeddings=False, bias=False, vocab_multiple=64).cuda()
    x = torch.randint(0, 500, (2, 64), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        for args in ((x, x), (x,)):
            explanation = dynamo.explain(model)(*args)
            assert explanation.graph_break_count == 0, explanation.break_reasons


def test_fused_adamw_is_fused_on_cuda(monkeypatch):
    """hardware=gpu builds the AdamW part of the default optimizer (MuonAdamW) and optimizer=adamw with fused=True,
    and a step goes through torch's fused kernel (counted), not the for-each loop."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from gpt.model import GPT
    from gpt.optim import build_optimizer

    calls = []
    fused_kernel = torch._fused_adamw_
    monkeypatch.setattr(torch, "_fused_adamw_", lambda *a, **k: calls.append(1) or fused_kernel(*a, **k))
    model = GPT(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32).cuda()
    for choice in ("muon", "adamw"):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name="train", overrides=["hardware=gpu", f"optimizer={choice}"])
        optimizer = build_optimizer(instantiate(cfg.optimizer), model, cfg.optimizer.get("weight_decay", 0.0))
        assert getattr(optimizer, "adamw", optimizer).defaults["fused"] is True, choice
        x = torch.randint(0, 64, (2, 16), device="cuda")
        model(x, x)[1].backward()
        before = len(calls)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        assert len(calls) > before, choice


def test_a_cpu_checkpoint_resumes_on_cuda(tmp_path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cuda").mkdir()
    proc = run_script("train.py", *TINY, "trainer.max_iters=4", "trainer.eval_interval=2", cwd=tmp_path / "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    cpu_run = one_run(tmp_path / "cpu")
    proc = run_script("train.py", *GPU, "trainer.max_iters=8", "trainer.eval_interval=2", f"resume={cpu_run}",
                      cwd=tmp_path / "cuda")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(one_run(tmp_path / "cuda") / "checkpoints" / "last.pt", weights_only=True, map_location="cpu")
    assert ckpt["step"] == 8 and ckpt["precision"] == "bfloat16 autocast"


def test_serve_answers_the_openai_api_from_a_cuda_checkpoint(cuda_run):
    """serve.py's app (OpenAI API, through TestClient) on CUDA, from the checkpoint trained on CUDA: a greedy
    completion equals the library's greedy generation from the same weights."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient
    from omegaconf import OmegaConf

    from gpt.generate import generate_batch
    from gpt.inference import load_for_inference
    from gpt.serve import Limits, create_app, engine_from_config

    cfg = OmegaConf.create({"ckpt": str(cuda_run), "device": "cuda", "dtype": "float32", "quantize": None})
    client = TestClient(create_app(engine_from_config(cfg), Limits(max_new_tokens=16)))
    name = client.get("/v1/models").json()["data"][0]["id"]
    r = client.post("/v1/completions", json={"model": name, "prompt": "ROMEO:", "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200, r.text
    model, tok, _ = load_for_inference(str(cuda_run), "cuda", None, "float32")
    want = tok.decode(generate_batch(model, [tok.encode("ROMEO:")], 12, temperature=0.0)[0])
    assert r.json()["choices"][0]["text"] == want and next(model.parameters()).is_cuda


def test_compiled_training_runs(tmp_path):
    proc = run_script("train.py", "hardware=gpu", "hardware.compile=true", *TINY, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_kv_cache_equals_no_cache_on_cuda():
    from gpt.generate import generate
    from gpt.model import GPT

    torch.manual_seed(0)
    model = GPT(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32).cuda().eval()
    idx = torch.randint(0, 64, (3, 5), device="cuda")
    cached = generate(model, idx, 40, temperature=0.0, use_cache=True)
    plain = generate(model, idx, 40, temperature=0.0, use_cache=False)
    assert torch.equal(cached, plain)


def test_ddp_on_one_gpu_through_torchrun(tmp_path):
    proc = run_script("train.py", "hardware=ddp", *TINY, cwd=tmp_path,
                      prefix=["torchrun", "--standalone", "--nproc_per_node=1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(one_run(tmp_path) / "checkpoints" / "last.pt", weights_only=True, map_location="cpu")
    assert ckpt["step"] == 6
