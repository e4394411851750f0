"""The model a fine-tuning stage starts from: what class a parent checkpoint holds (checked against the
classes a stage accepts, never against a string), its language model with a grown vocabulary, a headed
model on its backbone, frozen copies, and the config node that rebuilds a model from a checkpoint."""

from __future__ import annotations

import torch

from gpt.checkpoint import model_from_checkpoint
from gpt.errors import UserError
from gpt.heads import model_classes
from gpt.model import GPT


def class_name(cls: type) -> str:
    """A model class as checkpoints name it (its config's model._target_), e.g. gpt.model.GPT."""
    return f"{cls.__module__}.{cls.__qualname__}"


def model_config(model: torch.nn.Module) -> dict:
    """The config node that rebuilds `model` from a checkpoint (gpt.checkpoint.build_model)."""
    return {"_target_": class_name(type(model)), **model.hparams()}


def model_class(ckpt: dict) -> type | None:
    """The class of our own a checkpoint's model is (its model._target_ looked up in gpt.checkpoint's
    registry), or None for a target the registry does not name."""
    target = ckpt["config"]["model"].get("_target_", "")
    return model_classes().get(target) if isinstance(target, str) else None


def require_kind(ckpt: dict, kinds: tuple[type, ...], stage: str, role: str = "ckpt") -> None:
    """Refuse a checkpoint whose model is not exactly one of `kinds` (e.g. a classifier given to ppo: a
    Classifier is a GPT subclass, but not a language model a stage may fine-tune) with a clear message."""
    cls = model_class(ckpt)
    if cls not in kinds:
        held = class_name(cls) if cls is not None else str(ckpt["config"]["model"].get("_target_", ""))
        raise UserError(f"{role}={ckpt['path']!r} holds a {held} (stage={ckpt.get('stage', 'pretrain')}); "
                        f"stage={stage} needs {' or '.join(class_name(k) for k in kinds)} there")


def require_same_tokenizer(a: dict, b: dict, role: str) -> None:
    if a["tokenizer"] != b["tokenizer"]:
        raise UserError(f"{role}={b['path']!r} uses tokenizer {b['tokenizer'].get('type')} "
                        f"{b['tokenizer'].get('name', '')} with special tokens {b['tokenizer'].get('special', [])}, "
                        f"but ckpt={a['path']!r} uses {a['tokenizer'].get('type')} {a['tokenizer'].get('name', '')} "
                        f"with {a['tokenizer'].get('special', [])}; both must come from the same tokenizer")


def grow_vocab(model: GPT, vocab_size: int) -> GPT:
    """A copy of `model` with `vocab_size` rows in its embedding and output layer (one tied matrix, or two):
    the parent's rows are copied, new rows (special tokens) start at that matrix's mean row, so their logits
    start ordinary. With model.vocab_multiple the new tokens take padding rows while they fit, else the padding
    grows; padding rows (never scored) get the mean row too."""
    old_vocab = model.config.vocab_size
    if vocab_size == old_vocab:
        return model
    hp = model.hparams()
    hp["vocab_size"] = vocab_size
    new = type(model)(**hp).to(model.lm_head.weight.device)
    rows_now = new.config.padded_vocab_size
    state = model.state_dict()
    for key in ("transformer.wte.weight", "lm_head.weight"):  # a tied model's two keys hold the same matrix
        rows = state[key][:old_vocab]  # the parent's real tokens, not its padding
        grown = rows.mean(0, keepdim=True).repeat(rows_now, 1)
        grown[:old_vocab] = rows
        state[key] = grown
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
