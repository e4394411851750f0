"""The bpe tokenizer's command line: train one on text and write it as a file, or compare bytes per token.

    python -m gpt.bpe_cli train [--data PATH] [--vocab-size N] [--train-bytes N] --out tok.json
    python -m gpt.bpe_cli compare [--text FILE] [--tokenizer tok.json] [--vocab-size N]

train reads the training documents as train.py's token cache splits them (the same reader, the same held-out
documents) and keeps the result where train.py tokenizer=bpe and prepare.py look for it, so neither trains again
for the same data and settings. compare prints a table like nanochat's tok_eval.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from gpt import bpe
from gpt.errors import UserError, cli_result, exit_code
from gpt.tokenizer import BpeTokenizer, TiktokenTokenizer, read_bpe_file, write_bpe_file


def _source(data: str | None, val_fraction: float = 0.1):
    """A local file/folder/glob, or the bundled plays train.py uses by default (same fingerprint, same cache)."""
    import yaml

    from gpt.data import Shakespeare, TextFiles

    if data:
        return TextFiles(data, val_fraction=val_fraction, cache_dir=_cache_dir())
    conf = yaml.safe_load((Path(__file__).parent / "conf" / "data" / "shakespeare.yaml").read_text())
    return Shakespeare(conf["plays"], val_fraction=conf["val_fraction"], cache_dir=_cache_dir())


def _cache_dir() -> str:
    """gpt/conf/paths/default.yaml's cache_dir + /tokens (where train.py's token caches and tokenizers live)."""
    root = os.environ.get("GPT_CACHE_DIR") or str(Path.home() / ".cache" / "gpt-pipeline")
    return str(Path(root) / "tokens")


def train_command(data: str | None, vocab_size: int, train_bytes: int, out: str) -> Path:
    """Train on `data` (the training documents, as train.py's token cache splits them) and write `out`."""
    from gpt import prepare

    if Path(out).expanduser().is_dir():  # said before training, not after it
        raise UserError(f"--out {out!r} is a directory; give a file path, e.g. --out {str(Path(out) / 'tok.json')!r}")
    source = _source(data)
    tok = BpeTokenizer(vocab_size, train_bytes)
    plan = source.plan()
    tok.train(lambda: prepare.training_text(plan, tok.train_bytes),
              prepare.trained_tokenizer_path(source.cache_path(tok), source.cache_key(tok)))
    return write_bpe_file(tok, out)


def _read_text(p: Path, given: str) -> str:
    """The text of --text, or one error line naming it."""
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"--text {given!r} is not UTF-8 (byte {e.start} cannot be decoded); give a UTF-8 text "
                        f"file") from None
    except OSError as e:
        raise UserError(f"--text {given!r} cannot be read ({e.strerror}); give a readable UTF-8 text file") from None
    if not text:
        raise UserError(f"--text {given!r} is empty; give a file with some text to count tokens on")
    return text


def compare_command(text_file: str | None, tokenizer_file: str | None, vocab_size: int) -> str:
    """Bytes per token of bpe (a file, or one trained on the bundled plays' training text) vs gpt2 vs cl100k
    on a text (default: the bundled plays' validation text, which the trained bpe did not see)."""
    from gpt import prepare

    if text_file:
        p = Path(text_file).expanduser()
        if not p.is_file():
            raise UserError(f"--text {text_file!r} is not a file; give a UTF-8 text file")
        text, name = _read_text(p, text_file), p.name
    else:
        source = _source(None)
        whole = "".join(t for _, t in source.pieces())
        text, name = whole[len(whole) - int(len(whole) * source.val_fraction):], "bundled plays (val)"
    if tokenizer_file:
        ours, label = read_bpe_file(tokenizer_file), f"bpe {Path(tokenizer_file).name}"
    else:
        source = _source(None)
        ours = BpeTokenizer(vocab_size)
        plan = source.plan()
        ours.train(lambda: prepare.training_text(plan, ours.train_bytes),
                   prepare.trained_tokenizer_path(source.cache_path(ours), source.cache_key(ours)))
        label = "bpe (bundled plays)"
    rows = [(label, ours), ("gpt2", TiktokenTokenizer("gpt2")), ("cl100k", TiktokenTokenizer("cl100k_base"))]
    nbytes = len(text.encode("utf-8"))
    lines = [f"text: {name}, {nbytes:,} bytes", "",
             "| tokenizer | vocabulary | tokens | bytes/token |", "|---|---:|---:|---:|"]
    for label, tok in rows:
        n = len(tok.encode(text))
        lines.append(f"| {label} | {tok.vocab_size:,} | {n:,} | {nbytes / n:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gpt.bpe_cli", description="train or compare byte-level BPE")
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a bpe tokenizer on text and write it as a file")
    t.add_argument("--data", help="text file, folder or glob (default: the bundled Shakespeare plays)")
    t.add_argument("--vocab-size", type=int, default=4096, help="tokens in all: 256 bytes + merges + <|endoftext|>")
    t.add_argument("--train-bytes", type=int, default=bpe.TRAIN_BYTES,
                   help="train on (about) this many bytes of the training text")
    t.add_argument("--out", required=True, help="tokenizer file to write (JSON)")
    c = sub.add_parser("compare", help="bytes per token of bpe vs gpt2 vs cl100k on a text")
    c.add_argument("--text", help="UTF-8 text file (default: the bundled plays' validation text)")
    c.add_argument("--tokenizer", help="a bpe tokenizer file (default: train one on the bundled plays)")
    c.add_argument("--vocab-size", type=int, default=4096, help="vocabulary of the bpe trained by default")
    args = ap.parse_args(argv)
    if args.command == "train":
        return cli_result(lambda: train_command(args.data, args.vocab_size, args.train_bytes, args.out))
    return exit_code(lambda: print(compare_command(args.text, args.tokenizer, args.vocab_size)))


if __name__ == "__main__":
    sys.exit(main())
