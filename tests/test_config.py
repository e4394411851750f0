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


# ---- values taken literally from the command line (gpt.config.literal_overrides) -------------------------

NASTY = ["今天", "今天 天气 如何", "a b", "a=b", "a,b", "[1, 2]", "{a: 1}", "it's \"x\"", "'single' quotes", "say \"double\"", "'a' \"b\"",
         "~/x", "$HOME", "${oc.env:HOME}", "\\${x}", "\\\\${x}", "${", "a\\", "a\\\\", "\\", "\\'", "a\nb",
         "x\\'y", "tab\there", "null", "true", "1e3", "choice(a,b)", "#c", "", " ", "a\\${x}\\"]


def _compose(name: str, argv: list[str]):
    return _compose_many(name, [argv])[0]


def _compose_many(name: str, argvs: list[list[str]]) -> list:
    """conf/<name>.yaml composed with each command line, rewritten as the entry scripts rewrite sys.argv."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    config.register_resolvers()
    conf = Path(__file__).resolve().parents[1] / "gpt" / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return [compose(name, overrides=config.literal_overrides([f"{name}.py", *argv])[1:]) for argv in argvs]


def test_free_text_reaches_the_program_unchanged():
    """Quotes, backslashes (trailing too), newlines, brackets, commas and `${...}` (not interpolated)."""
    paths = [t for t in NASTY if "," not in t and "$" not in t]  # a comma sweeps paths, ${ interpolates in them
    infer = _compose_many("infer", [[f"prompt={t}"] + ([f"ckpt={t}x"] if t in paths else []) for t in NASTY])
    assert [c.prompt for c in infer] == NASTY and all(isinstance(c.prompt, str) for c in infer)
    assert [c.ckpt for c in infer] == [t + "x" if t in paths else None for t in NASTY]
    some = ["今天 天气", "a=b, [c] 'd' \"e\"", "${oc.env:HOME}\\", "a\nb"]  # the other free-text keys: same rewrite
    assert [c.samples.prompt for c in _compose_many("evaluate", [[f"samples.prompt={t}"] for t in some])] == some
    assert [c.stage.sample_prompt for c in _compose_many("train", [[f"stage.sample_prompt={t}"] for t in some])] == some


def test_a_value_quoted_whole_keeps_meaning_its_text():
    """The older form prompt='"..."' (a Hydra quoted string as the whole value) still gives the text inside."""
    assert _compose("infer", ['prompt="3+4="']).prompt == "3+4="
    assert _compose("infer", ["prompt='it\\'s'"]).prompt == "it's"
    assert _compose("infer", ['prompt="a" and "b"']).prompt == '"a" and "b"'  # not one quoted string: literal


def test_paths_are_literal_but_sweep_on_commas_and_interpolate(monkeypatch):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = _compose("train", ["data=text", "data.path=~/corpus/", "resume=runs/a b [1]"])
    assert cfg.data.path == "~/corpus/" and cfg.resume == "runs/a b [1]"
    assert _compose("train", ["resume=null"]).resume is None
    monkeypatch.setenv("GPT_TEST_DATA", "/data")
    assert _compose("train", ["data=text", "data.path=${oc.env:GPT_TEST_DATA}/x.txt"]).data.path == "/data/x.txt"
    assert _compose("finetune", ["ckpt=~/runs/p", "data.path=~/f.jsonl"]).ckpt == "~/runs/p"
    # values Hydra reads as typed pass unchanged (the job's recorded overrides and sweep labels stay as typed)
    plain = ["evaluate.py", "-m", "ckpt=/r/run,/r/run/checkpoints/last.pt", "prompt=ROMEO:", "instructions=qa.jsonl"]
    assert config.literal_overrides(plain) == plain
    # evaluate.py -m ckpt=<a>,<b>: still a sweep with one job per path
    (sweep,) = config.literal_overrides(["evaluate.py", "-m", "ckpt=~/a,runs/b c"])[2:]
    parser = OverridesParser.create()
    parsed = parser.parse_override(sweep)
    jobs = [parser.parse_override(f"ckpt={v}").value() for v in parsed.sweep_string_iterator()]  # each job's override
    assert parsed.is_sweep_override() and jobs == ["~/a", "runs/b c"]


def test_other_values_hydra_cannot_read_reach_validation():
    """A value Hydra's grammar refuses becomes text, so validation names its key instead of a parser error."""
    from gpt.schema import validate

    cfg = _compose("infer", ["ckpt=x", "temperature=1=2"])
    with pytest.raises(UserError, match=r"^temperature='1=2' must be a number >= 0$"):
        validate(cfg, "infer")
    # sweeps, lists and flags of other keys pass unchanged
    argv = ["train.py", "-m", "optimizer.lr=1e-3,3e-4", "optimizer.betas=[0.9,0.95]", "+x=1", "~y", "hydra.run.dir=a"]
    assert config.literal_overrides(argv) == argv


def test_entry_turns_an_unset_value_into_one_line(capsys):
    from omegaconf import OmegaConf

    @config.entry
    def job(cfg):
        return cfg.data.path  # read before validation could see it (outside Hydra, validation is skipped)

    with pytest.raises(SystemExit) as exc:
        job(OmegaConf.create({"data": {"path": "???"}}))
    assert exc.value.code == 2
    assert capsys.readouterr().err == "error: data.path is not set; pass data.path=<file, folder or glob>\n"


def test_torchrun_run_folder_note_is_removed_once_every_local_rank_read_it(tmp_path, monkeypatch):
    """Local rank 0 publishes the run folder in a temp file; the last of the other local ranks removes it."""
    import tempfile

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    names = []
    for rank, files in (("0", 1), ("2", 2), ("1", 0)):  # note; note + rank 2's read mark; nothing
        monkeypatch.setattr(config, "_claimed", {})  # one process each: the memo starts empty
        monkeypatch.setenv("LOCAL_RANK", rank)
        names.append(config.unique_dir("outputs/day/time"))
        assert len(list((tmp_path / "tmp").glob("gpt-rundir-job-*"))) == files
    assert names == ["outputs/day/time"] * 3




@pytest.mark.parametrize("hardware", ["ddp", "fsdp"])
def test_multi_process_presets_use_gpu_only_settings_on_a_gpu_only(hardware, monkeypatch):
    """hardware=ddp/fsdp: fused AdamW and pinned batches follow the machine (as device=auto does): off on this CPU,
    on where CUDA is available; the optimizer receives the resolved value."""
    import torch

    cpu = _compose("train", [f"hardware={hardware}", "optimizer=adamw"])
    assert (cpu.hardware.fused_adamw, cpu.hardware.pin_memory, cpu.optimizer.fused, cpu.stage.pin_memory) == (
        False, False, False, False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = _compose("train", [f"hardware={hardware}", "optimizer=adamw"])
    assert (gpu.hardware.fused_adamw, gpu.hardware.pin_memory, gpu.optimizer.fused, gpu.stage.pin_memory) == (
        True, True, True, True)
