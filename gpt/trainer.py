"""The one training loop every stage shares.

The loop owns what every stage needs: mixed precision, gradient accumulation, clipping, the lr
schedule, DDP, the eval cadence, logging (progress bar, metrics.jsonl, W&B), checkpoints and resume.
An objective (gpt/stages/) owns what differs: how a batch is drawn, how it becomes a loss, how the
model is evaluated, and which samples to show. Objective interface:

    train_batch() -> batch                      evaluate(model, iters, autocast) -> {"val/loss": ..., ...}
    loss(model, batch) -> (loss, metrics dict)  samples(model, autocast) -> [{"prompt", "text"}]
    batch_tokens(batch) -> int                  state_dict() / load_state_dict(state)  (sampler RNG)

Faults. SIGINT and SIGTERM set a flag that the loop reads between steps, never inside an optimizer update
or a checkpoint write: the step in progress finishes, last.pt is written, and gpt.errors.Interrupted says
where to resume from (a second signal aborts at once; writes are temp + rename, so no file is half-written).
A step whose loss or gradient norm is not finite makes no update; trainer.skip_nonfinite such steps are
skipped, the next one stops the run with one line. A non-finite evaluation stops it before anything is
sampled or saved, and no checkpoint with non-finite weights is ever written.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from gpt.checkpoint import clean_state_dict, remove_stale_temps, save_checkpoint
from gpt.distributed import DistInfo, all_reduce_mean
from gpt.errors import Interrupted, UserError
from gpt.precision import ALIASES, DTYPES, cpu_has_fast_bf16
from gpt.tracking import MetricsFile, NullLogger

log = logging.getLogger("gpt")

class Precision:
    """Autocast dtype (None = fp32) for a device type, with a GradScaler when the dtype is float16.

    dtype "auto": bfloat16 on a GPU (float16 where bf16 is unsupported) and on a CPU with bf16
    instructions, float32 on other CPUs.
    """

    def __init__(self, device: str, dtype: str | None):
        self.device_type = torch.device(device).type
        if dtype == "auto":
            dtype = "bfloat16" if self.device_type != "cpu" or cpu_has_fast_bf16() else "float32"
        name = "float32" if dtype is None else ALIASES.get(dtype, dtype)
        if name not in DTYPES:
            raise UserError(f"hardware.autocast_dtype={dtype!r} is not one of auto, bfloat16, float16, float32")
        self.dtype = None if DTYPES[name] is torch.float32 else DTYPES[name]  # None: no autocast
        if self.dtype is torch.bfloat16 and self.device_type == "cuda" and not torch.cuda.is_bf16_supported():
            log.info("this GPU has no bf16 support: using float16 autocast with a GradScaler")
            self.dtype = torch.float16
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=self.dtype is torch.float16)

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def __str__(self) -> str:
        return "fp32" if self.dtype is None else str(self.dtype).replace("torch.", "") + " autocast"


def measure_peak_flops(device: str, dtype: torch.dtype | None, size: int | None = None, seconds: float = 0.3) -> float:
    """Achievable dense matmul FLOP/s on this device and dtype (best of repeated square matmuls)."""
    dt = dtype or torch.float32
    size = size or (8192 if torch.device(device).type == "cuda" else 1024)
    a = torch.randn(size, size, device=device, dtype=dt)
    b = torch.randn(size, size, device=device, dtype=dt)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    best, t_end = 0.0, time.perf_counter() + seconds
    a @ b
    while time.perf_counter() < t_end:
        sync()
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        sync()
        best = max(best, 4 * 2 * size**3 / (time.perf_counter() - t0))
    return best


def _new_window() -> dict:
    return {"tokens": 0, "seconds": 0.0, "loss": 0.0, "steps": 0}


@dataclass
class TrainState:
    step: int = 0
    best_val_loss: float = math.inf
    last_val_loss: float = math.nan
    logger_id: str | None = None
    history: list = field(default_factory=list)
    skipped: int = 0  # steps skipped for a non-finite loss or gradient (trainer.skip_nonfinite)
    window: dict = field(default_factory=_new_window)  # the steps since the last train/* log row


def rng_state(objective) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()],
             "objective": objective.state_dict()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, objective) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))
    objective.load_state_dict(state["objective"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _val_loss_of(path: Path) -> float:
    """The val loss a checkpoint file was saved with; inf when the file is missing or unreadable."""
    try:
        value = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("val_loss")
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else math.inf
    except Exception:  # missing, truncated, not ours: no best on disk
        return math.inf


class StopSignals:
    """SIGINT / SIGTERM handlers for the duration of a `with` block (main thread only; the previous handlers
    come back on exit). The first signal only records itself in `received`; the loop reads it between steps.
    A second one restores the previous handlers and raises `abort(signum)` wherever the program is."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, abort=None):
        self.received: int | None = None
        self.abort = abort
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        self.received = None
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = signum
            # os.write, not print/logging: a handler may run while the main thread is inside their locks
            os.write(2, f"\n{name} received: stopping after the current step and saving last.pt "
                        f"(send it again to abort at once)\n".encode())
            return
        self.__exit__()
        if self.abort is not None:
            raise self.abort(signum)
        raise KeyboardInterrupt


@dataclass(frozen=True)
class Loop:
    """The loop's settings (conf: trainer.*), checked once. batch_size is the stage's micro-batch (it samples
    batches of that size); the loop uses it only to count tokens per step."""
    max_iters: int
    eval_interval: int
    eval_iters: int
    log_interval: int = 10
    batch_size: int = 1
    grad_accum_steps: int = 1
    grad_clip: float | None = 1.0
    skip_nonfinite: int = 0

    def __post_init__(self):
        if isinstance(self.skip_nonfinite, bool) or not isinstance(self.skip_nonfinite, int) or self.skip_nonfinite < 0:
            raise UserError(f"trainer.skip_nonfinite={self.skip_nonfinite!r} must be a non-negative integer "
                            f"(the number of non-finite steps to skip before stopping; 0 stops at the first)")
        for name in ("max_iters", "eval_interval", "eval_iters", "log_interval", "batch_size", "grad_accum_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UserError(f"trainer.{name}={value!r} must be a positive integer")

    def tokens_per_iter(self, block_size: int, world_size: int = 1) -> int:
        return self.batch_size * block_size * self.grad_accum_steps * world_size


class Trainer:
    def __init__(self, model: torch.nn.Module, objective, optimizer: torch.optim.Optimizer, scheduler, loop: Loop, *,
                 precision: Precision, dist_info: DistInfo | None = None, run_dir: str | Path = ".", logger=None,
                 checkpoint_meta: dict | None = None, compile: bool = False, peak_flops: float | None = None,
                 progress: bool = True, resume_command: str | None = None):
        """resume_command: the script an interrupted run tells the user to resume with (default finetune.py
        for checkpoints with a lineage, train.py otherwise)."""
        self.raw_model = model
        self.dist = dist_info or DistInfo()
        self.model = model
        if compile:
            self.model = torch.compile(self.model)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.dist.local_rank] if self.dist.device.startswith("cuda") else None
            self.model = DDP(self.model, device_ids=ids)
        self.objective, self.optimizer, self.scheduler = objective, optimizer, scheduler
        self.loop = loop
        self.precision = precision
        self.run_dir = Path(run_dir)
        self.logger = logger or NullLogger()
        self.meta = checkpoint_meta or {}
        self.peak_flops = peak_flops
        self.progress = progress and self.dist.is_main
        self.state = TrainState()
        self.metrics = MetricsFile(self.run_dir / "metrics.jsonl") if self.dist.is_main else None
        self.script = resume_command or ("finetune.py" if "lineage" in self.meta else "train.py")
        self.signals = StopSignals(self._aborted)
        self._agreed_signal = 0  # under DDP: the signal all ranks agreed on at the last step
        self._saved: tuple[int, Path, str] | None = None  # (step, last.pt, resume= value) of the newest save

    # ---- checkpoints -------------------------------------------------------------------------
    def checkpoint(self) -> dict:
        s = self.state
        return {**self.meta, "model": clean_state_dict(self.raw_model.state_dict()),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.precision.scaler.state_dict(), "step": s.step, "best_val_loss": s.best_val_loss,
                "val_loss": s.last_val_loss, "rng": rng_state(self.objective), "logger": {"run_id": s.logger_id},
                "skipped_steps": s.skipped, "log_window": dict(s.window)}

    def save(self, best: bool) -> None:
        """Write last.pt (and first best.pt, so that a kill between the two never leaves best.pt older than
        the best last.pt records). Refuses weights that are not finite: the previous files stay."""
        if not self.dist.is_main:
            return
        ckpt = self.checkpoint()
        folder = self.run_dir / "checkpoints"
        bad = next((k for k, v in ckpt["model"].items() if v.is_floating_point() and not bool(v.isfinite().all())),
                   None)
        if bad is not None:
            raise UserError(f"the weights are not finite at step {self.state.step} ({bad}); not writing them over "
                            f"{folder}; lower optimizer.lr or set trainer.grad_clip (now {self.loop.grad_clip})"
                            f"{self._kept()}")
        if best:
            save_checkpoint(ckpt, folder / "best.pt")
        save_checkpoint(ckpt, folder / "last.pt")
        self._saved = (self.state.step, folder / "last.pt", str(self.run_dir))

    def _kept(self) -> str:
        """'; <last.pt> (step N) is the newest checkpoint' for error lines, or '' if none was written."""
        if self._saved is None:
            return ""
        return f"; {self._saved[1]} (step {self._saved[0]}) is the newest checkpoint"

    def restore(self, ckpt: dict) -> None:
        """Continue from a checkpoint written by `save` (model, optimizer, scheduler, step, RNG). A part that
        is missing or does not fit this run (weights of another shape, another optimizer) is one UserError."""
        part = "model weights"
        try:
            self.raw_model.load_state_dict(ckpt["model"])
            part = "optimizer state"
            self.optimizer.load_state_dict(ckpt["optimizer"])
            part = "scheduler state"
            self.scheduler.load_state_dict(ckpt["scheduler"])
            part = "grad scaler state"
            if ckpt.get("scaler"):
                self.precision.scaler.load_state_dict(ckpt["scaler"])
            part = "random number generator state"
            set_rng_state(ckpt["rng"], self.objective)
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"resume={ckpt.get('path')!r}: its {part} does not fit this run ({detail[:200]}); "
                            f"resume only from last.pt of a run of the same script, stage and optimizer") from None
        self.state.step = int(ckpt["step"])
        self.state.best_val_loss = float(ckpt.get("best_val_loss", math.inf))
        self.state.last_val_loss = float(ckpt.get("val_loss", math.nan))
        self.state.logger_id = (ckpt.get("logger") or {}).get("run_id")
        skipped, window = ckpt.get("skipped_steps"), ckpt.get("log_window")
        self.state.skipped = skipped if type(skipped) is int and skipped >= 0 else 0  # absent in older files
        self.state.window = {k: (window[k] if isinstance(window, dict) and type(window.get(k)) is type(v) else v)
                             for k, v in _new_window().items()}

    def begin(self, resume: dict | None, config: dict) -> None:
        """Before fit(): continue from `resume` (a checkpoint) if given, then start the logger's run with
        the resolved config (a resumed run continues its W&B run)."""
        if self.dist.is_main:  # what a save killed mid-write left here or in the run being resumed
            folders = [self.run_dir / "checkpoints"] + ([Path(resume["path"]).parent] if resume is not None else [])
            for p in (p for folder in folders for p in remove_stale_temps(folder)):
                log.info("removed %s, left by an interrupted save", p)
        if resume is not None:
            self.restore(resume)
            self._saved = (self.state.step, Path(resume["path"]), resume["path"])
            log.info("resumed from %s at step %d", resume["path"], self.state.step)
            self._check_best(Path(resume["path"]).with_name("best.pt"))
        if self.dist.is_main:
            self.state.logger_id = self.logger.start(config, str(self.run_dir), self.state.logger_id)

    def _check_best(self, best_path: Path) -> None:
        """After restoring: if best.pt beside the resumed checkpoint does not hold the best val loss that the
        checkpoint records (a kill between the two writes of an older version, a lost or failed best.pt), write
        best.pt now when the restored state is that best, else forget the record so that the next evaluation
        better than the best.pt on disk writes one."""
        s = self.state
        if not math.isfinite(s.best_val_loss):
            return
        on_disk = _val_loss_of(best_path)
        if on_disk <= s.best_val_loss:
            return
        if s.last_val_loss == s.best_val_loss:
            log.warning("%s does not hold the best val loss %.4f recorded at step %d; writing best.pt from it",
                        best_path, s.best_val_loss, s.step)
            if self.dist.is_main:
                save_checkpoint(self.checkpoint(), self.run_dir / "checkpoints" / "best.pt")
        else:
            log.warning("%s does not hold the best val loss %.4f recorded by the checkpoint (that state is "
                        "lost); the next evaluation better than %.4f writes best.pt", best_path, s.best_val_loss,
                        on_disk)
            s.best_val_loss = on_disk

    # ---- the loop ----------------------------------------------------------------------------
    def record(self, metrics: dict) -> None:
        if self.dist.is_main:
            self.metrics.write(self.state.step, metrics)
            self.logger.log(metrics, self.state.step)

    def evaluate(self) -> dict:
        self.raw_model.eval()
        with torch.no_grad():
            out = self.objective.evaluate(self.raw_model, self.loop.eval_iters, self.precision.autocast)
        out = {k: all_reduce_mean(v, self.dist) for k, v in out.items()}
        self.raw_model.train()
        return out

    def train_step(self) -> tuple[float, float, int, bool]:
        """One optimizer step over grad_accum_steps micro-batches -> (mean loss, grad norm, tokens, updated).

        A non-finite loss or gradient norm (on any rank) makes no update: gradients are dropped and only the
        schedule advances, so the step counts like any other (updated=False). Under float16 the GradScaler
        skips overflowing gradients itself, so there only a non-finite loss counts."""
        total, tokens = 0.0, 0
        for micro in range(self.loop.grad_accum_steps):
            batch = self.objective.train_batch()
            tokens += self.objective.batch_tokens(batch)
            last = micro == self.loop.grad_accum_steps - 1
            sync = contextlib.nullcontext() if (last or not self.dist.enabled) else self.model.no_sync()
            with sync:
                with self.precision.autocast():
                    loss, _ = self.objective.loss(self.model, batch)
                self.precision.scaler.scale(loss / self.loop.grad_accum_steps).backward()
            total += float(loss.detach())
        self.precision.scaler.unscale_(self.optimizer)
        params = [p for p in self.raw_model.parameters() if p.grad is not None]
        if self.loop.grad_clip and self.loop.grad_clip > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.loop.grad_clip))
        else:
            norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
        finite = math.isfinite(total) and (self.precision.scaler.is_enabled() or math.isfinite(norm))
        finite = self._agree(finite)
        if finite:
            self.precision.scaler.step(self.optimizer)
        self.precision.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return total / self.loop.grad_accum_steps, norm, tokens * self.dist.world_size, finite

    def _agree(self, finite: bool) -> bool:
        """Under DDP, one all_reduce per step makes every rank take the same two decisions: skip the update if
        any rank's loss or gradient is not finite, stop after this step if any rank received a signal."""
        if not self.dist.enabled:
            return finite
        flags = torch.tensor([0 if finite else 1, self.signals.received or 0], dtype=torch.int64,
                             device=self.dist.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        self._agreed_signal = int(flags[1])
        return not int(flags[0])

    def _stop_signal(self) -> int:
        """The signal to stop on after this step (0: none); under DDP the one all ranks agreed on."""
        return self._agreed_signal if self.dist.enabled else (self.signals.received or 0)

    def _resume_hint(self) -> str:
        return f"resume with: python {self.script} resume={self._saved[2]}" if self._saved else "nothing was saved"

    def _interrupted(self, signum: int) -> Interrupted:
        """The stop after a signal, once last.pt holds this step (rank 0 says so; other ranks stay silent)."""
        name = signal.Signals(signum).name
        message = (f"interrupted at step {self.state.step} ({name}); saved {self._saved[1]}; {self._resume_hint()}"
                   if self.dist.is_main and self._saved else "")
        return Interrupted(message, 128 + signum)

    def _aborted(self, signum: int) -> Interrupted:
        """A second signal: stop wherever the program is; a save in progress leaves only its temp file, which is
        removed on the way out, so the newest complete checkpoint is untouched."""
        name = signal.Signals(signum).name
        kept = (f"{self._saved[1]} (step {self._saved[0]}) is intact; {self._resume_hint()}" if self._saved
                else "nothing was saved")
        message = f"aborted at step {self.state.step} by a second {name}; {kept}" if self.dist.is_main else ""
        return Interrupted(message, 128 + signum)

    def _skip(self, loss: float, norm: float) -> None:
        """After a step that made no update: count it, log it, and stop past trainer.skip_nonfinite."""
        s = self.state
        s.skipped += 1
        what, value = ("training loss", loss) if not math.isfinite(loss) else ("gradient norm", norm)
        if s.skipped > self.loop.skip_nonfinite:
            allowed = (f" (non-finite step {s.skipped}; trainer.skip_nonfinite={self.loop.skip_nonfinite} allows "
                       f"{self.loop.skip_nonfinite})" if self.loop.skip_nonfinite else "")
            raise UserError(f"{what} became {value} at step {s.step}{allowed}; lower optimizer.lr or set "
                            f"trainer.grad_clip (now {self.loop.grad_clip}), or skip up to n such steps with "
                            f"trainer.skip_nonfinite=n{self._kept()}")
        log.warning("step %d: %s is %s; skipped the update (%d of trainer.skip_nonfinite=%d)", s.step, what,
                    value, s.skipped, self.loop.skip_nonfinite)
        self.record({"train/skipped_steps": s.skipped})

    def run_eval(self) -> float:
        s = self.state
        t0 = time.perf_counter()
        out = self.evaluate()
        val = out.get("val/loss", math.nan)
        if "val/loss" in out and not math.isfinite(val):  # before sampling from, or saving, broken weights
            self.record({**out, "eval_seconds": time.perf_counter() - t0})
            raise UserError(f"validation loss became {val} at step {s.step}: the weights no longer give finite "
                            f"outputs; lower optimizer.lr or set trainer.grad_clip (now {self.loop.grad_clip})"
                            f"{self._kept()}")
        s.last_val_loss = val
        improved = val < s.best_val_loss
        if improved:
            s.best_val_loss = val
        rows = []
        if self.dist.is_main:
            rows = self.objective.samples(self.raw_model, self.precision.autocast)
            self.logger.log_samples(s.step, rows)
            self.raw_model.train()
        self.record({**out, "val/best_loss": s.best_val_loss, "eval_seconds": time.perf_counter() - t0})
        log.info("step %d: %s", s.step, "  ".join(f"{k} {v:.4f}" for k, v in out.items()))
        self.save(best=improved)
        return val

    def fit(self) -> float:
        """Train to max_iters (from state.step), evaluating and checkpointing every eval_interval steps.

        Raises gpt.errors.Interrupted after a SIGINT / SIGTERM (last.pt holds the last finished step)."""
        s = self.state
        model_flops = self.raw_model.flops_per_token() if hasattr(self.raw_model, "flops_per_token") else None
        self.raw_model.train()
        bar = tqdm(total=self.loop.max_iters, initial=s.step, desc="train", dynamic_ncols=True, disable=not self.progress,
                   unit="it")
        w = s.window  # the log window is part of the state, so a resumed run logs the same train/loss
        try:
            with self.signals, logging_redirect_tqdm():
                while s.step < self.loop.max_iters:
                    t0 = time.perf_counter()
                    loss, norm, tokens, updated = self.train_step()
                    dt = time.perf_counter() - t0
                    s.step += 1
                    if not updated:
                        self._skip(loss, norm)
                    else:
                        w["tokens"], w["seconds"] = w["tokens"] + tokens, w["seconds"] + dt
                        w["loss"], w["steps"] = w["loss"] + loss, w["steps"] + 1
                    tok_s = w["tokens"] / max(w["seconds"], 1e-9)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:,.0f}", refresh=False)
                    if (s.step % self.loop.log_interval == 0 or s.step == self.loop.max_iters) and w["steps"]:
                        m = {"train/loss": w["loss"] / w["steps"], "train/lr": self.scheduler.get_last_lr()[0],
                             "train/grad_norm": norm, "train/tokens_per_sec": tok_s,
                             "train/tokens": s.step * tokens}
                        if model_flops and self.peak_flops:
                            m["train/mfu"] = model_flops * tok_s / self.peak_flops
                        self.record(m)
                        w.update(_new_window())
                    if s.step % self.loop.eval_interval == 0 or s.step == self.loop.max_iters:
                        self.run_eval()
                    signum = self._stop_signal()
                    if signum:  # between steps: the update and any save of this step are complete
                        if self._saved is None or self._saved[0] != s.step:
                            self.save(best=False)
                        if self.dist.enabled:  # no rank exits (and makes torchrun stop the others) mid-save
                            dist.barrier()
                        raise self._interrupted(signum)
        finally:
            bar.close()
        return s.last_val_loss
