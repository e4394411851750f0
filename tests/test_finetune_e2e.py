"""End-to-end: pretrain a tiny model on the arithmetic task, fine-tune it with finetune.py, chat with infer.py.

What these tests claim must hold on any CPU: which kernels run (AVX2, AVX-512, AMX) changes the last bits
of every step and so which of a few dozen held-out answers a tiny model gets right. So no threshold is read
off one machine's run. Each claim is an equivalence (evaluate.py's exact match equals the stage's own), a
value fixed by construction (before DPO or reward training the loss is exactly ln 2), or a one-sided exact
binomial test at a stated level, computed here from the number of questions or pairs: it fails when
fine-tuning is broken (SFT no better than the pretrained model, a reward model at chance) and passes,
whatever the kernels, while the effect is many standard errors wide. DPO, GRPO and PPO are each measured on
questions the stage never trained on (the `habit` fixture), question for question against their SFT parent."""

import glob
import json
import math
from pathlib import Path

import pytest
import torch


from inprocess import run_here
from gpt.checkpoint import file_sha256
from gpt.tasks.arithmetic import write_task
from gpt.tasks.demo import exact_match
from gpt.runs import read_metrics

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


LEVEL = 1e-3  # the one-sided level of every statistical claim below: a broken stage passes 1 time in 1000


def binomial_tail(k: int, n: int, p: float = 0.5) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k, n + 1))


def above_chance(accuracy: float, n: int) -> float:
    """p-value of `accuracy` on n pairs against a model at chance (each pair right with probability 1/2)."""
    return binomial_tail(round(accuracy * n), n)


def sign_test(a: list[bool], b: list[bool]) -> tuple[int, int, float]:
    """Exact one-sided sign (McNemar) test that model a answers more of the same questions than model b:
    -> (a right where b is wrong, b right where a is wrong, p-value of the first count if each such question
    were a coin toss between the two)."""
    wins, losses = sum(x and not y for x, y in zip(a, b)), sum(y and not x for x, y in zip(a, b))
    return wins, losses, binomial_tail(wins, wins + losses)


def runs(base: Path) -> list[Path]:
    return sorted(Path(p) for p in glob.glob(str(base / "outputs" / "*-*-*" / "*")))


def evals(run: Path, key: str) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if r.get(key) is not None]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Task files, a tiny pretrained model and an SFT run from it (shared by the tests below)."""
    cwd = tmp_path_factory.mktemp("ft")
    files = write_task(cwd / "task", n=441, seed=0, hi=20)
    proc = run_here("train.py", *PRETRAIN, "data=text", f"data.path={files['pretrain']}", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (pre,) = runs(cwd)
    proc = run_here("finetune.py", "stage=sft", f"ckpt={pre}", f"data={files['sft_train']}",
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
    assert [r["step"] for r in rows] == [300, 600]
    # best.pt is the evaluation with the lowest val loss (which of the two it is depends on the CPU's kernels)
    best = torch.load(sft / "checkpoints" / "best.pt", weights_only=True)
    assert best["val_loss"] == pytest.approx(min(r["val/loss"] for r in rows)) and best["step"] in (300, 600)
    assert "val/exact_match" in proc.stdout


def evaluate_answers(cwd: Path, ckpt: Path, questions: Path, out: Path, max_new_tokens: int) -> tuple[dict, list]:
    """evaluate.py ckpt=<ckpt> instructions=<questions> -> (its metrics, its generations.jsonl rows)."""
    proc = run_here("evaluate.py", f"ckpt={ckpt}", f"instructions={questions}", "samples.num=0",
                      f"generation.max_new_tokens={max_new_tokens}", f"hydra.run.dir={out}", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    return json.loads((out / "metrics.json").read_text())["metrics"], rows


def test_evaluate_scores_an_sft_checkpoint_as_the_sft_stage_does(chain, tmp_path):
    """evaluate.py instructions= on a chat model: its chat template, answers ending at <|end|>, no pretraining
    data needed; the same exact match, question for question, as the stage's evaluation of the checkpoint."""
    cwd, files, pre, sft, _ = chain
    metrics, rows = evaluate_answers(cwd, sft, files["sft_val"], tmp_path / "eval", 32)  # the stage's 32 tokens
    step = torch.load(sft / "checkpoints" / "best.pt", weights_only=True)["step"]
    (logged,) = [r["val/exact_match"] for r in evals(sft, "val/exact_match") if r["step"] == step]
    assert metrics["instruct/exact_match"] == pytest.approx(100 * logged) and metrics["instruct/n"] == 44
    assert not any(k.startswith(("val/", "all/")) for k in metrics)  # no corpus scored: the SFT data is no corpus
    assert not any("<|" in r["generation"] for r in rows)  # stopped at <|end|>, which is not part of the answer
    questions = [json.loads(line) for line in files["sft_val"].read_text().splitlines()]
    assert metrics["instruct/exact_match"] == pytest.approx(100 * exact_match(sft, questions, chat=True))


def test_sft_answers_more_questions_than_the_pretrained_model(chain, tmp_path):
    """The model at the end of SFT (last.pt) against the pretrained model prompted as it was trained ("a+b=",
    its answer read up to the newline), question for question on all 441 questions, with an exact one-sided
    sign test at LEVEL. Not on the 44 held-out questions alone, nor with best.pt: there the two differ by a
    few answers, as much as two CPUs' runs differ (held-out exact match 0.14 natively on an AMX Xeon, 0.09
    at step 300 (best.pt) and 0.25 at step 600 with ATEN_CPU_CAPABILITY=avx2), too few to test."""
    cwd, files, pre, sft, _ = chain
    every = tmp_path / "all.jsonl"
    every.write_text(files["sft_train"].read_text() + files["sft_val"].read_text())
    _, tuned = evaluate_answers(cwd, sft / "checkpoints" / "last.pt", every, tmp_path / "sft", 8)
    _, plain = evaluate_answers(cwd, pre, every, tmp_path / "pre", 8)
    tuned_right = [r["exact_match"] for r in tuned]
    pre_right = [r["generation"].split("\n")[0].strip() == r["reference"] for r in plain]
    assert len(tuned_right) == len(pre_right) == 441
    questions = [json.loads(line) for line in files["sft_val"].read_text().splitlines()]
    assert sum(pre_right[-44:]) / 44 == pytest.approx(exact_match(pre, questions, chat=False))  # demo's reading
    wins, losses, p = sign_test(tuned_right, pre_right)
    assert p < LEVEL, (wins, losses, p, sum(tuned_right), sum(pre_right))


def test_infer_chat_applies_template_and_stops_at_end_of_answer(chain):
    cwd, _, pre, sft, _ = chain
    proc = run_here("infer.py", f"ckpt={sft}", 'prompt="3+4="', "chat=true", "temperature=0",
                      "max_new_tokens=20", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    answer = proc.stdout.rstrip("\n")
    assert "<|" not in answer and len(answer) < 20  # stopped at <|end|>, which is not printed
    proc = run_here("infer.py", f"ckpt={pre}", 'prompt="3+4="', "chat=true", cwd=cwd)
    assert proc.returncode == 2 and "needs a chat-tuned checkpoint" in proc.stderr


def test_bad_jsonl_names_file_and_line_and_writes_nothing(chain, tmp_path):
    _, _, pre, _, _ = chain
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "completion": "2"}\n{"prompt": "1+2="}\n')
    proc = run_here("finetune.py", "stage=sft", f"ckpt={pre}", f"data={bad}", *FT, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {bad}:2: missing key 'completion' (has ['prompt'])"
    assert not (tmp_path / "outputs").exists()  # no run folder, no empty date folder
    proc = run_here("finetune.py", "stage=sft", f"ckpt={tmp_path / 'nope.pt'}", f"data={bad}", cwd=tmp_path)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and runs(tmp_path) == []


def finetune(cwd: Path, *args: str) -> tuple[Path, object]:
    """Run finetune.py in `cwd`; -> (its new run folder, the finished process)."""
    before = set(runs(cwd))
    proc = run_here("finetune.py", *args, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (new,) = set(runs(cwd)) - before
    return new, proc


@pytest.fixture(scope="module")
def habit(chain):
    """An SFT model with a habit that RL must unlearn, and the questions to measure it on.

    Its SFT data holds every training question four times, three with a stray "=" after the answer ("12=") and
    once without, so greedy decoding writes the "=" after every answer (exact match 0) while sampling ends cleanly
    about one time in four: a reward has something to find. GRPO and DPO then train on R, the first 200 training
    questions, and are measured on E, the other 197: questions SFT learnt (the tiny model gets held-out arithmetic
    mostly wrong, see test_sft_answers_more_questions_than_the_pretrained_model) but the RL stage never saw. A
    gain there is the stage changing the policy's behaviour, not memorising its own prompts."""
    cwd, files, pre, _, _ = chain
    task = files["sft_train"].parent
    train = [json.loads(line) for line in files["sft_train"].read_text().splitlines()]
    rows = [r for q in train for r in [{**q, "completion": q["completion"] + "="}] * 3 + [q]]
    (task / "sft_habit.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r, e = train[:200], train[200:]
    (task / "r_prompts.jsonl").write_text("".join(json.dumps({"prompt": q["prompt"], "answer": q["completion"]})
                                                  + "\n" for q in r))
    (task / "r_pairs.jsonl").write_text("".join(json.dumps({"prompt": q["prompt"], "chosen": q["completion"],
                                                            "rejected": q["completion"] + "="}) + "\n" for q in r))
    (task / "e.jsonl").write_text("".join(json.dumps(q) + "\n" for q in e))
    sft, _ = finetune(cwd, "stage=sft", f"ckpt={pre}", f"data={task / 'sft_habit.jsonl'}",
                      f"data.val_path={files['sft_val']}", *SFT)
    before = right_on(cwd, sft / "checkpoints" / "last.pt", task / "e.jsonl", sft / "e_eval")
    assert len(before) == len(e)
    return {"sft": sft / "checkpoints" / "last.pt", "prompts": task / "r_prompts.jsonl",
            "pairs": task / "r_pairs.jsonl", "e": task / "e.jsonl", "before": before}


def right_on(cwd: Path, ckpt: Path, questions: Path, out: Path) -> list[bool]:
    """Greedy exact match per question (evaluate.py instructions=, the chat template, answers to <|end|>)."""
    _, rows = evaluate_answers(cwd, ckpt, questions, out, 8)
    return [r["exact_match"] for r in rows]


def test_dpo_from_sft_improves_exact_match_on_questions_it_never_trained_on(chain, habit, tmp_path):
    cwd, files, _, _, _ = chain
    run, _ = finetune(cwd, "stage=dpo", f"ckpt={habit['sft']}", f"data={habit['pairs']}",
                      f"data.val_path={files['pairs_val']}", "trainer.max_iters=80", "trainer.eval_interval=40",
                      "optimizer.lr=1e-4", *COMMON)
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["stage"] == "dpo" and ckpt["lineage"]["parent_stage"] == "sft"
    assert ckpt["lineage"]["parent_lineage"]["parent_stage"] == "pretrain"
    rows = evals(run, "val/accuracy")
    assert {"val/chosen_reward", "val/rejected_reward", "val/loss"} <= set(rows[-1])
    # held out from DPO: exact match on E, question for question against the SFT model, exact one-sided sign test
    # at LEVEL. Measured (AMX Xeon, seed 0): SFT 0 of 197 (the habit), DPO 68 of 197 (p ~ 3e-21)
    before, after = habit["before"], right_on(cwd, run / "checkpoints" / "last.pt", habit["e"], tmp_path / "dpo")
    assert len(before) == len(after) == 197
    wins, losses, p = sign_test(after, before)
    assert p < LEVEL, (wins, losses, p, sum(after), sum(before))


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
    # the zero-initialised head scores every answer alike: loss ln 2 before training (tests/test_reward.py);
    # at each evaluation the held-out loss is below that
    assert all(row["val/loss"] < math.log(2) for row in rows), rows
    # pairwise accuracy (evaluate.py pairs=) on all 441 pairs is above chance: exact binomial test at LEVEL.
    # Not on the 44 held-out pairs alone: 38, 36 of 44 natively on an AMX Xeon, 32, 30 with
    # ATEN_CPU_CAPABILITY=avx2 (the 33 that level needs is within that spread)
    every = tmp_path / "pairs.jsonl"
    every.write_text(files["pairs_train"].read_text() + files["pairs_val"].read_text())
    out = tmp_path / "eval"
    proc = run_here("evaluate.py", f"ckpt={run / 'checkpoints' / 'last.pt'}", f"pairs={every}",
                      f"hydra.run.dir={out}", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert metrics["reward/pairs"] == 441
    assert above_chance(metrics["reward/pairwise_accuracy"], 441) < LEVEL, metrics
    # a reward model is not a language model to fine-tune: refused, and no run folder is left behind
    before = runs(cwd)
    proc = run_here("finetune.py", "stage=sft", f"ckpt={run}", f"data={files['sft_train']}", *FT, cwd=cwd)
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


def test_grpo_from_sft_improves_exact_match_on_questions_it_never_trained_on(chain, habit, tmp_path):
    cwd, files, _, _, _ = chain
    run, proc = finetune(cwd, "stage=grpo", f"ckpt={habit['sft']}", f"data={habit['prompts']}",
                         f"data.val_path={files['prompts_val']}", "trainer.max_iters=96", "trainer.eval_interval=48",
                         "optimizer.lr=3e-4", *COMMON, "stage.prompts_per_rollout=16", "stage.group_size=8",
                         "stage.minibatch_size=64", "stage.epochs=1", "stage.eval_prompts=8")
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["stage"] == "grpo" and ckpt["config"]["stage"]["group_size"] == 8
    rows = evals(run, "val/reward")
    assert [r["step"] for r in rows] == [48, 96]
    assert {"train/reward", "train/kl", "train/clip_fraction"} <= set(rows[-1])
    # held out from GRPO: exact match on E (197 questions it never sampled answers to), question for question
    # against the SFT model, exact one-sided sign test at LEVEL. Measured (AMX Xeon, seed 0): SFT 0 of 197,
    # GRPO 100 of 197 (p ~ 8e-31)
    before, after = habit["before"], right_on(cwd, run / "checkpoints" / "last.pt", habit["e"], tmp_path / "grpo")
    wins, losses, p = sign_test(after, before)
    assert p < LEVEL, (wins, losses, p, sum(after), sum(before))
    # a GRPO checkpoint is a plain language model: infer.py chats with it
    proc = run_here("infer.py", f"ckpt={run}", 'prompt="3+4="', "chat=true", "max_new_tokens=5", cwd=cwd)
    assert proc.returncode == 0, proc.stderr


def test_ppo_from_sft_with_the_reward_model(chain, reward_run, habit, tmp_path):
    """PPO against a reward model trained on R's pairs (clean answer over the habit's "=" ending), from the habit
    SFT model, on R's prompts; measured on E (see `habit`)."""
    cwd, files, _, sft, _ = chain
    rm_habit, _ = finetune(cwd, "stage=reward", f"ckpt={habit['sft']}", f"data={habit['pairs']}",
                           f"data.val_path={files['pairs_val']}", "trainer.max_iters=100", "trainer.eval_interval=50",
                           "optimizer.lr=1e-3", *COMMON)
    run, proc = finetune(cwd, "stage=ppo", f"ckpt={habit['sft']}", f"stage.reward_ckpt={rm_habit}",
                         f"data={habit['prompts']}", f"data.val_path={files['prompts_val']}", *COMMON,
                         "trainer.max_iters=96", "trainer.eval_interval=48", "optimizer.lr=3e-4",
                         "scheduler.schedule.warmup_iters=2", "stage.eval_prompts=8", "stage.prompts_per_rollout=32",
                         "stage.minibatch_size=16", "stage.epochs=2")
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["stage"] == "ppo" and ckpt["reward_model"] == str(rm_habit / "checkpoints" / "best.pt")
    assert ckpt["config"]["model"]["_target_"] == "gpt.heads.ValueHeadGPT"
    rows = evals(run, "val/reward")
    for key in ("train/reward", "train/kl", "train/entropy", "train/clip_fraction", "train/value_loss",
                "val/exact_match"):
        assert key in rows[-1], key
    assert [r["step"] for r in rows] == [48, 96] and rows[-1]["train/kl"] > 0, rows[-1]  # it left its reference
    # held out from PPO (and from its reward model): exact match on E against the SFT model, exact one-sided sign
    # test at LEVEL. Measured (AMX Xeon, seed 0): SFT 0 of 197, PPO 38 of 197 (p ~ 4e-12)
    before, after = habit["before"], right_on(cwd, run / "checkpoints" / "last.pt", habit["e"], tmp_path / "ppo")
    wins, losses, p = sign_test(after, before)
    assert p < LEVEL, (wins, losses, p, sum(after), sum(before))
    # What holds by construction: at the first minibatch the policy is both its rollout policy and its frozen SFT
    # reference, so KL and clip fraction are exactly 0 (a one-step run that evaluates after it)
    rm, _ = reward_run
    one, _ = finetune(cwd, "stage=ppo", f"ckpt={sft}", f"stage.reward_ckpt={rm}", f"data={first_prompts(files)}",
                      f"data.val_path={files['prompts_val']}", *COMMON, "trainer.max_iters=1", "trainer.eval_interval=1",
                      "optimizer.lr=3e-4", "stage.eval_prompts=4", "stage.prompts_per_rollout=32",
                      "stage.minibatch_size=16", "stage.epochs=2")
    (first,) = evals(one, "train/kl")
    assert first["step"] == 1 and first["train/kl"] == 0.0 and first["train/clip_fraction"] == 0.0, first
    proc = run_here("infer.py", f"ckpt={run}", 'prompt="3+4="', "chat=true", "max_new_tokens=5", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    # the reward model's place must hold a reward model
    proc = run_here("finetune.py", "stage=ppo", f"ckpt={sft}", f"stage.reward_ckpt={sft}",
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
    proc = run_here("finetune.py", "stage=rlhf", f"ckpt={sft}", f"data={files['prompts_train']}", cwd=cwd)
    assert proc.returncode == 2 and "missing key 'chosen'" in proc.stderr


def test_classify_reports_accuracy_and_infer_prints_label_probabilities(chain):
    cwd, files, pre, _, _ = chain
    run, proc = finetune(cwd, "stage=classify", f"ckpt={pre}", f"data={files['classify_train']}",
                         f"data.val_path={files['classify_val']}", *FT)
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["labels"] == ["correct", "wrong"] and ckpt["config"]["model"]["num_labels"] == 2
    assert "val/accuracy" in proc.stdout
    proc = run_here("infer.py", f"ckpt={run}", 'prompt="3+4=7"', cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert sorted(line.split("\t")[0] for line in lines) == ["correct", "wrong"]
    assert abs(sum(float(line.split("\t")[1]) for line in lines) - 1) < 1e-3
    # a classifier is refused as the policy of ppo
    proc = run_here("finetune.py", "stage=ppo", f"ckpt={run}", f"stage.reward_ckpt={run}",
                      f"data={files['prompts_train']}", cwd=cwd)
    assert proc.returncode == 2 and "holds a gpt.heads.Classifier (stage=classify); stage=ppo needs" in proc.stderr


def test_demo_quick_runs_the_whole_chain_and_prints_the_table(tmp_path):
    """python -m gpt.tasks.demo <folder> --quick: every stage as a printed command, then the results table."""
    proc = run_here("gpt/tasks/demo.py", str(tmp_path / "demo"), "--quick", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in ("pretrain", "sft", "reward", "ppo", "dpo", "grpo", "classify"):
        assert f"hydra.run.dir=runs/{stage}" in proc.stdout and f"| {stage} | " in proc.stdout
    assert "python -m gpt.cli finetune stage=sft" in proc.stdout
    assert (tmp_path / "demo" / "results.md").read_text().startswith("| stage |")
    # the reward model reads the answer's log-likelihood, as the full demo's does, and PPO scored with it
    rm = torch.load(tmp_path / "demo" / "runs" / "reward" / "checkpoints" / "last.pt", weights_only=True)
    assert rm["config"]["model"]["answer_logp"] is True and rm["model"]["head.logp_scale"].item() != 0
    proc = run_here("gpt/tasks/demo.py", str(tmp_path / "demo"), "--quick", cwd=tmp_path)  # never overwrites
    assert proc.returncode != 0 and "pass a new folder" in proc.stderr
