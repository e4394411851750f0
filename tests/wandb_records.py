"""Offline W&B run files (`run-*.wandb`) read back, so tests can check what a run logged without a server:
history rows, the exit code, the run record (id, group, resumed) and logged artifacts."""

from __future__ import annotations

import json
import struct
from pathlib import Path


def read_wandb_records(path: str | Path) -> list:
    """All protobuf `Record`s of an offline W&B run file (`run-*.wandb`), in order.

    The file is a LevelDB-style log: a 7-byte file header, then 32 KiB blocks of records, each with a
    7-byte header (crc32 <I, length <H, type <B: 1 full, 2 first, 3 middle, 4 last).
    """
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
