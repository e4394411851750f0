"""Run folders read back: a run's metrics.jsonl (`read_metrics`) and what it adds up to (`run_summary`,
with `peak_memory` for the end-of-run summary), the jobs of a sweep folder and the overrides that tell
them apart (`sweep_jobs`, `job_labels`). The files are written by gpt.tracking's MetricsFile and by Hydra.
"""

from __future__ import annotations

import json
from pathlib import Path


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
