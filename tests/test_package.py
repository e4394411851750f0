"""The installable package: the wheel built from this checkout, installed into a fresh venv, runs from any folder.

The venv sees the dependencies already installed here (a .pth file naming this interpreter's site-packages;
nothing is downloaded) but not the checkout: `import gpt` must resolve inside the venv, so the wheel has to
carry everything the console scripts read at run time (gpt/conf above all).
"""

import json
import os
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow

SCRIPTS = ("gpt-train", "gpt-finetune", "gpt-infer", "gpt-evaluate", "gpt-serve", "gpt-lora", "gpt-quantize",
           "gpt-interop", "gpt-runs", "gpt-prepare", "gpt-lm-eval", "gpt-tokenizer")
TINY = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.block_size=32", "trainer.max_iters=2",
        "trainer.eval_interval=2", "trainer.eval_iters=1", "trainer.batch_size=2", "stage.sample_tokens=5"]


def _check(cmd: list, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=180, **kw)
    assert proc.returncode == 0, f"{cmd}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def _wheel(tmp: Path) -> Path:
    """Build the wheel from a copy of the sources (an in-tree build would leave build/ in the checkout, and
    stale files there would end up in later wheels)."""
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "gpt", src / "gpt", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _check([sys.executable, "-m", "pip", "wheel", src, "--no-deps", "--no-build-isolation", "--no-index", "-q",
            "-w", tmp / "dist"])
    (wheel,) = (tmp / "dist").glob("gpt_pipeline-*.whl")
    return wheel


def _venv(tmp: Path, wheel: Path) -> Path:
    """A fresh venv holding only the wheel; the third-party packages come from this interpreter's
    site-packages through a .pth file (the editable install of the checkout there is a .pth of its own,
    which a path listed in a .pth does not run)."""
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    own = Path(_check([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip())
    (own / "deps.pth").write_text("\n".join(p for p in site.getsitepackages() if Path(p).is_dir()) + "\n")
    _check([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel])
    return env_dir


def test_wheel_installs_and_its_console_scripts_train_and_sample_from_another_folder(tmp_path):
    env_dir = _venv(tmp_path, _wheel(tmp_path))
    bin_dir = env_dir / "bin"
    work, home = tmp_path / "elsewhere", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "GPT_CACHE_DIR", "VIRTUAL_ENV")}
    env.update(HOME=str(home), PATH=f"{bin_dir}{os.pathsep}{env['PATH']}")
    env.setdefault("MPLCONFIGDIR", str(tmp_path / "mpl"))
    run = lambda *cmd: _check(list(cmd), cwd=work, env=env)  # noqa: E731

    probe = run(bin_dir / "python", "-c", "import gpt, gpt.cli; from importlib.metadata import entry_points; "
                "eps = [e for e in entry_points(group='console_scripts') if e.value.startswith('gpt.')]; "
                "[e.load() for e in eps]; print(gpt.__file__); print(' '.join(sorted({e.name for e in eps})))")
    where, names = probe.stdout.split("\n")[:2]
    assert Path(where).resolve().is_relative_to(env_dir.resolve()), f"gpt imported from {where}, not the venv"
    assert sorted(names.split()) == sorted(SCRIPTS)  # every console script names a function that imports
    assert all((bin_dir / name).is_file() for name in SCRIPTS)

    train = run(bin_dir / "gpt-train", *TINY)
    (run_dir,) = (work / "outputs").glob("*-*-*/*")  # the run folder is under the current folder, as with train.py
    assert (run_dir / "checkpoints" / "best.pt").is_file() and (run_dir / "train.log").is_file()
    assert str(run_dir) in train.stdout
    assert any((home / ".cache" / "gpt-pipeline").iterdir())  # token caches in ~/.cache/gpt-pipeline

    listing = run(bin_dir / "gpt-runs", "--json")  # reads the run folders under the current folder
    assert [r["folder"] for r in json.loads(listing.stdout)] == [str(run_dir.relative_to(work))]

    infer = run(bin_dir / "gpt-infer", f"ckpt={run_dir}", "prompt=a", "max_new_tokens=3")
    assert infer.stdout.startswith("a") and len(infer.stdout) > 1  # the prompt, then the sampled characters

    bad = subprocess.run([bin_dir / "gpt-train", "optimizer.lr=-1"], cwd=work, env=env, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "error: optimizer.lr=-1 must be a positive number" in bad.stderr
