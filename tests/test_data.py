"""Text sources -> cached token streams, play conversion, random batches, unigram baseline."""

import json
import math
import os

import numpy as np
import pytest
import torch

from gpt.data import HFDataset, Shakespeare, TextFiles, get_batch, play_markdown_to_text, unigram_loss
from gpt.errors import UserError
from gpt.prepare import in_val
from gpt.tokenizer import CharTokenizer, TiktokenTokenizer

PLAY = """# The Tragedy of Hamlet

## ACT I

### SCENE I. Elsinore. A platform before the castle.

_FRANCISCO at his post. Enter to him BERNARDO_

**BERNARDO**  
Who's there?

**FRANCISCO**  
Nay, answer me: stand, and unfold yourself.

_Exit_

## ACT II

**HAMLET**  
To be, or not to be, that is the question:  
Whether 'tis nobler in the mind to suffer

_Exeunt_
"""

PLAY_TEXT = ("BERNARDO:\nWho's there?\n\nFRANCISCO:\nNay, answer me: stand, and unfold yourself.\n\n"
             "HAMLET:\nTo be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n")


# ------------------------------------------------------------------------------------- play markdown


def test_play_markdown_to_text():
    assert play_markdown_to_text(PLAY) == PLAY_TEXT


def test_play_markdown_drops_text_outside_speeches_and_markup():
    md = "Some preface\n\n**KING**  \nO, my _offence_ is rank\\!\n\n## SCENE II\n\nloose line after a heading\n"
    assert play_markdown_to_text(md) == "KING:\nO, my offence is rank!\n"


def test_play_markdown_drops_multiline_stage_direction_inside_scene():
    md = ("**MACBETH**  \nIs this a dagger which I see before me,\n\n"
          "_A bell rings. Enter LADY MACBETH, with\nattendants and torches_\n\n"
          "**LADY MACBETH**  \nThat which hath made them drunk hath made me bold;\n")
    assert play_markdown_to_text(md) == ("MACBETH:\nIs this a dagger which I see before me,\n\n"
                                         "LADY MACBETH:\nThat which hath made them drunk hath made me bold;\n")


# --------------------------------------------------------------------------------------- Shakespeare


@pytest.fixture(scope="module")
def macbeth(tmp_path_factory):
    cache = tmp_path_factory.mktemp("tokens")
    src = Shakespeare(plays=["tragedies/macbeth"], cache_dir=str(cache), val_fraction=0.1)
    return src, src.load(CharTokenizer())


def test_shakespeare_loads_one_play(macbeth):
    src, data = macbeth
    tok = data.tokenizer
    assert isinstance(tok, CharTokenizer) and 30 < tok.vocab_size < 100
    assert data.train.dtype == np.uint16 and not data.reused
    text = tok.decode(data.train[:200].tolist())
    assert text.startswith("First Witch:\nWhen shall we three meet again\nIn thunder, lightning, or in rain?\n\n")
    assert "**" not in text and "#" not in text
    n = len(data.train) + len(data.val)
    assert len(data.val) == int(n * 0.1)
    assert n > 80_000
    assert data.split("train") is data.train and data.split("val") is data.val


def test_shakespeare_text_has_no_stage_directions(macbeth):
    _, data = macbeth
    text = data.tokenizer.decode(np.concatenate([data.train, data.val]).tolist())
    assert "Sennet sounded" not in text


def test_shakespeare_unknown_play_raises_user_error(tmp_path):
    with pytest.raises(UserError, match="tragedies/macbeth"):  # the message lists the valid choices
        Shakespeare(plays=["tragedies/nope"], cache_dir=str(tmp_path))


# ----------------------------------------------------------------------------------------- TextFiles


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def all_text(data):
    return data.tokenizer.decode(np.concatenate([data.train, data.val]).tolist())


def split_texts(data):
    return data.tokenizer.decode(data.train.tolist()), data.tokenizer.decode(data.val.tolist())


def expected_splits(docs, vf, sep="\n\n"):
    """(train, val) text of char-tokenized documents under the cache's rule: documents held out by a hash of
    their index; when that leaves one side empty, the last vf of the joined text (one char = one token)."""
    val = [d for i, d in enumerate(docs) if in_val(i, vf)]
    train = [d for i, d in enumerate(docs) if not in_val(i, vf)]
    if train and val:
        return sep.join(train), sep.join(val)
    every = sep.join(docs)
    n_val = int(len(every) * vf)
    return every[:len(every) - n_val], every[len(every) - n_val:]


def test_text_files_single_file(tmp_path):
    f = write(tmp_path / "a.txt", "hello world, hello data\n" * 5)
    data = TextFiles(str(f), cache_dir=str(tmp_path / "cache"), val_fraction=0.2).load(CharTokenizer())
    assert all_text(data) == "hello world, hello data\n" * 5
    assert data.cache_path.parent == tmp_path / "cache"
    assert (data.cache_path / "meta.json").exists()


def test_text_files_folder_glob_and_document_separator(tmp_path):
    d = tmp_path / "corpus"
    write(d / "b.txt", "second doc")
    write(d / "a.txt", "first doc")
    write(d / "sub" / "c.md", "third doc")
    write(d / ".hidden", "secret")
    cache = str(tmp_path / "cache")

    folder = TextFiles(str(d), cache_dir=cache)
    assert [f.name for f in folder.files] == ["a.txt", "b.txt", "c.md"]
    assert split_texts(folder.load(CharTokenizer())) == expected_splits(["first doc", "second doc", "third doc"], 0.1)

    glob_src = TextFiles(str(d / "*.txt"), cache_dir=cache)
    assert [f.name for f in glob_src.files] == ["a.txt", "b.txt"]
    assert split_texts(glob_src.load(CharTokenizer())) == expected_splits(["first doc", "second doc"], 0.1)

    rec = TextFiles(str(d / "**" / "*.md"), cache_dir=cache)
    assert [f.name for f in rec.files] == ["c.md"]

    # a tokenizer with an end-of-text token joins documents with it
    gpt2 = TiktokenTokenizer("gpt2")
    data = TextFiles(str(d / "*.txt"), cache_dir=cache, val_fraction=0.5).load(gpt2)
    assert in_val(0, 0.5) and not in_val(1, 0.5)  # the hash holds out the first document
    assert data.train.tolist() == gpt2.encode("second doc") and data.val.tolist() == gpt2.encode("first doc")
    three = TextFiles(str(d / "**" / "*.*"), cache_dir=cache, val_fraction=0.5).load(gpt2)  # a.txt b.txt c.md
    assert three.train.tolist() == gpt2.encode("second doc") + [gpt2.eot_id] + gpt2.encode("third doc")


def test_tiny_corpus_with_empty_val_split_is_one_user_error_naming_it(tmp_path):
    f = write(tmp_path / "a.txt", "tiny")  # 4 tokens, val_fraction 0.1 -> 0 val tokens: nothing to evaluate on
    src = TextFiles(str(f), cache_dir=str(tmp_path / "c"), val_fraction=0.1)
    with pytest.raises(UserError) as err:
        src.load(CharTokenizer())
    message = str(err.value)
    assert "a.txt" in message and "only 4 tokens" in message and "data.val_fraction=0.1" in message
    assert "\n" not in message


def test_text_files_missing_path_raises_user_error_naming_it(tmp_path):
    missing = str(tmp_path / "no_such_file.txt")
    with pytest.raises(UserError, match="no_such_file.txt"):
        TextFiles(missing)
    with pytest.raises(UserError, match="nothing_here"):
        TextFiles(str(tmp_path / "nothing_here" / "*.txt"))
    with pytest.raises(UserError):
        TextFiles("")


def test_empty_text_raises_user_error(tmp_path):
    f = write(tmp_path / "empty.txt", "")
    with pytest.raises(UserError, match="no text"):
        TextFiles(str(f), cache_dir=str(tmp_path / "c")).load(CharTokenizer())


def test_non_utf8_file_raises_user_error(tmp_path):
    f = tmp_path / "bin.txt"
    f.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(UserError, match="UTF-8"):
        TextFiles(str(f), cache_dir=str(tmp_path / "c")).load(CharTokenizer())


@pytest.mark.parametrize("vf", [0.0, 1.0, -0.1, 1.5])
def test_bad_val_fraction_raises_user_error(tmp_path, vf):
    f = write(tmp_path / "a.txt", "abc")
    with pytest.raises(UserError, match="val_fraction"):
        TextFiles(str(f), val_fraction=vf)


def test_cache_is_reused_and_a_changed_file_gets_a_new_key(tmp_path):
    f = write(tmp_path / "a.txt", "the cat sat on the mat\n" * 20)
    cache = str(tmp_path / "cache")
    first = TextFiles(str(f), cache_dir=cache).load(CharTokenizer())
    assert not first.reused
    second = TextFiles(str(f), cache_dir=cache).load(CharTokenizer())
    assert second.reused and second.cache_path == first.cache_path
    assert np.array_equal(second.train, first.train) and np.array_equal(second.val, first.val)
    assert second.tokenizer.chars == first.tokenizer.chars  # the tokenizer comes back from the cache

    # another val_fraction or tokenizer is another cache
    other = TextFiles(str(f), cache_dir=cache, val_fraction=0.2).load(CharTokenizer())
    assert other.cache_path != first.cache_path and not other.reused

    st = f.stat()
    write(f, "the dog sat on the log\n" * 21)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = TextFiles(str(f), cache_dir=cache).load(CharTokenizer())
    assert not changed.reused and changed.cache_path != first.cache_path
    assert all_text(changed) == "the dog sat on the log\n" * 21
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")) == sorted(
        {first.cache_path.name, other.cache_path.name, changed.cache_path.name})
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]  # no temp dirs left


@pytest.mark.parametrize("vf", [0.1, 0.25, 0.5])
def test_val_split_size_matches_val_fraction(tmp_path, vf):
    text = "abcdefghij" * 37 + "xyz"  # 373 characters
    f = write(tmp_path / "a.txt", text)
    data = TextFiles(str(f), cache_dir=str(tmp_path / "c"), val_fraction=vf).load(CharTokenizer())
    assert len(data.val) == int(373 * vf)
    assert len(data.train) == 373 - int(373 * vf)
    tok = data.tokenizer
    assert tok.decode(data.train.tolist()) == text[: len(data.train)]
    assert tok.decode(data.val.tolist()) == text[len(data.train):]
    meta = json.loads((data.cache_path / "meta.json").read_text())
    assert meta["n_val"] == len(data.val) and meta["n_train"] == len(data.train)


def test_large_vocab_uses_uint32(tmp_path):
    f = write(tmp_path / "a.txt", "你好，世界！今天天气很好。" * 10)
    tok = TiktokenTokenizer("cl100k_base")
    data = TextFiles(str(f), cache_dir=str(tmp_path / "c")).load(tok)
    assert data.train.dtype == np.uint32
    assert tok.decode(np.concatenate([data.train, data.val]).tolist()) == "你好，世界！今天天气很好。" * 10


# ------------------------------------------------------------------------------------------ batches


def test_get_batch_y_is_x_shifted_by_one():
    rng = np.random.default_rng(0)
    tokens = rng.permutation(5000).astype(np.uint16)  # distinct values: a window's start is its first id
    where = {int(t): i for i, t in enumerate(tokens)}
    g = torch.Generator().manual_seed(0)
    x, y = get_batch(tokens, batch_size=8, block_size=12, generator=g)
    assert x.shape == y.shape == (8, 12)
    assert x.dtype == y.dtype == torch.int64
    for b in range(8):
        i = where[int(x[b, 0])]
        assert x[b].tolist() == tokens[i:i + 12].tolist()
        assert y[b].tolist() == tokens[i + 1:i + 13].tolist()
    # same seed, same batch; another seed, another batch
    x2, _ = get_batch(tokens, 8, 12, torch.Generator().manual_seed(0))
    x3, _ = get_batch(tokens, 8, 12, torch.Generator().manual_seed(1))
    assert torch.equal(x, x2) and not torch.equal(x, x3)


def test_get_batch_covers_every_window_including_the_last():
    tokens = np.arange(20, dtype=np.uint16)
    x, y = get_batch(tokens, batch_size=2000, block_size=16, generator=torch.Generator().manual_seed(0))
    assert set(x[:, 0].tolist()) == {0, 1, 2, 3}  # len - block_size windows: starts 0..3
    assert int(y.max()) == 19


def test_get_batch_from_memmap(tmp_path):
    f = write(tmp_path / "a.txt", "0123456789" * 10)
    data = TextFiles(str(f), cache_dir=str(tmp_path / "c")).load(CharTokenizer())
    x, y = get_batch(data.train, 4, 8, torch.Generator().manual_seed(0))
    assert torch.equal(x[:, 1:], y[:, :-1])
    tok = data.tokenizer  # ids: '\n' -> 0, '0'..'9' -> 1..10
    digits = [int(c) for c in tok.decode(x.flatten().tolist())]
    nxt = [int(c) for c in tok.decode(y.flatten().tolist())]
    assert nxt == [(d + 1) % 10 for d in digits]  # digits follow each other in the stream


def test_get_batch_too_short_split_raises_user_error():
    tokens = np.arange(16, dtype=np.uint16)
    with pytest.raises(UserError, match="block_size"):
        get_batch(tokens, 2, 16, torch.Generator().manual_seed(0))
    x, y = get_batch(np.arange(17, dtype=np.uint16), 2, 16, torch.Generator().manual_seed(0))
    assert x[0].tolist() == list(range(16)) and y[0].tolist() == list(range(1, 17))


def test_unigram_loss_by_hand():
    train = np.array([0, 0, 1, 2], dtype=np.uint16)
    val = np.array([0, 1, 3], dtype=np.uint16)
    # add-one counts over a vocabulary of 5: [3, 2, 2, 1, 1] / 9
    expected = -(math.log(3 / 9) + math.log(2 / 9) + math.log(1 / 9)) / 3
    assert unigram_loss(train, val, 5) == pytest.approx(expected, rel=1e-12)
    uniform = unigram_loss(np.array([], dtype=np.int64), np.array([1, 2]), 7)
    assert uniform == pytest.approx(math.log(7))


# ----------------------------------------------------------------------------------- Hugging Face


@pytest.fixture
def hf_offline(monkeypatch, tmp_path):
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    for attr in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if hasattr(datasets.config, attr):
            monkeypatch.setattr(datasets.config, attr, True)
    return datasets


def test_hf_dataset_saved_to_disk(hf_offline, tmp_path):
    folder = tmp_path / "ds"
    hf_offline.Dataset.from_dict({"text": ["hello there", "", "general kenobi"], "id": [1, 2, 3]}).save_to_disk(
        str(folder))
    src = HFDataset(str(folder), cache_dir=str(tmp_path / "c"), val_fraction=0.2)
    assert list(src.documents()) == ["hello there", "general kenobi"]  # empty rows are skipped
    data = src.load(CharTokenizer())
    assert split_texts(data) == expected_splits(["hello there", "general kenobi"], 0.2)
    assert HFDataset(str(folder), cache_dir=str(tmp_path / "c"), val_fraction=0.2).load(CharTokenizer()).reused


def test_hf_dataset_dict_split(hf_offline, tmp_path):
    folder = tmp_path / "dsd"
    ds = hf_offline.DatasetDict({"train": hf_offline.Dataset.from_dict({"text": ["a b"]}),
                                 "test": hf_offline.Dataset.from_dict({"text": ["c d"]})})
    ds.save_to_disk(str(folder))
    assert list(HFDataset(str(folder), split="test").documents()) == ["c d"]
    with pytest.raises(UserError, match="validation"):
        list(HFDataset(str(folder), split="validation").documents())


def test_hf_dataset_local_data_folders(hf_offline, tmp_path):
    js = tmp_path / "js"
    js.mkdir()
    (js / "train.jsonl").write_text("".join(json.dumps({"content": s}) + "\n" for s in ["alpha", "beta"]))
    assert list(HFDataset(str(js), text_column="content").documents()) == ["alpha", "beta"]

    txt = tmp_path / "txt"
    write(txt / "a.txt", "line one\nline two\n")
    data = HFDataset(str(txt), cache_dir=str(tmp_path / "c"), val_fraction=0.25).load(CharTokenizer())
    assert split_texts(data) == expected_splits(["line one", "line two"], 0.25)


def test_hf_dataset_wrong_text_column_lists_columns(hf_offline, tmp_path):
    folder = tmp_path / "ds"
    hf_offline.Dataset.from_dict({"body": ["x"], "label": [0]}).save_to_disk(str(folder))
    with pytest.raises(UserError) as e:
        HFDataset(str(folder), text_column="text", cache_dir=str(tmp_path / "c")).load(CharTokenizer())
    msg = str(e.value)
    assert "'text'" in msg and "body" in msg and "label" in msg


def test_hf_dataset_missing_raises_user_error(hf_offline, tmp_path):
    with pytest.raises(UserError, match="could not load dataset"):
        list(HFDataset(str(tmp_path / "missing_dataset_dir")).documents())
    with pytest.raises(UserError):
        HFDataset("")
