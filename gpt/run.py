"""The one run builder: every training run (train.py's pretraining, finetune.py's stages) is assembled here.

    device, precision, distribution  ->  resume (what the checkpoint fixes, what the command line changes)
      -> the script's part: tokenizer, data, model (+ LoRA, + heads), objective, checkpoint fields
      -> optimizer, schedule, logger, Trainer (built from cfg.trainer)  ->  fit  ->  summary, plots

A script supplies only what differs (a `RunSpec`: gpt.experiment.PRETRAIN, gpt.finetuning.FINETUNE): which
config keys a checkpoint fixes on resume, how its model and objective are built, and the lines its summary
prints. Everything a run shares (resume rules, precision, logger, the end-of-run summary) is written once.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from gpt import distributed
from gpt.checkpoint import load_checkpoint
from gpt.config import history_until, run_dir, to_plain
from gpt.errors import UserError
from gpt.memory import GiB, device_memory, estimate
from gpt.optim import build_optimizer
from gpt.plots import plot_folder
from gpt.runs import peak_memory, read_metrics, run_summary
from gpt.trainer import Loop, Precision, Trainer, peak_flops_for
from gpt.trust import as_config, checked

log = logging.getLogger("gpt")


@dataclass
class Parts:
    """What a script builds for the run builder: the model that trains, its objective and tokenizer, the
    checkpoint fields beyond the common ones (stage, lineage, label names, ...), and `report(trainer, stats)`,
    which prints the script's own summary lines at the end (stats: gpt.runs.run_summary of the run's
    metrics) and returns its extra summary/* metrics."""
    model: torch.nn.Module
    objective: object
    tokenizer: object
    meta: dict = field(default_factory=dict)
    report: Callable[[Trainer, dict], dict] = lambda trainer, stats: {}


class RunSpec(Protocol):
    script: str                 # what a user types to run it: "train.py" | "finetune.py"
    fixed: tuple[str, ...]      # config keys a resumed run takes from its checkpoint
    mfu: bool                   # measure the peak FLOP/s (0.3 s) for MFU when hardware.peak_flops is unset

    def check_resume(self, cfg: DictConfig, resume: dict) -> None: ...

    def build(self, cfg: DictConfig, info: distributed.DistInfo, resume: dict | None) -> Parts: ...


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def parallel_jobs() -> int:
    """How many jobs of this sweep run side by side on this machine (hydra.launcher.n_jobs, e.g. joblib's); 1
    outside a sweep or where the launcher runs one job at a time."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return 1
    n = OmegaConf.select(HydraConfig.get(), "launcher.n_jobs", default=None)
    return n if isinstance(n, int) and n > 1 else 1


def configure_hardware(hw: DictConfig) -> None:
    """hardware.threads, or for jobs that share the machine (a parallel sweep) each its share of the cores, so
    that n jobs do not run n times torch's default of one thread per core."""
    jobs = parallel_jobs()
    if hw.get("threads"):
        torch.set_num_threads(int(hw.threads))
    elif jobs > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // jobs))
    if hw.get("tf32") and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


# ---- resume: weights and state from the checkpoint, behaviour from the command line -----------------

def command_line_overrides() -> list[str]:
    """The key=value overrides the user typed (Hydra's task overrides); [] outside a Hydra run."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


def typed_keys() -> list[tuple[str, str]]:
    """(key, override) for each key=value override the user typed (`+key=` / `~key` give `key`)."""
    return [(o.split("=", 1)[0].lstrip("+~"), o) for o in command_line_overrides()]


def adopt(cfg: DictConfig, resume: dict, keys: tuple[str, ...], script: str) -> None:
    """resume=: set cfg's `keys` (config groups or values the saved weights and state depend on) to the
    checkpoint's. An override of one of them on the command line that differs from the checkpoint's value
    cannot be honoured, so it is refused with one line instead of being dropped silently."""
    saved = resume["config"]
    for key, override in typed_keys():
        top = key.split(".", 1)[0]
        if top not in keys or top not in saved:
            continue
        mine = OmegaConf.select(cfg, key, default=None)
        mine = to_plain(mine) if OmegaConf.is_config(mine) else mine
        theirs = OmegaConf.select(as_config({top: saved[top]}), key, default=None)
        theirs = OmegaConf.to_container(theirs) if OmegaConf.is_config(theirs) else theirs
        if key == top and isinstance(mine, dict) and isinstance(theirs, dict):  # a group choice: data=text
            differs = any(mine.get(k) != v for k, v in theirs.items() if k != "vocab_size")
        else:
            differs = mine != theirs
        if differs:
            raise UserError(f"{override} cannot apply on resume: the checkpoint {resume['path']!r} fixes {top} "
                            f"({key}={theirs!r}); drop it to continue the run, or start a new run with "
                            f"{script} without resume=")
    with open_dict(cfg):
        for key in keys:
            if key not in saved:
                continue
            if isinstance(saved[key], dict):
                cfg[key] = as_config(saved[key])
            elif key == "seed":
                if not isinstance(saved[key], int) or isinstance(saved[key], bool):
                    raise UserError(f"checkpoint {resume['path']!r}: seed={saved[key]!r} is not an integer")
                cfg[key] = saved[key]


def continue_settings(cfg: DictConfig, resume: dict, groups: tuple[str, ...] = ("optimizer", "scheduler")) -> None:
    """resume=: the run continues with the checkpoint's optimizer and schedule settings, and the command line's
    `optimizer.*` / `scheduler.*` overrides on top (a lower lr, a longer total_iters). A new choice of the group
    itself (`optimizer=sgd`) starts from that option as composed. The saved node may only name the classes
    this package's conf/<group>/ ships (gpt.trust.checked), so the file still chooses no code."""
    typed = {key for key, _ in typed_keys()}
    for group in groups:
        saved = resume["config"].get(group)
        if group in typed or not isinstance(saved, dict):
            continue
        node = as_config(checked(saved, group, f"checkpoint {resume['path']!r}", f"config.{group}"))
        for key in sorted(k for k in typed if k.startswith(f"{group}.")):  # what the user typed wins
            OmegaConf.update(node, key[len(group) + 1:], OmegaConf.select(cfg, key), force_add=True)
        with open_dict(cfg):
            cfg[group] = node


def apply_hyperparameters(optimizer, scheduler, cfg: DictConfig, model: torch.nn.Module) -> None:
    """After a resume restored the optimizer and scheduler state: the composed config's optimizer
    hyperparameters (lr, weight_decay, betas, ...) and schedule (warmup, total_iters, ...) replace the
    saved ones, so `optimizer.lr=` or `scheduler.schedule.total_iters=` on a resume command line take effect.
    With the run's own config this writes back the values already there (a resumed run stays bit-exact)."""
    # a fresh optimizer over the same model has the same groups, each with its own settings (param_groups: the
    # first decays, the rest do not; optimizer=muon: Muon's group its muon_lr); building one allocates no state
    fresh = build_optimizer(instantiate(cfg.optimizer), model, cfg.optimizer.get("weight_decay", 0.0)).param_groups
    for group, new in zip(optimizer.param_groups, fresh, strict=True):
        for key, value in new.items():
            if key in ("lr", "params") or key not in group:
                continue
            group[key] = value
        group["initial_lr"] = new["lr"]
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if lambdas is None:  # not a LambdaLR (every conf/scheduler option is one): nothing more to re-apply
        return
    schedule = instantiate(cfg.scheduler)(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0))
    for mine, new in zip(lambdas, schedule.lr_lambdas):
        if type(mine) is type(new) and hasattr(new, "__dict__"):  # WarmupCosine / WarmupConstant settings
            mine.__dict__.update(new.__dict__)
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    scheduler._last_lr = [base * lam(scheduler.last_epoch) for base, lam in zip(scheduler.base_lrs, lambdas)]
    for group, lr in zip(optimizer.param_groups, scheduler._last_lr):
        group["lr"] = lr


# ---- the run -------------------------------------------------------------------------------------

def shard_for_fsdp(model, cfg: DictConfig, info: distributed.DistInfo):
    """hardware=fsdp (hardware.data_parallel=fsdp) under torchrun: shard the model that trains in place, block by
    block, before the optimizer is built -> rank 0's plain copy to sample from (None elsewhere, and without FSDP).

    Any script and stage: pretraining, and every finetune.py stage with or without LoRA (frozen base weights and
    trained adapters share a block's shard; only the adapters have gradients and optimizer state). A stage's
    frozen models (the DPO / GRPO / PPO reference, PPO's reward model) stay whole on every rank, unsharded: they
    run forward only, without gradients or optimizer state, so each costs 4 bytes per parameter per rank against
    the 16 that training one costs before sharding, and they run without collectives, so ranks need not call
    them in lockstep. Rollouts and exact-match evaluations decode on a plain module holding the gathered weights
    (gpt.parallel.gathered)."""
    if not info.enabled or cfg.hardware.get("data_parallel", "ddp") != "fsdp":
        return None
    import copy

    from gpt import parallel
    from gpt.model import Block

    # rank 0's plain copy, taken before sharding (its weights are replaced by the gathered ones at each evaluation)
    sampler = copy.deepcopy(model).eval() if info.is_main else None
    parallel.shard(model, Block, mixed_precision=info.device.startswith("cuda"),
                   reshard_after_forward=bool(cfg.hardware.get("reshard_after_forward", True)),
                   cpu_offload=bool(cfg.hardware.get("cpu_offload", False)))
    return sampler


def check_memory(model, optimizer, cfg: DictConfig, precision: Precision, info: distributed.DistInfo) -> None:
    """Log the estimated memory of a training step per device (gpt.memory); on a GPU it clearly cannot hold,
    stop with one line now instead of an out-of-memory error in the first step."""
    seq_len = getattr(getattr(model, "config", None), "block_size", 0)
    fsdp = info.enabled and cfg.hardware.get("data_parallel", "ddp") == "fsdp"
    est = estimate(model, optimizer, int(cfg.trainer.batch_size), seq_len, precision.dtype,
                   shards=info.world_size if fsdp else 1, ddp=info.enabled and not fsdp)
    capacity = device_memory(info.device)
    log.info("%s%s", est.line(), f" of {capacity / GiB:.1f} GiB on {info.device}" if capacity else "")
    if capacity and est.total > 0.9 * capacity:
        raise UserError(f"a training step needs about {est.total / GiB:.1f} GiB per device ({est.line()}), more than "
                        f"{info.device} holds ({capacity / GiB:.1f} GiB); "
                        + "; or ".join(memory_remedies(model, optimizer, cfg, precision, info, fsdp, seq_len, est)))


def memory_remedies(model, optimizer, cfg: DictConfig, precision: Precision, info: distributed.DistInfo,
                    fsdp: bool, seq_len: int, est) -> list[str]:
    """What would shrink a step that does not fit, each with its estimated total: activation checkpointing and
    FSDP where the run does not use them yet, then a smaller micro-batch."""
    out = []
    batch = int(cfg.trainer.batch_size)
    config = getattr(model, "config", None)
    if config is not None and not getattr(config, "activation_checkpointing", False):
        ckpt = estimate(model, optimizer, batch, seq_len, precision.dtype, shards=info.world_size if fsdp else 1,
                        ddp=info.enabled and not fsdp, checkpointing=True)
        out.append(f"set model.activation_checkpointing=true (about {ckpt.total / GiB:.1f} GiB)")
    if not fsdp:
        shards = max(info.world_size, 2)
        sharded = estimate(model, optimizer, batch, seq_len, precision.dtype, shards=shards)
        out.append(f"run under torchrun with hardware=fsdp to shard parameters, gradients and optimizer state "
                   f"(about {sharded.total / GiB:.1f} GiB on each of {shards} devices)")
    out.append(f"lower trainer.batch_size (now {batch}) and raise trainer.grad_accum_steps, or use a smaller model")
    return out


def precision_change(resume: dict, precision: Precision, setting: str | None) -> str | None:
    """A resumed run whose precision differs from the one its checkpoint trained in (hardware.* comes from the
    command line: autocast_dtype=auto resolves per machine) -> a warning, else None."""
    saved = resume.get("precision")
    if not isinstance(saved, str) or saved == str(precision):
        return None
    return (f"the resumed run trained in {saved[:40]}; it continues in {precision} (hardware.autocast_dtype={setting}), "
            f"so its losses will differ from an uninterrupted run's; pass hardware.autocast_dtype= to choose")


def schedule_warnings(cfg: DictConfig) -> list[str]:
    """Settings that run but are probably not what was meant: a warmup that never ends within the run."""
    warmup = OmegaConf.select(cfg, "scheduler.schedule.warmup_iters", default=None)
    iters = OmegaConf.select(cfg, "trainer.max_iters", default=None)
    if isinstance(warmup, int) and isinstance(iters, int) and warmup >= iters:
        return [f"scheduler.schedule.warmup_iters={warmup} >= trainer.max_iters={iters}: the learning rate never "
                f"reaches optimizer.lr in this run; lower the warmup or raise max_iters"]
    return []


def execute(cfg: DictConfig, spec: RunSpec) -> float:
    """Build and train one run of `spec`'s script from the composed config; return the final val loss (the
    metric sweepers optimise)."""
    t_start = time.time()
    configure_hardware(cfg.hardware)
    info = distributed.setup(cfg.hardware.device, cfg.hardware.distributed, cfg.hardware.get("backend"))
    out_dir = Path(cfg.get("run_dir") or run_dir())
    logger, exit_code = None, 1
    try:
        if not info.is_main:
            logging.getLogger().setLevel(logging.WARNING)
        if not cfg.get("resume") and distributed.requeued() and (out_dir / "checkpoints" / "last.pt").is_file():
            with open_dict(cfg):  # started again by the scheduler: continue from what the first start saved
                cfg.resume = str(out_dir / "checkpoints" / "last.pt")
            log.info("requeued job: resuming from %s", cfg.resume)
        resume = load_checkpoint(cfg.resume, prefer="last") if cfg.get("resume") else None
        if resume is not None:  # what must match the saved weights comes from the checkpoint itself
            spec.check_resume(cfg, resume)
            adopt(cfg, resume, spec.fixed, spec.script)
            continue_settings(cfg, resume)
            log.info("resume: %s taken from %s", ", ".join(spec.fixed), resume["path"])
            if info.is_main and out_dir.resolve() == Path(resume["path"]).resolve().parent.parent:
                history_until(out_dir / "metrics.jsonl", int(resume["step"]))  # continuing in place
        seed_everything(int(cfg.seed) + info.rank)
        for warning in schedule_warnings(cfg):
            log.warning(warning)
        parts = spec.build(cfg, info, resume)
        sampler = shard_for_fsdp(parts.model, cfg, info)

        optimizer = build_optimizer(instantiate(cfg.optimizer), parts.model, cfg.optimizer.get("weight_decay", 0.0))
        scheduler = instantiate(cfg.scheduler)(optimizer)
        precision = Precision(info.device, cfg.hardware.autocast_dtype)
        check_memory(parts.model, optimizer, cfg, precision, info)
        if resume is not None and precision_change(resume, precision, cfg.hardware.autocast_dtype):
            log.warning(precision_change(resume, precision, cfg.hardware.autocast_dtype))
        peak = cfg.hardware.get("peak_flops") or (peak_flops_for(info.device, precision.dtype)[0] if spec.mfu
                                                   else None)
        plain = to_plain(cfg)
        logger = instantiate(cfg.logger) if info.is_main else None
        meta = {"config": plain, "tokenizer": parts.tokenizer.identity(), "precision": str(precision),
                "resumed_from": resume["path"] if resume else None, **parts.meta}
        trainer = Trainer(parts.model, parts.objective, optimizer, scheduler, loop=Loop(**to_plain(cfg.trainer)),
                          precision=precision, dist_info=info, run_dir=out_dir, logger=logger, checkpoint_meta=meta,
                          compile=cfg.hardware.compile, peak_flops=peak, resume_command=spec.script, sampler=sampler)
        trainer.begin(resume, plain)
        if resume is not None:
            apply_hyperparameters(optimizer, scheduler, cfg, parts.model)
        log.info("training on %s with %s: %d iters x %d tokens/iter", info.device, precision, trainer.loop.max_iters,
                 trainer.loop.tokens_per_iter(parts.model.config.block_size, info.world_size))
        val = trainer.fit()
        if info.is_main:
            summarise(trainer, parts, time.time() - t_start, out_dir)
        exit_code = 0
        return val
    finally:
        if logger is not None:
            logger.finish(exit_code)
        distributed.teardown()


def summarise(trainer: Trainer, parts: Parts, seconds: float, out_dir: Path) -> None:
    """What every run ends with: samples, the script's own lines, loss / lr plots, the speed line, where the
    run folder, checkpoints and plots are; the summary/* metrics go to metrics.jsonl and the logger."""
    s = trainer.state
    rows = trainer.objective.samples(trainer.sampling_model(), trainer.precision.autocast)
    print("\n" + "-" * 72)
    for r in rows:
        print(r["text"])
    print("-" * 72)
    stats = run_summary(read_metrics(trainer.metrics.path) if trainer.metrics is not None else [])
    extra = parts.report(trainer, stats)
    peak, measured = peak_memory(next(trainer.raw_model.parameters()).device)
    plots = []
    try:
        plots = plot_folder(out_dir)
    except Exception as e:  # the run itself succeeded: a plotting failure must not fail it
        log.warning("could not write plots: %s: %s", type(e).__name__, e)
    speed = f"{stats['tokens_per_sec']:,.0f} tokens/s" if "tokens_per_sec" in stats else "n/a"
    mfu = f"{100 * stats['mfu']:.2f}%" if "mfu" in stats else "n/a"
    print(f"steps {s.step}  tokens seen {stats.get('tokens', 0):,}  wall time {seconds:.0f}s  "
          f"training speed {speed}  MFU {mfu}  peak memory {peak / 2**20:,.0f} MiB ({measured})")
    loop = trainer.loop
    if s.stopped_early:
        print(f"stopped early at step {s.step} of {loop.max_iters}: {loop.monitor} did not improve for {s.stale} "
              f"evaluations (trainer.patience={loop.patience})")
    print(f"run folder {out_dir}")
    best = (f" ({loop.monitor} {s.best_metric:.4f} at step {s.best_step}, the {'lowest' if loop.direction == 'min' else 'highest'})"
            if s.best_metric is not None and s.best_step is not None else "")
    print(f"checkpoints: {out_dir / 'checkpoints' / 'last.pt'}  {out_dir / 'checkpoints' / 'best.pt'}{best}")
    if s.top:
        print("top " + str(loop.keep_top_k) + ": " + "  ".join(f"step-{n:06d}.pt ({v:.4f})" for v, n in s.top))
    if plots:
        print("plots: " + "  ".join(str(p) for p in plots))
    monitored = {"summary/monitor": loop.monitor, "summary/monitor_mode": loop.direction,
                 "summary/best_monitor": s.best_metric, "summary/best_monitor_step": s.best_step,
                 "summary/stopped_early": s.stopped_early}
    summary = {"summary/val_loss": s.last_val_loss, "summary/best_val_loss": s.best_val_loss, **monitored, **extra,
               "summary/wall_seconds": seconds, "summary/peak_memory_bytes": peak,
               **{f"summary/{k}": stats[k] for k in ("tokens", "tokens_per_sec", "mfu") if k in stats}}
    summary = {k: v for k, v in summary.items() if v is not None}
    if trainer.metrics is not None:
        trainer.metrics.write(s.step, summary)
    trainer.logger.log(summary, s.step)
    trainer.logger.log_checkpoint(out_dir / "checkpoints" / "last.pt", ["latest", f"step-{s.step}"])
    if not math.isfinite(s.last_val_loss):
        log.warning("no evaluation ran; raise trainer.max_iters or lower trainer.eval_interval")
