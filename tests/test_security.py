"""A checkpoint someone hands you never chooses the code that runs, at any entry point.

Each malicious file would create a marker file if any code it names ran. Every entry point that reads a
checkpoint must refuse it with one `error:` line and exit code 2, and the marker must not exist.
"""

import base64
import io
import os
import pickle
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from gpt.checkpoint import load_checkpoint, save_checkpoint
from gpt.errors import UserError
from gpt.trust import allowed_targets, as_config, checked
from stage_helpers import make_parent, write_jsonl
from conftest import ROOT, run_script
from inprocess import run_here


class _Touch:
    """A pickle payload: unpickling it (without weights_only) creates `path`."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').close()",))


def _exec(marker: Path) -> dict:
    return {"_target_": "builtins.exec", "_args_": [f"open({str(marker)!r}, 'w').close()"]}


def _torch_load_chain(marker: Path) -> dict:
    """The nested `_target_` chain a crafted checkpoint can use against a plain `instantiate`:
    torch.load(f=io.BytesIO(base64.b64decode(<pickle>)), weights_only=False)."""
    blob = base64.b64encode(pickle.dumps(_Touch(marker))).decode()
    return {"_target_": "torch.load", "weights_only": False,
            "f": {"_target_": "io.BytesIO", "_args_": [{"_target_": "base64.b64decode", "_args_": [blob]}]}}


def _payloads(base: dict, marker: Path) -> dict:
    """name -> a function writing a malicious variant of the checkpoint dict `base` to a path."""

    def config_variant(edit):
        def write(path):
            ckpt = {k: v for k, v in base.items() if k != "path"}
            ckpt["config"] = {k: dict(v) if isinstance(v, dict) else v for k, v in base["config"].items()}
            edit(ckpt["config"])
            save_checkpoint(ckpt, path)
        return write

    def pickle_payload(path):
        ckpt = {k: v for k, v in base.items() if k != "path"}
        ckpt["extra"] = _Touch(marker)
        torch.save(ckpt, path)

    return {
        "torch_load_chain": config_variant(lambda c: c.update(tokenizer=_torch_load_chain(marker))),
        "pickle": pickle_payload,
        "top_level_target": config_variant(lambda c: c.update(stage={**_exec(marker), "composite": True})),
        "nested_in_argument": config_variant(lambda c: c["model"].update(dropout=_exec(marker))),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _commands(ckpt: Path, tmp: Path) -> dict:
    data = tmp / "train.jsonl"
    return {
        "train.py resume=": ["train.py", f"resume={ckpt}"],
        "finetune.py resume=": ["finetune.py", f"resume={ckpt}"],
        "finetune.py ckpt=": ["finetune.py", "stage=sft", f"ckpt={ckpt}", f"data={data}"],
        "infer.py": ["infer.py", f"ckpt={ckpt}", "prompt=a", "max_new_tokens=2"],
        "evaluate.py": ["evaluate.py", f"ckpt={ckpt}"],
        "serve.py": ["serve.py", f"ckpt={ckpt}", f"port={_free_port()}"],
        "gpt.lora merge": ["-m", "gpt.lora", "merge", str(ckpt), str(tmp / "merged.pt")],
        "gpt.quantize": ["-m", "gpt.quantize", str(ckpt), str(tmp / "int8.pt")],
        "gpt.interop export": ["-m", "gpt.interop", "export", str(ckpt), str(tmp / "hf")],
    }


def _run(args: list[str], cwd: Path):
    if args[0] == "-m":  # a module CLI (python -m gpt.lora ...), importable from the checkout
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=120)
    return run_script(args[0], *args[1:], cwd=cwd, timeout=120)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    """A well-formed finetune.py-style checkpoint (stage, lineage, optimizer state) that loads cleanly."""
    tmp = tmp_path_factory.mktemp("base")
    parent = make_parent(tmp / "parent.pt", stage="sft", chat=True)
    parent["lineage"] = {"parent": str(tmp / "parent.pt"), "parent_sha256": "0" * 64}
    parent["config"]["stage"] = {"_target_": "gpt.stages.sft.SFT", "_partial_": True, "batch_size": 4}
    parent["config"]["data"] = {"path": str(tmp / "train.jsonl"), "val_path": None}
    return parent


def test_the_unmodified_checkpoint_loads(base, tmp_path):
    """The control: without a payload the same file loads, so the refusals below are the payloads'."""
    path = save_checkpoint({k: v for k, v in base.items() if k != "path"}, tmp_path / "ok.pt")
    assert load_checkpoint(path)["config"]["stage"]["_target_"] == "gpt.stages.sft.SFT"


@pytest.mark.slow
def test_every_entry_point_refuses_a_malicious_checkpoint(base, tmp_path):
    """9 entry points x 4 payloads: one `error:` line, exit 2, no marker, no run folder left."""
    cases = []
    for name, write in _payloads(base, tmp_path / "MARKER").items():
        folder = tmp_path / name
        folder.mkdir()
        ckpt = folder / "evil.pt"
        write(ckpt)
        write_jsonl(folder / "train.jsonl", [{"prompt": "1+1=", "completion": "2"}] * 4)
        for entry, args in _commands(ckpt, folder).items():
            cwd = folder / entry.replace(" ", "_").replace("=", "").replace(".", "_")
            cwd.mkdir()
            cases.append((name, entry, args, cwd))
    # serve.py in its own process (were a payload let through, it would serve until the timeout, not hang the
    # test), alongside; the other entry points run in this process one after another (no torch import each)
    with ThreadPoolExecutor(1) as pool:
        served = {i: pool.submit(_run, c[2], c[3]) for i, c in enumerate(cases) if c[1] == "serve.py"}
        here = {i: run_here(*c[2], cwd=c[3]) for i, c in enumerate(cases) if c[1] != "serve.py"}
        procs = [served[i].result() if i in served else here[i] for i in range(len(cases))]
    failures = []
    for (name, entry, _, cwd), proc in zip(cases, procs):
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        ok = (proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:")
              and ("refusing" in lines[0] or "weights-only" in lines[0]) and not any(cwd.iterdir()))
        if not ok:
            failures.append(f"{name} / {entry}: rc={proc.returncode} stderr={proc.stderr[-600:]!r} "
                            f"left={[p.name for p in cwd.iterdir()]}")
    assert not (tmp_path / "MARKER").exists(), "a payload ran"
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("node, needle", [
    ({"_target_": "builtins.print"}, "builtins.print"),
    ({"_target_": "gpt.model.GPT", "dropout": {"_target_": "gpt.model.GPT"}}, "config.model.dropout._target_"),
    ({"_target_": "gpt.model.GPT", "_args_": [1]}, "_args_"),
    ({"_target_": "gpt.model.GPT", "_recursive_": True}, "_recursive_"),
    ({"_target_": "gpt.model.GPT", "layers": [{"_target_": "os.system"}]}, "config.model.layers[0]._target_"),
    ({"_target_": "gpt.model.GPT", "n": float("nan")}, "finite"),
    ({"_target_": "gpt.model.GPT", "x": b"bytes"}, "not a plain config value"),
    ({"_target_": "gpt.tokenizer.CharTokenizer"}, "model classes"),  # a class of another group
    ({"_target_": "gpt.model.GPT", "head": {"_target_": "gpt.tasks.arithmetic.exact_match_reward"}}, "head"),
])
def test_checked_refuses_code_and_odd_values(node, needle):
    with pytest.raises(UserError, match="refusing") as e:
        checked(node, "model", "checkpoint 'x.pt'", "config.model")
    assert needle in str(e.value)


def test_checked_allows_the_package_own_nested_targets():
    """conf/stage/grpo.yaml nests a reward function; that one target is this package's and allowed."""
    node = {"_target_": "gpt.stages.grpo.GRPO", "_partial_": True,
            "reward_fn": {"_target_": "gpt.tasks.arithmetic.exact_match_reward", "_partial_": True}}
    assert checked(node, "stage", "x") == node
    assert allowed_targets("stage", nested=True) == {"gpt.tasks.arithmetic.exact_match_reward"}
    assert allowed_targets("model", nested=True) == frozenset()
    assert all(t.startswith("gpt.") for g in ("model", "tokenizer", "data", "stage") for t in allowed_targets(g))


def test_deep_nesting_is_refused_not_a_recursion_error():
    node = {"_target_": "gpt.model.GPT"}
    inner = node
    for _ in range(5000):
        inner["x"] = {}
        inner = inner["x"]
    with pytest.raises(UserError, match="nested more than"):
        checked(node, "model", "x")


@pytest.mark.parametrize("text", ["${unique_dir:MARKERDIR}", "${oc.env:HOME}", "a\\${x}", "a\\\\${x}", "\\",
                                  "${", "price: $5 {x}"])
def test_file_strings_stay_text_in_omegaconf(text, tmp_path, monkeypatch):
    """An interpolation read from a file would run a resolver (unique_dir creates folders); as_config keeps
    every string exactly as the file holds it."""
    from gpt.config import register_resolvers

    register_resolvers()
    monkeypatch.chdir(tmp_path)
    node = as_config({"data": {"cache_dir": text, "list": [text]}})
    plain = OmegaConf.to_container(node, resolve=True)
    assert plain == {"data": {"cache_dir": text, "list": [text]}}
    assert not (tmp_path / "MARKERDIR").exists()


def test_resume_keeps_an_interpolation_in_the_checkpoint_as_text(tmp_path, monkeypatch):
    """train.py resume= copies the checkpoint's data node into the run config: a `${unique_dir:...}` there
    must stay a literal string (no folder created) when the config is resolved for the new checkpoint."""
    from gpt.config import register_resolvers, to_plain
    from gpt.run import adopt

    register_resolvers()
    monkeypatch.chdir(tmp_path)
    ckpt = make_parent(tmp_path / "p.pt")
    ckpt["config"]["data"] = {"_target_": "gpt.data.TextFiles", "path": "x.txt", "cache_dir": "${unique_dir:EVIL}"}
    path = save_checkpoint({k: v for k, v in ckpt.items() if k != "path"}, tmp_path / "c.pt")
    resume = load_checkpoint(path)
    cfg = OmegaConf.create({"model": {}, "tokenizer": {}, "data": {}, "seed": 1})
    adopt(cfg, resume, ("model", "tokenizer", "data", "seed"), "train.py")
    assert to_plain(cfg)["data"]["cache_dir"] == "${unique_dir:EVIL}"
    assert not (tmp_path / "EVIL").exists()


@pytest.mark.parametrize("edit, needle", [
    (lambda c: c.update(model=[1, 2]), "state dict"),
    (lambda c: c.update(model={"w": [1.0]}), "state dict"),
    (lambda c: c.update(step="12"), "'step'"),
    (lambda c: c.update(step=-1), "'step'"),
    (lambda c: c.update(tokenizer="char"), "'tokenizer'"),
    (lambda c: c.update(config=[]), "config"),
    (lambda c: c.update(best_val_loss="low"), "best_val_loss"),
    (lambda c: c.update(optimizer=[1]), "'optimizer'"),
    (lambda c: c.update(stage=3), "'stage'"),
])
def test_checkpoint_shaped_dicts_with_wrong_types_are_refused(edit, needle, tmp_path):
    ckpt = {k: v for k, v in make_parent(tmp_path / "p.pt").items() if k != "path"}
    edit(ckpt)
    save_checkpoint(ckpt, tmp_path / "bad.pt")
    with pytest.raises(UserError) as e:
        load_checkpoint(tmp_path / "bad.pt")
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("identity, needle", [
    ({"type": "char", "chars": ""}, "non-empty"),
    ({"type": "char", "chars": 5}, "non-empty"),
    ({"type": "char", "chars": "ab", "special": "<|x|>"}, "special"),
    ({"type": "char", "chars": "ab", "special": ["<|x|>", "<|x|>"]}, "special"),
    ({"type": "tiktoken", "name": "r50k_base"}, "not one of"),
    ({"type": "tiktoken", "name": {"_target_": "os.system"}}, "not one of"),
    ({"type": "sentencepiece"}, "unknown tokenizer"),
    ("char", "not a dict"),
])
def test_tokenizer_identities_are_checked(identity, needle):
    from gpt.tokenizer import from_identity

    with pytest.raises(UserError, match="tokenizer identity") as e:
        from_identity(identity)
    assert needle in str(e.value)
