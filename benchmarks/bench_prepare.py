"""Preparing a corpus: prepare.py (gpt.prepare) vs nanoGPT's prepare.py approach, same corpus, same machine, same run.

    python benchmarks/bench_prepare.py [--gb 2] [--num-proc N] [--keep]

A corpus of generated text (Zipf-distributed made-up words in lines and paragraphs, documents of 2-40 KB,
one per file, in a folder of --gb gigabytes) is written to a temp folder and prepared twice with the GPT-2
tokenizer, each in a fresh process:

- ours: `python prepare.py data=text data.path=<folder> tokenizer=gpt2 data.num_proc=N`
- nanoGPT's approach (its data/openwebtext/prepare.py): `datasets.load_dataset("text", sample_by="document",
  num_proc=N)`, `.map(encode_ordinary + eot, num_proc=N)`, then one `np.memmap` of the total length written
  in 1024 batches (train and val as it splits them, a 0.05% random test split)

For each: seconds, MB/s of text, tokens/s, and the peak resident memory of the process and all its children
(sum of VmRSS over the process tree, sampled every 0.1 s: shared pages count once per process, so it is an
upper bound). The temp folder (corpus, caches, the datasets cache) is deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def generate(folder: Path, gb: float, seed: int = 0) -> tuple[int, int]:
    """Write ~gb GB of text documents -> (bytes, files)."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    weights = 1.0 / np.arange(1, 27)
    words = ["".join(rng.choice(letters, size=rng.integers(1, 11), p=weights / weights.sum())) for _ in range(30000)]
    zipf = 1.0 / np.arange(1, len(words) + 1) ** 1.1
    zipf /= zipf.sum()
    vocab = np.array(words + [",", ".", "!", "?", "1999", "42", "naïve", "café"], dtype=object)
    probs = np.concatenate([zipf * 0.9, np.full(8, 0.1 / 8)])
    target, total, files = int(gb * 1e9), 0, 0
    while total < target:
        sub = folder / f"{files // 1000:04d}"
        sub.mkdir(parents=True, exist_ok=True)
        chunk = rng.choice(vocab, size=2_000_000, p=probs)  # ~12 MB of words, cut into documents
        pos = 0
        while pos < len(chunk) and total < target:
            n = int(rng.integers(300, 6000))
            words_ = chunk[pos:pos + n]
            pos += n
            lines = [" ".join(words_[i:i + 12]) for i in range(0, len(words_), 12)]
            text = "\n".join(line if rng.random() > 0.1 else line + "\n" for line in lines) + "\n"
            data = text.encode("utf-8")
            (sub / f"{files:07d}.txt").write_bytes(data)
            total += len(data)
            files += 1
    return total, files


NANOGPT = r"""
import os, sys, numpy as np, tiktoken
from datasets import load_dataset
folder, out, num_proc = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.path.insert(0, sys.argv[4])
from gpt.tokenizer import TiktokenTokenizer
enc = TiktokenTokenizer("gpt2").enc   # the same offline files as ours
files = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs)
dataset = load_dataset("text", data_files={"train": files}, sample_by="document", num_proc=num_proc,
                       cache_dir=os.path.join(out, "hf"))
split = dataset["train"].train_test_split(test_size=0.0005, seed=2357, shuffle=True)
split["val"] = split.pop("test")
def process(example):
    ids = enc.encode_ordinary(example["text"])
    ids.append(enc.eot_token)
    return {"ids": ids, "len": len(ids)}
tokenized = split.map(process, remove_columns=["text"], desc="tokenizing", num_proc=num_proc)
total = 0
for name, dset in tokenized.items():
    arr_len = np.sum(dset["len"], dtype=np.uint64)
    arr = np.memmap(os.path.join(out, f"{name}.bin"), dtype=np.uint16, mode="w+", shape=(arr_len,))
    idx = 0
    shards = min(1024, len(dset))  # nanoGPT's 1024 batches (fewer for a split of fewer rows)
    for batch_idx in range(shards):
        batch = dset.shard(num_shards=shards, index=batch_idx, contiguous=True).with_format("numpy")
        arr_batch = np.concatenate(batch["ids"])
        arr[idx: idx + len(arr_batch)] = arr_batch
        idx += len(arr_batch)
    arr.flush()
    total += int(arr_len)
print("TOKENS", total)
"""


def tree_rss(pid: int) -> int:
    """Sum of VmRSS (bytes) of pid and its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def measure(cmd: list[str], env: dict) -> tuple[float, int, str]:
    """Run cmd -> (seconds, peak tree RSS bytes, stdout)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, done = 0, threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss(proc.pid))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed:\n{err[-3000:]}")
    return seconds, peak, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=2.0, help="corpus size in GB of text (default 2)")
    ap.add_argument("--num-proc", type=int, default=os.cpu_count())
    ap.add_argument("--keep", action="store_true", help="keep the temp folder")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "GPT_CACHE_DIR": str(tmp / "ours")}
    try:
        t0 = time.perf_counter()
        nbytes, files = generate(tmp / "corpus", args.gb)
        print(f"corpus: {nbytes / 1e9:.2f} GB of text in {files:,} files (generated in {time.perf_counter() - t0:.0f}s); "
              f"{args.num_proc} processes on {os.cpu_count()} cores, gpt2 tokenizer", flush=True)
        rows = []
        ours = [sys.executable, str(ROOT / "prepare.py"), "data=text", f"data.path={tmp / 'corpus'}", "tokenizer=gpt2",
                f"data.num_proc={args.num_proc}"]
        seconds, peak, out = measure(ours, env)
        meta = json.loads(next((tmp / "ours" / "tokens").glob("*/meta.json")).read_text())
        rows.append(("prepare.py (ours)", seconds, peak, meta["n_train"] + meta["n_val"]))
        print(out.strip(), flush=True)
        (tmp / "nano").mkdir()
        nano = [sys.executable, "-c", NANOGPT, str(tmp / "corpus"), str(tmp / "nano"), str(args.num_proc), str(ROOT)]
        seconds, peak, out = measure(nano, env)
        rows.append(("nanoGPT approach (datasets .map + np.memmap)", seconds, peak,
                     int(out.split("TOKENS")[1].split()[0])))
        print(f"\n| method | seconds | MB/s | tokens/s | peak RSS, all processes |\n|---|---:|---:|---:|---:|")
        for name, s, p, tokens in rows:
            print(f"| {name} | {s:,.0f} | {nbytes / 1e6 / s:,.1f} | {tokens / s:,.0f} | {p / 2**30:.2f} GiB |")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
