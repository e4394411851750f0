"""The HTTP service, through FastAPI's TestClient: every endpoint, streaming, bad bodies, queueing."""

import json
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from gpt.generate import generate  # noqa: E402
from gpt.model import GPT  # noqa: E402
from gpt.serve import Engine, Limits, create_app  # noqa: E402
from gpt.tokenizer import CharTokenizer  # noqa: E402

CHARS = "\n !',.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    model = GPT(vocab_size=len(CHARS), block_size=32, n_layer=2, n_head=2, n_embd=32).eval()
    return Engine(model, CharTokenizer(CHARS), "cpu", None, "tiny.pt")


@pytest.fixture(scope="module")
def client(engine):
    return TestClient(create_app(engine, Limits(max_prompt_chars=100, max_new_tokens=50, max_queue=2)))


def test_health(client):
    r = client.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["model_loaded"] and body["device"] == "cpu"
    assert body["checkpoint"] == "tiny.pt" and body["block_size"] == 32


def test_generate_matches_library_generation(client, engine):
    r = client.post("/generate", json={"prompt": "ROMEO:", "max_new_tokens": 20, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    idx = torch.tensor([engine.tokenizer.encode("ROMEO:")])
    expected = engine.tokenizer.decode(generate(engine.model, idx, 20, temperature=0)[0, idx.size(1):].tolist())
    assert body["completion"] == expected and body["new_tokens"] == 20 and body["finish_reason"] == "length"


def test_same_seed_same_text(client):
    req = {"prompt": "To be", "max_new_tokens": 15, "temperature": 1.0, "top_k": 10, "seed": 5}
    a, b = client.post("/generate", json=req).json(), client.post("/generate", json=req).json()
    assert a["completion"] == b["completion"]


def test_stream_sends_the_same_text_as_events(client):
    req = {"prompt": "ROMEO:", "max_new_tokens": 12, "temperature": 0}
    full = client.post("/generate", json=req).json()["completion"]
    with client.stream("POST", "/generate/stream", json=req) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[len("data: "):]) for line in r.iter_lines() if line.startswith("data: ")]
    assert "".join(e.get("text", "") for e in events) == full
    assert events[-1] == {"done": True, "new_tokens": 12}


@pytest.mark.parametrize("body, status", [
    ({}, 422),                                                   # prompt missing
    ({"prompt": 5}, 422),                                        # wrong type
    ({"prompt": "a", "max_new_tokens": 0}, 422),
    ({"prompt": "a", "max_new_tokens": 51}, 422),                # over the server's limit
    ({"prompt": "a", "temperature": -1}, 422),
    ({"prompt": "a", "top_p": 1.5}, 422),
    ({"prompt": "a", "top_k": 0}, 422),
    ({"prompt": "a", "unknown_field": 1}, 422),
    ({"prompt": "x" * 101}, 422),                                # prompt over the limit
    ({"prompt": "€uro"}, 400),                                   # not in the char vocabulary
    ({"prompt": "a", "chat": True}, 400),                        # no chat template in this checkpoint
])
def test_bad_bodies_get_4xx_and_the_server_keeps_serving(client, body, status):
    r = client.post("/generate", json=body)
    assert r.status_code == status, r.text
    assert "detail" in r.json()
    assert client.get("/health").status_code == 200


def test_malformed_json_is_rejected(client):
    r = client.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422


def test_concurrent_requests_are_queued_not_interleaved(engine):
    app = create_app(engine, Limits(max_new_tokens=50, max_queue=8))
    req = {"prompt": "ROMEO:", "max_new_tokens": 25, "temperature": 0}
    with TestClient(app) as c:
        expected = c.post("/generate", json=req).json()["completion"]
        results = []

        def call():
            results.append(c.post("/generate", json=req).json()["completion"])

        threads = [threading.Thread(target=call) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert results == [expected] * 4  # every concurrent answer equals the answer given alone


def test_chat_request_uses_the_template_and_stops_at_end_of_answer():
    from gpt.chat import END, ChatText, answer_stop_ids, chat_tokenizer, prompt_ids

    tok = chat_tokenizer(CharTokenizer(CHARS))
    torch.manual_seed(0)
    model = GPT(vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32).eval()
    end = tok.special_id(END)
    with torch.no_grad():  # a zero output row for <|end|>: its logit is 0, so greedy decoding may stop on it
        model.lm_head.weight[end] *= 0
    engine = Engine(model, tok, "cpu", None, "chat.pt")
    client = TestClient(create_app(engine, Limits(max_new_tokens=50)))
    r = client.post("/generate", json={"prompt": "Hi", "max_new_tokens": 30, "temperature": 0, "chat": True})
    assert r.status_code == 200, r.text
    ids = torch.tensor([prompt_ids(tok, "Hi")])
    full = generate(model, ids, 30, temperature=0)[0, ids.size(1):].tolist()
    stops = answer_stop_ids(tok)  # <|end|>, end-of-text, or a role token (the start of a new turn)
    expected = full[:min((full.index(s) for s in stops if s in full), default=len(full))]
    assert len(expected) < 30  # this model's answer ends before max_new_tokens
    body = r.json()  # the text leaves the template's special tokens out, as /v1/chat/completions does
    assert body["completion"] == ChatText(tok).decode(expected) and body["new_tokens"] == len(expected)
    assert body["finish_reason"] == "stop" and END not in body["completion"]


def test_a_chat_answer_ends_at_end_of_text_on_every_endpoint():
    """A chat model whose tokenizer has end-of-text stops there on /generate (chat=true) as on
    /v1/chat/completions (the eos ids the export writes), never showing it as text."""
    from gpt.chat import END, answer_stop_ids, chat_tokenizer
    from gpt.tokenizer import TiktokenTokenizer

    tok = chat_tokenizer(TiktokenTokenizer("gpt2"))
    assert answer_stop_ids(tok)[:2] == (tok.special_id(END), tok.eot_id)
    torch.manual_seed(0)
    model = GPT(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16).eval()
    with torch.no_grad():  # end-of-text the greedy choice: its output row a large multiple of a likely one's
        model.lm_head.weight[tok.eot_id] = 30 * model.lm_head.weight[tok.encode("the")[0]]
    client = TestClient(create_app(Engine(model, tok, "cpu", None, "chat.pt"), Limits(max_new_tokens=6)))
    g = client.post("/generate", json={"prompt": "Hi", "chat": True, "max_new_tokens": 6, "temperature": 0}).json()
    v = client.post("/v1/chat/completions", json={"model": "chat", "messages": [{"role": "user", "content": "Hi"}],
                                                  "max_tokens": 6, "temperature": 0}).json()
    assert (g["completion"], g["new_tokens"], g["finish_reason"]) == ("", 0, "stop")
    assert v["choices"][0]["message"]["content"] == "" and v["usage"]["completion_tokens"] == 0


def test_a_chat_answer_that_starts_the_next_turn_ends_there():
    """A chat model that writes <|user|> (the next turn) instead of <|end|> has ended its answer: /generate and
    /v1/chat/completions stop there (finish_reason stop) and show nothing of the turn it started; a plain
    completion (/v1/completions: no chat template) is not cut there."""
    from gpt.chat import chat_tokenizer, encode_chat
    from gpt.tokenizer import TiktokenTokenizer

    tok = chat_tokenizer(TiktokenTokenizer("gpt2"))
    user = tok.special_id("<|user|>")
    torch.manual_seed(0)
    model = GPT(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16).eval()
    with torch.no_grad():  # <|user|> the greedy choice: its output row a large multiple of a likely one's
        model.lm_head.weight[user] = 30 * model.lm_head.weight[tok.encode("the")[0]]
    client = TestClient(create_app(Engine(model, tok, "cpu", None, "chat.pt"), Limits(max_new_tokens=8)))
    prompt = encode_chat(tok, [{"role": "user", "content": "Hi"}], generation_prompt=True)[0]
    assert generate(model, torch.tensor([prompt]), 2, temperature=0.0)[0, -2:].tolist() == [user, user]
    g = client.post("/generate", json={"prompt": "Hi", "chat": True, "max_new_tokens": 8, "temperature": 0}).json()
    v = client.post("/v1/chat/completions", json={"model": "chat", "messages": [{"role": "user", "content": "Hi"}],
                                                  "max_tokens": 8, "temperature": 0}).json()
    assert (g["completion"], g["new_tokens"], g["finish_reason"]) == ("", 0, "stop")
    assert (v["choices"][0]["message"]["content"], v["choices"][0]["finish_reason"]) == ("", "stop")
    assert v["usage"]["completion_tokens"] == 0
    c = client.post("/v1/completions", json={"model": "chat", "prompt": "Hi", "max_tokens": 8, "temperature": 0}).json()
    assert c["choices"][0]["finish_reason"] == "length" and c["usage"]["completion_tokens"] == 8


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_from_config_loads_like_infer(tmp_path, dtype):
    """serve.py builds its engine through load_for_inference with conf/serve.yaml's dtype: weights cast once,
    no autocast; float32 serves exactly what library generation gives."""
    from omegaconf import OmegaConf

    from gpt.checkpoint import save_checkpoint
    from gpt.errors import UserError
    from gpt.serve import engine_from_config

    torch.manual_seed(0)
    cfg = dict(vocab_size=len(CHARS), block_size=32, n_layer=2, n_head=2, n_embd=32)
    model = GPT(**cfg).eval()
    path = save_checkpoint({"model": model.state_dict(), "config": {"model": {"_target_": "gpt.model.GPT", **cfg}},
                            "tokenizer": {"type": "char", "chars": CHARS}, "step": 1}, tmp_path / "m.pt")
    conf = OmegaConf.load(Path(__file__).parents[1] / "gpt" / "conf" / "serve.yaml")
    conf.ckpt, conf.dtype = str(path), dtype
    engine = engine_from_config(conf)
    assert engine.autocast_dtype is None
    assert engine.model.lm_head.weight.dtype is getattr(torch, dtype)
    r = TestClient(create_app(engine)).post("/generate", json={"prompt": "ROMEO:", "max_new_tokens": 20,
                                                                "temperature": 0})
    assert r.status_code == 200 and r.json()["new_tokens"] == 20, r.text
    if dtype == "float32":
        ids = torch.tensor([CharTokenizer(CHARS).encode("ROMEO:")])
        want = generate(model, ids, 20, temperature=0)[0, ids.size(1):].tolist()
        assert r.json()["completion"] == CharTokenizer(CHARS).decode(want)
    conf.dtype = "int4"
    with pytest.raises(UserError, match="dtype='int4'"):
        engine_from_config(conf)


def _run_together(c, engine, n, call):
    """Run call(0) ... call(n - 1) (each sends one request) from threads while the test holds the model
    (engine.lock): the worker cannot start a batch until every request waits, so they form one batch."""
    with engine.lock:
        threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        deadline = time.time() + 10
        while c.get("/health").json()["in_flight"] < n and time.time() < deadline:
            time.sleep(0.005)
    for t in threads:
        t.join()


def _submit_together(c, engine, bodies, path="/generate"):
    """POST the bodies as one batch (see _run_together); returns the responses in order."""
    out = [None] * len(bodies)

    def call(i):
        out[i] = c.post(path, json=bodies[i])

    _run_together(c, engine, len(bodies), call)
    return out


def test_greedy_batch_of_different_prompt_lengths_equals_each_alone(engine):
    app = create_app(engine, Limits(max_new_tokens=50, max_queue=8, max_batch=8))
    # different lengths and max_new_tokens; 40 new tokens run past block_size 32
    bodies = [{"prompt": p, "max_new_tokens": m, "temperature": 0}
              for p, m in [("ROMEO:", 20), ("To be or not", 40), ("A", 7), ("What light through yonder", 30)]]
    with TestClient(app) as c:
        alone = [c.post("/generate", json=b).json() for b in bodies]
        assert c.get("/health").json()["batching"]["max_batch_seen"] == 1
        together = [r.json() for r in _submit_together(c, engine, bodies)]
        stats = c.get("/health").json()["batching"]
    assert stats["max_batch_seen"] == 4 and stats["batch_sizes"] == {"1": 4, "4": 1}
    for a, t, b in zip(alone, together, bodies):
        assert t["completion"] == a["completion"] and t["new_tokens"] == b["max_new_tokens"] == a["new_tokens"]
    idx = torch.tensor([engine.tokenizer.encode("ROMEO:")])  # and alone is the library's generation
    assert alone[0]["completion"] == engine.tokenizer.decode(generate(engine.model, idx, 20, temperature=0)[0, 6:].tolist())


def test_seeded_sampled_requests_give_the_same_text_in_a_batch_as_alone(engine):
    app = create_app(engine, Limits(max_new_tokens=50, max_queue=8))
    bodies = [{"prompt": p, "max_new_tokens": 25, "temperature": t, "top_k": k, "top_p": tp, "seed": s}
              for p, t, k, tp, s in [("ROMEO:", 0.8, 10, None, 1), ("To be", 0.8, 10, None, 2),
                                     ("ROMEO:", 0.8, 10, None, 3), ("Hark", 1.2, None, 0.9, 4),
                                     ("ROMEO:", 0, None, None, None)]]
    with TestClient(app) as c:
        alone = [c.post("/generate", json=b).json()["completion"] for b in bodies]
        together = [r.json()["completion"] for r in _submit_together(c, engine, bodies)]
        assert c.get("/health").json()["batching"]["max_batch_seen"] == 5
    assert together == alone
    assert alone[0] != alone[2]  # the seeds matter: each row samples with its own generator


def test_finished_rows_leave_the_batch_and_stop_at_their_stop_token():
    """Chat rows stop at <|end|> at different steps; the others go on and still match their lone text."""
    from gpt.chat import END, chat_tokenizer

    tok = chat_tokenizer(CharTokenizer(CHARS))
    torch.manual_seed(0)
    model = GPT(vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32).eval()
    with torch.no_grad():  # <|end|> outscores "N", this untrained model's favourite after some prompts
        model.lm_head.weight[tok.special_id(END)] = 1.5 * model.lm_head.weight[tok.encode("N")[0]]
    eng = Engine(model, tok, "cpu", None, "chat.pt")
    bodies = [{"prompt": p, "max_new_tokens": 30, "temperature": 0, "chat": True} for p in ("Hi", "Hello there", "Yo")]
    bodies.append({"prompt": "ROMEO:", "max_new_tokens": 30, "temperature": 0.8, "top_k": 20, "seed": 9})
    with TestClient(create_app(eng, Limits(max_new_tokens=50))) as c:
        alone = [c.post("/generate", json=b).json() for b in bodies]
        together = [r.json() for r in _submit_together(c, eng, bodies)]
        assert c.get("/health").json()["batching"]["max_batch_seen"] == 4
    assert {a["finish_reason"] for a in alone} == {"stop", "length"}  # rows finish at different steps
    assert [(t["completion"], t["new_tokens"], t["finish_reason"]) for t in together] == \
        [(a["completion"], a["new_tokens"], a["finish_reason"]) for a in alone]


def test_streams_in_one_batch_send_the_same_text_as_generate(engine):
    app = create_app(engine, Limits(max_new_tokens=50, max_queue=8))
    bodies = [{"prompt": p, "max_new_tokens": 15, "temperature": 0.8, "top_k": 10, "seed": i}
              for i, p in enumerate(["ROMEO:", "To be or", "A"])]
    with TestClient(app) as c:
        full = [c.post("/generate", json=b).json()["completion"] for b in bodies]
        out = [None] * len(bodies)

        def stream(i):
            with c.stream("POST", "/generate/stream", json=bodies[i]) as r:
                out[i] = [json.loads(ln[len("data: "):]) for ln in r.iter_lines() if ln.startswith("data: ")]

        _run_together(c, engine, len(bodies), stream)
        assert c.get("/health").json()["batching"]["max_batch_seen"] == 3
    for events, text in zip(out, full):
        assert "".join(e.get("text", "") for e in events) == text
        assert events[-1] == {"done": True, "new_tokens": 15}


def test_more_than_max_queue_waiting_beyond_a_full_batch_get_503(engine):
    app = create_app(engine, Limits(max_new_tokens=50, max_queue=1, max_batch=2))
    body = {"prompt": "ROMEO:", "max_new_tokens": 5, "temperature": 0}
    with TestClient(app) as c:
        out = []
        with engine.lock:  # the model is busy: 2 (a batch) + 1 (max_queue) are admitted, the 4th is not
            threads = [threading.Thread(target=lambda: out.append(c.post("/generate", json=body))) for _ in range(3)]
            for t in threads:
                t.start()
            deadline = time.time() + 10
            while c.get("/health").json()["in_flight"] < 3 and time.time() < deadline:
                time.sleep(0.005)
            r = c.post("/generate", json=body)
            assert r.status_code == 503 and "busy" in r.json()["detail"]
        for t in threads:
            t.join()
        assert [x.status_code for x in out] == [200] * 3
        assert c.get("/health").json()["batching"]["batch_sizes"] == {"2": 1, "1": 1}


def test_max_batch_1_serves_one_request_at_a_time(engine):
    app = create_app(engine, Limits(max_new_tokens=50, max_queue=8, max_batch=1))
    bodies = [{"prompt": "ROMEO:", "max_new_tokens": 10, "temperature": 0}] * 3
    with TestClient(app) as c:
        texts = {r.json()["completion"] for r in _submit_together(c, engine, bodies)}
        assert c.get("/health").json()["batching"]["batch_sizes"] == {"1": 3}
    assert len(texts) == 1


def test_the_worker_and_the_submitting_thread_let_their_idle_openmp_helpers_go(monkeypatch):
    """gpt.native.release_idle_threads is called by the thread that hands a request over (the event loop's idle
    OpenMP pool) and by the worker whenever it goes idle: idle pools slow every parallel region of the worker."""
    from gpt import native

    calls = []
    monkeypatch.setattr(native, "release_idle_threads", lambda: calls.append(threading.current_thread().name))
    torch.manual_seed(0)
    tok = CharTokenizer(CHARS)
    model = GPT(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16).eval()
    client = TestClient(create_app(Engine(model, tok, "cpu", None, "m.pt"), Limits(max_new_tokens=4)))
    r = client.post("/generate", json={"prompt": "ab", "max_new_tokens": 3, "temperature": 0})
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 5
    while "gpt-batcher" not in calls and time.monotonic() < deadline:  # idle once the request is answered
        time.sleep(0.01)
    assert "gpt-batcher" in calls and any(name != "gpt-batcher" for name in calls)


def test_an_answer_cut_where_it_starts_a_new_turn_is_the_same_streamed_or_not():
    """After some text, a role token ends the answer: the text before it, finish_reason stop, completion_tokens
    counting the answer's tokens, the same whether streamed or not (a small model whose greedy answer writes a few
    characters and then <|user|> or another role token, found among seeds)."""
    from gpt.chat import SPECIAL, ChatText, answer_stop_ids, chat_tokenizer, encode_chat

    tok = chat_tokenizer(CharTokenizer(CHARS))
    roles, stops = {tok.special_id(t) for t in SPECIAL[:3]}, answer_stop_ids(tok)
    msgs = [{"role": "user", "content": "Hi"}]
    ids = encode_chat(tok, msgs, generation_prompt=True)[0]
    for seed in range(200):
        torch.manual_seed(seed)
        model = GPT(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16).eval()
        with torch.no_grad():
            model.lm_head.weight[tok.special_id("<|user|>")] *= 3
        out = generate(model, torch.tensor([ids]), 12, temperature=0)[0, len(ids):].tolist()
        cut = next((i for i, t in enumerate(out) if t in stops), None)
        if cut is not None and cut >= 3 and out[cut] in roles:
            break
    else:
        pytest.fail("no seed gives an answer that starts a new turn after some text")
    want = ChatText(tok).decode(out[:cut])
    c = TestClient(create_app(Engine(model, tok, "cpu", None, "chat.pt"), Limits(max_new_tokens=12)))
    body = {"model": "chat", "messages": msgs, "max_tokens": 12, "temperature": 0}
    v = c.post("/v1/chat/completions", json=body).json()
    assert (v["choices"][0]["message"]["content"], v["choices"][0]["finish_reason"]) == (want, "stop")
    assert v["usage"]["completion_tokens"] == cut
    r = c.post("/v1/chat/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}})
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert "".join(ch["delta"].get("content", "") for d in chunks for ch in d["choices"]) == want
    assert [ch["finish_reason"] for d in chunks for ch in d["choices"] if ch["finish_reason"]] == ["stop"]
    assert chunks[-1]["usage"]["completion_tokens"] == cut
