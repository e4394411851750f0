"""Run-folder naming, error unwrapping and the entry-point wrapper."""

import os
import subprocess
import sys
import textwrap

import pytest

from gpt import config
from gpt.errors import UserError


def test_unique_dir_never_reuses_a_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(config, "_claimed", {})
    first = config.unique_dir("outputs/2026-01-01/10-00-00")
    assert config.unique_dir("outputs/2026-01-01/10-00-00") == first  # memoised within one process
    monkeypatch.setattr(config, "_claimed", {})  # a second process starting in the same second
    second = config.unique_dir("outputs/2026-01-01/10-00-00")
    assert first == "outputs/2026-01-01/10-00-00" and second == first + "-1"
    assert (tmp_path / first).is_dir() and (tmp_path / second).is_dir()


def test_two_processes_started_together_get_two_folders(tmp_path):
    code = textwrap.dedent("""
        import sys; sys.path.insert(0, %r)
        from gpt.config import unique_dir
        print(unique_dir("outputs/same"))
    """ % os.getcwd())
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    names = sorted(p.communicate()[0].strip() for p in procs)
    assert len(set(names)) == 4 and names[0] == "outputs/same"


def test_user_error_found_through_exception_chain():
    try:
        try:
            raise UserError("bad value")
        except UserError as inner:
            raise RuntimeError("wrapped by instantiate") from inner
    except RuntimeError as outer:
        found = config.user_error_in(outer)
    assert isinstance(found, UserError) and str(found) == "bad value"
    assert config.user_error_in(ValueError("other")) is None


def test_entry_turns_user_error_into_one_line_and_exit_2(capsys):
    @config.entry
    def job(cfg):
        raise UserError("model.n_embd=100 is not divisible by model.n_head=3")

    with pytest.raises(SystemExit) as exc:
        job(None)
    assert exc.value.code == 2
    assert capsys.readouterr().err == "error: model.n_embd=100 is not divisible by model.n_head=3\n"


def test_entry_reraises_other_errors():
    @config.entry
    def job(cfg):
        raise KeyError("a bug, not bad input")

    with pytest.raises(KeyError):
        job(None)


def test_finetune_data_file_shorthand_rewrites_only_data_overrides():
    from gpt.config import file_shorthand

    argv = ["finetune.py", "stage=sft", "data=task/sft.jsonl", "data.val_path=v.jsonl", "+data=x", "metadata=1"]
    assert file_shorthand(argv) == ["finetune.py", "stage=sft", "data.path=task/sft.jsonl", "data.val_path=v.jsonl",
                                    "+data=x", "metadata=1"]
    assert file_shorthand(["f.py", "-m", "data=a.jsonl,b.jsonl"])[-1] == "data.path=a.jsonl,b.jsonl"
