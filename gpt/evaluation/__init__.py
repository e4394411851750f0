"""evaluate.py's logic: score a checkpoint and write the scores into its own run folder.

A checkpoint is evaluated from the file alone: model, tokenizer and, when it was trained on the bundled
corpus, that corpus (rebuilt from checked plain values; a text file or dataset a checkpoint names is never
read: pass it with `data=`, whose file is scored whole by default). Each evaluation that applies adds flat,
prefixed metrics to one report:

    language modelling  every token of a data split: `<split>/loss`, `perplexity`, `bits_per_byte`
    instructions        greedy answers to a JSONL of prompts (a chat model's in its chat template, ending at
                        <|end|>): `instruct/exact_match`, `bleu`, `rouge1/2/L`; needs no corpus
    samples             a few sampled continuations, saved to samples.txt
    lm-eval tasks       harness.tasks=[...]: lm-evaluation-harness on the model (gpt.evaluation.harness):
                        `harness/<task>/<metric>`, lm-eval's results in harness.json

The report goes to metrics.json (plus generations.jsonl and samples.txt) and is printed as a table;
`evaluate.py -m ckpt=a,b` ends with one comparison table across the jobs (`ComparisonTable`), and
`evaluate.py plot=<folder>` only draws the loss and learning-rate plots (gpt.plots).

The work is split by job: gpt.evaluation.lm (corpus, perplexity, bits per byte), .generation (greedy
answers, samples), .text_metrics (exact match, BLEU, ROUGE), .heads (classifier and reward heads) and
.report (metrics.json, tables, the ComparisonTable callback); this module runs them (evaluate, main).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from gpt.config import remove_unused_run_dir, run_dir
from gpt.errors import UserError
from gpt.evaluation.generation import instruction_metrics, instruction_records, is_chat, sample_texts
from gpt.evaluation.heads import classifier_metrics, reward_metrics
from gpt.evaluation.lm import SPLITS, language_model_metrics, lm_data, split_tokens
from gpt.evaluation.report import ComparisonTable, checkpoint_info, finish
from gpt.heads import Classifier, RewardModel
from gpt.inference import dtype_option, load_for_inference

__all__ = ["ComparisonTable", "check_settings", "evaluate", "main", "plot"]

log = logging.getLogger("gpt")


def check_settings(cfg: DictConfig) -> None:
    """Counts in conf/evaluate.yaml must be positive (samples.num may be 0: no samples)."""
    for key, value, least in (("perplexity.batch_size", cfg.perplexity.batch_size, 1),
                              ("perplexity.max_tokens", cfg.perplexity.get("max_tokens"), 1),
                              ("perplexity.stride", cfg.perplexity.get("stride"), 1),
                              ("generation.max_new_tokens", cfg.generation.max_new_tokens, 1),
                              ("samples.num", cfg.samples.num, 0),
                              ("samples.max_new_tokens", cfg.samples.max_new_tokens, 1)):
        if key in ("perplexity.max_tokens", "perplexity.stride") and value is None:
            continue  # null: every token / disjoint windows
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise UserError(f"{key}={value} must be an integer >= {least}")
    split = cfg.perplexity.get("split")
    if split is not None and split not in SPLITS:
        raise UserError(f"perplexity.split={split!r} must be one of {', '.join(SPLITS)} (or null)")
    stop = cfg.generation.get("stop")
    if stop is not None and not (OmegaConf.is_list(stop) and all(isinstance(x, str) for x in stop)):
        raise UserError(f"generation.stop={stop} must be a list of strings (or null)")


def evaluate(cfg: DictConfig, out=None) -> dict:
    """Evaluate cfg.ckpt (see conf/evaluate.yaml), write metrics.json, generations.jsonl and samples.txt into
    the run folder, print the table (to `out`, default the sys.stdout of the moment); -> the report
    {"checkpoint", "data", "metrics", "files"}."""
    out = out or sys.stdout
    check_settings(cfg)
    model, tokenizer, ckpt = load_for_inference(cfg.ckpt, cfg.device, cfg.get("quantize"), dtype_option(cfg))
    autocast = contextlib.nullcontext  # the weights are already in the chosen dtype (cfg.dtype): no autocast
    folder = run_dir()
    report = {"checkpoint": checkpoint_info(ckpt, model), "data": {}, "metrics": {}, "files": {}}
    records = instruction_records(cfg.instructions, tokenizer) if cfg.get("instructions") else None  # fail early
    harness_tasks = cfg.get("harness") is not None and bool(cfg.harness.get("tasks"))
    if harness_tasks and isinstance(model, (Classifier, RewardModel)):
        raise UserError("harness.tasks= applies to a language model; this checkpoint has a classifier or reward head")
    harness = load_harness() if harness_tasks else None  # lm-eval installed? (fail early)

    if isinstance(model, Classifier):  # a classification head: accuracy and confusion matrix instead of perplexity
        if not cfg.get("labelled"):
            raise UserError("this is a classifier checkpoint; pass labelled=<JSONL of {\"text\", \"label\"}>")
        report["data"] = {"source": str(cfg.labelled), "split": "labelled"}
        report["metrics"].update(classifier_metrics(model, tokenizer, list(ckpt["labels"]), cfg.labelled,
                                                    int(cfg.perplexity.batch_size), autocast))
        return finish(report, folder, out)
    if isinstance(model, RewardModel):  # a scalar reward head: pairwise accuracy instead of perplexity
        if not cfg.get("pairs"):
            raise UserError("this is a reward checkpoint; pass pairs=<JSONL of {\"prompt\", \"chosen\", \"rejected\"}>")
        report["data"] = {"source": str(cfg.pairs), "split": "pairs"}
        report["metrics"].update(reward_metrics(model, tokenizer, cfg.pairs, int(cfg.perplexity.batch_size),
                                                autocast))
        return finish(report, folder, out)
    for key, needs in (("labelled", "a classifier (finetune.py stage=classify)"),
                       ("pairs", "a reward model (finetune.py stage=reward)")):
        if cfg.get(key):
            raise UserError(f"{key}= applies to {needs}; {ckpt['path']!r} is a language model (use instructions= "
                            f"or data= for it)")

    ppl = cfg.perplexity
    source, split, fraction, note = lm_data(cfg, ckpt)
    if source is None and records is None and not harness_tasks:
        raise UserError(note)
    if source is None:  # instructions or lm-eval tasks only: no corpus to score (a chat or imported model has none)
        print(f"note: {note}; language-model metrics skipped", file=sys.stderr)
        report["data"] = {"source": None, "split": None, "note": note}
    else:
        tokens = split_tokens(source, tokenizer, split, fraction)
        if ppl.get("max_tokens") is not None:
            tokens = tokens[:int(ppl.max_tokens) + 1]
        log.info("scoring %s tokens of the %s split of %s", f"{len(tokens) - 1:,}", split, source.describe())
        report["data"] = {"source": source.describe(), "split": split}
        report["metrics"].update(language_model_metrics(model, tokens, tokenizer, int(ppl.batch_size),
                                                        ppl.get("stride"), autocast, prefix=split))

    if records is not None:
        gen = cfg.generation
        log.info("answering the %d prompts of %s%s", len(records), cfg.instructions,
                 " in the chat template" if is_chat(tokenizer) else "")
        stop = None if gen.get("stop") is None else list(gen.stop)
        report["metrics"].update(instruction_metrics(model, tokenizer, records, int(gen.max_new_tokens), stop,
                                                     folder / "generations.jsonl"))
        report["files"]["generations"] = "generations.jsonl"

    if harness_tasks:
        report["metrics"].update(harness.harness_metrics(model, tokenizer, cfg.harness, folder))
        report["files"]["harness"] = "harness.json"

    s = cfg.samples
    if int(s.num) > 0:
        prompt = s.prompt if s.prompt is not None else checkpoint_sample_prompt(ckpt)
        texts = sample_texts(model, tokenizer, str(prompt), int(s.num), int(s.max_new_tokens), float(s.temperature),
                             s.top_k, int(cfg.seed), autocast)
        (folder / "samples.txt").write_text(("\n" + "-" * 40 + "\n").join(texts) + "\n", encoding="utf-8")
        report["files"]["samples"] = "samples.txt"

    return finish(report, folder, out)


def load_harness(needed_by: str = "harness.tasks"):
    """gpt.evaluation.harness (it imports lm-eval, an optional dependency), or one line on how to install it."""
    try:
        from gpt.evaluation import harness
    except ImportError as e:  # ModuleNotFoundError too
        if not (e.name or "").startswith("lm_eval"):
            raise
        if isinstance(e, ModuleNotFoundError) and e.name == "lm_eval":
            raise UserError(f"{needed_by} needs lm-eval: pip install 'gpt-pipeline[eval]' (or lm-eval)") from None
        from importlib.metadata import version  # an lm-eval without the parts used here (or not the tested one)

        raise UserError(f"{needed_by}: the installed lm-eval {version('lm_eval')} is not one this package works "
                        f"with ({str(e).splitlines()[0]}): pip install \"lm-eval>=0.4.13,<0.5\"") from None
    return harness


def checkpoint_sample_prompt(ckpt: dict) -> str:
    """The checkpoint's stage.sample_prompt when it is a string, else a newline."""
    config = ckpt.get("config")
    stage = config.get("stage") if isinstance(config, dict) else None
    prompt = stage.get("sample_prompt") if isinstance(stage, dict) else None
    return prompt if isinstance(prompt, str) else "\n"


def plot(folder: str, out=None) -> list[Path]:
    """evaluate.py plot=<run or sweep folder>: write its plots there, print their paths (to `out`, default
    sys.stdout); keep no evaluation run folder (nothing was evaluated)."""
    out = out or sys.stdout
    from gpt.plots import plot_folder

    paths = plot_folder(folder)
    for p in paths:
        out.write(f"{p}\n")
    remove_unused_run_dir(run_dir())  # evaluations/<date>/ too, when nothing else is in it
    return paths


def main(cfg: DictConfig):
    """evaluate.py: plot=<folder> draws plots; otherwise ckpt=<checkpoint or run folder> is evaluated."""
    if cfg.get("plot"):
        if cfg.get("ckpt"):
            raise UserError("pass either plot=<run or sweep folder> or ckpt=<checkpoint>, not both")
        return plot(cfg.plot)
    return evaluate(cfg)
