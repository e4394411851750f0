"""Sample from a trained model: python infer.py ckpt=<checkpoint or run folder> prompt="ROMEO:" (see conf/infer.yaml)."""

import sys

import hydra
from omegaconf import DictConfig

from gpt.config import entry, literal_overrides, register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="infer")
@entry
def main(cfg: DictConfig) -> None:
    from gpt.inference import stream_samples

    stream_samples(cfg)


if __name__ == "__main__":
    sys.argv = literal_overrides(sys.argv)  # prompts and paths as typed (gpt.config.FREE_TEXT, PATH_KEYS)
    main()
