"""The fine-tune-and-align chain on the arithmetic task (gpt.tasks.arithmetic), in one command:

    python -m gpt.tasks.demo <work folder> [--quick] [--seed 0]

writes the task files into <work>/task, then runs each stage as the command it prints (from inside <work>,
run folders in <work>/runs/<stage>):

    train (a small char model on the training equations)
      -> finetune stage=sft -> stage=reward -> stage=ppo against that reward model
                            -> stage=dpo
                            -> stage=grpo (exact-match reward)
      -> finetune stage=classify (from the pretrained model)

(each as `python -m gpt.cli <train|finetune> ...`: the gpt-train / gpt-finetune console scripts, or train.py
/ finetune.py in a clone)

and prints a markdown table (also written to <work>/results.md): each run's key metrics at its first and
last evaluation, greedy exact match of every policy on the same held-out questions, and wall time per stage.
The pretrained model is scored twice: with a plain prompt ("23+45=", answer read up to the newline, the
format it was trained on) and with the chat template SFT's evaluation uses. --quick runs a tiny model for
a few steps: a smoke test of the chain, its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

# The demo's model: Llama-style parts (rotary, RMSNorm, SwiGLU, untied), pretrained with Muon. With GPT-2's
# parts and AdamW the same 2000 steps answer 0.20 of the held-out questions (plain prompt) against 0.91.
MODERN = ["model.pos=rope", "model.norm=rmsnorm", "model.mlp=swiglu", "model.tie_embeddings=false", "model.bias=false"]
# The demo's settings: the model and each stage's steps, learning rate and stage options. Values that are
# good defaults in general live in gpt/conf/stage/*.yaml; these are tuned for this task on a 2-core CPU.
FULL = {
    "task": {"n": 6000, "hi": 99, "far": 0.5, "repeat": 4},
    "eval_questions": 256,
    "pretrain": ["model.n_layer=4", "model.n_head=4", "model.n_embd=128", "model.block_size=32", *MODERN,
                 "optimizer=muon", "trainer.max_iters=2000", "trainer.eval_interval=500", "trainer.batch_size=32"],
    "sft": ["trainer.max_iters=1000", "trainer.eval_interval=250", "trainer.batch_size=32", "optimizer.lr=2e-3"],
    "reward": ["trainer.max_iters=1000", "trainer.eval_interval=250", "trainer.batch_size=32", "optimizer.lr=1e-3",
               "stage.lm_weight=1.0", "stage.answer_logp=true"],
    "ppo": ["trainer.max_iters=200", "trainer.eval_interval=50", "optimizer.lr=5e-5", "stage.kl_coef=0.5",
            "stage.prompts_per_rollout=64", "stage.minibatch_size=32", "stage.epochs=2"],
    "dpo": ["trainer.max_iters=200", "trainer.eval_interval=50", "trainer.batch_size=32", "optimizer.lr=1e-4",
            "stage.nll_weight=1.0"],
    "grpo": ["trainer.max_iters=300", "trainer.eval_interval=50", "optimizer.lr=1e-4",
             "stage.prompts_per_rollout=32", "stage.group_size=8", "stage.minibatch_size=64", "stage.epochs=1"],
    "classify": ["trainer.max_iters=300", "trainer.eval_interval=100", "trainer.batch_size=32", "optimizer.lr=1e-3"],
}
QUICK = {
    "task": {"n": 600, "hi": 20, "far": 0.5, "repeat": 4},
    "eval_questions": 32,
    "pretrain": ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32", *MODERN,
                 "optimizer=muon", "trainer.max_iters=60", "trainer.eval_interval=30", "trainer.batch_size=16"],
    "sft": ["trainer.max_iters=40", "trainer.eval_interval=20", "trainer.batch_size=16", "optimizer.lr=3e-3"],
    "reward": ["trainer.max_iters=20", "trainer.eval_interval=10", "trainer.batch_size=16", "stage.lm_weight=1.0",
               "stage.answer_logp=true"],
    "ppo": ["trainer.max_iters=8", "trainer.eval_interval=4", "stage.prompts_per_rollout=8",
            "stage.minibatch_size=8", "stage.epochs=1"],
    "dpo": ["trainer.max_iters=20", "trainer.eval_interval=10", "trainer.batch_size=16", "optimizer.lr=1e-4"],
    "grpo": ["trainer.max_iters=8", "trainer.eval_interval=4", "stage.prompts_per_rollout=4", "stage.group_size=4",
             "stage.minibatch_size=8", "stage.epochs=1"],
    "classify": ["trainer.max_iters=20", "trainer.eval_interval=10", "trainer.batch_size=16"],
}
# every finetune.py run: short warmup, fixed evaluation sizes
COMMON = ["scheduler.schedule.warmup_iters=10", "trainer.eval_iters=8", "trainer.log_interval=10"]


def run(script: str, args: list[str], cwd: Path, log: Path) -> float:
    """Run entry point `script` (train.py -> `python -m gpt.cli train`, the gpt-train console script) with
    `args` in cwd (printing the command), output to log; -> wall seconds. Through the package, not the
    scripts of a clone: the demo runs from an installed wheel too."""
    command = ["-m", "gpt.cli", script.removesuffix(".py"), *args]
    print("$ " + shlex.join(["python", *command]), flush=True)
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, *command], cwd=cwd, stdout=f, stderr=subprocess.STDOUT)
    seconds = time.time() - t0
    if proc.returncode != 0:
        sys.exit(f"{script} failed (exit {proc.returncode}); its output: {log}\n" + log.read_text()[-3000:])
    print(f"  done in {seconds:.0f}s (log {log})", flush=True)
    return seconds


def evals(run_dir: Path) -> list[dict]:
    """The evaluation rows of a run's metrics.jsonl."""
    from gpt.runs import read_metrics

    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("val/loss") is not None]


def first_last(rows: list[dict], key: str, digits: int = 2) -> str:
    """'a (step s) -> b (step t)' for `key` over the evaluation rows that have it."""
    have = [r for r in rows if r.get(key) is not None]
    if not have:
        return "-"
    a, b = have[0], have[-1]
    return f"{a[key]:.{digits}f} (step {a['step']}) -> {b[key]:.{digits}f} (step {b['step']})"


def exact_match(ckpt_path: Path, questions: list[dict], chat: bool) -> float:
    """Greedy exact match on `questions` ({"prompt", "completion"}): with the chat template (SFT's
    evaluation, gpt.scoring.chat_exact_match) or, chat=False, with the plain prompt, reading the answer
    up to the first newline (how the pretraining text writes equations)."""
    import torch

    from gpt.chat import chat_tokenizer
    from gpt.checkpoint import load_checkpoint, model_from_checkpoint
    from gpt.generate import generate_batch
    from gpt.parent import lm_from_parent
    from gpt.scoring import chat_exact_match
    from gpt.tokenizer import from_identity

    ckpt = load_checkpoint(ckpt_path, prefer="best")
    tok = from_identity(ckpt["tokenizer"])
    with torch.no_grad():
        if chat:
            tok = chat_tokenizer(tok)
            model = lm_from_parent(ckpt, tok.vocab_size, "cpu").eval()
            convs = [[{"role": "user", "content": q["prompt"]}, {"role": "assistant", "content": q["completion"]}]
                     for q in questions]
            return chat_exact_match(model, tok, convs, lambda: torch.autocast("cpu", enabled=False), 8)
        model = model_from_checkpoint(ckpt, "cpu").eval()
        outs = generate_batch(model, [tok.encode(q["prompt"]) for q in questions], 8, temperature=0.0)
        answers = [tok.decode(o).split("\n")[0].strip() for o in outs]
        return sum(a == q["completion"] for a, q in zip(answers, questions)) / len(questions)


def reward_accuracy(ckpt_path: Path, pairs_file: Path) -> tuple[float, float]:
    """The reward model's pairwise accuracy on the near-miss pairs (rejected within 10 of the answer) and
    on the far-miss pairs of `pairs_file` -> (near, far)."""
    import torch

    from gpt.checkpoint import load_checkpoint, model_from_checkpoint
    from gpt.encoding import scored_pair
    from gpt.scoring import pair_margins
    from gpt.tokenizer import from_identity

    ckpt = load_checkpoint(ckpt_path, prefer="best")
    model, tok = model_from_checkpoint(ckpt, "cpu").eval(), from_identity(ckpt["tokenizer"])
    pairs = [json.loads(line) for line in pairs_file.read_text().splitlines() if line.strip()]
    with torch.no_grad():
        margins = pair_margins(model, [scored_pair(tok, p, model.config.block_size) for p in pairs], 64)
    right = {"near": [], "far": []}
    for p, m in zip(pairs, margins):
        right["far" if abs(int(p["chosen"]) - int(p["rejected"])) > 10 else "near"].append(m > 0)
    return tuple(sum(v) / max(len(v), 1) for v in (right["near"], right["far"]))


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("work", help="a new (or empty) folder for the task files and run folders")
    ap.add_argument("--quick", action="store_true", help="tiny model, few steps: a smoke test, not a result")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from gpt.tasks.arithmetic import write_task

    cfg = QUICK if args.quick else FULL
    work = Path(args.work).resolve()
    if (work / "runs").exists():
        sys.exit(f"{work / 'runs'} exists: pass a new folder (the demo does not overwrite earlier runs)")
    (work / "logs").mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    t = cfg["task"]
    files = write_task(work / "task", n=t["n"], seed=args.seed, hi=t["hi"], far=t["far"], repeat=t["repeat"])
    rel = {k: str(p.relative_to(work)) for k, p in files.items()}
    print(f"task files in {work / 'task'} (gpt.tasks.arithmetic: {t})\n$ cd {work}", flush=True)
    seed = [f"seed={args.seed}"]
    wall: dict[str, float] = {}

    def stage(name: str, *args_: str, script: str = "finetune.py") -> Path:
        out = f"runs/{name}"
        extra = cfg[name] if script == "train.py" else [*COMMON, *cfg[name]]
        wall[name] = run(script, [*args_, *extra, *seed, f"hydra.run.dir={out}"], work, work / "logs" / f"{name}.log")
        return work / out

    data = lambda kind: [f"data={rel[kind + '_train']}", f"data.val_path={rel[kind + '_val']}"]  # noqa: E731
    pre = stage("pretrain", "data=text", f"data.path={rel['pretrain']}", script="train.py")
    sft = stage("sft", "stage=sft", "ckpt=runs/pretrain", *data("sft"),
                f"stage.eval_examples={cfg['eval_questions']}")
    rm = stage("reward", "stage=reward", "ckpt=runs/sft", *data("pairs"))
    ppo = stage("ppo", "stage=ppo", "ckpt=runs/sft", "stage.reward_ckpt=runs/reward", *data("prompts"),
                f"stage.eval_prompts={cfg['eval_questions']}")
    dpo = stage("dpo", "stage=dpo", "ckpt=runs/sft", *data("pairs"))
    grpo = stage("grpo", "stage=grpo", "ckpt=runs/sft", *data("prompts"), f"stage.eval_prompts={cfg['eval_questions']}")
    cls = stage("classify", "stage=classify", "ckpt=runs/pretrain", *data("classify"))

    questions = [json.loads(line) for line in (work / rel["sft_val"]).read_text().splitlines()][: cfg["eval_questions"]]
    em = {name: exact_match(path, questions, chat=True) for name, path in
          (("sft", sft), ("ppo", ppo), ("dpo", dpo), ("grpo", grpo))}
    pre_plain, pre_chat = exact_match(pre, questions, chat=False), exact_match(pre, questions, chat=True)
    near, far = reward_accuracy(rm, work / rel["pairs_val"])

    r = {name: evals(path) for name, path in (("pretrain", pre), ("sft", sft), ("reward", rm), ("ppo", ppo),
                                                ("dpo", dpo), ("grpo", grpo), ("classify", cls))}
    n = len(questions)
    rows = [
        ("pretrain", f"val loss {first_last(r['pretrain'], 'val/loss', 3)}",
         f"{pre_plain:.2f} plain prompt, {pre_chat:.2f} chat template"),
        ("sft", f"val/exact_match {first_last(r['sft'], 'val/exact_match')}; val/loss "
                f"{first_last(r['sft'], 'val/loss', 3)}", f"{em['sft']:.2f}"),
        ("reward", f"val/accuracy (pairwise) {first_last(r['reward'], 'val/accuracy')}; all val pairs: near misses "
                   f"{near:.2f}, far misses {far:.2f}", ""),
        ("ppo", f"train/reward (reward model) {first_last(r['ppo'], 'train/reward')}; val/reward "
                f"{first_last(r['ppo'], 'val/reward')}; val/exact_match {first_last(r['ppo'], 'val/exact_match')}; "
                f"train/kl {first_last(r['ppo'], 'train/kl')}", f"{em['ppo']:.2f}"),
        ("dpo", f"val/accuracy (implicit reward) {first_last(r['dpo'], 'val/accuracy')}; val/logp_accuracy "
                f"{first_last(r['dpo'], 'val/logp_accuracy')}", f"{em['dpo']:.2f}"),
        ("grpo", f"val/reward (exact match) {first_last(r['grpo'], 'val/reward')}; train/reward "
                 f"{first_last(r['grpo'], 'train/reward')}; train/kl {first_last(r['grpo'], 'train/kl', 3)}",
         f"{em['grpo']:.2f}"),
        ("classify", f"val/accuracy {first_last(r['classify'], 'val/accuracy')}", ""),
    ]
    lines = [f"| stage | first -> last evaluation | greedy exact match, {n} held-out questions | wall time |",
             "|---|---|---|---|"]
    lines += [f"| {name} | {what} | {e} | {wall[name]:.0f}s |" for name, what, e in rows]
    table = "\n".join(lines)
    total = time.time() - t_start
    text = f"{table}\n\ntotal wall time {total:.0f}s ({'--quick' if args.quick else 'full'} run, seed {args.seed})\n"
    (work / "results.md").write_text(text)
    print("\n" + text, flush=True)
    return table


if __name__ == "__main__":
    main()
