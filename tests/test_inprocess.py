"""Running an entry point inside the test process (inprocess.run_here, gpt.config.entry) closes only what the run
made. Logging has one process-wide list of handlers; Hydra's job logging (logging.config.dictConfig) and
logging.shutdown() close all of them, and some handlers close the stream they hold (absl's, which rouge-score
imports). When a test imported rouge-score before such a run, the run closed pytest's capture of stderr and every
later test failed with 'I/O operation on closed file' (pytest itself with 'lost sys.stderr')."""

import io
import logging
import sys

import pytest

from gpt import config
from gpt.errors import UserError
from inprocess import run_here


class _ClosesItsStream(logging.StreamHandler):
    """Like absl's handler: closing it closes the stream it was given."""

    def close(self):
        self.stream.close()
        super().close()


class _Marked(io.StringIO):
    """A stream of the test process that a run can find (by its class name) and close."""


@pytest.fixture
def outside():
    """A handler made by the test process (so in logging's process-wide list), on a stream of its own."""
    handler = _ClosesItsStream(io.StringIO())
    yield handler
    handler.close()


def test_a_run_closes_only_the_handlers_it_made(outside, tmp_path):
    before = list(logging._handlerList)
    proc = run_here("infer.py", f"ckpt={tmp_path / 'missing.pt'}", cwd=tmp_path)  # Hydra's job logging, error path
    assert proc.returncode == 2 and proc.stderr.startswith("error:"), proc.stderr
    assert not outside.stream.closed
    assert logging._handlerList == before  # the run's handlers were closed with it, as at its process's exit


def test_entry_closes_the_job_log_file_and_no_other_handler(outside, tmp_path, capsys):
    root = logging.getLogger()
    log_file = logging.FileHandler(tmp_path / "job.log")  # as Hydra's job logging puts on the root logger
    root.addHandler(log_file)

    @config.entry
    def job(cfg):
        raise UserError("bad value")

    try:
        with pytest.raises(SystemExit):
            job(None)
        assert capsys.readouterr().err == "error: bad value\n"
        assert not outside.stream.closed
        assert log_file.stream is None and log_file not in root.handlers  # closed, and not reopened by a later record
    finally:
        root.removeHandler(log_file)
        log_file.close()


def test_a_run_that_closes_a_stream_of_the_test_process_fails_naming_it(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "stdout", _Marked())
    script = tmp_path / "closer.py"
    script.write_text("import gc\nfor o in gc.get_objects():\n"
                      "    if type(o).__name__ == '_Marked':\n        o.close()\n")
    with pytest.raises(AssertionError, match=r"closer\.py closed sys\.stdout of the test process"):
        run_here(str(script), cwd=tmp_path)
