"""The HTTP service under hostile or unlucky clients: no request can keep its slot, every answer is JSON,
bodies are bounded, an API key guards every path but /health, and a client that goes away stops its row."""

import json
import random
import socket
import threading
import time
from contextlib import contextmanager

import pytest
import torch

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

import gpt.serve as serve_mod  # noqa: E402
from gpt.model import GPT  # noqa: E402
from gpt.serve import SEED_MAX, Engine, Limits, create_app  # noqa: E402
from gpt.tokenizer import CharTokenizer  # noqa: E402

CHARS = "\n !',.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
SMALL = dict(max_prompt_chars=100, max_new_tokens=8, max_queue=2, max_batch=2)  # 4 slots in all


def tiny_engine() -> Engine:
    torch.manual_seed(0)
    model = GPT(vocab_size=len(CHARS), block_size=32, n_layer=2, n_head=2, n_embd=32).eval()
    return Engine(model, CharTokenizer(CHARS), "cpu", None, "tiny.pt")


@pytest.fixture(scope="module")
def engine():
    return tiny_engine()


def strict_json(text: str):
    """json.loads that refuses NaN/Infinity, as a browser's JSON.parse does."""
    def bad(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=bad)


def in_flight(c) -> int:
    return c.get("/health").json()["in_flight"]


def post_raw(c, body: bytes, path: str = "/generate", **headers):
    return c.post(path, content=body, headers={"content-type": "application/json", **headers})


# --- validation: every field's range, answered 422 in JSON, the slot never taken -------------------------

@pytest.mark.parametrize("field, value", [
    ("seed", 2**64), ("seed", SEED_MAX + 1), ("seed", -1), ("seed", "5"), ("seed", 1.5),
    ("temperature", -0.1), ("temperature", 5.5), ("temperature", 1e-300), ("temperature", "hot"),
    ("temperature", True), ("top_k", 0), ("top_k", -5), ("top_k", 2.0), ("top_p", 0), ("top_p", 1e-300),
    ("top_p", 1.01), ("max_new_tokens", 0), ("max_new_tokens", 9), ("max_new_tokens", 10**30),
    ("max_new_tokens", "8"), ("chat", "yes"), ("chat", 1), ("prompt", None), ("prompt", ["a"]),
    ("prompt", "x" * 101), ("prompt", "\ud800"), ("extra", 1),
])
def test_out_of_range_fields_get_422_and_hold_no_slot(engine, field, value):
    c = TestClient(create_app(engine, Limits(**SMALL)))
    r = post_raw(c, json.dumps({"prompt": "ROMEO:", field: value}).encode())  # \ud800 escaped, as JSON allows
    assert r.status_code == 422, r.text
    detail = strict_json(r.text)["detail"]
    assert any(field in e["loc"] for e in detail), detail
    assert in_flight(c) == 0


def test_the_largest_seed_is_served(engine):
    c = TestClient(create_app(engine, Limits(**SMALL)))
    r = c.post("/generate", json={"prompt": "ROMEO:", "seed": SEED_MAX, "temperature": 1.0, "max_new_tokens": 4})
    assert r.status_code == 200 and r.json()["new_tokens"] == 4, r.text


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e400"])
@pytest.mark.parametrize("field", ["temperature", "top_p"])
def test_nan_and_infinity_get_a_clean_422_in_json(engine, field, token):
    c = TestClient(create_app(engine, Limits(**SMALL)))
    r = post_raw(c, f'{{"prompt": "ROMEO:", "{field}": {token}}}'.encode())
    assert r.status_code == 422 and r.headers["content-type"] == "application/json", r.text
    detail = strict_json(r.text)["detail"]
    assert detail[0]["loc"] == ["body", field] and "finite" in detail[0]["msg"]
    assert in_flight(c) == 0


# --- slots: released whatever fails inside a request ------------------------------------------------------

def test_many_bad_requests_then_a_good_one_is_served(engine):
    """The seed that used to leak a slot, 6 times the server's 4 slots, among other bad bodies."""
    c = TestClient(create_app(engine, Limits(**SMALL)))
    bad = [b'{"prompt": "a", "seed": 18446744073709551616}', b'{"prompt": "a", "temperature": NaN}',
           b'{"prompt": "a", "max_new_tokens": 1e999}', b'{"prompt": "\xff\xfe"}', b"{not json"]
    for i in range(24):
        assert post_raw(c, bad[i % len(bad)]).status_code in (400, 422)
    assert in_flight(c) == 0
    r = c.post("/generate", json={"prompt": "ROMEO:", "max_new_tokens": 4, "temperature": 0})
    assert r.status_code == 200 and r.json()["new_tokens"] == 4


def test_a_request_that_fails_after_taking_its_slot_gives_it_back(engine, monkeypatch):
    """Whatever raises once the ticket is taken (here: building the job, where a bad seed used to raise),
    the Guard's finally releases the slot: 3x the slots of failing requests, then a good one."""
    real = serve_mod.Job.__init__

    def job_init(self, engine, ids, req, *a, **k):
        if req.seed == 13:
            raise RuntimeError("seed 13 breaks the job")
        real(self, engine, ids, req, *a, **k)

    monkeypatch.setattr(serve_mod.Job, "__init__", job_init)
    c = TestClient(create_app(engine, Limits(**SMALL)), raise_server_exceptions=False)
    for path in ["/generate", "/generate/stream"] * 6:
        r = c.post(path, json={"prompt": "ROMEO:", "seed": 13})
        assert r.status_code == 500 and strict_json(r.text)["detail"] == "internal error: RuntimeError"
    assert in_flight(c) == 0
    assert c.post("/generate", json={"prompt": "ROMEO:", "max_new_tokens": 3}).status_code == 200


def test_a_row_whose_sampling_fails_fails_alone_and_frees_its_slot(engine, monkeypatch):
    """One row's sampling error answers that request with a JSON 500; its batch-mate gets its text."""
    real = serve_mod.sample_next

    def sample(logits, temperature, *a):
        if temperature == 0.5:
            raise RuntimeError("probability tensor contains nan")
        return real(logits, temperature, *a)

    monkeypatch.setattr(serve_mod, "sample_next", sample)
    good = {"prompt": "ROMEO:", "max_new_tokens": 6, "temperature": 0}
    bad = {"prompt": "To be", "max_new_tokens": 6, "temperature": 0.5}
    with TestClient(create_app(engine, Limits(**SMALL))) as c:
        alone = c.post("/generate", json=good).json()["completion"]
        out = {}

        def call(name, body):
            out[name] = c.post("/generate", json=body)

        with engine.lock:  # both wait for the model, so the worker takes them as one batch
            threads = [threading.Thread(target=call, args=a) for a in (("good", good), ("bad", bad))]
            for t in threads:
                t.start()
            deadline = time.time() + 10
            while in_flight(c) < 2 and time.time() < deadline:
                time.sleep(0.005)
        for t in threads:
            t.join()
        assert c.get("/health").json()["batching"]["max_batch_seen"] == 2
        assert in_flight(c) == 0
    assert out["good"].status_code == 200 and out["good"].json()["completion"] == alone
    assert out["bad"].status_code == 500 and "generation failed" in strict_json(out["bad"].text)["detail"]


def test_a_row_whose_text_fails_fails_alone_and_the_worker_goes_on(monkeypatch):
    """An exception while turning a row's tokens into text (here: an id its tokenizer cannot decode, as from a
    model whose vocabulary outgrows its tokenizer's) fails that request only: the worker thread lives on and
    serves the next request, and no slot is kept."""
    engine = tiny_engine()
    real = engine.tokenizer.decode

    def decode(ids):
        if len(ids) >= 3 and engine.tokenizer.failing:
            raise IndexError("list index out of range")
        return real(ids)

    engine.tokenizer.failing = True
    monkeypatch.setattr(engine.tokenizer, "decode", decode)
    with TestClient(create_app(engine, Limits(**SMALL)), raise_server_exceptions=False) as c:
        for path, stream in (("/generate", False), ("/generate/stream", True), ("/v1/completions", False),
                             ("/v1/completions", True)):
            body = {"prompt": "ROMEO:", "max_new_tokens": 5, "temperature": 0}
            if path.startswith("/v1"):
                body = {"model": "tiny", "prompt": "ROMEO:", "max_tokens": 5, "temperature": 0, "stream": stream}
            r = c.post(path, json=body)
            text = r.text
            assert (r.status_code == 500 or "error" in text) and "IndexError" in text
            if path.startswith("/v1") and stream:  # an error chunk, and the stream still ends as streams do
                assert text.rstrip().endswith("data: [DONE]")
        engine.tokenizer.failing = False
        r = c.post("/generate", json={"prompt": "ROMEO:", "max_new_tokens": 5, "temperature": 0})
        assert r.status_code == 200 and len(r.json()["completion"]) == 5
        assert in_flight(c) == 0


def test_the_worker_survives_its_own_failure(engine, monkeypatch):
    """An exception in the worker's own code (here admitting requests) answers the running requests with an error
    and the worker goes on: later requests are served."""
    real, calls = serve_mod.Batcher._admit, []

    def admit(self):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("the worker's own bug")
        return real(self)

    monkeypatch.setattr(serve_mod.Batcher, "_admit", admit)
    with TestClient(create_app(engine, Limits(**SMALL)), raise_server_exceptions=False) as c:
        r = c.post("/generate", json={"prompt": "ROMEO:", "max_new_tokens": 3, "temperature": 0})
        assert r.status_code == 200 and len(r.json()["completion"]) == 3  # waited in `pending`, then served
        assert len(calls) > 1 and serve_mod.Batcher._admit is admit
        assert in_flight(c) == 0


@contextmanager
def worker(engine, max_batch: int, max_new_tokens: int):
    """A Batcher of its own, an event loop for its jobs, and a function making a greedy /generate job."""
    import asyncio

    from gpt.serve import Batcher, GenerateRequest, Job

    loop = asyncio.new_event_loop()
    req = GenerateRequest(prompt="ROMEO:", max_new_tokens=max_new_tokens, temperature=0)
    ids = engine.encode(req)
    try:
        yield Batcher(engine, max_batch=max_batch, wait_ms=0), lambda: Job(engine, ids, req, loop, stream=False)
    finally:
        loop.close()


def test_requests_cancelled_while_waiting_leave_the_queue(engine):
    """Clients that go away while the batch is full are dropped from the queue at the next step, not when a slot
    frees: the queue (and /metrics' queue depth) never holds requests nobody waits for."""
    with worker(engine, 1, 5000) as (batcher, job):
        with engine.lock:
            running = job()
            batcher.submit(running)
            waiting = [job() for _ in range(5)]
            for j in waiting:
                batcher.submit(j)
            for j in waiting:
                j.cancelled = True
        deadline = time.time() + 10
        while batcher.stats()["waiting"] and time.time() < deadline:
            time.sleep(0.005)
        assert batcher.stats()["waiting"] == 0 and not running.row.done  # while the long row still decodes
        running.cancelled = True
        while batcher.stats()["running"] and time.time() < deadline:
            time.sleep(0.01)
        assert running.row.finish_reason == "cancelled" and all(j.new == [] for j in waiting)


def test_openai_fields_sent_as_null_take_their_defaults(engine):
    """OpenAI's API takes null for the sampling fields: such a request is the one without them."""
    nulls = {"temperature": None, "top_p": None, "n": None, "stream": None, "presence_penalty": None,
             "frequency_penalty": None, "echo": None, "logprobs": None}
    with TestClient(create_app(engine, Limits(**SMALL))) as c:
        body = {"model": "tiny", "prompt": "ROMEO:", "max_tokens": 4, "seed": 3}
        with_nulls, without = c.post("/v1/completions", json={**body, **nulls}), c.post("/v1/completions", json=body)
        assert with_nulls.status_code == 200, with_nulls.text
        assert with_nulls.json()["choices"] == without.json()["choices"]
        r = c.post("/v1/completions", json={**body, "temperature": "hot"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"


def test_stream_options_without_a_stream_get_400(engine):
    c = TestClient(create_app(engine, Limits(**SMALL)))
    body = {"model": "tiny", "prompt": "ROMEO:", "max_tokens": 2, "stream_options": {"include_usage": True}}
    r = c.post("/v1/completions", json=body)
    assert r.status_code == 400 and "stream_options is only allowed with stream=true" in r.json()["error"]["message"]
    assert c.post("/v1/completions", json={**body, "stream": True}).status_code == 200


def test_echo_with_logprobs_scores_token_id_prompts_by_hand(engine):
    """lm-eval's loglikelihood request: token ids, echo, logprobs, max_tokens 1 (or 0): the prompt's own tokens
    get log-softmax of one plain forward (the first None), then the generated token's."""
    ids = engine.tokenizer.encode("ROMEO: to be")
    with torch.no_grad():
        lp = torch.log_softmax(engine.model(torch.tensor([ids]))[0][0].float(), dim=-1)
    want = [lp[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
    with TestClient(create_app(engine, Limits(**SMALL))) as c:
        body = {"model": "tiny", "prompt": [ids], "echo": True, "logprobs": 2, "temperature": 0}
        one = c.post("/v1/completions", json={**body, "max_tokens": 1}).json()["choices"][0]
        zero = c.post("/v1/completions", json={**body, "max_tokens": 0, "prompt": ids}).json()
        assert zero["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
        zero = zero["choices"][0]
        for choice, n in ((one, len(ids) + 1), (zero, len(ids))):
            got = choice["logprobs"]
            assert len(got["tokens"]) == n and got["token_logprobs"][0] is None and got["top_logprobs"][0] is None
            assert got["token_logprobs"][1:len(ids)] == pytest.approx(want, abs=1e-5)
            assert all(len(top) == 2 and max(top.values()) >= lp_ for top, lp_ in
                       zip(got["top_logprobs"][1:], got["token_logprobs"][1:]))
            assert choice["text"].startswith("ROMEO: to be") and "".join(got["tokens"]) == choice["text"]
        assert zero["text"] == "ROMEO: to be" and zero["finish_reason"] == "length"
        for bad, message in [({"prompt": [len(CHARS)]}, f"token id {len(CHARS)} is outside"),
                             ({"prompt": [[]]}, "prompt is empty"),
                             ({"prompt": [True, 1]}, "prompt takes a string, a list of strings, token ids"),
                             ({"prompt": [[1, 2], "ab"]}, "prompt takes a string"),
                             ({"prompt": [1.0]}, "prompt takes a string"),
                             ({"max_tokens": 0, "echo": False}, "max_tokens=0 returns nothing without echo"),
                             ({"stream": True, "max_tokens": 1}, "echo with logprobs is answered whole"),
                             ({"prompt": list(range(40)), "max_tokens": 1}, "at most block_size=32 tokens")]:
            r = c.post("/v1/completions", json={**body, **bad})
            assert r.status_code == 400 and message in r.json()["error"]["message"], (bad, r.text)


def test_a_scored_answer_carries_its_generated_entry_even_when_it_is_end_of_text():
    """lm-eval sums token_logprobs[ctxlen:-1]: the last entry must be the generated token's, also when the greedy
    token is end-of-text (which ends a plain answer with no entry). A <|bos|> model echoes what was scored."""
    torch.manual_seed(0)
    tok = CharTokenizer(CHARS, special=["<|endoftext|>", "<|bos|>"])
    model = GPT(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=1, n_embd=16, bias=True).eval()
    with torch.no_grad():
        model.transformer.ln_f.bias.fill_(1.0)
        model.transformer.ln_f.weight.zero_()  # every hidden state is all ones: the logits are the rows' sums
        model.lm_head.weight[tok.eot_id] = 5.0  # end-of-text wins everywhere
    engine = Engine(model, tok, "cpu", None, "tiny.pt")
    with TestClient(create_app(engine, Limits(**SMALL))) as c:
        body = {"model": "tiny", "prompt": "To be", "echo": True, "temperature": 0, "max_tokens": 1}
        plain = c.post("/v1/completions", json={**body, "echo": False}).json()["choices"][0]
        assert plain["text"] == "" and plain["finish_reason"] == "stop"  # end-of-text ends a plain answer
        got = c.post("/v1/completions", json={**body, "logprobs": 1}).json()["choices"][0]
        lp = got["logprobs"]
        ids = [tok.bos_id] + tok.encode("To be")
        assert lp["tokens"] == [tok.decode([i]) for i in ids] + ["<|endoftext|>"]
        assert got["text"] == "".join(lp["tokens"]) and lp["text_offset"][-1] == len(tok.decode(ids))
        nothing = c.post("/v1/completions", json={**body, "max_tokens": 0}).json()["choices"][0]
        assert nothing["text"] == "To be" and nothing["logprobs"] is None
        for bad, message in [({"max_tokens": 0, "stream": True}, "max_tokens=0 is answered whole"),
                             ({"max_tokens": 0, "prompt": "To be" * 20, "logprobs": 0}, "at most block_size=32")]:
            r = c.post("/v1/completions", json={**body, **bad})
            assert r.status_code == 400 and message in r.json()["error"]["message"], (bad, r.text)


def test_tokenize_and_detokenize_follow_vllms_routes(engine):
    with TestClient(create_app(engine, Limits(**SMALL))) as c:
        info = c.get("/tokenizer_info").json()
        assert info["model_max_length"] == 32 and "eos_token" in info
        r = c.post("/tokenize", json={"prompt": "To be", "add_special_tokens": False}).json()
        assert r["tokens"] == engine.tokenizer.encode("To be") and r["count"] == 5
        assert c.post("/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": "To be"}
        assert c.post("/detokenize", json={"tokens": [10**6]}).status_code == 400
        assert c.post("/tokenize", json={"prompt": "\u00e9"}).status_code == 400  # not in the char vocabulary


def test_a_chat_models_tokenizer_info_carries_its_template_which_renders_to_our_ids():
    """/tokenizer_info gives a chat model's Jinja template (a base model's is null); rendered as a client renders
    it (jinja2) and sent to /tokenize, it gives the ids /v1/chat/completions builds (gpt.chat.encode_chat)."""
    import jinja2

    from gpt.chat import chat_tokenizer, encode_chat

    tok = chat_tokenizer(CharTokenizer(CHARS))
    torch.manual_seed(0)
    model = GPT(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16).eval()
    with TestClient(create_app(Engine(model, tok, "cpu", None, "chat.pt"), Limits(**SMALL))) as c:
        template = c.get("/tokenizer_info").json()["chat_template"]
        messages = [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Hi there"}]
        text = jinja2.Environment().from_string(template).render(messages=messages, add_generation_prompt=True)
        ids = c.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]
    assert ids == encode_chat(tok, messages, generation_prompt=True)[0]
    with TestClient(create_app(tiny_engine(), Limits(**SMALL))) as c:
        assert c.get("/tokenizer_info").json()["chat_template"] is None


@pytest.mark.parametrize("fmt", [{"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
                                 {"type": "json_object"}])
def test_a_response_format_other_than_text_gets_one_clear_400(fmt):
    from gpt.chat import chat_tokenizer

    tok = chat_tokenizer(CharTokenizer(CHARS))
    model = GPT(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16).eval()
    c = TestClient(create_app(Engine(model, tok, "cpu", None, "chat.pt"), Limits(**SMALL)))
    body = {"model": "chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    r = c.post("/v1/chat/completions", json={**body, "response_format": fmt})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "response_format" and "is not supported by this server" in err["message"]
    assert c.post("/v1/chat/completions", json={**body, "response_format": {"type": "text"}}).status_code == 200


def test_special_tokens_written_in_text_are_taken_as_themselves():
    from gpt.serve import encode_with_specials
    from gpt.tokenizer import TiktokenTokenizer

    tok = TiktokenTokenizer("gpt2", special=["<|user|>"])
    ids = encode_with_specials(tok, "Hi<|endoftext|><|user|> there", add_special_tokens=False)
    assert ids == tok.encode("Hi") + [tok.eot_id, tok.special_id("<|user|>")] + tok.encode(" there")


def test_a_stop_string_that_begins_inside_a_token_keeps_that_tokens_logprob():
    """GPT-2's byte-level tokens span several characters: a stop string that starts after a token's first
    character cuts the answer inside that token. The token stays in logprobs (its first characters end the
    answer), so the tokens' text covers the answer; the tokens after it, inside the stop string, are dropped."""
    from gpt.tokenizer import TiktokenTokenizer

    tok = TiktokenTokenizer("gpt2")
    torch.manual_seed(0)
    model = GPT(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32).eval()
    c = TestClient(create_app(Engine(model, tok, "cpu", None, "tiny.pt"), Limits(max_new_tokens=16)))
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 12, "temperature": 0, "logprobs": 1}
    full = c.post("/v1/completions", json=body).json()["choices"][0]
    toks, text = full["logprobs"]["tokens"], full["text"]
    assert "".join(toks) == text
    starts = [sum(len(t) for t in toks[:i]) for i in range(len(toks))]
    cut = [i for i in range(1, len(toks) - 1)
           if len(toks[i]) > 1 and text.find(toks[i][1:] + toks[i + 1]) == starts[i] + 1]
    assert cut, f"no token to cut inside in {toks}"
    i = cut[0]
    for stream in (False, True):
        r = c.post("/v1/completions", json={**body, "stop": [toks[i][1:] + toks[i + 1]], "stream": stream})
        if stream:
            chunks = [json.loads(ln[6:]) for ln in r.text.splitlines() if ln.startswith("data: {")]
            got_text = "".join(ch["choices"][0]["text"] for ch in chunks)
            got_toks = [t for ch in chunks if ch["choices"][0]["logprobs"] for t in ch["choices"][0]["logprobs"]["tokens"]]
        else:
            choice = r.json()["choices"][0]
            got_text, got_toks = choice["text"], choice["logprobs"]["tokens"]
            assert choice["finish_reason"] == "stop"
        assert got_text == text[:starts[i] + 1] and got_toks == toks[:i + 1], stream


def test_a_stop_string_after_a_character_split_over_tokens_keeps_all_its_tokens(monkeypatch):
    """The answer "hi 🤗" then the stop string ".": the emoji's bytes are spread over byte-level tokens whose last
    ones add no character to the text; logprobs keep them all (their bytes make up the answer), streamed or not."""
    from gpt.tokenizer import TiktokenTokenizer

    tok = TiktokenTokenizer("gpt2")
    script = tok.encode("hi \U0001F917.") + tok.encode(" more")
    step = {"i": 0}

    def scripted(logits, *rest):  # the sampler writes the script, whatever the model's logits
        t = script[min(step["i"], len(script) - 1)]
        step["i"] += 1
        return torch.full((logits.size(0),), t, dtype=torch.long)

    monkeypatch.setattr(serve_mod, "_sample", scripted)
    torch.manual_seed(0)
    model = GPT(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16).eval()
    c = TestClient(create_app(Engine(model, tok, "cpu", None, "tiny.pt"), Limits(max_new_tokens=16)))
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 8, "logprobs": 1, "stop": ["."]}
    want = tok.encode("hi \U0001F917")
    assert len(want) > 2 and len(tok.decode(want[:-1])) == len(tok.decode(want))  # a token that adds no character
    for stream in (False, True):
        step["i"] = 0
        r = c.post("/v1/completions", json={**body, "stream": stream})
        if stream:
            chunks = [json.loads(ln[6:]) for ln in r.text.splitlines() if ln.startswith("data: {")]
            text = "".join(ch["choices"][0]["text"] for ch in chunks)
            n = sum(len(ch["choices"][0]["logprobs"]["tokens"]) for ch in chunks if ch["choices"][0]["logprobs"])
        else:
            choice = r.json()["choices"][0]
            text, n = choice["text"], len(choice["logprobs"]["tokens"])
        assert (text, n) == ("hi \U0001F917", len(want)), stream


def test_more_top_logprobs_than_the_vocabulary_holds_lists_them_all():
    """A chat model over 18 ids (the arithmetic demo's digits and signs plus the chat tokens) asked for
    top_logprobs=20: every id is listed, streamed or not, instead of a failed generation."""
    from gpt.chat import chat_tokenizer

    tok = chat_tokenizer(CharTokenizer("0123456789+-=\n"))
    torch.manual_seed(0)
    model = GPT(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16).eval()
    with torch.no_grad():  # logit 0 for the chat tokens (an answer's end, or a new turn): digits and signs lead
        model.lm_head.weight[tok.base_vocab_size:] = 0
    c = TestClient(create_app(Engine(model, tok, "cpu", None, "calc.pt"), Limits(max_new_tokens=4)))
    body = {"model": "calc", "messages": [{"role": "user", "content": "1+1"}], "max_tokens": 3, "logprobs": True,
            "top_logprobs": 20, "temperature": 0}
    r = c.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 3 and all(len(e["top_logprobs"]) == tok.vocab_size for e in content)
    r = c.post("/v1/chat/completions", json={**body, "stream": True})
    assert r.status_code == 200 and '"error"' not in r.text and r.text.rstrip().endswith("data: [DONE]")


def test_a_body_that_is_not_json_gets_400_with_no_param(engine):
    c = TestClient(create_app(engine, Limits(**SMALL)))
    r = post_raw(c, b'{"model": "tiny", "prompt": ', "/v1/completions")
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "the body is not valid JSON" and r.json()["error"]["param"] is None


def test_metrics_label_every_route_and_put_unknown_paths_under_other(engine):
    """The tokenizer routes and /v1/models/<name> have labels of their own (a model name is not a label value);
    an unknown path is "other"."""
    pytest.importorskip("prometheus_client")
    with TestClient(create_app(engine, Limits(**SMALL))) as c:
        assert c.post("/tokenize", json={"prompt": "To be"}).status_code == 200
        assert c.post("/detokenize", json={"tokens": [1, 2]}).status_code == 200
        assert c.get("/tokenizer_info").status_code == 200
        assert c.get("/v1/models/tiny").status_code == 200 and c.get("/v1/models/other").status_code == 404
        assert c.get("/nowhere").status_code == 404
        metrics = c.get("/metrics").text
    for line in ('endpoint="/tokenize",status="200"} 1.0', 'endpoint="/detokenize",status="200"} 1.0',
                 'endpoint="/tokenizer_info",status="200"} 1.0', 'endpoint="/v1/models/{name}",status="200"} 1.0',
                 'endpoint="/v1/models/{name}",status="404"} 1.0', 'endpoint="other",status="404"} 1.0'):
        assert "gpt_requests_total{" + line in metrics, line


def test_an_unhandled_error_is_counted_as_500_in_metrics(engine, monkeypatch):
    pytest.importorskip("prometheus_client")

    def encode(text):
        raise RuntimeError("the tokenizer broke")

    with TestClient(create_app(engine, Limits(**SMALL)), raise_server_exceptions=False) as c:
        monkeypatch.setattr(engine.tokenizer, "encode", encode)
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "ROMEO:", "max_tokens": 2})
        monkeypatch.undo()
        assert r.status_code == 500
        metrics = c.get("/metrics").text
    assert 'gpt_requests_total{endpoint="/v1/completions",status="500"} 1.0' in metrics
    assert 'status="499"' not in metrics


# --- body size --------------------------------------------------------------------------------------------

def test_bodies_over_max_body_bytes_get_413_before_parsing(engine):
    c = TestClient(create_app(engine, Limits(**SMALL, max_body_bytes=1000)))
    big = json.dumps({"prompt": "a" * 2000}).encode()
    r = post_raw(c, big)  # with a content-length
    assert r.status_code == 413 and "max_body_bytes" in strict_json(r.text)["detail"]
    r = post_raw(c, b"{" * 5000)  # not even JSON: refused for its size, never parsed
    assert r.status_code == 413
    r = post_raw(c, json.dumps({"prompt": "a" * 101}).encode())  # under the limit: parsed and validated
    assert r.status_code == 422
    assert in_flight(c) == 0


def test_a_chunked_body_over_the_limit_is_refused(engine):
    c = TestClient(create_app(engine, Limits(**SMALL, max_body_bytes=1000)))
    chunks = [b'{"prompt": "', b"a" * 900, b"a" * 900, b'"}']
    r = c.post("/generate", content=iter(chunks), headers={"content-type": "application/json"})
    assert r.request.headers.get("transfer-encoding") == "chunked" and "content-length" not in r.request.headers
    assert r.status_code == 413
    ok = c.post("/generate", content=iter([b'{"prompt": "ROMEO:",', b' "max_new_tokens": 2}']),
                headers={"content-type": "application/json"})
    assert ok.status_code == 200 and ok.json()["new_tokens"] == 2


# --- API key ----------------------------------------------------------------------------------------------

def test_api_key_is_required_everywhere_but_health(engine):
    c = TestClient(create_app(engine, Limits(**SMALL), api_key="s3cret-key"))
    body = {"prompt": "ROMEO:", "max_new_tokens": 2}
    assert c.get("/health").status_code == 200
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret-key"},
                    {"authorization": "Basic s3cret-key"}, {"authorization": "Bearer s3cret-key-and-more"}):
        for method, path in [("POST", "/generate"), ("POST", "/generate/stream"), ("GET", "/docs"),
                             ("GET", "/openapi.json"), ("GET", "/nowhere")]:
            r = c.request(method, path, json=body if method == "POST" else None, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (path, headers)
            assert "Authorization: Bearer" in strict_json(r.text)["detail"]
    for scheme in ("Bearer", "bearer"):
        r = c.post("/generate", json=body, headers={"authorization": f"{scheme} s3cret-key"})
        assert r.status_code == 200 and r.json()["new_tokens"] == 2
    assert c.get("/openapi.json", headers={"authorization": "Bearer s3cret-key"}).status_code == 200
    assert in_flight(c) == 0


def test_no_api_key_leaves_the_server_open(engine):
    c = TestClient(create_app(engine, Limits(**SMALL)))
    assert c.post("/generate", json={"prompt": "ROMEO:", "max_new_tokens": 2}).status_code == 200


def test_serve_reads_the_api_key_from_config_or_environment(monkeypatch):
    from omegaconf import OmegaConf

    from gpt.serve import API_KEY_ENV, api_key_of

    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert api_key_of(OmegaConf.create({"api_key": None})) is None
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert api_key_of(OmegaConf.create({"api_key": None})) == "from-env"
    assert api_key_of(OmegaConf.create({"api_key": 12345})) == "12345"  # the config wins; numbers are text
    monkeypatch.setenv(API_KEY_ENV, "")
    assert api_key_of(OmegaConf.create({})) is None  # an empty variable is no key


def test_serve_passes_the_config_to_the_app_and_warns_when_exposed_without_a_key(engine, monkeypatch, capsys):
    """conf/serve.yaml as shipped (limits.max_body_bytes, api_key) through serve(), uvicorn.run replaced."""
    from pathlib import Path

    import uvicorn
    from omegaconf import OmegaConf

    from gpt.serve import API_KEY_ENV

    ran = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: ran.update(app=app, **kw))
    monkeypatch.setattr(serve_mod, "engine_from_config", lambda cfg: engine)
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    cfg = OmegaConf.load(Path(__file__).parents[1] / "gpt" / "conf" / "serve.yaml")
    assert cfg.host == "127.0.0.1" and cfg.api_key is None and cfg.limits.max_body_bytes == 1 << 20
    cfg.limits.max_body_bytes = 100
    serve_mod.serve(cfg)
    assert capsys.readouterr().err == "" and ran["host"] == "127.0.0.1"
    c = TestClient(ran["app"])
    assert c.post("/generate", json={"prompt": "ROMEO:", "max_new_tokens": 2}).status_code == 200
    assert c.post("/generate", json={"prompt": "R" * 100}).status_code == 413
    cfg.host = "0.0.0.0"
    serve_mod.serve(cfg)
    assert "warning: serving on 0.0.0.0 without an API key" in capsys.readouterr().err
    monkeypatch.setenv(API_KEY_ENV, "k")
    serve_mod.serve(cfg)
    assert capsys.readouterr().err == ""
    c = TestClient(ran["app"])
    assert c.post("/generate", json={"prompt": "ROMEO:", "max_new_tokens": 2}).status_code == 401
    assert c.post("/generate", json={"prompt": "ROMEO:", "max_new_tokens": 2},
                  headers={"authorization": "Bearer k"}).status_code == 200


# --- clients that go away: a real server, a real socket closed mid-request --------------------------------

@contextmanager
def running(app):
    """Serve `app` with uvicorn on a free loopback port in a thread; yields the port."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="error", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 10
    while not server.started and time.time() < deadline:
        time.sleep(0.01)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def slow_engine(step_s: float = 0.02):
    """A tiny engine whose every decode step takes step_s; returns it and the list of steps run."""
    eng = tiny_engine()
    steps = []

    def hook(*_):
        steps.append(1)
        time.sleep(step_s)

    eng.model.lm_head.register_forward_hook(hook)
    return eng, steps


def _health(port: int) -> dict:
    import httpx

    return httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()


@pytest.mark.parametrize("path", ["/generate", "/generate/stream"])
def test_a_client_that_disconnects_frees_its_slot_and_stops_its_row(path):
    """200 steps of 20 ms would hold the row 4 s; the client leaves after a few steps: its slot comes back and
    the worker runs at most a step or two more (without cancellation both wait for all 200 steps)."""
    n_new = 200
    eng, steps = slow_engine()
    app = create_app(eng, Limits(max_new_tokens=n_new, max_queue=0, max_batch=1))
    body = json.dumps({"prompt": "ROMEO:", "max_new_tokens": n_new, "temperature": 0}).encode()
    with running(app) as port:
        client = socket.create_connection(("127.0.0.1", port))
        client.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.time() + 10
        while len(steps) < 5 and time.time() < deadline:
            time.sleep(0.01)
        assert _health(port)["in_flight"] == 1 and 5 <= len(steps) < n_new
        client.close()  # the client goes away mid-decode
        deadline = time.time() + 2
        while _health(port)["in_flight"] and time.time() < deadline:
            time.sleep(0.01)
        assert _health(port)["in_flight"] == 0
        at_release = len(steps)
        time.sleep(0.3)  # 15 steps' time: a row still decoding would show here
        assert len(steps) - at_release <= 2 and len(steps) < n_new // 2
        # the one slot is free: the next request is served
        import httpx

        r = httpx.post(f"http://127.0.0.1:{port}/generate", timeout=10,
                       json={"prompt": "ROMEO:", "max_new_tokens": 3, "temperature": 0})
        assert r.status_code == 200 and r.json()["new_tokens"] == 3


def test_a_cancelled_waiting_job_is_never_decoded(engine):
    """The worker skips a job cancelled while it waited for the model (the row never takes a step)."""
    with worker(engine, 2, 5) as (batcher, job):
        with engine.lock:
            cancelled, kept = job(), job()
            batcher.submit(cancelled)
            batcher.submit(kept)
            cancelled.cancelled = True
        deadline = time.time() + 10
        while len(kept.new) < 5 and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
        assert len(kept.new) == 5 and cancelled.new == []
        assert batcher.stats()["batch_sizes"] == {"1": 1}


# --- fuzz -------------------------------------------------------------------------------------------------

def _deep(rng: random.Random) -> bytes:
    d = rng.choice([10, 500, 5000, 100_000])
    inner = "[" * d + "]" * d if rng.random() < 0.5 else '{"a":' * d + "1" + "}" * d
    return ('{"prompt": ' + inner + "}").encode() if rng.random() < 0.5 else inner.encode()


def _odd_value(rng: random.Random):
    return rng.choice([
        None, True, False, 0, -1, 1, 2**31, 2**63, 2**64, -(2**70), 10**40, 0.5, -0.0, 1e-320, 1e308,
        float("nan"), float("inf"), float("-inf"), "", "5", "ROMEO:", "\u202eevil", "😀" * 10, "\x00",
        "a" * rng.choice([50, 101, 1_000_000]), [], [1, "a"], {}, {"a": {"b": [None]}},
        "".join(chr(rng.randrange(0x20, 0x2FFFF)) for _ in range(20)),
    ])


def _fuzz_body(rng: random.Random, kind: int) -> tuple[bytes, dict]:
    """One generated request body and extra headers; `kind` cycles through the families."""
    fields = ["prompt", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "chat"]
    if kind == 0:  # a valid body with one field replaced by an odd value (or an unknown field added)
        body = {"prompt": rng.choice(["ROMEO:", "", "To be"]), "max_new_tokens": rng.randint(1, 4),
                "temperature": rng.choice([0, 0.7, 1.3]), "seed": rng.randrange(0, 1000)}
        body[rng.choice(fields + ["bogus"])] = _odd_value(rng)
        return json.dumps(body, allow_nan=True).encode(), {}
    if kind == 1:  # every field random
        body = {f: _odd_value(rng) for f in fields if rng.random() < 0.7}
        return json.dumps(body, allow_nan=True).encode(), {}
    if kind == 2:  # deep nesting
        return _deep(rng), {}
    if kind == 3:  # not JSON, or JSON of the wrong shape
        return rng.choice([
            b"", b"{", b"null", b"[]", b'"prompt"', b"123", b"\xff\xfe\x00",
            bytes(rng.randrange(256) for _ in range(64)), '{"prompt": "ROMEO:"}'.encode("utf-16"),
            b'\xef\xbb\xbf{"prompt": "ROMEO:"}', b'{"prompt": "a", "prompt": 1}',
            b'{"prompt": "\\ud800"}', b'{"prompt": "a", "seed": ' + b"9" * 5000 + b"}",
        ]), {}
    if kind == 4:  # a valid body sent with an odd content type
        ctype = rng.choice(["text/plain", "application/x-www-form-urlencoded", "application/json; charset=latin-1",
                            "multipart/form-data; boundary=x", ""])
        return json.dumps({"prompt": "ROMEO:", "max_new_tokens": 2}).encode(), {"content-type": ctype}
    return b'{"prompt": "' + b"a" * rng.choice([1 << 20, 2 << 20]) + b'"}', {}  # around the body limit


def test_fuzz_every_answer_is_json_and_no_slot_leaks(engine):
    """300 generated bodies against both generation endpoints: every answer is 2xx/4xx/503 with a strict
    JSON body (SSE events each JSON for a 200 stream), never a 500 or an exception out of the app; /health
    answers afterwards with nothing in flight."""
    rng = random.Random(1234)
    statuses = set()
    with TestClient(create_app(engine, Limits(max_prompt_chars=100, max_new_tokens=4, max_queue=2,
                                              max_batch=2))) as c:
        for i in range(300):
            body, headers = _fuzz_body(rng, i % 6)
            path = "/generate/stream" if i % 5 == 4 else "/generate"
            h = {"content-type": "application/json", **headers}
            r = c.post(path, content=body, headers=h)
            statuses.add(r.status_code)
            assert 200 <= r.status_code < 500 and r.status_code != 500, (i, body[:200], r.status_code, r.text[:300])
            if r.status_code == 200 and path.endswith("stream"):
                events = [strict_json(ln[6:]) for ln in r.text.splitlines() if ln.startswith("data: ")]
                assert events and events[-1].get("done") is True and "event: error" not in r.text
            else:
                assert r.headers["content-type"] == "application/json", (i, r.headers)
                out = strict_json(r.text)
                assert ("completion" in out) if r.status_code == 200 else ("detail" in out), (i, out)
        health = c.get("/health")
        assert health.status_code == 200 and health.json()["in_flight"] == 0
    assert {200, 400, 413, 422} <= statuses  # each family of body was answered as its kind
