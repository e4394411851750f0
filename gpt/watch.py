"""Watching a model train: per-layer-group gradient norms and update ratios, and histograms of each layer's
weights and gradients (logger.watch).

The trainer takes them itself, at the steps they are logged, after backward (gradients reduced across
ranks and unscaled) and before clipping and zero_grad, rather than through wandb.watch's hooks: those fire
on every backward (each micro-batch, before DDP's reduction and a GradScaler's unscale, logging scaled
partial gradients) and on every forward (evaluation and sampling included), and hooks on parameters run
inside a compiled backward. With logger.watch=null nothing here is called and nothing is hooked.

Groups: a parameter inside a block belongs to that block (h.0, h.1, ...), any other to its module (wte,
wpe, ln_f, lm_head): the keys are grad_norm/<group> and update_ratio/<group>, two per block and a few more.
Under FSDP each rank holds a shard of every parameter: squared norms are summed over ranks (one all_reduce
of a vector per step taken), and histograms gather each tensor whole (every rank takes part).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

BINS = 64  # as wandb.watch
WRAPPERS = {"transformer", "_orig_mod", "module", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"}


def group_of(name: str) -> str:
    """The group a parameter's statistics are logged under: 'transformer.h.3.attn.c_attn.weight' -> 'h.3',
    'transformer.wte.weight' -> 'wte', 'lm_head.weight' -> 'lm_head' (wrapper names left out)."""
    path = [part for part in name.split(".")[:-1] if part not in WRAPPERS]
    for i, part in enumerate(path):
        if part.isdigit():  # the index in a ModuleList of blocks: the block is the group
            return ".".join(path[: i + 1])
    return ".".join(path) or name


def display_name(name: str) -> str:
    """A parameter's name without compile/DDP/FSDP wrapper parts (the key of its histograms)."""
    return ".".join(part for part in name.split(".") if part not in WRAPPERS - {"transformer"})


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (possibly FSDP-sharded DTensor) tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


def _whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective for a DTensor: every rank must call it)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def histogram(t: torch.Tensor, bins: int = BINS) -> tuple[list[float], list[float]] | None:
    """(counts, edges) of a tensor's finite values, as wandb.watch takes them (histc on the tensor's own
    device, `bins` equal bins from min to max; one bin when all values are equal); None when none is finite."""
    flat = t.detach().reshape(-1).float()
    flat = flat[torch.isfinite(flat)]
    if flat.numel() == 0:
        return None
    lo, hi = (float(v) for v in torch.aminmax(flat))
    if lo == hi:
        return [float(flat.numel())], [lo, hi]
    counts = torch.histc(flat, bins=bins, min=lo, max=hi)
    return counts.tolist(), torch.linspace(lo, hi, bins + 1).tolist()


class LayerStats:
    """Per-group gradient norms and update ratios ||w_after - w_before|| / ||w_before|| of one optimizer step.

    `model` is the unwrapped model (no DDP/compile wrapper); `reduce`: sum squared norms over ranks (FSDP,
    where each rank holds shards; under DDP every rank holds the same reduced gradients, rank 0 alone reads them)."""

    def __init__(self, model: torch.nn.Module, reduce: bool = False):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [display_name(n) for n, _ in named]
        self.params = [p for _, p in named]
        group_names = [group_of(n) for n, _ in named]
        self.groups = list(dict.fromkeys(group_names))  # in the model's order: wte, wpe, h.0, ..., ln_f, lm_head
        self.index = [self.groups.index(g) for g in group_names]
        self.reduce = reduce
        self._before: list[torch.Tensor] | None = None

    def _group_norms(self, tensors: list[torch.Tensor | None]) -> list[float]:
        """sqrt(sum of squares) per group of the given per-parameter tensors (None: no gradient; such a group
        is nan when none of its parameters has one)."""
        present = [i for i, t in enumerate(tensors) if t is not None]
        sums = torch.zeros(len(self.groups), dtype=torch.float64)
        counts = torch.zeros(len(self.groups), dtype=torch.float64)
        if present:
            norms = torch._foreach_norm([_local(tensors[i]) for i in present])
            squares = torch.stack(norms).to(torch.float64).cpu() ** 2  # one transfer for all groups
            where = torch.tensor([self.index[i] for i in present])
            sums.index_add_(0, where, squares)
            counts.index_add_(0, where, torch.ones(len(present), dtype=torch.float64))
        if self.reduce:
            device = self.params[0].device if self.params else "cpu"
            both = torch.cat([sums, counts]).to(device)
            dist.all_reduce(both)
            sums, counts = both.cpu().split(len(self.groups))
        return [math.sqrt(s) if c else math.nan for s, c in zip(sums.tolist(), counts.tolist())]

    def grad_norms(self) -> dict[str, float]:
        """{"grad_norm/<group>": norm} of the current gradients (call before clipping: their squares sum to the
        squared global norm)."""
        norms = self._group_norms([p.grad for p in self.params])
        return {f"grad_norm/{g}": v for g, v in zip(self.groups, norms) if not math.isnan(v)}

    def snapshot(self) -> None:
        """Keep a copy of the weights before the optimizer step (the only copy this takes, at logged steps)."""
        with torch.no_grad():
            self._before = [t.clone() for t in (_local(p.detach()) for p in self.params)]

    def update_ratios(self) -> dict[str, float]:
        """{"update_ratio/<group>": ||w - w_before|| / ||w_before||} since `snapshot` (then dropped)."""
        before, self._before = self._before, None
        if before is None:
            return {}
        with torch.no_grad():
            delta = torch._foreach_sub([_local(p.detach()) for p in self.params], before)
        updates, weights = self._group_norms(delta), self._group_norms(before)
        return {f"update_ratio/{g}": u / w for g, u, w in zip(self.groups, updates, weights) if w > 0}

    def histograms(self, kind: str, keep: bool = True) -> dict[str, tuple[list[float], list[float]]]:
        """{"gradients/<name>" or "parameters/<name>": (counts, edges)} for every parameter (`kind`: gradients
        or parameters). Under FSDP every rank gathers each tensor; a rank that does not `keep` them (not rank 0)
        only takes part in the gathers."""
        out = {}
        for name, p in zip(self.names, self.params):
            t = p.grad if kind == "gradients" else p.detach()
            if t is None:
                continue
            whole = _whole(t)
            h = histogram(whole) if keep else None
            if h is not None:
                out[f"{kind}/{name}"] = h
        return out
