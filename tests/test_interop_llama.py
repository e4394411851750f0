"""Llama-style models (pos=rope, norm=rmsnorm, mlp=swiglu) to and from transformers (gpt/interop.py): the export
loads as LlamaForCausalLM (Qwen3ForCausalLM with qk_norm) and gives our logits and greedy text, an import gives
the folder's logits, options no transformers class computes are refused in one line."""

import json

import pytest
import torch

from gpt.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from gpt.errors import UserError
from gpt.generate import generate_batch
from gpt.interop import export_hf, import_hf, main
from gpt.model import GPT
from gpt.parent import model_config

transformers = pytest.importorskip("transformers")

CHARS = "abcdefghijklmnopqrstuvwxyz"
LLAMA = dict(vocab_size=len(CHARS), block_size=32, n_layer=2, n_head=4, n_embd=32, mlp_hidden=48, pos="rope",
             rope_theta=500.0, norm="rmsnorm", mlp="swiglu", bias=False)
# (n_kv_head, tie_embeddings, qk_norm): multi-head and grouped-query, tied and untied, Llama and Qwen3
SHAPES = [(4, True, False), (2, False, False), (1, True, True), (2, False, True)]


def llama_checkpoint(tmp_path, n_kv_head=2, tie=False, qk_norm=False, seed=0, **over):
    """A random tiny Llama-style checkpoint with random norm gains (a skipped or misplaced norm shows)."""
    torch.manual_seed(seed)
    model = GPT(**{**LLAMA, **over}, n_kv_head=n_kv_head, tie_embeddings=tie, qk_norm=qk_norm)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(1.0, 0.3)
    path = save_checkpoint({"model": model.state_dict(), "config": {"model": model_config(model)},
                            "tokenizer": {"type": "char", "chars": CHARS}, "step": 0}, tmp_path / "llama.pt")
    return model.eval(), path


def idx(n=2, t=20, seed=3):
    return torch.randint(0, len(CHARS), (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n_kv_head, tie, qk_norm", SHAPES)
def test_export_loads_in_transformers_with_our_logits_and_greedy_text(tmp_path, n_kv_head, tie, qk_norm):
    model, path = llama_checkpoint(tmp_path, n_kv_head, tie, qk_norm)
    out = export_hf(str(path), str(tmp_path / "hf"))
    cfg = json.loads((out / "config.json").read_text())
    arch = "Qwen3ForCausalLM" if qk_norm else "LlamaForCausalLM"
    assert cfg["architectures"] == [arch]
    sizes = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_key_value_heads"], cfg["head_dim"]
    assert sizes == (32, 48, n_kv_head, 8)
    rope_norm = cfg["rope_theta"], cfg["rms_norm_eps"], cfg["tie_word_embeddings"], cfg["max_position_embeddings"]
    assert rope_norm == (500.0, 1e-5, tie, 32)
    assert cfg["attention_bias"] is False and cfg.get("mlp_bias", False) is False
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert type(hf).__name__ == arch
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == tie
    x = idx()
    with torch.no_grad():
        theirs, ours = hf(x).logits, model(x)[0]
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    prompt = x[0, :5].tolist()
    mine = generate_batch(model, [prompt], 20, temperature=0.0)[0]
    with torch.no_grad():
        p = torch.tensor([prompt])  # an explicit mask: without one, generate() masks the ids equal to pad_token_id
        gen = hf.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=20, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
    assert gen[0, 5:].tolist() == mine


def test_the_llama_nano_preset_exports_as_llama(tmp_path):
    from pathlib import Path

    from omegaconf import OmegaConf

    import gpt

    node = OmegaConf.to_container(OmegaConf.load(Path(gpt.__file__).parent / "conf" / "model" / "llama_nano.yaml"))
    node = {k: v for k, v in node.items() if k != "_target_"}
    torch.manual_seed(0)
    model = GPT(**{**node, "vocab_size": len(CHARS), "n_layer": 1, "n_embd": 64})
    path = save_checkpoint({"model": model.state_dict(), "config": {"model": model_config(model)},
                            "tokenizer": {"type": "char", "chars": CHARS}, "step": 0}, tmp_path / "nano.pt")
    out = export_hf(str(path), str(tmp_path / "hf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.num_key_value_heads == 2
    with torch.no_grad():
        torch.testing.assert_close(hf(idx()).logits, model.eval()(idx())[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n_kv_head, tie, qk_norm", SHAPES[1:3])
def test_round_trip_keeps_every_weight(tmp_path, n_kv_head, tie, qk_norm):
    model, path = llama_checkpoint(tmp_path, n_kv_head, tie, qk_norm)
    export_hf(str(path), str(tmp_path / "hf"))
    back = load_checkpoint(import_hf(str(tmp_path / "hf"), str(tmp_path / "back.pt")))
    want = {k: v for k, v in model_config(model).items() if k != "activation_checkpointing"}  # a training setting
    assert back["config"]["model"] == want
    assert back["tokenizer"] == {"type": "char", "chars": CHARS}
    again = model_from_checkpoint(back)
    theirs = again.state_dict()
    for name, t in model.state_dict().items():
        assert torch.equal(theirs[name], t), name
    with torch.no_grad():
        assert torch.equal(again(idx())[0], model(idx())[0])


def tokenizer_file(folder):
    (folder / "gpt_pipeline_tokenizer.json").write_text(json.dumps({"type": "char", "chars": CHARS}))


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_import_of_a_fresh_transformers_model(tmp_path, arch):
    torch.manual_seed(1)
    common = dict(vocab_size=len(CHARS), hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, rms_norm_eps=1e-5,
                  tie_word_embeddings=False)
    if arch == "llama":
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, rope_theta=1000.0)).eval()
    else:
        hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, head_dim=8, rope_theta=1000.0)).eval()
    with torch.no_grad():  # random gains: transformers initialises every norm to ones
        for name, p in hf.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0, 0.3)
    hf.save_pretrained(tmp_path / "hf")
    with pytest.raises(UserError, match="has no gpt_pipeline_tokenizer.json"):  # its own tokenizer is not ours
        import_hf(str(tmp_path / "hf"), str(tmp_path / "x.pt"))
    tokenizer_file(tmp_path / "hf")
    ckpt = load_checkpoint(import_hf(str(tmp_path / "hf"), str(tmp_path / "imported.pt")))
    node = ckpt["config"]["model"]
    assert (node["n_kv_head"], node["mlp_hidden"], node["rope_theta"], node["qk_norm"]) == (2, 40, 1000.0, arch == "qwen3")
    ours = model_from_checkpoint(ckpt)
    with torch.no_grad():
        torch.testing.assert_close(ours(idx())[0], hf(idx()).logits, atol=1e-4, rtol=1e-4)


# ---- what has no transformers class is refused in one line ---------------------------------------------

@pytest.mark.parametrize("over, message", [
    (dict(norm="layernorm"), "model.norm=layernorm has no transformers equivalent with model.pos=rope: "
                             "LlamaForCausalLM needs model.norm=rmsnorm"),
    (dict(mlp="relu2"), "model.mlp=relu2 has no transformers equivalent"),
    (dict(mlp="gelu"), "LlamaForCausalLM needs model.mlp=swiglu"),
    (dict(bias=True), "model.bias=true has no transformers equivalent with model.pos=rope"),
    (dict(pos="learned"), "GPT2LMHeadModel needs model.norm=layernorm"),
    (dict(pos="learned", norm="layernorm", mlp="gelu", tie=True), "GPT2LMHeadModel needs model.n_kv_head=4"),
    (dict(pos="learned", norm="layernorm", mlp="gelu", mlp_hidden=128, n_kv_head=4, tie=False),
     "GPT2LMHeadModel needs model.tie_embeddings=true"),
    (dict(pos="learned", norm="layernorm", mlp="gelu", mlp_hidden=128, n_kv_head=4, tie=True, qk_norm=True),
     "GPT2LMHeadModel needs model.qk_norm=false"),
    (dict(pos="learned", norm="layernorm", mlp="gelu", mlp_hidden=64, n_kv_head=4, tie=True),
     "GPT2LMHeadModel needs model.mlp_hidden=128"),
])
def test_options_without_a_transformers_class_are_refused(tmp_path, capsys, over, message):
    over = {"n_kv_head": 2, "tie": False, **over}
    _, path = llama_checkpoint(tmp_path, **over)
    assert main(["export", str(path), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "hf" / "model.safetensors").exists()


def exported(tmp_path, qk_norm=False):
    _, path = llama_checkpoint(tmp_path, qk_norm=qk_norm)
    return export_hf(str(path), str(tmp_path / "hf"))


@pytest.mark.parametrize("edit, message", [
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling={'rope_type': 'llama3'"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0}}, "is not plain rotary"),
    ({"rope_theta": 1000.0}, "rope_theta=1000.0 and rope_parameters.rope_theta=500.0 differ"),
    ({"rope_theta": "1e4", "rope_parameters": None}, "rope_theta='1e4' must be a number"),
    ({"head_dim": 16}, "head_dim=16 (this GPT's head size is hidden_size / num_attention_heads = 8)"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' (SwiGLU uses silu)"),
    ({"attention_bias": True}, "attention_bias other than false"),
    ({"mlp_bias": True}, "mlp_bias other than false"),
    ({"sliding_window": 8}, "sliding_window=8 (sliding-window attention)"),
    ({"rms_norm_eps": 1e-6}, "rms_norm_eps=1e-06 (RMSNorm uses 1e-05)"),
    ({"num_key_value_heads": 3}, "num_key_value_heads=3 does not divide num_attention_heads=4"),
    ({"num_key_value_heads": 8}, "num_key_value_heads=8 must be an integer in [1, 4]"),
    ({"intermediate_size": 64}, "'model.layers.0.mlp.gate_proj.weight' is torch.float32 (48, 32), config.json implies (64, 32)"),
    ({"architectures": ["Qwen3ForCausalLM"]}, "architectures=['Qwen3ForCausalLM'] is not one of ['LlamaForCausalLM']"),
    ({"max_position_embeddings": {"_target_": "os.system"}}, "max_position_embeddings={'_target_'"),
])
def test_import_checks_every_llama_config_value(tmp_path, edit, message):
    out = exported(tmp_path)
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, **edit}))
    with pytest.raises(UserError) as err:
        import_hf(str(out), str(tmp_path / "x.pt"))
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert not (tmp_path / "x.pt").exists()


def test_qwen3_sliding_window_is_refused(tmp_path):
    out = exported(tmp_path, qk_norm=True)
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "use_sliding_window": True, "sliding_window": 8}))
    with pytest.raises(UserError, match=r"sliding_window=8 \(sliding-window attention\)"):
        import_hf(str(out), str(tmp_path / "x.pt"))


def test_a_missing_tensor_is_one_line(tmp_path):
    from safetensors.torch import load_file, save_file

    out = exported(tmp_path)
    sd = load_file(str(out / "model.safetensors"))
    del sd["model.layers.1.self_attn.v_proj.weight"]
    save_file(sd, str(out / "model.safetensors"))
    with pytest.raises(UserError, match="weight 'model.layers.1.self_attn.v_proj.weight' is missing"):
        import_hf(str(out), str(tmp_path / "x.pt"))
