"""The sharded token cache (gpt.prepare, gpt.data): exact ids per document, the split, byte-identical caches for
any number of workers, a killed preparation, ranks waiting for local rank 0, batches over shards and ahead of
the step, and prepare.py end to end."""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from conftest import ROOT, run_script
from gpt import prepare
from gpt.data import HFDataset, Prefetcher, TextFiles, Tokens, get_batch, read_pieces, unigram_loss
from gpt.errors import UserError
from gpt.prepare import in_val
from gpt.tokenizer import CharTokenizer, TiktokenTokenizer

WORDS = ["the", "king", "  indented", "naïve", "你好", "😀", "don't", "1234", "!!", "\t", "\n", "\n\n", " \n", "x"]


def corpus(folder, n_docs=24, words=300, seed=0):
    """n_docs text files of random words, newlines, indentation and non-ASCII characters -> their texts."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    docs = []
    for i in range(n_docs):
        text = "".join(rng.choice(WORDS) + rng.choice([" ", "", "\n"]) for _ in range(rng.randint(1, words)))
        (folder / f"doc{i:03d}.txt").write_text(text, encoding="utf-8")
        docs.append(text)
    return docs


def joined(tok, texts):
    sep = [tok.eot_id] if tok.eot_id is not None else tok.encode("\n\n")
    out = []
    for i, t in enumerate(texts):
        out += (sep if i else []) + tok.encode(t)
    return out


@pytest.fixture
def small_shards(monkeypatch):
    """Shards of 500 ids and worker tasks of 300 characters: a small corpus spans many of both."""
    monkeypatch.setattr(prepare, "SHARD_TOKENS", 500)
    monkeypatch.setattr(prepare, "BATCH_CHARS", 300)


@pytest.mark.parametrize("tokenizer", ["char", "gpt2"])
def test_cache_holds_each_documents_ids_with_separators(tmp_path, small_shards, tokenizer):
    docs = corpus(tmp_path / "corpus")
    tok = CharTokenizer() if tokenizer == "char" else TiktokenTokenizer("gpt2")
    data = TextFiles(str(tmp_path / "corpus"), cache_dir=str(tmp_path / "c"), val_fraction=0.25,
                     num_proc=1).load(tok)
    tok = data.tokenizer  # the char tokenizer fitted on the corpus
    held = [in_val(i, 0.25) for i in range(len(docs))]
    assert 0 < sum(held) < len(docs)  # both splits have documents: a split by document, no fallback
    assert data.train.tolist() == joined(tok, [d for d, v in zip(docs, held) if not v])
    assert data.val.tolist() == joined(tok, [d for d, v in zip(docs, held) if v])
    meta = json.loads((data.cache_path / "meta.json").read_text())
    assert meta["split"] == "hash" and meta["documents"] == {"train": held.count(False), "val": held.count(True)}
    assert len(data.train.shards) > 2 and all(len(s) <= 500 for s in data.train.shards)
    assert [n for _, n in meta["shards"]["train"]] == [len(s) for s in data.train.shards]
    assert data.train.dtype == np.uint16
    assert not [p for p in (tmp_path / "c").iterdir() if p.name.startswith(".")]  # no temp folder left


def test_one_and_four_workers_give_byte_identical_caches(tmp_path, small_shards):
    corpus(tmp_path / "corpus", n_docs=40)
    folders = []
    for n in (1, 4):
        data = TextFiles(str(tmp_path / "corpus"), cache_dir=str(tmp_path / f"c{n}"), num_proc=n).load(
            TiktokenTokenizer("gpt2"))
        folders.append(data.cache_path)
    metas = [json.loads((f / "meta.json").read_text()) for f in folders]
    assert metas[0]["workers"] == 1 and metas[1]["workers"] == 4  # the pool really ran
    for m in metas:
        del m["seconds"], m["workers"]
    assert metas[0] == metas[1]
    names = sorted(p.name for p in folders[0].iterdir())
    assert names == sorted(p.name for p in folders[1].iterdir()) and len(names) > 3
    for name in names:
        if name != "meta.json":
            assert (folders[0] / name).read_bytes() == (folders[1] / name).read_bytes(), name


@pytest.mark.parametrize("encoding", ["gpt2", "cl100k_base"])
def test_a_file_read_in_pieces_encodes_as_the_whole_file(tmp_path, encoding):
    text = "".join(corpus(tmp_path / "corpus", n_docs=6, words=2000, seed=1))
    f = tmp_path / "one.txt"
    f.write_text(text, encoding="utf-8")
    pieces = list(read_pieces(f, piece_chars=200))
    assert len(pieces) > 20 and "".join(pieces) == text
    assert all(p[-1] == "\n" and not p[-2].isspace() and not n[0].isspace() for p, n in zip(pieces, pieces[1:]))
    tok = TiktokenTokenizer(encoding)
    assert [i for p in pieces for i in tok.encode(p)] == tok.encode(text)


def test_one_large_file_is_split_by_its_last_tokens(tmp_path, monkeypatch, small_shards):
    import gpt.data

    monkeypatch.setattr(gpt.data, "PIECE_CHARS", 100)
    text = "".join(corpus(tmp_path / "corpus", n_docs=4, seed=2))
    f = tmp_path / "one.txt"
    f.write_text(text, encoding="utf-8")
    data = TextFiles(str(f), cache_dir=str(tmp_path / "c"), val_fraction=0.3, num_proc=1).load(CharTokenizer())
    ids = data.tokenizer.encode(text)
    n_val = int(len(ids) * 0.3)
    assert data.train.tolist() == ids[:len(ids) - n_val] and data.val.tolist() == ids[len(ids) - n_val:]
    assert len(data.train.shards) > 1 and len(data.val.shards) > 1  # the cut fell inside a shard: copied
    assert json.loads((data.cache_path / "meta.json").read_text())["split"] == "tail"


def test_separate_val_path_and_hf_val_split_streaming(tmp_path):
    train_docs = corpus(tmp_path / "train", n_docs=3)
    val_docs = corpus(tmp_path / "val", n_docs=2, seed=3)
    tok = TiktokenTokenizer("gpt2")
    data = TextFiles(str(tmp_path / "train"), val_path=str(tmp_path / "val"), cache_dir=str(tmp_path / "c")).load(tok)
    assert data.train.tolist() == joined(tok, train_docs) and data.val.tolist() == joined(tok, val_docs)

    js = tmp_path / "js"
    js.mkdir()
    for split, rows in (("train", ["alpha beta", "", "gamma"]), ("validation", ["delta"])):
        (js / f"{split}.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    src = HFDataset(str(js), streaming=True, val_split="validation", cache_dir=str(tmp_path / "c"))
    hf = src.load(tok)
    assert hf.train.tolist() == joined(tok, ["alpha beta", "gamma"]) and hf.val.tolist() == tok.encode("delta")
    with pytest.raises(UserError, match="body"):
        list(HFDataset(str(js), text_column="body", streaming=True).documents())


def test_evaluation_splits_as_the_cache_does(tmp_path):
    corpus(tmp_path / "corpus", n_docs=12)
    source = TextFiles(str(tmp_path / "corpus"), cache_dir=str(tmp_path / "c"), val_fraction=0.3)
    data = source.load(TiktokenTokenizer("gpt2"))
    ids = source.split_ids(data.tokenizer)
    assert np.array_equal(ids["train"], data.train.tolist()) and np.array_equal(ids["val"], data.val.tolist())


# ---- a killed preparation, and other ranks waiting ---------------------------------------------------

SLOW_PREPARE = """
import sys, time
import gpt.data as d, gpt.prepare as p
from gpt.tokenizer import TiktokenTokenizer
p.SHARD_TOKENS, p.BATCH_CHARS = 200, 100
pieces = d._file_pieces
def slow(files):
    for x in pieces(files):
        time.sleep(0.02)
        yield x
d._file_pieces = slow
d.TextFiles(sys.argv[1], cache_dir=sys.argv[2], num_proc=1).load(TiktokenTokenizer("gpt2"))
"""


def test_a_killed_preparation_leaves_no_cache_and_the_next_run_rebuilds(tmp_path):
    docs = corpus(tmp_path / "corpus", n_docs=60)
    cache = tmp_path / "c"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_PREPARE, str(tmp_path / "corpus"), str(cache)], env=env)
    try:
        deadline = time.time() + 60
        while not list(cache.glob(".*/train-000002.bin")):  # midway: shards are being written
            assert proc.poll() is None and time.time() < deadline, "the preparation ended before it was killed"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    assert not [p for p in cache.iterdir() if not p.name.startswith(".")]  # only the temp folder, under a dot
    source = TextFiles(str(tmp_path / "corpus"), cache_dir=str(cache))
    assert not (source.cache_path(TiktokenTokenizer("gpt2")) / "meta.json").exists()
    data = source.load(TiktokenTokenizer("gpt2"))
    assert not data.reused
    tok = data.tokenizer
    assert data.train.tolist() == joined(tok, [d for i, d in enumerate(docs) if not in_val(i, 0.1)])


def test_a_rank_waits_for_local_rank_0(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("to be or not to be\n" * 50)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    src = TextFiles(str(tmp_path / "a.txt"), cache_dir=str(tmp_path / "c"), wait_timeout=0.5)
    t0 = time.time()
    with pytest.raises(UserError) as err:  # nobody prepares: the wait ends, naming the problem and the fix
        src.load(CharTokenizer())
    message = str(err.value)
    assert "local rank 0" in message and "prepare.py" in message and "data.wait_timeout" in message
    assert time.time() - t0 < 5 and "\n" not in message

    path = src.cache_path(CharTokenizer())
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.parent / f".{path.name}.failed").write_text("data.path='x' matches no file")
    with pytest.raises(UserError, match="local rank 0 failed .*matches no file"):
        src.load(CharTokenizer())
    (path.parent / f".{path.name}.failed").unlink()

    def rank0():
        time.sleep(0.5)
        monkeypatch.setenv("LOCAL_RANK", "0")  # (the env is shared: rank 0's build runs in this thread)
        TextFiles(str(tmp_path / "a.txt"), cache_dir=str(tmp_path / "c"))._build(CharTokenizer(), path, True)

    waiting = TextFiles(str(tmp_path / "a.txt"), cache_dir=str(tmp_path / "c"), wait_timeout=30)
    thread = threading.Thread(target=rank0)
    thread.start()
    data = waiting.load(CharTokenizer())
    thread.join()
    assert data.reused and data.tokenizer.decode(data.train.tolist() + data.val.tolist()) == "to be or not to be\n" * 50


TORCHRUN = """
import json, os, sys
import torch.distributed as dist
from gpt.data import TextFiles
from gpt.tokenizer import TiktokenTokenizer
dist.init_process_group("gloo")
data = TextFiles(sys.argv[1], cache_dir=sys.argv[2]).load(TiktokenTokenizer("gpt2"))
print(json.dumps({"rank": dist.get_rank(), "built": not data.reused, "path": str(data.cache_path),
                  "train": data.train.tolist()[:50]}), flush=True)
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_under_torchrun_only_local_rank_0_prepares(tmp_path):
    corpus(tmp_path / "corpus", n_docs=30)
    script = tmp_path / "ranks.py"
    script.write_text(TORCHRUN)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(tmp_path / "corpus"), str(tmp_path / "c")], env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = sorted((json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")),
                  key=lambda r: r["rank"])
    assert [r["built"] for r in rows] == [True, False]
    assert rows[0]["path"] == rows[1]["path"] and rows[0]["train"] == rows[1]["train"]


# ---- batches ---------------------------------------------------------------------------------------------

def sharded(tmp_path, array, sizes):
    shards, start = [], 0
    for i, n in enumerate(sizes):
        f = tmp_path / f"s{i}.bin"
        array[start:start + n].tofile(f)
        shards.append(np.memmap(f, dtype=array.dtype, mode="r"))
        start += n
    return Tokens(shards)


def test_batches_across_shards_equal_batches_of_one_array(tmp_path):
    array = np.random.default_rng(0).integers(0, 60000, 1000).astype(np.uint16)
    tokens = sharded(tmp_path, array, [300, 5, 400, 295])
    assert len(tokens) == 1000 and tokens[298:310].tolist() == array[298:310].tolist()
    assert tokens[-1] == array[-1] and np.array_equal(np.asarray(tokens), array)
    for seed in range(3):
        x, y = get_batch(tokens, 64, 16, torch.Generator().manual_seed(seed))
        x2, y2 = get_batch(array, 64, 16, torch.Generator().manual_seed(seed))
        assert torch.equal(x, x2) and torch.equal(y, y2)
    counts = np.bincount(array, minlength=60000)
    assert unigram_loss(tokens, tokens, 60000) == pytest.approx(unigram_loss(array, array, 60000), rel=1e-12)
    assert counts.sum() == 1000


def test_prefetched_batches_and_state_equal_the_synchronous_ones(tmp_path):
    tokens = sharded(tmp_path, np.arange(3000, dtype=np.uint16), [1000, 2000])
    sync_gen = torch.Generator().manual_seed(7)
    expected = [get_batch(tokens, 8, 16, sync_gen) for _ in range(6)]
    ahead = Prefetcher(tokens, 8, 16, torch.Generator().manual_seed(7), depth=2)
    got = [ahead.next() for _ in range(3)]
    assert len(ahead.ahead) == 2 and ahead.pool is not None  # two batches drawn ahead in the thread
    state = ahead.generator_state()  # the state before batch 4: what a checkpoint saves
    got += [ahead.next() for _ in range(3)]
    for (x, y), (ex, ey) in zip(got, expected):
        assert torch.equal(x, ex) and torch.equal(y, ey)
    resumed = Prefetcher(tokens, 8, 16, torch.Generator(), depth=2)
    resumed.reset(state)
    for (x, _), (ex, _) in zip([resumed.next() for _ in range(3)], expected[3:]):
        assert torch.equal(x, ex)
    assert ahead.wait_seconds > 0
    ahead.close()
    resumed.close()


def test_pretrain_objective_saves_the_state_of_the_next_batch(tmp_path):
    from gpt.stages.pretrain import Pretrain

    (tmp_path / "a.txt").write_text("0123456789" * 100)
    data = TextFiles(str(tmp_path / "a.txt"), cache_dir=str(tmp_path / "c")).load(CharTokenizer())
    plain = Pretrain(data, 4, 8, seed=3)
    ahead = Pretrain(data, 4, 8, seed=3, prefetch=3)
    assert plain.batches.pool is None and ahead.batches.pool is not None  # CPU default: no thread
    for _ in range(2):
        assert torch.equal(plain.train_batch()[0], ahead.train_batch()[0])
    assert torch.equal(plain.state_dict()["generator"], ahead.state_dict()["generator"])
    again = Pretrain(data, 4, 8, seed=99, prefetch=3)
    again.train_batch()  # batches drawn ahead from another state are dropped on load
    again.load_state_dict(ahead.state_dict())
    assert torch.equal(again.train_batch()[0], plain.train_batch()[0])
    assert plain.data_seconds() >= 0 and plain.data_seconds() == 0.0  # read and reset


# ---- prepare.py -----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_prepare_script_builds_the_cache_train_uses_and_reports_it(tmp_path):
    corpus(tmp_path / "corpus", n_docs=20)
    args = ("data=text", f"data.path={tmp_path / 'corpus'}", "tokenizer=gpt2", "data.num_proc=2")
    env = {"GPT_CACHE_DIR": str(tmp_path / "cache")}
    first = run_script("prepare.py", *args, cwd=tmp_path, env=env, timeout=120)
    assert first.returncode == 0, first.stderr[-2000:]
    out = first.stdout
    assert "token cache " + str(tmp_path / "cache" / "tokens") in out and "(new)" in out
    assert "MB/s" in out and "tokens/s" in out and "documents" in out
    assert "val split: documents held out by a hash" in out
    assert "\r" not in first.stderr  # no bar redraws on a pipe
    second = run_script("prepare.py", *args, cwd=tmp_path, env=env, timeout=120)
    assert second.returncode == 0 and "reused" in second.stdout
    assert not (tmp_path / "outputs").exists()  # no run folder
    # train.py finds the same cache
    path = out.split("token cache ")[1].split()[0]
    tok = TiktokenTokenizer("gpt2")
    source = TextFiles(str(tmp_path / "corpus"), cache_dir=str(tmp_path / "cache" / "tokens"))
    assert str(source.cache_path(tok)) == path and source.load(tok).reused
    bad = run_script("prepare.py", *args[:3], "data.num_proc=0", cwd=tmp_path, env=env, timeout=120)
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert bad.returncode == 2 and lines == ["error: data.num_proc=0 must be null or a positive integer"], bad.stderr


def test_default_workers_are_every_core_up_to_the_memory_cap(monkeypatch, tmp_path):
    """data.num_proc=null: one worker per core, at most DEFAULT_MAX_WORKERS (each holds its tokenizer and two
    batches, so a 64-core node does not multiply the preparation's memory by 64); an explicit number is kept."""
    from gpt import data as d

    (tmp_path / "a.txt").write_text("some text\n")
    monkeypatch.setattr(d, "cores", lambda: 64)
    assert TextFiles(str(tmp_path)).num_proc == d.DEFAULT_MAX_WORKERS == 8
    assert TextFiles(str(tmp_path), num_proc=32).num_proc == 32
    monkeypatch.setattr(d, "cores", lambda: 2)
    assert TextFiles(str(tmp_path)).num_proc == 2
