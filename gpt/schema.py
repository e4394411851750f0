"""What each config value may be, checked once at the boundary: before an entry script does anything.

One table (RULES) gives every key of every composed config (conf/*.yaml with any group option) its rule;
`validate` walks the composed config, checks each value against its rule and raises one UserError that
names the full key, the value and what it must be (`optimizer.lr=-1 must be a positive number`). It also
reports values that are still unset (`???`) with how to set them, and a stage run by the wrong script.
tests/test_bad_inputs.py fails when a config key has no rule, so a new option cannot skip validation.

Only omegaconf is imported: validation runs before torch or any model code is loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from omegaconf import DictConfig, ListConfig, OmegaConf

from gpt.errors import UserError

MAX_NEW_TOKENS = 1_000_000  # far beyond any context this package trains; a typo (10**12) is refused, not run
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed's range


def _show(key: str, value: Any) -> str:
    return f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}"


@dataclass(frozen=True)
class Int:
    """An integer (not a bool, not a float) in low..high; null allowed when `null`."""
    low: int = 1
    high: int | None = None
    null: bool = False

    def what(self) -> str:
        if self.high is not None:
            return f"an integer in {self.low}..{self.high}"
        return "a positive integer" if self.low == 1 else f"an integer >= {self.low}"

    def ok(self, v: Any) -> bool:
        return (isinstance(v, int) and not isinstance(v, bool) and v >= self.low
                and (self.high is None or v <= self.high))


@dataclass(frozen=True)
class Number:
    """A finite int or float in the interval low..high (ends open or closed); null allowed when `null`."""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    null: bool = False

    def what(self) -> str:
        if self.high is None:
            return "a positive number" if self.low == 0 and self.low_open else f"a number >= {self.low}"
        return f"a number in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"

    def ok(self, v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            return False
        return self.high is None or (v < self.high if self.high_open else v <= self.high)


@dataclass(frozen=True)
class Numbers:
    """A list of exactly `count` numbers, each satisfying `each` (e.g. AdamW's betas)."""
    count: int
    each: Number
    null: bool = False

    def what(self) -> str:
        return f"a list of {self.count} numbers, each {self.each.what()}"

    def ok(self, v: Any) -> bool:
        return isinstance(v, list) and len(v) == self.count and all(self.each.ok(x) for x in v)


@dataclass(frozen=True)
class Choice:
    """One of a fixed set of strings."""
    options: tuple[str, ...]
    null: bool = False

    def what(self) -> str:
        return "one of " + ", ".join(self.options)

    def ok(self, v: Any) -> bool:
        return isinstance(v, str) and v in self.options


@dataclass(frozen=True)
class Device:
    """A torch device this package runs on: cpu, cuda, cuda:<index> (and auto where the run resolves it)."""
    auto: bool = False
    null: bool = False

    def what(self) -> str:
        return "cpu, cuda, cuda:<index>" + (" or auto" if self.auto else "")

    def ok(self, v: Any) -> bool:
        if not isinstance(v, str):
            return False
        if v in ("cpu", "cuda") or (self.auto and v == "auto"):
            return True
        return v.startswith("cuda:") and v[5:].isdigit()


@dataclass(frozen=True)
class Flag:
    null: bool = False

    def what(self) -> str:
        return "true or false"

    def ok(self, v: Any) -> bool:
        return isinstance(v, bool)


@dataclass(frozen=True)
class Text:
    """A string: free text (prompts, may be empty) or a name or path (non-empty)."""
    null: bool = False
    empty: bool = False

    def what(self) -> str:
        return "text" if self.empty else "a non-empty string"

    def ok(self, v: Any) -> bool:
        return isinstance(v, str) and (self.empty or v != "")


@dataclass(frozen=True)
class Texts:
    """A list of non-empty strings (non-empty list when `nonempty`)."""
    nonempty: bool = False
    null: bool = False

    def what(self) -> str:
        return ("a non-empty" if self.nonempty else "a") + " list of non-empty strings"

    def ok(self, v: Any) -> bool:
        return (isinstance(v, list) and (bool(v) or not self.nonempty)
                and all(isinstance(x, str) and x for x in v))


@dataclass(frozen=True)
class Node:
    """A config node that is a group's option (a mapping) or null (e.g. evaluate.py's data: the checkpoint's)."""
    null: bool = True

    def what(self) -> str:
        return "a config group option"

    def ok(self, v: Any) -> bool:
        return isinstance(v, dict)


Rule = Int | Number | Numbers | Choice | Device | Flag | Text | Texts | Node

PATH = Text()
OPTIONAL_PATH = Text(null=True)
DTYPE = Choice(("auto", "float32", "bfloat16", "float16"))
TOP_K = Int(1, null=True)
TOKENS = Int(1, MAX_NEW_TOKENS)

RULES: dict[str, Rule] = {
    # every entry script
    "seed": Int(0, MAX_SEED),
    "ckpt": OPTIONAL_PATH,
    "device": Device(),  # infer.py, serve.py, evaluate.py load onto this device
    "dtype": DTYPE,
    "quantize": Choice(("int8", "none"), null=True),
    "stage_script": Choice(("train.py", "finetune.py")),  # set by conf/stage/pretrain.yaml: the stage's script
    # train.py / finetune.py
    "resume": OPTIONAL_PATH,
    "trainer.max_iters": Int(1),
    "trainer.eval_interval": Int(1),
    "trainer.eval_iters": Int(1),
    "trainer.log_interval": Int(1),
    "trainer.batch_size": Int(1),
    "trainer.grad_accum_steps": Int(1),
    "trainer.grad_clip": Number(0, null=True),
    "trainer.skip_nonfinite": Int(0),
    "trainer.monitor": Text(),
    "trainer.mode": Choice(("auto", "min", "max")),
    "trainer.min_delta": Number(0),
    "trainer.patience": Int(0),
    "trainer.keep_top_k": Int(0),
    "trainer.save_interval": Int(1, null=True),
    "trainer.async_save": Flag(),
    "trainer.layer_stats": Flag(),
    "optimizer.lr": Number(0, low_open=True),
    "optimizer.weight_decay": Number(0),
    "optimizer.betas": Numbers(2, Number(0, 1, high_open=True)),
    "optimizer.eps": Number(0, low_open=True),
    "optimizer.momentum": Number(0, 1, high_open=True),
    "optimizer.nesterov": Flag(),
    "optimizer.fused": Flag(null=True),
    "optimizer.muon_lr": Number(0, low_open=True),  # optimizer=muon (gpt.optim.MuonAdamW)
    "optimizer.muon_weight_decay": Number(0),
    "optimizer.ns_steps": Int(1, 99),  # torch.optim.Muon refuses 100 or more
    "optimizer.adjust_lr_fn": Choice(("original", "match_rms_adamw"), null=True),
    "scheduler.schedule.warmup_iters": Int(0),
    "scheduler.schedule.total_iters": Int(1),
    "scheduler.schedule.min_lr_ratio": Number(0, 1),
    "hardware.device": Device(auto=True),
    "hardware.autocast_dtype": DTYPE,
    "hardware.data_parallel": Choice(("ddp", "fsdp")),
    "hardware.reshard_after_forward": Flag(),
    "hardware.cpu_offload": Flag(),
    "hardware.distributed": Flag(),
    "hardware.backend": Text(null=True),
    "hardware.compile": Flag(),
    "hardware.tf32": Flag(),
    "hardware.fused_adamw": Flag(),
    "hardware.pin_memory": Flag(),
    "hardware.threads": Int(1, null=True),
    "hardware.peak_flops": Number(0, low_open=True, null=True),
    "model.vocab_size": Int(1, null=True),
    "model.block_size": Int(1),
    "model.n_layer": Int(1),
    "model.n_head": Int(1),
    "model.n_embd": Int(1),
    "model.dropout": Number(0, 1, high_open=True),
    "model.bias": Flag(),
    "model.loss_chunk_size": Int(0),
    "model.attn_impl": Choice(("sdpa", "eager")),
    "model.activation_checkpointing": Flag(),
    "model.pos": Choice(("learned", "rope")),  # gpt.model.POSITIONS / NORMS / MLPS (tests/test_architecture.py)
    "model.rope_theta": Number(1, low_open=True),
    "model.norm": Choice(("layernorm", "rmsnorm")),
    "model.mlp": Choice(("gelu", "swiglu", "relu2")),
    "model.mlp_hidden": Int(1, null=True),
    "model.qk_norm": Flag(),
    "model.n_kv_head": Int(1, null=True),
    "model.tie_embeddings": Flag(),
    "model.vocab_multiple": Int(1, 4096),  # gpt.model.MAX_VOCAB_MULTIPLE
    "tokenizer.name": Text(),
    "tokenizer.vocab_size": Int(1, null=True),  # bpe: the size to train to (gpt.bpe refuses < 256 + special)
    "tokenizer.train_bytes": Int(1),
    "tokenizer.pattern": Choice(("cl100k",)),  # gpt.bpe.PATTERNS: a regex is chosen by name, never given
    "tokenizer.file": OPTIONAL_PATH,
    "data": Node(),
    "data.path": PATH,
    "data.val_path": OPTIONAL_PATH,
    "data.prompts": OPTIONAL_PATH,
    "data.prompts_val": OPTIONAL_PATH,
    "data.val_fraction": Number(0, 1),  # the sources refuse 0 and 1 where a split needs both parts
    "data.name": Text(),
    "data.text_column": Text(),
    "data.split": Text(),
    "data.config_name": Text(null=True),
    "data.plays": Texts(nonempty=True),
    "data.cache_dir": PATH,
    "data.num_proc": Int(1, null=True),  # null: every core
    "data.streaming": Flag(),
    "data.val_split": Text(null=True),
    "data.wait_timeout": Number(0, low_open=True),
    "paths.root_dir": PATH,
    "paths.cache_dir": PATH,
    "lora.r": Int(0),
    "lora.alpha": Number(0, low_open=True),
    "lora.dropout": Number(0, 1, high_open=True),
    "lora.targets": Texts(nonempty=True),
    "logger.project": Text(),
    "logger.entity": Text(null=True),
    "logger.mode": Choice(("online", "offline", "disabled")),
    "logger.tags": Texts(),
    "logger.group": Text(null=True),
    "logger.name": Text(null=True),
    "logger.dir": Text(null=True),
    "logger.log_checkpoint": Flag(),
    "logger.watch": Choice(("gradients", "parameters", "all"), null=True),
    "logger.watch_interval": Int(1),
    # stages (conf/stage/*.yaml); stage=rlhf's stage.reward.* / stage.ppo.* use the same rules (ALIASES)
    "stage.batch_size": Int(1),
    "stage.val_fraction": Number(0, 1),
    "stage.pin_memory": Flag(),
    "stage.sample_prompt": Text(empty=True),
    "stage.sample_tokens": Int(0),
    "stage.sample_temperature": Number(0),
    "stage.sample_top_k": TOP_K,
    "stage.num_samples": Int(0),
    "stage.eval_examples": Int(0),
    "stage.max_new_tokens": TOKENS,
    "stage.prompt_fraction": Number(0, 1, high_open=True),
    "stage.beta": Number(0),  # DPO's beta must also be > 0 (gpt.stages.dpo); GRPO's KL weight may be 0
    "stage.nll_weight": Number(0),
    "stage.lm_weight": Number(0),
    "stage.answer_logp": Flag(),
    "stage.prompts_per_rollout": Int(1),
    "stage.group_size": Int(2),
    "stage.minibatch_size": Int(1),
    "stage.epochs": Int(1),
    "stage.temperature": Number(0, low_open=True),
    "stage.top_k": TOP_K,
    "stage.clip": Number(0, low_open=True),
    "stage.value_clip": Number(0, low_open=True),
    "stage.vf_coef": Number(0),
    "stage.kl_coef": Number(0),
    "stage.gamma": Number(0, 1),
    "stage.lam": Number(0, 1),
    "stage.eval_prompts": Int(1),
    "stage.normalize_scores": Flag(),
    "stage.reward_ckpt": PATH,
    "stage.reward": Node(null=False),
    "stage.ppo": Node(null=False),
    # infer.py
    "prompt": Text(empty=True),
    "max_new_tokens": TOKENS,
    "temperature": Number(0),
    "top_k": TOP_K,
    "top_p": Number(0, 1, low_open=True, null=True),
    "num_samples": Int(1),
    "use_cache": Flag(),
    "chat": Flag(),
    "interactive": Flag(),
    # serve.py
    "host": Text(),
    "port": Int(1, 65535),
    "api_key": Text(null=True),
    "model_name": Text(null=True),
    "limits.max_prompt_chars": Int(1),
    "limits.max_new_tokens": TOKENS,
    "limits.max_queue": Int(0),
    "limits.max_batch": Int(1),
    "limits.batch_wait_ms": Number(0),
    "limits.max_body_bytes": Int(1),
    # evaluate.py
    "plot": OPTIONAL_PATH,
    "instructions": OPTIONAL_PATH,
    "labelled": OPTIONAL_PATH,
    "pairs": OPTIONAL_PATH,
    "perplexity.split": Choice(("all", "val", "train"), null=True),  # null: all of data=, else val
    "perplexity.batch_size": Int(1),
    "perplexity.stride": Int(1, null=True),
    "perplexity.max_tokens": Int(1, null=True),
    "generation.max_new_tokens": TOKENS,
    "generation.stop": Texts(null=True),  # null: a blank line (plain LM), <|end|> only (chat model)
    "samples.num": Int(0),
    "samples.prompt": Text(null=True, empty=True),
    "samples.max_new_tokens": TOKENS,
    "samples.temperature": Number(0),
    "samples.top_k": TOP_K,
    "harness.tasks": Texts(nonempty=True, null=True),  # lm-eval task names; null: no harness run
    "harness.include_path": OPTIONAL_PATH,
    "harness.limit": Int(1, null=True),
    "harness.num_fewshot": Int(0, null=True),
    "harness.batch_size": Int(1),
    "harness.apply_chat_template": Flag(),
    "harness.trust_task_code": Flag(),  # true: run include_path task files unchecked (they are code)
}

# Nested copies of other nodes: stage=rlhf overrides conf/stage/reward.yaml, ppo.yaml and trainer.*.
ALIASES = {"stage.reward.": "stage.", "stage.ppo.": "stage.", "stage.reward_trainer.": "trainer."}

# Keys whose rule differs by entry script (conf/<script>.yaml): a checkpoint to load is required there.
SCRIPT_RULES: dict[str, dict[str, Rule]] = {"infer": {"ckpt": PATH}, "serve": {"ckpt": PATH}}

# How to set a required value, by key (and by script where the command line differs).
HOW_TO_SET = {
    "ckpt": "ckpt=<checkpoint file or run folder>",
    ("finetune", "ckpt"): "ckpt=<parent checkpoint or run folder>",
    "data.path": "data.path=<file, folder or glob>",
    ("finetune", "data.path"): "data=<file.jsonl>",
    "data.name": "data.name=<dataset name or local folder>",
    "stage.reward_ckpt": "stage.reward_ckpt=<reward model run folder (finetune.py stage=reward)>",
}

# What resume=<run> takes from the checkpoint (gpt/experiment.py, gpt/finetuning.py): unset there is fine.
FROM_RESUMED = ("model", "tokenizer", "data", "stage", "lora", "ckpt")

# Which script runs a stage: conf/stage/pretrain.yaml says train.py; the fine-tuning stages name none
# (finetune.py also loads them as plain files for stage=rlhf, so they carry no extra key).
STAGE_SCRIPTS = {"train.py": "python train.py stage={name} [data=...]",
                 "finetune.py": "python finetune.py stage={name} ckpt=<run> data=<file>"}


def rule_for(key: str, script: str | None = None) -> Rule | None:
    """The rule of a dotted config key (None: no rule; `_target_`/`_partial_` name code, not values)."""
    if script in SCRIPT_RULES and key in SCRIPT_RULES[script]:
        return SCRIPT_RULES[script][key]
    for prefix, target in ALIASES.items():
        if key.startswith(prefix):
            key = target + key[len(prefix):]
    return RULES.get(key)


def is_code_key(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in ("_target_", "_partial_", "_convert_")


MISSING = object()


def leaves(node: DictConfig, prefix: str = ""):
    """(dotted key, value) for every value of `node`: MISSING for `???`; lists as plain lists; interpolated
    values are left out (their source key is checked, and the name in an error is the one the user set)."""
    for key in node:
        full = f"{prefix}{key}"
        if OmegaConf.is_missing(node, key):
            yield full, MISSING
            continue
        if OmegaConf.is_interpolation(node, key):
            continue
        value = node[key]
        if isinstance(value, DictConfig):
            if rule_for(full) is not None:  # a node with a rule of its own (stage.reward: {})
                yield full, {}
            yield from leaves(value, full + ".")
        elif isinstance(value, ListConfig):
            yield full, OmegaConf.to_container(value, resolve=True)
        else:
            yield full, value


def how_to_set(key: str, script: str | None) -> str:
    return HOW_TO_SET.get((script, key)) or HOW_TO_SET.get(key) or f"{key}=<value>"


def check_stage_script(cfg: DictConfig, script: str | None, choices: Mapping[str, Any]) -> None:
    if script not in ("train", "finetune") or "stage" not in cfg:
        return
    runs_in = cfg.get("stage_script") or "finetune.py"
    if runs_in not in STAGE_SCRIPTS:
        raise UserError(f"{_show('stage_script', runs_in)} must be {RULES['stage_script'].what()}")
    if runs_in != f"{script}.py":
        name = choices.get("stage") or "<stage>"
        kind = "fine-tuning stages run" if runs_in == "finetune.py" else "it runs"
        usage = STAGE_SCRIPTS.get(runs_in, f"python {runs_in} stage={{name}}").format(name=name)
        raise UserError(f"stage={name} is not a {script}.py stage; {kind} through {runs_in}: {usage}")


def check_missing(cfg: DictConfig, script: str | None) -> None:
    resuming = "resume" in cfg and not OmegaConf.is_missing(cfg, "resume") and bool(cfg.resume)
    missing = [k for k, v in leaves(cfg) if v is MISSING
               and not (resuming and k.split(".")[0] in FROM_RESUMED)]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise UserError(f"{' and '.join(missing)} {verb} not set; pass "
                        + " ".join(how_to_set(k, script) for k in missing))


def check_values(cfg: DictConfig, script: str | None) -> None:
    for key, value in leaves(cfg):
        rule = rule_for(key, script)
        if rule is None or value is MISSING:
            continue
        if value is None:
            if not rule.null:
                raise UserError(f"{key} is not set; pass {how_to_set(key, script)}" if isinstance(rule, Text)
                                else f"{key}=null must be {rule.what()}")
            continue
        if not rule.ok(value):
            raise UserError(f"{_show(key, value)} must be {'null or ' if rule.null else ''}{rule.what()}")
    if script == "evaluate" and not cfg.get("ckpt") and not cfg.get("plot"):
        raise UserError("ckpt is not set; pass ckpt=<checkpoint file or run folder> (or plot=<run or sweep folder>)")
    model = cfg.get("model")
    if isinstance(model, DictConfig) and not OmegaConf.is_missing(model, "n_embd") and "n_head" in model:
        n_embd, n_head = model.get("n_embd"), model.get("n_head")
        if Int(1).ok(n_embd) and Int(1).ok(n_head) and n_embd % n_head:
            raise UserError(f"model.n_embd={n_embd} is not divisible by model.n_head={n_head}; choose n_embd as a "
                            f"multiple of n_head (e.g. n_embd={n_head * max(1, round(n_embd / n_head))})")
        n_kv_head = model.get("n_kv_head")
        if Int(1).ok(n_head) and Int(1).ok(n_kv_head) and n_head % n_kv_head:
            raise UserError(f"model.n_kv_head={n_kv_head} must divide model.n_head={n_head} "
                            f"(one of {[d for d in range(1, n_head + 1) if n_head % d == 0]}), or be null for n_head")


def validate(cfg: DictConfig, script: str | None = None, choices: Mapping[str, Any] | None = None) -> None:
    """Check a composed config (conf/<script>.yaml after the command line) before anything runs: the stage
    belongs to this script, no required value is unset, every value fits its rule. -> UserError (one line)."""
    check_stage_script(cfg, script, choices or {})
    check_missing(cfg, script)
    check_values(cfg, script)
