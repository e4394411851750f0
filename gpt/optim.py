"""Optimizer parameter groups and learning-rate schedules (built by Hydra from conf/optimizer, conf/scheduler)."""

from __future__ import annotations

import math

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (Linear weights, embeddings); none on biases and LayerNorm gains, nor on a
    Parameter marked `no_weight_decay` (LoRA's embedding whose old rows must not move, gpt.lora). Frozen
    parameters (requires_grad=False) are left out."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2 and not getattr(p, "no_weight_decay", False)]
    no_decay = [p for p in params if p.dim() < 2 or getattr(p, "no_weight_decay", False)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class WarmupCosine:
    """lr multiplier: linear warmup over `warmup_iters`, cosine decay to `min_lr_ratio` at `total_iters`, then flat."""

    def __init__(self, warmup_iters: int, total_iters: int, min_lr_ratio: float = 0.1):
        self.warmup_iters, self.total_iters, self.min_lr_ratio = int(warmup_iters), int(total_iters), float(min_lr_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_iters:
            return (step + 1) / (self.warmup_iters + 1)
        if step >= self.total_iters:
            return self.min_lr_ratio
        progress = (step - self.warmup_iters) / max(1, self.total_iters - self.warmup_iters)
        return self.min_lr_ratio + 0.5 * (1.0 - self.min_lr_ratio) * (1.0 + math.cos(math.pi * progress))


class WarmupConstant:
    """lr multiplier: linear warmup over `warmup_iters`, then constant."""

    def __init__(self, warmup_iters: int = 0):
        self.warmup_iters = int(warmup_iters)

    def __call__(self, step: int) -> float:
        return (step + 1) / (self.warmup_iters + 1) if step < self.warmup_iters else 1.0


def lambda_scheduler(optimizer: torch.optim.Optimizer, schedule) -> torch.optim.lr_scheduler.LambdaLR:
    """Wrap a multiplier schedule (WarmupCosine, WarmupConstant) as a resumable LambdaLR."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
