"""End-to-end runs of the real entry scripts (train.py, infer.py) on tiny configs in temp folders."""

import glob
import json
from pathlib import Path

import pytest
import torch

from conftest import TINY, run_script
from inprocess import run_here
from gpt.runs import read_metrics
from wandb_records import read_wandb_exit_code, read_wandb_history

pytestmark = pytest.mark.slow


def only_run_dir(base: Path) -> Path:
    runs = [Path(p) for p in glob.glob(str(base / "outputs" / "*-*-*" / "*"))]
    assert len(runs) == 1, runs
    return runs[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny training run shared by the tests that inspect or use its outputs."""
    cwd = tmp_path_factory.mktemp("train")
    proc = run_here("train.py", *TINY, "seed=7", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd, only_run_dir(cwd), proc


def test_train_writes_run_folder(trained):
    _, run, proc = trained
    assert (run / ".hydra" / "config.yaml").is_file()
    assert (run / "train.log").is_file() and "val/loss" in (run / "train.log").read_text()
    rows = read_metrics(run / "metrics.jsonl")
    assert any("train/loss" in r for r in rows) and any("val/loss" in r for r in rows)
    assert [r["step"] for r in rows if "val/loss" in r] == [3, 6]
    assert "unigram baseline" in proc.stdout and "val loss" in proc.stdout


def test_checkpoint_embeds_resolved_config(trained):
    _, run, _ = trained
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(run / "checkpoints" / name, weights_only=True)
        for key in ("model", "optimizer", "step", "best_val_loss", "config", "tokenizer", "scheduler", "rng"):
            assert key in ckpt, key
        cfg = ckpt["config"]
        assert type(cfg) is dict and type(cfg["model"]) is dict
        assert cfg["model"]["n_layer"] == 2 and cfg["seed"] == 7
        assert cfg["model"]["vocab_size"] == len(ckpt["tokenizer"]["chars"]) == cfg["tokenizer"]["vocab_size"]
        assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert last["step"] == 6
    assert not list((run / "checkpoints").glob(".*tmp*"))  # atomic writes leave no temp files


def test_infer_from_run_folder(trained):
    cwd, run, _ = trained
    args = [f"ckpt={run}", "prompt=ROMEO:", "max_new_tokens=30", "seed=3", "dtype=float32"]
    folders = sorted(p for p in cwd.rglob("*") if p.is_dir())
    a = run_here("infer.py", *args, cwd=cwd)
    assert a.returncode == 0, a.stderr
    assert a.stdout.startswith("ROMEO:") and len(a.stdout) >= len("ROMEO:") + 30
    b = run_here("infer.py", *args, "use_cache=false", cwd=cwd)
    assert b.stdout == a.stdout  # KV cache and uncached paths sample the same tokens
    c = run_here("infer.py", *args, "num_samples=2", "top_p=0.9", cwd=cwd)
    assert c.returncode == 0 and c.stdout.count("ROMEO:") == 2
    assert sorted(p for p in cwd.rglob("*") if p.is_dir()) == folders  # infer.py makes no run folder (nor any)


def test_infer_long_prompt_is_cropped(trained):
    cwd, run, _ = trained
    proc = run_here("infer.py", f"ckpt={run}", "prompt=" + "a" * 100, "max_new_tokens=5", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    assert "block_size=32" in proc.stderr


def test_resume_equals_uninterrupted(tmp_path):
    common = [*TINY, "model.dropout=0.1", "trainer.eval_interval=4", "scheduler.schedule.total_iters=8",
              "scheduler.schedule.warmup_iters=2"]
    (tmp_path / "full").mkdir()
    full = run_here("train.py", *common, "trainer.max_iters=8", cwd=tmp_path / "full")
    assert full.returncode == 0, full.stderr[-2000:]
    half_dir = tmp_path / "half"
    half_dir.mkdir()
    half = run_here("train.py", *common, "trainer.max_iters=4", cwd=half_dir)
    assert half.returncode == 0, half.stderr[-2000:]
    first = only_run_dir(half_dir)
    resumed = run_here("train.py", *common, "trainer.max_iters=8", f"resume={first}", cwd=half_dir)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert only_run_dir(half_dir) == first  # continued in its own folder
    a = read_metrics(only_run_dir(tmp_path / "full") / "metrics.jsonl")
    b = read_metrics(first / "metrics.jsonl")
    final = lambda rows, key: [r[key] for r in rows if key in r and r["step"] == 8][0]  # noqa: E731
    assert final(b, "val/loss") == final(a, "val/loss")
    assert final(b, "train/loss") == final(a, "train/loss")
    assert torch.load(first / "checkpoints" / "last.pt", weights_only=True)["resumed_from"].startswith(str(first))


def test_sweep_runs_each_job_in_its_own_folder(tmp_path):
    proc = run_here("train.py", "-m", *TINY, "optimizer.lr=1e-3,3e-4", "trainer.max_iters=3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    jobs = sorted(glob.glob(str(tmp_path / "multirun" / "*" / "*" / "[0-9]")))
    assert len(jobs) == 2
    lrs = []
    for job in jobs:
        ckpt = torch.load(Path(job) / "checkpoints" / "last.pt", weights_only=True)
        lrs.append(ckpt["config"]["optimizer"]["lr"])
    assert sorted(lrs) == [3e-4, 1e-3]


def test_optuna_search_preset(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    proc = run_here("train.py", "hparams_search=optuna", *TINY, "trainer.max_iters=3",
                      "hydra.sweeper.n_trials=2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = list((tmp_path / "multirun").glob("*/*/optimization_results.yaml"))
    assert len(result) == 1 and "best_value" in result[0].read_text()


def test_ddp_two_processes_on_cpu(tmp_path):
    tmp = tmp_path / "tmp"  # where local rank 0 publishes the run folder for the other local ranks
    tmp.mkdir()
    proc = run_script("train.py", *TINY, "hardware=ddp", cwd=tmp_path,
                      prefix=["torchrun", "--standalone", "--nproc_per_node=2"],
                      env={"OMP_NUM_THREADS": "1", "TMPDIR": str(tmp)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = only_run_dir(tmp_path)  # one run folder for both ranks
    assert not list(tmp.glob("gpt-rundir-*"))  # and the note that named it is gone
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == 6
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows if "val/loss" in r] == [3, 6]  # written by rank 0 only
    # both ranks' tokens are counted: 2 ranks x batch 4 x block 32 per step
    assert [r["train/tokens"] for r in rows if "train/tokens" in r][0] == 2 * 2 * 4 * 32


def test_wandb_offline_run_can_be_read_back(tmp_path):
    proc = run_script("train.py", *TINY, "logger=wandb", "logger.mode=offline", "logger.tags=[test]", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = only_run_dir(tmp_path)
    files = glob.glob(str(run / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1
    history = read_wandb_history(files[0])
    logged = {r["_step"]: r["val/loss"] for r in history if "val/loss" in r}
    ours = {r["step"]: r["val/loss"] for r in read_metrics(run / "metrics.jsonl") if "val/loss" in r}
    assert logged == pytest.approx(ours) and set(logged) == {3, 6}
    assert any("train/loss" in r and "train/lr" in r and "train/tokens_per_sec" in r for r in history)
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["logger"]["run_id"] and ckpt["logger"]["run_id"] in files[0]


def test_text_data_with_gpt2_tokenizer(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"doc{i}.txt").write_text("The quick brown fox jumps over the lazy dog. " * 200 + f"Doc {i}.")
    proc = run_here("train.py", *TINY, "data=text", f"data.path={corpus}", "tokenizer=gpt2", "trainer.max_iters=3",
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpt = torch.load(only_run_dir(tmp_path) / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["tokenizer"] == {"type": "tiktoken", "name": "gpt2"}
    assert ckpt["config"]["model"]["vocab_size"] == 50257
    out = run_here("infer.py", f"ckpt={only_run_dir(tmp_path)}", "prompt=The quick", "max_new_tokens=5", cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.startswith("The quick")


@pytest.mark.parametrize("args, message", [
    (["model.n_embd=100", "model.n_head=3"], "n_embd=100 is not divisible by model.n_head=3"),
    (["data=text", "data.path=/no/such/file.txt"], "data.path='/no/such/file.txt' matches no file"),
    # one AdamW step of size ~lr moves every weight by ~1e30: the next loss overflows, whatever the seed or CPU
    (["optimizer=adamw", "optimizer.lr=1e30", "trainer.grad_clip=0"], "at step 2; lower optimizer.lr or set trainer.grad_clip (now 0)"),
    (["trainer.max_iters=0"], "trainer.max_iters=0 must be a positive integer"),
    (["resume=/no/such/run"], "does not exist"),
])
def test_bad_training_input_is_one_clear_line(tmp_path, args, message):
    proc = run_here("train.py", *TINY, *args, cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, proc.stderr
    assert not (tmp_path / "outputs").exists()  # no run folder, no empty date folder


def test_unknown_group_option_lists_choices(tmp_path):
    proc = run_here("train.py", "model=gpt5", cwd=tmp_path)
    assert proc.returncode != 0
    assert "Available options" in proc.stderr and "gpt2_small" in proc.stderr and "nano" in proc.stderr
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("ckpt, message", [
    ("/no/such/ckpt.pt", "does not exist"),
    ("__self__", "is not a checkpoint file"),
])
def test_bad_checkpoint_for_infer(tmp_path, ckpt, message):
    if ckpt == "__self__":
        ckpt = str(tmp_path / "notes.pt")
        Path(ckpt).write_text("not a checkpoint")
    proc = run_here("infer.py", f"ckpt={ckpt}", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert message in proc.stderr.strip().splitlines()[-1]


def test_checkpoint_without_required_keys_is_refused(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    proc = run_here("infer.py", f"ckpt={path}", cwd=tmp_path)
    assert proc.returncode == 2 and "is not a checkpoint of this project" in proc.stderr


def test_config_composes_every_option():
    """Every option of every group composes and names an importable target."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import get_object

    from gpt.config import register_resolvers

    register_resolvers()
    root = Path(__file__).resolve().parents[1] / "gpt" / "conf"
    with initialize_config_dir(config_dir=str(root), version_base="1.3"):
        for group in ("model", "tokenizer", "data", "optimizer", "scheduler", "stage", "logger"):
            for option in sorted(p.stem for p in (root / group).glob("*.yaml")):
                cfg = compose("train", overrides=[f"{group}={option}"])
                target = cfg[group]["_target_"]
                assert callable(get_object(target))
        cfg = compose("train", overrides=["model=gpt2_xl"])
        assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd) == (48, 25, 1600)
        json.dumps(dict(cfg.trainer))


def test_failing_job_still_closes_its_wandb_run(tmp_path):
    # a learning rate this large makes the loss non-finite within a few steps: the run fails cleanly
    proc = run_script("train.py", *TINY, "logger=wandb", "logger.mode=offline", "optimizer=adamw", "optimizer.lr=1e12",
                      "trainer.grad_clip=0", "optimizer.weight_decay=0", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "training loss became" in proc.stderr.strip().splitlines()[-1]
    files = glob.glob(str(tmp_path / "outputs" / "*" / "*" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1
    assert read_wandb_exit_code(files[0]) == 1
