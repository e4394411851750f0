"""Checkpoints: one dict per file, written atomically, loaded without running code (weights_only).

A checkpoint holds `model` (state dict without torch.compile/DDP prefixes), `optimizer`,
`scheduler`, `step`, `best_val_loss`, `config` (the fully resolved run config as plain containers),
`tokenizer` (its identity dict), `rng` (torch/python/numpy/batch-sampler states) and `logger`
(e.g. the W&B run id), so infer.py and a resumed run rebuild everything from the file alone.

A LoRA run's checkpoint is the plain state dict plus `<layer>.lora_A` / `<layer>.lora_B` keys; the
functions that read and merge such checkpoints live here, over the adapters of gpt.lora.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
from pathlib import Path

import torch
import torch.nn as nn

from gpt.errors import UserError
from gpt.heads import model_classes
from gpt.lora import LoRALinear, excluded, merge_lora
from gpt.trust import checked_config

log = logging.getLogger(__name__)

REQUIRED_KEYS = ("model", "config", "tokenizer", "step")
_PREFIXES = ("_orig_mod.", "module.")


def clean_state_dict(state: dict) -> dict:
    """Strip torch.compile ('_orig_mod.') and DDP ('module.') prefixes from parameter names."""
    out = {}
    for k, v in state.items():
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (full disk, quota, permissions); the file it would replace is intact."""


def _write_failure(path: Path, error: BaseException, free_bytes: int | None) -> str:
    """One line for a failed write. torch's own file writer reports a full disk only as an `enforce fail at
    inline_container.cc` RuntimeError, so that case is told apart by the free space left at the time."""
    kept = "the previous checkpoint is intact" if path.exists() else "no partial file was left"
    full = isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
    if full or (isinstance(error, RuntimeError) and free_bytes is not None and free_bytes < 1 << 20):
        return f"no space left on device while writing {path}; {kept}"
    reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error).splitlines()[0]
    return f"could not write {path} ({reason}); {kept}"


def save_checkpoint(obj: dict, path: str | Path) -> Path:
    """torch.save to a temp file in the same folder, flushed to disk, then renamed over `path` (atomic on
    POSIX): a kill, a crash or a full disk leaves the previous file or the new one, never a mix. A failed
    write removes its temp file and raises CheckpointWriteError (one line); a kill -9 can leave the temp
    file (`.<name>.tmp-<pid>`), which remove_stale_temps clears when the next run starts."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:  # a Python file, so a full disk surfaces as OSError(ENOSPC)
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not any(m in str(e) for m in ("inline_container", "write failed")):
            raise  # not an I/O failure
        free = shutil.disk_usage(path.parent).free if path.parent.is_dir() else None
        raise CheckpointWriteError(_write_failure(path, e, free)) from None
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable across a power loss (a kill alone needs nothing: the page cache survives it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete the `.<name>.pt.tmp-<pid>` files a killed save_checkpoint left in `folder` (only that naming, so
    other programs' temp files are safe; those of a process still running on this machine are kept)
    -> the paths removed."""
    removed = []
    for p in Path(folder).glob(".*.pt.tmp-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if p.is_file() and not (pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid))):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def choose_checkpoint(path: str | Path, prefer: str = "best") -> tuple[Path, str]:
    """-> (the checkpoint file `path` names, why that file): a .pt file is itself; a run folder gives its
    checkpoints/<prefer>.pt, falling back to the other. A path through a symlink (ckpt=outputs/latest) is
    returned resolved, so what is loaded, reported and recorded as lineage names the real run."""
    if path is None or str(path) in ("", "None", "???"):
        raise UserError("no checkpoint given; pass ckpt=<checkpoint file or run folder>")
    p = _through_links(Path(str(path)).expanduser())
    if p.is_dir():
        order = [prefer, "last" if prefer == "best" else "best"]
        for name in order:
            for cand in (p / "checkpoints" / f"{name}.pt", p / f"{name}.pt"):
                if cand.is_file():
                    why = f"{name}.pt of the run folder" + ("" if name == prefer else f": it has no {prefer}.pt")
                    return cand, why
        raise UserError(f"run folder {str(path)!r} has no checkpoints/best.pt or checkpoints/last.pt; "
                        f"pass a run folder that finished at least one evaluation, or a .pt file")
    if not p.exists():
        raise UserError(f"checkpoint {str(path)!r} does not exist; pass an existing .pt file or run folder")
    return p, "the file given"


def resolve_checkpoint(path: str | Path, prefer: str = "best") -> Path:
    """A checkpoint file, or a run folder (uses checkpoints/<prefer>.pt, falling back to the other)."""
    return choose_checkpoint(path, prefer)[0]


def _through_links(p: Path) -> Path:
    """`p` with its symlinks resolved (relative to the working folder when it lies under it); `p` as given when
    no symlink is on the way."""
    real = p.resolve()
    if real == p.absolute():
        return p
    cwd = Path.cwd().resolve()
    return real.relative_to(cwd) if real.is_relative_to(cwd) else real


def _why_this_file(ckpt: dict, path: Path, why: str) -> str:
    """One line for stderr: which file was loaded, and why (the monitored metric's best for a best.pt)."""
    step, rec = ckpt.get("step"), ckpt.get("monitor")
    if not (isinstance(rec, dict) and isinstance(rec.get("value"), (int, float)) and rec.get("metric")):
        rec = {"metric": "val/loss", "mode": "min", "value": ckpt.get("val_loss"), "step": step} \
            if path.name == "best.pt" and isinstance(ckpt.get("val_loss"), (int, float)) else None
    if path.name == "best.pt" and rec is not None and rec.get("step") == step:
        best = "highest" if rec.get("mode") == "max" else "lowest"
        why += f": {best} {rec['metric']} {rec['value']:.4f} at step {step}"
        if (path.parent / "last.pt").is_file():
            why += f"; pass {path.parent / 'last.pt'} for the final weights"
    else:
        why += f", step {step}"
    return f"checkpoint: {path} ({why})"


def load_checkpoint(path: str | Path, prefer: str = "best", map_location="cpu") -> dict:
    """Load and validate a checkpoint (no code execution: weights_only=True). Logs (gpt.checkpoint, INFO) which
    file it loaded and why: into the run's log for train/finetune/evaluate, on stderr for infer.py and serve.py
    (conf/hydra/job_logging/stderr.yaml; never stdout, where infer.py's samples go)."""
    p, why = choose_checkpoint(path, prefer)
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # any unreadable file: pickle, zip, key and index errors alike
        raise UserError(f"{str(p)!r} is not a checkpoint file: torch.load could not read it as weights-only "
                        f"data ({type(e).__name__}); pass a .pt file written by train.py or finetune.py") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        raise UserError(f"{str(p)!r} is not a checkpoint of this project (expected a dict with keys "
                        f"{list(REQUIRED_KEYS)})")
    check_shape(ckpt, repr(str(p)))
    ckpt["model"] = clean_state_dict(ckpt["model"])
    ckpt["config"] = checked_config(ckpt["config"], f"checkpoint {str(p)!r}")
    ckpt["path"] = str(p)
    log.info(_why_this_file(ckpt, p, why))
    return ckpt


def check_shape(ckpt: dict, origin: str) -> None:
    """Refuse a checkpoint-shaped dict whose fields have the wrong types, before anything uses them."""
    state = ckpt["model"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise UserError(f"checkpoint {origin}: 'model' is not a state dict of named tensors")
    if not isinstance(ckpt["step"], int) or isinstance(ckpt["step"], bool) or ckpt["step"] < 0:
        raise UserError(f"checkpoint {origin}: 'step'={ckpt['step']!r} is not a non-negative integer")
    if not isinstance(ckpt["tokenizer"], dict):
        raise UserError(f"checkpoint {origin}: 'tokenizer' is a {type(ckpt['tokenizer']).__name__}, not a dict")
    for key in ("best_val_loss", "val_loss"):
        if key in ckpt and not isinstance(ckpt[key], (int, float)):
            raise UserError(f"checkpoint {origin}: {key!r}={ckpt[key]!r} is not a number")
    for key in ("optimizer", "scheduler", "rng", "quantized", "lineage"):
        if ckpt.get(key) is not None and not isinstance(ckpt[key], dict):
            raise UserError(f"checkpoint {origin}: {key!r} is a {type(ckpt[key]).__name__}, not a dict")
    for key in ("stage", "resumed_from"):
        if ckpt.get(key) is not None and not isinstance(ckpt[key], str):
            raise UserError(f"checkpoint {origin}: {key!r} is a {type(ckpt[key]).__name__}, not a string")


def file_sha256(path: str | Path) -> str:
    """Content hash of a file, recorded as lineage by runs that start from a checkpoint."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_model(ckpt: dict) -> torch.nn.Module:
    """A freshly initialised model of the class and shape the checkpoint's config names.

    The config may only name a model class registered in gpt.heads.model_classes(), and its arguments must be
    plain values: a shared checkpoint cannot make us construct or call anything else.
    """
    node = dict(ckpt["config"]["model"])
    target = str(node.pop("_target_", ""))
    cls = model_classes().get(target)
    if cls is None:
        raise UserError(f"checkpoint {ckpt.get('path')!r} names model class {target!r}, which is not one of "
                        f"{sorted(model_classes())}; refusing to build it")
    for key, value in node.items():
        if not isinstance(value, (int, float, str, bool, type(None))):
            raise UserError(f"checkpoint {ckpt.get('path')!r}: model argument {key!r} is not a plain value")
    try:
        return cls(**node)
    except UserError as e:
        raise UserError(f"checkpoint {ckpt.get('path')!r}: {e}") from None
    except (TypeError, ValueError, RuntimeError) as e:  # e.g. an unknown argument, a negative size
        raise UserError(f"checkpoint {ckpt.get('path')!r}: model config does not fit {target} "
                        f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def model_from_checkpoint(ckpt: dict, device: str = "cpu") -> torch.nn.Module:
    """Rebuild the model from the checkpoint's embedded config and load its weights (eval mode).

    A LoRA run's checkpoint (lora_A / lora_B weights, the config's `lora` node) is rebuilt with the same
    adapters and returned merged into a plain model (gpt.lora), so callers never see the adapters."""
    model = build_model(ckpt)
    lora = rebuild_for_state(model, ckpt)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise UserError(f"checkpoint {ckpt.get('path')!r}: weights do not fit its config "
                        f"({str(e).splitlines()[0]})") from None
    if lora:
        merge_lora(model)
    return model.to(device).eval()


# ---- LoRA checkpoints -----------------------------------------------------------------------------
def adapter_ranks(state: dict) -> dict[str, int]:
    """{layer name: r} of the LoRA adapters in a state dict (empty for a plain one)."""
    return {k[: -len(".lora_A")]: int(v.shape[0]) for k, v in state.items() if k.endswith(".lora_A")}


def rebuild_for_state(model: nn.Module, ckpt: dict) -> bool:
    """Give a freshly built model the adapters its checkpoint's state dict holds (layers and ranks from
    the keys, alpha from the config's `lora` node). -> whether there were any."""
    ranks = adapter_ranks(ckpt["model"])
    if not ranks:
        return False
    node = (ckpt.get("config") or {}).get("lora") or {}
    if "alpha" not in node:
        raise UserError(f"checkpoint {ckpt.get('path')!r} holds LoRA adapters but its config has no lora.alpha")
    for name, r in ranks.items():
        try:
            base = model.get_submodule(name)
        except AttributeError:
            base = None
        if not isinstance(base, nn.Linear):
            raise UserError(f"checkpoint {ckpt.get('path')!r}: LoRA adapter on {name!r}, which is not a Linear "
                            f"layer of its model")
        if excluded(name):  # apply_lora never puts one there (the output layer and heads train in full or not)
            raise UserError(f"checkpoint {ckpt.get('path')!r}: LoRA adapter on {name!r}, a layer LoRA never adapts "
                            f"here; this file was not written by finetune.py")
        model.set_submodule(name, LoRALinear(base, r, float(node["alpha"]), 0.0))
    return True


def merged_checkpoint(ckpt: dict) -> dict:
    """A plain checkpoint from a LoRA one: merged weights, no optimizer state (it was the adapters'), the
    config's `lora` node moved to `lora_merged` (with the source file)."""
    if not adapter_ranks(ckpt["model"]):
        raise UserError(f"{ckpt['path']!r} holds no LoRA adapters (no lora_A/lora_B weights): nothing to merge")
    model = model_from_checkpoint(ckpt)
    out = {k: v for k, v in ckpt.items() if k not in ("path", "optimizer", "scheduler", "scaler")}
    config = dict(ckpt["config"])
    config["lora_merged"] = {**(config.pop("lora", None) or {}), "source": ckpt["path"],
                             "source_sha256": file_sha256(ckpt["path"])}
    out["config"] = config
    out["model"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return out
