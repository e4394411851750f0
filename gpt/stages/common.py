"""The base classes of the stage objectives (gpt.objective.Objective is the interface the loop calls):
seeded batch draws saved in checkpoints, shuffled example batches, masked language-model batches, RL
rollouts; and the loss and validation helpers more than one stage uses. A stage module holds one
objective and imports this module and the library, never another stage module."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gpt.encoding import lm_batch
from gpt.errors import UserError
from gpt.model import GPT
from gpt.rl import RolloutBuffer, answer_text, sample_answers


def positive_batch_size(batch_size) -> int:
    if int(batch_size) <= 0:
        raise UserError(f"trainer.batch_size={batch_size} must be a positive integer")
    return int(batch_size)


@torch.no_grad()
def masked_lm_loss(model: GPT, examples: list, batch_size: int, device, autocast) -> float:
    """Token-weighted mean cross-entropy over the trained tokens of (ids, train_mask) examples."""
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        x, y = lm_batch(examples[i: i + batch_size], device)
        with autocast():
            _, loss = model(x, y, ignore_index=-1)
        n = int((y >= 0).sum())
        total, count = total + float(loss) * n, count + n
    return total / max(count, 1)


def token_logprobs(model: GPT, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y (B, T) -> (log p(y_t | x_<=t) (B, T) float32, logits (B, T, V)); entries where y == -1 are 0."""
    logits, _ = model(x)
    logp = F.log_softmax(logits.float(), dim=-1).gather(-1, y.clamp(min=0)[..., None]).squeeze(-1)
    return logp * (y >= 0), logits


def sequence_logprob(model: GPT, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of the trained tokens of each row (B,)."""
    return token_logprobs(model, x, y)[0].sum(-1)


class SeededObjective:
    """What every stage objective shares: a per-rank batch generator (`self.generator`) whose state
    is saved in checkpoints, so a resumed run draws the same batches."""

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def samples(self, model, autocast) -> list[dict]:
        return []


class ExampleObjective(SeededObjective):
    """An objective over a list of examples (`self.train`), drawn in shuffled batches of
    `self.batch_size` (a fresh permutation per epoch) and turned into tensors by `self._batch(examples)`.

    Its state is the generator state at the start of the current epoch and the number of batches taken
    from that epoch, so a resumed run continues mid-epoch with exactly the batches it would have drawn."""

    _order = None
    _epoch = None  # (generator state before this epoch's permutation, batches taken from it)

    def _batches(self, skip: int = 0):
        n, size = len(self.train), self.batch_size
        while True:
            start = self.generator.get_state()
            perm = torch.randperm(n, generator=self.generator).tolist()
            for k, i in enumerate(range(0, n - size + 1 if n >= size else 1, size)):
                if k < skip:
                    continue
                self._epoch = (start, k + 1)
                yield perm[i: i + size]
            skip = 0

    def train_batch(self):
        if self._order is None:
            self._order = self._batches()
        return self._batch([self.train[i] for i in next(self._order)])

    def state_dict(self) -> dict:
        if self._epoch is None:
            return super().state_dict()
        return {"generator": self._epoch[0], "taken": self._epoch[1]}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self._order = self._batches(skip=int(state.get("taken", 0)))


class MaskedLMObjective(ExampleObjective):
    """Language-model examples (ids, train_mask) -> next-token loss on the trained tokens only (sft,
    completion); evaluation is the token-weighted loss over the first iters batches of `self.val`."""

    def _batch(self, examples):
        return lm_batch(examples, self.device)

    @staticmethod
    def batch_tokens(batch) -> int:
        return int((batch[1] >= 0).sum())

    @staticmethod
    def loss(model, batch):
        x, y = batch
        _, loss = model(x, y, ignore_index=-1)
        return loss, {}

    def val_loss(self, model, iters: int, autocast) -> float:
        return masked_lm_loss(model, self.val[: iters * self.batch_size], self.batch_size, self.device, autocast)


class RolloutObjective(SeededObjective):
    """An RL objective: `self.rollout()` samples a RolloutBuffer, whose minibatches (several epochs)
    are served one per trainer step before the next rollout. Batches hold targets "y" (-1 = ignored)."""

    buffer: RolloutBuffer | None = None

    def state_dict(self) -> dict:
        """The generator, and what is left of the current rollout (its tensors and the minibatch order still
        to serve), so a run resumed mid-rollout trains on the same minibatches the uninterrupted run does."""
        state = super().state_dict()
        if self.buffer is not None and self.buffer.order:
            state["buffer"] = {"data": dict(self.buffer.data), "order": list(self.buffer.order)}
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        saved = state.get("buffer")
        self.buffer = RolloutBuffer.restored(saved["data"], saved["order"]) if saved else None

    def drop_partial(self) -> None:
        """A run resumed on another number of ranks: the rest of a rollout only some ranks had is dropped, so
        every rank samples its next rollout (gathers, collectives) at the same step."""
        self.buffer = None

    def train_batch(self):
        batch = self.buffer.next() if self.buffer is not None else None
        if batch is None:
            self.buffer = self.rollout()
            batch = self.buffer.next()
        return batch

    @staticmethod
    def batch_tokens(batch) -> int:
        return int((batch["y"] >= 0).sum())

    def samples(self, model, autocast) -> list[dict]:
        """Greedy answers to the first three held-out prompts (self.prompts, a gpt.rl.PromptSet), with the
        reference answer where the prompt carries one."""
        rows = self.prompts.val[:3]
        with autocast():
            answers = sample_answers(model, [r["ids"] for r in rows], self.max_new_tokens, self.end, 0.0)
        out = []
        for r, a in zip(rows, answers):
            text = f"{r['prompt']!r} -> {answer_text(self.tokenizer, a, self.end)!r}"
            if r.get("answer") is not None:
                text += f" (reference {r['answer']!r})"
            out.append({"prompt": r["prompt"], "text": text})
        return out

    def _note(self, **values) -> None:
        """Record training statistics (rollout reward, KL, ...) until the next evaluation reports them."""
        if not hasattr(self, "stats"):
            self.stats: dict[str, list[float]] = {}
        for k, v in values.items():
            self.stats.setdefault(k, []).append(float(v.detach()) if torch.is_tensor(v) else float(v))

    def _train_means(self) -> dict:
        """{"train/<name>": mean since the last call} of what _note recorded; starts a new window."""
        out = {f"train/{k}": sum(v) / len(v) for k, v in getattr(self, "stats", {}).items() if v}
        self.stats = {}
        return out


def validation_means(objective, model, iters: int, autocast) -> dict:
    """Item-weighted means of the objective's loss and metrics over its first iters * batch_size
    validation items (objective.val, objective._batch, objective.loss) -> {"val/<name>": value}."""
    sums, n = {}, 0
    for i in range(0, min(len(objective.val), iters * objective.batch_size), objective.batch_size):
        items = objective.val[i: i + objective.batch_size]
        with autocast():
            loss, m = objective.loss(model, objective._batch(items))
        for k, v in {"loss": loss, **m}.items():
            sums[k] = sums.get(k, 0.0) + float(v) * len(items)
        n += len(items)
    return {f"val/{k}": v / max(n, 1) for k, v in sums.items()}
