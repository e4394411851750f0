"""Bad input as users type it: every row is an entry script, its arguments and what the one error line must
name. The outcome is always the same: exit code 2, exactly one stderr line `error: ...` naming the key (or the
file), no traceback, and no outputs/ or evaluations/ folder left behind.

Most rows run in-process the way the entry scripts do (argv rewrite -> Hydra compose -> gpt.schema.validate);
rows marked e2e also run the real script in a subprocess for the wiring (exit code, one line, no folder).
test_every_config_key_has_a_rule fails when an option is added to conf/ without a rule in gpt/schema.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY
from inprocess import run_here
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from gpt.config import entry, file_shorthand, literal_overrides, register_resolvers
from gpt.errors import UserError
from gpt.schema import (MISSING, Choice, Device, Flag, Int, Node, Number, Numbers, Text, Texts, is_code_key, leaves,
                        rule_for, validate)

CONF = ROOT / "gpt" / "conf"
SCRIPTS = ("train", "finetune", "infer", "evaluate", "serve")


@dataclass(frozen=True)
class Probe:
    script: str
    args: tuple[str, ...]
    names: str  # text the error line must contain: the key, with the value where it matters
    e2e: bool = False  # also run the real entry script in a subprocess

    def __str__(self) -> str:
        return f"{self.script}.py {' '.join(self.args)}"


CKPT = ("ckpt=run",)  # validation runs before the checkpoint is read: no file needed for these rows
FT = ("ckpt=run", "data=sft.jsonl")
PROBES = [
    # optimizer, schedule, loop, hardware, model (train.py and finetune.py share the groups)
    Probe("train", ("optimizer.lr=-1",), "optimizer.lr=-1 must be a positive number", e2e=True),
    Probe("train", ("optimizer.lr=abc",), "optimizer.lr='abc'"),
    Probe("train", ("optimizer.lr=nan",), "optimizer.lr=nan"),
    Probe("train", ("optimizer.weight_decay=-1",), "optimizer.weight_decay=-1"),
    Probe("train", ("optimizer.betas=[2,3]",), "optimizer.betas=[2, 3]"),
    Probe("train", ("optimizer.betas=[0.9]",), "optimizer.betas=[0.9]"),
    Probe("train", ("optimizer=sgd", "optimizer.momentum=1.5"), "optimizer.momentum=1.5"),
    Probe("finetune", (*FT, "optimizer.lr=0"), "optimizer.lr=0"),
    Probe("train", ("scheduler.schedule.warmup_iters=-10",), "scheduler.schedule.warmup_iters=-10"),
    Probe("train", ("scheduler=cosine", "scheduler.schedule.min_lr_ratio=2"), "scheduler.schedule.min_lr_ratio=2"),
    Probe("train", ("hardware.threads=-1",), "hardware.threads=-1"),
    Probe("train", ("hardware.threads=0",), "hardware.threads=0"),
    Probe("train", ("hardware.device=tpu",), "hardware.device='tpu'"),
    Probe("train", ("hardware.autocast_dtype=fp8",), "hardware.autocast_dtype='fp8'"),
    Probe("train", ("trainer.max_iters=0",), "trainer.max_iters=0 must be a positive integer"),
    Probe("train", ("trainer.max_iters=1e3",), "trainer.max_iters=1000.0"),
    Probe("train", ("trainer.eval_interval=0",), "trainer.eval_interval=0"),
    Probe("train", ("trainer.eval_iters=-1",), "trainer.eval_iters=-1"),
    Probe("train", ("trainer.batch_size=0",), "trainer.batch_size=0"),
    Probe("train", ("trainer.grad_accum_steps=0",), "trainer.grad_accum_steps=0"),
    Probe("train", ("trainer.grad_clip=-1",), "trainer.grad_clip=-1"),
    Probe("train", ("trainer.log_interval=0",), "trainer.log_interval=0"),
    Probe("finetune", (*FT, "trainer.skip_nonfinite=-1"), "trainer.skip_nonfinite=-1"),
    Probe("train", ("model.n_layer=0",), "model.n_layer=0"),
    Probe("train", ("model.n_head=-2",), "model.n_head=-2"),
    Probe("train", ("model.block_size=0",), "model.block_size=0"),
    Probe("train", ("model.dropout=1.0",), "model.dropout=1.0"),
    Probe("train", ("model.n_embd=100", "model.n_head=3"), "model.n_embd=100 is not divisible by model.n_head=3"),
    Probe("train", ("seed=-1",), "seed=-1"),
    Probe("finetune", (*FT, "lora.r=-1"), "lora.r=-1"),
    Probe("finetune", (*FT, "lora.alpha=0"), "lora.alpha=0"),
    Probe("finetune", (*FT, "stage=grpo", "stage.group_size=1"), "stage.group_size=1"),
    Probe("finetune", (*FT, "stage=rlhf", "+stage.ppo.epochs=0"), "stage.ppo.epochs=0"),
    # values left unset, a stage given to the wrong script
    Probe("train", ("data=text",), "data.path is not set; pass data.path=", e2e=True),
    Probe("train", ("data=hf",), "data.name is not set; pass data.name="),
    Probe("finetune", (), "ckpt and data.path are not set; pass ckpt=<parent checkpoint or run folder> data=<file.jsonl>",
          e2e=True),
    Probe("finetune", ("ckpt=run",), "data.path is not set; pass data=<file.jsonl>"),
    Probe("finetune", ("data=sft.jsonl",), "ckpt is not set"),
    Probe("finetune", (*FT, "stage=ppo"), "stage.reward_ckpt is not set"),
    Probe("train", ("stage=sft",), "fine-tuning stages run through finetune.py: python finetune.py stage=sft ckpt=",
          e2e=True),
    Probe("train", ("stage=rlhf",), "stage=rlhf is not a train.py stage"),
    Probe("finetune", (*FT, "stage=pretrain"), "stage=pretrain is not a finetune.py stage; it runs through train.py"),
    # infer.py sampling
    Probe("infer", (*CKPT, "temperature=nan"), "temperature=nan", e2e=True),
    Probe("infer", (*CKPT, "temperature=inf"), "temperature=inf"),
    Probe("infer", (*CKPT, "temperature=-1"), "temperature=-1"),
    Probe("infer", (*CKPT, "top_k=0"), "top_k=0"),
    Probe("infer", (*CKPT, "top_k=-5"), "top_k=-5"),
    Probe("infer", (*CKPT, "top_p=0"), "top_p=0"),
    Probe("infer", (*CKPT, "top_p=1.5"), "top_p=1.5"),
    Probe("infer", (*CKPT, "max_new_tokens=0"), "max_new_tokens=0"),
    Probe("infer", (*CKPT, "max_new_tokens=abc"), "max_new_tokens='abc'"),
    Probe("infer", (*CKPT, "max_new_tokens=10**12"), "max_new_tokens='10**12'"),
    Probe("infer", (*CKPT, "max_new_tokens=1000000000000"), "must be an integer in 1..1000000"),
    Probe("infer", (*CKPT, "num_samples=0"), "num_samples=0"),
    Probe("infer", (*CKPT, "seed=18446744073709551616"), "seed=18446744073709551616 must be an integer in 0..9223372036854775807"),
    Probe("infer", (*CKPT, "device=tpu"), "device='tpu' must be cpu, cuda, cuda:<index>"),
    Probe("infer", (*CKPT, "dtype=int4"), "dtype='int4' must be one of auto, float32, bfloat16, float16"),
    Probe("infer", (*CKPT, "use_cache=maybe"), "use_cache='maybe'"),
    Probe("infer", (), "ckpt is not set; pass ckpt=<checkpoint file or run folder>"),
    # serve.py: refused before the model loads or a port is bound
    Probe("serve", (*CKPT, "port=-1"), "port=-1", e2e=True),
    Probe("serve", (*CKPT, "port=99999"), "port=99999 must be an integer in 1..65535"),
    Probe("serve", (*CKPT, "port=abc"), "port='abc'"),
    Probe("serve", (*CKPT, "limits.max_batch=0"), "limits.max_batch=0"),
    Probe("serve", (*CKPT, "limits.max_queue=-1"), "limits.max_queue=-1"),
    Probe("serve", (*CKPT, "limits.max_new_tokens=0"), "limits.max_new_tokens=0"),
    Probe("serve", (*CKPT, "limits.max_prompt_chars=0"), "limits.max_prompt_chars=0"),
    Probe("serve", (*CKPT, "limits.batch_wait_ms=-5"), "limits.batch_wait_ms=-5"),
    Probe("serve", (*CKPT, "limits.max_body_bytes=0"), "limits.max_body_bytes=0"),
    Probe("serve", (*CKPT, "api_key="), "api_key=''"),
    # evaluate.py
    Probe("evaluate", (*CKPT, "perplexity.stride=0"), "perplexity.stride=0", e2e=True),
    Probe("evaluate", (*CKPT, "perplexity.max_tokens=0"), "perplexity.max_tokens=0"),
    Probe("evaluate", (*CKPT, "perplexity.batch_size=0"), "perplexity.batch_size=0"),
    Probe("evaluate", (*CKPT, "perplexity.split=test"), "perplexity.split='test'"),
    Probe("evaluate", (*CKPT, "generation.max_new_tokens=0"), "generation.max_new_tokens=0"),
    Probe("evaluate", (*CKPT, "samples.num=-1"), "samples.num=-1"),
    Probe("evaluate", (*CKPT, "samples.temperature=nan"), "samples.temperature=nan"),
    Probe("evaluate", (*CKPT, "samples.top_k=0"), "samples.top_k=0"),
    Probe("evaluate", (*CKPT, "data=text"), "data.path is not set"),
    Probe("evaluate", (), "ckpt is not set"),
]


def compose_job(script: str, args: tuple[str, ...]):
    """The config and group choices the entry script would run with: its argv rewrite, then Hydra's compose."""
    argv = [f"{script}.py", *args]
    argv = literal_overrides(file_shorthand(argv) if script == "finetune" else argv)
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(script, overrides=argv[1:], return_hydra_config=True)
    choices = dict(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]  # the job sees its config without the hydra node
    return cfg, choices


def error_lines(stderr: str) -> list[str]:
    """stderr without the INFO/WARNING lines of the run's own log (`[date time][gpt][INFO] - ...`)."""
    log_line = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+\]\[[\w.]+\]\[(INFO|WARNING)\]")
    return [line for line in stderr.splitlines() if line.strip() and not log_line.match(line)]


@pytest.mark.parametrize("probe", PROBES, ids=str)
def test_bad_value_is_one_line_naming_the_key(probe, capsys):
    cfg, choices = compose_job(probe.script, probe.args)
    with pytest.raises(SystemExit) as exc:  # through the entry wrapper, as the scripts run it
        entry(lambda c: validate(c, probe.script, choices))(cfg)
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and probe.names in err, err


@pytest.mark.parametrize("probe", [p for p in PROBES if p.e2e], ids=str)
def test_bad_value_end_to_end(probe, tmp_path):
    proc = run_here(f"{probe.script}.py", *probe.args, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and probe.names in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "evaluations").exists()


# ---- every key of every composed config has a rule, and a bad value of it is refused ---------------------

def compositions():
    """(script, overrides) for each entry config with each option of each of its groups."""
    groups = {"train": ("model", "tokenizer", "data", "optimizer", "scheduler", "stage", "hardware", "logger"),
              "finetune": ("optimizer", "scheduler", "stage", "hardware", "logger"), "evaluate": ("data",)}
    for script in SCRIPTS:
        base = {"finetune": FT, "train": ()}.get(script, CKPT)
        yield script, base
        for group in groups.get(script, ()):
            for option in sorted(p.stem for p in (CONF / group).glob("*.yaml")):
                if group != "stage" or (option == "pretrain") == (script == "train"):  # a stage runs in one script
                    yield script, (*base, f"{group}={option}")


def bad_value(rule):
    """A value the rule must refuse."""
    if isinstance(rule, Int):
        return rule.low - 1
    if isinstance(rule, Number):
        return float("nan")
    if isinstance(rule, Numbers):
        return [0.5] * (rule.count + 1)
    if isinstance(rule, (Choice, Device)):
        return "no-such-option"
    if isinstance(rule, Flag):
        return "maybe"
    if isinstance(rule, (Text, Texts, Node)):
        return 7
    raise AssertionError(f"no bad value for {rule}")


def test_every_config_key_has_a_rule_that_refuses_a_bad_value():
    seen: set[str] = set()
    unruled: list[str] = []
    for script, args in compositions():
        cfg, choices = compose_job(script, args)
        filled = {k for k, v in leaves(cfg) if v is MISSING or (v is None and rule_for(k, script)
                                                                   and not rule_for(k, script).null)}
        for key in filled:  # required values set, so that only the probed value is wrong
            OmegaConf.update(cfg, key, "x")
        validate(cfg, script, choices)
        for key, value in leaves(cfg):
            rule = rule_for(key, script)
            if is_code_key(key):  # _target_ / _partial_ / _convert_: instantiation keys, composed by the user
                continue
            if rule is None:
                unruled.append(f"{script}.py {key}")
                continue
            if (script, key) in seen:
                continue
            seen.add((script, key))
            bad = cfg.copy()
            OmegaConf.update(bad, key, bad_value(rule), merge=False)
            with pytest.raises(UserError, match=re.escape(key)):
                validate(bad, script, choices)
    assert not unruled, f"config keys without a rule in gpt/schema.py RULES: {sorted(set(unruled))}"
    assert len(seen) > 150


# ---- bad files and checkpoints: caught where the file is read --------------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny parent checkpoint, a reward-model checkpoint and bad data files."""
    from stage_helpers import make_parent, write_jsonl

    from gpt.checkpoint import save_checkpoint
    from gpt.heads import RewardModel

    d = tmp_path_factory.mktemp("bad_files")
    parent = make_parent(d / "parent.pt")
    make_parent(d / "reward.pt", model_cls=RewardModel, stage="reward")
    (d / "latin1.jsonl").write_bytes(b'{"prompt": "1+1=", "completion": "caf\xe9"}\n' * 8)
    deep = '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + ', "completion": "2"}\n'
    (d / "deep.jsonl").write_text(deep + '{"prompt": "1+1=", "completion": "2"}\n' * 8)
    write_jsonl(d / "labelled.jsonl", [{"text": "ab", "label": "x"}, {"text": "cd", "label": "y"}])
    raw = torch.load(d / "parent.pt", weights_only=True)
    save_checkpoint({**raw, "step": "seven", "model": "weights"}, d / "wrong_types.pt")
    save_checkpoint({**raw, "tokenizer": {"type": "char", "chars": ""}}, d / "empty_vocab.pt")
    misfit = {**raw, "config": {**raw["config"], "model": {**raw["config"]["model"], "n_embd": 32}}}
    save_checkpoint(misfit, d / "misfit.pt")
    assert parent["path"]
    return d


LOOP = ("trainer.max_iters=2", "trainer.eval_interval=1", "trainer.eval_iters=1", "trainer.batch_size=2")
FILE_PROBES = [
    pytest.param("finetune", ("stage=sft", "ckpt={d}/parent.pt", "data={d}/latin1.jsonl", *LOOP), "latin1.jsonl"),
    pytest.param("finetune", ("stage=sft", "ckpt={d}/parent.pt", "data={d}/deep.jsonl", *LOOP), "deep.jsonl"),
    pytest.param("evaluate", ("ckpt={d}/parent.pt", "instructions={d}/latin1.jsonl"), "latin1.jsonl"),
    pytest.param("evaluate", ("ckpt={d}/reward.pt", "pairs={d}/latin1.jsonl"), "latin1.jsonl"),
    pytest.param("evaluate", ("ckpt={d}/parent.pt", "labelled={d}/labelled.jsonl"), "labelled="),
    pytest.param("infer", ("ckpt={d}/wrong_types.pt",), "wrong_types.pt"),
    pytest.param("infer", ("ckpt={d}/empty_vocab.pt",), "chars=''"),
    pytest.param("infer", ("ckpt={d}/misfit.pt",), "misfit.pt"),
    pytest.param("finetune", ("stage=ppo", "ckpt={d}/parent.pt", "data={d}/labelled.jsonl"), "stage.reward_ckpt"),
]


@pytest.mark.parametrize("script, args, names", FILE_PROBES)
def test_bad_file_is_one_line(script, args, names, files, tmp_path):
    proc = run_here(f"{script}.py", *(a.format(d=files) for a in args), cwd=tmp_path, timeout=120)
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and names in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "evaluations").exists()


@pytest.mark.slow
def test_resume_of_weights_that_do_not_fit_their_config_is_one_line(tmp_path):
    from gpt.checkpoint import save_checkpoint

    run = run_here("train.py", *TINY, "trainer.max_iters=2", "trainer.eval_interval=2", "hydra.run.dir=run",
                     cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    raw = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    save_checkpoint({**raw, "config": {**raw["config"], "model": {**raw["config"]["model"], "n_embd": 64}}},
                    tmp_path / "misfit.pt")
    (tmp_path / "cwd").mkdir()
    proc = run_here("train.py", "resume=../misfit.pt", *LOOP, cwd=tmp_path / "cwd")
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1 and "misfit.pt" in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "cwd" / "outputs").exists()


def test_prompt_reaches_the_model_as_typed(tmp_path):
    """infer.py prompt=<text> unquoted, with characters Hydra's grammar reads as syntax: printed back unchanged
    before the continuation (a char model whose vocabulary holds them)."""
    from gpt.checkpoint import save_checkpoint
    from gpt.model import GPT
    from gpt.parent import model_config
    from gpt.tokenizer import CharTokenizer

    prompt = "今天 a=b, [c] {d} 'e' \"f\" ~/g $h ${i} \\j\\"
    tok = CharTokenizer("".join(sorted(set(prompt + "\n"))))
    model = GPT(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=1, n_embd=8, loss_chunk_size=0)
    save_checkpoint({"model": model.state_dict(), "step": 0, "stage": "pretrain", "tokenizer": tok.identity(),
                     "config": {"model": model_config(model), "seed": 0,
                                "tokenizer": {"_target_": "gpt.tokenizer.CharTokenizer", "vocab_size": tok.vocab_size}}},
                    tmp_path / "chars.pt")
    proc = run_here("infer.py", f"ckpt={tmp_path / 'chars.pt'}", f"prompt={prompt}", "max_new_tokens=3",
                      "temperature=0", "dtype=float32", cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(prompt) and len(proc.stdout) == len(prompt) + 3 + 1  # 3 tokens and a newline
