"""Serve a checkpoint over HTTP: python serve.py ckpt=<checkpoint or run folder> port=8000 (see gpt/conf/serve.yaml)."""

from gpt.cli import serve

if __name__ == "__main__":
    serve()
