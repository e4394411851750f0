"""Fine-tune or align a trained GPT: python finetune.py stage=<sft|...> ckpt=<parent checkpoint or run folder>
data=<file.jsonl>  (see conf/finetune.yaml; data=<file> is shorthand for data.path=<file>)."""

import sys

import hydra
from omegaconf import DictConfig

from gpt.config import entry, file_shorthand, literal_overrides, register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="finetune")
@entry
def main(cfg: DictConfig) -> float:
    from gpt.finetuning import finetune

    return finetune(cfg)


if __name__ == "__main__":
    sys.argv = literal_overrides(file_shorthand(sys.argv))  # data=<file>; prompts and paths as typed
    main()
