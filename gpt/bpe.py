"""Byte-level BPE, the parts that need no tokenizer object: training with HF `tokenizers` (Rust), the
trained tokens in tiktoken's rank order, merge rules for merge-list engines (HF, llama.cpp), and the check
of ranks read from a file. gpt.tokenizer.BpeTokenizer (`tokenizer=bpe`) builds on it; the command line
(`python -m gpt.bpe_cli train|compare`) too.

Ranks: the 256 bytes get ranks 0..255 by byte value, the merged tokens follow in the order training made
them. The pre-split pattern is chosen by name (PATTERNS): a pattern is a regex, so one read from a file
is refused unless it names one of these.
"""

from __future__ import annotations

import base64
import binascii
import functools
from collections.abc import Iterable

from gpt.errors import UserError

# GPT-4's split pattern as tiktoken first shipped it for cl100k_base (tiktoken 0.14's adds `\s++$`, which
# Oniguruma, the regex engine of HF tokenizers, reads differently). Both engines split text the same way with
# this one (tests/test_bpe.py compares their ids); llama.cpp's "llama-bpe" pre-tokenizer splits so too.
PATTERNS = {
    "cl100k": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""",
}
TRAIN_BYTES = 100_000_000
MAX_VOCAB = 1 << 18       # ranks + special tokens; more is a typo, and token files switch to uint32 past 2**16
MAX_TOKEN_BYTES = 4096    # longest token a file may hold (training makes far shorter ones)


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


def hf_backend(tok):
    """An HF `tokenizers.Tokenizer` giving a gpt.tokenizer.BpeTokenizer's ids: its ranks as the vocabulary,
    merges_of(ranks), the same pre-split and whole-word lookup (ignore_merges) as tiktoken, and its special
    tokens after the ranks."""
    from tokenizers import Tokenizer, decoders, models

    vocab = {token_text(t): r for r, t in enumerate(tok.ranks)}
    merges = [(token_text(a), token_text(b)) for a, b in merges_of(tok.ranks)]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    backend.pre_tokenizer = _pre_tokenizer(tok.pattern)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(tok.special))  # ids base_vocab_size + i, in order: ours
    return backend


def checked_ranks(identity: dict, n_special: int, where: str = "tokenizer identity (bpe)") -> tuple[list[bytes], str]:
    """(ranks, pattern) of a bpe identity read from a file, every value checked as data: the pattern by name,
    the ranks a list of distinct base64 tokens whose first 256 are the bytes in order. Errors start with
    `where` (which file or checkpoint)."""
    extra = set(identity) - {"type", "pattern", "ranks", "special"}
    if extra:
        raise UserError(f"{where}: unexpected keys {sorted(extra)[:5]}; refusing it")
    pattern = identity.get("pattern")
    if not isinstance(pattern, str) or pattern not in PATTERNS:
        raise UserError(f"{where}: pattern={repr(pattern)[:40]} is not one of {sorted(PATTERNS)} (a pattern is "
                        f"named, never read as a regex from a file)")
    ranks = identity.get("ranks")
    if not isinstance(ranks, list) or not 256 <= len(ranks) <= MAX_VOCAB - n_special:
        raise UserError(f"{where}: ranks must be a list of 256..{MAX_VOCAB - n_special} base64 strings, "
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
    return tokens, pattern
