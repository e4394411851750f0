"""Export to / import from Hugging Face transformers' GPT-2 format, checked against GPT2LMHeadModel."""

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
