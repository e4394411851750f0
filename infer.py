"""Sample from a trained model: python infer.py ckpt=<checkpoint or run folder> prompt="ROMEO:" (see gpt/conf/infer.yaml)."""

from gpt.cli import infer

if __name__ == "__main__":
    infer()
