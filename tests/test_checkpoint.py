"""Checkpoints: atomic save, resolution of run folders, validated loading, rebuilding the model."""

import hashlib
import os

import pytest
import torch

import gpt.checkpoint as ckpt_mod
from gpt.checkpoint import (clean_state_dict, file_sha256, load_checkpoint, model_from_checkpoint,
                            resolve_checkpoint, save_checkpoint)
from gpt.errors import UserError
from gpt.model import GPT

HP = dict(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.0, bias=True, loss_chunk_size=8)


def tiny(seed=0):
    torch.manual_seed(seed)
    return GPT(**HP)


def make_ckpt(model, step=0, **extra):
    return {"config": {"model": {"_target_": "gpt.model.GPT", **HP}}, "model": model.state_dict(),
            "tokenizer": {"type": "char", "chars": "abcdefghijk"}, "step": step, **extra}


def test_round_trip(tmp_path):
    m = tiny()
    obj = make_ckpt(m, step=42, best_val_loss=1.25, optimizer={"state": {}, "param_groups": []})
    path = save_checkpoint(obj, tmp_path / "sub" / "ck.pt")
    assert path == tmp_path / "sub" / "ck.pt" and path.is_file()
    loaded = load_checkpoint(path)
    assert loaded["step"] == 42 and loaded["best_val_loss"] == 1.25
    assert loaded["tokenizer"] == obj["tokenizer"]
    assert loaded["config"] == obj["config"]
    assert loaded["path"] == str(path)
    sd = m.state_dict()
    assert loaded["model"].keys() == sd.keys()
    for k in sd:
        assert torch.equal(loaded["model"][k], sd[k]), k


def test_save_leaves_no_temp_file(tmp_path):
    save_checkpoint({"a": torch.ones(3)}, tmp_path / "x.pt")
    save_checkpoint({"a": torch.zeros(3)}, tmp_path / "x.pt")  # overwrite
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]
    assert torch.equal(torch.load(tmp_path / "x.pt")["a"], torch.zeros(3))


def test_save_is_atomic_when_torch_save_fails(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"version": torch.tensor([1])}, path)
    before = path.read_bytes()

    def broken_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(UserError, match="could not write .*disk full.*the previous checkpoint is intact"):
        save_checkpoint({"version": torch.tensor([2])}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before  # the old checkpoint is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # the partial temp file is gone
    assert torch.equal(torch.load(path)["version"], torch.tensor([1]))


def test_save_new_file_failure_leaves_nothing(tmp_path, monkeypatch):
    def broken_save(obj, f, *a, **k):
        f.write(b"partial")
        raise RuntimeError("boom")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(RuntimeError):
        save_checkpoint({}, tmp_path / "new.pt")
    assert list(tmp_path.iterdir()) == []


def test_resolve_checkpoint_prefers_best_then_last(tmp_path):
    run = tmp_path / "run"
    ck = run / "checkpoints"
    ck.mkdir(parents=True)
    with pytest.raises(UserError, match="best.pt"):
        resolve_checkpoint(run)
    (ck / "last.pt").write_bytes(b"x")
    assert resolve_checkpoint(run) == ck / "last.pt"
    (ck / "best.pt").write_bytes(b"x")
    assert resolve_checkpoint(run) == ck / "best.pt"
    assert resolve_checkpoint(run, prefer="last") == ck / "last.pt"
    assert resolve_checkpoint(str(run)) == ck / "best.pt"
    # a folder holding the files directly
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "last.pt").write_bytes(b"x")
    assert resolve_checkpoint(flat) == flat / "last.pt"
    # a file is returned as is
    assert resolve_checkpoint(ck / "last.pt", prefer="best") == ck / "last.pt"


@pytest.mark.parametrize("value", [None, "", "None", "???"])
def test_resolve_checkpoint_without_path_raises_user_error(value):
    with pytest.raises(UserError, match="ckpt="):
        resolve_checkpoint(value)


def test_load_checkpoint_from_run_folder(tmp_path):
    m = tiny()
    save_checkpoint(make_ckpt(m, step=1), tmp_path / "checkpoints" / "last.pt")
    save_checkpoint(make_ckpt(m, step=2), tmp_path / "checkpoints" / "best.pt")
    assert load_checkpoint(tmp_path)["step"] == 2
    assert load_checkpoint(tmp_path, prefer="last")["step"] == 1


def test_missing_checkpoint_raises_user_error(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(UserError, match="nope.pt"):
        load_checkpoint(missing)


@pytest.mark.parametrize("content", [b"not a checkpoint\n", b"", b"PK\x03\x04garbage"])
def test_non_checkpoint_file_raises_user_error(tmp_path, content):
    f = tmp_path / "notes.pt"
    f.write_bytes(content)
    with pytest.raises(UserError, match="not a checkpoint"):
        load_checkpoint(f)


@pytest.mark.parametrize("content", [b"hello world\n", b"abc"])
def test_text_file_that_looks_like_bad_pickle_raises_user_error(tmp_path, content):
    f = tmp_path / "notes.txt"
    f.write_bytes(content)
    with pytest.raises(UserError, match="not a checkpoint"):
        load_checkpoint(f)


@pytest.mark.parametrize("obj", [{"model": {}, "config": {}}, {"weights": torch.ones(2)}, [1, 2, 3],
                                 torch.ones(3)])
def test_torch_file_without_required_keys_raises_user_error(tmp_path, obj):
    f = tmp_path / "other.pt"
    torch.save(obj, f)
    with pytest.raises(UserError, match="not a checkpoint of this project"):
        load_checkpoint(f)


class NotAllowed:
    """An arbitrary class: pickling it into a checkpoint would need code execution to load."""


def test_file_with_arbitrary_pickled_object_is_refused(tmp_path):
    f = tmp_path / "evil.pt"
    torch.save({"model": {}, "config": {}, "tokenizer": {}, "step": NotAllowed()}, f)
    with pytest.raises(UserError, match="weights-only"):
        load_checkpoint(f)


def test_clean_state_dict_strips_prefixes():
    t = torch.ones(1)
    sd = {"_orig_mod.a.weight": t, "module.b.bias": t, "module._orig_mod.c": t, "_orig_mod.module.d": t,
          "e.module.f": t, "plain": t}
    out = clean_state_dict(sd)
    assert list(out) == ["a.weight", "b.bias", "c", "d", "e.module.f", "plain"]
    assert all(v is t for v in out.values())


def test_load_checkpoint_cleans_compiled_and_ddp_prefixes(tmp_path):
    m = tiny()
    obj = make_ckpt(m)
    obj["model"] = {"module._orig_mod." + k: v for k, v in obj["model"].items()}
    save_checkpoint(obj, tmp_path / "c.pt")
    loaded = load_checkpoint(tmp_path / "c.pt")
    assert set(loaded["model"]) == set(m.state_dict())
    model = model_from_checkpoint(loaded)
    x = torch.randint(11, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], m.eval()(x)[0], rtol=0, atol=0)


def test_model_from_checkpoint_rebuilds_identical_model(tmp_path):
    m = tiny(seed=3).eval()
    save_checkpoint(make_ckpt(m), tmp_path / "c.pt")
    model = model_from_checkpoint(load_checkpoint(tmp_path / "c.pt"))
    assert isinstance(model, GPT) and not model.training
    assert model.hparams() == m.hparams()
    assert model.transformer.wte.weight is model.lm_head.weight  # tying survives loading
    x = torch.randint(11, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x)[0], m(x)[0])
    other = tiny(seed=4).eval()
    with torch.no_grad():
        assert not torch.equal(other(x)[0], m(x)[0])


def test_model_from_checkpoint_with_mismatched_weights_raises_user_error():
    ck = make_ckpt(tiny())
    ck["config"]["model"]["n_embd"] = 32
    with pytest.raises(UserError, match="do not fit"):
        model_from_checkpoint(ck)


def test_model_from_checkpoint_refuses_target_outside_package(monkeypatch):
    calls = []
    monkeypatch.setattr(os, "system", lambda *a, **k: calls.append(a))
    ck = make_ckpt(tiny())
    ck["config"]["model"] = {"_target_": "os.system", "command": "echo hacked"}
    with pytest.raises(UserError, match="os.system"):
        model_from_checkpoint(ck)
    assert calls == []


@pytest.fixture
def probe(monkeypatch):
    """A function outside the gpt package, reachable as os._gpt_test_probe; records its calls."""
    calls = []

    def _probe(*args, **kwargs):
        calls.append((args, kwargs))
        return HP["vocab_size"]

    monkeypatch.setattr(os, "_gpt_test_probe", _probe, raising=False)
    return calls


def test_model_from_checkpoint_refuses_target_reached_through_gpt_module_attributes(probe):
    ck = make_ckpt(tiny())
    ck["config"]["model"] = {"_target_": "gpt.checkpoint.os._gpt_test_probe", "arg": "x"}
    with pytest.raises(BaseException) as e:
        model_from_checkpoint(ck)
    assert probe == [], "a callable outside the gpt package was called"
    assert isinstance(e.value, UserError)


def test_model_from_checkpoint_refuses_nested_target_outside_package(probe):
    ck = make_ckpt(tiny())
    ck["config"]["model"]["vocab_size"] = {"_target_": "os._gpt_test_probe", "arg": "x"}
    with pytest.raises(UserError):
        model_from_checkpoint(ck)
    assert probe == []


def test_file_sha256(tmp_path):
    f = tmp_path / "blob.bin"
    data = os.urandom(3 * (1 << 20) + 17)  # spans several read blocks
    f.write_bytes(data)
    assert file_sha256(f) == hashlib.sha256(data).hexdigest()
    f.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert file_sha256(f) != hashlib.sha256(data).hexdigest()


def test_required_keys():
    assert set(ckpt_mod.REQUIRED_KEYS) == {"model", "config", "tokenizer", "step"}
