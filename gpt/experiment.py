"""Pretraining (what train.py runs): the part of a run that differs from fine-tuning, for the run builder
(gpt.run). The tokenizer, the data source, the model and the stage are instantiated from their `_target_`
nodes in gpt/conf/; on resume= the model, tokenizer, data and seed come from the checkpoint.
"""

from __future__ import annotations

import logging

from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from gpt import distributed
from gpt.data import unigram_loss
from gpt.errors import UserError
from gpt.run import Parts, execute
from gpt.tokenizer import from_config

log = logging.getLogger("gpt")


class Pretrain:
    """train.py's RunSpec: next-token prediction on a token stream built from a corpus."""

    script = "train.py"
    fixed = ("model", "tokenizer", "data", "seed")
    mfu = True

    def check_resume(self, cfg: DictConfig, resume: dict) -> None:
        if "lineage" in resume:
            raise UserError(f"resume={resume['path']!r} is a finetune.py checkpoint (stage {resume.get('stage')}); "
                            f"continue it with finetune.py resume=<run>")

    def build(self, cfg: DictConfig, info: distributed.DistInfo, resume: dict | None) -> Parts:
        tokenizer = from_config(cfg.tokenizer)  # vocab_size: an output (filled in below), bpe's size to train to
        source = instantiate(cfg.data)
        data = source.load(tokenizer)
        tokenizer = data.tokenizer
        if resume is not None and resume["tokenizer"] != tokenizer.identity():
            raise UserError(f"resume={cfg.resume!r} was trained with tokenizer {resume['tokenizer'].get('type')} "
                            f"{resume['tokenizer'].get('name', '')}; this run's data/tokenizer differ; "
                            f"use the same data= and tokenizer= as the checkpoint's run")
        log.info("data: %s -> %s train / %s val tokens (%s cache %s)", source.describe(), f"{len(data.train):,}",
                 f"{len(data.val):,}", "reused" if data.reused else "new", data.cache_path)
        with open_dict(cfg):  # model.vocab_size interpolates tokenizer.vocab_size
            cfg.tokenizer.vocab_size = tokenizer.vocab_size
        model = instantiate(cfg.model).to(info.device)
        log.info("model: %s parameters (%s)", f"{model.num_params():,}",
                 ", ".join(f"{k}={v}" for k, v in model.hparams().items()))
        objective = instantiate(cfg.stage)(data=data, block_size=model.config.block_size, device=info.device,
                                           seed=int(cfg.seed), rank=info.rank)
        baseline = unigram_loss(data.train, data.val, tokenizer.vocab_size)

        def report(trainer, stats: dict) -> dict:
            s = trainer.state
            best_at = f" at step {stats['best_val_step']}" if stats.get("best_val_loss") == s.best_val_loss else ""
            print(f"val loss {s.last_val_loss:.4f} (best {s.best_val_loss:.4f}{best_at}) vs unigram baseline "
                  f"{baseline:.4f} nats/token")
            loop = trainer.loop
            print(f"  (val loss: the mean over trainer.eval_iters={loop.eval_iters} batches of {loop.batch_size} x "
                  f"{model.config.block_size} tokens drawn at random from the val split, the same batches at every "
                  f"evaluation, {trainer.precision}; evaluate.py's perplexity scores every val token in float32)")
            return {"summary/unigram_loss": baseline}

        return Parts(model, objective, tokenizer, report=report)


PRETRAIN = Pretrain()


def train(cfg: DictConfig) -> float:
    """Pretrain as cfg says (or continue cfg.resume); return the final validation loss."""
    return execute(cfg, PRETRAIN)
