"""Run tracking: a metrics file (one JSON line per log/eval step) and optional Weights & Biases.

Loggers share one small interface: start(config, run_dir, resume_id) -> run id or None,
log(metrics, step), log_samples(step, rows), log_checkpoint(path, aliases), finish(exit_code).
Hydra builds them from conf/logger.

Run folders are read back here too: a run's metrics.jsonl (`read_metrics`, `run_summary`), the jobs
of a sweep folder and the overrides that tell them apart (`sweep_jobs`, `job_labels`), and offline
W&B run files (`read_wandb_history`, `read_wandb_run`, `read_wandb_artifacts`).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path


class MetricsFile:
    """Append-only JSONL: {"step": ..., "time": ..., <metric>: <value>, ...} per call."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, step: int, metrics: dict) -> None:
        row = {"step": step, "time": round(time.time(), 3)}
        row.update({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
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


def sweep_group() -> str | None:
    """The sweep folder when this process runs a job of a Hydra multirun (a W&B group for its jobs), else None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except ValueError:  # not inside a Hydra app
        return None
    return str(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else None


class NullLogger:
    """No external tracking (the run folder's metrics.jsonl is always written)."""

    def start(self, config: dict, run_dir: str, resume_id: str | None = None) -> str | None:
        return None

    def log(self, metrics: dict, step: int) -> None:
        pass

    def log_samples(self, step: int, rows: list[dict]) -> None:
        pass

    def log_checkpoint(self, path: str | Path, aliases: list[str] | None = None) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbLogger(NullLogger):
    """Weights & Biases: resolved config, scalar metrics, a table of samples per eval; resumable by run id.

    The jobs of a Hydra sweep share a W&B group (the sweep folder) unless `group` is set. With
    `log_checkpoint` the final checkpoint is uploaded as a "model" artifact at the end of the run.
    """

    def __init__(self, project: str = "gpt", entity: str | None = None, mode: str = "online",
                 tags: list[str] | None = None, group: str | None = None, name: str | None = None,
                 dir: str | None = None, log_checkpoint: bool = False):
        if mode not in ("online", "offline", "disabled"):
            from gpt.errors import UserError

            raise UserError(f"logger.mode={mode!r} is not one of online, offline, disabled")
        self.kwargs = dict(project=project, entity=entity, mode=mode, tags=list(tags or []), group=group, name=name)
        self.dir = dir
        self.upload_checkpoint = bool(log_checkpoint)
        self.run = None
        self._samples: list[list] = []

    def start(self, config: dict, run_dir: str, resume_id: str | None = None) -> str | None:
        import wandb

        if self.kwargs["mode"] == "offline":
            os.environ["WANDB_MODE"] = "offline"  # in the environment too: no network call at all
        kwargs = dict(self.kwargs, config=config, dir=self.dir or run_dir)
        kwargs["group"] = kwargs["group"] or sweep_group()
        if resume_id:
            kwargs.update(id=resume_id, resume="allow")
        self.run = wandb.init(**kwargs)
        return self.run.id

    def log(self, metrics: dict, step: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def log_samples(self, step: int, rows: list[dict]) -> None:
        if self.run is None or not rows:
            return
        import wandb

        self._samples.extend([step, r.get("prompt", ""), r["text"]] for r in rows)
        table = wandb.Table(columns=["step", "prompt", "text"], data=self._samples)
        self.run.log({"samples": table}, step=step)

    def log_checkpoint(self, path: str | Path, aliases: list[str] | None = None) -> None:
        """Upload a checkpoint file as artifact `model-<run id>` (type "model") when log_checkpoint is on."""
        if self.run is None or not self.upload_checkpoint or not Path(path).is_file():
            return
        import wandb

        artifact = wandb.Artifact(f"model-{self.run.id}", type="model")
        artifact.add_file(str(path), policy="immutable")  # no temporary copy: a finished run never rewrites it
        self.run.log_artifact(artifact, aliases=list(aliases or []))

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None


def read_wandb_records(path: str | Path) -> list:
    """All protobuf `Record`s of an offline W&B run file (`run-*.wandb`), in order.

    The file is a LevelDB-style log: a 7-byte file header, then 32 KiB blocks of records, each with a
    7-byte header (crc32 <I, length <H, type <B: 1 full, 2 first, 3 middle, 4 last).
    """
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    block, pos, records, pending = 32 * 1024, 7, [], b""
    while pos + 7 <= len(data):
        left = block - (pos % block)
        if left < 7:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending)
            records.append(rec)
            pending = b""
    return records


def read_wandb_history(path: str | Path) -> list[dict]:
    """The logged history rows of an offline W&B run file: one dict per row ({"_step": ..., key: value})."""
    rows = []
    for rec in read_wandb_records(path):
        if rec.WhichOneof("record_type") == "history":
            row = {}
            for item in rec.history.item:
                key = item.key or "/".join(item.nested_key)
                try:
                    row[key] = json.loads(item.value_json)
                except ValueError:
                    row[key] = item.value_json
            rows.append(row)
    return rows


def read_wandb_exit_code(path: str | Path) -> int | None:
    """The exit code a W&B run file recorded when its run was finished (None: never finished)."""
    codes = [rec.exit.exit_code for rec in read_wandb_records(path) if rec.WhichOneof("record_type") == "exit"]
    return codes[-1] if codes else None


def read_wandb_run(path: str | Path) -> dict:
    """The run record of an offline W&B run file: {"id", "group", "project", "name", "resumed"}."""
    for rec in read_wandb_records(path):
        if rec.WhichOneof("record_type") == "run":
            r = rec.run
            return {"id": r.run_id, "group": r.run_group, "project": r.project, "name": r.display_name,
                    "resumed": r.resumed}
    return {}


def read_wandb_artifacts(path: str | Path) -> list[dict]:
    """The artifacts an offline W&B run file logged: [{"name", "type", "aliases", "files"}] (files: paths inside)."""
    out = []
    for rec in read_wandb_records(path):
        if rec.WhichOneof("record_type") == "artifact":
            a = rec.artifact
            out.append({"name": a.name, "type": a.type, "aliases": list(a.aliases),
                        "files": [entry.path for entry in a.manifest.contents]})
    return out
