"""Train a GPT: python train.py [group=option ...] [key=value ...]  (see gpt/conf/train.yaml; gpt/cli.py)."""

from gpt.cli import train

if __name__ == "__main__":
    train()
