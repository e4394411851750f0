"""infer.py interactive=true: a terminal conversation. Run as a subprocess with its stdin given the turns and
then end of input: every answer streams to stdout, the second turn's prompt is the whole conversation in the
chat template (the answers equal the decode engine's greedy float32 answers for it), an empty line is
ignored, and end of input ends the session cleanly. A base model continues the text typed so far."""

import io
import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from conftest import ROOT
from gpt.chat import END, SPECIAL, ChatText, answer_stop_ids, chat_tokenizer, encode_chat
from gpt.engine import Sampling, complete
from gpt.errors import UserError
from gpt.inference import encode_prompt, interactive
from gpt.tokenizer import CharTokenizer
from test_openai_api import CHARS, _save, base_model, chat_model

MAX_NEW = 20


def _infer(ckpt: str, stdin: str, interactive: str = "true") -> subprocess.CompletedProcess:
    """infer.py in its own process, greedy in float32, `stdin` typed into it."""
    cmd = [sys.executable, str(ROOT / "infer.py"), f"ckpt={ckpt}", f"interactive={interactive}", "temperature=0",
           "dtype=float32", f"max_new_tokens={MAX_NEW}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)


def _greedy(model, tok, ids: list[int], stop: int | None) -> str:
    """What the decode engine answers for prompt ids, greedy, float32 (the model's own dtype here), as text."""
    return tok.decode(_greedy_ids(model, ids, stop))


def _greedy_ids(model, ids: list[int], stop: int | tuple[int, ...] | None) -> list[int]:
    stops = () if stop is None else stop if isinstance(stop, tuple) else (stop,)
    sampling = Sampling(MAX_NEW, 0.0, stop_ids=stops)
    return complete(model, [ids[-model.config.block_size:]], sampling)[0].new


@pytest.mark.slow
def test_chat_keeps_the_conversation_across_turns(tmp_path):
    model, tok = chat_model(), chat_tokenizer(CharTokenizer(CHARS))
    ckpt = _save(model, {"type": "char", "chars": CHARS, "special": SPECIAL}, tmp_path / "chat.pt")
    turns = ["Hello there", "And then?"]  # both answers show text (not only the template's special tokens)
    r = _infer(ckpt, f"{turns[0]}\n\n   \n{turns[1]}\n")  # blank lines between the turns are ignored
    assert r.returncode == 0, r.stderr

    end, history, answers, shown = answer_stop_ids(tok), [], [], ChatText(tok)  # <|end|>, or a new turn
    for text in turns:
        history.append({"role": "user", "content": text})
        answers.append(shown.decode(_greedy_ids(model, encode_chat(tok, history, generation_prompt=True)[0], end)))
        history.append({"role": "assistant", "content": answers[-1]})
    alone = shown.decode(_greedy_ids(model, encode_chat(tok, history[2:3], generation_prompt=True)[0], end))
    assert alone != answers[1]  # the second answer tells the whole history from the last turn alone
    assert all(answers)
    # one "> " prompt per line read (the two blank ones too), each answer on its own line, a line break at EOF
    assert r.stdout == f"> {answers[0]}\n> > > {answers[1]}\n> \n"


@pytest.mark.slow
def test_base_model_continues_the_typed_text(tmp_path):
    model, tok = base_model(), CharTokenizer(CHARS)
    ckpt = _save(model, {"type": "char", "chars": CHARS}, tmp_path / "base.pt")
    r = _infer(ckpt, "ROMEO:\nand then\n")
    assert r.returncode == 0, r.stderr
    first = _greedy(model, tok, encode_prompt(tok, "ROMEO:\n", 32, note=False), tok.eot_id)
    second = _greedy(model, tok, encode_prompt(tok, f"ROMEO:\n{first}and then\n", 32, note=False), tok.eot_id)
    assert r.stdout == f"> {first}\n> {second}\n> \n"
    assert "text you type is continued" in r.stderr


def _cfg(**over):
    return OmegaConf.create({"ckpt": "m.pt", "num_samples": 1, "chat": False, "max_new_tokens": 5,
                             "temperature": 0.0, "top_k": None, "top_p": None, "seed": 0, "device": "cpu",
                             "use_cache": True, **over})


def test_answers_are_kept_as_generated_ids():
    """The conversation is kept as token ids: each answer as generated, closed by <|end|>, feeds the next turn. An
    answer that starts a new turn (this untrained model answers "Hi" with <|assistant|>, which a char tokenizer
    cannot even encode as text) ends there; the text shown leaves the template's special tokens out (as
    /v1/chat/completions)."""
    model, tok = chat_model(), chat_tokenizer(CharTokenizer(CHARS))
    out = io.StringIO()
    messages = interactive(_cfg(), model, tok, io.StringIO("Hi\n\nBye"), out)  # the last line has no line break
    assert [m["content"] for m in messages[::2]] == ["Hi", "Bye"]
    end, stops = tok.special_id(END), answer_stop_ids(tok)
    first = encode_chat(tok, [{"role": "user", "content": "Hi"}], generation_prompt=True)[0]
    raw = complete(model, [first], Sampling(5, 0.0, stop_ids=(end,)))[0].new  # ended at <|end|> only
    assert "<|assistant|>" in tok.decode(raw)  # the case this test is about
    cut = Sampling(5, 0.0, stop_ids=stops)
    new = complete(model, [first], cut)[0].new
    assert new == raw[:min(raw.index(s) for s in stops if s in raw)]  # the answer ends where the new turn starts
    second = first + new + [end] + encode_chat(tok, [{"role": "user", "content": "Bye"}], generation_prompt=True)[0]
    shown = ChatText(tok)
    want = [shown.decode(new), shown.decode(complete(model, [second[-model.config.block_size:]], cut)[0].new)]
    assert [m["content"] for m in messages[1::2]] == want
    assert out.getvalue() == f"> {want[0]}\n> > {want[1]}\n> \n"


def test_refusals_name_the_value():
    model, tok = chat_model(), chat_tokenizer(CharTokenizer(CHARS))
    with pytest.raises(UserError, match="num_samples=2"):
        interactive(_cfg(num_samples=2), model, tok, io.StringIO(""), io.StringIO())
    with pytest.raises(UserError, match="chat=true needs a chat-tuned checkpoint"):
        interactive(_cfg(chat=True), base_model(), CharTokenizer(CHARS), io.StringIO(""), io.StringIO())


def test_interactive_is_a_validated_key(tmp_path):
    r = _infer(_save(base_model(), {"type": "char", "chars": CHARS}, tmp_path / "b.pt"), "", interactive="maybe")
    assert r.returncode == 2 and "interactive" in r.stderr and r.stdout == ""
