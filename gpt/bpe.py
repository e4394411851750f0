"""A byte-level BPE tokenizer trained on the run's own text (`tokenizer=bpe tokenizer.vocab_size=N`).

Training runs in HF `tokenizers` (Rust) over the first `train_bytes` of the training documents, pre-split by
GPT-4's (cl100k) pattern; encoding runs in tiktoken, built from the trained ranks: the 256 bytes get ranks
0..255 by byte value, the merged tokens follow in the order training made them. The stages' special tokens
(<|endoftext|>, <|bos|>, the chat template's) are part of the vocabulary from the start, after the ranks;
plain text never encodes to them.

The identity (checkpoints, token caches, tokenizer files) holds the ranks as base64 strings and the pattern
by name: a pattern is a regex, so one read from a file is refused unless it names one of PATTERNS.

    python -m gpt.tokenizer train [--data PATH] --vocab-size N --out tok.json
    python -m gpt.tokenizer compare [--text FILE] [--tokenizer tok.json]
"""

from __future__ import annotations

import argparse
import base64
import binascii
import functools
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from gpt.chat import SPECIAL as CHAT_SPECIAL
from gpt.errors import UserError, cli_result
from gpt.tokenizer import BOS, EOT, TiktokenTokenizer

# GPT-4's split pattern as tiktoken first shipped it for cl100k_base (tiktoken 0.14's adds `\s++$`, which
# Oniguruma, the regex engine of HF tokenizers and llama.cpp's converter, reads differently). Both engines
# split text the same way with this one (tests/test_bpe.py compares their ids).
PATTERNS = {
    "cl100k": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""",
}
SPECIAL = [EOT, BOS, *CHAT_SPECIAL]  # every special token a stage uses: none needs adding later
TRAIN_BYTES = 100_000_000
MAX_VOCAB = 1 << 18       # ranks + special tokens; more is a typo, and token files switch to uint32 past 2**16
MAX_TOKEN_BYTES = 4096    # longest token a file may hold (training makes far shorter ones)
MAX_FILE_BYTES = 64 << 20  # a tokenizer file larger than this is not one we wrote


@functools.cache
def byte_chars() -> list[str]:
    """GPT-2's printable stand-in character for each byte (HF's ByteLevel and llama.cpp store tokens so)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def token_text(token: bytes) -> str:
    """A token's bytes in GPT-2's byte-level form (one printable character per byte)."""
    table = byte_chars()
    return "".join(table[b] for b in token)


def _pre_tokenizer(pattern: str):
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PATTERNS[pattern]), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def train_backend(texts: Iterable[str], n_merges: int, pattern: str = "cl100k"):
    """An HF `tokenizers.Tokenizer` (byte-level BPE) trained with up to `n_merges` merges on `texts` (fewer
    when the text has no more pairs)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = _pre_tokenizer(pattern)
    trainer = trainers.BpeTrainer(vocab_size=256 + n_merges, min_frequency=0, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    backend.train_from_iterator(texts, trainer)
    return backend


def ranks_of(backend) -> list[bytes]:
    """A trained backend's tokens in rank order: the 256 bytes by byte value, then each merged token in the
    order training made it (its id order; the ids of the bytes themselves follow HF's alphabet order)."""
    byte_of = {c: b for b, c in enumerate(byte_chars())}
    merged = sorted((i, t) for t, i in backend.get_vocab().items() if len(t) > 1)  # ids: creation order
    return [bytes([b]) for b in range(256)] + [bytes(byte_of[c] for c in t) for _, t in merged]


def merges_of(ranks: list[bytes]) -> list[tuple[bytes, bytes]]:
    """Merge rules that make a merge-list BPE (HF, llama.cpp) pick tiktoken's tokens: every split of each token
    into two lower-ranked tokens, ordered by the rank of the token it makes (tiktoken merges the adjacent pair
    whose concatenation has the lowest rank)."""
    rank = {t: r for r, t in enumerate(ranks)}
    out = []
    for r, token in enumerate(ranks[256:], start=256):
        pairs = [(rank[token[:i]], token[:i], token[i:]) for i in range(1, len(token))
                 if rank.get(token[:i], r) < r and rank.get(token[i:], r) < r]
        out += [(left, right) for _, left, right in sorted(pairs)]
    return out


def hf_backend(tok: BpeTokenizer):
    """An HF `tokenizers.Tokenizer` giving tok's ids: its ranks as the vocabulary, merges_of(ranks), the same
    pre-split and whole-word lookup (ignore_merges) as tiktoken, and its special tokens after the ranks."""
    from tokenizers import Tokenizer, decoders, models

    vocab = {token_text(t): r for r, t in enumerate(tok.ranks)}
    merges = [(token_text(a), token_text(b)) for a, b in merges_of(tok.ranks)]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    backend.pre_tokenizer = _pre_tokenizer(tok.pattern)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(tok.special))  # ids base_vocab_size + i, in order: ours
    return backend


class BpeTokenizer(TiktokenTokenizer):
    """Byte-level BPE trained on the run's training text (see the module docstring); `file` instead loads one
    written by `python -m gpt.tokenizer train` (then vocab_size and train_bytes are unused).

    vocab_size counts every token: 256 bytes + merges + the special tokens. Until it is trained
    (`needs_fit`), it has only its settings; gpt.prepare trains it once per (data, settings) and keeps it."""

    sized = True  # tokenizer.vocab_size is a setting here, not an output (gpt.tokenizer.from_config)

    def __init__(self, vocab_size: int = 4096, train_bytes: int = TRAIN_BYTES, pattern: str = "cl100k",
                 file: str | None = None, special: list[str] | None = None):
        self.special = list(special or SPECIAL)
        self.pattern = pattern
        if pattern not in PATTERNS:
            raise UserError(f"tokenizer.pattern={pattern!r} is not one of {sorted(PATTERNS)}")
        least = 256 + len(self.special)
        if not isinstance(vocab_size, int) or not least <= vocab_size <= MAX_VOCAB:
            raise UserError(f"tokenizer.vocab_size={vocab_size} is out of range for bpe: it counts the 256 bytes and "
                            f"{len(self.special)} special tokens, so use {least}..{MAX_VOCAB} (e.g. 4096)")
        if not isinstance(train_bytes, int) or train_bytes < 1:
            raise UserError(f"tokenizer.train_bytes={train_bytes} must be a positive number of bytes, e.g. 100000000")
        self.requested, self.train_bytes = vocab_size, train_bytes
        self.ranks: list[bytes] | None = None
        if file:
            self._use(read_file(file).ranks)

    @classmethod
    def trained(cls, ranks: list[bytes], pattern: str, special: list[str]) -> BpeTokenizer:
        """A trained tokenizer from checked values (see checked_identity)."""
        tok = cls(max(len(ranks) + len(special), 256 + len(special)), pattern=pattern, special=special)
        tok._use(ranks)
        return tok

    def _use(self, ranks: list[bytes]) -> None:
        import tiktoken

        self.ranks = ranks
        digest = hashlib.sha256(b"".join(len(t).to_bytes(2, "little") + t for t in ranks)).hexdigest()[:16]
        self.name = f"bpe-{digest}"
        self.enc = tiktoken.Encoding(self.name, pat_str=PATTERNS[self.pattern],
                                     mergeable_ranks={t: r for r, t in enumerate(ranks)}, special_tokens={})
        self.eot_id = self.special_id(EOT) if EOT in self.special else None

    @property
    def needs_fit(self) -> bool:
        return self.ranks is None

    @property
    def base_vocab_size(self) -> int:
        return len(self.ranks) if self.ranks is not None else self.requested - len(self.special)

    @property
    def vocab_size(self) -> int:
        return self.base_vocab_size + len(self.special)

    def fit(self, text: str) -> None:
        self.train(lambda: [text])

    def train(self, texts: Callable[[], Iterable[str]], keep: Path | None = None) -> None:
        """Train on texts() (reading the tokenizer `keep` instead when an earlier run wrote it there; writing
        it there otherwise). Refuses text too small for the requested vocabulary."""
        if keep is not None and keep.is_file():
            self._use(read_file(keep).ranks)
            return
        n_merges = self.requested - len(self.special) - 256
        ranks = ranks_of(train_backend(texts(), n_merges, self.pattern))
        if len(ranks) < 256 + n_merges:
            raise UserError(f"the training text has only {len(ranks) - 256} distinct merges, fewer than "
                            f"tokenizer.vocab_size={self.requested} needs ({n_merges}); use a vocab_size of at most "
                            f"{len(ranks) + len(self.special)} or more text (tokenizer.train_bytes, data=)")
        self._use(ranks)
        if keep is not None:
            write_file(self, keep)

    def identity(self) -> dict:
        if self.ranks is None:
            raise UserError("this bpe tokenizer is not trained yet; train it on data first (prepare.py, train.py)")
        return {"type": "bpe", "pattern": self.pattern,
                "ranks": [base64.b64encode(t).decode("ascii") for t in self.ranks], "special": list(self.special)}

    def cache_key(self) -> str:
        if self.ranks is not None:
            return self.name
        special = hashlib.sha256("\n".join(self.special).encode()).hexdigest()[:8]
        return f"bpe-{self.pattern}-{self.requested}-{self.train_bytes}-{special}"


def checked_identity(identity: dict, special: list[str]) -> BpeTokenizer:
    """Rebuild a trained bpe tokenizer from an identity read from a file, every value checked as data:
    the pattern by name, the ranks a list of distinct base64 tokens whose first 256 are the bytes in order."""
    where = "tokenizer identity (bpe)"
    extra = set(identity) - {"type", "pattern", "ranks", "special"}
    if extra:
        raise UserError(f"{where}: unexpected keys {sorted(extra)[:5]}; refusing it")
    pattern = identity.get("pattern")
    if not isinstance(pattern, str) or pattern not in PATTERNS:
        raise UserError(f"{where}: pattern={repr(pattern)[:40]} is not one of {sorted(PATTERNS)} (a pattern is "
                        f"named, never read as a regex from a file)")
    ranks = identity.get("ranks")
    if not isinstance(ranks, list) or not 256 <= len(ranks) <= MAX_VOCAB - len(special):
        raise UserError(f"{where}: ranks must be a list of 256..{MAX_VOCAB - len(special)} base64 strings, "
                        f"got {type(ranks).__name__} of length {len(ranks) if isinstance(ranks, list) else '-'}")
    tokens = []
    for r, s in enumerate(ranks):
        if not isinstance(s, str) or len(s) > 4 * MAX_TOKEN_BYTES // 3 + 4:
            raise UserError(f"{where}: ranks[{r}] is not a base64 string of at most {MAX_TOKEN_BYTES} bytes")
        try:
            tokens.append(base64.b64decode(s, validate=True))
        except (binascii.Error, ValueError):
            raise UserError(f"{where}: ranks[{r}]={s[:20]!r} is not base64") from None
    if tokens[:256] != [bytes([b]) for b in range(256)]:
        raise UserError(f"{where}: ranks 0..255 must be the 256 single bytes in byte order")
    if len(set(tokens)) != len(tokens) or not all(tokens[256:]):
        raise UserError(f"{where}: ranks hold a token twice (they must be distinct, one rank each)")
    return BpeTokenizer.trained(tokens, pattern, special)


def read_file(path: str | Path) -> BpeTokenizer:
    """A tokenizer file written by write_file (`python -m gpt.tokenizer train`), checked as data."""
    from gpt.tokenizer import from_identity

    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"tokenizer file {str(path)!r} does not exist; write one with `python -m gpt.tokenizer train`")
    if p.stat().st_size > MAX_FILE_BYTES:
        raise UserError(f"tokenizer file {str(path)!r} is over {MAX_FILE_BYTES >> 20} MiB; it is not a bpe "
                        f"tokenizer file")
    try:
        identity = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"tokenizer file {str(path)!r} is not JSON ({e}); write one with "
                        f"`python -m gpt.tokenizer train`") from None
    tok = from_identity(identity)
    if not isinstance(tok, BpeTokenizer):
        raise UserError(f"tokenizer file {str(path)!r} holds a {identity.get('type')} tokenizer, not a bpe one")
    return tok


def write_file(tok: BpeTokenizer, path: str | Path) -> Path:
    """Write tok's identity as JSON (temp file + rename: a reader never sees half a file)."""
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(tok.identity()))
    os.replace(tmp, p)
    return p


# ---- python -m gpt.tokenizer train | compare ----------------------------------------------------------

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

    source = _source(data)
    tok = BpeTokenizer(vocab_size, train_bytes)
    plan = source.plan()
    tok.train(lambda: prepare.training_text(plan, tok.train_bytes),
              prepare.trained_tokenizer_path(source.cache_path(tok), source.cache_key(tok)))
    return write_file(tok, out)


def compare_command(text_file: str | None, tokenizer_file: str | None, vocab_size: int) -> str:
    """Bytes per token of bpe (a file, or one trained on the bundled plays' training text) vs gpt2 vs cl100k
    on a text (default: the bundled plays' validation text, which the trained bpe did not see)."""
    from gpt import prepare

    if text_file:
        p = Path(text_file).expanduser()
        if not p.is_file():
            raise UserError(f"--text {text_file!r} is not a file; give a UTF-8 text file")
        text, name = p.read_text(encoding="utf-8"), p.name
    else:
        source = _source(None)
        whole = "".join(t for _, t in source.pieces())
        text, name = whole[len(whole) - int(len(whole) * source.val_fraction):], "bundled plays (val)"
    if tokenizer_file:
        bpe, label = read_file(tokenizer_file), f"bpe {Path(tokenizer_file).name}"
    else:
        source = _source(None)
        bpe = BpeTokenizer(vocab_size)
        plan = source.plan()
        bpe.train(lambda: prepare.training_text(plan, bpe.train_bytes),
                  prepare.trained_tokenizer_path(source.cache_path(bpe), source.cache_key(bpe)))
        label = "bpe (bundled plays)"
    rows = [(label, bpe), ("gpt2", TiktokenTokenizer("gpt2")), ("cl100k", TiktokenTokenizer("cl100k_base"))]
    nbytes = len(text.encode("utf-8"))
    lines = [f"text: {name}, {nbytes:,} bytes", "",
             "| tokenizer | vocabulary | tokens | bytes/token |", "|---|---:|---:|---:|"]
    for label, tok in rows:
        n = len(tok.encode(text))
        lines.append(f"| {label} | {tok.vocab_size:,} | {n:,} | {nbytes / n:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gpt.tokenizer", description="train or compare byte-level BPE")
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a bpe tokenizer on text and write it as a file")
    t.add_argument("--data", help="text file, folder or glob (default: the bundled Shakespeare plays)")
    t.add_argument("--vocab-size", type=int, default=4096, help="tokens in all: 256 bytes + merges + special")
    t.add_argument("--train-bytes", type=int, default=TRAIN_BYTES, help="train on this much of the training text")
    t.add_argument("--out", required=True, help="tokenizer file to write (JSON)")
    c = sub.add_parser("compare", help="bytes per token of bpe vs gpt2 vs cl100k on a text")
    c.add_argument("--text", help="UTF-8 text file (default: the bundled plays' validation text)")
    c.add_argument("--tokenizer", help="a bpe tokenizer file (default: train one on the bundled plays)")
    c.add_argument("--vocab-size", type=int, default=4096, help="vocabulary of the bpe trained by default")
    args = ap.parse_args(argv)
    if args.command == "train":
        return cli_result(lambda: train_command(args.data, args.vocab_size, args.train_bytes, args.out))
    try:
        print(compare_command(args.text, args.tokenizer, args.vocab_size))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
