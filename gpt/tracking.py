"""Run tracking: a metrics file (one JSON line per log/eval step) and optional Weights & Biases.

Loggers share one small interface: start(config, run_dir, resume_id) -> run id or None,
log(metrics, step), log_samples(step, rows), finish(exit_code). Hydra builds them from conf/logger.
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


class NullLogger:
    """No external tracking (the run folder's metrics.jsonl is always written)."""

    def start(self, config: dict, run_dir: str, resume_id: str | None = None) -> str | None:
        return None

    def log(self, metrics: dict, step: int) -> None:
        pass

    def log_samples(self, step: int, rows: list[dict]) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbLogger(NullLogger):
    """Weights & Biases: resolved config, scalar metrics, a table of samples per eval; resumable by run id."""

    def __init__(self, project: str = "gpt", entity: str | None = None, mode: str = "online",
                 tags: list[str] | None = None, group: str | None = None, name: str | None = None,
                 dir: str | None = None):
        if mode not in ("online", "offline", "disabled"):
            from gpt.errors import UserError

            raise UserError(f"logger.mode={mode!r} is not one of online, offline, disabled")
        self.kwargs = dict(project=project, entity=entity, mode=mode, tags=list(tags or []), group=group, name=name)
        self.dir = dir
        self.run = None
        self._samples: list[list] = []

    def start(self, config: dict, run_dir: str, resume_id: str | None = None) -> str | None:
        import wandb

        if self.kwargs["mode"] == "offline":
            os.environ["WANDB_MODE"] = "offline"  # in the environment too: no network call at all
        kwargs = dict(self.kwargs, config=config, dir=self.dir or run_dir)
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
