"""The HTTP service, through FastAPI's TestClient: every endpoint, streaming, bad bodies, queueing."""

import json
import threading
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
    ({"prompt": "x" * 101}, 413),                                # prompt over the limit
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
    from gpt.chat import END, chat_tokenizer, prompt_ids

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
    expected = []
    for t in generate(model, ids, 30, temperature=0)[0, ids.size(1):].tolist():
        if t == end:
            break
        expected.append(t)
    body = r.json()
    assert body["completion"] == tok.decode(expected) and body["new_tokens"] == len(expected)
    assert END not in body["completion"]


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
    conf = OmegaConf.load(Path(__file__).parents[1] / "conf" / "serve.yaml")
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
