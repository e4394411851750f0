"""lm-evaluation-harness: the gpt-pipeline model class against hand computations and against lm-eval's own `hf`
backend on the exported model, the shipped offline task, the wrapper command line and evaluate.py harness.*."""

import csv
import json
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from inprocess import run_here

from gpt.checkpoint import save_checkpoint
from gpt.errors import UserError
from gpt.model import GPT

harness = pytest.importorskip("gpt.evaluation.harness")  # lm-eval is in the dev extra: CI runs all of this
from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

PipelineLM = harness.PipelineLM
TASK = "shakespeare_word_order"
DOCS = [json.loads(line) for line in (harness.TASKS / f"{TASK}.jsonl").read_text(encoding="utf-8").splitlines()]
CHARS = "".join(sorted({c for d in DOCS for c in d["context"] + " ".join(d["choices"])} | set(" \nabcdefghij:")))
GPT2 = {"type": "tiktoken", "name": "gpt2"}
LLAMA = dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=1, tie_embeddings=False)  # the default's parts


def save_model(path: Path, tokenizer: dict, vocab_size: int, block_size: int = 16, seed: int = 0, **arch) -> Path:
    """A randomly initialised tiny model saved as a checkpoint; its 1-d weights (gains, biases) random too, so a
    norm or bias handled differently anywhere shows in the scores."""
    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=16, dropout=0.0,
               bias=not arch, **arch)
    model = GPT(**cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0 if "ln" in name or "norm" in name else 0.0, 0.3)
            else:
                p.normal_(0.0, 0.3)  # larger than the init: greedy text that varies (for the stop-string test)
    return save_checkpoint({"model": model.state_dict(), "config": {"model": {"_target_": "gpt.model.GPT", **cfg}},
                            "tokenizer": tokenizer, "step": 0}, path)


@pytest.fixture(scope="module")
def char_ckpt(tmp_path_factory) -> Path:
    return save_model(tmp_path_factory.mktemp("harness") / "char.pt", {"type": "char", "chars": CHARS}, len(CHARS),
                      block_size=16, **LLAMA)


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def logprobs(model: GPT, ids: list[int]) -> torch.Tensor:
    """log p(ids[t+1] | ids[:t+1]) for every t by one plain forward pass over ids[:-1] (T-1,)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]]))[0][0].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)


def by_hand(model: GPT, seq: list[int], first: int, block: int = 16) -> float:
    """The log-probability of seq[first:] given seq[:first]: targets in runs of block_size, each run predicted by
    one forward pass over the block_size tokens before its last target (older tokens cut)."""
    total = 0.0
    for start in range(first, len(seq), block):
        end = min(start + block, len(seq))
        lo = max(0, end - 1 - block)
        total += float(logprobs(model, seq[lo:end])[start - lo - 1:].sum())
    return total


# ---- registration -------------------------------------------------------------------------------------------

def test_gpt_pipeline_is_registered_next_to_lm_evals_own_models():
    from lm_eval.api.registry import get_model

    assert get_model("gpt-pipeline") is PipelineLM
    assert get_model("hf").__name__ == "HFLM"  # registering ours first must not hide lm-eval's models


# ---- the requests, by hand ----------------------------------------------------------------------------------

def test_loglikelihood_is_the_sum_of_the_continuations_log_probs(char_ckpt):
    lm = PipelineLM(ckpt=str(char_ckpt), batch_size=3, device="cpu")
    tok = lm.tok
    long_context = "abcdefghij: " * 2 + "abcdefghij"  # 34 characters, more than block_size=16: the oldest are cut
    long_answer = " abc def: ghij" * 2  # 28 characters: scored in two runs of targets
    cases = [("ab", " cd"), ("a", "bcdefg"), (long_context, " hij"), ("j", " a"), ("", "abc"), ("ij", long_answer)]
    got = lm.loglikelihood(requests("loglikelihood", cases), disable_tqdm=True)
    for (context, continuation), (logp, greedy) in zip(cases, got):
        ctx = tok.encode(context) if context else [lm.prefix_token_id]  # lm-eval's empty-context rule
        cont = tok.encode(continuation)
        assert logp == pytest.approx(by_hand(lm.model, ctx + cont, len(ctx)), abs=1e-4)
        if len(cont) <= 16:
            ids = (ctx + cont)[-17:-1]
            with torch.no_grad():
                argmax = lm.model(torch.tensor([ids]))[0][0].argmax(-1)[-len(cont):]
            assert greedy == bool((argmax == torch.tensor(cont)).all())
    assert len(tok.encode(long_context + " hij")) > 16  # the truncated case was one


def test_rolling_loglikelihood_of_a_long_text_is_the_sum_over_its_windows(char_ckpt):
    lm = PipelineLM(ckpt=str(char_ckpt), batch_size=2, device="cpu")
    text = "abc def: ghij\n" * 3  # 42 tokens: two full windows and a partial last one
    seq = [lm.prefix_token_id] + lm.tok.encode(text)
    assert (len(seq) - 1) % 16 and len(seq) - 1 > 2 * 16
    (got,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]), disable_tqdm=True)
    assert got == pytest.approx(by_hand(lm.model, seq, 1), abs=1e-4)
    short, = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [("abc",)]), disable_tqdm=True)
    assert short == pytest.approx(float(logprobs(lm.model, seq[:4]).sum()), abs=1e-5)  # one window


def test_generate_until_stops_at_the_until_string_and_batches_like_alone(char_ckpt):
    lm = PipelineLM(ckpt=str(char_ckpt), batch_size=4, device="cpu")
    contexts = ["abc", "hij: a", "d", "ghi ab"]
    free = lm.generate_until(requests("generate_until", [(c, {"until": [], "max_gen_toks": 24}) for c in contexts]))
    assert all(len(lm.tok.encode(t)) == 24 for t in free)  # no stop: max_gen_toks tokens each
    alone = PipelineLM.from_model(lm.model, lm.tok, batch_size=1)
    assert alone.generate_until(requests("generate_until", [(c, {"until": [], "max_gen_toks": 24})
                                                            for c in contexts])) == free
    stops = [t[6:8] for t in free]  # two characters the free text holds
    cut = lm.generate_until(requests("generate_until", [(c, {"until": [s, "never"], "max_gen_toks": 24})
                                                        for c, s in zip(contexts, stops)]))
    assert cut == [t[:t.index(s)] for t, s in zip(free, stops)]
    assert any(len(c) < len(t) for c, t in zip(cut, free))


def test_chat_template_gives_the_ids_of_gpt_chat(tmp_path):
    from gpt.chat import SPECIAL, encode_chat
    from gpt.tokenizer import from_identity

    identity = {"type": "char", "chars": CHARS, "special": ["<|endoftext|>", *SPECIAL]}
    lm = PipelineLM(ckpt=str(save_model(tmp_path / "chat.pt", identity, len(CHARS) + 5)), device="cpu")
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi: a b"}]
    text = lm.apply_chat_template(messages)
    assert lm.tok_encode(text) == encode_chat(from_identity(identity), messages, generation_prompt=True)[0]
    # an answer ends at <|end|> or end-of-text, or where the model starts a new turn (as serve.py's answers)
    assert lm.stop_ids == tuple(lm.tok.special_id(t) for t in ("<|end|>", "<|endoftext|>", *SPECIAL[:3]))
    plain = PipelineLM(ckpt=str(save_model(tmp_path / "plain.pt", {"type": "char", "chars": CHARS}, len(CHARS))))
    with pytest.raises(UserError, match="needs a chat model"):
        plain.apply_chat_template(messages)


# ---- against lm-eval's own hf backend on the exported model -------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gpt2", "llama-char"])
def test_hf_backend_on_the_export_gives_the_same_loglikelihoods_and_accuracy(tmp_path, kind):
    from lm_eval.models.huggingface import HFLM

    from gpt.interop import export_hf

    if kind == "gpt2":
        ckpt = save_model(tmp_path / "m.pt", GPT2, 50257, block_size=16)
    else:
        # with an end-of-text token: HFLM conditions on it (bos/eos) and fails on a tokenizer that has neither
        ckpt = save_model(tmp_path / "m.pt", {"type": "char", "chars": CHARS, "special": ["<|endoftext|>"]},
                          len(CHARS) + 1, block_size=48, **LLAMA)
    folder = export_hf(str(ckpt), str(tmp_path / "hf"))
    manager = harness.task_manager([TASK])
    results = {}
    for name, lm in (("ours", PipelineLM(ckpt=str(ckpt), batch_size=8, device="cpu")),
                     ("hf", HFLM(pretrained=str(folder), dtype="float32", batch_size=8, device="cpu"))):
        results[name] = simple_evaluate(model=lm, tasks=[TASK], task_manager=manager, limit=40, log_samples=True)
    ours = [resp[0][0] for s in results["ours"]["samples"][TASK] for resp in s["resps"]]
    hf = [resp[0][0] for s in results["hf"]["samples"][TASK] for resp in s["resps"]]
    assert len(ours) == len(hf) == 160  # 40 questions x 4 choices
    torch.testing.assert_close(torch.tensor(ours, dtype=torch.float64), torch.tensor(hf, dtype=torch.float64),
                               atol=1e-4, rtol=0)
    assert len(set(ours)) > 100  # scores that differ: a model that ignored its input would not pass
    for metric in ("acc,none", "acc_norm,none"):
        assert results["ours"]["results"][TASK][metric] == results["hf"]["results"][TASK][metric]
    if kind == "gpt2":  # some questions are longer than block_size: both cut their oldest context tokens
        lm = PipelineLM(ckpt=str(ckpt))
        assert any(len(lm.tok_encode(d["context"] + " " + d["choices"][0])) > 16 for d in DOCS[:40])


@pytest.mark.slow
def test_lm_evals_local_completions_through_serve_gives_our_loglikelihoods(tmp_path, monkeypatch):
    """lm-eval's own OpenAI-API backend (`local-completions`, tokenizer from the server's /tokenize) against serve.py
    on 127.0.0.1: token-id prompts with echo and logprobs score each choice as the in-process model class does."""
    from test_openai_api import KEY, _start

    ckpt = save_model(tmp_path / "m.pt", GPT2, 50257, block_size=128)
    proc, url = _start(str(ckpt), "tiny")
    try:
        monkeypatch.setenv("OPENAI_API_KEY", KEY)
        manager, limit = harness.task_manager([TASK]), 12
        served = simple_evaluate(model="local-completions", model_args={
            "base_url": f"{url}/v1/completions", "model": "tiny", "tokenizer_backend": "remote", "auth_token": KEY,
            "max_length": 128, "num_concurrent": 1, "max_retries": 1}, tasks=[TASK], task_manager=manager,
            limit=limit, log_samples=True)
    finally:
        proc.terminate()
        proc.wait(10)
    ours = simple_evaluate(model=PipelineLM(ckpt=str(ckpt), batch_size=8, device="cpu"), tasks=[TASK],
                           task_manager=manager, limit=limit, log_samples=True)
    got = [[resp[0][0] for resp in s["resps"]] for s in served["samples"][TASK]]
    want = [[resp[0][0] for resp in s["resps"]] for s in ours["samples"][TASK]]
    assert len(got) == limit and all(len(g) == 4 for g in got)
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                               atol=1e-4, rtol=0)
    assert len({round(x, 3) for g in got for x in g}) > 30  # scores that differ from choice to choice
    assert served["results"][TASK]["acc,none"] == ours["results"][TASK]["acc,none"]


# ---- the shipped task ---------------------------------------------------------------------------------------

def test_the_shipped_task_is_what_its_generator_writes_and_ships_in_the_wheel():
    sys.path.insert(0, str(harness.TASKS))
    try:
        import make_shakespeare_word_order as make
    finally:
        sys.path.remove(str(harness.TASKS))
    assert make.render(make.questions(make.held_out_text())) == (harness.TASKS / f"{TASK}.jsonl").read_text()
    assert len(DOCS) == 200 and all(len(set(d["choices"])) == 4 and 0 <= d["label"] < 4 for d in DOCS)
    assert {d["label"] for d in DOCS} == {0, 1, 2, 3}
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["gpt"]
    shipped = {p for pattern in patterns for p in (ROOT / "gpt").glob(pattern)}
    assert {harness.TASKS / f"{TASK}.yaml", harness.TASKS / f"{TASK}.jsonl"} <= shipped


def test_accuracy_on_the_shipped_task_is_argmax_of_our_loglikelihoods(char_ckpt):
    lm = PipelineLM(ckpt=str(char_ckpt), batch_size=8, device="cpu")
    out = simple_evaluate(model=lm, tasks=[TASK], task_manager=harness.task_manager([TASK]), limit=12,
                          log_samples=False)
    scores = lm.loglikelihood(requests("loglikelihood", [(d["context"], " " + c) for d in DOCS[:12]
                                                         for c in d["choices"]]), disable_tqdm=True)
    picks = [max(range(4), key=lambda k: scores[4 * i + k][0]) for i in range(12)]
    assert out["results"][TASK]["acc,none"] == pytest.approx(sum(p == d["label"] for p, d in zip(picks, DOCS)) / 12)


# ---- command lines ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_wrapper_runs_lm_evals_own_command_line(char_ckpt, tmp_path):
    """python -m gpt.evaluation.harness (run in the test process: the same code from sys.argv on)."""
    args = ["gpt.evaluation.harness", "--model", "gpt-pipeline", "--model_args", f"ckpt={char_ckpt},batch_size=4",
            "--tasks", TASK, "--limit", "8", "--output_path", str(tmp_path / "out")]
    proc = run_here("-m", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (written,) = (tmp_path / "out").rglob("results_*.json")
    result = json.loads(written.read_text())["results"][TASK]
    assert result["sample_len"] == 8 and 0.0 <= result["acc,none"] <= 1.0
    assert "gpt-pipeline" in proc.stdout and "acc" in proc.stdout  # lm-eval's own table

    bad = run_here("-m", *args[:4], f"ckpt={char_ckpt},batch_size=auto", *args[5:], cwd=tmp_path)
    assert bad.returncode == 2 and "error: batch_size='auto' must be a positive integer" in bad.stderr


def test_the_wrapper_adds_the_shipped_tasks_unless_given_a_folder():
    shipped = ["--include_path", str(harness.TASKS)]
    assert harness.with_shipped_tasks(["--model", "gpt-pipeline", "--tasks", TASK]) == ["--model", "gpt-pipeline",
                                                                                       "--tasks", TASK, *shipped]
    assert harness.with_shipped_tasks(["ls", "tasks"]) == ["ls", "tasks", *shipped]
    for own in (["--tasks", "t", "--include_path", "mine"], ["--tasks", "t", "--include_path=mine"],
                ["--tasks", "t", "--inc=mine"], ["-h"], []):
        assert harness.with_shipped_tasks(own) == own


def test_model_args_are_checked(char_ckpt, tmp_path):
    with pytest.raises(UserError, match="unknown ckp; accepted: ckpt"):
        PipelineLM.create_from_arg_string(f"ckp={char_ckpt}")
    with pytest.raises(UserError, match="needs a checkpoint"):
        PipelineLM.create_from_arg_string("batch_size=2")
    with pytest.raises(UserError, match="no checkpoint|not found|does not exist|No such"):
        PipelineLM.create_from_arg_string(f"ckpt={tmp_path / 'missing.pt'}")
    lm = PipelineLM.create_from_arg_string(f"ckpt={char_ckpt},batch_size=3", {"batch_size": "1", "device": None})
    assert lm.batch_size == 3  # --model_args wins over lm-eval's own --batch_size default


def test_evaluate_puts_harness_metrics_in_metrics_json_and_the_comparison_table(char_ckpt, tmp_path):
    other = save_model(tmp_path / "other.pt", {"type": "char", "chars": CHARS}, len(CHARS), seed=1, **LLAMA)
    proc = run_here("evaluate.py", "-m", f"ckpt={char_ckpt},{other}", f"harness.tasks=[{TASK}]", "harness.limit=8",
                    "harness.batch_size=4", "samples.num=0", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (tmp_path / "evaluations" / "multirun").glob("*-*-*/*")
    accuracy = []
    for job, ckpt in (("0", char_ckpt), ("1", other)):
        report = json.loads((sweep / job / "metrics.json").read_text())
        assert report["files"]["harness"] == "harness.json"
        lm_eval_results = json.loads((sweep / job / "harness.json").read_text())["results"][TASK]
        assert report["metrics"][f"harness/{TASK}/acc"] == lm_eval_results["acc,none"]
        assert report["metrics"][f"harness/{TASK}/acc_stderr"] == lm_eval_results["acc_stderr,none"]
        lm = PipelineLM(ckpt=str(ckpt))
        scores = lm.loglikelihood(requests("loglikelihood", [(d["context"], " " + c) for d in DOCS[:8]
                                                             for c in d["choices"]]), disable_tqdm=True)
        picks = [max(range(4), key=lambda k: scores[4 * i + k][0]) for i in range(8)]
        assert report["metrics"][f"harness/{TASK}/acc"] == pytest.approx(
            sum(p == d["label"] for p, d in zip(picks, DOCS)) / 8)
        accuracy.append(str(report["metrics"][f"harness/{TASK}/acc"]))
    rows = list(csv.DictReader((sweep / "comparison.csv").open()))
    assert [r[f"harness/{TASK}/acc"] for r in rows] == accuracy


@pytest.mark.parametrize("args, message", [
    pytest.param([f"harness.tasks=[no_such_task_{'x' * 3}]"], "harness.tasks: lm-eval knows no task 'no_such_task_xxx'",
                 marks=pytest.mark.slow),  # after indexing lm-eval's own tasks (~8 s)
    ([f"harness.tasks=[{TASK}]", "harness.include_path=/no/such/folder"], "harness.include_path='/no/such/folder' "
                                                                            "does not exist"),
    ([f"harness.tasks=[{TASK}]", "harness.apply_chat_template=true"],
     "harness.apply_chat_template=true needs a chat model"),
    (["harness.tasks=[]"], "harness.tasks=[] must be null or a non-empty list of non-empty strings"),
    ([f"harness.tasks=[{TASK}]", "harness.limit=0"], "harness.limit=0 must be null or a positive integer"),
])
def test_bad_harness_settings_are_one_line(char_ckpt, tmp_path, args, message):
    proc = run_here("evaluate.py", f"ckpt={char_ckpt}", "samples.num=0", *args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"error: {message}" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---- task folders from elsewhere are code: checked unless trusted ------------------------------------------

PLAIN = {"task": "mine", "dataset_path": "json", "output_type": "multiple_choice", "test_split": "test",
         "doc_to_text": "{{context}}", "doc_to_choice": "{{choices}}", "doc_to_target": "label",
         "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}


def task_folder(folder: Path, extra: str = "", files: dict | None = None, rows: list[dict] | None = None) -> Path:
    """A folder holding one multiple-choice task over the shipped task's JSONL (or `rows`): mine.yaml is PLAIN plus
    the YAML lines `extra`; `files` adds {relative path: text}."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "mine.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows) if rows else
                    (harness.TASKS / f"{TASK}.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    task = {**PLAIN, "dataset_kwargs": {"data_files": {"test": str(data)}}}
    (folder / "mine.yaml").write_text(yaml.safe_dump(task, sort_keys=False) + extra, encoding="utf-8")
    for name, text in (files or {}).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def check(folder: Path) -> None:
    harness.check_tasks(folder, "harness.include_path", "harness.trust_task_code=true")


GADGET_GLOBALS = ["lipsum", "cycler", "joiner", "namespace", "self", "config", "request"]
REFUSED = [  # (YAML lines added to mine.yaml, extra files, what the one-line refusal names)
    ("process_docs: !function utils.first\n", {}, "!function utils.first at process_docs runs Python code"),
    ("process_docs: !function os.system\n", {}, "!function os.system at process_docs runs Python code"),
    ("", {"utils.py": "def first(ds):\n    return ds\n"}, "utils.py: a Python file in the task folder"),
    ("", {"deep/er/helpers.py": ""}, "helpers.py: a Python file in the task folder"),
    ("process_docs: !!python/name:os.system\n", {}, "the YAML tag tag:yaml.org,2002:python/name:os.system"),
    ("description: !custom x\n", {}, "the YAML tag !custom x"),
    ("", {"other.yaml": "task: other\ndataset_path: json\ndataset_kwargs:\n  trust_remote_code: true\n"},
     "other.yaml: dataset_kwargs.trust_remote_code: True lets datasets run a dataset's own code"),
    ("description: \"{{ ''.__class__.__mro__[1] }}\"\n", {}, "the name '__class__' in a template"),
    ("description: \"{{ context | attr('upper') }}\"\n", {}, "the attr filter in a template"),
    ("description: \"{{ context['\\\\x5f\\\\x5fclass\\\\x5f\\\\x5f'] }}\"\n", {}, "the escape in"),
    ("description: \"{{ context['\\\\u005f'] }}\"\n", {}, "the escape in"),
    ("description: \"{{ context['\\\\N{LOW LINE}'] }}\"\n", {}, "the escape in"),
    ("description: \"{{ context['\\\\137'] }}\"\n", {}, "the escape in"),
    ("description: \"{{ context['__doc__'] }}\"\n", {}, "the string '__doc__' in a template"),
    ("description: \"{{ context._x }}\"\n", {}, "the name '_x' in a template"),
    ("description: \"{{ '{0.x}'.format(context) }}\"\n", {}, "the .format() method in a template"),
    *[(f"description: \"{{{{ {g} }}}}\"\n", {}, f"the global {g!r} in a template") for g in GADGET_GLOBALS],
    ("description: \"{% for c in cycler.items %}{% endfor %}\"\n", {}, "the global 'cycler' in a template"),
    ("metric_list:\n  - metric: my_metric\n", {}, "metric_list[0].metric: 'my_metric' is not one of lm-eval's metrics"),
    ("metric_list:\n  - metric: acc\n    hf_evaluate: true\n", {}, "metric_list[0].hf_evaluate: true loads a metric"),
    ("include: ../elsewhere/base.yaml\n", {"../elsewhere/base.yaml": "output_type: multiple_choice\n"},
     "include: ../elsewhere/base.yaml (")
]


@pytest.mark.parametrize("extra, files, message", REFUSED, ids=[m[:40] for _, _, m in REFUSED])
def test_a_task_folder_holding_code_is_refused_in_one_line(tmp_path, extra, files, message):
    folder = task_folder(tmp_path / "tasks", extra, files)
    with pytest.raises(UserError) as refused:
        check(folder)
    text = str(refused.value)
    assert message in text and text.startswith(f"harness.include_path: {folder}")
    assert "harness.trust_task_code=true runs them unchecked" in text and "\n" not in text


def test_a_linked_yaml_or_a_dataset_script_is_refused(tmp_path):
    outside = task_folder(tmp_path / "outside")
    folder = task_folder(tmp_path / "tasks")
    (folder / "linked.yaml").symlink_to(outside / "mine.yaml")
    with pytest.raises(UserError, match=f"linked.yaml: links to {outside / 'mine.yaml'} is outside {folder}"):
        check(folder)
    script = task_folder(tmp_path / "script", "dataset_path: /somewhere/loader.py\n")
    with pytest.raises(UserError, match="dataset_path: '/somewhere/loader.py' is a dataset loading script"):
        check(script)


def test_plain_task_files_pass_the_check(tmp_path):
    """Templates that read the document's fields (filters, indexing, method calls, a '_' as a replacement), an
    include of lm-eval's own task file and the shipped task's bundled_dataset reader are not code of the folder's."""
    import lm_eval.tasks

    arc = Path(lm_eval.tasks.__file__).parent / "arc" / "arc_easy.yaml"
    assert arc.is_file()
    folder = task_folder(tmp_path / "tasks", "description: \"{{ context | replace(' ', '_') | upper }} "
                                              "{{ choices[label] }} {{ context.split(':')[0].strip() }}\"\n",
                         {"more/arc_mine.yaml": f"include: {arc}\ntask: arc_mine\n",
                          "shipped/word_order.yaml": (harness.TASKS / f"{TASK}.yaml").read_text()})
    check(folder)
    check(folder / "mine.yaml")  # a single task file
    check(harness.TASKS)  # shipped (with its generator script): trusted


def test_the_shipped_reader_cannot_be_shadowed_by_a_file_next_to_the_yaml(tmp_path):
    folder = task_folder(tmp_path / "tasks", "custom_dataset: !function gpt.evaluation.harness.bundled_dataset\n",
                         {"gpt/evaluation/harness.py": "raise SystemExit('ran')\n"})
    with pytest.raises(UserError, match="a Python file in the task folder"):
        check(folder)
    with pytest.raises(UserError, match="bundled_dataset at custom_dataset would run .*gpt/evaluation/harness.py"):
        check(folder / "mine.yaml")  # a single file: the folder around it is not checked for .py files


def first_five_task(folder: Path) -> Path:
    """A task whose process_docs is a function of its own (utils.py): it keeps the first five documents."""
    return task_folder(folder, "process_docs: !function utils.first_five\n",
                       {"utils.py": "def first_five(dataset):\n    return dataset.select(range(5))\n"})


def test_evaluate_refuses_a_folder_with_code_and_runs_it_when_trusted(char_ckpt, tmp_path):
    folder = first_five_task(tmp_path / "tasks")
    args = ["evaluate.py", f"ckpt={char_ckpt}", "samples.num=0", "harness.tasks=[mine]",
            f"harness.include_path={folder}"]
    refused = run_here(*args, cwd=tmp_path)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert (f"error: harness.include_path: {folder / 'utils.py'}: a Python file in the task folder"
            in refused.stderr)
    trusted = run_here(*args, "harness.trust_task_code=true", cwd=tmp_path)
    assert trusted.returncode == 0, trusted.stderr[-3000:]
    (report,) = (tmp_path / "evaluations").glob("*/*/harness.json")
    assert json.loads(report.read_text())["n-samples"]["mine"]["effective"] == 5  # the folder's own function ran


def test_a_checked_folder_runs_and_its_templates_render_sandboxed(char_ckpt, tmp_path):
    """A key that comes from the data is not in the file: the scan passes it and the sandbox stops it."""
    clean = task_folder(tmp_path / "clean")
    model = PipelineLM(ckpt=str(char_ckpt), device="cpu")
    out = harness.run_tasks(model.model, model.tok, ["mine"], [str(clean)], limit=4, batch_size=4)
    assert out["results"]["mine"]["acc,none"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    rows = [{**d, "key": "__class__"} for d in DOCS[:4]]
    sneaky = task_folder(tmp_path / "sneaky", "description: \"{{ context[key] }}\"\n", rows=rows)
    check(sneaky)
    with pytest.raises(UserError, match="a task template reached for Python internals .*harness.trust_task_code=true"):
        harness.run_tasks(model.model, model.tok, ["mine"], [str(sneaky)], limit=4, batch_size=4)
    import lm_eval.utils

    assert type(lm_eval.utils.env).__name__ == "Environment"  # lm-eval's own, back after the run


FOLDER_HAS_CODE = "utils.py: a Python file in the task folder"
FILE_HAS_CODE = "!function utils.first_five at process_docs"


@pytest.mark.parametrize("how, message", [(["--include_path", "{folder}"], FOLDER_HAS_CODE),
                                          (["--inc={folder}"], FOLDER_HAS_CODE),  # lm-eval's parser takes it
                                          (["--tasks", "{folder}/mine.yaml"], FILE_HAS_CODE),
                                          (["--tasks", "{folder}"], FOLDER_HAS_CODE)])
def test_the_wrapper_refuses_a_folder_with_code(char_ckpt, tmp_path, how, message):
    folder = first_five_task(tmp_path / "tasks")
    named = [a.format(folder=folder) for a in how]
    tasks = [] if "--tasks" in how else ["--tasks", "mine"]
    proc = run_here("-m", "gpt.evaluation.harness", "--model", "gpt-pipeline", "--model_args", f"ckpt={char_ckpt}",
                    *tasks, *named, "--limit", "2", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"error: {'--tasks' if '--tasks' in how else '--include_path'} " in proc.stderr
    assert message in proc.stderr and "--trust_task_code runs them unchecked" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_the_wrapper_runs_a_trusted_folder_without_passing_the_flag_on(char_ckpt, tmp_path):
    folder = first_five_task(tmp_path / "tasks")
    proc = run_here("-m", "gpt.evaluation.harness", "--trust_task_code", "--model", "gpt-pipeline", "--model_args",
                    f"ckpt={char_ckpt},batch_size=4", "--tasks", "mine", "--include_path", str(folder),
                    "--output_path", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (written,) = (tmp_path / "out").rglob("results_*.json")
    assert json.loads(written.read_text())["n-samples"]["mine"]["effective"] == 5


@pytest.mark.parametrize("missing", ["version", "api"])
def test_an_lm_eval_outside_the_tested_range_is_one_line(monkeypatch, missing):
    import importlib.metadata

    import gpt.evaluation
    from gpt.evaluation import load_harness

    monkeypatch.delitem(sys.modules, "gpt.evaluation.harness")
    monkeypatch.delattr(gpt.evaluation, "harness")
    if missing == "version":
        monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.4.5")
        expected = r"the installed lm-eval 0\.4\.5 is not one this package works with \(lm-eval 0\.4\.5 is outside"
    else:
        monkeypatch.setitem(sys.modules, "lm_eval.tasks._yaml_loader", None)
        expected = r"the installed lm-eval 0\.4\.\d+ is not one this package works with \(import of lm_eval\.tasks"
    with pytest.raises(UserError, match=expected + r'.*\): pip install "lm-eval>=0\.4\.13,<0\.5"$'):
        load_harness()


def test_the_wrapper_checks_the_folder_a_config_file_names(char_ckpt, tmp_path):
    folder = first_five_task(tmp_path / "tasks")
    config = tmp_path / "run.yaml"
    config.write_text(f"include_path: {folder}\ntasks: [mine]\n", encoding="utf-8")
    proc = run_here("-m", "gpt.evaluation.harness", "--config", str(config), "--model", "gpt-pipeline",
                    "--model_args", f"ckpt={char_ckpt}", "--limit", "2", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"error: --config {config}: include_path {folder}: {folder / 'utils.py'}: a Python file" in proc.stderr
    # trusted, the config's folder is the one lm-eval reads (the shipped folder is not put in its place)
    proc = run_here("-m", "gpt.evaluation.harness", "--trust_task_code", "--config", str(config), "--model",
                    "gpt-pipeline", "--model_args", f"ckpt={char_ckpt},batch_size=4", "--output_path",
                    str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (written,) = (tmp_path / "out").rglob("results_*.json")
    assert json.loads(written.read_text())["n-samples"]["mine"]["effective"] == 5


def test_nested_aliases_are_checked_once_and_malformed_yaml_is_one_line(tmp_path):
    """A few hundred bytes of nested YAML aliases stand for 10^12 nodes: each shared object is checked once (the
    scan used to walk every alias, hours for 12 levels), and a refused construct inside still shows. A
    self-containing alias (which lm-eval would recurse into forever), nesting deeper than the parser's recursion and
    a NUL byte in an include are refused in one line."""
    import time

    levels = "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]\n" for i in range(1, 13))
    bomb = task_folder(tmp_path / "bomb", "l0: &l0 [x, y]\n" + levels)
    t0 = time.perf_counter()
    check(bomb)  # clean: passes, quickly
    assert time.perf_counter() - t0 < 10
    hidden = task_folder(tmp_path / "hidden", "l0: &l0 [{trust_remote_code: true}]\n" + levels)
    with pytest.raises(UserError, match="trust_remote_code: True lets datasets run"):
        check(hidden)
    for name, extra, message in (
            ("self", "metric_list: &a [*a]\n", "an alias at metric_list\\[0\\] contains itself"),
            ("deep", "d: " + "[" * 3000 + "]" * 3000 + "\n", "nested too deeply"),
            ("nul", 'include: "a\\0b.yaml"\n', "is not a usable file name")):
        folder = task_folder(tmp_path / name, extra)
        with pytest.raises(UserError, match=message) as refused:
            check(folder)
        assert "\n" not in str(refused.value)
