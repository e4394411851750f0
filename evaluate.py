"""Evaluate checkpoints: python evaluate.py ckpt=<checkpoint or run folder> [instructions=<file.jsonl>];
python evaluate.py -m ckpt=<a>,<b> (comparison table); python evaluate.py plot=<run or sweep folder>
(see gpt/conf/evaluate.yaml; gpt/cli.py)."""

from gpt.cli import evaluate

if __name__ == "__main__":
    evaluate()
