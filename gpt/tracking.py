"""Run tracking: a metrics file (one JSON line per log/eval step) and optional Weights & Biases.

Loggers share one small interface: start(config, run_dir, resume_id) -> run id or None,
log(metrics, step), log_samples(step, rows), log_histograms(step, histograms), log_checkpoint(path, aliases),
finish(exit_code); `watch` and `watch_interval` say which histograms the trainer takes (gpt.watch).
Hydra builds them from conf/logger. What a run wrote is read back by gpt.runs.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

WATCH = ("gradients", "parameters", "all")  # logger.watch (null: none)


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


def sweep_group() -> str | None:
    """The sweep folder when this process runs a job of a Hydra multirun (a W&B group for its jobs), else None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except ValueError:  # not inside a Hydra app
        return None
    return str(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else None


def check_watch(watch: str | None, watch_interval: int) -> None:
    """logger.watch and logger.watch_interval, checked (one UserError line)."""
    from gpt.errors import UserError

    if watch is not None and watch not in WATCH:
        raise UserError(f"logger.watch={watch!r} is not one of {', '.join(WATCH)} or null")
    if isinstance(watch_interval, bool) or not isinstance(watch_interval, int) or watch_interval <= 0:
        raise UserError(f"logger.watch_interval={watch_interval!r} must be a positive integer (steps between "
                        f"histograms)")


class NullLogger:
    """No external tracking (the run folder's metrics.jsonl is always written). Takes no histograms: a
    logger.watch other than null is refused, since nothing would show them."""

    watch: str | None = None
    watch_interval: int = 100

    def __init__(self, watch: str | None = None, watch_interval: int = 100):
        check_watch(watch, watch_interval)
        if watch is not None:
            from gpt.errors import UserError

            raise UserError(f"logger.watch={watch!r} logs histograms to Weights & Biases, which logger=none does not "
                            f"use; add logger=wandb (logger.mode=offline needs no account), or set logger.watch=null")

    def start(self, config: dict, run_dir: str, resume_id: str | None = None) -> str | None:
        return None

    def log(self, metrics: dict, step: int) -> None:
        pass

    def log_samples(self, step: int, rows: list[dict]) -> None:
        pass

    def log_histograms(self, step: int, histograms: dict[str, tuple[list[float], list[float]]]) -> None:
        pass

    def log_checkpoint(self, path: str | Path, aliases: list[str] | None = None) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbLogger(NullLogger):
    """Weights & Biases: resolved config, scalar metrics, a table of samples per eval; resumable by run id.

    The jobs of a Hydra sweep share a W&B group (the sweep folder) unless `group` is set. With
    `log_checkpoint` the final checkpoint is uploaded as a "model" artifact at the end of the run. `watch`
    (gradients | parameters | all | null): histograms of each parameter every `watch_interval` steps.
    """

    def __init__(self, project: str = "gpt", entity: str | None = None, mode: str = "online",
                 tags: list[str] | None = None, group: str | None = None, name: str | None = None,
                 dir: str | None = None, log_checkpoint: bool = False, watch: str | None = None,
                 watch_interval: int = 100):
        check_watch(watch, watch_interval)
        if mode not in ("online", "offline", "disabled"):
            from gpt.errors import UserError

            raise UserError(f"logger.mode={mode!r} is not one of online, offline, disabled")
        self.kwargs = dict(project=project, entity=entity, mode=mode, tags=list(tags or []), group=group, name=name)
        self.dir = dir
        self.upload_checkpoint = bool(log_checkpoint)
        self.watch = None if mode == "disabled" else watch  # disabled: nothing would keep them
        self.watch_interval = watch_interval
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

    def log_histograms(self, step: int, histograms: dict[str, tuple[list[float], list[float]]]) -> None:
        """{key: (counts, edges)} as W&B histograms at `step` (the row of that step's metrics)."""
        if self.run is None or not histograms:
            return
        import wandb

        self.run.log({k: wandb.Histogram(np_histogram=h) for k, h in histograms.items()}, step=step)

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
