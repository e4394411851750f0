"""Glue between Hydra configs and the library: resolvers, plain-dict conversion, entry-point wrapper."""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

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


def _note_path() -> Path:
    """The file through which local rank 0 tells the other local ranks of one torchrun job its run folder."""
    job = f"{os.environ['TORCHELASTIC_RUN_ID']}-{os.getppid()}-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    return Path(tempfile.gettempdir()) / f"gpt-rundir-{job}"


def _read_note(note: Path) -> str:
    """Wait for local rank 0's note, read it, and acknowledge; the last local rank to read removes the note
    and the acknowledgements (each rank reads it once, so nothing is left in the temp folder)."""
    deadline = time.time() + 120
    while not note.exists():
        if time.time() > deadline:
            raise RuntimeError(f"rank {os.environ.get('RANK')}: no run folder published by local rank 0")
        time.sleep(0.05)
    path = note.read_text()
    Path(f"{note}.read-{os.environ['LOCAL_RANK']}").touch()
    readers = [Path(f"{note}.read-{r}") for r in range(1, int(os.environ["LOCAL_WORLD_SIZE"]))]
    if all(p.exists() for p in readers):  # every other local rank has read it (more than one may see this)
        for p in (note, *readers):
            p.unlink(missing_ok=True)
    return path


def _claim_in_store(base: str) -> str:
    """Every rank of a torchrun job, on every node, uses global rank 0's folder: rank 0 claims it and publishes
    the name in torchrun's own key-value store (the agent's TCPStore at MASTER_ADDR:MASTER_PORT, which every
    worker reaches before the process group exists); the others wait for it there. The key is the job's run
    id, restart count and the folder's kind (outputs, multirun, ...): the nodes' clocks give their own `base`."""
    from datetime import timedelta

    from torch.distributed import TCPStore

    store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                     timeout=timedelta(seconds=120))
    key = (f"gpt/run_dir/{os.environ['TORCHELASTIC_RUN_ID']}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
           f"{Path(base).parts[0] if Path(base).parts else ''}")
    if os.environ.get("RANK", "0") == "0":
        path = _claim(base)
        store.set(key, path)
        return path
    try:
        return store.get(key).decode()
    except Exception as e:  # the store's timeout: rank 0 never published (it failed before, or hangs)
        raise RuntimeError(f"rank {os.environ.get('RANK')}: global rank 0 published no run folder in 120 s "
                           f"({type(e).__name__})") from None


def unique_dir(base: str) -> str:
    """Resolver for hydra.run.dir / hydra.sweep.dir: a run folder no other run shares.

    Under torchrun every rank must use the same folder. Where torchrun's agent hosts the job's store (its
    default), global rank 0 claims the folder and the others read its name from the store, across nodes
    (`_claim_in_store`). Otherwise local rank 0 claims it and publishes the name in a small temp file keyed by
    the torchrun run id, agent pid and restart count; the other local ranks read it, and the last of them to
    read removes it.
    """
    if base in _claimed:
        return _claimed[base]
    if (int(os.environ.get("WORLD_SIZE", "1")) > 1 and "TORCHELASTIC_RUN_ID" in os.environ
            and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and "MASTER_ADDR" in os.environ):
        path = _claim_in_store(base)
    elif int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1 and "TORCHELASTIC_RUN_ID" in os.environ:
        note = _note_path()
        if os.environ.get("LOCAL_RANK", "0") == "0":
            path = _claim(base)
            tmp = note.with_suffix(".tmp")
            tmp.write_text(path)
            os.replace(tmp, note)
        else:
            path = _read_note(note)
    else:
        path = _claim(base)
    _claimed[base] = path
    return path


def cuda_available() -> bool:
    """${cuda_available:} in a preset: what a setting is worth only on a GPU (fused AdamW, pinned batches) follows
    the machine the run starts on, as hardware.device=auto does."""
    import torch

    return torch.cuda.is_available()


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("unique_dir"):
        # cached in the config: the jobs of a launcher that runs them in other processes (joblib, submitit)
        # receive the pickled config with the folder the launcher claimed, instead of claiming one each
        OmegaConf.register_new_resolver("unique_dir", unique_dir, use_cache=True)
    if not OmegaConf.has_resolver("cuda_available"):
        OmegaConf.register_new_resolver("cuda_available", cuda_available)


def to_plain(cfg: DictConfig) -> dict:
    """The fully resolved config as plain dicts/lists (what checkpoints embed)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


def run_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # called outside @hydra.main (tests composing configs directly)
        return Path.cwd()


SETUP_FILES = (".hydra", "main.log", "train.log", "infer.log", "finetune.log", "evaluate.log")


def close_log_files() -> None:
    """Flush and close the job's log file (the FileHandler Hydra's job logging puts on the root logger), before
    its folder is removed or the process exits. Not logging.shutdown(): that closes every handler of the process,
    and some close the stream they were given (absl's, which rouge-score imports), so a process that goes on
    (a test run) would lose its stderr."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        root.removeHandler(handler)  # a record logged after this would reopen the file
        handler.close()


def remove_unused_run_dir(folder: str | Path) -> bool:
    """Delete a run folder that holds nothing but what Hydra set up (.hydra/, the job's log), and the folders
    above it that held only it (outputs/<date>/, outputs/), up to the working directory: never that, nor
    anything outside it. -> whether the run folder was removed."""
    folder, cwd = Path(folder).resolve(), Path.cwd().resolve()
    if folder == cwd or not folder.is_dir() or not all(p.name in SETUP_FILES for p in folder.iterdir()):
        return False
    close_log_files()
    shutil.rmtree(folder, ignore_errors=True)
    for parent in folder.parents:
        if parent == cwd or not parent.is_relative_to(cwd) or any(parent.iterdir()):
            break
        parent.rmdir()
    return True


def remove_resume_record() -> None:
    """A resume in place (resume_in_place) that failed on bad input: remove Hydra's record of that command
    (.hydra/resume-<n>/) from the run folder; the run itself is untouched."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    sub = hc.output_subdir or ""
    if sub.startswith(".hydra/resume-") and "/" not in sub[len(".hydra/"):]:
        shutil.rmtree(Path(hc.runtime.output_dir) / sub, ignore_errors=True)


def user_error_in(exc: BaseException) -> UserError | None:
    """The UserError that caused `exc` (itself or along its __cause__ / __context__ chain), if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _missing_value_in(exc: BaseException) -> UserError | None:
    """A value left at `???` that was read before validation saw it (omegaconf's MissingMandatoryValue), as
    the one-line error validation gives."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, MissingMandatoryValue) and exc.full_key:
            from gpt.schema import how_to_set

            return UserError(f"{exc.full_key} is not set; pass {how_to_set(exc.full_key, None)}")
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def validate_job(cfg: DictConfig | None) -> None:
    """Check the composed config of the Hydra job being run (gpt.schema.validate) before it does anything."""
    from hydra.core.hydra_config import HydraConfig

    if cfg is None or not HydraConfig.initialized():  # called outside @hydra.main (tests call wrapped functions)
        return
    from gpt.schema import validate

    hydra_cfg = HydraConfig.get()
    validate(cfg, hydra_cfg.job.config_name, hydra_cfg.runtime.choices)


def entry(fn):
    """Wrap an entry point: the composed config is validated first (gpt.schema); a UserError (or a value
    left unset) becomes one line on stderr and exit code 2, and the run folder Hydra created for it is
    removed when nothing but its set-up files were written."""

    @functools.wraps(fn)
    def wrapper(cfg: DictConfig):
        try:
            validate_job(cfg)
            return fn(cfg)
        except Interrupted as e:  # a signal stopped training after saving: its line, exit 128 + signal
            close_log_files()
            if str(e):
                print(e, file=sys.stderr)
            sys.exit(e.exit_code)
        except Exception as exc:
            e = user_error_in(exc) or _missing_value_in(exc)  # instantiate wraps errors raised by constructors
            if e is None:
                raise
            close_log_files()
            remove_unused_run_dir(run_dir())
            remove_resume_record()
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def file_shorthand(argv: list[str], key: str = "data", field: str = "path") -> list[str]:
    """finetune.py's `data=<file>` means `data.path=<file>`: there data is a JSONL file, while Hydra would
    take `data=<x>` for an option of the conf/data/ group that train.py uses. Sweeps (`data=a,b`) too."""
    prefix = f"{key}="
    return [f"{key}.{field}={a[len(prefix):]}" if a.startswith(prefix) else a for a in argv]


# Values taken literally from the command line, whatever characters they hold (Hydra's grammar would read
# `今天`, `~`, `=`, `[`, quotes, ... as syntax): free text, where `${...}` stays text too and a comma is text
# (no sweep), and paths, where a comma separates the values of a sweep (`-m ckpt=a,b`), `null` means unset
# and `${...}` interpolates (`data.path=${oc.env:DATA}/x.txt`).
FREE_TEXT = ("prompt", "system", "stage.sample_prompt", "samples.prompt")
PATH_KEYS = ("ckpt", "resume", "data.path", "data.val_path", "data.prompts", "data.prompts_val", "data.name",
             "instructions", "pairs", "labelled", "plot", "stage.reward_ckpt")


def hydra_quote(text: str, interpolate: bool = False) -> str:
    """`text` as a Hydra quoted value that composes back to exactly `text`. Backslashes are doubled where
    the grammar would read them as escapes (before a quote, at the end); `${` is escaped for OmegaConf
    unless `interpolate`."""
    if not interpolate:  # OmegaConf: \${ is a literal ${; backslashes before it double to stay literal
        text = re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", text)
    text = re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), text)
    return f"'{text}'"


@functools.lru_cache(maxsize=1)
def _override_parser():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


def _parses(override: str):
    """Hydra's reading of one `key=value` override, or None where its grammar refuses it."""
    try:
        return _override_parser().parse_override(override)
    except Exception:
        return None


def _reads_as_itself(value: str) -> bool:
    """Hydra would read `value` unquoted as exactly this string: then it is passed on unchanged, so that what
    Hydra records of the command line (the job's overrides, sweep labels) stays as typed."""
    parsed = _parses(f"k={value}")
    return (parsed is not None and not parsed.is_sweep_override() and isinstance(parsed.value(), str)
            and parsed.value() == value)


def _unquoted(value: str) -> str | None:
    """The text of a value quoted whole the way Hydra quotes (`"ROMEO:"`, `'it\\'s'`), else None: such a
    value keeps meaning its text, as it did when Hydra read it."""
    if len(value) < 2 or value[0] not in "'\"" or value[-1] != value[0]:
        return None
    parsed = _parses(f"k={value}")
    return parsed.value() if parsed is not None and isinstance(parsed.value(), str) else None


def _literal_text(value: str) -> str:
    whole = _unquoted(value)
    if whole is not None:
        value = whole
    return value if _reads_as_itself(value) and "${" not in value else hydra_quote(value)


def _literal_path(value: str) -> str:
    """One path, or several separated by commas (a sweep); null stays unset; `${...}` interpolates."""
    whole = _unquoted(value)
    parts = [whole] if whole is not None else value.split(",")
    out = []
    for p in parts:
        if whole is None and _unquoted(p) is not None:
            p = _unquoted(p)
        plain = (p == "null" and whole is None) or _reads_as_itself(p)
        out.append(p if plain else hydra_quote(p, interpolate=True))
    return ",".join(out)


def literal_overrides(argv: list[str]) -> list[str]:
    """sys.argv with the values of free-text keys (FREE_TEXT) and paths (PATH_KEYS) quoted for Hydra where its
    grammar would read them otherwise, so that `prompt=今天 天气`, `data.path=~/corpus/` or `prompt=a=b, [c]`
    reach the program as typed; other values Hydra's grammar refuses (`temperature=1=2`) are quoted too, so
    that validation names their key. Entry scripts apply it before Hydra reads the command line; flags and
    hydra.* overrides pass unchanged."""
    out = list(argv[:1])
    for arg in argv[1:]:
        key, eq, value = arg.partition("=")
        name = key.lstrip("+")
        if arg.startswith("-") or not eq or name.startswith(("hydra.", "~")) or not name:
            out.append(arg)
        elif name in FREE_TEXT:
            out.append(f"{key}={_literal_text(value)}")
        elif name in PATH_KEYS:
            out.append(f"{key}={_literal_path(value)}")
        elif _parses(arg) is None:
            out.append(f"{key}={hydra_quote(value)}")
        else:
            out.append(arg)
    return out


def resume_folder(value: str) -> Path | None:
    """The run folder a `resume=` value continues in place: the folder itself, or the one whose
    checkpoints/last.pt it names, when it is a run folder (Hydra's .hydra/ and a metrics.jsonl); None for
    anything else (best.pt or another file: that run's later history would be overwritten; a copied file)."""
    p = Path(value).expanduser()
    if p.is_dir():
        folder = p
    elif p.name == "last.pt" and p.parent.name == "checkpoints":
        folder = p.parent.parent
    else:
        return None
    ok = (folder / ".hydra").is_dir() and (folder / "metrics.jsonl").is_file() and (
        folder / "checkpoints" / "last.pt").is_file()
    return Path(os.path.realpath(folder)) if ok else None


def resume_in_place(argv: list[str]) -> list[str]:
    """train.py / finetune.py `resume=<run folder or its last.pt>`: continue in that run folder (its
    metrics.jsonl, plots and checkpoints continue; Hydra's record of the resumed job goes to
    .hydra/resume-<n>/, the original .hydra/ stays) by adding hydra.run.dir and hydra.output_subdir to the
    command line. Not for sweeps (-m), not when hydra.run.dir is given (that folder is used), not for files
    other than a run's last.pt (a new folder, which starts with the history up to the checkpoint)."""
    values = [a.split("=", 1)[1] for a in argv[1:] if a.startswith(("resume=", "+resume="))]
    if (not values or len(values) > 1 or any(a in ("-m", "--multirun") or a.startswith(("hydra.run.dir=", "hydra.mode="))
                                             for a in argv[1:])):
        return argv
    folder = resume_folder(values[0])
    if folder is None:
        return argv
    n = 1
    while (folder / ".hydra" / f"resume-{n}").exists():
        n += 1
    subdir = f".hydra/resume-{n}"
    return [*argv, f"hydra.run.dir={hydra_quote(str(folder))}", f"hydra.output_subdir={hydra_quote(subdir)}"]


def history_until(path: Path, step: int) -> None:
    """A run continued in place from a checkpoint of `step`: drop the metrics.jsonl rows after it (steps the
    interrupted run took after its last save, which the resumed run takes again) and the summary rows (the run
    did not end there), so the file reads as one run. Written to a temp file, then renamed."""
    if not path.is_file():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    kept = []
    for line in rows:
        try:
            row = json.loads(line)
        except ValueError:  # a line cut by a kill mid-write: not history
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step and not any(
                str(k).startswith("summary/") for k in row):
            kept.append(line)
    if len(kept) != len(rows):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept))
        os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)
