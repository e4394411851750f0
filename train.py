"""Train a GPT: python train.py [group=option ...] [key=value ...]  (see conf/train.yaml)."""

import sys

import hydra
from omegaconf import DictConfig

from gpt.config import entry, literal_overrides, register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@entry
def main(cfg: DictConfig) -> float:
    from gpt.experiment import train

    return train(cfg)


if __name__ == "__main__":
    sys.argv = literal_overrides(sys.argv)  # prompts and paths as typed (gpt.config.FREE_TEXT, PATH_KEYS)
    main()
