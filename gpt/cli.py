"""The entry points: train, finetune, infer, evaluate, serve and prepare, each a Hydra app over gpt/conf/<name>.yaml.

They run as console scripts after `pip install .` (gpt-train, gpt-finetune, ...), as `python -m gpt.cli
<command> [overrides]`, and through the scripts at the top of a clone (`python train.py ...`), which call
them. Each composes its config, validates it (gpt.config.entry: a bad value is one `error:` line, exit 2)
and calls one library function. Run folders go under the current directory (outputs/, multirun/,
evaluations/), wherever the package is installed.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from gpt.config import entry, file_shorthand, literal_overrides, register_resolvers, resume_in_place

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@entry
def _train(cfg: DictConfig) -> float:
    from gpt.experiment import train as run

    return run(cfg)


@hydra.main(version_base="1.3", config_path="conf", config_name="finetune")
@entry
def _finetune(cfg: DictConfig) -> float:
    from gpt.finetuning import finetune as run

    return run(cfg)


@hydra.main(version_base="1.3", config_path="conf", config_name="infer")
@entry
def _infer(cfg: DictConfig) -> None:
    from gpt.inference import stream_samples

    stream_samples(cfg)


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
@entry
def _evaluate(cfg: DictConfig) -> None:
    from gpt.evaluation import main as run

    run(cfg)


@hydra.main(version_base="1.3", config_path="conf", config_name="serve")
@entry
def _serve(cfg: DictConfig) -> None:
    from gpt.serve import serve as run

    run(cfg)


@hydra.main(version_base="1.3", config_path="conf", config_name="prepare")
@entry
def _prepare(cfg: DictConfig) -> None:
    from gpt.prepare import prepare as run

    run(cfg)


# Hydra reads sys.argv: rewrite it first so prompts and paths arrive as typed (gpt.config.FREE_TEXT, PATH_KEYS).
def train() -> None:
    """Train a GPT: gpt-train [group=option ...] [key=value ...]  (see gpt/conf/train.yaml)."""
    sys.argv = literal_overrides(resume_in_place(sys.argv))
    _train()


def finetune() -> None:
    """Fine-tune or align a trained GPT: gpt-finetune stage=<sft|...> ckpt=<parent checkpoint or run folder>
    data=<file.jsonl>  (see gpt/conf/finetune.yaml; data=<file> is shorthand for data.path=<file>)."""
    sys.argv = literal_overrides(resume_in_place(file_shorthand(sys.argv)))
    _finetune()


def infer() -> None:
    """Sample from a trained model: gpt-infer ckpt=<checkpoint or run folder> prompt="ROMEO:"
    (see gpt/conf/infer.yaml)."""
    sys.argv = literal_overrides(sys.argv)
    _infer()


def evaluate() -> None:
    """Evaluate checkpoints: gpt-evaluate ckpt=<checkpoint or run folder> [instructions=<file.jsonl>];
    gpt-evaluate -m ckpt=<a>,<b> (comparison table); gpt-evaluate plot=<run or sweep folder>
    (see gpt/conf/evaluate.yaml)."""
    sys.argv = literal_overrides(sys.argv)
    _evaluate()


def serve() -> None:
    """Serve a checkpoint over HTTP: gpt-serve ckpt=<checkpoint or run folder> port=8000 (see gpt/conf/serve.yaml)."""
    sys.argv = literal_overrides(sys.argv)
    _serve()


def prepare() -> None:
    """Tokenize a corpus into the token cache train.py uses: gpt-prepare [data=...] [tokenizer=...]
    [data.num_proc=N]  (see gpt/conf/prepare.yaml)."""
    sys.argv = literal_overrides(sys.argv)
    _prepare()


def runs() -> None:
    """List run folders with their settings and metrics, newest last: gpt-runs [folder ...] [--json]
    (default: outputs/ and multirun/ here; see gpt.runs)."""
    from gpt.runs import main as run

    sys.exit(run(sys.argv[1:]))


def lm_eval() -> None:
    """lm-evaluation-harness's own command line with this package's model registered: gpt-lm-eval --model
    gpt-pipeline --model_args ckpt=<run> --tasks <task> [lm-eval's options] (see gpt.evaluation.harness)."""
    from gpt.errors import UserError
    from gpt.evaluation import load_harness

    try:
        harness = load_harness("gpt-lm-eval")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(harness.main())


COMMANDS = {"train": train, "finetune": finetune, "infer": infer, "evaluate": evaluate, "serve": serve, "runs": runs,
            "prepare": prepare, "lm-eval": lm_eval}


def main() -> None:
    """python -m gpt.cli <command> [overrides]: the console scripts without installing them."""
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(f"usage: python -m gpt.cli {{{','.join(COMMANDS)}}} [key=value ...]")
    command = sys.argv.pop(1)
    sys.argv[0] = command
    COMMANDS[command]()


if __name__ == "__main__":
    main()
