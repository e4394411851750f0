"""The one training loop every stage shares.

The loop owns what every stage needs: mixed precision, gradient accumulation, clipping, the lr
schedule, DDP, the eval cadence, logging (progress bar, metrics.jsonl, W&B), checkpoints and resume.
An objective (gpt/stages/) owns what differs: how a batch is drawn, how it becomes a loss, how the
model is evaluated, and which samples to show. Objective interface:

    train_batch() -> batch                      evaluate(model, iters, autocast) -> {"val/loss": ..., ...}
    loss(model, batch) -> (loss, metrics dict)  samples(model, autocast) -> [{"prompt", "text"}]
    batch_tokens(batch) -> int                  state_dict() / load_state_dict(state)  (sampler RNG)
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from gpt.checkpoint import clean_state_dict, save_checkpoint
from gpt.distributed import DistInfo, all_reduce_mean
from gpt.tracking import MetricsFile, NullLogger

log = logging.getLogger("gpt")

_DTYPES = {"float32": None, "fp32": None, None: None, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def cpu_has_fast_bf16() -> bool:
    """True where the CPU has bf16 matmul instructions (AVX512-BF16 or AMX), which make bf16 autocast
    2-3x faster than fp32; elsewhere bf16 is emulated and slower."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class Precision:
    """Autocast dtype (None = fp32) for a device type, with a GradScaler when the dtype is float16.

    dtype "auto": bfloat16 on a GPU (float16 where bf16 is unsupported) and on a CPU with bf16
    instructions, float32 on other CPUs.
    """

    def __init__(self, device: str, dtype: str | None):
        from gpt.errors import UserError

        self.device_type = torch.device(device).type
        if dtype == "auto":
            dtype = "bfloat16" if self.device_type != "cpu" or cpu_has_fast_bf16() else "float32"
        if dtype not in _DTYPES:
            raise UserError(f"hardware.autocast_dtype={dtype!r} is not one of auto, bfloat16, float16, float32")
        self.dtype = _DTYPES[dtype]
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


@dataclass
class TrainState:
    step: int = 0
    best_val_loss: float = math.inf
    last_val_loss: float = math.nan
    logger_id: str | None = None
    history: list = field(default_factory=list)


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


class Trainer:
    def __init__(self, model: torch.nn.Module, objective, optimizer: torch.optim.Optimizer, scheduler, *,
                 max_iters: int, eval_interval: int, eval_iters: int, log_interval: int = 10,
                 grad_accum_steps: int = 1, grad_clip: float = 1.0, precision: Precision,
                 dist_info: DistInfo | None = None, run_dir: str | Path = ".", logger=None,
                 checkpoint_meta: dict | None = None, compile: bool = False, peak_flops: float | None = None,
                 progress: bool = True):
        from gpt.errors import UserError

        for name, value in (("max_iters", max_iters), ("eval_interval", eval_interval), ("eval_iters", eval_iters),
                            ("log_interval", log_interval), ("grad_accum_steps", grad_accum_steps)):
            if int(value) <= 0:
                raise UserError(f"trainer.{name}={value} must be a positive integer")
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
        self.max_iters, self.eval_interval, self.eval_iters = int(max_iters), int(eval_interval), int(eval_iters)
        self.log_interval, self.grad_accum_steps, self.grad_clip = int(log_interval), int(grad_accum_steps), grad_clip
        self.precision = precision
        self.run_dir = Path(run_dir)
        self.logger = logger or NullLogger()
        self.meta = checkpoint_meta or {}
        self.peak_flops = peak_flops
        self.progress = progress and self.dist.is_main
        self.state = TrainState()
        self.metrics = MetricsFile(self.run_dir / "metrics.jsonl") if self.dist.is_main else None

    # ---- checkpoints -------------------------------------------------------------------------
    def checkpoint(self) -> dict:
        s = self.state
        return {**self.meta, "model": clean_state_dict(self.raw_model.state_dict()),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.precision.scaler.state_dict(), "step": s.step, "best_val_loss": s.best_val_loss,
                "val_loss": s.last_val_loss, "rng": rng_state(self.objective), "logger": {"run_id": s.logger_id}}

    def save(self, best: bool) -> None:
        if not self.dist.is_main:
            return
        ckpt = self.checkpoint()
        save_checkpoint(ckpt, self.run_dir / "checkpoints" / "last.pt")
        if best:
            save_checkpoint(ckpt, self.run_dir / "checkpoints" / "best.pt")

    def restore(self, ckpt: dict) -> None:
        """Continue from a checkpoint written by `save` (model, optimizer, scheduler, step, RNG)."""
        self.raw_model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            self.precision.scaler.load_state_dict(ckpt["scaler"])
        self.state.step = int(ckpt["step"])
        self.state.best_val_loss = float(ckpt.get("best_val_loss", math.inf))
        self.state.last_val_loss = float(ckpt.get("val_loss", math.nan))
        self.state.logger_id = (ckpt.get("logger") or {}).get("run_id")
        set_rng_state(ckpt["rng"], self.objective)

    def begin(self, resume: dict | None, config: dict) -> None:
        """Before fit(): continue from `resume` (a checkpoint) if given, then start the logger's run with
        the resolved config (a resumed run continues its W&B run)."""
        if resume is not None:
            self.restore(resume)
            log.info("resumed from %s at step %d", resume["path"], self.state.step)
        if self.dist.is_main:
            self.state.logger_id = self.logger.start(config, str(self.run_dir), self.state.logger_id)

    # ---- the loop ----------------------------------------------------------------------------
    def record(self, metrics: dict) -> None:
        if self.dist.is_main:
            self.metrics.write(self.state.step, metrics)
            self.logger.log(metrics, self.state.step)

    def evaluate(self) -> dict:
        self.raw_model.eval()
        with torch.no_grad():
            out = self.objective.evaluate(self.raw_model, self.eval_iters, self.precision.autocast)
        out = {k: all_reduce_mean(v, self.dist) for k, v in out.items()}
        self.raw_model.train()
        return out

    def train_step(self) -> tuple[float, float, int]:
        """One optimizer step over grad_accum_steps micro-batches -> (mean loss, grad norm, tokens)."""
        total, tokens = 0.0, 0
        for micro in range(self.grad_accum_steps):
            batch = self.objective.train_batch()
            tokens += self.objective.batch_tokens(batch)
            last = micro == self.grad_accum_steps - 1
            sync = contextlib.nullcontext() if (last or not self.dist.enabled) else self.model.no_sync()
            with sync:
                with self.precision.autocast():
                    loss, _ = self.objective.loss(self.model, batch)
                self.precision.scaler.scale(loss / self.grad_accum_steps).backward()
            total += float(loss.detach())
        self.precision.scaler.unscale_(self.optimizer)
        params = [p for p in self.raw_model.parameters() if p.grad is not None]
        if self.grad_clip and self.grad_clip > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.grad_clip))
        else:
            norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
        self.precision.scaler.step(self.optimizer)
        self.precision.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return total / self.grad_accum_steps, norm, tokens * self.dist.world_size

    def run_eval(self) -> float:
        s = self.state
        t0 = time.perf_counter()
        out = self.evaluate()
        val = out.get("val/loss", math.nan)
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
        """Train to max_iters (from state.step), evaluating and checkpointing every eval_interval steps."""
        s = self.state
        model_flops = self.raw_model.flops_per_token() if hasattr(self.raw_model, "flops_per_token") else None
        self.raw_model.train()
        bar = tqdm(total=self.max_iters, initial=s.step, desc="train", dynamic_ncols=True, disable=not self.progress,
                   unit="it")
        win_tokens, win_time, win_loss, win_steps = 0, 0.0, 0.0, 0
        try:
            with logging_redirect_tqdm():
                while s.step < self.max_iters:
                    t0 = time.perf_counter()
                    loss, norm, tokens = self.train_step()
                    dt = time.perf_counter() - t0
                    s.step += 1
                    win_tokens, win_time, win_loss, win_steps = win_tokens + tokens, win_time + dt, win_loss + loss, win_steps + 1
                    tok_s = win_tokens / max(win_time, 1e-9)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:,.0f}", refresh=False)
                    if not math.isfinite(loss):
                        from gpt.errors import UserError

                        raise UserError(f"training loss became {loss} at step {s.step}; lower optimizer.lr "
                                        f"or set trainer.grad_clip (now {self.grad_clip})")
                    if s.step % self.log_interval == 0 or s.step == self.max_iters:
                        m = {"train/loss": win_loss / win_steps, "train/lr": self.scheduler.get_last_lr()[0],
                             "train/grad_norm": norm, "train/tokens_per_sec": tok_s,
                             "train/tokens": s.step * tokens}
                        if model_flops and self.peak_flops:
                            m["train/mfu"] = model_flops * tok_s / self.peak_flops
                        self.record(m)
                        win_tokens, win_time, win_loss, win_steps = 0, 0.0, 0.0, 0
                    if s.step % self.eval_interval == 0 or s.step == self.max_iters:
                        self.run_eval()
        except KeyboardInterrupt:
            if self.dist.is_main:
                self.save(best=False)
                log.warning("interrupted at step %d; saved %s (resume with resume=%s)", s.step,
                            self.run_dir / "checkpoints" / "last.pt", self.run_dir)
            raise
        finally:
            bar.close()
        return s.last_val_loss
