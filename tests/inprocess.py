"""Run an entry script (or a `python -m` module) in the test process instead of a new Python: the same code path
as a subprocess from sys.argv on, without paying torch's import (~2 s) per run. The result has the shape of
subprocess.run's (returncode, stdout, stderr), so a test written against conftest.run_script reads it unchanged.

Use it for runs that end quickly (refusals, one-line errors, tiny runs); keep subprocesses for what needs a
process of its own: signals, kills, torchrun, servers, timeouts, and anything that must not share this
process's state."""

from __future__ import annotations

import atexit
import contextlib
import io
import logging
import os
import runpy
import subprocess
import sys
import warnings
from pathlib import Path

import torch

from conftest import ROOT


@contextlib.contextmanager
def _saved_logging():
    """Hydra configures logging per job (handlers on the root and `gpt` loggers): put back what was there."""
    loggers = [logging.getLogger(), *(logging.getLogger(n) for n in list(logging.root.manager.loggerDict))]
    saved = [(lg, list(lg.handlers), lg.level, lg.propagate, lg.disabled) for lg in loggers]
    try:
        yield
    finally:
        for lg, handlers, level, propagate, disabled in saved:
            lg.handlers[:] = handlers
            lg.setLevel(level)
            lg.propagate, lg.disabled = propagate, disabled


@contextlib.contextmanager
def _own_handler_list():
    """The run sees only the log handlers it creates, as in a process of its own: Hydra's job logging
    (logging.config.dictConfig) and logging.shutdown() close every handler in logging's process-wide list, and
    some handlers close the stream they hold (absl's, which rouge-score imports); one made by a test earlier
    holds pytest's capture of stderr, and closing it ends the session in 'I/O operation on closed file'. The
    run's handlers are closed when it ends, as at the exit of its process, and leave the list."""
    with logging._lock:
        saved, named = logging._handlerList[:], dict(logging._handlers)
        del logging._handlerList[:]
    try:
        yield
    finally:
        with logging._lock:
            made = logging._handlerList[:]
            logging._handlerList[:] = saved
            logging._handlers.clear()
            logging._handlers.update(named)
        logging.shutdown(made)


def _check_open(streams: dict, target: str) -> None:
    """Fail the run that closed a stream it did not own (e.g. pytest's capture of stderr), naming it; later
    tests would otherwise fail far from the cause, or pytest itself with 'lost sys.stderr'."""
    closed = [name for name, stream in streams.items() if getattr(stream, "closed", False)]
    assert not closed, f"running {target} closed {', '.join(closed)} of the test process"


def run_here(target: str, *args: str, cwd: Path, env: dict | None = None,
             timeout: int | None = None) -> subprocess.CompletedProcess:
    """`target` is an entry script of the project (train.py, ...) or "-m" followed by a module in `args`.
    `timeout` is accepted so that a call written for conftest.run_script reads the same, and not enforced: a run
    that must be stopped from outside needs a process of its own."""
    from hydra.core.global_hydra import GlobalHydra

    from gpt import config

    module = target == "-m"
    argv = [*args] if module else [str(ROOT / target), *args]
    out, err = io.StringIO(), io.StringIO()
    streams = {"sys.stdout": sys.stdout, "sys.stderr": sys.stderr, "sys.__stdout__": sys.__stdout__,
               "sys.__stderr__": sys.__stderr__}
    old_argv, old_cwd, old_env = sys.argv, os.getcwd(), dict(os.environ)
    # one intra-op thread unless the caller says otherwise, as conftest.run_script gives a subprocess (a module
    # fixture runs before the per-test one-thread fixture, with torch's default of one thread per core)
    threads = torch.get_num_threads()
    torch.set_num_threads(int({"OMP_NUM_THREADS": "1", **os.environ, **(env or {})}["OMP_NUM_THREADS"]))
    code = 0
    config._claimed.clear()  # a new process would start with nothing claimed
    GlobalHydra.instance().clear()
    os.environ.update(env or {})
    os.chdir(cwd)
    sys.argv = argv
    at_exit = []  # what the run registers with atexit runs when it ends, as at the end of its process
    real_register = atexit.register
    atexit.register = lambda fn, *a, **k: at_exit.append((fn, a, k)) or fn
    try:
        with _saved_logging(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                _own_handler_list(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*found in sys.modules", RuntimeWarning)  # runpy: gpt.x imported before
            try:
                if module:
                    runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
                else:
                    runpy.run_path(argv[0], run_name="__main__")
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if isinstance(e.code, str):
                    err.write(e.code + "\n")
            except Exception:  # a traceback, as a subprocess would print it
                import traceback

                traceback.print_exc(file=err)
                code = 1
            for fn, a, k in reversed(at_exit):
                fn(*a, **k)
    finally:
        atexit.register = real_register
        torch.set_num_threads(threads)
        sys.argv = old_argv
        os.chdir(old_cwd)
        os.environ.clear()
        os.environ.update(old_env)
        GlobalHydra.instance().clear()
    _check_open(streams, " ".join(argv))
    return subprocess.CompletedProcess([sys.executable, *argv], code, out.getvalue(), err.getvalue())
