"""The token cache: documents -> tokenized in worker processes -> sharded binary token files + meta.json.

A source (gpt.data) streams its documents as pieces of text (a small file or a dataset row is one piece; a
large file is read in pieces cut after a newline, where a BPE pre-tokenizer cuts too, so the ids are those of
the whole document). Pieces are grouped into batches of ~4 MB, encoded by `num_proc` worker processes (results
taken in order, at most two batches per worker in flight: memory does not grow with the corpus) and
appended to shard files of at most `shard_tokens` ids each (uint16 when the vocabulary fits, else uint32):

    <cache_dir>/<key>/meta.json        tokenizer identity, dtype, shards per split, documents, bytes, split rule
    <cache_dir>/<key>/train-000000.bin ...   val-000000.bin ...

Validation documents are chosen by a hash of the document's index (`val_fraction`; a document never
straddles the splits), or come from a separate val source. A corpus too small for that (one document, or
none landing in val) falls back to the last val_fraction of the token stream, as nanoGPT splits one file.
The folder is written under a temp name and renamed into place: a killed preparation leaves only a
`.<key>-*` temp folder, which no reader uses and the next preparation removes.

Measured here (2 shared cores, gpt2 BPE, 14 MB of text): one process 7.1 MB/s, tiktoken's
encode_ordinary_batch with 2 threads 6.5 MB/s (no gain), 2 worker processes 9.7 MB/s: hence processes.

Also the prepare.py entry (`prepare(cfg)`): build the cache train.py would use and say what it holds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gpt.errors import UserError
from gpt.tokenizer import CharTokenizer, from_config, from_identity

log = logging.getLogger("gpt")

FORMAT = "shards-1"            # in the cache key: a cache of another layout is never read as this one
SHARD_TOKENS = 2**27           # ids per shard file: 256 MiB at uint16
BATCH_CHARS = 1 << 22          # text per worker task (~4 MB): big enough to amortise the pickling
WAIT_TIMEOUT = 1800.0          # seconds a waiting rank allows local rank 0's preparation without progress


# ---- encoding in workers -----------------------------------------------------------------------------

def array_encoder(identity: dict, dtype: np.dtype) -> Callable[[str], np.ndarray]:
    """text -> ids (1-D `dtype` array), the same ids as the tokenizer's encode(), without a Python list per
    character for the char tokenizer (a sorted-codepoint lookup)."""
    tok = from_identity(identity)
    if isinstance(tok, CharTokenizer):
        table = np.frombuffer(tok.chars.encode("utf-32-le"), dtype=np.uint32)

        def encode_chars(text: str) -> np.ndarray:
            cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
            ids = np.searchsorted(table, cps)
            bad = (ids >= len(table)) | (table[np.minimum(ids, len(table) - 1)] != cps)
            if bad.any():
                tok.encode(text[int(np.argmax(bad))])  # raises the tokenizer's own error naming the character
            return ids.astype(dtype)

        return encode_chars
    return lambda text: np.asarray(tok.encode(text), dtype=dtype)


_encode: Callable[[str], np.ndarray] | None = None


def _init_worker(identity: dict, dtype: str) -> None:
    global _encode
    _encode = array_encoder(identity, np.dtype(dtype))


def _encode_batch(texts: list[str]) -> list[tuple[np.ndarray, int]]:
    """In a worker: (ids, UTF-8 bytes) of each text."""
    return [(_encode(t), len(t.encode("utf-8", "surrogatepass"))) for t in texts]


def _batches(pieces: Iterable[tuple[bool, str]], batch_chars: int) -> Iterator[tuple[list[bool], list[str]]]:
    flags, texts, size = [], [], 0
    for new_doc, text in pieces:
        flags.append(new_doc)
        texts.append(text)
        size += len(text)
        if size >= batch_chars:
            yield flags, texts
            flags, texts, size = [], [], 0
    if texts:
        yield flags, texts


def encoded(pieces: Iterable[tuple[bool, str]], identity: dict, dtype: np.dtype, num_proc: int,
            batch_chars: int = BATCH_CHARS, info: dict | None = None) -> Iterator[tuple[bool, np.ndarray, int]]:
    """(starts a new document, ids, bytes) for each piece, in order, encoded by `num_proc` processes.

    Batches are taken in order, so the output is the same for any num_proc. A corpus of one batch (the
    bundled Shakespeare, tests) is encoded here, without starting workers. info["workers"]: how many ran."""
    info = {} if info is None else info
    info.setdefault("workers", 1)
    batches = _batches(pieces, batch_chars)
    first = next(batches, None)
    if first is None:
        return
    second = next(batches, None)
    if num_proc <= 1 or second is None:
        _init_worker(identity, dtype.name)
        for flags, texts in _chain([first] if second is None else [first, second], batches):  # lazily
            for new_doc, (ids, nbytes) in zip(flags, _encode_batch(texts)):
                yield new_doc, ids, nbytes
        return
    # spawn, not fork: a forked copy of a parent holding torch/gloo threads can deadlock
    ctx = multiprocessing.get_context("spawn")
    info["workers"] = max(info["workers"], num_proc)
    with ctx.Pool(num_proc, initializer=_init_worker, initargs=(identity, dtype.name)) as pool:
        pending: deque = deque()
        for flags, texts in _chain([first, second], batches):
            pending.append((flags, pool.apply_async(_encode_batch, (texts,))))
            while len(pending) >= 2 * num_proc:  # bounded: at most two batches per worker in flight
                yield from _results(pending.popleft())
        while pending:
            yield from _results(pending.popleft())


def _chain(*iterables):
    for it in iterables:
        yield from it


def _results(item) -> Iterator[tuple[bool, np.ndarray, int]]:
    flags, result = item
    for new_doc, (ids, nbytes) in zip(flags, result.get()):
        yield new_doc, ids, nbytes


# ---- shards ------------------------------------------------------------------------------------------

@dataclass
class ShardWriter:
    """Appends ids to `<split>-000000.bin`, `<split>-000001.bin`, ... of at most shard_tokens ids each."""

    folder: Path
    split: str
    dtype: np.dtype
    shard_tokens: int = SHARD_TOKENS
    shards: list[list] = field(default_factory=list)  # [[file name, ids], ...]
    documents: int = 0
    _file: object = None

    @property
    def tokens(self) -> int:
        return sum(n for _, n in self.shards)

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if not self.shards or self.shards[-1][1] >= self.shard_tokens:
                self._open(len(self.shards))
            room = self.shard_tokens - self.shards[-1][1]
            part, ids = ids[:room], ids[room:]
            self._file.write(part.tobytes())
            self.shards[-1][1] += len(part)

    def _open(self, index: int) -> None:
        self.close()
        name = f"{self.split}-{index:06d}.bin"
        self._file = open(self.folder / name, "wb")
        self.shards.append([name, 0])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def in_val(index: int, val_fraction: float) -> bool:
    """Whether document `index` is held out: a hash of the index, so the choice survives any sharding or
    number of workers, and about val_fraction of the documents are chosen."""
    h = int.from_bytes(hashlib.blake2b(index.to_bytes(8, "little"), digest_size=8).digest(), "little")
    return h < val_fraction * 2**64


def split_tail(whole: ShardWriter, other: ShardWriter, val_fraction: float) -> tuple[list, list]:
    """The last val_fraction of `whole`'s stream as val, the rest as train -> (train shards, val shards).
    Only the shard holding the cut is copied (its tail) and truncated; later shards are renamed."""
    total = whole.tokens
    cut = total - int(total * val_fraction)
    folder, itemsize = whole.folder, whole.dtype.itemsize
    for i, (name, _) in enumerate(whole.shards):  # neutral names first: the new names may be taken
        os.rename(folder / name, folder / f"part-{i:06d}")
    train, val, start = [], [], 0
    for i, (_, n) in enumerate(whole.shards):
        name = f"part-{i:06d}"
        if start + n <= cut:
            new = f"train-{len(train):06d}.bin"
            os.rename(folder / name, folder / new)
            train.append([new, n])
        elif start >= cut:
            new = f"val-{len(val):06d}.bin"
            os.rename(folder / name, folder / new)
            val.append([new, n])
        else:
            keep = cut - start
            tail = f"val-{len(val):06d}.bin"
            with open(folder / name, "rb") as fin, open(folder / tail, "wb") as fout:
                fin.seek(keep * itemsize)
                shutil.copyfileobj(fin, fout, 1 << 24)
            os.truncate(folder / name, keep * itemsize)
            val.append([tail, n - keep])
            new = f"train-{len(train):06d}.bin"
            os.rename(folder / name, folder / new)
            train.append([new, keep])
        start += n
    for name, _ in other.shards:  # empty by construction (the fallback runs when one side got nothing)
        os.remove(folder / name)
    return train, val


# ---- building a cache --------------------------------------------------------------------------------

@dataclass
class Plan:
    """What to build: the main source's pieces, an optional separate val source's, and the split rule."""

    pieces: Callable[[], Iterable[tuple[bool, str]]]
    val_pieces: Callable[[], Iterable[tuple[bool, str]]] | None
    val_fraction: float
    describe: str
    total_bytes: int | None = None   # for the progress bar, when the source knows it


def progress_bar(total: int | None, desc: str):
    """A tqdm bar over bytes where stderr is a terminal; none on a pipe or in a log file (CI, SLURM)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, dynamic_ncols=True,
                disable=not sys.stderr.isatty())


def trained_tokenizer_path(path: Path, key: dict) -> Path:
    """Where a tokenizer trained for the cache `path` (key `key`) is kept: beside the token caches, by the key
    without the cache layout, so a new run, prepare.py or `python -m gpt.bpe_cli train` finds it."""
    digest = hashlib.sha256(json.dumps({k: v for k, v in key.items() if k != "format"}, sort_keys=True).encode())
    return path.parent / "tokenizers" / f"{digest.hexdigest()[:16]}.json"


def training_text(plan: Plan, limit: int) -> list[str]:
    """About the first `limit` UTF-8 bytes of the training documents (what a bpe tokenizer is trained on).
    Documents held out for validation are left out; where none is (one document: the cache holds out the tail
    of the stream) or all are, the last val_fraction of what was read is left out instead."""
    def read(skip_held_out: bool) -> tuple[list[str], bool, bool]:
        texts, size, index, keep, held = [], 0, -1, True, False
        for new_doc, text in plan.pieces():
            if new_doc:
                index += 1
                keep = plan.val_pieces is not None or not (skip_held_out and in_val(index, plan.val_fraction))
                held |= not keep
            if keep and text:
                texts.append(text[:limit - size])
                size += len(text.encode("utf-8", "surrogatepass"))
                if size >= limit:
                    return texts, held, False
        return texts, held, True

    texts, held, whole = read(skip_held_out=True)
    if not texts:
        texts, held, whole = read(skip_held_out=False)
        held = False
    if plan.val_pieces is None and not held and whole:
        text = "".join(texts)
        texts = [text[:len(text) - int(len(text) * plan.val_fraction)]]
    if not any(texts):
        raise UserError(f"{plan.describe} contains no text; point it at non-empty text")
    return texts


def fit(tokenizer, plan: Plan, trained: Path) -> None:
    """Fit a tokenizer whose vocabulary comes from the data. One trained on the training text (bpe, which has
    `train_bytes`) is trained once and kept at `trained`; the char vocabulary takes every character of both
    splits (one streaming pass)."""
    if hasattr(tokenizer, "train_bytes"):
        tokenizer.train(lambda: training_text(plan, tokenizer.train_bytes), trained)
        return
    chars: set[str] = set()
    for pieces in (plan.pieces, plan.val_pieces):
        for _, text in (pieces() if pieces else ()):
            chars.update(text)
    if not chars:
        raise UserError(f"{plan.describe} contains no text; point it at non-empty text")
    tokenizer.fit("".join(chars) + ("\n" if tokenizer.eot_id is None else ""))


def build(plan: Plan, tokenizer, path: Path, key: dict, num_proc: int, shard_tokens: int = SHARD_TOKENS,
          batch_chars: int = BATCH_CHARS) -> dict:
    """Write the cache for `plan` to `path` (atomically) and return its meta."""
    t0 = time.perf_counter()
    if tokenizer.needs_fit:
        fit(tokenizer, plan, trained_tokenizer_path(path, key))
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32)
    sep = np.asarray([tokenizer.eot_id] if tokenizer.eot_id is not None else tokenizer.encode("\n\n"), dtype=dtype)
    identity = tokenizer.identity()
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}-*"):  # a killed earlier preparation's temp folder
        if time.time() - stale.stat().st_mtime > 60:   # (a live one writes every few seconds)
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    writers = {s: ShardWriter(tmp, s, dtype, shard_tokens) for s in ("train", "val")}
    nbytes, info = 0, {}
    bar = progress_bar(plan.total_bytes, "prepare")
    try:
        sources = [("train" if plan.val_pieces else None, plan.pieces)]
        if plan.val_pieces:
            sources.append(("val", plan.val_pieces))
        for fixed, pieces in sources:
            index, split = -1, None
            for new_doc, ids, n in encoded(pieces(), identity, dtype, num_proc, batch_chars, info):
                if new_doc:
                    index += 1
                    split = fixed or ("val" if in_val(index, plan.val_fraction) else "train")
                    w = writers[split]
                    if w.documents:
                        w.write(sep)
                    w.documents += 1
                writers[split].write(ids)
                nbytes += n
                bar.update(n)
        for w in writers.values():
            w.close()
        bar.close()
        train, val = writers["train"], writers["val"]
        if not train.documents and not val.documents:
            raise UserError(f"{plan.describe} contains no text; point it at non-empty text")
        rule = "separate" if plan.val_pieces else "hash"
        if rule == "hash" and not (train.documents and val.documents):
            whole, other = (train, val) if train.documents else (val, train)
            rule = "tail"  # one document, or none held out: the last val_fraction of the stream
            shards = split_tail(whole, other, plan.val_fraction)
            docs = {"all": whole.documents}  # the cut may fall inside a document
        else:
            shards = (train.shards, val.shards)
            docs = {"train": train.documents, "val": val.documents}
        counts = {s: sum(n for _, n in sh) for s, sh in zip(("train", "val"), shards)}
        if counts["val"] < 2 or counts["train"] < 2:
            raise UserError(f"{plan.describe} gives only {counts['train'] + counts['val']} tokens, too few for a "
                            f"train/val split with data.val_fraction={plan.val_fraction} ({counts['train']} train, "
                            f"{counts['val']} val); use more text")
        seconds = time.perf_counter() - t0
        key_text = json.dumps(key, sort_keys=True)  # a folder of 100k files: kept out of meta.json when long
        meta = {"tokenizer": identity, "dtype": dtype.name, "format": FORMAT, "split": rule,
                "key": key if len(key_text) < 100_000 else {"sha256": hashlib.sha256(key_text.encode()).hexdigest()},
                "shards": {"train": shards[0], "val": shards[1]}, "n_train": counts["train"], "n_val": counts["val"],
                "documents": docs, "bytes": nbytes, "seconds": seconds, "workers": info.get("workers", 1)}
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.rename(tmp, path)  # atomic: readers see a complete cache or none
        except OSError:  # another process (a node's rank 0, another run) finished the same cache first
            if not (path / "meta.json").exists():
                raise
        return meta
    finally:
        bar.close()
        for w in writers.values():
            w.close()
        shutil.rmtree(tmp, ignore_errors=True)


def wait_for(path: Path, describe: str, timeout: float = WAIT_TIMEOUT, poll: float = 0.5) -> None:
    """Under torchrun, a rank other than its node's local rank 0 waits here until that rank has written the
    cache. The wait ends with an error when rank 0 failed (it leaves `.<key>.failed` with its error), or when
    its temp folder has not grown for `timeout` seconds (rank 0 died, or never started preparing)."""
    failed = path.parent / f".{path.name}.failed"
    last, since = None, time.monotonic()
    while not (path / "meta.json").exists():
        if failed.exists():
            raise UserError(f"local rank 0 failed to prepare the token cache {path} for {describe}: "
                            f"{failed.read_text().strip()}")
        sizes = tuple(sorted((str(f), f.stat().st_size) for d in path.parent.glob(f".{path.name}-*")
                             for f in d.iterdir())) if path.parent.exists() else ()
        if sizes != last:
            last, since = sizes, time.monotonic()
        elif time.monotonic() - since > timeout:
            raise UserError(f"waited {timeout:.0f}s for local rank 0 to prepare the token cache {path} for "
                            f"{describe} without progress; prepare it first with `python prepare.py` (same data= "
                            f"and tokenizer=), or raise data.wait_timeout")
        time.sleep(poll)


def node_rank() -> tuple[int, bool]:
    """(local rank, launched by torchrun with more than one process)."""
    return int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)) > 1


# ---- the prepare.py entry ----------------------------------------------------------------------------

def prepare(cfg) -> dict:
    """python prepare.py [data=...] [tokenizer=...] [data.num_proc=N]: build (or find) the token cache that
    train.py would use with the same data= and tokenizer=, and print where it is and what it holds."""
    from hydra.utils import instantiate

    tokenizer = from_config(cfg.tokenizer)
    source = instantiate(cfg.data)
    t0 = time.perf_counter()
    data = source.load(tokenizer)
    seconds = time.perf_counter() - t0
    meta = json.loads((data.cache_path / "meta.json").read_text())
    print(f"token cache {data.cache_path} ({'reused: it was already prepared' if data.reused else 'new'})")
    print(f"source {source.describe()}, tokenizer {meta['tokenizer'].get('name', meta['tokenizer']['type'])} "
          f"(vocabulary {data.tokenizer.vocab_size:,}, {meta['dtype']})")
    split = {"hash": f"documents held out by a hash of their index (data.val_fraction={source.val_fraction})",
             "tail": f"the last data.val_fraction={source.val_fraction} of the token stream (too few documents "
                     f"for a split by document)",
             "separate": "a separate val source"}[meta.get("split", "tail")]
    docs = meta.get("documents", {})
    for name in ("train", "val"):
        shards = meta["shards"][name]
        count = f"{docs[name]:>12,} documents  " if name in docs else ""
        print(f"  {name:5s} {meta['n_' + name]:>15,} tokens  {count}{len(shards)} shard{'s' if len(shards) != 1 else ''}")
    if "all" in docs:
        print(f"  {docs['all']:,} document{'s' if docs['all'] != 1 else ''} in all")
    print(f"  val split: {split}")
    if not data.reused:
        mb = meta["bytes"] / 1e6
        tokens = meta["n_train"] + meta["n_val"]
        workers = f"{meta['workers']} worker processes" if meta["workers"] > 1 else "one process"
        print(f"prepared {mb:,.1f} MB of text in {seconds:.1f}s with {workers}: {mb / seconds:,.1f} MB/s, "
              f"{tokens / seconds:,.0f} tokens/s")
    return meta
