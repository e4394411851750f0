"""stage=completion: documents wrapped in BOS/EOS, windows of long documents, the loss by hand, readers."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gpt.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from gpt.errors import UserError
from gpt.jsonl import read_texts
from gpt.parent import model_config
from gpt.stages.completion import BOS, Completion, document_windows
from gpt.tokenizer import EOT, CharTokenizer, TiktokenTokenizer, from_identity, with_special_tokens
from stage_helpers import make_parent, write_jsonl


def test_windows_cover_every_target_exactly_once():
    ids = list(range(23))
    for block in (4, 5, 22, 23, 40):
        wins = document_windows(ids, block)
        assert all(2 <= len(w) <= block + 1 for w in wins)
        targets = [t for w in wins for t in w[1:]]  # each window predicts all but its first token
        assert targets == ids[1:], block
        assert wins[0][0] == ids[0] and wins[-1][-1] == ids[-1]


def test_document_tokens_char_and_gpt2():
    char = with_special_tokens(CharTokenizer("ab"), [BOS, EOT])
    assert char.special == [BOS, EOT] and char.eot_id == 3 and char.special_id(BOS) == 2
    assert CharTokenizer("ab").eot_id is None
    assert from_identity(char.identity()).eot_id == 3  # survives the checkpoint's identity
    gpt2 = with_special_tokens(TiktokenTokenizer("gpt2"), [BOS, EOT])
    # GPT-2 keeps its own <|endoftext|> (50256) and gets one new row for <|bos|>
    assert gpt2.special == [BOS] and gpt2.special_id(EOT) == gpt2.eot_id == 50256
    assert gpt2.special_id(BOS) == 50257 and gpt2.vocab_size == 50258


def test_read_texts_jsonl_and_txt(tmp_path):
    assert read_texts(write_jsonl(tmp_path / "a.jsonl", [{"text": "ab"}, {"text": "b a"}])) == ["ab", "b a"]
    txt = tmp_path / "docs.txt"
    txt.write_text("first doc\nline two\n\n\nsecond\n")
    assert read_texts(txt) == ["first doc\nline two", "second"]
    with pytest.raises(UserError, match=r"b.jsonl:2: missing key 'text'"):
        read_texts(write_jsonl(tmp_path / "b.jsonl", [{"text": "a"}, {"prompt": "a"}]))
    with pytest.raises(UserError, match="has no text"):
        (tmp_path / "empty.txt").write_text("\n\n")
        read_texts(tmp_path / "empty.txt")


def test_completion_loss_equals_hand_computed_cross_entropy(tmp_path):
    parent = make_parent(tmp_path / "p.pt", block_size=8)
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "ab"}, {"text": "abcdefghijklm"}, {"text": "a b"}])
    obj = Completion(parent, str(data), val_data=str(data), batch_size=4)
    tok = obj.tokenizer
    bos, eos = tok.special_id(BOS), tok.special_id(EOT)
    assert obj.train[0] == ([bos] + tok.encode("ab") + [eos], [True] * 4)
    long = [bos] + tok.encode("abcdefghijklm") + [eos]  # 15 tokens -> windows of 9 (block 8 + 1) and 7
    assert [w for w, _ in obj.train[1:3]] == [long[:9], long[8:]]
    x, y = obj._batch(obj.train)
    assert (y >= 0).sum() == 3 + 14 + 4  # every token after a document's first, padding excluded
    model = obj.model.float()
    loss, _ = obj.loss(model, (x, y))
    with torch.no_grad():
        logits, _ = model(x)
    expected, n = 0.0, 0
    for (ids, _), row in zip(obj.train, logits):
        for t in range(len(ids) - 1):
            expected += float(F.cross_entropy(row[t][None], torch.tensor([ids[t + 1]])))
            n += 1
    assert abs(float(loss) - expected / n) < 1e-5
    assert obj.checkpoint_extra()["document_tokens"] == {"bos": BOS, "eos": EOT}


def test_completion_trains_and_its_checkpoint_rebuilds(tmp_path):
    parent = make_parent(tmp_path / "p.pt", block_size=16)
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "abab"}, {"text": "ab ab"}] * 8)
    obj = Completion(parent, str(data), batch_size=8, seed=0)
    opt = torch.optim.AdamW(obj.model.parameters(), lr=1e-2)
    nullctx = torch.autocast("cpu", enabled=False)
    before = obj.evaluate(obj.model, 4, lambda: nullctx)["val/loss"]
    for _ in range(30):
        loss, _ = obj.loss(obj.model, obj.train_batch())
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = obj.evaluate(obj.model, 4, lambda: nullctx)["val/loss"]
    assert after < before - 0.5
    ckpt = {"model": obj.model.state_dict(), "step": 30, "tokenizer": obj.tokenizer.identity(),
            "config": {"model": obj.checkpoint_extra()["model_config"]}}
    save_checkpoint(ckpt, tmp_path / "c.pt")
    again = model_from_checkpoint(load_checkpoint(tmp_path / "c.pt"))
    assert again.lm_head.weight.shape[0] == obj.tokenizer.vocab_size == len(parent["tokenizer"]["chars"]) + 2
    rows = obj.samples(obj.model.eval(), lambda: nullctx)
    assert len(rows) == 2 and all("->" in r["text"] for r in rows)


def test_completion_refuses_a_headed_parent(tmp_path):
    from gpt.heads import RewardModel

    parent = make_parent(tmp_path / "rm.pt", model_cls=RewardModel, stage="reward")
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "ab"}] * 4)
    with pytest.raises(UserError, match="stage=completion needs gpt.model.GPT"):
        Completion(parent, str(data))


@pytest.mark.slow
def test_finetune_completion_then_infer_stops_at_end_of_text(tmp_path):
    import glob

    from conftest import TINY
    from inprocess import run_here
    from gpt.runs import read_metrics

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat. " * 200)
    proc = run_here("train.py", *TINY, "data=text", f"data.path={corpus}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (pre,) = glob.glob(str(tmp_path / "outputs" / "*-*-*" / "*"))
    docs = write_jsonl(tmp_path / "docs.jsonl", [{"text": "the cat sat."}, {"text": "the mat."}] * 20)
    proc = run_here("finetune.py", "stage=completion", f"ckpt={pre}", f"data={docs}", "trainer.max_iters=60",
                      "trainer.eval_interval=30", "trainer.eval_iters=2", "trainer.batch_size=8", "optimizer.lr=3e-3",
                      "scheduler.schedule.warmup_iters=5", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run,) = [r for r in glob.glob(str(tmp_path / "outputs" / "*-*-*" / "*")) if r != pre]
    ckpt = torch.load(f"{run}/checkpoints/last.pt", weights_only=True)
    assert ckpt["stage"] == "completion" and ckpt["document_tokens"] == {"bos": BOS, "eos": EOT}
    assert ckpt["tokenizer"]["special"] == [BOS, EOT]
    assert Path(run, "loss.png").is_file() and Path(run, "lr.png").is_file() and "peak memory" in proc.stdout
    evals = [r for r in read_metrics(f"{run}/metrics.jsonl") if "val/loss" in r]
    assert [r["step"] for r in evals] == [30, 60] and evals[-1]["val/loss"] < evals[0]["val/loss"]
    # the tuned model ends its documents: infer.py stops at <|endoftext|> long before max_new_tokens
    proc = run_here("infer.py", f"ckpt={run}", 'prompt="the "', "temperature=0", "max_new_tokens=200", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout.rstrip("\n")
    assert text.startswith("the ") and len(text) < 40 and "<|" not in text, text


def test_prompts_of_a_completion_model_start_with_bos():
    from gpt.inference import encode_prompt

    tok = with_special_tokens(CharTokenizer("ab"), [BOS, EOT])
    assert tok.bos_id == 2 and CharTokenizer("ab").bos_id is None and TiktokenTokenizer("gpt2").bos_id is None
    assert encode_prompt(tok, "ba", 8) == [2, 1, 0]
    assert encode_prompt(tok, "", 8) == [2]
    assert encode_prompt(CharTokenizer("ab\n"), "", 8) == [0]  # a plain char model starts from a newline ("\n" = 0)
