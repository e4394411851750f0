"""A decoder-only Transformer: pre-norm blocks of causal self-attention (scaled_dot_product_attention)
and an MLP. The defaults are GPT-2 (learned positions, LayerNorm, GELU MLP, tied input/output embeddings);
config keys choose the modern parts (Llama / nanochat style): rotary positions (`pos=rope`), RMSNorm,
SwiGLU or ReLU^2 MLPs, QK-norm, grouped-query attention (`n_kv_head`) and untied embeddings. Each option
is a value looked up in a table here (NORMS, MLPS), never a model name.

Shapes: B batch, T time (sequence), C channels (n_embd), H heads, Hkv key/value heads, D head size (C // H),
F MLP hidden width, V vocab.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from gpt import native
from gpt.errors import UserError


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int = 256
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = False  # biases in Linear and LayerNorm (GPT-2 has them; without is a bit faster)
    loss_chunk_size: int = 4096  # rows per chunk of the fused output-layer + cross-entropy (0: unfused)
    attn_impl: str = "sdpa"  # "sdpa" (F.scaled_dot_product_attention) or "eager" (explicit softmax(QK^T)V)
    activation_checkpointing: bool = False  # training: keep each block's input only, recompute it in backward
    pos: str = "learned"  # "learned" (GPT-2: a position embedding table) or "rope" (rotary, applied to q and k)
    rope_theta: float = 10000.0  # rotary base: position p turns pair i by p * theta^(-2i/D)
    norm: str = "layernorm"  # "layernorm" or "rmsnorm" (both with a gain; LayerNorm's bias follows `bias`)
    mlp: str = "gelu"  # "gelu" (GPT-2), "swiglu" (Llama: silu(gate) * up) or "relu2" (relu(x)^2)
    mlp_hidden: int | None = None  # F; None: 4C (gelu, relu2), or 8C/3 rounded up to a multiple of 64 (swiglu)
    qk_norm: bool = False  # normalise each head's queries and keys (the model's norm over D) before rotary
    n_kv_head: int | None = None  # key/value heads (grouped-query attention); None: n_head (multi-head)
    tie_embeddings: bool = True  # the output layer shares the token embedding's weights
    vocab_multiple: int = 1  # embedding / output rows rounded up to a multiple of this (64: GPU-friendly matmuls)

    def __post_init__(self):
        for key in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise UserError(f"model.{key}={value!r} must be a positive integer")
        if self.n_embd % self.n_head:
            raise UserError(
                f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}; "
                f"choose n_embd as a multiple of n_head (e.g. n_embd={self.n_head * max(1, round(self.n_embd / self.n_head))})"
            )
        if self.attn_impl not in ("sdpa", "eager"):
            raise UserError(f"model.attn_impl={self.attn_impl!r} must be 'sdpa' or 'eager'")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model.dropout={self.dropout} must be in [0, 1)")
        for key in ("activation_checkpointing", "qk_norm", "tie_embeddings"):
            if not isinstance(getattr(self, key), bool):
                raise UserError(f"model.{key}={getattr(self, key)!r} must be true or false")
        for key, table in (("pos", POSITIONS), ("norm", NORMS), ("mlp", MLPS)):
            if getattr(self, key) not in table:
                raise UserError(f"model.{key}={getattr(self, key)!r} must be one of {', '.join(table)}")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if not isinstance(self.n_kv_head, int) or self.n_kv_head <= 0 or self.n_head % self.n_kv_head:
            divisors = [d for d in range(1, self.n_head + 1) if self.n_head % d == 0]
            raise UserError(f"model.n_kv_head={self.n_kv_head!r} must divide model.n_head={self.n_head} "
                            f"(one of {divisors}), or be null for n_head")
        if self.pos == "rope" and self.head_dim % 2:
            raise UserError(f"model.pos=rope needs an even head size, not n_embd/n_head={self.head_dim}; "
                            f"change model.n_embd or model.n_head")
        if not isinstance(self.rope_theta, (int, float)) or isinstance(self.rope_theta, bool) or not self.rope_theta > 1:
            raise UserError(f"model.rope_theta={self.rope_theta!r} must be a number above 1 (e.g. 10000)")
        if self.mlp_hidden is None:
            self.mlp_hidden = 4 * self.n_embd if self.mlp != "swiglu" else -(-8 * self.n_embd // 3 // 64) * 64
        if not isinstance(self.mlp_hidden, int) or isinstance(self.mlp_hidden, bool) or self.mlp_hidden <= 0:
            raise UserError(f"model.mlp_hidden={self.mlp_hidden!r} must be a positive integer or null")
        m = self.vocab_multiple
        if not isinstance(m, int) or isinstance(m, bool) or not 1 <= m <= MAX_VOCAB_MULTIPLE:
            raise UserError(f"model.vocab_multiple={m!r} must be an integer in 1..{MAX_VOCAB_MULTIPLE} "
                            f"(1: no padding; 64 pads GPT-2's 50257 to 50304)")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and output layer: vocab_size rounded up to a multiple of vocab_multiple. The
        padding rows are never looked up and never scored: logits and the loss cover the first vocab_size ids."""
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple


MAX_VOCAB_MULTIPLE = 4096  # a file cannot make us allocate an embedding of an arbitrary size through padding


class KVCache:
    """Preallocated keys and values for every layer: (n_layer, B, H, max_len, D) each.

    Uniform (`lens` None): every row holds `pos` positions; attention layers write their new keys and values
    at [pos, pos + T) and attend over [0, pos + T). Ragged (`lens` (B,), see `rows`): row b holds lens[b]
    positions (rows that joined a running batch at different times); each row takes one new token, written
    at lens[b], that attends over that row's own [0, lens[b]] only. `advance(T)` is called once per forward.
    A ragged row also reads (masked) keys and values beyond its own length, up to the longest row's: those
    must be finite (a zero attention weight times NaN is still NaN), so a cache used ragged starts zeroed
    (`zero_()`; gpt.engine.DecodeEngine does it).
    """

    def __init__(self, n_layer: int, batch_size: int, n_head: int, head_dim: int, max_len: int,
                 device=None, dtype=torch.float32):
        shape = (n_layer, batch_size, n_head, max_len, head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0
        self.lens: torch.Tensor | None = None
        self.longest = 0  # ragged: max(lens)

    def zero_(self) -> KVCache:
        self.k.zero_()
        self.v.zero_()
        return self

    def rows(self, start: int, stop: int, lens: list[int]) -> KVCache:
        """Rows [start, stop) as a cache of their own (views of this storage), row b holding lens[b] positions:
        uniform when all lengths are equal (the plain single-`pos` path, no mask), else ragged."""
        view = KVCache.__new__(KVCache)
        view.k, view.v, view.max_len = self.k[:, start:stop], self.v[:, start:stop], self.max_len
        view.pos, view.lens, view.longest = lens[0], None, max(lens)
        if view.longest != min(lens):
            view.pos, view.lens = 0, torch.tensor(lens, dtype=torch.long, device=self.k.device)
            # each (row, head)'s first position in a layer's (B * H * max_len, D) rows: a ragged step writes
            # its B * H new keys with one index_copy_ (advanced-index assignment took ~0.7 ms a layer on CPU)
            heads = torch.arange(self.k.size(2), device=self.k.device)
            view._base = (torch.arange(len(lens), device=self.k.device)[:, None] * self.k.size(2) + heads) * self.max_len
        return view

    def end(self, t: int) -> int:
        """The end of the positions held once t new tokens are written (ragged: the longest row's); ValueError if the
        cache cannot hold them."""
        end = (self.pos if self.lens is None else self.longest) + t
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        return end

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H, T, D) for `layer`; return all keys/values so far (B, H, pos + T, D) (ragged:
        (B, H, longest + 1, D), each row's own keys first)."""
        if self.lens is not None:
            if k.size(2) != 1:
                raise ValueError(f"rows at different positions take one new token each, not {k.size(2)}")
            end = self.end(1)
            at = (self._base + self.lens[:, None]).flatten()  # (B * H,) rows of the layer's (B * H * max_len, D)
            for cache, new in ((self.k, k), (self.v, v)):  # (under autocast: bf16 k, v)
                cache[layer].view(-1, new.size(-1)).index_copy_(0, at, new[:, :, 0].flatten(0, 1).to(cache.dtype))
            return self.k[layer, :, :, :end], self.v[layer, :, :, :end]
        end = self.end(k.size(2))
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, t: int) -> None:
        if self.lens is not None:
            self.lens += t
            self.longest += t
        else:
            self.pos += t

    def reset(self) -> None:
        self.pos = 0


@dataclass
class _Part:
    """One part of a packed forward: B rows of T new tokens over their own cache view, with the attention
    mask (or causal flag) and rotary angles of their positions."""

    B: int
    T: int
    cache: KVCache
    mask: torch.Tensor | None
    causal: bool
    rope: tuple[torch.Tensor, torch.Tensor] | None


class Packed:
    """The parts of one packed forward (GPT.packed_last_hidden), passed to every block in place of a cache."""

    def __init__(self, parts: list[_Part]):
        self.parts = parts


def _dropout(module: nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    """module(x), called only when it changes x (training with p > 0): nn.Dropout is the identity otherwise, and a
    decode step would make 2 n_layer + 1 module calls for nothing."""
    return module(x) if module.training and module.p > 0 else x


def _norm(cfg: GPTConfig, dim: int) -> nn.Module:
    return NORMS[cfg.norm](cfg, dim)


class RMSNorm(nn.RMSNorm):
    """x / rms(x) * gain, computed in float32 whatever x's dtype (as Llama does; under bf16 autocast the queries
    and keys that QK-norm sees are bf16, and torch's fused kernel wants input and gain of one dtype)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None  # bf16 weights (inference dtype)
        return F.rms_norm(x.float(), self.normalized_shape, weight, self.eps).to(x.dtype)


NORMS = {  # model.norm: a gain per channel in both (the exported models have one)
    "layernorm": lambda cfg, dim: nn.LayerNorm(dim, bias=cfg.bias),
    "rmsnorm": lambda cfg, dim: RMSNorm(dim, eps=1e-5),
}
POSITIONS = ("learned", "rope")


def rotary(pos: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles for positions `pos` ((T,) or (B, T)) -> each (B or 1, 1, T, D/2), float32.
    Pair i of a head (channels i and i + D/2, the "rotate half" layout Llama uses) turns by pos * theta^(-2i/D)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=pos.device).float() / head_dim))
    angles = (pos if pos.dim() == 2 else pos[None]).float()[:, None, :, None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, D) queries or keys by the angles of `rotary` (in x's dtype, as Llama does)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class CausalSelfAttention(nn.Module):
    # gpt.inference.native_attention sets this on a CPU where gpt.native's kernels run, in layers they fit (learned
    # positions, no QK-norm, SDPA attention, head size a multiple of 16): a decode step of one new token per row (rows
    # at one position or, in a ragged cache, each at its own) then writes its keys and values and attends over each
    # row's own keys in one native call instead of ~20 tensor ops (equal up to float32 rounding: tested)
    native_decode = False

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        # q (H heads), k and v (Hkv heads each) in one matmul; GPT-2's c_attn when Hkv == H
        self.c_attn = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.q_norm = _norm(cfg, cfg.head_dim) if cfg.qk_norm else None
        self.k_norm = _norm(cfg, cfg.head_dim) if cfg.qk_norm else None
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.eager = cfg.attn_impl == "eager"

    def native_fits(self) -> bool:
        """Whether gpt.native's one-token attention can stand in for this layer's (given no rotary positions)."""
        return self.q_norm is None and not self.eager and self.head_dim % 16 == 0

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               causal: bool) -> torch.Tensor:
        """q (B, H, Tq, D), k/v (B, Hkv, Tk, D) -> (B, H, Tq, D). mask: (Tq, Tk) bool, True = may attend."""
        p = self.dropout if self.training else 0.0
        gqa = self.n_kv_head != self.n_head
        if not self.eager:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal, enable_gqa=gqa)
        if gqa:  # each key/value head serves n_head / n_kv_head query heads
            k, v = (t.repeat_interleave(self.n_head // self.n_kv_head, dim=1) for t in (k, v))
        # explicit attention: on CPU in bf16 this is ~2x faster than SDPA's flash kernel for short T
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        if causal:
            mask = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool, device=q.device).tril()
        if mask is not None:
            att = att.masked_fill(~mask, float("-inf"))
        att = F.dropout(F.softmax(att, dim=-1), p=p, training=self.training)
        return att.to(v.dtype) @ v

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                mask: torch.Tensor | None = None, causal: bool = True,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x (B, T, C); mask None (then `causal` says whether to apply the plain causal mask) or a bool
        mask, True = may attend, of shape (T, Tk) or (B, 1, T, Tk) over all keys so far. rope: the cos and
        sin of `rotary` for these T positions (pos=rope), else None. cache may be a `Packed` forward's parts
        (x then (1, N, C), every part's tokens in order; mask, causal and rope are each part's own)."""
        if isinstance(cache, Packed):  # the parts' tokens share the matmuls, each part attends on its own
            qkv, ys, start = self.c_attn(x), [], 0
            for part in cache.parts:
                n = part.B * part.T
                y = self._attend_new(qkv[0, start:start + n].view(part.B, part.T, -1), part.cache, layer, part.mask,
                                     part.causal, part.rope)
                ys.append(y.view(1, n, -1))
                start += n
            return _dropout(self.resid_dropout, self.c_proj(torch.cat(ys, dim=1)))
        return _dropout(self.resid_dropout, self.c_proj(self._attend_new(self.c_attn(x), cache, layer, mask, causal, rope)))

    def _attend_new(self, qkv: torch.Tensor, cache: KVCache | None, layer: int, mask: torch.Tensor | None,
                    causal: bool, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """The new tokens' queries, keys and values (B, T, (H + 2 Hkv) D), c_attn's output -> their attention
        output (B, T, H D), before c_proj (the keys and values stored in `cache` first, when given)."""
        B, T, _ = qkv.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        if (self.native_decode and T == 1 and cache is not None and (mask is None or cache.lens is not None)
                and rope is None and self.native_fits() and not self.training
                and qkv.is_cpu and qkv.dtype in native.INPUT_DTYPES and cache.k.dtype in native.INPUT_DTYPES
                and not (qkv.requires_grad and torch.is_grad_enabled()) and native.loaded() is not None):
            # (a ragged cache's mask is GPT._plan's: each row's keys up to its own length, what the kernel reads)
            cache.end(1)
            y = native.loaded().attend_new(qkv.reshape(B, -1), cache.k[layer], cache.v[layer], H, cache.pos, cache.lens)
            return y.view(B, 1, H * D)
        q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=2)
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k, v = (t.view(B, T, Hkv, D).transpose(1, 2) for t in (k, v))  # (B, Hkv, T, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # all keys/values so far: (B, Hkv, start + T, D)
            # attention runs in the cache's dtype (see GPT.new_cache: float32 for eager attention on a CPU): the
            # queries are cast, never the whole cache; the output goes back to the activations' dtype
            y = self.attend(q.to(k.dtype), k, v, mask, causal=causal and mask is None).to(qkv.dtype)
        else:
            y = self.attend(q, k, v, mask, causal=causal and mask is None)
        return y.transpose(1, 2).contiguous().view(B, T, H * D)


def _relu2(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x).square()


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


MLPS = {  # model.mlp: (activation, gated). Gated: c_fc gives [gate | up] (2F), the block uses act(gate) * up
    "gelu": (_gelu_tanh, False),
    "swiglu": (F.silu, True),
    "relu2": (_relu2, False),
}


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.act, self.gated = MLPS[cfg.mlp]
        self.c_fc = nn.Linear(cfg.n_embd, (2 if self.gated else 1) * cfg.mlp_hidden, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return _dropout(self.dropout, self.c_proj(h))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = _norm(cfg, cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = _norm(cfg, cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                mask: torch.Tensor | None = None, causal: bool = True,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer, mask, causal, rope)
        return x + self.mlp(self.ln_2(x))


VOCAB_ROWS = ("transformer.wte.weight", "lm_head.weight")  # the state-dict tensors with one row per token id


def without_padding(state: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """A (clean) state dict with the token embedding and output layer cut to cfg.vocab_size rows: what an export
    writes, since another runtime would otherwise score (and sample) the padding ids."""
    return {k: (v[: cfg.vocab_size] if k in VOCAB_ROWS else v) for k, v in state.items()}


class OutputHead(nn.Linear):
    """The output layer: a (padded V, C) weight (GPTConfig.padded_vocab_size rows, tied to the token embedding or
    not) whose forward scores the first `vocab_size` rows only, so every caller (decoding, evaluation, the stages'
    heads) gets logits (..., V) over ids a tokenizer can decode and never sees a padding id. The slice of the
    weight's first rows is a view: no copy, and the logits come out contiguous."""

    def __init__(self, n_embd: int, vocab_size: int, padded_vocab_size: int):
        super().__init__(n_embd, padded_vocab_size, bias=False)
        self.vocab_size = vocab_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., C) -> logits (..., V)."""
        return F.linear(x, self.weight[: self.vocab_size])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, vocab_size={self.vocab_size}"


# module constants, not class attributes: torch.compile (dynamo) cannot read a class attribute of an autograd.Function
MM_BLOCK = 1 << 23  # CPU: logits elements per matmul (V = 50304: 166 rows)
SOFTMAX_BLOCK = 1 << 21  # CPU: logits elements per softmax step; its float32 copy (8 MiB) stays in cache


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of (h @ W^T) against targets, computed in row chunks.

    The (N, V) logits are never materialised at once: a chunk of `chunk_size` rows gets its logits in
    the compute dtype (bf16 under autocast), which are turned in place into d(loss)/d(logits) =
    softmax - onehot (softmax and loss in float32; on CPU a few rows at a time, while they are in
    cache); the chunk's gradients with respect to h and W are then two matmuls, all in the forward
    pass. The backward pass only scales them. Rows whose target is `ignore_index` contribute nothing.
    h: (N, C), weight: (Vp, C), targets: (N,) in [0, vocab). The matmul runs over all Vp rows of a padded
    weight (GPTConfig.vocab_multiple: the GPU-friendly shape) and the columns from `vocab` on are set to -inf
    before the softmax, so the loss is exactly the cross-entropy over the true V ids and the padding rows get
    a zero gradient.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_size: int, ignore_index: int, grad_enabled: bool, vocab: int):
        dev = h.device
        compute_dtype = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else h.dtype
        acc_dtype = torch.promote_types(compute_dtype, torch.float32)  # softmax, loss, grad_w accumulation
        low = compute_dtype != acc_dtype
        want_h = grad_enabled and ctx.needs_input_grad[0]
        want_w = grad_enabled and ctx.needs_input_grad[1]
        need_grad = want_h or want_w
        N, V = h.size(0), weight.size(0)
        valid = targets != ignore_index
        n_valid = valid.sum().clamp(min=1)
        safe_t = torch.where(valid, targets, 0)[:, None]
        chunk = max(1, min(chunk_size, N))
        cpu = dev.type == "cpu"
        mm_rows = max(1, min(MM_BLOCK // V, chunk)) if cpu else chunk
        sm_rows = max(1, min(SOFTMAX_BLOCK // V, mm_rows)) if cpu else mm_rows
        nll = torch.empty(N, device=dev, dtype=acc_dtype)
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = None
        with torch.autocast(dev.type, enabled=False):
            w = weight.to(compute_dtype)
            # with grads the whole chunk's logits are kept (they become its gradient), else one block
            buf = torch.empty(chunk if need_grad else mm_rows, V, device=dev, dtype=compute_dtype)
            p_buf = torch.empty(sm_rows, V, device=dev, dtype=acc_dtype) if low and cpu else None
            for start in range(0, N, chunk):
                end = min(start + chunk, N)
                hc = h[start:end].to(compute_dtype)
                g = buf[: end - start]
                for b0 in range(0, end - start, mm_rows):
                    b1 = min(b0 + mm_rows, end - start)
                    blk = g[b0:b1] if need_grad else buf[: b1 - b0]
                    torch.mm(hc[b0:b1], w.t(), out=blk)
                    if vocab < V:  # padding ids: probability 0, so no loss and no gradient
                        blk[:, vocab:].fill_(float("-inf"))
                    for s0 in range(0, b1 - b0, sm_rows):
                        s1 = min(s0 + sm_rows, b1 - b0)
                        rows = slice(start + b0 + s0, start + b0 + s1)
                        lg, t = blk[s0:s1], safe_t[rows]
                        x_max = lg.amax(dim=1, keepdim=True).to(acc_dtype)
                        x_t = lg.gather(1, t).to(acc_dtype)
                        if cpu:
                            p = p_buf[: s1 - s0].copy_(lg) if low else lg
                            torch.softmax(p, dim=1, out=p)
                        else:
                            p = torch.softmax(lg, dim=1, dtype=acc_dtype)
                        # the largest probability cannot underflow: logsumexp = x_max - log(p_max)
                        nll[rows] = (x_max - p.amax(dim=1, keepdim=True).log() - x_t).squeeze(1)
                        if need_grad:
                            p.scatter_add_(1, t, torch.full_like(x_t, -1.0))  # softmax - onehot
                            if p is not lg:
                                lg.copy_(p)
                if need_grad:
                    vmask = valid[start:end, None]
                    if want_h:  # ignored rows are zeroed here and, for grad_w, in hc below
                        grad_h[start:end] = (g @ w).to(acc_dtype).mul_(vmask.to(acc_dtype) / n_valid).to(h.dtype)
                    if want_w:
                        gw = g.t() @ (hc * vmask.to(compute_dtype))  # (V, C), unscaled
                        if grad_w is None:
                            grad_w = gw
                        else:
                            grad_w = grad_w.to(acc_dtype)
                            grad_w += gw
        loss = torch.where(valid, nll, 0.0).sum().float() / n_valid
        if need_grad:
            if want_w and grad_w is None:  # no rows at all
                grad_w = torch.zeros(weight.shape, device=dev, dtype=acc_dtype)
            ctx.save_for_backward(grad_h, grad_w, n_valid)
            ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w_raw, n_valid = ctx.saved_tensors
        grad_w = None
        if grad_w_raw is not None:  # upcast first, then scale: no extra rounding of a bf16 gradient
            grad_w = torch.empty(grad_w_raw.shape, device=grad_w_raw.device,
                                 dtype=torch.promote_types(grad_w_raw.dtype, ctx.weight_dtype))
            grad_w.copy_(grad_w_raw).mul_(grad_loss.to(grad_w.dtype) / n_valid)
            grad_w = grad_w.to(ctx.weight_dtype)
        return (grad_h * grad_loss if grad_h is not None else None), grad_w, None, None, None, None, None


class GPT(nn.Module):
    def __init__(self, vocab_size: int, block_size: int = 256, n_layer: int = 6, n_head: int = 6,
                 n_embd: int = 384, dropout: float = 0.0, bias: bool = False, loss_chunk_size: int = 4096,
                 attn_impl: str = "sdpa", activation_checkpointing: bool = False, pos: str = "learned",
                 rope_theta: float = 10000.0, norm: str = "layernorm", mlp: str = "gelu", mlp_hidden: int | None = None,
                 qk_norm: bool = False, n_kv_head: int | None = None, tie_embeddings: bool = True,
                 vocab_multiple: int = 1):
        super().__init__()
        self.config = cfg = GPTConfig(vocab_size, block_size, n_layer, n_head, n_embd, dropout, bias, loss_chunk_size,
                                      attn_impl, activation_checkpointing, pos, rope_theta, norm, mlp, mlp_hidden,
                                      qk_norm, n_kv_head, tie_embeddings, vocab_multiple)
        parts = dict(wte=nn.Embedding(cfg.padded_vocab_size, cfg.n_embd))
        if cfg.pos == "learned":
            parts["wpe"] = nn.Embedding(cfg.block_size, cfg.n_embd)
        parts.update(drop=nn.Dropout(cfg.dropout), h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
                     ln_f=_norm(cfg, cfg.n_embd))
        self.transformer = nn.ModuleDict(parts)
        # padded (vocab_multiple): an OutputHead that scores the true V rows; else the plain Linear it always was
        padded = cfg.padded_vocab_size != cfg.vocab_size
        self.lm_head = (OutputHead(cfg.n_embd, cfg.vocab_size, cfg.padded_vocab_size) if padded
                        else nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False))
        if cfg.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding and "wpe" in self.transformer else n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12 L T C."""
        cfg, T = self.config, seq_len or self.config.block_size
        return 6 * self.num_params() + 12 * cfg.n_layer * T * cfg.n_embd

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None,
                      pad: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) token ids -> final-layer-normed hidden states (B, T, C).

        pad (B,): number of left-padding tokens of each row (batched prompts of different lengths);
        a row's positions then count from its first real token, and no real token attends to padding.
        With a ragged cache (rows at different positions, KVCache.rows) idx is one new token per row (B, 1).
        """
        B, T = idx.shape
        if pad is not None and cache is not None and cache.lens is not None:
            raise ValueError("a ragged cache keeps each row's own positions: no left padding")
        pos, mask, causal = self._plan(idx, cache)
        if pad is not None:
            start = cache.pos if cache is not None else 0
            keys = torch.arange(start + T, device=idx.device)
            allowed = keys[None, :] <= pos[:, None]  # causal (T, Tk)
            real = keys[None, :] >= pad[:, None]  # (B, Tk)
            # a padding query attends to itself only, so its row stays finite (its output is never used)
            mask = (allowed & (real[:, None, :] | (keys[None, :] == pos[:, None])))[:, None]  # (B, 1, T, Tk)
            pos = (pos[None, :] - pad[:, None]).clamp(min=0)  # (B, T)
        x, rope = self._embed(idx, pos)
        recompute = self.config.activation_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        for i, block in enumerate(self.transformer.h):
            if recompute:  # backward runs the block's forward again instead of keeping its activations
                x = torch.utils.checkpoint.checkpoint(block, x, None, i, mask, causal, rope, use_reentrant=False)
            else:
                x = block(x, cache, i, mask, causal, rope)
        if cache is not None:
            cache.advance(T)
        return self.transformer.ln_f(x)

    def _embed(self, idx: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, tuple | None]:
        """Token embeddings of idx (B, T) at positions pos ((T,) or (B, T)) -> (x (B, T, C), rotary cos/sin or
        None): learned positions are added here, rotary ones are applied to q and k in every layer."""
        x = self.transformer.wte(idx)
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(pos)
        rope = rotary(pos, self.config.head_dim, self.config.rope_theta) if self.config.pos == "rope" else None
        return _dropout(self.transformer.drop, x), rope

    def _plan(self, idx: torch.Tensor, cache: KVCache | None) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        """Positions, attention mask (True = may attend; None: `causal` or nothing) and causal flag of new tokens
        idx (B, T) over `cache` (None: a sequence from position 0). Ragged cache: one new token per row, row b's
        at position lens[b], attending over that row's keys 0 .. lens[b] only."""
        T = idx.size(1)
        if cache is not None and cache.lens is not None:
            if T != 1:
                raise ValueError(f"rows at different positions take one new token each, not {T}")
            if cache.longest + 1 > self.config.block_size:
                raise ValueError(f"sequence of {cache.longest + 1} tokens exceeds block_size {self.config.block_size}")
            keys = torch.arange(cache.longest + 1, device=idx.device)
            return cache.lens[:, None], (keys[None, :] <= cache.lens[:, None])[:, None, None], False  # (B, 1, 1, Tk)
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}")
        pos = torch.arange(start, start + T, device=idx.device)
        mask = None
        if T > 1 and start > 0:  # several new queries over a filled cache: query i sees keys 0 .. start + i
            mask = torch.ones(T, start + T, dtype=torch.bool, device=idx.device).tril(start)
        return pos, mask, T > 1 and start == 0

    def packed_last_hidden(self, parts: list[tuple[torch.Tensor, KVCache]]) -> torch.Tensor:
        """One forward over several (idx (B, T), cache view) parts, such as a ragged decode step's rows and
        prompts prefilled into other slots of the same cache: the matmuls run once over all their tokens (the
        weights read once, the way a decode step reads them), attention runs part by part over each part's
        own cache, as `hidden_states(idx, cache)` of that part alone does (equal up to the matmuls' rounding
        over more rows, ~1e-7 in float32; a layer whose rows share a scale, fbgemm's dynamic int8, is not packed:
        gpt.engine) -> the final-layer-normed hidden state of every row's last position (sum of B, C), the parts'
        rows in order."""
        xs, plan = [], []
        for idx, cache in parts:
            B, T = idx.shape
            pos, mask, causal = self._plan(idx, cache)
            x, rope = self._embed(idx, pos)
            xs.append(x.reshape(1, B * T, -1))
            plan.append(_Part(B, T, cache, mask, causal, rope))
        x, packed = torch.cat(xs, dim=1), Packed(plan)
        for i, block in enumerate(self.transformer.h):
            x = block(x, packed, i)
        last, start = [], 0
        for part in plan:
            part.cache.advance(part.T)
            last.append(x[0, start + part.T - 1:start + part.B * part.T:part.T])
            start += part.B * part.T
        return self.transformer.ln_f(torch.cat(last))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None,
                ignore_index: int = -1, pad: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx (B, T) -> (logits (B, T, V), None) without targets. V is config.vocab_size, the tokenizer's
        vocabulary, also when the output layer has padding rows (config.vocab_multiple).

        With targets (B, T) -> (logits or None, mean cross-entropy over targets != ignore_index). The
        output layer and loss are computed in chunks of config.loss_chunk_size rows without materialising
        all logits, and the logits are then None; with loss_chunk_size 0, or an output layer that is not
        an nn.Linear (a quantized lm_head), the full logits are computed, used by F.cross_entropy and
        returned: (logits (B, T, V), loss).
        """
        h = self.hidden_states(idx, cache, pad)
        if targets is None:
            return self.lm_head(h), None
        chunk, V = self.config.loss_chunk_size, self.config.vocab_size
        if chunk <= 0 or not isinstance(self.lm_head, nn.Linear):  # unfused: also for a quantized lm_head
            if isinstance(self.lm_head, OutputHead):  # the padded matmul (aligned shape), then the true V columns
                logits = F.linear(h, self.lm_head.weight)[..., :V]
            else:
                logits = self.lm_head(h)
            loss = F.cross_entropy(logits.float().reshape(-1, V), targets.reshape(-1), ignore_index=ignore_index)
            return logits, loss
        loss = _FusedLinearCrossEntropy.apply(h.reshape(-1, h.size(-1)), self.lm_head.weight, targets.reshape(-1),
                                              chunk, ignore_index, torch.is_grad_enabled(), V)
        return None, loss

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype=None) -> KVCache:
        """A KV cache for decoding. dtype None: the weights' dtype, except for explicit attention
        (attn_impl=eager) on a CPU, which gets float32 whatever the weights' dtype: its bf16 matmuls over a bf16
        cache are ~2.4x slower than over a float32 one (16 rows, 6 heads, ~300 positions, AMX Xeon), while
        SDPA's CPU kernel reads a bf16 cache ~1.8x faster than a float32 one (a bf16 model's decode step 10-17%
        faster at 16 rows). A bf16 model's keys and values are bf16 when computed, so its bf16 cache holds the
        same values a float32 one would. (float16 weights on a CPU get an fp16 cache, read ~1.3x slower than fp32:
        a CPU user runs bf16 or float32.)"""
        cfg = self.config
        p = self.transformer.wte.weight  # an embedding stays float even in an int8-quantized model
        if dtype is None:
            cpu_eager = p.device.type == "cpu" and cfg.attn_impl == "eager"
            dtype = torch.promote_types(p.dtype, torch.float32) if cpu_eager else p.dtype
        return KVCache(cfg.n_layer, batch_size, cfg.n_kv_head, cfg.head_dim,
                       max_len or cfg.block_size, device=p.device, dtype=dtype)

    def hparams(self) -> dict:
        return asdict(self.config)
