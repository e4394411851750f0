"""Run folders read back: a run's metrics.jsonl (`read_metrics`) and what it adds up to (`run_summary`,
with `peak_memory` for the end-of-run summary), the jobs of a sweep folder and the overrides that tell
them apart (`sweep_jobs`, `job_labels`). The files are written by gpt.tracking's MetricsFile and by Hydra.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("gpt")


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl file (gpt.tracking.MetricsFile), in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def run_summary(rows: list[dict]) -> dict:
    """What a run's metrics.jsonl rows add up to.

    -> {"tokens": tokens seen at the last log step (counted from step 0, so a resumed run includes the
    steps before it), "tokens_per_sec" and "mfu": means over the logged windows (each measures training
    steps only, not evals), "best_val_loss" and "best_val_step": the lowest val/loss logged in this file,
    "final_val_loss"}; keys whose rows are missing are left out.
    """
    out: dict = {}
    logs = [r for r in rows if r.get("train/tokens") is not None]
    if logs:
        out["tokens"] = int(logs[-1]["train/tokens"])
    for key in ("tokens_per_sec", "mfu"):
        values = [r[f"train/{key}"] for r in rows if r.get(f"train/{key}") is not None]
        if values:
            out[key] = sum(values) / len(values)
    evals = [r for r in rows if r.get("val/loss") is not None]
    if evals:
        best = min(evals, key=lambda r: r["val/loss"])
        out.update(best_val_loss=best["val/loss"], best_val_step=best["step"], final_val_loss=evals[-1]["val/loss"])
    return out


def peak_memory(device) -> tuple[int, str]:
    """-> (bytes, what was measured): the peak CUDA memory allocated by tensors on a GPU; elsewhere the
    process's peak resident set size (everything the process held, libraries included)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "CUDA tensors"
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "process RSS"  # Linux reports KiB


def sweep_jobs(folder: str | Path, marker: str = "metrics.jsonl") -> list[Path]:
    """The job folders of a sweep folder (multirun/<date>/<time>/<job>/) that hold `marker`, in job order."""
    jobs = [p.parent for p in Path(folder).glob(f"*/{marker}")]
    return sorted(jobs, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))


def job_overrides(job: str | Path) -> list[str]:
    """The command-line overrides Hydra recorded for a job (.hydra/overrides.yaml), or [] if none."""
    path = Path(job) / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    from omegaconf import OmegaConf

    return [str(o) for o in OmegaConf.load(path)]


def job_labels(jobs: list[Path]) -> list[str]:
    """One short label per job: its overrides that differ between the jobs (all of them for a lone job),
    joined by spaces; the folder name where a job has none."""
    overrides = [job_overrides(j) for j in jobs]
    common = set.intersection(*(set(o) for o in overrides)) if len(jobs) > 1 else set()
    labels = []
    for job, own in zip(jobs, overrides):
        varying = [o for o in own if o not in common]
        labels.append(" ".join(varying) or Path(job).name)
    return labels


# ---- the `latest` pointers ------------------------------------------------------------------------------
def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def point_latest(root: str | Path, target: str | Path, name: str = "latest") -> Path | None:
    """Make `root/<name>` a relative symlink to `target`, atomically (a symlink under a temp name renamed over
    the old one: a reader sees the old link or the new, never none). -> the link, or None where `target` is
    not inside `root` (a run folder chosen by hand elsewhere) or the filesystem refused (a warning)."""
    root, target = Path(root), Path(target)
    if not _inside(target, root):
        return None
    link, tmp = root / name, root / f".{name}.tmp-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp.unlink(missing_ok=True)
        os.symlink(os.path.relpath(target.resolve(), root.resolve()), tmp)
        os.replace(tmp, link)
    except OSError as e:  # a real folder named `latest`, a filesystem without symlinks: the run goes on
        tmp.unlink(missing_ok=True)
        log.warning("could not point %s at %s (%s)", link, target, e.strerror or e)
        return None
    return link


def _is_main_rank() -> bool:
    """Global rank 0 (or no torchrun at all): the one process that writes the pointers."""
    return os.environ.get("RANK", "0") == "0"


class LatestLink(Callback):
    """Hydra callback (conf/hydra/default.yaml, conf/evaluate.yaml): `<run_root>/latest` points at the newest run
    folder, `<sweep_root>/latest` at the newest sweep folder, so `ckpt=outputs/latest` loads the last run.

    The link is set when a run starts (a running run is the newest). If the run folder is gone when the process
    ends (gpt.config.remove_unused_run_dir deletes the folder of a run refused on bad input, then exits), the link
    goes back to where it pointed before, or is removed."""

    def __init__(self, run_root: str = "outputs", sweep_root: str = "multirun"):
        self.run_root, self.sweep_root = Path(run_root), Path(sweep_root)

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.get().mode != RunMode.MULTIRUN:  # a sweep's jobs are reached through <sweep_root>/latest
            self._point(self.run_root, Path(HydraConfig.get().runtime.output_dir))

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._point(self.sweep_root, Path(str(config.hydra.sweep.dir)))

    def _point(self, root: Path, target: Path) -> None:
        if not _is_main_rank():
            return
        link = root / "latest"
        previous = os.readlink(link) if link.is_symlink() else None
        if point_latest(root, target) is not None:
            atexit.register(_restore_latest, link, os.readlink(link), previous)


def _restore_latest(link: Path, mine: str, previous: str | None) -> None:
    """At exit: if `link` still points at this process's run folder and that folder was removed, point it back
    at `previous` (when that still exists) or remove it, and the root folder with it when nothing else is left."""
    if not link.is_symlink() or os.readlink(link) != mine or (link.parent / mine).exists():
        return
    if previous is not None and (link.parent / previous).is_dir():
        point_latest(link.parent, link.parent / previous)
        return
    link.unlink(missing_ok=True)
    root, cwd = link.parent.resolve(), Path.cwd().resolve()
    if root != cwd and root.is_relative_to(cwd) and not any(root.iterdir()):
        root.rmdir()  # as remove_unused_run_dir would have, had the link not been there



def _cell(value) -> str:
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# ---- the best job of a training sweep -------------------------------------------------------------------
def rank_jobs(jobs: list[dict]) -> tuple[list[dict], str, str]:
    """The finished jobs (describe_run rows) best first -> (ranked, metric, mode). The monitored metric where the
    summary rows name one (summary/monitor, summary/monitor_mode, summary/best_monitor), else the lowest
    best val loss. Jobs without a value are left out."""
    named = [j for j in jobs if j.get("monitor") and j.get("best_monitor") is not None]
    if named:
        metric, mode = named[0]["monitor"], named[0].get("monitor_mode") or "min"
        scored = [(j["best_monitor"], j) for j in named if j["monitor"] == metric]
    else:
        metric, mode = "val/loss", "min"
        scored = [(j["best_val_loss"], j) for j in jobs if isinstance(j.get("best_val_loss"), (int, float))]
    scored.sort(key=lambda vj: vj[0] if mode == "min" else -vj[0])
    return [j for _, j in scored], metric, mode


def summarise_sweep(sweep_dir: str | Path) -> tuple[str, dict | None]:
    """A markdown table of a training sweep's jobs and its best job; writes summary.md and best_job.json
    ({folder, overrides, metric, mode, value}) into the sweep folder. -> (table text, best job or None)."""
    from gpt.config import write_json

    sweep_dir = Path(sweep_dir)
    folders = sweep_jobs(sweep_dir)
    jobs = [describe_run(j) for j in folders]
    ranked, metric, mode = rank_jobs(jobs)
    best_col = "best val/loss" if metric == "val/loss" else f"best {metric} ({mode})"
    rows = [[Path(j["folder"]).name, label, j.get("final_val_loss"),
             j.get("best_val_loss") if metric == "val/loss" else j.get("best_monitor"),
             j.get("step"), j.get("status")]
            for j, label in zip(jobs, job_labels(folders))]
    text = markdown_table(["job", "run", "final val/loss", best_col, "steps", "status"], rows)
    best = None
    if ranked:
        top = ranked[0]
        value = top["best_val_loss"] if metric == "val/loss" else top["best_monitor"]
        best = {"folder": top["folder"], "overrides": top["overrides"], "metric": metric, "mode": mode,
                "value": value}
        write_json(sweep_dir / "best_job.json", best)
        text += f"\nbest job: {top['folder']} ({metric} {value:.4f}, {mode})\n"
    (sweep_dir / "summary.md").write_text(text)
    return text, best


class SweepSummary(Callback):
    """Hydra callback (conf/hydra/default.yaml): after `train.py -m ...` (grid or optuna), print the jobs and the
    best one's folder, and record them in the sweep folder (summary.md, best_job.json)."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        # Optuna logs through colorlog, which colours even a file or a pipe unless NO_COLOR is set (the common
        # convention; colorlog honours it). Importing optuna here to lower its verbosity would cost ~3 s per sweep.
        import sys

        if not sys.stderr.isatty() and "FORCE_COLOR" not in os.environ:
            os.environ.setdefault("NO_COLOR", "1")

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not _is_main_rank() or not sweep_jobs(sweep_dir):
            return
        text, best = summarise_sweep(sweep_dir)
        print(f"\n{text}" + ("" if best else "best job: none (no job logged a validation metric)\n")
              + f"sweep summary: {sweep_dir / 'summary.md'}", flush=True)


# ---- listing runs: python -m gpt.runs / gpt-runs ------------------------------------------------------------
def _tolerant_metrics(path: Path) -> list[dict]:
    """read_metrics, but a last line cut short (a run killed while writing it) is dropped, not an error."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise ValueError(f"{path.name} line {i + 1} is not JSON") from None
    return rows


def _plain(path: Path) -> dict:
    """A YAML file Hydra wrote, as plain containers, interpolations left unresolved (nothing is evaluated)."""
    from omegaconf import OmegaConf

    node = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    return node if isinstance(node, dict) else {}


def summary_row(rows: list[dict]) -> dict:
    """The end-of-run summary row of metrics.jsonl ({"summary/...": ...}) without the prefix; {} if the run did not
    finish."""
    summary = [r for r in rows if any(k.startswith("summary/") for k in r)]
    return {k[len("summary/"):]: v for k, v in summary[-1].items() if k.startswith("summary/")} if summary else {}


def describe_run(folder: str | Path) -> dict:
    """What the files of one run folder say (nothing is imported or unpickled): {folder, script, stage, model,
    overrides, step, max_iters, final_val_loss, best_val_loss, monitor, best_monitor, tokens_per_sec, status}.
    status is `finished` (the summary row is there), `unfinished` (interrupted, crashed or still running) or
    `unreadable` with the reason in `error`."""
    folder = Path(folder)
    out: dict = {"folder": str(folder), "started": _started(folder)}
    try:
        hydra = _plain(folder / ".hydra" / "hydra.yaml").get("hydra", {})
        config = _plain(folder / ".hydra" / "config.yaml")
        choices = (hydra.get("runtime") or {}).get("choices") or {}
        model = config.get("model") if isinstance(config.get("model"), dict) else {}
        shape = " ".join(f"{k}={model[k]}" for k in ("n_layer", "n_embd") if isinstance(model.get(k), int))
        out.update(script=(hydra.get("job") or {}).get("name"), stage=choices.get("stage"),
                   model=" ".join(x for x in (choices.get("model"), shape) if x) or None,
                   overrides=job_overrides(folder))
        trainer = config.get("trainer") if isinstance(config.get("trainer"), dict) else {}
        out["max_iters"] = trainer.get("max_iters") if isinstance(trainer.get("max_iters"), int) else None
        metrics = folder / "metrics.jsonl"
        rows = _tolerant_metrics(metrics) if metrics.is_file() else []
        steps = [r["step"] for r in rows if isinstance(r.get("step"), int)]
        totals, summary = run_summary([r for r in rows if "val/loss" in r or "train/tokens" in r]), summary_row(rows)
        out.update(step=max(steps) if steps else None,
                   final_val_loss=summary.get("val_loss", totals.get("final_val_loss")),
                   best_val_loss=summary.get("best_val_loss", totals.get("best_val_loss")),
                   monitor=summary.get("monitor"), monitor_mode=summary.get("monitor_mode"),
                   best_monitor=summary.get("best_monitor"),
                   tokens_per_sec=summary.get("tokens_per_sec", totals.get("tokens_per_sec")),
                   status="finished" if summary else "unfinished")
    except Exception as e:  # a listing shows every folder; one it cannot read says why, in its row
        out.update(status="unreadable", error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return out


def _started(folder: Path) -> float:
    """When the run started: Hydra writes .hydra/config.yaml first (the folder's own time when that is missing)."""
    for p in (folder / ".hydra" / "config.yaml", folder):
        try:
            return p.stat().st_mtime
        except OSError:
            continue
    return 0.0


def run_folders(folders: list[str | Path]) -> list[Path]:
    """The run folders (each holds .hydra/) under `folders`, sweep jobs included, newest last. `latest` links
    are not followed (the run they point at is listed once, where it is); a folder given by name is."""
    found: set[Path] = set()
    for top in map(Path, folders):
        if (top / ".hydra").is_dir():
            found.add(top)
        for parent, dirs, _ in os.walk(top):  # os.walk does not descend into symlinked folders
            if ".hydra" in dirs and Path(parent) != top:
                found.add(Path(parent))
            dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("checkpoints", "wandb")]
    return sorted(found, key=lambda p: (_started(p), str(p)))


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.{digits}f}"
    return str(value)


def runs_table(runs: list[dict], width: int = 48) -> str:
    """A plain aligned table, a row per run (long override lists are cut to `width` characters)."""
    header = ["folder", "script", "model", "overrides", "steps", "final val", "best val", "tok/s", "status"]
    monitored = any(r.get("monitor") not in (None, "val/loss") for r in runs)
    if monitored:
        header.insert(7, "best monitored")
    rows = []
    for r in runs:
        if r["status"] == "unreadable":
            rows.append([r["folder"], *[""] * (len(header) - 2), f"unreadable ({r['error']})"])
            continue
        overrides = " ".join(r["overrides"])
        steps = "" if r["step"] is None else f"{r['step']}/{_fmt(r['max_iters']) or '?'}"
        row = [r["folder"], "/".join(x for x in (r["script"], r["stage"]) if x), r["model"] or "",
               overrides if len(overrides) <= width else overrides[:width - 3] + "...", steps,
               _fmt(r["final_val_loss"]), _fmt(r["best_val_loss"]), _fmt(r["tokens_per_sec"]), r["status"]]
        if monitored:
            row.insert(7, f"{r['monitor']} {_fmt(r['best_monitor'])}" if r.get("monitor") else "")
        rows.append(row)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in [header, *rows]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """python -m gpt.runs [folder ...] [--json]: the runs under the folders (default outputs/ and multirun/)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="gpt-runs", description="List the run folders under the given folders "
                                     "(default: outputs/ and multirun/ here), newest last.")
    parser.add_argument("folders", nargs="*", help="run, sweep or output folders")
    parser.add_argument("--json", action="store_true", help="one JSON list of the rows, for scripts")
    args = parser.parse_args(argv)
    folders = args.folders or [f for f in ("outputs", "multirun") if Path(f).is_dir()]
    missing = [f for f in folders if not Path(f).is_dir()]
    if missing:
        print(f"error: {missing[0]!r} is not a folder; pass run, sweep or output folders (default: outputs/ "
              f"and multirun/ under the current folder)", file=sys.stderr)
        return 2
    runs = [describe_run(p) for p in run_folders(folders)]
    if args.json:
        print(json.dumps(runs, indent=1))
    elif runs:
        sys.stdout.write(runs_table(runs))
    else:
        print(f"no run folders under {' '.join(folders) or 'outputs/ or multirun/ (neither exists here)'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
