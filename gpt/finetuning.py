"""Build a fine-tuning run (what finetune.py calls): load the parent checkpoint, let the stage build its
model(s) and data from it, then train with the one loop (gpt.trainer.Trainer).

Every stage is an objective (gpt/stages/) constructed as `stage(parent=<checkpoint dict>, data=<data.path>,
val_data=<data.val_path>, device=..., seed=..., rank=...)`; it exposes `.model` (what trains), `.tokenizer` and
`checkpoint_extra()` (the config node that rebuilds the model, plus e.g. label names). Everything is
validated (data read, parent kinds and tokenizers checked) before the run folder gets any file.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from gpt import distributed
from gpt.checkpoint import file_sha256, load_checkpoint
from gpt.config import run_dir, to_plain
from gpt.errors import UserError
from gpt.experiment import (adopt, apply_hyperparameters, configure_hardware, continue_settings, finish_run,
                            print_samples, seed_everything)
from gpt.lora import apply_lora, count_parameters, short_names
from gpt.optim import param_groups
from gpt.runs import read_metrics
from gpt.trust import as_config
from gpt.trainer import Precision, Trainer

log = logging.getLogger("gpt")


def lineage(parent: dict) -> dict:
    """Where a run started: the parent checkpoint's path, content hash, stage, and its own lineage."""
    return {"parent": parent["path"], "parent_sha256": file_sha256(parent["path"]),
            "parent_stage": parent.get("stage", "pretrain"), "parent_lineage": parent.get("lineage")}


STAGE_CONF = Path(__file__).resolve().parent / "conf" / "stage"


def stage_config(cfg: DictConfig, name: str, overrides: DictConfig | dict, out_dir: Path) -> DictConfig:
    """A copy of the run config with conf/stage/<name>.yaml (plus `overrides`) as its stage node."""
    sub = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with open_dict(sub):
        sub.stage = OmegaConf.merge(OmegaConf.load(STAGE_CONF / f"{name}.yaml"), overrides or {})
        sub.run_dir = str(out_dir)
    return sub


def rlhf(cfg: DictConfig) -> float:
    """stage=rlhf: train a reward model from cfg.ckpt on the preference pairs in cfg.data (stage=reward),
    then PPO from cfg.ckpt against it (stage=ppo) on the prompts in data.prompts, or on the prompts of the
    pairs when that is unset; one command, two sub-runs in <run folder>/reward and <run folder>/ppo.
    Both data files are read before anything trains."""
    from gpt.jsonl import read_pairs, read_prompts

    out_dir = Path(cfg.get("run_dir") or run_dir())
    data = cfg.data
    read_pairs(data.path)
    if data.get("val_path"):
        read_pairs(data.val_path)
    prompts, prompts_val = data.get("prompts"), data.get("prompts_val")
    if not prompts:  # PPO on the pairs' own prompts (and the held-out pairs' prompts)
        prompts, prompts_val = data.path, data.get("val_path")
    read_prompts(prompts)
    rm_cfg = stage_config(cfg, "reward", cfg.stage.reward, out_dir / "reward")
    with open_dict(rm_cfg):
        rm_cfg.trainer = OmegaConf.merge(rm_cfg.trainer, OmegaConf.to_container(cfg.stage.reward_trainer, resolve=True))
    finetune(rm_cfg)
    ppo_cfg = stage_config(cfg, "ppo", {**OmegaConf.to_container(cfg.stage.ppo), "reward_ckpt": str(out_dir / "reward")},
                           out_dir / "ppo")
    with open_dict(ppo_cfg):
        ppo_cfg.data.path, ppo_cfg.data.val_path = prompts, prompts_val
    return finetune(ppo_cfg)


def add_lora(cfg: DictConfig, objective, parent: dict) -> dict | None:
    """lora.r > 0: wrap objective.model's lora.targets layers with adapters in place (the objective keeps
    the same model object; its frozen reference / reward models are separate and untouched) and freeze
    the rest except a new head and the rows the stage added to the vocabulary. -> gpt.lora.apply_lora's
    summary, or None for full fine-tuning."""
    node = cfg.get("lora")
    if node is None or not node.get("r"):
        return None
    targets = node.get("targets")
    targets = OmegaConf.to_container(targets) if OmegaConf.is_config(targets) else targets
    return apply_lora(objective.model, r=node.r, alpha=node.get("alpha", 16), targets=targets,
                      dropout=node.get("dropout", 0.0), new_rows_from=int(parent["config"]["model"]["vocab_size"]))


def adopt_resumed(cfg: DictConfig, resume: dict) -> None:
    """resume=<finetune run>: take what must match the saved weights (stage, parent, data, lora, seed) from
    the checkpoint, so only loop settings (trainer.*) come from the command line."""
    if "lineage" not in resume or "stage" not in resume:
        raise UserError(f"resume={resume['path']!r} is not a finetune.py checkpoint (no stage/lineage); "
                        f"continue a pretraining run with train.py resume=<run>")
    parent = resume["lineage"].get("parent")
    if not isinstance(parent, str) or not isinstance(resume["lineage"].get("parent_sha256"), str):
        raise UserError(f"resume={resume['path']!r}: its lineage has no parent path and sha256; the checkpoint "
                        f"is damaged")
    adopt(cfg, resume, ("stage", "data", "lora", "seed", "ckpt"), "finetune.py")
    continue_settings(cfg, resume)
    with open_dict(cfg):
        cfg.ckpt = parent
    log.info("resume: stage %s, parent, data and lora settings taken from %s", resume["stage"], resume["path"])


def check_same_parent(resume: dict, parent: dict) -> None:
    """The resumed run's frozen references (and its lineage) need the very parent it started from."""
    if file_sha256(parent["path"]) != resume["lineage"]["parent_sha256"]:
        raise UserError(f"resume={resume['path']!r}: its parent {parent['path']!r} changed since the run started "
                        f"(sha256 differs from the one recorded in its lineage); resuming needs the same parent file")


def finetune(cfg: DictConfig) -> float:
    """Run cfg.stage from cfg.ckpt on cfg.data (or continue cfg.resume); return the final validation loss."""
    resume = load_checkpoint(cfg.resume, prefer="last") if cfg.get("resume") else None
    if resume is not None:
        adopt_resumed(cfg, resume)
    if cfg.stage.get("composite"):  # a stage made of stages (stage=rlhf): its _target_ runs them
        return get_object(cfg.stage._target_)(cfg)
    t_start = time.time()
    configure_hardware(cfg.hardware)
    info = distributed.setup(cfg.hardware.device, cfg.hardware.distributed, cfg.hardware.get("backend"))
    out_dir = Path(cfg.get("run_dir") or run_dir())
    logger = None
    exit_code = 1
    try:
        parent = load_checkpoint(cfg.ckpt, prefer="best", map_location=info.device)
        if resume is not None:
            check_same_parent(resume, parent)
        seed_everything(int(cfg.seed) + info.rank)
        objective = instantiate(cfg.stage)(parent=parent, data=cfg.data.path, val_data=cfg.data.get("val_path"),
                                           device=info.device, seed=int(cfg.seed), rank=info.rank)
        model = objective.model
        lora_info = add_lora(cfg, objective, parent)
        extra = objective.checkpoint_extra()
        tok = objective.tokenizer
        with open_dict(cfg):  # the checkpoint's config rebuilds this run's model and tokenizer
            cfg.model = as_config(extra.pop("model_config"))
            cfg.tokenizer = as_config({**parent["config"]["tokenizer"], **{k: v for k, v in tok.identity().items()
                                                                                  if k == "special"},
                                              "vocab_size": tok.vocab_size})
        trainable, total = count_parameters(model)
        log.info("stage %s from %s: %s parameters (%s trainable)", objective.name, parent["path"], f"{total:,}",
                 f"{trainable:,}")
        if lora_info:
            log.info("LoRA r=%d alpha=%g on %d layers (%s): %s trainable of %s parameters (%.2f%%)", cfg.lora.r,
                     cfg.lora.alpha, len(lora_info["layers"]), short_names(lora_info["layers"]), f"{trainable:,}",
                     f"{total:,}", 100.0 * trainable / total)
        optimizer = instantiate(cfg.optimizer)(param_groups(model, cfg.optimizer.get("weight_decay", 0.0)))
        scheduler = instantiate(cfg.scheduler)(optimizer)
        precision = Precision(info.device, cfg.hardware.autocast_dtype)
        plain = to_plain(cfg)
        logger = instantiate(cfg.logger) if info.is_main else None
        loop = {k: v for k, v in cfg.trainer.items() if k != "batch_size"}
        meta = {"config": plain, "tokenizer": tok.identity(), "stage": objective.name, "lineage": lineage(parent),
                "resumed_from": resume["path"] if resume else None, **extra}
        trainer = Trainer(model, objective, optimizer, scheduler, **loop, precision=precision, dist_info=info,
                          run_dir=out_dir, logger=logger, checkpoint_meta=meta, compile=cfg.hardware.compile,
                          peak_flops=None)
        trainer.begin(resume, plain)
        if resume is not None:
            apply_hyperparameters(optimizer, scheduler, cfg)
        val = trainer.fit()
        if info.is_main:
            summarise(trainer, time.time() - t_start, out_dir)
        exit_code = 0
        return val
    finally:
        if logger is not None:
            logger.finish(exit_code)
        distributed.teardown()


def summarise(trainer: Trainer, seconds: float, out_dir) -> None:
    """Print samples, the first and last evaluation's metrics, plots, speed and where the checkpoints are."""
    print_samples(trainer)
    evals = [r for r in read_metrics(trainer.metrics.path) if "val/loss" in r]
    if evals:
        keys = [k for k in evals[-1] if k.startswith(("val/", "train/")) and k != "val/best_loss"]
        for k in keys:
            first, last = evals[0].get(k), evals[-1].get(k)
            print(f"{k}: {first if first is None else round(first, 4)} (step {evals[0]['step']}) -> "
                  f"{last if last is None else round(last, 4)} (step {evals[-1]['step']})")
    print(f"stage {trainer.objective.name}")
    finish_run(trainer, seconds, out_dir, {})
