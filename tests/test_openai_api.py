"""The OpenAI-compatible API and /metrics: the official `openai` client against serve.py in its own process
on 127.0.0.1 (a base model and a chat model), plus quick in-process checks of shapes and limits."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from gpt.chat import END, SPECIAL, answer_stop_ids, chat_tokenizer, encode_chat  # noqa: E402
from gpt.checkpoint import save_checkpoint  # noqa: E402
from gpt.generate import generate  # noqa: E402
from gpt.model import GPT  # noqa: E402
from gpt.serve import ChatText, Engine, Limits, create_app  # noqa: E402
from gpt.tokenizer import CharTokenizer  # noqa: E402
from conftest import ROOT  # noqa: E402

CHARS = "\n !',.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
SHAPE = dict(block_size=32, n_layer=2, n_head=2, n_embd=32)
KEY = "test-key"


def base_model() -> GPT:
    torch.manual_seed(0)
    return GPT(vocab_size=len(CHARS), **SHAPE).eval()


def chat_model() -> GPT:
    tok = chat_tokenizer(CharTokenizer(CHARS))
    torch.manual_seed(0)
    model = GPT(vocab_size=tok.vocab_size, **SHAPE).eval()
    with torch.no_grad():  # <|end|> outscores "N", this untrained model's favourite after some prompts
        model.lm_head.weight[tok.special_id(END)] = 1.5 * model.lm_head.weight[tok.encode("N")[0]]
    return model


def _save(model: GPT, tokenizer: dict, path) -> str:
    cfg = {"_target_": "gpt.model.GPT", "vocab_size": model.config.vocab_size, **SHAPE}
    return str(save_checkpoint({"model": model.state_dict(), "config": {"model": cfg}, "tokenizer": tokenizer,
                                "step": 1}, path))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(ckpt: str, name: str, *extra: str):
    """serve.py in its own process (float32: exactly the library's numbers), API key required; extra: more
    overrides (later ones win)."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), f"ckpt={ckpt}", f"port={port}", "dtype=float32",
                             f"model_name={name}", f"api_key={KEY}", "limits.max_new_tokens=64", "limits.max_batch=4", *extra],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"serve.py exited: {proc.stderr.read()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("serve.py did not come up in 120 s")


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """{"base": url, "chat": url}: two serve.py processes, stopped at the end of the module."""
    tmp = tmp_path_factory.mktemp("openai")
    procs, urls = [], {}
    try:
        for name, model, tok in [("base", base_model(), {"type": "char", "chars": CHARS}),
                                 ("chat", chat_model(), {"type": "char", "chars": CHARS, "special": SPECIAL})]:
            proc, urls[name] = _start(_save(model, tok, tmp / f"{name}.pt"), name)
            procs.append(proc)
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)


def client(url: str, key: str = KEY) -> "openai.OpenAI":
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def library_greedy(model: GPT, ids: list[int], n: int, stop: int | tuple[int, ...] | None = None) -> list[int]:
    """The library's greedy tokens, cut before the first of the stop ids (a chat answer's: answer_stop_ids)."""
    out = generate(model, torch.tensor([ids]), n, temperature=0)[0, len(ids):].tolist()
    stops = () if stop is None else stop if isinstance(stop, tuple) else (stop,)
    return out[:min((out.index(s) for s in stops if s in out), default=len(out))]


pytestmark = pytest.mark.slow  # most tests use the two server processes (a few seconds to start)


# --- the official client against serve.py -------------------------------------------------------------------

def test_models_lists_the_served_model(servers):
    assert [m.id for m in client(servers["base"]).models.list().data] == ["base"]
    assert client(servers["chat"]).models.retrieve("chat").id == "chat"


def test_greedy_completion_is_the_library_generation_streamed_or_not(servers):
    c, tok = client(servers["base"]), CharTokenizer(CHARS)
    want = tok.decode(library_greedy(base_model(), tok.encode("ROMEO:"), 20))
    r = c.completions.create(model="base", prompt="ROMEO:", max_tokens=20, temperature=0)
    assert r.choices[0].text == want and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (6, 20, 26)
    chunks = list(c.completions.create(model="base", prompt="ROMEO:", max_tokens=20, temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == want and len(chunks) > 2
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].choices[0].text == ""
    assert all(ch.choices[0].finish_reason is None for ch in chunks[:-1])


def test_list_of_prompts_and_n_give_one_choice_each_in_order(servers):
    c, tok = client(servers["base"]), CharTokenizer(CHARS)
    r = c.completions.create(model="base", prompt=["ROMEO:", "To be"], n=2, max_tokens=8, temperature=0)
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    for p, i in [("ROMEO:", 0), ("ROMEO:", 1), ("To be", 2), ("To be", 3)]:
        assert r.choices[i].text == tok.decode(library_greedy(base_model(), tok.encode(p), 8))
    assert r.usage.prompt_tokens == 6 + 5 and r.usage.completion_tokens == 4 * 8


def test_seed_gives_the_same_text_and_n_samples_seed_plus_i(servers):
    c = client(servers["base"])
    ask = dict(model="base", prompt="To be", max_tokens=20, temperature=1.0)
    a, b = (c.completions.create(**ask, seed=7).choices[0].text for _ in range(2))
    assert a == b
    two = c.completions.create(**ask, seed=7, n=2).choices
    assert two[0].text == a and two[1].text == c.completions.create(**ask, seed=8).choices[0].text
    assert two[0].text != two[1].text


def test_stop_strings_cut_the_text_streamed_or_not(servers):
    c = client(servers["base"])
    full = c.completions.create(model="base", prompt="To be", max_tokens=30, temperature=0).choices[0].text
    stop = full[10:12]  # a string the greedy text reaches; it ends the text where it first occurs
    want = full[:full.find(stop)]
    r = c.completions.create(model="base", prompt="To be", max_tokens=30, temperature=0, stop=[stop, "@@"])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 30
    chunks = list(c.completions.create(model="base", prompt="To be", max_tokens=30, temperature=0, stop=stop,
                                       stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == want  # no piece of the stop string went out
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_echo_and_logprobs(servers):
    c, model, tok = client(servers["base"]), base_model(), CharTokenizer(CHARS)
    r = c.completions.create(model="base", prompt="ROMEO:", max_tokens=5, temperature=0, echo=True)
    assert r.choices[0].text.startswith("ROMEO:") and len(r.choices[0].text) == 11
    r = c.completions.create(model="base", prompt="ROMEO:", max_tokens=5, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    ids = tok.encode("ROMEO:")
    with torch.no_grad():
        first = torch.log_softmax(model(torch.tensor([ids]))[0][0, -1].float(), -1)
    assert "".join(lp.tokens) == r.choices[0].text and lp.text_offset == [0, 1, 2, 3, 4]
    assert lp.token_logprobs[0] == pytest.approx(first.max().item(), abs=1e-4)  # greedy: the top token
    assert len(lp.top_logprobs[0]) == 3 and max(lp.top_logprobs[0].values()) == pytest.approx(lp.token_logprobs[0])


def test_chat_uses_the_template_and_stops_at_end_of_answer_streamed_or_not(servers):
    c, model = client(servers["chat"]), chat_model()
    tok = chat_tokenizer(CharTokenizer(CHARS))
    messages = [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Hi"}]
    ids = encode_chat(tok, messages, generation_prompt=True)[0]
    want = library_greedy(model, ids, 40, stop=answer_stop_ids(tok))  # <|end|>, or the start of a new turn
    r = c.chat.completions.create(model="chat", messages=messages, max_tokens=40, temperature=0)
    text = ChatText(tok).decode(want)  # the answer's text leaves the template's special tokens out
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == text
    assert r.choices[0].finish_reason == ("stop" if len(want) < 40 else "length")
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(want)
    chunks = list(c.chat.completions.create(model="chat", messages=messages, max_tokens=40, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want)
    last = chunks[-2].choices[0]  # the finishing chunk carries no text, as OpenAI's (an empty delta)
    assert last.finish_reason == r.choices[0].finish_reason and last.delta.content is None
    assert all(ch.choices[0].finish_reason is None for ch in chunks[:-2])


def test_chat_stops_at_end_of_answer_for_some_prompts(servers):
    """The weight edit makes <|end|> win after some prompts: finish_reason 'stop' is reached and reported."""
    c = client(servers["chat"])
    reasons = {c.chat.completions.create(model="chat", messages=[{"role": "user", "content": p}], max_tokens=30,
                                         temperature=0).choices[0].finish_reason for p in ("Hi", "Hello there", "Yo")}
    assert "stop" in reasons


def test_errors_raise_the_clients_exception_classes(servers):
    c = client(servers["base"])
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="gpt-4", prompt="a", max_tokens=2)
    assert e.value.code == "model_not_found" and e.value.param == "model"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="base", prompt="a", max_tokens=2, frequency_penalty=0.5)
    assert e.value.param == "frequency_penalty" and "not supported" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="base", prompt="a", max_tokens=65)
    assert e.value.param == "max_tokens" and "limits.max_new_tokens" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:  # a base model has no chat template
        c.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}])
    assert "/v1/completions" in e.value.message
    with pytest.raises(openai.BadRequestError, match="unknown field"):
        c.completions.create(model="base", prompt="a", extra_body={"mirostat": 1})
    # the defaults OpenAI clients send are accepted
    r = c.completions.create(model="base", prompt="a", max_tokens=2, user="u", frequency_penalty=0,
                             presence_penalty=0)
    assert r.usage.completion_tokens == 2


def test_the_api_key_is_required_everywhere_but_health(servers):
    url = servers["base"]
    with pytest.raises(openai.AuthenticationError):
        client(url, "wrong").models.list()
    assert httpx.get(url + "/health", timeout=5).status_code == 200
    r = httpx.get(url + "/metrics", timeout=5)
    assert r.status_code == 401 and r.json()["detail"].startswith("missing or wrong API key")
    r = httpx.post(url + "/v1/completions", json={"model": "base", "prompt": "a"}, timeout=5)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def _scrape(url: str) -> dict:
    """/metrics -> {(sample name, labels as a sorted tuple): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(url + "/metrics", headers={"authorization": f"Bearer {KEY}"}, timeout=5)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(r.text) for s in f.samples}


def test_metrics_count_requests_tokens_and_first_tokens(servers):
    url, c = servers["base"], client(servers["base"])
    before = _scrape(url)
    tokens = 0
    for n in (3, 5):
        tokens += c.completions.create(model="base", prompt="ROMEO:", max_tokens=n, temperature=0).usage.completion_tokens
    tokens += len([ch for ch in c.completions.create(model="base", prompt="A", max_tokens=4, n=2, temperature=0,
                                                      stream=True) if ch.choices and ch.choices[0].text])
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope", prompt="a")
    after = _scrape(url)

    def moved(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert moved("gpt_requests_total", endpoint="/v1/completions", status="200") == 3
    assert moved("gpt_requests_total", endpoint="/v1/completions", status="404") == 1
    assert moved("gpt_request_duration_seconds_count", endpoint="/v1/completions") == 4
    assert tokens == 3 + 5 + 8 and moved("gpt_generated_tokens_total") == 16
    assert moved("gpt_time_to_first_token_seconds_count") == 4  # one per row: 1 + 1 + 2
    assert after[("gpt_running_rows", ())] == 0 and after[("gpt_queue_depth", ())] == 0


# --- in-process checks (TestClient) ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def app_client():
    engine = Engine(base_model(), CharTokenizer(CHARS), "cpu", None, "tiny.pt")
    return TestClient(create_app(engine, Limits(max_prompt_chars=50, max_new_tokens=20, max_batch=2,
                                                max_body_bytes=2000)))


@pytest.mark.parametrize("body, status, param", [
    ({"model": "tiny", "prompt": "a", "n": 19}, 400, "n"),                 # 19 rows > max_batch 2 + max_queue 16
    ({"model": "tiny", "prompt": ["a", "b"], "n": 10}, 400, "n"),
    ({"model": "tiny", "prompt": "x" * 51}, 400, "prompt"),                # over max_prompt_chars
    ({"model": "tiny", "prompt": []}, 400, "prompt"),
    ({"model": "tiny", "prompt": [1, 10**6]}, 400, "prompt"),              # a token id outside the vocabulary
    ({"model": "tiny", "prompt": "a", "temperature": "1"}, 400, "temperature"),
    ({"model": "tiny", "prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": "tiny", "prompt": "a", "logit_bias": {"5": 10}}, 400, "logit_bias"),
    ({"model": "tiny", "prompt": "a", "best_of": 3}, 400, "best_of"),
    ({"model": "tiny", "prompt": "€"}, 400, "prompt"),                     # not in the char vocabulary
    ({"prompt": "a"}, 400, "model"),
    ({"model": "tiny", "prompt": "a" * 3000}, 413, None),                  # over max_body_bytes
])
def test_bad_requests_get_openai_errors_and_release_their_slots(app_client, body, status, param):
    r = app_client.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param and err["message"]
    assert app_client.get("/health").json()["in_flight"] == 0


def test_streamed_chunks_are_openai_sse_ending_with_done(app_client):
    with app_client.stream("POST", "/v1/completions", json={"model": "tiny", "prompt": "ROMEO:", "max_tokens": 6,
                                                            "temperature": 0, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)
    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert {c["object"] for c in chunks} == {"text_completion"} and len({c["id"] for c in chunks}) == 1
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"


def test_more_choices_than_max_batch_run_as_slots_free(app_client):
    """n x prompts above max_batch (2): the choices queue and join as rows finish; each equals its own request
    (choice i samples with seed + i), and the batch never runs more than max_batch rows."""
    body = {"model": "tiny", "prompt": ["ROMEO:", "JULIET:"], "n": 3, "max_tokens": 5, "temperature": 0.9,
            "seed": 7}
    r = app_client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == list(range(6))
    for c in choices:
        p, i = divmod(c["index"], 3)
        one = app_client.post("/v1/completions", json={**body, "prompt": body["prompt"][p], "n": 1, "seed": 7 + i})
        assert one.json()["choices"][0]["text"] == c["text"]
    health = app_client.get("/health").json()
    assert health["batching"]["max_batch_seen"] <= 2 and health["in_flight"] == 0


def test_n_choices_take_n_slots_and_a_full_server_answers_503_in_openai_shape():
    import threading

    engine = Engine(base_model(), CharTokenizer(CHARS), "cpu", None, "tiny.pt")
    c = TestClient(create_app(engine, Limits(max_new_tokens=20, max_batch=2, max_queue=0)))  # 2 slots in all
    out = {}
    with engine.lock:  # the model is busy: the n=2 request waits holding both slots
        t = threading.Thread(target=lambda: out.update(r=c.post("/v1/completions", json={
            "model": "tiny", "prompt": "ROMEO:", "n": 2, "max_tokens": 4, "temperature": 0})))
        t.start()
        deadline = time.time() + 10
        while c.get("/health").json()["in_flight"] < 2 and time.time() < deadline:
            time.sleep(0.005)
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_busy"
    t.join()
    assert out["r"].status_code == 200 and len(out["r"].json()["choices"]) == 2
    assert c.get("/health").json()["in_flight"] == 0
