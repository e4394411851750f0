"""SFT: special tokens that survive save/load, the chat template, JSONL errors, the masked loss by hand."""

import pytest
import torch
import torch.nn.functional as F

from gpt.chat import END, SPECIAL, chat_tokenizer, encode_chat, prompt_ids
from gpt.encoding import lm_batch
from gpt.errors import UserError
from gpt.jsonl import read_instructions, read_pairs
from gpt.parent import grow_vocab
from gpt.stages.sft import SFT
from gpt.tokenizer import CharTokenizer, TiktokenTokenizer, from_identity
from stage_helpers import make_parent, write_jsonl


def test_special_tokens_follow_the_vocab_and_survive_identity():
    tok = chat_tokenizer(CharTokenizer("ab"))
    assert tok.vocab_size == 2 + len(SPECIAL)
    assert tok.special_id("<|user|>") == 2 + SPECIAL.index("<|user|>")
    again = from_identity(tok.identity())
    assert again.identity() == tok.identity() and again.vocab_size == tok.vocab_size
    assert again.decode([0, again.special_id(END), 1]) == "a<|end|>b"
    assert CharTokenizer("ab").identity() == {"type": "char", "chars": "ab"}  # unchanged without specials
    bpe = chat_tokenizer(TiktokenTokenizer("gpt2"))
    end = bpe.special_id(END)
    assert end == 50257 + SPECIAL.index(END) and bpe.decode(bpe.encode("héllo") + [end]) == "héllo<|end|>"
    assert from_identity(bpe.identity()).vocab_size == 50257 + len(SPECIAL)
    with pytest.raises(UserError, match="no special token"):
        CharTokenizer("ab").special_id(END)


def test_chat_template_masks_everything_but_the_answer():
    tok = chat_tokenizer(CharTokenizer("abc"))
    u, a, e = (tok.special_id(t) for t in ("<|user|>", "<|assistant|>", END))
    ids, mask = encode_chat(tok, [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "c"}])
    assert ids == [u, 0, 1, e, a, 2, e]
    assert mask == [False, False, False, False, False, True, True]
    assert prompt_ids(tok, "ab") == [u, 0, 1, e, a]


def test_jsonl_errors_name_file_and_line(tmp_path):
    good = {"prompt": "1+1=", "completion": "2"}
    f = write_jsonl(tmp_path / "d.jsonl", [good, "{not json", good])
    with pytest.raises(UserError, match=r"d\.jsonl:2: not valid JSON"):
        read_instructions(f)
    f = write_jsonl(tmp_path / "d.jsonl", [good, {"prompt": "x"}])
    with pytest.raises(UserError, match=r"d\.jsonl:2: missing key 'completion'"):
        read_instructions(f)
    f = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "robot", "content": "x"}]}])
    with pytest.raises(UserError, match=r"d\.jsonl:1: messages\[0\]"):
        read_instructions(f)
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "chosen": "b"}])
    with pytest.raises(UserError, match=r"d\.jsonl:1: missing key 'rejected'"):
        read_pairs(f)
    with pytest.raises(UserError, match="does not exist"):
        read_instructions(tmp_path / "missing.jsonl")
    rows = write_jsonl(tmp_path / "ok.jsonl", [{"instruction": "say", "input": "a", "response": "b"},
                                               {"messages": [{"role": "system", "content": "s"},
                                                             {"role": "user", "content": "u"},
                                                             {"role": "assistant", "content": "v"}]}])
    convs = read_instructions(rows)
    assert convs[0] == [{"role": "user", "content": "say\na"}, {"role": "assistant", "content": "b"}]
    assert [m["role"] for m in convs[1]] == ["system", "user", "assistant"]


def test_grow_vocab_keeps_parent_rows_and_ties_weights(tmp_path):
    parent = make_parent(tmp_path / "p.pt")
    from gpt.checkpoint import model_from_checkpoint

    old = model_from_checkpoint(parent)
    new = grow_vocab(old, old.config.vocab_size + 4)
    V = old.config.vocab_size
    assert torch.equal(new.lm_head.weight[:V], old.lm_head.weight)
    assert new.lm_head.weight is new.transformer.wte.weight
    x = torch.randint(0, V, (2, 5))
    assert torch.allclose(new(x)[0][..., :V], old(x)[0], atol=1e-6)  # parent tokens' logits unchanged


def test_sft_loss_equals_hand_computed_masked_loss(tmp_path):
    parent = make_parent(tmp_path / "p.pt")
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "1+1=", "completion": "2"},
                                              {"prompt": "12+30=", "completion": "42"},
                                              {"prompt": "3-1=", "completion": "2"}])
    sft = SFT(parent, str(data), val_data=str(data), batch_size=2)
    tok, model = sft.tokenizer, sft.model
    examples = [encode_chat(tok, c) for c in read_instructions(data)[:2]]
    x, y = lm_batch(examples, "cpu")
    loss, _ = sft.loss(model, (x, y))
    logits, _ = model(x)
    # by hand: the answer tokens ("2", <|end|>) and ("4", "2", <|end|>) only, averaged over those 5 tokens
    terms = []
    for row, (ids, mask) in enumerate(examples):
        for t in range(len(ids) - 1):
            if mask[t + 1]:
                terms.append(-F.log_softmax(logits[row, t].float(), -1)[ids[t + 1]])
    assert len(terms) == 5 and int((y >= 0).sum()) == 5
    assert torch.allclose(loss, torch.stack(terms).mean(), atol=1e-5)
    # padding: row 0 is shorter; its padded targets are -1 and padding changes nothing before it
    assert (y[0, len(examples[0][0]) - 1:] == -1).all()
    alone, _ = model(x[:1, : len(examples[0][0]) - 1])
    assert torch.allclose(alone[0], logits[0, : len(examples[0][0]) - 1], atol=1e-5)


def test_sft_learns_and_reports_exact_match(tmp_path):
    parent = make_parent(tmp_path / "p.pt")
    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(3) for b in range(3)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    sft = SFT(parent, str(data), val_data=str(data), batch_size=9, eval_examples=9)
    model = sft.model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = sft.evaluate(model, 2, lambda: torch.autocast("cpu", enabled=False))
    for _ in range(150):
        loss, _ = sft.loss(model, sft.train_batch())
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = sft.evaluate(model, 2, lambda: torch.autocast("cpu", enabled=False))
    assert after["val/loss"] < before["val/loss"] / 3
    assert after["val/exact_match"] > before["val/exact_match"]
    assert after["val/exact_match"] >= 0.3


def test_sft_refuses_a_headed_parent_and_unknown_characters(tmp_path):
    parent = make_parent(tmp_path / "p.pt")
    bad = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "1+1=", "completion": "ZZ"}])
    with pytest.raises(UserError, match="not in this char tokenizer"):
        SFT(parent, str(bad), val_data=str(bad))
    parent["config"]["model"]["_target_"] = "gpt.heads.RewardModel"
    with pytest.raises(UserError, match="stage=sft needs gpt.model.GPT"):
        SFT(parent, str(bad), val_data=str(bad))
