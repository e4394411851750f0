"""benchmarks/bench_serve.py runs end to end on a tiny model (its smoke command) and reports what README's
serving table is made of: each mode's row, the continuous / static ratio of every round and the step fit."""

import re
import subprocess
import sys

import pytest

from conftest import ROOT

pytest.importorskip("fastapi")


@pytest.mark.slow
def test_bench_serve_smoke_run_reports_every_mode_and_the_ratios(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_serve.py"), "--n-layer", "1", "--n-head",
                           "2", "--n-embd", "32", "--vocab", "256", "--block-size", "128", "--requests", "12",
                           "--concurrency", "4", "--max-tokens", "4", "24", "--rounds", "2"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| (continuous|static|one-at-a-time) \|.*$", out, re.M)}
    assert set(rows) == {"continuous", "static", "one-at-a-time"}
    steps = {mode: int(row.rstrip(" |").rsplit("|", 1)[1]) for mode, row in rows.items()}
    new_tokens = int(re.search(r"\((\d+) new tokens in all\)", out).group(1))
    # one at a time decodes one token per step; batching takes fewer steps, continuous the fewest
    assert steps["one-at-a-time"] == new_tokens and steps["continuous"] <= steps["static"] < new_tokens
    assert re.search(r"round by round: \d+\.\d\dx, \d+\.\d\dx; median \d+\.\d\dx", out)
    assert "cpu, " in out and "threads" in out
