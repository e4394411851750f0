"""The trust boundary for values read from files a user was handed (checkpoints, exports).

Such a file may describe *what* to rebuild (a model's shape, a tokenizer's characters, a data source's
settings) but never *which code* runs: every `_target_` it holds, at any depth, must name one of the
classes or functions this package's own config groups (conf/<group>/*.yaml) name for that group, and
nothing else in it may be a Hydra special key (`_args_`, `_recursive_`, ...). Values must be plain (str,
int, float, bool, None, lists and dicts of them). `checked()` enforces that and returns a plain copy.
Such a copy enters OmegaConf only through `as_config()`, which escapes every `${` so that text read from a
file stays text: an interpolation would run a resolver (`oc.env` reads the environment, `unique_dir`
creates folders).
"""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from gpt.errors import UserError

CONF = Path(__file__).resolve().parent / "conf"
# Only this package's own code may be named by a file, and the torch optimizers its conf/optimizer/ ships.
PACKAGE_PREFIXES = ("gpt.", "torch.optim.")
ALLOWED_KEYS = ("_target_", "_partial_")
MAX_DEPTH = 32                   # deeper nesting is an attack (RecursionError), not a config


def _targets_in(node, nested: bool, depth: int = 0) -> set[str]:
    """The `_target_` values in a YAML node: at its top (nested=False) or below it (nested=True)."""
    out = set()
    if isinstance(node, dict):
        if "_target_" in node and (depth > 0) == nested:
            out.add(str(node["_target_"]))
        for v in node.values():
            out |= _targets_in(v, nested, depth + 1)
    elif isinstance(node, list):
        for v in node:
            out |= _targets_in(v, nested, depth + 1)
    return out


@functools.cache
def allowed_targets(group: str, nested: bool = False) -> frozenset[str]:
    """The `_target_`s a file may name in config group `group`, at the group node's top or (nested=True)
    below it: those this package's conf/<group>/*.yaml name there that are this package's own code
    (`gpt.` ...) or the torch optimizers it ships. An empty set for any other group."""
    folder = CONF / group
    found: set[str] = set()
    if folder.is_dir():
        for f in sorted(folder.glob("*.yaml")):
            text = f.read_text()
            node = yaml.safe_load(text) or {}
            if "@package _global_" in text.split("\n_", 1)[0]:  # the group's node sits under its own name
                node = node.get(group) or {}
            found |= _targets_in(node, nested)
    if group == "model" and not nested:  # the model registry decides which model classes a file may name
        from gpt.heads import model_classes

        found |= set(model_classes())
    return frozenset(t for t in found if t.startswith(PACKAGE_PREFIXES))


def checked(node, group: str, origin: str, path: str | None = None, depth: int = 0):
    """A plain copy of `node` (a config node read from `origin`, e.g. a checkpoint file) in which every
    `_target_` is one of allowed_targets(group); refuse anything else with one line naming the key."""
    where = path or group
    if depth > MAX_DEPTH:
        raise UserError(f"{origin}: {where} is nested more than {MAX_DEPTH} levels deep; refusing it")
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if not isinstance(key, str):
                raise UserError(f"{origin}: {where} has a non-string key {key!r}; refusing it")
            sub = f"{where}.{key}"
            if key == "_target_":
                allowed = allowed_targets(group, nested=depth > 0)
                if not isinstance(value, str) or value not in allowed:
                    raise UserError(f"{origin}: {sub}={str(value)[:80]!r} is not one of this package's "
                                    f"{group} classes allowed there {sorted(allowed)}; refusing to build it "
                                    f"(a file may describe a model, never choose the code that runs)")
                out[key] = value
            elif key.startswith("_") and key.endswith("_"):
                if key not in ALLOWED_KEYS or not isinstance(value, bool):
                    raise UserError(f"{origin}: {sub} is a Hydra instantiation key a file may not set; refusing it")
                out[key] = value
            else:
                out[key] = checked(value, group, origin, sub, depth + 1)
        return out
    if isinstance(node, (list, tuple)):
        return [checked(v, group, origin, f"{where}[{i}]", depth + 1) for i, v in enumerate(node)]
    if isinstance(node, str):
        return node
    if isinstance(node, float) and not math.isfinite(node):
        raise UserError(f"{origin}: {where}={node!r} is not a finite number; refusing it")
    if node is None or isinstance(node, (bool, int, float)):
        return node
    raise UserError(f"{origin}: {where} is a {type(node).__name__}, not a plain config value; refusing it")


# The config groups a checkpoint's config is rebuilt from (train.py / finetune.py resume=, the stages and
# evaluate.py): each is checked when the checkpoint is loaded, so every entry point refuses the same files.
REBUILT_GROUPS = ("model", "tokenizer", "data", "stage", "lora")


def checked_config(config, origin: str) -> dict:
    """The checkpoint's config with its rebuilt groups checked (see `checked`); other groups (optimizer,
    trainer, hardware, logger, ...) are kept as records only: nothing builds them from a file."""
    if not isinstance(config, dict):
        raise UserError(f"{origin}: its config is a {type(config).__name__}, not a dict; "
                        f"pass a .pt file written by train.py or finetune.py")
    out = dict(config)
    for group in REBUILT_GROUPS:
        if group in config and config[group] is not None:
            if not isinstance(config[group], dict):
                raise UserError(f"{origin}: config.{group} is a {type(config[group]).__name__}, not a dict; "
                                f"refusing it")
            out[group] = checked(config[group], group, origin, f"config.{group}")
    if not isinstance(config.get("model"), dict):
        raise UserError(f"{origin}: its config has no model node; pass a .pt file written by train.py or finetune.py")
    return out


def _escaped(node):
    if isinstance(node, dict):
        return {k: _escaped(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_escaped(v) for v in node]
    if isinstance(node, str):  # n backslashes before ${ -> 2n + 1: the backslashes and the ${ stay literal
        return re.sub(r"(\\*)\$\{", lambda m: "\\" * (2 * len(m.group(1)) + 1) + "${", node)
    return node


def as_config(node: dict) -> DictConfig:
    """An OmegaConf node of a (checked) plain dict read from a file, in which no string is an interpolation:
    resolving it gives back exactly the strings of the file."""
    return OmegaConf.create(_escaped(node))
