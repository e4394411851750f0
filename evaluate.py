"""Evaluate checkpoints: python evaluate.py ckpt=<checkpoint or run folder> [instructions=<file.jsonl>];
python evaluate.py -m ckpt=<a>,<b> (comparison table); python evaluate.py plot=<run or sweep folder>
(see conf/evaluate.yaml)."""

import sys

import hydra
from omegaconf import DictConfig

from gpt.config import entry, literal_overrides, register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
@entry
def main(cfg: DictConfig) -> None:
    from gpt.evaluation import main as evaluate

    evaluate(cfg)


if __name__ == "__main__":
    sys.argv = literal_overrides(sys.argv)  # prompts and paths as typed (gpt.config.FREE_TEXT, PATH_KEYS)
    main()
