"""evaluate.py on classifier and reward checkpoints: accuracy, confusion matrix, pairwise accuracy."""

import json

import pytest
import torch


from inprocess import run_here
from gpt.chat import chat_tokenizer
from gpt.checkpoint import save_checkpoint
from gpt.evaluation.heads import classifier_metrics, reward_metrics
from gpt.heads import Classifier, RewardModel
from gpt.tokenizer import CharTokenizer

CHARS = "\n +=0123456789abcdefghijklmnopqrstuvwxyz"
SHAPE = dict(block_size=32, n_layer=1, n_head=2, n_embd=16)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_classifier_accuracy_and_confusion_matrix(tmp_path):
    tok = CharTokenizer(CHARS)
    model = Classifier(num_labels=2, vocab_size=tok.vocab_size, **SHAPE).eval()
    x = tok.encode("x")[0]
    # predicts "yes" (index 1) exactly when the text contains an x
    model.classify = lambda idx, lengths: torch.stack([(idx != x).all(1).float(), (idx == x).any(1).float()], 1)
    data = write_jsonl(tmp_path / "c.jsonl", [{"text": "ax", "label": "yes"}, {"text": "ab", "label": "no"},
                                              {"text": "xx", "label": "no"}, {"text": "b", "label": "yes"},
                                              {"text": "x", "label": "yes"}])
    m = classifier_metrics(model, tok, ["no", "yes"], data, batch_size=2, autocast=torch.no_grad)
    assert m["classify/accuracy"] == pytest.approx(3 / 5)
    assert m["classify/confusion"] == [[1, 1], [1, 2]]  # rows: true no, yes; columns: predicted no, yes


def test_reward_pairwise_accuracy(tmp_path):
    tok = chat_tokenizer(CharTokenizer(CHARS))
    model = RewardModel(vocab_size=tok.vocab_size, **SHAPE).eval()
    model.score = lambda idx, lengths, starts: (lengths - starts).float()  # a longer answer (and end marker) scores higher
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "1+1=", "chosen": "22", "rejected": "3"},
                                              {"prompt": "2+2=", "chosen": "4", "rejected": "55"},
                                              {"prompt": "3+3=", "chosen": "666", "rejected": "7"}])
    m = reward_metrics(model, tok, data, batch_size=2, autocast=torch.no_grad)
    assert m["reward/pairwise_accuracy"] == pytest.approx(2 / 3)
    assert m["reward/mean_margin"] == pytest.approx((1 - 1 + 2) / 3)


@pytest.mark.slow
def test_evaluate_py_on_a_classifier_checkpoint(tmp_path):
    tok = CharTokenizer(CHARS)
    torch.manual_seed(0)
    model = Classifier(num_labels=2, vocab_size=tok.vocab_size, **SHAPE).eval()
    cfg = {"_target_": "gpt.heads.Classifier", "num_labels": 2, "vocab_size": tok.vocab_size, **SHAPE}
    ckpt = save_checkpoint({"model": model.state_dict(), "config": {"model": cfg}, "tokenizer": tok.identity(),
                            "step": 5, "labels": ["no", "yes"]}, tmp_path / "cls.pt")
    data = write_jsonl(tmp_path / "c.jsonl", [{"text": t, "label": lab} for t, lab in
                                              [("1+1=2", "yes"), ("1+1=3", "no"), ("2+2=4", "yes"), ("9", "no")]])
    expected = classifier_metrics(model, tok, ["no", "yes"], data, 8, torch.no_grad)
    proc = run_here("evaluate.py", f"ckpt={ckpt}", f"labelled={data}", "samples.num=0", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(next(tmp_path.glob("evaluations/*/*/metrics.json")).read_text())
    assert report["metrics"]["classify/accuracy"] == pytest.approx(expected["classify/accuracy"])
    assert report["metrics"]["classify/confusion"] == expected["classify/confusion"]
    missing = run_here("evaluate.py", f"ckpt={ckpt}", cwd=tmp_path)
    assert missing.returncode == 2 and "pass labelled=" in missing.stderr.strip().splitlines()[-1]
