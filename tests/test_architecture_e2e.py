"""A Llama-style model (rotary, RMSNorm, SwiGLU, grouped-query attention, QK-norm, untied) through every entry
point: train.py, each finetune.py stage family (SFT with LoRA, reward, DPO, GRPO through the decode engine),
evaluate.py, infer.py, serve.py's OpenAI API, and FSDP under torchrun, which must equal DDP."""

import glob
import json
from pathlib import Path

import pytest
import torch

from conftest import TINY, run_script  # infer.py binds sys.stdout at import: a subprocess shows it
from gpt.tasks.arithmetic import write_task
from inprocess import run_here

pytestmark = pytest.mark.slow

MODERN = ["model.pos=rope", "model.norm=rmsnorm", "model.mlp=swiglu", "model.n_kv_head=1", "model.qk_norm=true",
          "model.tie_embeddings=false", "model.bias=false"]
FT = ["trainer.max_iters=4", "trainer.eval_interval=2", "trainer.eval_iters=2", "trainer.log_interval=2",
      "trainer.batch_size=4", "scheduler.schedule.warmup_iters=1", "hardware.autocast_dtype=float32"]


def newest(cwd: Path) -> Path:
    return Path(sorted(glob.glob(str(cwd / "outputs" / "*-*-*" / "*")))[-1])


def ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("modern")
    files = write_task(cwd / "task", n=200, seed=0, hi=9)
    ok(run_here("train.py", *TINY, *MODERN, "data=text", f"data.path={files['pretrain']}", "optimizer=muon", cwd=cwd))
    run = newest(cwd)
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    model_cfg = ckpt["config"]["model"]
    assert (model_cfg["pos"], model_cfg["norm"], model_cfg["mlp"], model_cfg["n_kv_head"]) == ("rope", "rmsnorm",
                                                                                                 "swiglu", 1)
    assert "lm_head.weight" in ckpt["model"] and "transformer.wpe.weight" not in ckpt["model"]
    return cwd, files, run


def test_finetune_stages_evaluate_and_infer_run_on_the_modern_architecture(pretrained):
    cwd, files, pre = pretrained
    ok(run_here("finetune.py", "stage=sft", f"ckpt={pre}", f"data={files['sft_train']}",
                f"data.val_path={files['sft_val']}", "lora.r=4", *FT, cwd=cwd))
    sft = newest(cwd)
    ok(run_here("finetune.py", "stage=dpo", f"ckpt={sft}", f"data={files['pairs_train']}",
                f"data.val_path={files['pairs_val']}", *FT, cwd=cwd))
    ok(run_here("finetune.py", "stage=reward", f"ckpt={sft}", f"data={files['pairs_train']}",
                f"data.val_path={files['pairs_val']}", *FT, cwd=cwd))
    grpo = ok(run_here("finetune.py", "stage=grpo", f"ckpt={sft}", f"data={files['prompts_train']}",
                       f"data.val_path={files['prompts_val']}", "stage.prompts_per_rollout=2", "stage.group_size=2",
                       "stage.minibatch_size=4", *FT, cwd=cwd))
    assert "val/reward" in (newest(cwd) / "metrics.jsonl").read_text(), grpo.stdout[-2000:]
    ok(run_here("evaluate.py", f"ckpt={sft}", f"instructions={files['sft_val']}", "samples.num=0", cwd=cwd))
    ok(run_here("evaluate.py", f"ckpt={pre}", "data=text", f"data.path={files['pretrain']}", "samples.num=0", cwd=cwd))
    folders = sorted(glob.glob(str(cwd / "evaluations" / "*-*-*" / "*")))
    chat, text = (json.loads((Path(f) / "metrics.json").read_text())["metrics"] for f in folders[-2:])
    assert chat["instruct/n"] == 10 and 0.0 <= chat["instruct/exact_match"] <= 1.0
    assert 1.0 < text["all/perplexity"] < 200
    ok(run_here("infer.py", f"ckpt={sft}", 'prompt="3+4="', "chat=true", "max_new_tokens=4", "temperature=0", cwd=cwd))
    proc = ok(run_script("infer.py", f"ckpt={pre}", 'prompt="3+4="', "max_new_tokens=4", "temperature=0",
                       "dtype=bfloat16", cwd=cwd))
    assert "3+4=" in proc.stdout


def test_serve_answers_the_openai_api_from_a_modern_checkpoint(pretrained):
    from fastapi.testclient import TestClient

    from gpt.checkpoint import load_checkpoint, model_from_checkpoint
    from gpt.generate import generate
    from gpt.serve import Engine, Limits, create_app
    from gpt.tokenizer import from_identity

    _, _, run = pretrained
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    model, tok = model_from_checkpoint(ckpt, "cpu").eval(), from_identity(ckpt["tokenizer"])
    want = tok.decode(generate(model, torch.tensor([tok.encode("3+4=")]), 6, temperature=0.0)[0, 4:].tolist())
    engine = Engine(model, tok, "cpu", None, "last.pt")
    with TestClient(create_app(engine, Limits(), model_name="modern")) as client:
        r = client.post("/v1/completions", json={"model": "modern", "prompt": "3+4=", "max_tokens": 6,
                                                 "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == want


def test_fsdp_trains_the_modern_architecture_as_ddp_does(tmp_path):
    from test_fsdp import LOOP, torchrun

    for hw in ("ddp", "fsdp"):
        torchrun(tmp_path, f"hardware={hw}", *LOOP, *MODERN, "trainer.max_iters=3", f"hydra.run.dir={hw}")
    rows = {hw: [json.loads(line) for line in (tmp_path / hw / "metrics.jsonl").read_text().splitlines()]
            for hw in ("ddp", "fsdp")}
    losses = {hw: [r["train/loss"] for r in rs if "train/loss" in r] for hw, rs in rows.items()}
    assert len(losses["ddp"]) == 3
    assert losses["fsdp"] == pytest.approx(losses["ddp"], rel=1e-5)
    a = torch.load(tmp_path / "ddp" / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "fsdp" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
