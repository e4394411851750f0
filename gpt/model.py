"""A decoder-only Transformer (GPT-2 style): token + position embeddings, pre-LN blocks with causal
self-attention (scaled_dot_product_attention) and an MLP, tied input/output embeddings.

Shapes: B batch, T time (sequence), C channels (n_embd), H heads, D head size (C // H), V vocab.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

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


class KVCache:
    """Preallocated keys and values for every layer: (n_layer, B, H, max_len, D) each.

    `pos` is the number of positions already written; attention layers write their new keys and
    values at [pos, pos + T) and attend over [0, pos + T); `advance(T)` is called once per forward.
    """

    def __init__(self, n_layer: int, batch_size: int, n_head: int, head_dim: int, max_len: int,
                 device=None, dtype=torch.float32):
        shape = (n_layer, batch_size, n_head, max_len, head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H, T, D) for `layer`; return all keys/values so far (B, H, pos + T, D)."""
        end = self.pos + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, t: int) -> None:
        self.pos += t

    def reset(self) -> None:
        self.pos = 0


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.eager = cfg.attn_impl == "eager"

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               causal: bool) -> torch.Tensor:
        """q (B, H, Tq, D), k/v (B, H, Tk, D) -> (B, H, Tq, D). mask: (Tq, Tk) bool, True = may attend."""
        p = self.dropout if self.training else 0.0
        if not self.eager:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
        # explicit attention: on CPU in bf16 this is ~2x faster than SDPA's flash kernel for short T
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        if causal:
            mask = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool, device=q.device).tril()
        if mask is not None:
            att = att.masked_fill(~mask, float("-inf"))
        att = F.dropout(F.softmax(att, dim=-1), p=p, training=self.training)
        return att.to(v.dtype) @ v

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        start = 0 if cache is None else cache.pos
        if cache is not None:
            k, v = cache.update(layer, k, v)  # all keys/values so far: (B, H, start + T, D)
            k, v = k.to(q.dtype), v.to(q.dtype)  # the cache may be kept in another dtype than autocast's
        # query i (absolute position start + i) may see keys 0 .. start + i; one new query sees them all
        mask = None if T == 1 or start == 0 else torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(start)
        y = self.attend(q, k, v, mask, causal=T > 1 and start == 0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of (h @ W^T) against targets, computed in row chunks.

    The (N, V) logits are never materialised at once: each chunk's logits live only while its loss
    and its gradients with respect to h and W are computed, in the forward pass. The backward pass
    only scales the stored gradients. Rows whose target is `ignore_index` contribute nothing.
    h: (N, C), weight: (V, C), targets: (N,).
    """

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_size: int, ignore_index: int, grad_enabled: bool):
        n_valid = (targets != ignore_index).sum().clamp(min=1)
        compute_dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
        w = weight.to(compute_dtype)
        need_grad = grad_enabled and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        grad_h = torch.empty_like(h) if need_grad else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_grad else None
        loss = torch.zeros((), device=h.device, dtype=torch.float32)
        with torch.autocast(h.device.type, enabled=False):
            for start in range(0, h.size(0), chunk_size):
                hc = h[start:start + chunk_size].to(compute_dtype)
                tc = targets[start:start + chunk_size]
                logits = (hc @ w.t()).float()  # (n, V)
                valid = tc != ignore_index
                safe_t = tc.clamp(min=0)
                lse = torch.logsumexp(logits, dim=-1)
                picked = logits.gather(1, safe_t[:, None]).squeeze(1)
                loss += torch.where(valid, lse - picked, 0.0).sum()
                if need_grad:
                    # d(mean CE)/d logits = (softmax - onehot) / n_valid on valid rows
                    g = logits.sub_(lse[:, None]).exp_()
                    g[torch.arange(g.size(0), device=g.device), safe_t] -= 1.0
                    g.mul_((valid.float() / n_valid)[:, None])
                    g = g.to(compute_dtype)
                    grad_h[start:start + chunk_size] = (g @ w).to(h.dtype)
                    grad_w += (g.t() @ hc).float()
        if need_grad:
            ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return loss / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss, grad_w * grad_loss, None, None, None, None


class GPT(nn.Module):
    def __init__(self, vocab_size: int, block_size: int = 256, n_layer: int = 6, n_head: int = 6,
                 n_embd: int = 384, dropout: float = 0.0, bias: bool = False, loss_chunk_size: int = 4096,
                 attn_impl: str = "sdpa"):
        super().__init__()
        self.config = cfg = GPTConfig(vocab_size, block_size, n_layer, n_head, n_embd, dropout, bias, loss_chunk_size,
                                      attn_impl)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
            ln_f=nn.LayerNorm(cfg.n_embd, bias=cfg.bias),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
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
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12 L T C."""
        cfg, T = self.config, seq_len or self.config.block_size
        return 6 * self.num_params() + 12 * cfg.n_layer * T * cfg.n_embd

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """idx (B, T) token ids -> final-layer-normed hidden states (B, T, C)."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}")
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache, i)
        if cache is not None:
            cache.advance(T)
        return self.transformer.ln_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None,
                ignore_index: int = -1) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx (B, T) -> (logits (B, T, V), None) without targets.

        With targets (B, T) returns (None, mean cross-entropy over targets != ignore_index); the
        output layer and loss are then computed in chunks without materialising all logits
        (config.loss_chunk_size rows at a time; 0 computes full logits and F.cross_entropy).
        """
        h = self.hidden_states(idx, cache)
        if targets is None:
            return self.lm_head(h), None
        chunk = self.config.loss_chunk_size
        if chunk <= 0:
            logits = self.lm_head(h)
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=ignore_index)
            return logits, loss
        loss = _FusedLinearCrossEntropy.apply(h.reshape(-1, h.size(-1)), self.lm_head.weight, targets.reshape(-1),
                                              chunk, ignore_index, torch.is_grad_enabled())
        return None, loss

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype=None) -> KVCache:
        cfg = self.config
        p = self.lm_head.weight
        return KVCache(cfg.n_layer, batch_size, cfg.n_head, cfg.n_embd // cfg.n_head,
                       max_len or cfg.block_size, device=p.device, dtype=dtype or p.dtype)

    def hparams(self) -> dict:
        return asdict(self.config)
