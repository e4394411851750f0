"""Fine-tuning and alignment (what finetune.py runs): the part of a run that differs from pretraining, for the
run builder (gpt.run). The parent checkpoint is loaded, the stage builds its model(s) and data from it, LoRA
adapters go on if asked, and the run's config records the model and tokenizer that rebuild the result.

Every stage is an objective (gpt/stages/) constructed as `stage(parent=<checkpoint dict>, data=<data.path>,
val_data=<data.val_path>, device=..., seed=..., rank=...)`; it exposes `.model` (what trains), `.tokenizer` and
`checkpoint_extra()` (the config node that rebuilds the model, plus e.g. label names). Everything is
validated (data read, parent kinds and tokenizers checked) before the run folder gets any file. A stage made
of runs (stage=rlhf: reward model, then PPO) is a `Pipeline`, which runs its sub-runs through this module.
"""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from gpt import distributed
from gpt.checkpoint import file_sha256, load_checkpoint
from gpt.config import run_dir
from gpt.errors import UserError
from gpt.lora import apply_lora, count_parameters, short_names
from gpt.run import Parts, execute
from gpt.runs import read_metrics
from gpt.trust import as_config

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


class Pipeline:
    """A stage made of runs: `run(cfg)` trains its sub-runs (each through finetune()) and returns the last
    one's val loss. finetune.py dispatches on this type, never on a stage's name."""

    def run(self, cfg: DictConfig) -> float:
        raise NotImplementedError


class RLHF(Pipeline):
    """stage=rlhf: train a reward model from cfg.ckpt on the preference pairs in cfg.data (stage=reward),
    then PPO from cfg.ckpt against it (stage=ppo) on the prompts in data.prompts, or on the prompts of the
    pairs when that is unset; one command, two sub-runs in <run folder>/reward and <run folder>/ppo.
    Both data files are read before anything trains. reward / ppo: overrides of conf/stage/reward.yaml /
    ppo.yaml; reward_trainer: trainer.* for the reward model."""

    def __init__(self, reward: dict | None = None, reward_trainer: dict | None = None, ppo: dict | None = None):
        self.reward, self.reward_trainer, self.ppo = reward or {}, reward_trainer or {}, ppo or {}

    def run(self, cfg: DictConfig) -> float:
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
        rm_cfg = stage_config(cfg, "reward", self.reward, out_dir / "reward")
        with open_dict(rm_cfg):
            rm_cfg.trainer = OmegaConf.merge(rm_cfg.trainer, self.reward_trainer)
        finetune(rm_cfg)
        ppo_cfg = stage_config(cfg, "ppo", {**self.ppo, "reward_ckpt": str(out_dir / "reward")}, out_dir / "ppo")
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


class Finetune:
    """finetune.py's RunSpec: a stage (objective) trained from a parent checkpoint."""

    script = "finetune.py"
    fixed = ("stage", "data", "lora", "seed", "ckpt")
    mfu = False  # MFU only with hardware.peak_flops= (no 0.3 s measurement at the start of every fine-tuning run)

    def check_resume(self, cfg: DictConfig, resume: dict) -> None:
        if "lineage" not in resume or "stage" not in resume:
            raise UserError(f"resume={resume['path']!r} is not a finetune.py checkpoint (no stage/lineage); "
                            f"continue a pretraining run with train.py resume=<run>")
        lineage_ = resume["lineage"]
        if not isinstance(lineage_.get("parent"), str) or not isinstance(lineage_.get("parent_sha256"), str):
            raise UserError(f"resume={resume['path']!r}: its lineage has no parent path and sha256; the checkpoint "
                            f"is damaged")

    def build(self, cfg: DictConfig, info: distributed.DistInfo, resume: dict | None) -> Parts:
        if resume is not None:  # the parent the run started from, whatever ckpt= the command line has
            with open_dict(cfg):
                cfg.ckpt = resume["lineage"]["parent"]
        parent = load_checkpoint(cfg.ckpt, prefer="best", map_location=info.device)
        if resume is not None:
            check_same_parent(resume, parent)
        objective = instantiate(cfg.stage)(parent=parent, data=cfg.data.path, val_data=cfg.data.get("val_path"),
                                           device=info.device, seed=int(cfg.seed), rank=info.rank)
        model = objective.model
        lora_info = add_lora(cfg, objective, parent)
        extra = objective.checkpoint_extra()
        tok = objective.tokenizer
        with open_dict(cfg):  # the checkpoint's config rebuilds this run's model and tokenizer
            cfg.model = as_config(extra.pop("model_config"))
            cfg.tokenizer = as_config({**parent["config"]["tokenizer"],
                                       **{k: v for k, v in tok.identity().items() if k == "special"},
                                       "vocab_size": tok.vocab_size})
        trainable, total = count_parameters(model)
        log.info("stage %s from %s: %s parameters (%s trainable)", objective.name, parent["path"], f"{total:,}",
                 f"{trainable:,}")
        if lora_info:
            log.info("LoRA r=%d alpha=%g on %d layers (%s): %s trainable of %s parameters (%.2f%%)", cfg.lora.r,
                     cfg.lora.alpha, len(lora_info["layers"]), short_names(lora_info["layers"]), f"{trainable:,}",
                     f"{total:,}", 100.0 * trainable / total)
        meta = {"stage": objective.name, "lineage": lineage(parent), **extra}
        return Parts(model, objective, tok, meta=meta, report=report_evaluations)


FINETUNE = Finetune()


def check_same_parent(resume: dict, parent: dict) -> None:
    """The resumed run's frozen references (and its lineage) need the very parent it started from."""
    if file_sha256(parent["path"]) != resume["lineage"]["parent_sha256"]:
        raise UserError(f"resume={resume['path']!r}: its parent {parent['path']!r} changed since the run started "
                        f"(sha256 differs from the one recorded in its lineage); resuming needs the same parent file")


def report_evaluations(trainer, stats: dict) -> dict:
    """A fine-tuning run's own summary lines: each metric at the first and the last evaluation, and the stage."""
    evals = [r for r in read_metrics(trainer.metrics.path) if "val/loss" in r] if trainer.metrics else []
    if evals:
        keys = [k for k in evals[-1] if k.startswith(("val/", "train/")) and k != "val/best_loss"]
        for k in keys:
            first, last = evals[0].get(k), evals[-1].get(k)
            print(f"{k}: {first if first is None else round(first, 4)} (step {evals[0]['step']}) -> "
                  f"{last if last is None else round(last, 4)} (step {evals[-1]['step']})")
    print(f"stage {trainer.objective.name}")
    return {}


def finetune(cfg: DictConfig) -> float:
    """Run cfg.stage from cfg.ckpt on cfg.data (or continue cfg.resume); return the final validation loss."""
    if not cfg.get("resume"):
        stage = instantiate(cfg.stage)  # an objective's partial, or a Pipeline (a stage made of runs)
        if isinstance(stage, Pipeline):
            return stage.run(cfg)
    return execute(cfg, FINETUNE)
