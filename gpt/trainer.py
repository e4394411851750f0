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
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from gpt import parallel
from gpt.checkpoint import clean_state_dict, remove_stale_temps, save_checkpoint
from gpt.distributed import DistInfo, all_reduce_mean
from gpt.errors import Interrupted, UserError
from gpt.precision import ALIASES, DTYPES, cpu_has_fast_bf16
from gpt.tracking import MetricsFile, NullLogger
from gpt.watch import LayerStats

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


# bf16 dense tensor-core peak (no sparsity), TFLOP/s, from the vendors' spec sheets; the first entry whose words all
# appear in torch.cuda.get_device_name() wins, so the specific names come before the general ones
SPEC_BF16_TFLOPS = (
    (("GH200",), 989.0),
    (("H200",), 989.0),
    (("H100", "PCIe"), 756.0),
    (("H100", "NVL"), 835.0),
    (("H100",), 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    (("H800",), 989.0),
    (("B200",), 2250.0),
    (("A100",), 312.0),
    (("A800",), 312.0),
    (("L40S",), 362.0),
    (("L40",), 181.0),
    (("L4",), 121.0),
    (("RTX 4090",), 165.0),
    (("RTX 6000 Ada",), 364.0),
)


def spec_peak_flops(name: str) -> float | None:
    """The bf16 dense peak FLOP/s of a device named `name` (e.g. "NVIDIA H100 80GB HBM3"), None when unknown."""
    for words, tflops in SPEC_BF16_TFLOPS:
        if all(w.lower() in name.lower() for w in words):
            return tflops * 1e12
    return None


def peak_flops_for(device: str, dtype: torch.dtype | None, name: str | None = None,
                   seconds: float = 0.3) -> tuple[float, str]:
    """(peak FLOP/s for MFU, where it came from): on a GPU training in bf16 or fp16 whose name is in the spec
    table, the spec sheet's dense peak (MFU as the field reports it: nanoGPT, nanochat, torchtitan), else the
    matmul peak measured now (for `seconds`) on this device and dtype. train.py and benchmarks/gpu_bench.py."""
    if torch.device(device).type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        name = name or torch.cuda.get_device_name(torch.device(device))
        spec = spec_peak_flops(name)
        if spec is not None:
            return spec, f"spec sheet dense bf16 peak of {name}"
    what = "bf16 matmul" if dtype is torch.bfloat16 else "matmul"
    return measure_peak_flops(device, dtype, seconds=seconds), f"measured {what} peak on {device}"




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
    best_metric: float | None = None  # the best value of trainer.monitor so far (best.pt holds it)
    best_step: int | None = None      # the step it was measured at
    stale: int = 0                    # evaluations since the last improvement (trainer.patience)
    top: list = field(default_factory=list)  # [[value, step], ...] best first: checkpoints/step-<N>.pt kept
    stopped_early: bool = False


def rng_state(objective) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()],
             "objective": objective.state_dict()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def saved_rng_states(ckpt: dict) -> list:
    """The random and sampler state of each rank of the run that saved `ckpt` (one for a single process)."""
    ranks = ckpt.get("rng_ranks")
    return ranks if isinstance(ranks, list) else [ckpt["rng"]]


def set_rng_state(state: dict, objective) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))
    objective.load_state_dict(state["objective"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _monitored_value_of(path: Path, metric: str, mode: str) -> float | None:
    """The value of `metric` (direction `mode`) a checkpoint file was saved with (its monitor record; its val
    loss for val/loss, which files written before trainer.monitor existed record); None when the file is
    missing, unreadable or records no such value."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # missing, truncated, not ours: no best on disk
        return None
    rec = ckpt.get("monitor") if isinstance(ckpt, dict) else None
    own = isinstance(rec, dict) and rec.get("step") == ckpt.get("step")  # a best.pt records its own state as best
    if own and rec.get("metric") == metric and rec.get("mode") == mode:
        value = rec.get("value")
    elif metric == "val/loss" and mode == "min" and isinstance(ckpt, dict):
        value = ckpt.get("val_loss")
    else:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


RESUME_STATE = ("optimizer", "scheduler", "scaler", "rng", "rng_ranks", "log_window")  # only a resume point needs


def _cpu_copy(obj):
    """A copy of a checkpoint dict whose tensors are on the CPU and no longer shared with the live model,
    optimizer or RNG (a background write must see this step's values, not later ones)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return obj


def link_or_save(source: Path, target: Path, ckpt: dict) -> None:
    """`target` becomes the same file as `source` (a hard link made under a temp name, then renamed over
    target: atomic); where the filesystem has no hard links, `ckpt` is written to it instead."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        tmp.unlink(missing_ok=True)
        os.link(source, tmp)
        os.replace(tmp, target)
    except OSError:
        tmp.unlink(missing_ok=True)
        save_checkpoint(ckpt, target)


class StopSignals:
    """SIGINT / SIGTERM handlers for the duration of a `with` block (main thread only; the previous handlers
    come back on exit). The first signal only records itself in `received`; the loop reads it between steps.
    A second one restores the previous handlers and raises `abort(signum)` wherever the program is."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    # a scheduler's "checkpoint now" signal, handled the same way when the job's runtime (submitit) installed a
    # handler for it: the loop saves last.pt, then hands the signal on (submitit then requeues the job)
    HANDED_ON = (signal.SIGUSR2,)

    def __init__(self, abort=None):
        self.received: int | None = None
        self.abort = abort
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        self.received = None
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
            for sig in self.HANDED_ON:
                if callable(signal.getsignal(sig)):
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def hand_on(self, signum: int) -> None:
        """After the loop saved: give a HANDED_ON signal to the handler it replaced (submitit requeues the job
        and exits)."""
        previous = self._previous.get(signum)
        if signum in self.HANDED_ON and callable(previous):
            self.__exit__()
            previous(signum, None)

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
    monitor: str = "val/loss"   # the evaluation metric that picks best.pt (and keep_top_k, patience)
    mode: str = "auto"          # min | max | auto: min for losses/perplexities/errors, max for the rest
    min_delta: float = 0.0      # an evaluation improves on the best only by more than this
    patience: int = 0           # stop after this many evaluations without improvement (0: never)
    keep_top_k: int = 0         # also keep checkpoints/step-<N>.pt of the k best evaluations (0: none)
    save_interval: int | None = None  # write last.pt every this many steps (None: at every evaluation)
    async_save: bool = False    # write checkpoints in a background thread from a CPU copy of the state
    layer_stats: bool = True    # grad_norm/<group> and update_ratio/<group> at log steps (gpt.watch)

    def __post_init__(self):
        if not isinstance(self.monitor, str) or not self.monitor.strip("/"):
            raise UserError(f"trainer.monitor={self.monitor!r} must name an evaluation metric, e.g. val/loss")
        if "/" not in self.monitor:  # trainer.monitor=exact_match means the logged val/exact_match
            object.__setattr__(self, "monitor", f"val/{self.monitor}")
        if self.mode not in ("auto", "min", "max"):
            raise UserError(f"trainer.mode={self.mode!r} must be min, max or auto")
        if isinstance(self.min_delta, bool) or not isinstance(self.min_delta, (int, float)) or not (
                math.isfinite(self.min_delta) and self.min_delta >= 0):
            raise UserError(f"trainer.min_delta={self.min_delta!r} must be a number >= 0")
        if self.save_interval is not None and (isinstance(self.save_interval, bool) or not isinstance(
                self.save_interval, int) or self.save_interval <= 0):
            raise UserError(f"trainer.save_interval={self.save_interval!r} must be a positive integer or null "
                            f"(null: write last.pt at every evaluation)")
        if not isinstance(self.async_save, bool):
            raise UserError(f"trainer.async_save={self.async_save!r} must be true or false")
        if not isinstance(self.layer_stats, bool):
            raise UserError(f"trainer.layer_stats={self.layer_stats!r} must be true or false")
        for name in ("patience", "keep_top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise UserError(f"trainer.{name}={value!r} must be a non-negative integer (0: off)")
        if isinstance(self.skip_nonfinite, bool) or not isinstance(self.skip_nonfinite, int) or self.skip_nonfinite < 0:
            raise UserError(f"trainer.skip_nonfinite={self.skip_nonfinite!r} must be a non-negative integer "
                            f"(the number of non-finite steps to skip before stopping; 0 stops at the first)")
        for name in ("max_iters", "eval_interval", "eval_iters", "log_interval", "batch_size", "grad_accum_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UserError(f"trainer.{name}={value!r} must be a positive integer")

    def tokens_per_iter(self, block_size: int, world_size: int = 1) -> int:
        return self.batch_size * block_size * self.grad_accum_steps * world_size

    @property
    def direction(self) -> str:
        """min or max: mode, or for mode=auto min when the metric's name says it is a loss, perplexity, error or
        bits per byte (lower is better), max otherwise (accuracy, exact match, reward)."""
        if self.mode != "auto":
            return self.mode
        name = self.monitor.rsplit("/", 1)[-1].lower()
        return "min" if any(w in name for w in ("loss", "perplexity", "ppl", "error", "bpb", "bits")) else "max"

    def better(self, value: float, than: float | None) -> bool:
        """Whether `value` of the monitored metric improves on `than` (None: nothing yet) by more than min_delta."""
        if not math.isfinite(value):
            return False
        if than is None:
            return True
        return value < than - self.min_delta if self.direction == "min" else value > than + self.min_delta


class Trainer:
    def __init__(self, model: torch.nn.Module, objective, optimizer: torch.optim.Optimizer, scheduler, loop: Loop, *,
                 precision: Precision, dist_info: DistInfo | None = None, run_dir: str | Path = ".", logger=None,
                 checkpoint_meta: dict | None = None, compile: bool = False, peak_flops: float | None = None,
                 progress: bool = True, resume_command: str | None = None, sampler: torch.nn.Module | None = None):
        """resume_command: the script an interrupted run tells the user to resume with (default finetune.py
        for checkpoints with a lineage, train.py otherwise). A model already sharded with FSDP
        (gpt.parallel.shard, before its optimizer was built) trains as it is; `sampler` is then rank 0's plain copy
        of it, which samples are drawn from (loaded with the gathered weights at each evaluation)."""
        self.raw_model = model
        self.dist = dist_info or DistInfo()
        self.model = model
        self.sharded = parallel.is_sharded(model)
        self._sampler = sampler
        if compile:
            self.model = torch.compile(self.model)
        if self.dist.enabled and not self.sharded:
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
        self._writer: threading.Thread | None = None  # a background checkpoint write (trainer.async_save)
        self._last_step_saved: int | None = None  # the step of the newest last.pt save, on every rank
        self._write_error: BaseException | None = None
        # logger.watch: histograms every watch_interval steps (rank 0's logger decides; under FSDP every rank
        # gathers, so fit() tells the others). Per-group scalars at log steps with trainer.layer_stats.
        self.watch: str | None = getattr(self.logger, "watch", None)
        self.watch_interval: int = getattr(self.logger, "watch_interval", 100)
        self._stats: LayerStats | None = None  # built at the first step that takes statistics
        self._observed: dict = {}     # this step's grad_norm/* and update_ratio/* (logged with train/*)
        self._histograms: dict = {}   # this step's gradients/* and parameters/* histograms

    # ---- checkpoints -------------------------------------------------------------------------
    def checkpoint(self) -> dict:
        """The resume point of this step as one dict (under FSDP gathered whole on rank 0: every rank calls it)."""
        s = self.state
        if self.sharded:
            model_state, optim_state = parallel.full_state(self.raw_model, self.optimizer)
        else:
            model_state, optim_state = self.raw_model.state_dict(), self.optimizer.state_dict()
        return {**self.meta, "model": clean_state_dict(model_state),
                "optimizer": optim_state, "scheduler": self.scheduler.state_dict(),
                "scaler": self.precision.scaler.state_dict(), "step": s.step, "best_val_loss": s.best_val_loss,
                "val_loss": s.last_val_loss, "rng": rng_state(self.objective), "logger": {"run_id": s.logger_id},
                "skipped_steps": s.skipped, "log_window": dict(s.window), "monitor": self.monitor_record()}

    def monitor_record(self) -> dict:
        """What a checkpoint records of trainer.monitor: the metric, its direction, the best value and its step
        (best.pt holds that state), evaluations since, and the kept top-k [[value, step], ...]."""
        s = self.state
        return {"metric": self.loop.monitor, "mode": self.loop.direction, "value": s.best_metric,
                "step": s.best_step, "stale": s.stale, "top": [list(t) for t in s.top]}

    def save(self, best: bool, last: bool = True, top: bool = False, dropped: tuple[int, ...] = ()) -> None:
        """Write this step's checkpoint files: best.pt when the evaluation improved on the monitored best,
        last.pt (the resume point) when due, checkpoints/step-<N>.pt when `top` (trainer.keep_top_k; the
        `dropped` steps' files are deleted). One torch.save per step whatever the set: best.pt is written first
        and last.pt / the step file are hard links to it, so a kill between never leaves best.pt older than
        what last.pt records. Files written without last.pt (between trainer.save_interval saves) hold the
        weights and records without optimizer state: they are not resume points. Refuses weights that are not
        finite (the previous files stay). With trainer.async_save the write runs in a background thread from a
        CPU copy; the next save, the end of fit() and a stop wait for it."""
        if not (best or last or top or dropped):
            return
        ranks_rng = self._gather_rng() if self.dist.enabled else None  # a collective: every rank's data order
        if last:  # known on every rank (only rank 0 writes): whether this step still needs a save
            self._last_step_saved = self.state.step
        if not (self.dist.is_main or self.sharded):
            return
        ckpt = self.checkpoint()  # under FSDP a collective: every rank gathers, rank 0 keeps the tensors
        if ranks_rng is not None:
            ckpt["rng_ranks"] = ranks_rng
        folder = self.run_dir / "checkpoints"
        bad = next((k for k, v in ckpt["model"].items() if v.is_floating_point() and not bool(v.isfinite().all())),
                   None)
        if self.sharded and self.dist.enabled:  # every rank stops, or none
            flag = torch.tensor([0 if bad is None else 1], device=self.dist.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            bad = bad or (f"rank 0's check" if int(flag) else None)
        if not self.dist.is_main:
            if bad is not None:
                raise UserError(f"rank {self.dist.rank}: stopping with rank 0 (the weights are not finite)")
            return
        if bad is not None:
            raise UserError(f"the weights are not finite at step {self.state.step} ({bad}); not writing them over "
                            f"{folder}; lower optimizer.lr or set trainer.grad_clip (now {self.loop.grad_clip})"
                            f"{self._kept()}")
        if not last:
            ckpt = {k: v for k, v in ckpt.items() if k not in RESUME_STATE}
        step = self.state.step
        targets = [folder / "best.pt"] * best + [folder / "last.pt"] * last + [folder / f"step-{step:06d}.pt"] * top
        saved = (step, folder / "last.pt", str(self.run_dir)) if last else None
        self.wait_for_saves()
        if not self.loop.async_save:
            self._write(ckpt, targets, dropped, saved)
            return
        ckpt = _cpu_copy(ckpt)  # training goes on changing the live tensors while the thread writes
        self._writer = threading.Thread(target=self._write_in_background, args=(ckpt, targets, dropped, saved),
                                        name="checkpoint-writer")
        self._writer.start()

    def _gather_rng(self) -> list[dict]:
        """Every rank's random and sampler state (each rank draws its own batches), on every rank."""
        states = [None] * self.dist.world_size
        dist.all_gather_object(states, rng_state(self.objective))
        return states

    def _write(self, ckpt: dict, targets: list[Path], dropped, saved) -> None:
        if targets:
            save_checkpoint(ckpt, targets[0])
        for target in targets[1:]:
            link_or_save(targets[0], target, ckpt)
        for n in dropped:
            (self.run_dir / "checkpoints" / f"step-{n:06d}.pt").unlink(missing_ok=True)
        if saved is not None:
            self._saved = saved

    def _write_in_background(self, *args) -> None:
        try:
            self._write(*args)
        except BaseException as e:  # raised in the training thread by wait_for_saves
            self._write_error = e

    def wait_for_saves(self) -> None:
        """Block until a background checkpoint write is complete; raise its error (a full disk: one line)."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.join()
        error, self._write_error = self._write_error, None
        if error is not None:
            raise error

    def _kept(self) -> str:
        """'; <last.pt> (step N) is the newest checkpoint' for error lines, or '' if none was written."""
        if self._saved is None:
            return ""
        return f"; {self._saved[1]} (step {self._saved[0]}) is the newest checkpoint"

    def restore(self, ckpt: dict) -> None:
        """Continue from a checkpoint written by `save` (model, optimizer, scheduler, step, RNG). A part that
        is missing or does not fit this run (weights of another shape, another optimizer) is one UserError."""
        if not all(k in ckpt for k in ("optimizer", "scheduler", "rng")):
            raise UserError(f"resume={ckpt.get('path')!r} holds weights without optimizer state (a best.pt or "
                            f"step file written between trainer.save_interval saves); resume from the run's last.pt, "
                            f"or start from these weights with finetune.py ckpt=")
        part = "model weights"
        try:
            if self.sharded:  # each rank takes its shard of the whole state the file holds
                part = "model weights or optimizer state"
                parallel.load_full_state(self.raw_model, self.optimizer, ckpt["model"], ckpt["optimizer"])
            else:
                self.raw_model.load_state_dict(ckpt["model"])
                part = "optimizer state"
                self.optimizer.load_state_dict(ckpt["optimizer"])
            part = "scheduler state"
            self.scheduler.load_state_dict(ckpt["scheduler"])
            part = "grad scaler state"
            if ckpt.get("scaler"):
                self.precision.scaler.load_state_dict(ckpt["scaler"])
            part = "random number generator state"
            if (rng := self._rank_rng(ckpt)) is not None:
                set_rng_state(rng, self.objective)
            if len(saved_rng_states(ckpt)) != self.dist.world_size:
                # work a rank had half served (an RL objective's rollout) is dropped on every rank, so that all
                # start their next piece of work (a rollout's collectives) at the same step
                drop = getattr(self.objective, "drop_partial", None)
                if drop is not None:
                    drop()
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
        self._restore_monitor(ckpt)

    def _restore_monitor(self, ckpt: dict) -> None:
        """The monitored best, patience count and top-k list of a resumed run. A checkpoint that monitored
        another metric (or direction), or predates trainer.monitor, gives no best of this one, except val/loss
        (min), which every checkpoint records: the next evaluation that improves on it writes best.pt."""
        s, loop = self.state, self.loop
        rec = ckpt.get("monitor")
        number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
        if (isinstance(rec, dict) and rec.get("metric") == loop.monitor and rec.get("mode") == loop.direction
                and number(rec.get("value")) and type(rec.get("step")) is int):
            s.best_metric, s.best_step = float(rec["value"]), rec["step"]
            s.stale = rec["stale"] if type(rec.get("stale")) is int and rec["stale"] >= 0 else 0
            top = rec.get("top") if isinstance(rec.get("top"), list) else []
            s.top = [[float(v), int(n)] for v, n in (t for t in top if isinstance(t, list) and len(t) == 2)
                     if number(v) and type(n) is int][: loop.keep_top_k]
        elif loop.monitor == "val/loss" and loop.direction == "min" and math.isfinite(s.best_val_loss):
            s.best_metric, s.best_step = s.best_val_loss, None
        elif isinstance(rec, dict) and rec.get("metric") is not None:
            log.warning("the resumed checkpoint chose best.pt by %s (%s); this run monitors %s (%s): the next "
                        "evaluation writes best.pt", rec.get("metric"), rec.get("mode"), loop.monitor, loop.direction)

    def _rank_rng(self, ckpt: dict) -> dict | None:
        """This rank's random and sampler state from a checkpoint (a multi-process run saves every rank's). On
        another number of processes each rank the saved run had continues its own stream and a rank it did not
        have keeps the fresh one it was seeded with (seed + rank), so no two ranks draw the same batches; None
        means keep the fresh state."""
        saved = saved_rng_states(ckpt)
        rank, world = self.dist.rank, self.dist.world_size
        if len(saved) != world and self.dist.is_main:
            log.warning("resuming on %d processes from a run of %d: ranks below %d continue their own data order, "
                        "the others start their own (the losses will not match an uninterrupted run's)",
                        world, len(saved), min(world, len(saved)))
        if rank >= len(saved):
            return None
        if not isinstance(saved[rank], dict):
            raise TypeError(f"rank {rank}'s saved state is {type(saved[rank]).__name__}, not a dict")
        return saved[rank]

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
            self._last_step_saved = self.state.step
            log.info("resumed from %s at step %d", resume["path"], self.state.step)
            self._check_best(Path(resume["path"]).with_name("best.pt"))
        if self.dist.is_main:
            self.state.logger_id = self.logger.start(config, str(self.run_dir), self.state.logger_id)

    def _check_best(self, best_path: Path) -> None:
        """After restoring: if best.pt beside the resumed checkpoint does not hold the best value of
        trainer.monitor that the checkpoint records (a kill between the two writes of an older version, a lost
        or failed best.pt), write best.pt now when the restored state is that best, else forget the record so
        that the next evaluation better than the best.pt on disk writes one."""
        s, loop = self.state, self.loop
        if s.best_metric is None:
            return
        on_disk = _monitored_value_of(best_path, loop.monitor, loop.direction)
        if on_disk is not None and (on_disk <= s.best_metric if loop.direction == "min" else on_disk >= s.best_metric):
            return
        if s.best_step == s.step or (s.best_step is None and s.last_val_loss == s.best_metric):
            log.warning("%s does not hold the best %s %.4f recorded at step %d; writing best.pt from it",
                        best_path, loop.monitor, s.best_metric, s.step)
            if self.dist.is_main:
                save_checkpoint(self.checkpoint(), self.run_dir / "checkpoints" / "best.pt")
        else:
            log.warning("%s does not hold the best %s %.4f recorded by the checkpoint (that state is lost); the "
                        "next evaluation better than %s writes best.pt", best_path, loop.monitor, s.best_metric,
                        "nothing" if on_disk is None else f"{on_disk:.4f}")
            s.best_metric, s.best_step = on_disk, None
            if loop.monitor == "val/loss" and loop.direction == "min":  # the summary's best agrees with best.pt
                s.best_val_loss = math.inf if on_disk is None else on_disk

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
        skips overflowing gradients itself, so there only a non-finite loss counts. At a step that is logged
        (or watched) the per-group statistics and histograms go to self._observed / self._histograms; at any
        other step nothing more is done than the update itself."""
        stats, watch = self._observing(self.state.step + 1)
        self._observed, self._histograms = {}, {}
        losses, tokens = [], 0
        for micro in range(self.loop.grad_accum_steps):
            batch = self.objective.train_batch()
            tokens += self.objective.batch_tokens(batch)
            last = micro == self.loop.grad_accum_steps - 1
            # gradients are reduced across ranks on the last micro-step only (DDP no_sync, FSDP's gradient sync)
            sync = parallel.micro_step(self.model, last) if self.dist.enabled else contextlib.nullcontext()
            with sync:
                with self.precision.autocast():
                    loss, _ = self.objective.loss(self.model, batch)
                self.precision.scaler.scale(loss / self.loop.grad_accum_steps).backward()
            losses.append(loss.detach().float())  # stays on the device: no synchronisation per micro-step
        self.precision.scaler.unscale_(self.optimizer)
        if stats:  # before clipping: the groups' squares sum to the squared global norm
            self._observed.update(stats.grad_norms())
        if watch in ("gradients", "all"):
            self._histograms.update(self._stats_of().histograms("gradients", keep=self.dist.is_main))
        params = [p for p in self.raw_model.parameters() if p.grad is not None]
        if self.loop.grad_clip and self.loop.grad_clip > 0:
            norm = parallel.full_tensor(torch.nn.utils.clip_grad_norm_(params, self.loop.grad_clip))
        elif self.sharded:  # the norm of the whole gradient, not of this rank's shard
            norm = parallel.full_tensor(torch.nn.utils.get_total_norm([p.grad for p in params]))
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
        # the step's one host-device synchronisation: the losses and the norm come back together, and the skip
        # decision below needs them before the update
        *values, norm = torch.stack([*losses, norm.detach().float().to(losses[0].device)]).tolist()
        total = sum(values)
        finite = math.isfinite(total) and (self.precision.scaler.is_enabled() or math.isfinite(norm))
        finite = self._agree(finite)
        if finite:
            if stats:
                stats.snapshot()
            self.precision.scaler.step(self.optimizer)
            if stats:
                self._observed.update(stats.update_ratios())
        if watch in ("parameters", "all"):  # the weights this step leaves (those a checkpoint of it holds)
            self._histograms.update(self._stats_of().histograms("parameters", keep=self.dist.is_main))
        self.precision.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return total / self.loop.grad_accum_steps, norm, tokens * self.dist.world_size, finite

    def _stats_of(self) -> LayerStats:
        if self._stats is None:  # under FSDP each rank sums its shards' squares, then all ranks together
            self._stats = LayerStats(self.raw_model, reduce=self.sharded and self.dist.enabled)
        return self._stats

    def _observing(self, step: int) -> tuple[LayerStats | None, str | None]:
        """What `step` takes besides the update: per-group statistics (a log step with trainer.layer_stats) and
        which histograms (logger.watch at multiples of watch_interval). Under DDP only rank 0 (its gradients
        are already reduced); under FSDP every rank, since each holds only shards."""
        if not (self.dist.is_main or self.sharded):
            return None, None
        logged = step % self.loop.log_interval == 0 or step == self.loop.max_iters
        stats = self._stats_of() if self.loop.layer_stats and logged else None
        watch = self.watch if self.watch is not None and step % self.watch_interval == 0 else None
        return stats, watch

    def _share_watch(self) -> None:
        """Under FSDP: rank 0's logger.watch settings to every rank (all gather what a histogram shows)."""
        if self.sharded and self.dist.enabled:
            settings = [self.watch, self.watch_interval]
            dist.broadcast_object_list(settings, src=0)
            self.watch, self.watch_interval = settings

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
        s.best_val_loss = min(s.best_val_loss, val)
        loop = self.loop
        value = out.get(loop.monitor)
        if value is None:  # what the stage reports is known only now; the step itself is kept
            self.save(best=False)
            self.wait_for_saves()
            metrics = ", ".join(k for k in out if k.startswith("val/"))
            raise UserError(f"trainer.monitor={loop.monitor!r} is not a metric this stage reports (it reports "
                            f"{metrics}); {self._resume_hint()} trainer.monitor=<one of them>")
        improved = loop.better(float(value), s.best_metric)
        if improved:
            s.best_metric, s.best_step, s.stale = float(value), s.step, 0
        else:
            s.stale += 1
        dropped = self._rank_top(float(value))
        rows = []
        sampler = self.sampling_model(refresh=True)  # under FSDP a collective: every rank takes part
        if self.dist.is_main:
            rows = self.objective.samples(sampler, self.precision.autocast)
            self.logger.log_samples(s.step, rows)
            self.raw_model.train()
        self.record({**out, "val/best_loss": s.best_val_loss, "eval_seconds": time.perf_counter() - t0})
        log.info("step %d: %s", s.step, "  ".join(f"{k} {v:.4f}" for k, v in out.items()))
        if loop.patience and s.stale >= loop.patience:
            s.stopped_early = True
            log.info("early stop at step %d: %s has not improved on %.4f (step %s) for %d evaluations "
                     "(trainer.patience=%d)", s.step, loop.monitor, s.best_metric, s.best_step, s.stale, loop.patience)
        return improved, dropped

    def sampling_model(self, refresh: bool = False) -> torch.nn.Module:
        """The model samples are drawn from: the trained one, or under FSDP rank 0's plain copy (`refresh`:
        loaded with the weights gathered now, a collective every rank must call)."""
        if not self.sharded:
            return self.raw_model
        if refresh:
            state = parallel.full_model_state(self.raw_model)
            if self._sampler is not None:
                self._sampler.load_state_dict(state)
        return self._sampler

    def _rank_top(self, value: float) -> list[int]:
        """trainer.keep_top_k: put this evaluation into the ranked top list (state.top, best first) when it
        belongs there -> the steps that fell out."""
        s, k = self.state, self.loop.keep_top_k
        if not k or not math.isfinite(value):
            return []
        sign = 1.0 if self.loop.direction == "min" else -1.0
        ranked = sorted([t for t in s.top if t[1] != s.step] + [[value, s.step]], key=lambda t: (sign * t[0], t[1]))
        s.top = ranked[:k]
        return [n for _, n in ranked[k:] if n != s.step]  # this step, not kept, has no file to delete


    def fit(self) -> float:
        """Train to max_iters (from state.step), evaluating and checkpointing every eval_interval steps.

        Raises gpt.errors.Interrupted after a SIGINT / SIGTERM (last.pt holds the last finished step)."""
        s = self.state
        model_flops = self.raw_model.flops_per_token() if hasattr(self.raw_model, "flops_per_token") else None
        self.raw_model.train()
        # a bar where stderr is a terminal; on a pipe or in a log file (CI, SLURM, nohup) a line per log step instead,
        # since each redraw of a bar would be a whole line there
        tty = self.progress and sys.stderr.isatty()
        bar = tqdm(total=self.loop.max_iters, initial=s.step, desc="train", dynamic_ncols=True, disable=not tty,
                   unit="it")
        w = s.window  # the log window is part of the state, so a resumed run logs the same train/loss
        shown: dict[str, str] = {}  # the last log window's share of step time spent waiting for batches
        self._share_watch()
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
                    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:,.0f}", **shown, refresh=False)
                    if (s.step % self.loop.log_interval == 0 or s.step == self.loop.max_iters) and w["steps"]:
                        m = {"train/loss": w["loss"] / w["steps"], "train/lr": self.scheduler.get_last_lr()[0],
                             "train/grad_norm": norm, "train/tokens_per_sec": tok_s,
                             "train/tokens": s.step * tokens}
                        if model_flops and self.peak_flops:
                            m["train/mfu"] = model_flops * tok_s / self.peak_flops
                        waited = getattr(self.objective, "data_seconds", None)
                        data = ""
                        if waited is not None:  # seconds this log window waited for batches (input bound?)
                            m["train/data_seconds"] = waited()
                            share = f"{m['train/data_seconds'] / max(w['seconds'], 1e-9):.0%}"
                            data = f"  data {1e3 * m['train/data_seconds'] / w['steps']:.1f} ms/step ({share})"
                            shown = {"data": share}  # on the bar until the next log step replaces it
                        m.update(self._observed)
                        self.record(m)
                        if self.progress and not tty:
                            log.info("step %d/%d: train/loss %.4f  lr %.3g  %s tokens/s%s", s.step,
                                     self.loop.max_iters, m["train/loss"], m["train/lr"], f"{tok_s:,.0f}", data)
                        w.update(_new_window())
                    if self._histograms and self.dist.is_main:
                        self.logger.log_histograms(s.step, self._histograms)
                    self._observed, self._histograms = {}, {}
                    evaluated = s.step % self.loop.eval_interval == 0 or s.step == self.loop.max_iters
                    improved, dropped = self.run_eval() if evaluated else (False, [])
                    due = (self.loop.save_interval is None and evaluated) or s.step == self.loop.max_iters or (
                        self.loop.save_interval is not None and s.step % self.loop.save_interval == 0)
                    self.save(best=improved, last=due or bool(self._stop_signal()) or s.stopped_early,
                              top=any(n == s.step for _, n in s.top) and evaluated, dropped=tuple(dropped))
                    if s.stopped_early:
                        break
                    signum = self._stop_signal()
                    if signum:  # between steps (a signal during the save above too): last.pt must hold this step
                        self.wait_for_saves()
                        if self._last_step_saved != s.step:  # the same decision on every rank (collectives)
                            self.save(best=False)
                            self.wait_for_saves()
                        if self.dist.enabled:  # no rank exits (and makes torchrun stop the others) mid-save
                            dist.barrier()
                        self.signals.hand_on(signum)
                        raise self._interrupted(signum)
            self.wait_for_saves()
        finally:
            bar.close()
            if self._writer is not None:  # an error is on its way out: still let the started write finish
                self._writer.join()
        return s.last_val_loss
