"""evaluate.py: perplexity and bits per byte, instruction metrics (exact match, BLEU, ROUGE), samples, and
the comparison table of a sweep; metric values checked against hand-computed cases."""

import contextlib
import csv
import glob
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY
from inprocess import run_here
from gpt.data import TextFiles
from gpt.errors import UserError
from gpt.evaluation import check_settings
from gpt.evaluation.generation import cut_at_stop, greedy_answers, instruction_records
from gpt.evaluation.lm import language_model_metrics, split_tokens, windows
from gpt.evaluation.report import compare
from gpt.evaluation.text_metrics import MixedScriptTokenizer, bleu_tokenize, text_metrics
from gpt.jsonl import read_references
from gpt.model import GPT
from gpt.tokenizer import CharTokenizer, TiktokenTokenizer

ALPHABET = "\nabcdefghijklmnopqrstuvwxyzé你"  # 29 characters, two of them multi-byte in UTF-8


def tiny_model(vocab_size: int, block_size: int = 8, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(vocab_size, block_size=block_size, n_layer=1, n_head=2, n_embd=16).eval()


# ---- perplexity and bits per byte -------------------------------------------------------------

def test_uniform_model_perplexity_is_vocab_size():
    tok = CharTokenizer(ALPHABET)
    model = tiny_model(tok.vocab_size)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: the uniform distribution over the vocabulary
    tokens = np.random.default_rng(0).integers(0, tok.vocab_size, 37)  # 36 targets: 4 full windows of 8 + 4
    m = language_model_metrics(model, tokens, tok, batch_size=3)
    assert m["val/perplexity"] == pytest.approx(tok.vocab_size, rel=1e-5)
    assert m["val/loss"] == pytest.approx(math.log(tok.vocab_size), rel=1e-6)
    assert m["val/tokens"] == 36  # padding of the last window is not counted
    n_bytes = sum(len(tok.decode([t]).encode("utf-8")) for t in tokens[1:])
    assert m["val/bytes"] == n_bytes > 36  # é and 你 take 2 and 3 bytes
    assert m["val/bits_per_byte"] == pytest.approx(36 * math.log2(tok.vocab_size) / n_bytes, rel=1e-5)


def reference_nll(model: GPT, tokens: np.ndarray, contexts) -> float:
    """Mean NLL of tokens[p + 1] given tokens[start:p + 1], one full forward pass per target."""
    data = torch.as_tensor(tokens)
    total = 0.0
    for p in range(len(data) - 1):
        start = contexts(p)
        logits, _ = model(data[start:p + 1][None])
        total += float(F.cross_entropy(logits[0, -1:], data[p + 1:p + 2]))
    return total / (len(data) - 1)


@pytest.fixture(scope="module")
def references():
    """A random tiny model, a token stream of 30 and its brute-force mean NLLs (computed once: slow)."""
    tok = CharTokenizer(ALPHABET)
    model = tiny_model(tok.vocab_size, block_size=8, seed=1)
    tokens = np.random.default_rng(1).integers(0, tok.vocab_size, 30)
    with torch.no_grad():
        # disjoint windows: target p sees the tokens of its window up to p
        disjoint = reference_nll(model, tokens, lambda p: p - p % 8)
        # stride 1: every target after the first window sees a full block_size of context
        sliding = reference_nll(model, tokens, lambda p: max(0, p - 7))
    return tok, model, tokens, disjoint, sliding


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_perplexity_is_token_weighted_over_every_target(references, batch_size):
    tok, model, tokens, disjoint, sliding = references
    got = language_model_metrics(model, tokens, tok, batch_size=batch_size)
    assert got["val/loss"] == pytest.approx(disjoint, rel=1e-5)
    strided = language_model_metrics(model, tokens, tok, batch_size=batch_size, stride=1)
    assert strided["val/loss"] == pytest.approx(sliding, rel=1e-5)
    assert strided["val/tokens"] == got["val/tokens"] == 29


def test_windows_cover_each_target_once():
    assert windows(10, 4, 4) == [(0, 4, 0), (4, 8, 0), (8, 9, 0)]
    assert windows(10, 4, 2) == [(0, 4, 0), (2, 6, 2), (4, 8, 2), (6, 9, 2)]
    for n, block, stride in [(2, 4, 4), (50, 8, 3), (50, 8, 8), (9, 8, 1)]:
        assert sum(end - begin - skip for begin, end, skip in windows(n, block, stride)) == n - 1


def test_bad_stride_is_user_error():
    tok = CharTokenizer(ALPHABET)
    with pytest.raises(UserError, match="perplexity.stride=9 must be between 1 and model.block_size=8"):
        language_model_metrics(tiny_model(tok.vocab_size), np.arange(20), tok, stride=9)


@pytest.mark.parametrize("tokenizer", ["char", "gpt2"])
def test_split_tokens_are_the_training_splits(tmp_path, tokenizer):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("To be, or not to be, that is the question. " * 20)
    (corpus / "b.txt").write_text("Whether 'tis nobler in the mind to suffer. " * 20)
    source = TextFiles(str(corpus), val_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    data = source.load(CharTokenizer() if tokenizer == "char" else TiktokenTokenizer("gpt2"))
    for split in ("train", "val"):
        assert np.array_equal(split_tokens(source, data.tokenizer, split), np.asarray(data.split(split)))


def test_text_a_char_vocabulary_lacks_is_user_error(tmp_path):
    path = tmp_path / "zh.txt"
    path.write_text("abc\n你好\n" * 10)
    with pytest.raises(UserError, match=r"evaluating data.path=.*zh.txt.*: character '好' is not in"):
        split_tokens(TextFiles(str(path)), CharTokenizer(ALPHABET), "val")


def test_bytes_of_partial_characters_are_exact_for_bpe():
    tok = TiktokenTokenizer("gpt2")
    ids = tok.encode("naïve 你好 😀")
    assert sum(len(b) for b in tok.enc.decode_tokens_bytes(ids)) == len("naïve 你好 😀".encode("utf-8"))
    model = tiny_model(tok.vocab_size, block_size=8)
    m = language_model_metrics(model, np.asarray(ids), tok)
    assert m["val/bytes"] == len(b"".join(tok.enc.decode_tokens_bytes(ids[1:])))


# ---- instruction metrics ----------------------------------------------------------------------

def test_identical_strings_score_100():
    refs = ["The cat sat on the mat.", "今天天气很好。", "ok then"]  # each has bigrams (ROUGE-2)
    m, items = text_metrics(refs, refs)
    for key in ("exact_match", "bleu", "rouge1", "rouge2", "rougeL"):
        assert m[f"instruct/{key}"] == pytest.approx(100.0), key
    assert m["instruct/n"] == 3 and all(i["exact_match"] for i in items)


def test_known_chinese_pair():
    # hyp 今天天气不错 vs ref 今天天气很好, one token per character (6 each):
    # matching n-grams 4/6, 3/5, 2/4, 1/3 -> BLEU = (4/6 * 3/5 * 2/4 * 1/3) ** (1/4), brevity penalty 1;
    # ROUGE-1 F1 = 4/6, ROUGE-2 F1 = 3/5, ROUGE-L: LCS 今天天气 = 4 -> 4/6
    m, items = text_metrics(["今天天气不错"], ["今天天气很好"])
    assert m["instruct/bleu"] == pytest.approx(100 * (4 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25, abs=1e-6)
    assert m["instruct/rouge1"] == pytest.approx(100 * 4 / 6)
    assert m["instruct/rouge2"] == pytest.approx(100 * 3 / 5)
    assert m["instruct/rougeL"] == pytest.approx(100 * 4 / 6)
    assert m["instruct/exact_match"] == 0.0 and items[0]["bleu_tokenize"] == "zh"
    # the libraries' defaults see one unmatched word (BLEU) or nothing at all (ROUGE) in Chinese text
    import sacrebleu
    from rouge_score import rouge_scorer

    assert sacrebleu.corpus_bleu(["今天天气不错"], [["今天天气很好"]], tokenize="13a").score == 0.0
    assert rouge_scorer.RougeScorer(["rouge1"]).score("今天天气很好", "今天天气不错")["rouge1"].fmeasure == 0.0


def test_mixed_script_tokens_and_bleu_tokenizer_choice():
    assert MixedScriptTokenizer().tokenize("你好，World 42!") == ["你", "好", "world", "42"]
    assert MixedScriptTokenizer().tokenize("東京へ行く") == ["東", "京", "へ", "行", "く"]
    assert bleu_tokenize(["hello world"]) == "13a"
    assert bleu_tokenize(["hello", "你好"]) == "zh"
    assert bleu_tokenize(["東京へ行く"]) == "char"


def test_exact_match_ignores_surrounding_and_repeated_whitespace():
    m, _ = text_metrics([" Paris \n", "Lyon", "new  york"], ["Paris", "lyon", "new york"])
    assert m["instruct/exact_match"] == pytest.approx(200 / 3)  # case still counts: "Lyon" != "lyon"


def test_read_references_both_schemas(tmp_path):
    path = tmp_path / "set.jsonl"
    path.write_text('{"prompt": "2+2=", "completion": "4"}\n\n{"instruction": "你好", "response": "你好！"}\n',
                    encoding="utf-8")
    assert read_references(path) == [{"prompt": "2+2=", "reference": "4", "line": 1},
                                       {"prompt": "你好", "reference": "你好！", "line": 3}]


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": "b",\n', r":2: not valid JSON"),
    ('{"prompt": "a", "answer": "b"}\n', r":1: expected an object with \"prompt\" and \"completion\".*"
                                         r"found \['answer', 'prompt'\]"),
    ('["prompt", "completion"]\n', r":1: expected a JSON object, got list"),
    ('{"prompt": "a", "completion": 4}\n', r":1: \"prompt\" and \"completion\" must be strings"),
    ('\n\n', r"has no records"),
    ('{"prompt": "你", "completion": "b"}\n', r":1: character '你' is not in"),
])
def test_malformed_instructions_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=message) as err:
        instruction_records(path, CharTokenizer("abcdefghijklmnopqrstuvwxyz\n"))
    assert str(path) in str(err.value)


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "b"}\n'.encode("latin-1"),
     ":2: not UTF-8 text (byte 0xe9 at column 16)"),
    (b"[" * 100_000 + b"\n", ":1: JSON nested too deeply to read"),
])
def test_unreadable_instruction_lines_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(UserError, match=re.escape(f"{path}{message}")):
        read_references(path)


def test_greedy_answer_ends_at_stop_string():
    tok = CharTokenizer(ALPHABET)  # "\n" is id 0, the argmax of all-equal logits
    model = tiny_model(tok.vocab_size)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    assert greedy_answers(model, tok, ["abc", "a"], 5, []) == ["\n" * 5] * 2
    assert greedy_answers(model, tok, ["abc"], 5, ["\n\n"]) == [""]
    assert greedy_answers(model, tok, ["abc"], 5) == [""]  # a plain model's default stop: a blank line
    assert cut_at_stop("yes\n\nno\nmaybe", ["\nmaybe", "\n\n"]) == "yes"


def test_comparison_table_of_a_sweep_folder(tmp_path):
    for job, (ckpt, ppl) in enumerate([("runs/a", 12.5), ("runs/b", 9.25)]):
        folder = tmp_path / str(job)
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra" / "overrides.yaml").write_text(f"- ckpt={ckpt}\n- perplexity.max_tokens=100\n")
        report = {"checkpoint": {"path": f"{ckpt}/checkpoints/best.pt", "step": 10 * (job + 1)},
                  "metrics": {"val/perplexity": ppl, **({"instruct/bleu": 30.0} if job else {})}}
        (folder / "metrics.json").write_text(json.dumps(report))
    md, path, text = compare(tmp_path)
    rows = list(csv.DictReader(path.open()))
    assert [r["run"] for r in rows] == ["ckpt=runs/a", "ckpt=runs/b"]  # only what differs between the jobs
    assert [float(r["val/perplexity"]) for r in rows] == [12.5, 9.25]
    assert [r["instruct/bleu"] for r in rows] == ["", "30.0"]  # a metric one job lacks stays empty
    assert md.read_text() == text and "| 1 | ckpt=runs/b | runs/b/checkpoints/best.pt | 20 | 9.2500 | 30.0000 |" in text


# ---- evaluate.py end to end -------------------------------------------------------------------

def test_evaluate_config_composes_with_or_without_data():
    from hydra import compose, initialize_config_dir

    from gpt.config import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "gpt" / "conf"), version_base="1.3"):
        assert compose("evaluate", overrides=["ckpt=x"]).get("data") is None  # the checkpoint's own data
        cfg = compose("evaluate", overrides=["data=text", "data.path=corpus.txt"])
        assert cfg.data._target_ == "gpt.data.TextFiles" and cfg.data.path == "corpus.txt"
        check_settings(cfg)
        with pytest.raises(UserError, match="perplexity.batch_size=0 must be an integer >= 1"):
            check_settings(compose("evaluate", overrides=["perplexity.batch_size=0"]))
        with pytest.raises(UserError, match="perplexity.max_tokens=-3 must be an integer >= 1"):
            check_settings(compose("evaluate", overrides=["perplexity.max_tokens=-3"]))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("evaluate")
    proc = run_here("train.py", *TINY, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = [Path(p) for p in glob.glob(str(cwd / "outputs" / "*-*-*" / "*"))]
    instructions = cwd / "instructions.jsonl"
    instructions.write_text('{"prompt": "ROMEO:", "completion": "What say you?"}\n'
                            '{"instruction": "To be, or not", "response": "to be"}\n')
    return cwd, run, instructions


def scored_by_hand(ckpt: Path, cwd: Path) -> None:
    """evaluate.py's loss on a text file equals the same loss computed here target by target: each token
    predicted from the tokens before it in its block_size window (disjoint windows) by a plain forward pass of
    the float32 model (no batching, padding or ignored targets)."""
    from gpt.inference import load_for_inference

    text = "ROMEO:\nWhat say you, my lord? To be, or not to be.\n" * 9
    (cwd / "hand.txt").write_text(text)
    out = cwd / "hand_eval"
    proc = run_here("evaluate.py", f"ckpt={ckpt}", "data=text", f"data.path={cwd / 'hand.txt'}", "samples.num=0",
                      f"hydra.run.dir={out}", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    model, tok, _ = load_for_inference(str(ckpt), dtype="float32")
    ids = torch.tensor(tok.encode(text))
    block, nll = model.config.block_size, 0.0
    with torch.no_grad():
        for begin in range(0, len(ids) - 1, block):
            x = ids[begin:begin + block]
            logp = torch.log_softmax(model(x[None])[0][0].float(), dim=-1)  # (T, vocab)
            targets = ids[begin + 1:begin + 1 + len(x)]
            nll -= float(logp[torch.arange(len(targets)), targets].sum())
    assert metrics["all/tokens"] == len(ids) - 1
    assert metrics["all/loss"] == pytest.approx(nll / (len(ids) - 1), rel=1e-5)


@pytest.mark.slow
def test_evaluate_a_trained_run(trained):
    cwd, run, instructions = trained
    proc = run_here("evaluate.py", f"ckpt={run}", f"instructions={instructions}", "perplexity.max_tokens=3000",
                      "generation.max_new_tokens=12", "samples.num=2", "samples.max_new_tokens=16", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (folder,) = [Path(p) for p in glob.glob(str(cwd / "evaluations" / "*-*-*" / "*"))]
    report = json.loads((folder / "metrics.json").read_text())
    m = report["metrics"]
    assert report["checkpoint"]["path"] == str(run / "checkpoints" / "best.pt") and report["checkpoint"]["step"] == 6
    assert m["val/tokens"] == 3000 and m["val/bytes"] == 3000  # Shakespeare is ASCII: one byte per char token
    assert m["val/perplexity"] == pytest.approx(math.exp(m["val/loss"]))
    assert m["val/bits_per_byte"] == pytest.approx(m["val/loss"] / math.log(2))
    scored_by_hand(run / "checkpoints" / "best.pt", cwd)  # evaluate.py's loss is the model's, target by target
    assert m["instruct/n"] == 2 and 0.0 <= m["instruct/bleu"] <= 100.0
    rows = [json.loads(line) for line in (folder / "generations.jsonl").read_text().splitlines()]
    assert [r["reference"] for r in rows] == ["What say you?", "to be"]
    assert all(len(r["generation"]) <= 12 and "\n\n" not in r["generation"] for r in rows)
    samples = (folder / "samples.txt").read_text()
    assert samples.count("-" * 40) == 1 and len(samples) > 2 * 16
    assert "| val/perplexity |" in proc.stdout and "| instruct/rougeL |" in proc.stdout


@pytest.mark.slow
def test_evaluate_int8_perplexity_is_close_to_float(trained, tmp_path):
    cwd, run, _ = trained
    ppl, params = {}, {}
    for q in ("null", "int8"):
        out = tmp_path / q
        proc = run_here("evaluate.py", f"ckpt={run}", f"quantize={q}", "perplexity.max_tokens=1000", "samples.num=0",
                          f"hydra.run.dir={out}", cwd=cwd)
        assert proc.returncode == 0, proc.stderr[-3000:]
        report = json.loads((out / "metrics.json").read_text())
        ppl[q], params[q] = report["metrics"]["val/perplexity"], report["checkpoint"]["params"]
        assert f"{params[q]:,} parameters" in proc.stdout
    assert ppl["int8"] != ppl["null"] and abs(ppl["int8"] / ppl["null"] - 1) < 0.02, ppl
    assert params["int8"] == params["null"] > 20_000  # the int8 Linear weights count too
    bad = run_here("evaluate.py", f"ckpt={run}", "quantize=int4", cwd=tmp_path)
    assert bad.returncode == 2 and "quantize='int4'" in bad.stderr


@pytest.mark.slow
def test_evaluate_sweep_writes_one_comparison_table(trained):
    cwd, run, _ = trained
    proc = run_here("evaluate.py", "-m", f"ckpt={run},{run}/checkpoints/last.pt", "perplexity.max_tokens=500",
                      "samples.num=1", "samples.max_new_tokens=4", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = [Path(p) for p in glob.glob(str(cwd / "evaluations" / "multirun" / "*-*-*" / "*"))]
    rows = list(csv.DictReader((sweep / "comparison.csv").open()))
    assert [r["run"] for r in rows] == [f"ckpt={run}", f"ckpt={run}/checkpoints/last.pt"]
    for job, row in enumerate(rows):
        metrics = json.loads((sweep / str(job) / "metrics.json").read_text())["metrics"]
        assert float(row["val/perplexity"]) == metrics["val/perplexity"]
        assert int(row["val/tokens"]) == 500
    assert (sweep / "comparison.md").read_text() in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["ckpt=/no/such/run"], "does not exist"),
    (["ckpt=__run__", "instructions=__bad__"], ":2: not valid JSON"),
    (["ckpt=__run__", "data=text", "data.path=__zh__"], "character '你' is not in"),
    (["plot=__cwd__"], "holds no metrics.jsonl"),
])
def test_bad_evaluation_input_is_one_clear_line(trained, tmp_path, args, message):
    cwd, run, instructions = trained
    (tmp_path / "bad.jsonl").write_text(instructions.read_text().splitlines()[0] + "\n{oops\n")
    (tmp_path / "zh.txt").write_text("ROMEO: 你好\n" * 50)
    subs = {"__run__": str(run), "__bad__": str(tmp_path / "bad.jsonl"), "__zh__": str(tmp_path / "zh.txt"),
            "__cwd__": str(tmp_path)}
    for key, value in subs.items():
        args = [a.replace(key, value) for a in args]
    proc = run_here("evaluate.py", *args, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and message in proc.stderr, proc.stderr
    assert not (tmp_path / "evaluations").exists()  # no half-written run folder, no empty date folder


# ---- chat models: the chat template and its end token ----------------------------------------

def end_token_model(tok) -> GPT:
    """A model whose every greedy step is <|end|>: ln_f outputs a constant vector e, and only <|end|>'s output
    row is e (all logits 0 but <|end|>'s, |e|^2)."""
    from gpt.chat import END

    torch.manual_seed(0)
    model = GPT(tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16, bias=True).eval()
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[tok.special_id(END)] = 1.0
    return model


def test_chat_model_answers_in_its_template_and_stops_at_end(monkeypatch):
    import gpt.evaluation.generation as evaluation
    from gpt.chat import chat_tokenizer, encode_chat, prompt_ids
    from gpt.scoring import chat_exact_match

    tok = chat_tokenizer(CharTokenizer(ALPHABET))
    model = end_token_model(tok)
    seen = []
    real = evaluation.generate_batch
    monkeypatch.setattr(evaluation, "generate_batch", lambda m, ids, *a, **k: seen.append(ids) or real(m, ids, *a, **k))
    assert greedy_answers(model, tok, ["ab", "c"], 10) == ["", ""]  # <|end|> ends the answer, and is not in it
    assert seen == [[prompt_ids(tok, "ab"), prompt_ids(tok, "c")]]  # <|user|> ab <|end|> <|assistant|>
    assert prompt_ids(tok, "ab") == encode_chat(tok, [{"role": "user", "content": "ab"}], generation_prompt=True)[0]
    # the same exact match as the SFT stage's own evaluation on the same records
    records = [{"prompt": "ab", "reference": ""}, {"prompt": "c", "reference": "a"}, {"prompt": "", "reference": ""}]
    convs = [[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["reference"]}]
             for r in records]
    ours = evaluation.instruction_metrics(model, tok, records, 10, None)["instruct/exact_match"]
    stage = 100 * chat_exact_match(model, tok, convs, contextlib.nullcontext, 10)
    assert ours == pytest.approx(stage) == pytest.approx(200 / 3)


# ---- what evaluate.py reads: data= on the command line, or only the bundled corpus of a checkpoint ----

def lm_checkpoint(tmp_path, data, chars=ALPHABET, name="lm.pt"):
    from gpt.checkpoint import save_checkpoint

    model = tiny_model(len(chars), block_size=8)
    cfg = {"_target_": "gpt.model.GPT", **{k: getattr(model.config, k) for k in (
        "vocab_size", "block_size", "n_layer", "n_head", "n_embd")}}
    return save_checkpoint({"model": model.state_dict(), "config": {"model": cfg, "data": data}, "step": 1,
                            "tokenizer": {"type": "char", "chars": chars}}, tmp_path / name)


def compose_evaluate(*overrides):
    from hydra import compose, initialize_config_dir

    from gpt.config import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "gpt" / "conf"), version_base="1.3"):
        return compose("evaluate", overrides=["samples.num=0", *overrides])


@pytest.fixture
def no_reading(monkeypatch, tmp_path):
    """Fail the test if evaluate.py builds a data source, reads a corpus, loads a dataset or turns a config
    node into code; run in tmp_path (the evaluation's folder)."""
    import datasets
    import hydra.utils

    from gpt import data

    def refuse(*a, **k):
        raise AssertionError("evaluate.py built, read or instantiated something a checkpoint named")

    for owner, name in ((data.TextSource, "__init__"), (data.TextFiles, "documents"), (datasets, "load_dataset"),
                        (datasets, "load_from_disk"), (hydra.utils, "instantiate"), (hydra.utils, "get_object")):
        monkeypatch.setattr(owner, name, refuse)
    monkeypatch.chdir(tmp_path)
    return tmp_path


MARKER = "/tmp/gpt-evaluate-marker-must-not-exist"


@pytest.mark.parametrize("data, message", [
    ({"_target_": "gpt.data.TextFiles", "path": "/etc/secret.txt", "val_fraction": 0.1},
     "the checkpoint was trained on text data.path='/etc/secret.txt', which evaluate.py does not re-read from a "
     "checkpoint; pass data=text data.path='/etc/secret.txt' to evaluate on it"),
    ({"_target_": "gpt.data.HFDataset", "name": "someone/dataset", "text_column": "text"},
     "pass data=hf data.name='someone/dataset' to evaluate on it"),
    ({"_target_": "gpt.data.Shakespeare", "plays": ["../../../../etc/passwd"]},
     "has values evaluate.py does not accept (plays=<list>, val_fraction=0.1); pass data=shakespeare"),
    ({"_target_": "gpt.data.Shakespeare", "plays": ["tragedies/hamlet"], "val_fraction": "0.1"}, "does not accept"),
    ({"_target_": "gpt.data.Shakespeare", "plays": ["tragedies/hamlet"], "val_fraction": 1.0}, "does not accept"),
    ({"_target_": "gpt.data.Shakespeare", "plays": ["tragedies/hamlet"], "name": "x"}, "does not accept"),
    ({"path": "sft_train.jsonl", "val_path": None}, "names no text corpus to score (its data: none)"),
    (None, "names no text corpus to score (its data: none)"),
])
def test_a_checkpoints_data_is_named_not_read(no_reading, data, message):
    from gpt.evaluation import evaluate

    cfg = compose_evaluate(f"ckpt={lm_checkpoint(no_reading, data)}")
    with pytest.raises(UserError) as err:
        evaluate(cfg, out=io.StringIO())
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


@pytest.mark.parametrize("data", [
    {"_target_": "gpt.data.TextFiles", "path": {"_target_": "os.system", "_args_": [f"touch {MARKER}"]}},
    {"_target_": "gpt.data.Shakespeare", "plays": [{"_target_": "os.system", "_args_": [f"touch {MARKER}"]}]},
    {"_target_": "gpt.data.Shakespeare", "plays": ["tragedies/hamlet"],
     "val_fraction": {"_target_": "builtins.eval", "_args_": [f"open('{MARKER}', 'w')"]}},
    {"_target_": "gpt.data.Shakespeare", "plays": ["tragedies/hamlet"], "_recursive_": True},
    {"_target_": "os.system", "_args_": [f"touch {MARKER}"]},
    {"_target_": "gpt.data.os.system", "_args_": [f"touch {MARKER}"]},
])
def test_a_checkpoint_whose_data_names_code_is_refused(no_reading, data):
    """Whichever layer refuses it first (loading the checkpoint, or evaluate.py's own check): one line, nothing
    run, nothing read."""
    from gpt.evaluation import evaluate
    from gpt.evaluation.lm import checkpoint_source

    source, note = checkpoint_source({"config": {"data": data}})  # evaluate.py's own check, on its own
    assert source is None and "\n" not in note and "pass data=" in note
    cfg = compose_evaluate(f"ckpt={lm_checkpoint(no_reading, data)}")
    with pytest.raises(UserError) as err:
        evaluate(cfg, out=io.StringIO())
    assert "\n" not in str(err.value) and "data" in str(err.value), str(err.value)
    assert not Path(MARKER).exists()


def test_instructions_need_no_corpus(no_reading, capsys):
    """A chat or imported checkpoint without a corpus evaluate.py may read: instructions are scored, perplexity
    is skipped with one note naming what the checkpoint was trained on."""
    from gpt.evaluation import evaluate

    data = {"_target_": "gpt.data.TextFiles", "path": "/etc/secret.txt"}
    (no_reading / "qa.jsonl").write_text('{"prompt": "ab", "completion": "c"}\n')
    cfg = compose_evaluate(f"ckpt={lm_checkpoint(no_reading, data)}", "instructions=qa.jsonl",
                           "generation.max_new_tokens=3")
    report = evaluate(cfg, out=io.StringIO())
    assert report["metrics"]["instruct/n"] == 1 and not any(k.startswith(("val/", "all/")) for k in report["metrics"])
    assert report["data"]["source"] is None and "pass data=text data.path='/etc/secret.txt'" in report["data"]["note"]
    err = capsys.readouterr().err
    assert err.count("note: ") == 1 and "language-model metrics skipped" in err


def test_the_bundled_corpus_is_rebuilt_from_checked_values(monkeypatch, tmp_path):
    """Without data=, the bundled corpus a checkpoint names is scored (its val split, as training cut it),
    rebuilt by evaluate.py's own code: nothing is instantiated."""
    import hydra.utils

    from gpt.data import Shakespeare
    from gpt.evaluation import evaluate
    from gpt.evaluation.lm import checkpoint_source

    monkeypatch.setattr(hydra.utils, "instantiate", lambda *a, **k: pytest.fail("instantiate called"))
    monkeypatch.chdir(tmp_path)
    source, _ = checkpoint_source({"config": {"data": {"_target_": "gpt.data.Shakespeare",
                                                       "plays": ["tragedies/macbeth"], "val_fraction": 0.2}}})
    assert type(source) is Shakespeare and source.plays == ["tragedies/macbeth"] and source.val_fraction == 0.2
    chars = "".join(sorted(set("".join(source.documents()))))
    data = {"_target_": "gpt.data.Shakespeare", "plays": ["tragedies/macbeth"], "val_fraction": 0.2,
            "cache_dir": "/anything"}
    cfg = compose_evaluate(f"ckpt={lm_checkpoint(tmp_path, data, chars)}", "perplexity.max_tokens=50")
    report = evaluate(cfg, out=io.StringIO())
    assert report["data"] == {"source": "Shakespeare plays ['tragedies/macbeth']", "split": "val"}
    assert report["metrics"]["val/tokens"] == 50


def test_a_file_given_with_data_is_scored_whole(tmp_path, monkeypatch):
    """data= on the command line: every token by default; perplexity.split=val cuts at data.val_fraction,
    and val_fraction=1.0 is the whole file again."""
    from gpt.evaluation import evaluate

    monkeypatch.chdir(tmp_path)
    text = "abcde\n" * 40  # 240 characters
    (tmp_path / "other.txt").write_text(text)
    ckpt = lm_checkpoint(tmp_path, {"_target_": "gpt.data.Shakespeare", "plays": ["tragedies/hamlet"]})
    base = [f"ckpt={ckpt}", "data=text", "data.path=other.txt"]
    whole = evaluate(compose_evaluate(*base), out=io.StringIO())
    assert whole["data"]["split"] == "all" and whole["metrics"]["all/tokens"] == len(text) - 1
    val = evaluate(compose_evaluate(*base, "perplexity.split=val"), out=io.StringIO())["metrics"]
    assert val["val/tokens"] == int(len(text) * 0.1) - 1  # the conf/data/text.yaml cut
    one = evaluate(compose_evaluate(*base, "perplexity.split=val", "data.val_fraction=1.0"), out=io.StringIO())
    assert one["metrics"]["val/tokens"] == len(text) - 1 and one["metrics"]["val/loss"] == whole["metrics"]["all/loss"]
    for bad, message in (("data.val_fraction=0", "data.val_fraction=0 must be a number in (0, 1]"),
                         ("data.val_fraction=1.5", "data.val_fraction=1.5 must be a number in (0, 1]")):
        with pytest.raises(UserError, match=re.escape(message)):
            evaluate(compose_evaluate(*base, bad), out=io.StringIO())
    with pytest.raises(UserError, match="gives 0 train tokens"):
        evaluate(compose_evaluate(*base, "perplexity.split=train", "data.val_fraction=1.0"), out=io.StringIO())


@pytest.mark.parametrize("override, message", [
    ("perplexity.stride=0", "perplexity.stride=0 must be an integer >= 1"),
    ("perplexity.max_tokens=0", "perplexity.max_tokens=0 must be an integer >= 1"),
    ("perplexity.split=test", "perplexity.split='test' must be one of all, val, train"),
    ("labelled=x.jsonl", "labelled= applies to a classifier"),
    ("pairs=x.jsonl", "pairs= applies to a reward model"),
])
def test_settings_that_do_not_apply_are_refused(tmp_path, monkeypatch, override, message):
    from gpt.evaluation import evaluate

    monkeypatch.chdir(tmp_path)
    ckpt = lm_checkpoint(tmp_path, None)
    with pytest.raises(UserError, match=re.escape(message)):
        evaluate(compose_evaluate(f"ckpt={ckpt}", override), out=io.StringIO())


@pytest.mark.slow
def test_evaluate_scores_a_whole_file_from_the_command_line(trained, tmp_path):
    cwd, run, _ = trained
    (tmp_path / "other.txt").write_text("ROMEO: What say you?\n" * 20)  # 420 characters
    counts = {}
    for extra in ([], ["perplexity.split=val", "data.val_fraction=1.0"], ["perplexity.split=val"]):
        out = tmp_path / str(len(counts))
        proc = run_here("evaluate.py", f"ckpt={run}", "data=text", f"data.path={tmp_path / 'other.txt'}",
                          "samples.num=0", f"hydra.run.dir={out}", *extra, cwd=cwd)
        assert proc.returncode == 0, proc.stderr[-3000:]
        report = json.loads((out / "metrics.json").read_text())
        counts[" ".join(extra)] = next(v for k, v in report["metrics"].items() if k.endswith("/tokens"))
    assert counts == {"": 419, "perplexity.split=val data.val_fraction=1.0": 419, "perplexity.split=val": 41}
