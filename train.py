"""Train a GPT: python train.py [group=option ...] [key=value ...]  (see conf/train.yaml)."""

import hydra
from omegaconf import DictConfig

from gpt.config import entry, register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@entry
def main(cfg: DictConfig) -> float:
    from gpt.experiment import train

    return train(cfg)


if __name__ == "__main__":
    main()
