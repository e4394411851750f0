"""Pieces the fine-tuning stages share: the parent model (with a grown vocabulary), padded batches,
per-token log-probabilities, and kind checks on parent checkpoints."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gpt.checkpoint import model_from_checkpoint
from gpt.errors import UserError
from gpt.model import GPT

LM = "gpt.model.GPT"


def positive_batch_size(batch_size) -> int:
    if int(batch_size) <= 0:
        raise UserError(f"trainer.batch_size={batch_size} must be a positive integer")
    return int(batch_size)


def kind_of(ckpt: dict) -> str:
    """The model class a checkpoint holds (its config's model._target_)."""
    return str(ckpt["config"]["model"].get("_target_", ""))


def require_kind(ckpt: dict, kinds: tuple[str, ...], stage: str, role: str = "ckpt") -> None:
    """Refuse a checkpoint of the wrong kind (e.g. a classifier given to ppo) with a clear message."""
    kind = kind_of(ckpt)
    if kind not in kinds:
        raise UserError(f"{role}={ckpt['path']!r} holds a {kind} (stage={ckpt.get('stage', 'pretrain')}); "
                        f"stage={stage} needs {' or '.join(kinds)} there")


def require_same_tokenizer(a: dict, b: dict, role: str) -> None:
    if a["tokenizer"] != b["tokenizer"]:
        raise UserError(f"{role}={b['path']!r} uses tokenizer {b['tokenizer'].get('type')} "
                        f"{b['tokenizer'].get('name', '')} with special tokens {b['tokenizer'].get('special', [])}, "
                        f"but ckpt={a['path']!r} uses {a['tokenizer'].get('type')} {a['tokenizer'].get('name', '')} "
                        f"with {a['tokenizer'].get('special', [])}; both must come from the same tokenizer")


def model_config(model: torch.nn.Module) -> dict:
    """The config node that rebuilds `model` from a checkpoint (gpt.checkpoint.build_model)."""
    cls = type(model)
    return {"_target_": f"{cls.__module__}.{cls.__qualname__}", **model.hparams()}


def grow_vocab(model: GPT, vocab_size: int) -> GPT:
    """A copy of `model` with `vocab_size` rows in its tied embedding / output layer: the parent's rows
    are copied, new rows (special tokens) start at the mean embedding so their logits start ordinary."""
    old = model.lm_head.weight.data
    if vocab_size == old.size(0):
        return model
    hp = model.hparams()
    hp["vocab_size"] = vocab_size
    new = type(model)(**hp).to(old.device)
    state = model.state_dict()
    w = old.mean(0, keepdim=True).repeat(vocab_size, 1)
    w[: old.size(0)] = old
    state["lm_head.weight"] = state["transformer.wte.weight"] = w
    new.load_state_dict(state)
    return new


def lm_from_parent(parent: dict, vocab_size: int, device: str) -> GPT:
    """The parent language model, in train mode, with its vocabulary grown to `vocab_size`."""
    return grow_vocab(model_from_checkpoint(parent, device), vocab_size).train()


def frozen(model: torch.nn.Module) -> torch.nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def with_head(cls, parent: dict, vocab_size: int, device: str, **head_args) -> torch.nn.Module:
    """A headed model (`cls`, a GPT subclass with a `head`) whose backbone is the parent LM (vocabulary
    grown to `vocab_size`); the head keeps its own initialisation."""
    lm = lm_from_parent(parent, vocab_size, device)
    model = cls(**lm.hparams(), **head_args).to(device)
    missing, unexpected = model.load_state_dict(lm.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("head.") for k in missing), (missing, unexpected)
    return model.train()


def right_pad(seqs: list[list[int]], value: int, device) -> torch.Tensor:
    """Token lists -> (B, T_max) tensor, right-padded with `value`. Under causal attention no real
    token attends to the padding after it, so right padding needs no attention mask."""
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out.to(device)


def lm_batch(examples: list[tuple[list[int], list[bool]]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, train_mask) examples -> x (B, T), y (B, T) with y = next token where it is trained, else -1
    (prompt tokens and padding are masked out of the loss)."""
    xs = [ids[:-1] for ids, _ in examples]
    ys = [[t if m else -1 for t, m in zip(ids[1:], mask[1:])] for ids, mask in examples]
    return right_pad(xs, 0, device), right_pad(ys, -1, device)


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


def fit_block(examples: list, block_size: int, where: str, log) -> list:
    """Drop examples longer than block_size + 1 tokens (with a warning); refuse if none are left."""
    kept = [e for e in examples if len(e[0]) <= block_size + 1]
    if not kept:
        raise UserError(f"{where}: every example is longer than the model's block_size={block_size} + 1 tokens")
    if len(kept) < len(examples):
        log.warning("%s: %d of %d examples are longer than block_size + 1 = %d tokens and were dropped", where,
                    len(examples) - len(kept), len(examples), block_size + 1)
    return kept


def split_val(items: list, val_items: list | None, fraction: float, seed: int, where: str) -> tuple[list, list]:
    """(train, val): `val_items` if given, else a seeded held-out fraction of `items`."""
    if val_items is not None:
        return items, val_items
    if len(items) < 2:
        raise UserError(f"{where}: needs at least 2 records to hold out a validation split (or pass val_data=)")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(items), generator=g).tolist()
    n_val = min(len(items) - 1, max(1, round(len(items) * fraction)))
    return [items[i] for i in perm[n_val:]], [items[i] for i in perm[:n_val]]


class Objective:
    """What every stage objective shares: a per-rank batch generator (`self.generator`) whose state
    is saved in checkpoints, so a resumed run draws the same batches."""

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def samples(self, model, autocast) -> list[dict]:
        return []


class ExampleObjective(Objective):
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


class RolloutObjective(Objective):
    """An RL objective: `self.rollout()` samples a RolloutBuffer, whose minibatches (several epochs)
    are served one per trainer step before the next rollout. Batches hold targets "y" (-1 = ignored)."""

    buffer = None

    def train_batch(self):
        batch = self.buffer.next() if self.buffer is not None else None
        if batch is None:
            self.buffer = self.rollout()
            batch = self.buffer.next()
        return batch

    @staticmethod
    def batch_tokens(batch) -> int:
        return int((batch["y"] >= 0).sum())

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
