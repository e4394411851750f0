"""End-to-end: pretrain a tiny model on the arithmetic task, fine-tune it with finetune.py, chat with infer.py.

The chain's runs are small but long enough, and seeded, for the directions the stages promise to show:
SFT exact match on held-out questions above the pretrained model's, reward model pairwise accuracy above
chance, DPO preference accuracy rising, PPO and GRPO mean reward rising."""

import glob
from pathlib import Path

import pytest
import torch

from conftest import run_script
from gpt.checkpoint import file_sha256
from gpt.tasks.arithmetic import write_task
from gpt.tasks.demo import exact_match
from gpt.tracking import read_metrics

pytestmark = pytest.mark.slow

# a 2-layer, 64-wide char model on the hi=20 task (441 questions, 44 held out)
PRETRAIN = ["model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=32", "trainer.max_iters=300",
            "trainer.eval_interval=300", "trainer.eval_iters=2", "trainer.log_interval=50", "trainer.batch_size=32",
            "stage.sample_tokens=20", "hardware.autocast_dtype=float32", "seed=0"]
COMMON = ["scheduler.schedule.warmup_iters=5", "trainer.eval_iters=4", "trainer.log_interval=10",
          "trainer.batch_size=16", "hardware.autocast_dtype=float32", "seed=0"]
FT = ["trainer.max_iters=60", "trainer.eval_interval=30", "optimizer.lr=3e-3", *COMMON]
SFT = ["trainer.max_iters=600", "trainer.eval_interval=300", "optimizer.lr=3e-3", "stage.eval_examples=44",
       *COMMON[:3], "trainer.batch_size=32", *COMMON[4:]]


def runs(base: Path) -> list[Path]:
    return sorted(Path(p) for p in glob.glob(str(base / "outputs" / "*" / "*")))


def evals(run: Path, key: str) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if r.get(key) is not None]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Task files, a tiny pretrained model and an SFT run from it (shared by the tests below)."""
    cwd = tmp_path_factory.mktemp("ft")
    files = write_task(cwd / "task", n=441, seed=0, hi=20)
    proc = run_script("train.py", *PRETRAIN, "data=text", f"data.path={files['pretrain']}", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (pre,) = runs(cwd)
    proc = run_script("finetune.py", "stage=sft", f"ckpt={pre}", f"data={files['sft_train']}",
                      f"data.val_path={files['sft_val']}", *SFT, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sft = [r for r in runs(cwd) if r != pre][0]
    return cwd, files, pre, sft, proc


def test_sft_run_writes_checkpoint_with_lineage_and_chat_tokens(chain):
    cwd, files, pre, sft, proc = chain
    ckpt = torch.load(sft / "checkpoints" / "last.pt", weights_only=True)
    parent_file = pre / "checkpoints" / "best.pt"
    assert ckpt["stage"] == "sft" and ckpt["config"]["stage"]["_target_"] == "gpt.stages.sft.SFT"
    assert ckpt["lineage"]["parent"] == str(parent_file)
    assert ckpt["lineage"]["parent_sha256"] == file_sha256(parent_file)
    assert "<|assistant|>" in ckpt["tokenizer"]["special"]
    assert ckpt["config"]["model"]["vocab_size"] == ckpt["model"]["lm_head.weight"].shape[0] \
        == len(ckpt["tokenizer"]["chars"]) + len(ckpt["tokenizer"]["special"])
    rows = evals(sft, "val/exact_match")
    assert [r["step"] for r in rows] == [300, 600] and rows[-1]["val/loss"] < rows[0]["val/loss"]
    assert "val/exact_match" in proc.stdout


def test_sft_exact_match_on_held_out_questions_beats_the_pretrained_model(chain):
    """The issue's first claim: greedy exact match on the 44 held-out questions, the pretrained model scored
    both with the chat template (SFT's evaluation) and with the plain "a+b=" prompt it was trained on."""
    cwd, files, pre, sft, _ = chain
    questions = [{"prompt": c["prompt"], "completion": c["completion"]}
                 for c in map(__import__("json").loads, files["sft_val"].read_text().splitlines())]
    pretrained = max(exact_match(pre, questions, chat=True), exact_match(pre, questions, chat=False))
    tuned = exact_match(sft, questions, chat=True)
    assert tuned == pytest.approx(evals(sft, "val/exact_match")[-1]["val/exact_match"])  # the same measurement
    assert tuned >= pretrained + 0.1, (pretrained, tuned)


def test_infer_chat_applies_template_and_stops_at_end_of_answer(chain):
    cwd, _, pre, sft, _ = chain
    proc = run_script("infer.py", f"ckpt={sft}", 'prompt="3+4="', "chat=true", "temperature=0",
                      "max_new_tokens=20", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    answer = proc.stdout.rstrip("\n")
    assert "<|" not in answer and len(answer) < 20  # stopped at <|end|>, which is not printed
    proc = run_script("infer.py", f"ckpt={pre}", 'prompt="3+4="', "chat=true", cwd=cwd)
    assert proc.returncode == 2 and "needs a chat-tuned checkpoint" in proc.stderr


def test_bad_jsonl_names_file_and_line_and_writes_nothing(chain, tmp_path):
    _, _, pre, _, _ = chain
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "completion": "2"}\n{"prompt": "1+2="}\n')
    proc = run_script("finetune.py", "stage=sft", f"ckpt={pre}", f"data={bad}", *FT, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {bad}:2: missing key 'completion' (has ['prompt'])"
    assert not (tmp_path / "outputs").exists()  # no run folder, no empty date folder
    proc = run_script("finetune.py", "stage=sft", f"ckpt={tmp_path / 'nope.pt'}", f"data={bad}", cwd=tmp_path)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and runs(tmp_path) == []


def finetune(cwd: Path, *args: str) -> tuple[Path, object]:
    """Run finetune.py in `cwd`; -> (its new run folder, the finished process)."""
    before = set(runs(cwd))
    proc = run_script("finetune.py", *args, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (new,) = set(runs(cwd)) - before
    return new, proc


def test_dpo_from_sft_raises_preference_accuracy(chain):
    cwd, files, _, sft, _ = chain
    run, _ = finetune(cwd, "stage=dpo", f"ckpt={sft}", f"data={files['pairs_train']}",
                      f"data.val_path={files['pairs_val']}", "trainer.max_iters=80", "trainer.eval_interval=10",
                      "optimizer.lr=1e-4", *COMMON)
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["stage"] == "dpo" and ckpt["lineage"]["parent_stage"] == "sft"
    assert ckpt["lineage"]["parent_lineage"]["parent_stage"] == "pretrain"
    rows = evals(run, "val/accuracy")
    assert {"val/chosen_reward", "val/rejected_reward", "val/loss"} <= set(rows[-1])
    # implicit-reward accuracy on the 44 held-out pairs rises (seeded run: 0.59 at step 10 -> 0.77 at step 80)
    first, last = rows[0], rows[-1]
    assert last["val/accuracy"] >= first["val/accuracy"] + 0.05 and last["val/accuracy"] > 0.6
    assert last["val/loss"] < first["val/loss"]
    assert last["val/chosen_reward"] - last["val/rejected_reward"] > first["val/chosen_reward"] - first["val/rejected_reward"]


@pytest.fixture(scope="module")
def reward_run(chain):
    cwd, files, _, sft, _ = chain
    return finetune(cwd, "stage=reward", f"ckpt={sft}", f"data={files['pairs_train']}",
                    f"data.val_path={files['pairs_val']}", "trainer.max_iters=100", "trainer.eval_interval=50",
                    "optimizer.lr=1e-3", *COMMON)


def test_reward_model_reports_pairwise_accuracy_and_refuses_to_be_a_policy(chain, reward_run, tmp_path):
    cwd, files, _, sft, _ = chain
    run, proc = reward_run
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["stage"] == "reward" and ckpt["config"]["model"]["_target_"] == "gpt.heads.RewardModel"
    assert "head.weight" in ckpt["model"]
    rows = evals(run, "val/accuracy")
    assert len(rows) == 2 and "val/accuracy" in proc.stdout
    # pairwise accuracy on the 44 held-out pairs: well above chance, not falling
    assert rows[-1]["val/accuracy"] >= 0.65 and rows[-1]["val/accuracy"] >= rows[0]["val/accuracy"], rows
    # a reward model is not a language model to fine-tune: refused, and no run folder is left behind
    before = runs(cwd)
    proc = run_script("finetune.py", "stage=sft", f"ckpt={run}", f"data={files['sft_train']}", *FT, cwd=cwd)
    assert proc.returncode == 2 and "holds a gpt.heads.RewardModel (stage=reward); stage=sft needs" in proc.stderr
    assert runs(cwd) == before


RL = ["trainer.max_iters=16", "trainer.eval_interval=8", "trainer.log_interval=4", "optimizer.lr=1e-3",
      "scheduler.schedule.warmup_iters=2", "hardware.autocast_dtype=float32", "stage.eval_prompts=16"]


def first_prompts(files: dict, n: int = 32) -> Path:
    """The first n training prompts as their own file: a pool small enough for a 2-layer, 64-wide policy to
    improve on within a few dozen rollouts (on all 397 its gains on one rollout's prompts are undone on the others)."""
    path = files["prompts_train"].with_name(f"prompts_train_{n}.jsonl")
    path.write_text("".join(files["prompts_train"].read_text().splitlines(keepends=True)[:n]))
    return path


def window_means(run: Path, key: str) -> list[float]:
    """`key` per evaluation: the mean over the training steps since the previous evaluation."""
    return [r[key] for r in evals(run, key)]


def test_grpo_from_sft_raises_the_exact_match_reward(chain):
    cwd, files, _, sft, _ = chain
    run, proc = finetune(cwd, "stage=grpo", f"ckpt={sft}", f"data={first_prompts(files)}",
                         f"data.val_path={files['prompts_val']}", "trainer.max_iters=96", "trainer.eval_interval=24",
                         "optimizer.lr=3e-4", *COMMON, "stage.prompts_per_rollout=16", "stage.group_size=8",
                         "stage.minibatch_size=64", "stage.epochs=1", "stage.eval_prompts=44")
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["stage"] == "grpo" and ckpt["config"]["stage"]["group_size"] == 8
    rows = evals(run, "val/reward")
    assert [r["step"] for r in rows] == [24, 48, 72, 96]
    assert {"train/reward", "train/kl", "train/clip_fraction"} <= set(rows[-1])
    # the mean exact-match reward of the sampled answers (temperature 1), over the 12 rollouts (1536 answers)
    # of each window, rises from the first window to the last. Measured (seed 0, 1, 2): 0.415 -> 0.551,
    # 0.421 -> 0.583, 0.391 -> 0.524. The greedy held-out reward (val/reward, SFT's 0.27) does not rise
    # with it (0.18-0.23 at the end): what this policy learns on 32 prompts does not carry over
    reward = window_means(run, "train/reward")
    assert reward[-1] >= reward[0] + 0.06, reward
    # a GRPO checkpoint is a plain language model: infer.py chats with it
    proc = run_script("infer.py", f"ckpt={run}", 'prompt="3+4="', "chat=true", "max_new_tokens=5", cwd=cwd)
    assert proc.returncode == 0, proc.stderr


def test_ppo_from_sft_with_the_reward_model(chain, reward_run):
    cwd, files, _, sft, _ = chain
    rm, _ = reward_run
    run, proc = finetune(cwd, "stage=ppo", f"ckpt={sft}", f"stage.reward_ckpt={rm}",
                         f"data={first_prompts(files)}", f"data.val_path={files['prompts_val']}", *COMMON,
                         "trainer.max_iters=96", "trainer.eval_interval=24", "optimizer.lr=3e-4",
                         "scheduler.schedule.warmup_iters=2", "stage.eval_prompts=44", "stage.prompts_per_rollout=32",
                         "stage.minibatch_size=16", "stage.epochs=2")
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["stage"] == "ppo" and ckpt["reward_model"] == str(rm / "checkpoints" / "best.pt")
    assert ckpt["config"]["model"]["_target_"] == "gpt.heads.ValueHeadGPT"
    rows = evals(run, "val/reward")
    for key in ("train/reward", "train/kl", "train/entropy", "train/clip_fraction", "train/value_loss",
                "val/exact_match"):
        assert key in rows[-1], key
    # the reward model's mean (raw) score of the sampled answers, over the 6 rollouts (192 answers) of each
    # window, rises from the first window to the last. Measured (seed 0, 1, 2): 0.72 -> 0.96, 0.52 -> 0.79,
    # 0.47 -> 0.78, with KL to SFT rising to 1.1-2.1 and exact match not rising (a weak reward model hacked);
    # the greedy held-out score (val/reward) is not asserted: it fell for seed 2 (0.89 -> 0.83)
    reward = window_means(run, "train/reward")
    assert [r["step"] for r in rows] == [24, 48, 72, 96] and reward[-1] >= reward[0] + 0.1, reward
    proc = run_script("infer.py", f"ckpt={run}", 'prompt="3+4="', "chat=true", "max_new_tokens=5", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    # the reward model's place must hold a reward model
    proc = run_script("finetune.py", "stage=ppo", f"ckpt={sft}", f"stage.reward_ckpt={sft}",
                      f"data={files['prompts_train']}", *RL, cwd=cwd)
    assert proc.returncode == 2 and "stage.reward_ckpt=" in proc.stderr and "needs gpt.heads.RewardModel" in proc.stderr


def test_rlhf_runs_reward_then_ppo_in_one_command(chain):
    cwd, files, _, sft, _ = chain
    run, proc = finetune(cwd, "stage=rlhf", f"ckpt={sft}", f"data={files['pairs_train']}",
                         f"data.val_path={files['pairs_val']}", *RL[:-1], "stage.reward_trainer.max_iters=8",
                         "+stage.ppo.prompts_per_rollout=8", "+stage.ppo.minibatch_size=8", "+stage.ppo.epochs=1",
                         "+stage.ppo.eval_prompts=16")
    rm = torch.load(run / "reward" / "checkpoints" / "last.pt", weights_only=True)
    ppo = torch.load(run / "ppo" / "checkpoints" / "last.pt", weights_only=True)
    assert rm["stage"] == "reward" and rm["step"] == 8 and ppo["stage"] == "ppo" and ppo["step"] == 16
    assert ppo["reward_model"] == str(run / "reward" / "checkpoints" / "best.pt")
    assert rm["lineage"]["parent"] == ppo["lineage"]["parent"] == str(sft / "checkpoints" / "best.pt")
    assert "val/accuracy" in proc.stdout and "train/reward" in proc.stdout
    # without prompts=, PPO samples answers to the prompts of the preference pairs
    assert ppo["config"]["data"]["path"] == str(files["pairs_train"])
    assert ppo["config"]["data"]["val_path"] == str(files["pairs_val"])
    proc = run_script("finetune.py", "stage=rlhf", f"ckpt={sft}", f"data={files['prompts_train']}", cwd=cwd)
    assert proc.returncode == 2 and "missing key 'chosen'" in proc.stderr


def test_classify_reports_accuracy_and_infer_prints_label_probabilities(chain):
    cwd, files, pre, _, _ = chain
    run, proc = finetune(cwd, "stage=classify", f"ckpt={pre}", f"data={files['classify_train']}",
                         f"data.val_path={files['classify_val']}", *FT)
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["labels"] == ["correct", "wrong"] and ckpt["config"]["model"]["num_labels"] == 2
    assert "val/accuracy" in proc.stdout
    proc = run_script("infer.py", f"ckpt={run}", 'prompt="3+4=7"', cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert sorted(line.split("\t")[0] for line in lines) == ["correct", "wrong"]
    assert abs(sum(float(line.split("\t")[1]) for line in lines) - 1) < 1e-3
    # a classifier is refused as the policy of ppo
    proc = run_script("finetune.py", "stage=ppo", f"ckpt={run}", f"stage.reward_ckpt={run}",
                      f"data={files['prompts_train']}", cwd=cwd)
    assert proc.returncode == 2 and "holds a gpt.heads.Classifier (stage=classify); stage=ppo needs" in proc.stderr


def test_demo_quick_runs_the_whole_chain_and_prints_the_table(tmp_path):
    """python -m gpt.tasks.demo <folder> --quick: every stage as a printed command, then the results table."""
    proc = run_script("gpt/tasks/demo.py", str(tmp_path / "demo"), "--quick", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in ("pretrain", "sft", "reward", "ppo", "dpo", "grpo", "classify"):
        assert f"hydra.run.dir=runs/{stage}" in proc.stdout and f"| {stage} | " in proc.stdout
    assert "python " + str(Path(__file__).resolve().parents[1] / "finetune.py") + " stage=sft" in proc.stdout
    assert (tmp_path / "demo" / "results.md").read_text().startswith("| stage |")
    proc = run_script("gpt/tasks/demo.py", str(tmp_path / "demo"), "--quick", cwd=tmp_path)  # never overwrites
    assert proc.returncode != 0 and "pass a new folder" in proc.stderr
