"""python -m gpt.lora merge <run folder or .pt> <out.pt>: fold a LoRA checkpoint's adapters into plain weights
(gpt.checkpoint.merged_checkpoint) and write the result as a new checkpoint."""

from __future__ import annotations

import argparse
import sys

from gpt.checkpoint import load_checkpoint, merged_checkpoint, save_checkpoint
from gpt.errors import cli_result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gpt.lora", description="LoRA checkpoints")
    sub = ap.add_subparsers(dest="command", required=True)
    mp = sub.add_parser("merge", help="fold a LoRA checkpoint's adapters into plain weights")
    mp.add_argument("ckpt", help="LoRA checkpoint file or run folder (best.pt preferred)")
    mp.add_argument("out", help="output .pt path")
    args = ap.parse_args(argv)
    return cli_result(lambda: save_checkpoint(merged_checkpoint(load_checkpoint(args.ckpt, prefer="best")), args.out))


if __name__ == "__main__":
    sys.exit(main())
