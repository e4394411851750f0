"""Serve a checkpoint over HTTP: python serve.py ckpt=<checkpoint or run folder> port=8000 (see conf/serve.yaml)."""

import sys

import hydra
from omegaconf import DictConfig

from gpt.config import entry, literal_overrides, register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="serve")
@entry
def main(cfg: DictConfig) -> None:
    from gpt.serve import serve

    serve(cfg)


if __name__ == "__main__":
    sys.argv = literal_overrides(sys.argv)  # prompts and paths as typed (gpt.config.FREE_TEXT, PATH_KEYS)
    main()
