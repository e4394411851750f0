"""PEFT adapter export of a LoRA run (gpt/interop.py): peft loads the adapter onto the exported GPT-2 base
and gives our merged model's logits; --base is checked against the run's base weights; bad inputs are one line."""

import json

import pytest
import torch

from gpt.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from gpt.errors import UserError
from gpt.interop import base_checkpoint, export_hf, export_peft, main
from gpt.lora import apply_lora
from gpt.model import GPT
from gpt.parent import model_config

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

HP = dict(vocab_size=20, block_size=16, n_layer=2, n_head=2, n_embd=16, bias=True)
LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["attn.c_attn", "attn.c_proj", "mlp.c_fc"]}


def lora_run(tmp_path, new_rows_from=None):
    """A parent checkpoint and a LoRA checkpoint of it whose adapters (B != 0) moved in a few steps."""
    torch.manual_seed(0)
    model = GPT(**HP)
    parent = save_checkpoint({"model": model.state_dict(), "config": {"model": model_config(model)},
                              "tokenizer": {"type": "char", "chars": "abcdefghijklmnopqrst"}, "step": 0},
                             tmp_path / "parent.pt")
    apply_lora(model, **{k: v for k, v in LORA.items()}, new_rows_from=new_rows_from)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(0, 20, (4, 12), generator=torch.Generator().manual_seed(1))
    for _ in range(5):
        loss = model(x[:, :-1], x[:, 1:])[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = save_checkpoint({"model": model.state_dict(), "step": 5,
                            "tokenizer": {"type": "char", "chars": "abcdefghijklmnopqrst"},
                            "config": {"model": model_config(model), "lora": dict(LORA)}}, tmp_path / "lora.pt")
    return parent, path


def peft_logits(adapter_dir, base_dir, idx):
    base = transformers.GPT2LMHeadModel.from_pretrained(str(base_dir), torch_dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        return model(idx).logits


def test_peft_adapter_on_the_exported_base_gives_the_merged_logits(tmp_path):
    _, path = lora_run(tmp_path)
    assert main(["export-peft", str(path), str(tmp_path / "adapter")]) == 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["fan_in_fan_out"]) == (4, 8.0, True)
    assert config["target_modules"] == [f"transformer.h.{i}.{m}" for i in range(2)
                                        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc")]
    idx = torch.randint(0, 20, (2, 16), generator=torch.Generator().manual_seed(2))
    merged = model_from_checkpoint(load_checkpoint(path))
    base = model_from_checkpoint(base_checkpoint(load_checkpoint(path)))
    with torch.no_grad():
        ours, plain = merged(idx)[0], base(idx)[0]
    theirs = peft_logits(tmp_path / "adapter", config["base_model_name_or_path"], idx)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    assert (theirs - plain).abs().max() > 1e-2  # the adapter changes the output: the test is not vacuous


def test_base_is_the_parent_export_when_given(tmp_path):
    parent, path = lora_run(tmp_path)
    export_hf(str(parent), str(tmp_path / "parent_hf"))
    out = export_peft(str(path), str(tmp_path / "adapter"), base=str(tmp_path / "parent_hf"))
    assert not (out / "base").exists()
    idx = torch.randint(0, 20, (1, 16))
    with torch.no_grad():
        ours = model_from_checkpoint(load_checkpoint(path))(idx)[0]
    torch.testing.assert_close(peft_logits(out, tmp_path / "parent_hf", idx), ours, atol=1e-5, rtol=1e-5)


def test_a_base_with_other_weights_is_refused(tmp_path):
    _, path = lora_run(tmp_path, new_rows_from=17)  # the stage trained token rows 17..19: the parent differs
    parent_hf = export_hf(str(tmp_path / "parent.pt"), str(tmp_path / "parent_hf"))
    with pytest.raises(UserError, match="weight 'transformer.wte.weight' differs from the LoRA run's base"):
        export_peft(str(path), str(tmp_path / "adapter"), base=str(parent_hf))
    export_peft(str(path), str(tmp_path / "adapter"))  # its own base (with the trained rows) works
    idx = torch.randint(0, 20, (1, 16))
    with torch.no_grad():
        ours = model_from_checkpoint(load_checkpoint(path))(idx)[0]
    torch.testing.assert_close(peft_logits(tmp_path / "adapter", tmp_path / "adapter" / "base", idx), ours,
                               atol=1e-5, rtol=1e-5)


def test_a_plain_checkpoint_is_one_line(tmp_path, capsys):
    parent, _ = lora_run(tmp_path)
    assert main(["export-peft", str(parent), str(tmp_path / "adapter")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "holds no LoRA adapters" in err and "\n" not in err


# ---- a Llama-style base: our fused q/k/v and gate/up adapters as PEFT adapters of each projection -------------

LLAMA_HP = dict(vocab_size=20, block_size=16, n_layer=2, n_head=4, n_embd=16, n_kv_head=2, mlp_hidden=24, pos="rope",
                norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_peft_adapter_on_a_llama_base_gives_the_merged_logits(tmp_path, qk_norm):
    torch.manual_seed(0)
    model = GPT(**LLAMA_HP, qk_norm=qk_norm)
    lora = {**LORA, "targets": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]}
    apply_lora(model, **lora)
    with torch.no_grad():  # adapters that moved (B != 0), as after training
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0.0, 0.2)
    path = save_checkpoint({"model": model.state_dict(), "step": 1,
                            "tokenizer": {"type": "char", "chars": "abcdefghijklmnopqrst"},
                            "config": {"model": model_config(model), "lora": lora}}, tmp_path / "lora.pt")
    out = export_peft(str(path), str(tmp_path / "adapter"))
    config = json.loads((out / "adapter_config.json").read_text())
    projections = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                   "mlp.up_proj", "mlp.down_proj")
    assert config["target_modules"] == sorted(f"model.layers.{i}.{m}" for i in range(2) for m in projections)
    assert config["fan_in_fan_out"] is False
    base = transformers.AutoModelForCausalLM.from_pretrained(str(out / "base"), dtype=torch.float32)
    assert type(base).__name__ == ("Qwen3ForCausalLM" if qk_norm else "LlamaForCausalLM")
    peft_model = peft.PeftModel.from_pretrained(base, str(out)).eval()
    idx = torch.randint(0, 20, (2, 16), generator=torch.Generator().manual_seed(2))
    merged = model_from_checkpoint(load_checkpoint(path))
    plain = model_from_checkpoint(base_checkpoint(load_checkpoint(path)))
    with torch.no_grad():
        theirs, ours, before = peft_model(idx).logits, merged(idx)[0], plain(idx)[0]
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    assert (theirs - before).abs().max() > 1e-2  # the adapters change the output: the test is not vacuous
