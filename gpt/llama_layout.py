"""Which transformers class computes what a model computes (hf_architecture), and Llama-style models (pos=rope,
norm=rmsnorm, mlp=swiglu) under transformers' names: LlamaForCausalLM, and Qwen3ForCausalLM when the model has
QK-norm. Shared by the transformers, PEFT and GGUF exports and their imports.

Our attention computes q, k and v with one fused `attn.c_attn` (rows: q for H heads, then k and v for Hkv heads
each) and the gated MLP its gate and up with one fused `mlp.c_fc` (rows: gate, then up); transformers keeps each
as a Linear of its own. Each Part names a row range of one of our tensors, so one table splits on export and
concatenates on import. Both layouts keep a head's channels in the same order (rotary's rotate-half pairs i and
i + D/2, as transformers' apply_rotary_pos_emb does), so no tensor is permuted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpt.errors import UserError
from gpt.model import GPTConfig

LLAMA, QWEN3 = "LlamaForCausalLM", "Qwen3ForCausalLM"


def _yaml(value) -> str:
    return str(value).lower() if isinstance(value, bool) or value is None else str(value)


def hf_architecture(cfg: GPTConfig) -> str:
    """The transformers class that computes exactly what a model of `cfg` computes: GPT2LMHeadModel for learned
    positions, LlamaForCausalLM (Qwen3ForCausalLM with qk_norm) for rotary ones; a UserError naming the first
    option that class does not have."""
    if cfg.pos == "rope":
        arch = QWEN3 if cfg.qk_norm else LLAMA
        needs = {"norm": "rmsnorm", "mlp": "swiglu", "bias": False}
        other = "GPT2LMHeadModel needs model.pos=learned, model.norm=layernorm, model.mlp=gelu"
    else:
        arch = "GPT2LMHeadModel"
        needs = {"norm": "layernorm", "mlp": "gelu", "qk_norm": False, "tie_embeddings": True,
                 "n_kv_head": cfg.n_head, "mlp_hidden": 4 * cfg.n_embd}
        other = "LlamaForCausalLM needs model.pos=rope, model.norm=rmsnorm, model.mlp=swiglu, model.bias=false"
    for key, want in needs.items():
        have = getattr(cfg, key)
        if have != want:
            raise UserError(f"model.{key}={_yaml(have)} has no transformers equivalent with model.pos={cfg.pos}: "
                            f"{arch} needs model.{key}={_yaml(want)} ({other}); train the model with those options "
                            f"to export it")
    return arch


@dataclass(frozen=True)
class Part:
    ours: str  # our state-dict key
    theirs: str  # transformers' state-dict key
    rows: tuple[int, int] | None = None  # the rows of `ours` it holds; None: the whole tensor


def llama_parts(cfg: GPTConfig) -> list[Part]:
    """Every tensor of a Llama-style model of `cfg`, in transformers' order; lm_head only when untied (tied,
    transformers reuses model.embed_tokens)."""
    H, Hkv, D, F = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.mlp_hidden
    parts = [Part("transformer.wte.weight", "model.embed_tokens.weight")]
    for i in range(cfg.n_layer):
        o, t = f"transformer.h.{i}.", f"model.layers.{i}."
        parts += [Part(o + "ln_1.weight", t + "input_layernorm.weight"),
                  Part(o + "attn.c_attn.weight", t + "self_attn.q_proj.weight", (0, H * D)),
                  Part(o + "attn.c_attn.weight", t + "self_attn.k_proj.weight", (H * D, (H + Hkv) * D)),
                  Part(o + "attn.c_attn.weight", t + "self_attn.v_proj.weight", ((H + Hkv) * D, (H + 2 * Hkv) * D)),
                  Part(o + "attn.c_proj.weight", t + "self_attn.o_proj.weight")]
        if cfg.qk_norm:
            parts += [Part(o + "attn.q_norm.weight", t + "self_attn.q_norm.weight"),
                      Part(o + "attn.k_norm.weight", t + "self_attn.k_norm.weight")]
        parts += [Part(o + "ln_2.weight", t + "post_attention_layernorm.weight"),
                  Part(o + "mlp.c_fc.weight", t + "mlp.gate_proj.weight", (0, F)),
                  Part(o + "mlp.c_fc.weight", t + "mlp.up_proj.weight", (F, 2 * F)),
                  Part(o + "mlp.c_proj.weight", t + "mlp.down_proj.weight")]
    parts.append(Part("transformer.ln_f.weight", "model.norm.weight"))
    if not cfg.tie_embeddings:
        parts.append(Part("lm_head.weight", "lm_head.weight"))
    return parts


def split(sd: dict[str, torch.Tensor], parts: list[Part]) -> dict[str, torch.Tensor]:
    """Our state dict -> transformers' tensors (contiguous float32 copies)."""
    out = {}
    for p in parts:
        t = sd[p.ours]
        out[p.theirs] = (t[p.rows[0]:p.rows[1]] if p.rows else t).detach().float().contiguous()
    return out


def join(theirs: dict[str, torch.Tensor], parts: list[Part]) -> dict[str, torch.Tensor]:
    """transformers' tensors -> ours: the row parts of a fused tensor concatenated in order. The caller checks
    that every `theirs` key is present and of the right shape."""
    pieces: dict[str, list[torch.Tensor]] = {}
    for p in parts:
        pieces.setdefault(p.ours, []).append(theirs[p.theirs])
    return {name: ts[0] if len(ts) == 1 else torch.cat(ts, dim=0) for name, ts in pieces.items()}


def part_shapes(parts: list[Part], ours: dict[str, torch.Size]) -> dict[str, tuple[int, ...]]:
    """The shape each transformers tensor must have, from the shapes of our tensors."""
    return {p.theirs: ((p.rows[1] - p.rows[0], *ours[p.ours][1:]) if p.rows else tuple(ours[p.ours])) for p in parts}
