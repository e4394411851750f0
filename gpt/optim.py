"""Optimizer parameter groups and learning-rate schedules (built by Hydra from conf/optimizer, conf/scheduler)."""

from __future__ import annotations

import math
from typing import Callable

import torch


def param_groups(model: torch.nn.Module, weight_decay: float, named: bool = False) -> list[dict]:
    """Weight decay on matrices (Linear weights, embeddings); none on biases and LayerNorm gains, nor on a
    Parameter marked `no_weight_decay` (LoRA's embedding whose old rows must not move, gpt.lora). Frozen
    parameters (requires_grad=False) are left out. named=True: (name, parameter) pairs, torch's named form."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [(n, p) for n, p in params if p.dim() >= 2 and not getattr(p, "no_weight_decay", False)]
    no_decay = [(n, p) for n, p in params if p.dim() < 2 or getattr(p, "no_weight_decay", False)]
    if not named:
        decay, no_decay = [p for _, p in decay], [p for _, p in no_decay]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(factory: Callable[..., torch.optim.Optimizer], model: torch.nn.Module,
                    weight_decay: float) -> torch.optim.Optimizer:
    """The run's optimizer: `factory` (conf/optimizer's partial) over param_groups(model, weight_decay). An
    optimizer class that places parameters by name (MuonAdamW) says so with `named_params = True` and gets
    (name, parameter) pairs."""
    named = bool(getattr(getattr(factory, "func", factory), "named_params", False))
    return factory(param_groups(model, weight_decay, named=named))


def is_hidden_matrix(name: str, p: torch.Tensor) -> bool:
    """A 2-D weight inside the Transformer blocks (attention and MLP projections, whatever the block's layout).
    Not the embeddings or the output layer (outside `transformer.h`), nor LoRA's low-rank factors (`lora_A`,
    `lora_B`: their rank-r update is tuned for AdamW, and orthogonalising a rank-r matrix gives every one of its
    r directions the same step size whatever its gradient)."""
    return p.dim() == 2 and name.startswith("transformer.h.") and name.endswith(".weight")


class MuonAdamW(torch.optim.Optimizer):
    """Muon (torch.optim.Muon) for the hidden matrices, AdamW for everything else, as one optimizer.

    Takes param_groups(model, wd, named=True) ([matrices, the rest]) and moves the hidden matrices of the first
    (is_hidden_matrix) to a Muon group, so its groups are [AdamW matrices (embeddings, output layer), AdamW
    rest (no decay), Muon]: always three, each with its own base lr (`lr`, `lr`, `muon_lr`), which a LambdaLR
    schedule scales alike. They are the inner optimizers' own group dicts, and `state` is one dict both inner
    optimizers read and write, so state_dict / load_state_dict / zero_grad / GradScaler work on the whole as
    on any torch optimizer, and a step is exactly AdamW's step then Muon's on their own parameters.

    Muon keeps one momentum buffer per matrix and orthogonalises the update (5 Newton-Schulz iterations in
    bfloat16); its `muon_weight_decay` is decoupled and multiplied by `muon_lr`.
    """

    named_params = True  # build_optimizer passes (name, parameter) pairs: hidden matrices are chosen by name

    def __init__(self, params, lr: float = 3e-3, betas: tuple[float, float] = (0.9, 0.99), eps: float = 1e-8,
                 weight_decay: float = 0.1, fused: bool | None = None, muon_lr: float = 0.02, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5, muon_weight_decay: float = 0.0,
                 adjust_lr_fn: str | None = None):
        groups = list(params)
        if len(groups) != 2 or not all(isinstance(g, dict) for g in groups) or not all(
                isinstance(item, tuple) for g in groups for item in g["params"]):
            raise ValueError("MuonAdamW takes gpt.optim.param_groups(model, weight_decay, named=True): two groups "
                             "of (name, parameter) pairs")
        matrices, rest = groups
        hidden = [p for n, p in matrices["params"] if is_hidden_matrix(n, p)]
        others = [p for n, p in matrices["params"] if not is_hidden_matrix(n, p)]
        self.adamw = torch.optim.AdamW(
            [{"params": others, "weight_decay": matrices["weight_decay"]},
             {"params": [p for _, p in rest["params"]], "weight_decay": rest["weight_decay"]}],
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, fused=fused)
        self.muon = torch.optim.Muon([{"params": hidden}], lr=muon_lr, weight_decay=muon_weight_decay,
                                     momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                                     adjust_lr_fn=adjust_lr_fn)
        super().__init__(self.adamw.param_groups + self.muon.param_groups, defaults={})
        self.defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "fused": fused,
                         "muon_lr": muon_lr, "momentum": momentum, "nesterov": nesterov, "ns_steps": ns_steps,
                         "muon_weight_decay": muon_weight_decay, "adjust_lr_fn": adjust_lr_fn}
        self._share()

    def _share(self) -> None:
        """Make the inner optimizers work on this one's group dicts and state (after __init__ and after
        load_state_dict, which replaces both)."""
        n = len(self.adamw.param_groups)
        self.adamw.param_groups, self.muon.param_groups = self.param_groups[:n], self.param_groups[n:]
        self.adamw.state = self.muon.state = self.state

    @property
    def optimizers(self) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
        """The inner optimizers (gpt.memory counts each one's state)."""
        return self.adamw, self.muon

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.adamw.step()
        self.muon.step()
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._share()


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
