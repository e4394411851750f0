"""Export to / import from Hugging Face transformers' GPT-2 format, checked against GPT2LMHeadModel."""

import json

import pytest
import torch

from gpt.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from gpt.errors import UserError
from gpt.interop import export_hf, import_hf
from gpt.model import GPT

transformers = pytest.importorskip("transformers")


def tiny_checkpoint(tmp_path, bias):
    torch.manual_seed(0)
    cfg = dict(vocab_size=50257, block_size=32, n_layer=2, n_head=2, n_embd=16, dropout=0.0, bias=bias)
    model = GPT(**cfg)
    with torch.no_grad():  # random biases and LayerNorm gains, so a transposition or a skipped tensor shows
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(0.0, 0.5 if "ln" not in name else 0.1).add_(1.0 if name.endswith("ln_1.weight") else 0.0)
    path = save_checkpoint({"model": model.state_dict(), "config": {"model": {"_target_": "gpt.model.GPT", **cfg}},
                            "tokenizer": {"type": "tiktoken", "name": "gpt2"}, "step": 0}, tmp_path / "tiny.pt")
    return model.eval(), path


@pytest.mark.parametrize("bias", [True, False])
def test_export_matches_gpt2lmheadmodel(tmp_path, bias):
    model, path = tiny_checkpoint(tmp_path, bias)
    out = export_hf(str(path), str(tmp_path / "hf"))
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(out)).eval()
    idx = torch.randint(0, 50257, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx)[0], atol=1e-4, rtol=1e-4)
    tok = transformers.GPT2Tokenizer.from_pretrained(str(out))  # vocab.json + merges.txt were written
    assert tok.encode("hello world") == [31373, 995]


def test_import_of_a_transformers_model(tmp_path):
    torch.manual_seed(1)
    cfg = transformers.GPT2Config(vocab_size=50257, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    ckpt_path = import_hf(str(tmp_path / "hf"), str(tmp_path / "imported.pt"))
    ours = model_from_checkpoint(load_checkpoint(ckpt_path))
    idx = torch.randint(0, 50257, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], hf(idx).logits, atol=1e-4, rtol=1e-4)


def test_round_trip_keeps_logits(tmp_path):
    model, path = tiny_checkpoint(tmp_path, bias=False)
    export_hf(str(path), str(tmp_path / "hf"))
    back = model_from_checkpoint(load_checkpoint(import_hf(str(tmp_path / "hf"), str(tmp_path / "back.pt"))))
    idx = torch.randint(0, 50257, (1, 32))
    with torch.no_grad():
        torch.testing.assert_close(back(idx)[0], model(idx)[0], atol=1e-5, rtol=1e-5)


def test_import_refuses_a_folder_without_a_model(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        import_hf(str(tmp_path), str(tmp_path / "x.pt"))


# ---- what a new user meets: dependencies, special token ids, file modes, bad folders ----------------------

def test_safetensors_is_a_declared_dependency():
    import tomllib
    from pathlib import Path

    deps = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    assert any(d.replace(" ", "").startswith("safetensors") for d in deps["dependencies"])  # not an extra


def char_checkpoint(tmp_path, special=()):
    from gpt.tokenizer import CharTokenizer

    tok = CharTokenizer("abc\n", list(special))
    torch.manual_seed(0)
    cfg = dict(vocab_size=tok.vocab_size, block_size=8, n_layer=1, n_head=2, n_embd=8)
    model = GPT(**cfg)
    return save_checkpoint({"model": model.state_dict(), "config": {"model": {"_target_": "gpt.model.GPT", **cfg}},
                            "tokenizer": tok.identity(), "step": 0}, tmp_path / "char.pt"), tok


@pytest.mark.parametrize("special, bos, eos", [
    ((), None, None),                                        # a plain char model has no special tokens
    (("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), None, 7),  # a chat model ends at <|end|>
    (("<|endoftext|>", "<|bos|>"), 5, 4),                    # stage=completion's begin and end of text
])
def test_exported_special_ids_are_the_tokenizers_own(tmp_path, special, bos, eos):
    import json

    path, tok = char_checkpoint(tmp_path, special)
    out = export_hf(str(path), str(tmp_path / "hf"))
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (bos, eos) and cfg["vocab_size"] == tok.vocab_size
    assert all(i is None or 0 <= i < tok.vocab_size for i in (cfg["bos_token_id"], cfg["eos_token_id"]))
    if eos is not None:
        assert tok.decode([eos]) in ("<|end|>", "<|endoftext|>")
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(out))  # transformers accepts the config
    assert hf.config.eos_token_id == eos


def test_gpt2_bpe_export_keeps_end_of_text(tmp_path):
    import json

    _, path = tiny_checkpoint(tmp_path, bias=True)
    cfg = json.loads((export_hf(str(path), str(tmp_path / "hf")) / "config.json").read_text())
    assert cfg["bos_token_id"] == cfg["eos_token_id"] == 50256


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_exported_files_respect_the_umask(tmp_path, umask):
    import os
    import stat

    path, _ = char_checkpoint(tmp_path)
    old = os.umask(umask)
    try:
        out = export_hf(str(path), str(tmp_path / "hf"))
    finally:
        os.umask(old)
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"] == 0o666 & ~umask, modes
    assert not [f for f in out.iterdir() if f.name.startswith(".")]  # no probe file left behind


def hf_folder(tmp_path):
    """A tiny exported folder to break in the tests below."""
    path, _ = char_checkpoint(tmp_path)
    return export_hf(str(path), str(tmp_path / "hf"))


@pytest.mark.parametrize("edit, message", [
    ({"model_type": "llama"}, "architectures=['GPT2LMHeadModel'] is not one of ['LlamaForCausalLM']"),
    ({"model_type": "bert"}, "holds a 'bert' model; only GPT-2"),
    ({"architectures": ["LlamaForCausalLM"]}, "architectures=['LlamaForCausalLM'] is not one of"),
    ({"architectures": "GPT2LMHeadModel"}, "architectures=GPT2LMHeadModel is not one of"),
    ({"n_layer": "2"}, "n_layer='2' must be an integer"),
    ({"n_layer": 2.0}, "n_layer=2.0 must be an integer"),
    ({"n_layer": True}, "n_layer=True must be an integer"),
    ({"n_layer": 10**9}, "n_layer=1000000000 must be an integer in [1, 1024]"),
    ({"vocab_size": -1}, "vocab_size=-1 must be an integer"),
    ({"n_embd": {"_target_": "os.system", "_args_": ["touch __marker__"]}}, "n_embd={'_target_'"),
    ({"n_head": 3}, "n_embd=8 is not divisible by n_head=3"),
    ({"n_inner": 7}, "n_inner=7 (the MLP is 4 * n_embd wide)"),
    ({"layer_norm_epsilon": 0.1}, "layer_norm_epsilon=0.1"),
    ({"tie_word_embeddings": False}, "tie_word_embeddings"),
    ({"activation_function": "relu"}, "uses activation 'relu'"),
    ({"n_positions": 4}, "'transformer.wpe.weight' is torch.float32 (8, 8), config.json implies (4, 8)"),
])
def test_import_checks_every_config_value(tmp_path, edit, message):
    import json

    out = hf_folder(tmp_path)
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, **edit}))
    with pytest.raises(UserError, match=None) as err:
        import_hf(str(out), str(tmp_path / "x.pt"))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "__marker__").exists()


@pytest.mark.parametrize("name, content, message", [
    ("config.json", "{not json", "config.json is not valid JSON"),
    ("config.json", "[1, 2]", "config.json holds a list, not an object"),
    ("config.json", b"\xff\xfe{}", "config.json is not valid JSON"),
    ("gpt_pipeline_tokenizer.json", '{"_target_": "os.system", "_args_": ["true"]}', "is not a tokenizer identity"),
    ("gpt_pipeline_tokenizer.json", '{"type": "char", "chars": ["a"]}', "is not a tokenizer identity"),
    ("gpt_pipeline_tokenizer.json", '{"type": "tiktoken", "name": "r50k_base"}', "names tiktoken encoding 'r50k_base'"),
    ("gpt_pipeline_tokenizer.json", '{"type": "tiktoken", "name": "gpt2"}', "50257 tokens, more than config.json"),
    ("model.safetensors", b"garbage", "the weights file could not be read as tensors"),
])
def test_import_refuses_a_bad_folder_in_one_line(tmp_path, name, content, message):
    out = hf_folder(tmp_path)
    target = out / name
    target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content)
    with pytest.raises(UserError) as err:
        import_hf(str(out), str(tmp_path / "x.pt"))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "x.pt").exists()


def test_import_cli_prints_one_error_line(tmp_path, capsys):
    from gpt.interop import main

    out = hf_folder(tmp_path)
    (out / "config.json").write_text('{"model_type": "bert"}')
    assert main(["import", str(out), str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "only GPT-2 models" in err


def test_char_model_round_trips_with_its_tokenizer(tmp_path):
    path, tok = char_checkpoint(tmp_path, ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"))
    out = export_hf(str(path), str(tmp_path / "hf"))
    back = load_checkpoint(import_hf(str(out), str(tmp_path / "back.pt")))
    assert back["tokenizer"] == tok.identity()
    idx = torch.tensor([[0, 1, 2, 7]])
    with torch.no_grad():
        torch.testing.assert_close(model_from_checkpoint(back)(idx)[0],
                                   model_from_checkpoint(load_checkpoint(path))(idx)[0], atol=1e-5, rtol=1e-5)


def test_a_missing_safetensors_is_one_line(tmp_path, monkeypatch):
    import sys

    path, _ = char_checkpoint(tmp_path)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # import fails as if not installed
    with pytest.raises(UserError, match=r"safetensors package is missing; run `pip install -e \.`"):
        export_hf(str(path), str(tmp_path / "hf"))


# ---- the exported folder as transformers' pipelines and vLLM read it -----------------------------------

def test_exported_chat_model_runs_in_transformers_pipeline_with_our_ids_and_greedy_text(tmp_path):
    """A char chat model exported: AutoTokenizer gives our ids for text and for a chat (apply_chat_template ==
    gpt.chat.encode_chat), and transformers' text-generation pipeline, greedy, writes the text our engine writes."""
    from gpt.chat import SPECIAL, encode_chat
    from gpt.generate import generate_batch

    path, tok = char_checkpoint(tmp_path, SPECIAL)
    out = export_hf(str(path), str(tmp_path / "hf"))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).is_file(), name
    from gpt.export_meta import CHAT_TEMPLATE

    # tokenizer_config.json as transformers 4 (and the vLLM releases on it) reads it: the chat template in it, a
    # class and special-token key that version knows (checked by hand with transformers 4.57.1: our ids)
    settings = json.loads((out / "tokenizer_config.json").read_text())
    assert settings["chat_template"] == CHAT_TEMPLATE and settings["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert settings["additional_special_tokens"] == list(SPECIAL) and "extra_special_tokens" not in settings
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert hf_tok("ab\nca").input_ids == tok.encode("ab\nca")
    messages = [{"role": "system", "content": "ab"}, {"role": "user", "content": "c\nab"}]
    chat = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert list(chat["input_ids"]) == encode_chat(tok, messages, generation_prompt=True)[0]
    # as serve.py takes them: "developer" is the system role, a list of text parts is their text joined
    newer = [{"role": "developer", "content": "ab"}, {"role": "user", "content": [{"type": "text", "text": "c\n"},
                                                                                  {"type": "text", "text": "ab"}]}]
    chat = hf_tok.apply_chat_template(newer, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert list(chat["input_ids"]) == encode_chat(tok, messages, generation_prompt=True)[0]
    with pytest.raises(Exception, match="role tool is not one of"):  # serve.py answers 400 for these too
        hf_tok.apply_chat_template([{"role": "tool", "content": "ab"}], tokenize=True)
    with pytest.raises(Exception, match="type image_url is not text"):
        hf_tok.apply_chat_template([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
                                   tokenize=True)
    model = model_from_checkpoint(load_checkpoint(path)).eval()
    ours = generate_batch(model, [tok.encode("ab")], 5, temperature=0.0, eot_id=tok.special_id("<|end|>"))[0]
    pipe = transformers.pipeline("text-generation", model=str(out), tokenizer=str(out), device="cpu")
    text = pipe("ab", max_new_tokens=5, do_sample=False, return_full_text=False)[0]["generated_text"]
    assert text == tok.decode([t for t in ours if t < tok.base_vocab_size]), (text, ours)


def test_exported_gpt2_bpe_tokenizer_gives_our_ids_and_chat_template(tmp_path):
    import json

    from gpt.chat import SPECIAL, encode_chat
    from gpt.interop import hf_tokenizer
    from gpt.tokenizer import from_identity

    tok = from_identity({"type": "tiktoken", "name": "gpt2", "special": list(SPECIAL)})
    fast = hf_tokenizer(tok, 64)
    fast.save_pretrained(str(tmp_path / "tok"))
    loaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    text = " hello world  héllo 世界\n\n  end"
    assert loaded(text).input_ids == tok.encode(text)
    messages = [{"role": "user", "content": text}, {"role": "assistant", "content": " ok"}, {"role": "user", "content": "x"}]
    chat = loaded.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert list(chat["input_ids"]) == encode_chat(tok, messages, generation_prompt=True)[0]
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert "<|assistant|>" in config.get("chat_template", "") or (tmp_path / "tok" / "chat_template.jinja").is_file()
