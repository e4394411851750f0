"""LoRA (adapters in gpt/lora/, LoRA checkpoints in gpt/checkpoint.py): exact start, only adapters (and new
token rows / heads) train, merge, checkpoints, the merge CLI, stages with lora.r > 0, and an end-to-end
finetune.py -> infer.py -> merge run."""

import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT, TINY
from inprocess import run_here
from gpt.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from gpt.errors import UserError
from gpt.finetuning import add_lora
from gpt.heads import Classifier, RewardModel
from gpt.lora import LoRALinear, apply_lora, count_parameters, merge_lora
from gpt.lora.__main__ import main as lora_main
from gpt.model import GPT
from gpt.optim import param_groups
from gpt.parent import model_config
from stage_helpers import make_parent, write_jsonl

HP = dict(vocab_size=20, block_size=16, n_layer=2, n_head=2, n_embd=16, bias=True, loss_chunk_size=8)
LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["attn.c_attn", "attn.c_proj"]}


def tiny(cls=GPT, seed=0, **extra):
    torch.manual_seed(seed)
    return cls(**HP, **extra)


def batch(seed=1, vocab=HP["vocab_size"]):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (3, 10), generator=g), torch.randint(0, vocab, (3, 10), generator=g)


def train(model, steps=5, lr=1e-2, weight_decay=0.1, loss_fn=None):
    """A few AdamW steps (weight decay, grad clipping) as the Trainer takes them."""
    opt = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr)
    x, y = batch()
    for _ in range(steps):
        loss = loss_fn(model) if loss_fn else model(x, y)[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_fresh_adapters_give_the_base_logits_and_train_r_times_in_plus_out_per_layer():
    model = tiny()
    x, _ = batch()
    base = model(x)[0]
    info = apply_lora(model, r=4, alpha=8, targets=["attn.c_attn", "attn.c_proj"])
    assert torch.equal(model(x)[0], base)  # B = 0: exactly the base model
    assert info["layers"] == [f"transformer.h.{i}.attn.{n}" for i in range(2) for n in ("c_attn", "c_proj")]
    c = HP["n_embd"]
    expected = HP["n_layer"] * 4 * ((c + 3 * c) + (c + c))  # r * (in + out) for c_attn and c_proj
    assert info["trainable"] == expected == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert info["total"] == sum(p.numel() for p in tiny().parameters()) + expected
    assert count_parameters(model) == (expected, info["total"])
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, LoRALinear) and layer.scaling == 2.0 and not layer.weight.requires_grad
    assert not isinstance(model.lm_head, LoRALinear) and model.lm_head.weight is model.transformer.wte.weight


def test_globs_and_suffixes_select_layers():
    model = tiny()
    info = apply_lora(model, r=2, alpha=2, targets=["mlp.*", "h.0.attn.c_proj"])
    assert info["layers"] == ["transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj",
                              "transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(targets=["attn.qkv"]), "lora.targets pattern 'attn.qkv' matches no Linear layer; the layers are: "
                                 "transformer.h.*.attn.c_attn, transformer.h.*.attn.c_proj, transformer.h.*.mlp.c_fc, "
                                 "transformer.h.*.mlp.c_proj"),
    (dict(targets=["lm_head"]), "lm_head is tied to the token embedding"),
    (dict(targets=[]), "must be a non-empty list"),
    (dict(r=-1), "lora.r=-1 must be a positive integer"),
    (dict(r=2.5), "lora.r=2.5 must be a positive integer"),
    (dict(alpha=0), "lora.alpha=0 must be a positive number"),
    (dict(dropout=1.0), "lora.dropout=1.0 must be in [0, 1)"),
])
def test_bad_settings_are_one_line_user_errors(kwargs, message):
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError) as e:
        apply_lora(model, **{"r": 4, "alpha": 8, "targets": ["attn.c_attn"], **kwargs})
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # nothing was changed
    assert all(p.requires_grad for p in model.parameters()) and model.state_dict().keys() == before.keys()


def test_only_adapters_and_new_token_rows_train_old_rows_stay_bit_identical():
    model = tiny()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    info = apply_lora(model, r=4, alpha=8, targets=["attn.c_attn", "mlp.c_fc"], new_rows_from=17)  # 3 new tokens
    wte = model.transformer.wte.weight
    decay, no_decay = param_groups(model, 0.1)
    assert any(p is wte for p in no_decay["params"]) and not any(p is wte for p in decay["params"])
    assert info["trainable"] == 2 * 4 * ((16 + 48) + (16 + 64)) + 3 * 16
    train(model)
    after = model.state_dict()
    for k, v in base.items():
        if k in ("transformer.wte.weight", "lm_head.weight"):
            assert torch.equal(after[k][:17], v[:17]), k  # AdamW with decay did not move the old rows
            assert not torch.equal(after[k][17:], v[17:]), k
        else:
            assert torch.equal(after[k], v), k
    lora_keys = [k for k in after if k not in base]
    assert lora_keys and all(k.endswith((".lora_A", ".lora_B")) for k in lora_keys)
    assert all(after[k].abs().sum() > 0 for k in lora_keys if k.endswith("lora_B"))  # B moved off zero


def test_merged_model_gives_the_adapted_logits():
    model = tiny()
    apply_lora(model, r=4, alpha=16, targets=["attn.c_attn", "attn.c_proj", "mlp.*"], dropout=0.1)
    train(model)
    model.eval()
    x, _ = batch(seed=5)
    with torch.no_grad():
        adapted = model(x)[0]
        merged = merge_lora(model)
        assert merged is model and not any(isinstance(m, LoRALinear) for m in model.modules())
        assert type(model.transformer.h[0].attn.c_attn) is torch.nn.Linear
        assert not any("lora" in k for k in model.state_dict())
        assert torch.allclose(model(x)[0], adapted, atol=1e-5, rtol=0)
    assert all(p.requires_grad for p in model.parameters())
    assert model.lm_head.weight is model.transformer.wte.weight


def lora_checkpoint(path, model, lora=LORA, **extra):
    """What finetune.py writes for a LoRA run (model state with adapter keys, resolved config with `lora`)."""
    ckpt = {"model": model.state_dict(), "step": 3, "stage": "sft", "optimizer": {"state": {}, "param_groups": []},
            "tokenizer": {"type": "char", "chars": "abcdefghijklmnopqrst"},
            "config": {"model": model_config(model), "lora": dict(lora), "seed": 0}, **extra}
    return save_checkpoint(ckpt, path)


def trained_lora(cls=GPT, **extra):
    model = tiny(cls, **extra)
    apply_lora(model, **LORA, new_rows_from=18)
    loss_fn = None
    if cls is RewardModel:
        loss_fn = lambda m: -m.score(batch()[0], torch.tensor([10, 7, 3])).mean()  # noqa: E731
    train(model, loss_fn=loss_fn)
    return model.eval()


@pytest.mark.parametrize("cls, extra", [(GPT, {}), (RewardModel, {}), (Classifier, {"num_labels": 3})])
def test_model_from_checkpoint_rebuilds_and_merges_a_lora_checkpoint(tmp_path, cls, extra):
    model = trained_lora(cls, **extra)
    path = lora_checkpoint(tmp_path / "lora.pt", model)
    ckpt = load_checkpoint(path)
    assert any(k.endswith("lora_A") for k in ckpt["model"]) and ckpt["config"]["lora"]["r"] == 4
    plain = model_from_checkpoint(ckpt)
    assert type(plain) is cls and not plain.training
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    assert plain.state_dict().keys() == cls(**HP, **extra).state_dict().keys()
    x, _ = batch(seed=7)
    with torch.no_grad():
        assert torch.allclose(plain(x)[0], model(x)[0], atol=1e-5, rtol=0)
        if cls is RewardModel:
            lengths = torch.tensor([10, 4, 1])
            assert torch.allclose(plain.score(x, lengths), model.score(x, lengths), atol=1e-5)


def test_lora_checkpoint_without_alpha_is_refused(tmp_path):
    path = lora_checkpoint(tmp_path / "lora.pt", trained_lora(), lora={"r": 4})
    with pytest.raises(UserError, match="holds LoRA adapters but its config has no lora.alpha"):
        model_from_checkpoint(load_checkpoint(path))


def test_merge_cli_writes_a_plain_checkpoint(tmp_path, capsys):
    model = trained_lora()
    src = lora_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt", model)
    out = tmp_path / "merged.pt"
    assert lora_main(["merge", str(tmp_path / "run"), str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    merged = torch.load(out, weights_only=True)
    assert not any("lora" in k for k in merged["model"]) and "lora" not in merged["config"]
    assert merged["config"]["lora_merged"]["r"] == 4 and merged["config"]["lora_merged"]["source"] == str(src)
    assert "optimizer" not in merged and merged["step"] == 3 and merged["stage"] == "sft"
    plain = model_from_checkpoint(load_checkpoint(out))
    x, _ = batch(seed=9)
    with torch.no_grad():
        assert torch.allclose(plain(x)[0], model(x)[0], atol=1e-5, rtol=0)
    # a plain checkpoint, a missing file: one line, exit code 2, nothing written
    assert lora_main(["merge", str(out), str(tmp_path / "again.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no LoRA adapters" in err
    assert lora_main(["merge", str(tmp_path / "nope.pt"), str(tmp_path / "again.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err and not (tmp_path / "again.pt").exists()


# ---- stages with lora.r > 0 ---------------------------------------------------------------------------
def cfg(**lora):
    return OmegaConf.create({"lora": {**LORA, **lora}})


def pairs():
    return [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)}
            for a in range(3) for b in range(3)]


def step_and_check(objective, parent):
    """Apply LoRA as finetune.py does, take optimizer steps, check what moved; -> the LoRA summary."""
    model = objective.model
    base = {k: v.clone() for k, v in model.state_dict().items()}
    info = add_lora(cfg(), objective, parent)
    assert objective.model is model
    old_rows = parent["config"]["model"]["vocab_size"]
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2)
    for _ in range(3):
        loss, _ = objective.loss(model, objective.train_batch())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    after = model.state_dict()
    for k, v in base.items():
        if k.startswith("head."):  # trains in full (a Bradley-Terry head's bias gets no gradient: skip it)
            assert model.get_parameter(k).requires_grad and (k == "head.bias" or not torch.equal(after[k], v)), k
        elif k in ("transformer.wte.weight", "lm_head.weight"):
            assert torch.equal(after[k][:old_rows], v[:old_rows]), k
        else:
            assert torch.equal(after[k], v), k
    return info


def test_sft_with_lora_trains_the_new_chat_token_rows(tmp_path):
    from gpt.stages.sft import SFT

    parent = make_parent(tmp_path / "p.pt")
    data = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": p["prompt"], "completion": p["chosen"]} for p in pairs()])
    sft = SFT(parent, str(data), val_data=str(data), batch_size=4)
    w0 = sft.model.transformer.wte.weight.detach().clone()
    info = step_and_check(sft, parent)
    n_new = sft.tokenizer.vocab_size - parent["config"]["model"]["vocab_size"]
    assert n_new == 4 and info["trainable"] == 4 * ((16 + 48) + (16 + 16)) + n_new * 16
    assert not torch.equal(sft.model.transformer.wte.weight[-n_new:], w0[-n_new:])


def test_dpo_with_lora_trains_adapters_and_leaves_the_reference_alone(tmp_path):
    from gpt.stages.dpo import DPO

    parent = make_parent(tmp_path / "p.pt", chat=True, stage="sft")
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs())
    dpo = DPO(parent, str(data), val_data=str(data), batch_size=4, beta=0.5)
    ref = [p.clone() for p in dpo.reference.parameters()]
    step_and_check(dpo, parent)
    assert not any(isinstance(m, LoRALinear) for m in dpo.reference.modules())
    assert all(torch.equal(a, b) for a, b in zip(ref, dpo.reference.parameters()))
    assert not dpo.model.transformer.wte.weight.requires_grad  # no new tokens: the embedding stays frozen


def test_reward_with_lora_trains_the_head_and_adapters(tmp_path):
    from gpt.stages.reward import Reward

    parent = make_parent(tmp_path / "p.pt", chat=True, stage="sft")
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs())
    rm = Reward(parent, str(data), val_data=str(data), batch_size=4)
    info = step_and_check(rm, parent)
    assert info["trainable"] == 4 * ((16 + 48) + (16 + 16)) + 16 + 1  # adapters + head


def test_ppo_with_lora_trains_the_value_head_and_adapters_only(tmp_path):
    from gpt.stages.ppo import PPO

    parent = make_parent(tmp_path / "sft.pt", seed=1, chat=True, stage="sft")
    reward = make_parent(tmp_path / "rm.pt", seed=2, chat=True, model_cls=RewardModel, stage="reward")
    data = write_jsonl(tmp_path / "q.jsonl", [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(3)
                                              for b in range(3)])
    ppo = PPO(parent, str(data), reward_ckpt=reward["path"], val_data=str(data), prompts_per_rollout=4,
              minibatch_size=4, epochs=1, max_new_tokens=3)
    frozen = [p.clone() for m in (ppo.reference, ppo.reward_model) for p in m.parameters()]
    info = step_and_check(ppo, parent)
    assert info["trainable"] == 4 * ((16 + 48) + (16 + 16)) + 16 + 1  # adapters + value head
    assert all(torch.equal(a, b) for a, b in zip(frozen, [p for m in (ppo.reference, ppo.reward_model)
                                                          for p in m.parameters()]))
    assert not any(isinstance(m, LoRALinear) for m in (*ppo.reference.modules(), *ppo.reward_model.modules()))


def test_lora_off_changes_nothing(tmp_path):
    from gpt.stages.dpo import DPO

    parent = make_parent(tmp_path / "p.pt", chat=True, stage="sft")
    dpo = DPO(parent, str(write_jsonl(tmp_path / "pairs.jsonl", pairs())), batch_size=4)
    assert add_lora(cfg(r=0), dpo, parent) is None and add_lora(OmegaConf.create({}), dpo, parent) is None
    assert all(p.requires_grad for p in dpo.model.parameters())
    assert not any(isinstance(m, LoRALinear) for m in dpo.model.modules())


# ---- end to end -----------------------------------------------------------------------------------------
def runs(base: Path) -> list[Path]:
    return sorted(Path(p) for p in glob.glob(str(base / "outputs" / "*-*-*" / "*")))


def merge_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "gpt.lora", "merge", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.slow
def test_finetune_sft_with_lora_then_infer_and_merge(tmp_path):
    from gpt.tasks.arithmetic import write_task

    files = write_task(tmp_path / "task", n=200, seed=0, hi=20)
    proc = run_here("train.py", *TINY, "trainer.max_iters=10", "trainer.eval_interval=10", "data=text",
                      f"data.path={files['pretrain']}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (pre,) = runs(tmp_path)
    proc = run_here("finetune.py", "stage=sft", f"ckpt={pre}", f"data={files['sft_train']}",
                      f"data.val_path={files['sft_val']}", "lora.r=4", "lora.targets=[attn.c_attn,mlp.*]",
                      "trainer.max_iters=10", "trainer.eval_interval=10", "trainer.eval_iters=1",
                      "trainer.batch_size=8", "stage.eval_examples=4", "stage.num_samples=1",
                      "hardware.autocast_dtype=float32", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LoRA r=4 alpha=16 on 6 layers (transformer.h.*.attn.c_attn, transformer.h.*.mlp.c_fc, " \
           "transformer.h.*.mlp.c_proj)" in proc.stderr + proc.stdout
    (sft,) = set(runs(tmp_path)) - {pre}
    ckpt = torch.load(sft / "checkpoints" / "last.pt", weights_only=True)
    parent = torch.load(pre / "checkpoints" / "best.pt", weights_only=True)
    assert ckpt["config"]["lora"] == {"r": 4, "alpha": 16, "dropout": 0.0, "targets": ["attn.c_attn", "mlp.*"]}
    assert "transformer.h.0.attn.c_attn.lora_A" in ckpt["model"]
    n_old = parent["model"]["transformer.wte.weight"].shape[0]
    for k, v in parent["model"].items():  # the base weights did not move, except the new token rows
        if k in ("transformer.wte.weight", "lm_head.weight"):
            assert torch.equal(ckpt["model"][k][:n_old], v), k
        else:
            assert torch.equal(ckpt["model"][k], v), k
    answer = run_here("infer.py", f"ckpt={sft}", 'prompt="3+4="', "chat=true", "temperature=0",
                        "max_new_tokens=8", cwd=tmp_path)
    assert answer.returncode == 0 and answer.stdout.strip(), answer.stderr[-3000:]
    out = tmp_path / "merged.pt"
    proc = merge_cli(str(sft), str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = torch.load(out, weights_only=True)
    assert not any("lora" in k for k in merged["model"]) and merged["config"]["lora_merged"]["r"] == 4
    x = torch.randint(0, merged["config"]["model"]["vocab_size"], (2, 12))
    with torch.no_grad():  # the merged file and the LoRA run load as the same plain model
        a, b = (model_from_checkpoint(load_checkpoint(p))(x)[0] for p in (out, sft))
    assert torch.allclose(a, b, atol=1e-5, rtol=0)
    rm = run_here("finetune.py", "stage=reward", f"ckpt={sft}", f"data={files['pairs_train']}", "lora.r=2",
                    "trainer.max_iters=2", "trainer.eval_interval=2", "trainer.eval_iters=1",
                    "trainer.batch_size=4", cwd=tmp_path)  # a later stage starts from the LoRA run
    assert rm.returncode == 0, rm.stderr[-3000:]
    proc = run_here("finetune.py", "stage=sft", f"ckpt={pre}", f"data={files['sft_train']}", "lora.r=4",
                      "lora.targets=[attn.qkv]", cwd=tmp_path)
    assert proc.returncode == 2 and "lora.targets pattern 'attn.qkv' matches no Linear layer" in proc.stderr
    assert len(runs(tmp_path)) == 3  # the refused run left no folder


def test_an_adapter_on_a_layer_lora_never_adapts_is_refused(tmp_path):
    """A handed checkpoint with an adapter on lm_head (finetune.py never writes one: EXCLUDED) would wrap the
    output layer, whose padding rows a padded model must never score: refused in one line."""
    model = trained_lora()
    path = lora_checkpoint(tmp_path / "lora.pt", model)
    ckpt = torch.load(path, weights_only=True)
    C = ckpt["model"]["lm_head.weight"].size(1)
    ckpt["model"]["lm_head.lora_A"] = torch.zeros(4, C)
    ckpt["model"]["lm_head.lora_B"] = torch.zeros(ckpt["model"]["lm_head.weight"].size(0), 4)
    torch.save(ckpt, tmp_path / "tampered.pt")
    with pytest.raises(UserError, match="LoRA adapter on 'lm_head', a layer LoRA never adapts here") as e:
        model_from_checkpoint(load_checkpoint(tmp_path / "tampered.pt"))
    assert "\n" not in str(e.value)
