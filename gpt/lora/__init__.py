"""LoRA (Hu et al. 2021): low-rank adapters on chosen Linear layers of a frozen model.

A wrapped layer computes  y = x W^T + b + (alpha / r) * dropout(x) A^T B^T  with A (r, in) Kaiming-uniform
(as the paper's code and PEFT do) and B (out, r) zeros, so a freshly wrapped model computes exactly what
the base model does. `apply_lora` wraps the layers whose names match `targets` and freezes everything
else except what the stage must train anyway: a newly initialised `head` (reward / value / classifier
head) and, when the stage grew the vocabulary (chat tokens), the new rows of the tied embedding.

LoRALinear is an nn.Linear that keeps the base `weight` / `bias` under their usual names and adds
`lora_A` / `lora_B`, so a LoRA checkpoint's state dict is the plain one plus adapter keys.
gpt.checkpoint.model_from_checkpoint rebuilds such a model and returns it merged (W + (alpha / r) B A),
so every consumer of checkpoints loads LoRA runs unchanged;

    python -m gpt.lora merge <run folder or .pt> <out.pt>

(gpt/lora/__main__.py, over gpt.checkpoint.merged_checkpoint) writes the merged plain checkpoint once
(config node `lora` recorded as `lora_merged`). This package holds the adapters only and imports nothing
of the checkpoint layer, which builds on it.
"""

from __future__ import annotations

import math
import re
from fnmatch import fnmatchcase

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt.errors import UserError

# never wrapped: lm_head is tied to the token embedding; a stage's `head` trains in full
EXCLUDED = ("lm_head", "head")


class LoRALinear(nn.Linear):
    """A frozen nn.Linear (its own weight/bias Parameters, shared, not copied) plus a rank-r adapter."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.r, self.alpha, self.scaling = int(r), float(alpha), float(alpha) / int(r)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.r, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        return out + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain nn.Linear with W + scaling * B @ A (computed in float32) and the same bias."""
        w = self.weight
        lin = nn.utils.skip_init(nn.Linear, self.in_features, self.out_features, bias=self.bias is not None,
                                 device=w.device, dtype=w.dtype)
        with torch.no_grad():
            delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling
            lin.weight.copy_((w.float() + delta).to(w.dtype))
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha:g}"


def excluded(name: str) -> bool:
    """Whether `name` is a layer LoRA never adapts (the output layer, a task head)."""
    return any(name == e or name.startswith(e + ".") for e in EXCLUDED)


def matches(name: str, pattern: str) -> bool:
    """`pattern` is a name suffix ("attn.c_attn") or a glob ("mlp.*", "transformer.h.0.*") over qualified names."""
    return (name == pattern or name.endswith("." + pattern) or fnmatchcase(name, pattern)
            or fnmatchcase(name, "*." + pattern))


def linear_names(model: nn.Module) -> list[str]:
    """Qualified names of the Linear layers LoRA may wrap (not the tied lm_head, not a stage's head)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear)
            and not excluded(n)]


def short_names(names: list[str]) -> str:
    """Layer names with block indices folded: transformer.h.*.attn.c_attn, ..."""
    return ", ".join(dict.fromkeys(re.sub(r"\.\d+\.", ".*.", n) for n in names))


def _targets(targets) -> list[str]:
    if isinstance(targets, str):
        targets = [targets]
    try:
        out = [str(t) for t in targets]
    except TypeError:
        out = []
    if not out or not all(out):
        raise UserError(f"lora.targets={targets!r} must be a non-empty list of layer names or globs, "
                        f"e.g. [attn.c_attn, attn.c_proj]")
    return out


def _check(r, alpha, dropout) -> tuple[int, float, float]:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise UserError(f"lora.r={r!r} must be a positive integer (0 turns LoRA off)")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
        raise UserError(f"lora.alpha={alpha!r} must be a positive number")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise UserError(f"lora.dropout={dropout!r} must be in [0, 1)")
    return int(r), float(alpha), float(dropout)


def _wrap(model: nn.Module, names, r: int, alpha: float, dropout: float) -> None:
    for name in names:
        model.set_submodule(name, LoRALinear(model.get_submodule(name), r, alpha, dropout))


def resolve_targets(model: nn.Module, targets) -> list[str]:
    """The Linear layers matched by the patterns (in model order); a pattern that matches none is a UserError."""
    available = linear_names(model)
    chosen = []
    for pattern in _targets(targets):
        hit = [n for n in available if matches(n, pattern)]
        if not hit:
            why = (" (lm_head is tied to the token embedding and a stage's head trains in full: neither takes "
                   "an adapter)") if any(matches(n, pattern) for n, _ in model.named_modules() if excluded(n)) else ""
            raise UserError(f"lora.targets pattern {pattern!r} matches no Linear layer{why}; the layers are: "
                            f"{short_names(available)}")
        chosen += hit
    return [n for n in available if n in chosen]  # in model order


def train_new_rows(model: nn.Module, first_new: int):
    """Make rows first_new.. of the embedding and output layer (one tied matrix, or two) trainable and keep the
    others frozen: a gradient hook zeroes the old rows' gradient and the Parameter is marked `no_weight_decay`
    (gpt.optim.param_groups), so AdamW never moves them (zero gradient, zero moments, no decay)."""

    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[:first_new] = 0
        return grad

    handles = []
    vocab = model.config.vocab_size  # rows past it are padding (model.vocab_multiple): never scored, not counted
    for w in {id(w): w for w in (model.transformer.wte.weight, model.lm_head.weight)}.values():
        w.requires_grad_(True)
        w.no_weight_decay = True
        w.trainable_rows = vocab - first_new
        handles.append(w.register_hook(hook))
    model._lora_rows_hook = _Handles(handles)


class _Handles:
    """The row hooks of train_new_rows, removed together (merge_lora)."""

    def __init__(self, handles: list):
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; of a row-masked embedding only its trainable rows count."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            rows = getattr(p, "trainable_rows", None)
            trainable += p.numel() if rows is None else rows * p[0].numel()
    return trainable, total


def apply_lora(model: nn.Module, r: int, alpha: float, targets, dropout: float = 0.0,
               new_rows_from: int | None = None) -> dict:
    """Wrap the Linear layers of `model` matching `targets` in place and freeze all other parameters,
    except `head.*` parameters and, if new_rows_from < vocab size, the embedding rows from there on.
    -> {"layers": wrapped names, "trainable": n, "total": m}."""
    r, alpha, dropout = _check(r, alpha, dropout)
    names = resolve_targets(model, targets)
    for p in model.parameters():
        p.requires_grad_(False)
    _wrap(model, names, r, alpha, dropout)
    for name, p in model.named_parameters():
        if name.endswith((".lora_A", ".lora_B")) or name.startswith("head."):
            p.requires_grad_(True)
    vocab = model.config.vocab_size  # the tokenizer's ids; the embedding may hold padding rows past them
    if new_rows_from is not None and new_rows_from < vocab:
        train_new_rows(model, int(new_rows_from))
    trainable, total = count_parameters(model)
    return {"layers": names, "trainable": trainable, "total": total}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its Linear (W + alpha / r * B @ A), remove the wrappers and the row hook,
    and make all parameters trainable again, as in a plain model. In place; returns the model."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            model.set_submodule(name, m.merged())
    handle = getattr(model, "_lora_rows_hook", None)
    if handle is not None:
        handle.remove()
        del model._lora_rows_hook
    for p in model.parameters():
        for attr in ("no_weight_decay", "trainable_rows"):
            if hasattr(p, attr):
                delattr(p, attr)
        p.requires_grad_(True)
    return model
