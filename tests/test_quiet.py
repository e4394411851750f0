"""Output read by a person or a log file: a training run whose stdout and stderr are pipes (a CI log, `> run.log`,
a cluster job) carries no terminal colour codes and no progress-bar redraws."""

import re

import pytest

from conftest import TINY, run_script

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(scope="module")
def piped_run(tmp_path_factory):
    proc = run_script("train.py", *TINY, cwd=tmp_path_factory.mktemp("quiet"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_no_colour_codes_when_not_a_terminal(piped_run):
    for name, text in (("stdout", piped_run.stdout), ("stderr", piped_run.stderr)):
        assert not ANSI.search(text), f"{name}: {ANSI.search(text).group()!r} in {text[:2000]!r}"
    assert "val loss" in piped_run.stdout  # the summary is there, and read above


@pytest.mark.slow
def test_no_progress_bar_redraws_when_not_a_terminal(piped_run):
    text = piped_run.stdout + piped_run.stderr
    assert "\r" not in text, text[:2000]  # each redraw of a bar is a carriage return, a whole log line in a file
    assert "it/s" not in text
    assert re.search(r"step \d+/\d+: train/loss \d+\.\d{4}  lr ", text), text[:2000]  # progress as log lines
    # with the time the loop waited for its batches, so a user sees whether input is the bottleneck
    assert re.search(r"tokens/s  data \d+\.\d ms/step \(\d+%\)", text), text[:2000]
