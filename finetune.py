"""Fine-tune or align a trained GPT: python finetune.py stage=<sft|...> ckpt=<parent checkpoint or run folder>
data=<file.jsonl>  (see gpt/conf/finetune.yaml; data=<file> is shorthand for data.path=<file>; gpt/cli.py)."""

from gpt.cli import finetune

if __name__ == "__main__":
    finetune()
