"""Prepare a corpus's token cache: python prepare.py [data=...] [tokenizer=...] [data.num_proc=N]
(see gpt/conf/prepare.yaml; gpt/cli.py)."""

from gpt.cli import prepare

if __name__ == "__main__":
    prepare()
