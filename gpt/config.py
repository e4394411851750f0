"""Glue between Hydra configs and the library: resolvers, plain-dict conversion, entry-point wrapper."""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from gpt.errors import Interrupted, UserError

log = logging.getLogger("gpt")
_claimed: dict[str, str] = {}


def _claim(base: str) -> str:
    """Create and return `base`, or `base-1`, `base-2`, ... if another run already took it this second."""
    path, i = base, 1
    while True:
        try:
            os.makedirs(path)
            return path
        except FileExistsError:
            path, i = f"{base}-{i}", i + 1


def unique_dir(base: str) -> str:
    """Resolver for hydra.run.dir / hydra.sweep.dir: a run folder no other run shares.

    Under torchrun every local rank must use the same folder: local rank 0 claims it and publishes
    the name in a small file keyed by the torchrun run id and agent pid; the other ranks read it.
    """
    if base in _claimed:
        return _claimed[base]
    if int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1 and "TORCHELASTIC_RUN_ID" in os.environ:
        note = Path("/tmp") / f"gpt-rundir-{os.environ['TORCHELASTIC_RUN_ID']}-{os.getppid()}"
        if os.environ.get("LOCAL_RANK", "0") == "0":
            path = _claim(base)
            tmp = note.with_suffix(".tmp")
            tmp.write_text(path)
            os.replace(tmp, note)
        else:
            deadline = time.time() + 120
            while not note.exists():
                if time.time() > deadline:
                    raise RuntimeError(f"rank {os.environ.get('RANK')}: no run folder published by local rank 0")
                time.sleep(0.05)
            path = note.read_text()
    else:
        path = _claim(base)
    _claimed[base] = path
    return path


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("unique_dir"):
        OmegaConf.register_new_resolver("unique_dir", unique_dir)


def to_plain(cfg: DictConfig) -> dict:
    """The fully resolved config as plain dicts/lists (what checkpoints embed)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


def run_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # called outside @hydra.main (tests composing configs directly)
        return Path.cwd()


def _only_setup_files(folder: Path) -> bool:
    return all(p.name in (".hydra", "main.log", "train.log", "infer.log", "finetune.log", "evaluate.log")
               for p in folder.iterdir())


def user_error_in(exc: BaseException) -> UserError | None:
    """The UserError that caused `exc` (itself or along its __cause__ / __context__ chain), if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _remove_empty_parents(folder: Path, levels: int = 2) -> None:
    """Remove the date folder (and outputs/ itself) that only held the removed run, up to `levels` deep,
    never the working directory."""
    for _ in range(levels):
        if folder == Path.cwd() or not folder.is_dir() or any(folder.iterdir()):
            return
        folder.rmdir()
        folder = folder.parent


def entry(fn):
    """Wrap an entry point: a UserError becomes one line on stderr and exit code 2, and the run folder
    Hydra created for it is removed when nothing but its set-up files were written."""

    @functools.wraps(fn)
    def wrapper(cfg: DictConfig):
        try:
            return fn(cfg)
        except Interrupted as e:  # a signal stopped training after saving: its line, exit 128 + signal
            logging.shutdown()
            if str(e):
                print(e, file=sys.stderr)
            sys.exit(e.exit_code)
        except Exception as exc:
            e = user_error_in(exc)  # hydra.utils.instantiate wraps errors raised by constructors
            if e is None:
                raise
            folder = run_dir()
            logging.shutdown()
            if folder != Path.cwd() and folder.is_dir() and _only_setup_files(folder):
                shutil.rmtree(folder, ignore_errors=True)
                _remove_empty_parents(folder.parent)
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def file_shorthand(argv: list[str], key: str = "data", field: str = "path") -> list[str]:
    """finetune.py's `data=<file>` means `data.path=<file>`: there data is a JSONL file, while Hydra would
    take `data=<x>` for an option of the conf/data/ group that train.py uses. Sweeps (`data=a,b`) too."""
    prefix = f"{key}="
    return [f"{key}.{field}={a[len(prefix):]}" if a.startswith(prefix) else a for a in argv]


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)
