"""The interface between the training loop and a stage: what gpt.trainer.Trainer calls on an objective,
and what a fine-tuning run also reads from one. Stages implement it (gpt.stages.common holds their
shared base classes); nothing else needs to know which stage it holds."""

from __future__ import annotations

from typing import Any, Callable, ContextManager, Protocol, runtime_checkable

import torch

from gpt.tokenizer import Tokenizer

Autocast = Callable[[], ContextManager]  # a fresh autocast context per use (gpt.trainer.Precision.autocast)


@runtime_checkable
class Objective(Protocol):
    """How a batch becomes a loss and metrics. The loop owns everything else (precision, accumulation,
    clipping, schedule, distribution, evaluation cadence, logging, checkpoints, resume)."""

    def train_batch(self) -> Any:
        """The next training batch of this rank (any structure `loss` and `batch_tokens` understand)."""

    def batch_tokens(self, batch: Any) -> int:
        """How many trained tokens `batch` holds (for tokens/s and token counts)."""

    def loss(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, dict]:
        """-> (scalar loss to backpropagate, {name: scalar} metrics of this batch)."""

    def evaluate(self, model: torch.nn.Module, iters: int, autocast: Autocast) -> dict:
        """-> {"val/loss": ..., other "val/..." and "train/..." metrics}; iters bounds the work."""

    def samples(self, model: torch.nn.Module, autocast: Autocast) -> list[dict]:
        """A few generations to log, [{"prompt", "text"}] (may be empty)."""

    def state_dict(self) -> dict:
        """What a checkpoint must hold so a resumed run draws the same batches."""

    def load_state_dict(self, state: dict) -> None: ...


@runtime_checkable
class StageObjective(Objective, Protocol):
    """A fine-tuning stage (finetune.py stage=...): it also builds its model and tokenizer from the parent
    checkpoint, and says what its checkpoints record beyond the loop's own state."""

    name: str
    model: torch.nn.Module
    tokenizer: Tokenizer

    def checkpoint_extra(self) -> dict:
        """{"model_config": the node that rebuilds `model`, ...stage-specific plain values}."""
