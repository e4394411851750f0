"""HTTP inference service (FastAPI): GET / (a chat page, gpt/web/chat.html), GET /health, POST /generate, POST /generate/stream (server-sent events),
the OpenAI-compatible API (GET /v1/models, POST /v1/completions, POST /v1/chat/completions: see OpenAIRoutes)
and GET /metrics (Prometheus text format: see Metrics).

Requests are validated (types, ranges, prompt length, max_new_tokens) and answered with a clear 4xx on bad
input. One background worker thread owns the model (`Batcher`) and batches continuously over the decode
engine (gpt.engine): a request joins the running batch at the next decode step (its prompt prefilled into a
free slot of the engine's KV cache; rows keep their own positions) and leaves when it finishes, freeing its
slot, so a short request never waits for a long one. Each row is sampled from its own logits with its own
temperature/top-k/top-p, seeded generator, stop token and max_new_tokens, so a request gets the text it would
get alone. Each request receives its pieces through its own queue. Beyond `max_batch` running rows, up to
`max_queue` requests wait; more get 503. max_batch=1 serves one generation at a time.

In front of the routes one ASGI layer (`Guard`) checks the optional API key, bounds the body size and holds
each request's admission `Ticket` in a single try/finally, so no failure inside a request can keep its slot.
A client that goes away (stream or not) cancels its row: the worker drops it before its next decode step.
"""

import asyncio
import hmac
import importlib.resources
import json
import logging
import os
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from gpt import native
from gpt.chat import ChatText, answer_stop_ids
from gpt.errors import UserError
from gpt.export_meta import CHAT_TEMPLATE
from gpt.engine import DecodeEngine, Row, Sampling, sample_next, text_stop
from gpt.inference import dtype_option, encode_prompt, load_for_inference

log = logging.getLogger(__name__)

SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes a 64-bit value; larger ones raise inside the request
# The sampler works in float32: a positive temperature below ~1e-37 or a top_p below ~1e-45 becomes 0 there
# and turns every probability into NaN. Below 1e-5 sampling is argmax in practice, so that is the floor.
SAMPLING_EPS = 1e-5
API_KEY_ENV = "GPT_API_KEY"  # read by serve() when api_key is not set in the config
OPEN_PATHS = ("/", "/health")  # answered without the API key: the page holds nothing secret, its API calls do
# The chat page is one self-contained file: it may run its own inline script and talk to this server, nothing
# else (no CDN, no other origin, no framing), so it works offline and a reply's text cannot pull anything in.
PAGE_HEADERS = {"content-security-policy": "default-src 'none'; script-src 'unsafe-inline'; style-src "
                "'unsafe-inline'; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
                "x-content-type-options": "nosniff", "referrer-policy": "no-referrer", "cache-control": "no-cache"}


@dataclass
class Limits:
    max_prompt_chars: int = 8192
    max_new_tokens: int = 512
    max_queue: int = 16  # requests waiting for the model beyond a full running batch
    max_batch: int = 8  # concurrent requests decoded together (1: one generation at a time)
    batch_wait_ms: float = 5.0  # how long an idle worker waits for more requests to start together
    max_body_bytes: int = 1 << 20  # larger request bodies get 413 before they are parsed


class GenerateRequest(BaseModel):
    """A /generate body. Strict types (no "5" for 5, no true for 1), finite numbers only; `request_model`
    adds the server's limits (prompt length, max_new_tokens) as field bounds."""

    prompt: str = Field(..., description="text to continue")
    max_new_tokens: int | None = Field(None, ge=1, description="default: min(128, the server's limit)")
    temperature: float = Field(0.8, ge=0.0, le=5.0, description=f"0 = greedy, else at least {SAMPLING_EPS}")
    top_k: int | None = Field(200, ge=1)
    top_p: float | None = Field(None, ge=SAMPLING_EPS, le=1.0)
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    chat: bool = False

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @field_validator("temperature")
    @classmethod
    def _greedy_or_sampled(cls, t: float) -> float:
        if 0 < t < SAMPLING_EPS:
            raise ValueError(f"temperature={t} is too small to sample with: use 0 for greedy decoding or a value "
                             f"from {SAMPLING_EPS} to 5")
        return t


def request_model(limits: Limits) -> type[GenerateRequest]:
    """GenerateRequest with this server's limits as bounds, so they are checked (422) with the other fields
    and shown in the OpenAPI schema."""
    return create_model(
        "GenerateRequest", __base__=GenerateRequest,
        prompt=(str, Field(..., max_length=limits.max_prompt_chars, description="text to continue")),
        max_new_tokens=(int | None, Field(None, ge=1, le=limits.max_new_tokens,
                                          description=f"default: {min(128, limits.max_new_tokens)}")))


class Engine:
    """Owns the model and tokenizer; `tokens()` yields decoded text pieces of one request.

    The model runs in its own dtype (load_for_inference casts the weights once, see `engine_from_config`);
    autocast_dtype (None by default) autocasts a float32 model instead, for callers that pass one.
    """

    def __init__(self, model, tokenizer, device: str = "cpu", autocast_dtype: torch.dtype | None = None,
                 checkpoint: str = ""):
        self.model, self.tokenizer, self.device = model.eval(), tokenizer, device
        self.autocast_dtype, self.checkpoint = autocast_dtype, checkpoint
        self.lock = threading.Lock()

    def encode(self, req: GenerateRequest) -> list[int]:
        if req.chat:  # the fine-tuning chat template; the answer ends at its end-of-answer token
            from gpt.chat import SPECIAL, prompt_ids

            if not all(t in getattr(self.tokenizer, "special", []) for t in SPECIAL):
                raise UserError("chat=true needs a chat-tuned checkpoint (finetune.py stage=sft); this one has "
                                "no chat template tokens")
            return prompt_ids(self.tokenizer, req.prompt)[-self.model.config.block_size:]
        return encode_prompt(self.tokenizer, req.prompt, self.model.config.block_size, note=False)[
            -self.model.config.block_size:]


class Job:
    """One request in the batcher: its prompt ids, sampling settings, generator and output queue.

    The worker calls `push(token)` for each token of the request's text (text pieces go out as whole UTF-8
    characters) and `finish()` or `fail()` once; the request's coroutine reads ("piece", text, token), then
    ("done", new_tokens, seconds), ("error", message, None) or, after its own `cancel()`, ("cancelled", None,
    None) from `queue` (an asyncio.Queue on `loop`). `row` is its row in the decode engine once it joined."""

    def __init__(self, engine: Engine, ids: list[int], req: GenerateRequest, loop: asyncio.AbstractEventLoop,
                 stream: bool = True):
        # stream=False (/generate): the text goes out once, at the end; waking the request's event loop for
        # every token costs the worker thread more time (GIL hand-offs) than decoding the token itself
        # a chat answer's text leaves the template's special tokens out, as /v1/chat/completions' does
        text = ChatText(engine.tokenizer) if req.chat else engine.tokenizer
        self.ids, self.req, self.loop, self.tokenizer, self.stream = ids, req, loop, text, stream
        self.queue: asyncio.Queue = asyncio.Queue()
        self.gen = torch.Generator(device=engine.device)
        self.gen.manual_seed(req.seed if req.seed is not None else int(time.time_ns() % 2**31))
        self.sampling = Sampling(req.max_new_tokens, req.temperature, req.top_k, req.top_p,
                                 stop_ids=answer_stop_ids(engine.tokenizer, req.chat), generator=self.gen)
        self.row: Row | None = None
        self.shown = ""
        self.cancelled = False  # the client went away: the worker drops the row before its next step
        self.t0 = 0.0
        self.t_created, self.t_first = time.perf_counter(), None  # time to first token, for /metrics

    @property
    def new(self) -> list[int]:
        """The request's new token ids so far."""
        return self.row.new if self.row is not None else []

    def cancel(self) -> None:
        """The client went away (call on the request's event loop): the worker drops the row before its next
        step, and whoever waits on `queue` wakes up now instead of after the row's last step."""
        self.cancelled = True
        self.queue.put_nowait(("cancelled", None, None))

    outbox: list | None = None  # the worker's items of this step (Batcher): sent with one wake-up per event loop

    def emit(self, *item) -> None:
        if self.outbox is not None:
            self.outbox.append((self, item))
        else:
            _send(self.loop, [(self, item)])

    def push(self, t: int) -> None:
        """The row's text grew by token t: stream what is complete of it."""
        if self.stream:
            text = self.tokenizer.decode(self.new)
            if not text.endswith("\ufffd"):
                self.emit("piece", text[len(self.shown):], t)
                self.shown = text

    def finish(self) -> None:
        text = self.tokenizer.decode(self.new)
        if text != self.shown:
            self.emit("piece", text[len(self.shown):], None)
        self.emit("done", len(self.new), time.perf_counter() - self.t0)

    def fail(self, e: Exception) -> None:
        self.emit("error", f"{type(e).__name__}: {e}", None)


def _put(items: list) -> None:
    for job, item in items:
        job.queue.put_nowait(item)


def _send(loop: asyncio.AbstractEventLoop, items: list) -> None:
    """Queue (job, item) pairs on their requests' event loop `loop`, in order, with one wake-up of that loop."""
    try:
        loop.call_soon_threadsafe(_put, items)
    except RuntimeError:  # the requests' event loop is closed
        for job, _ in items:
            job.cancelled = True


def _sample(*args):
    """This module's sample_next, looked up at each call (tests replace it to make one row's sampling fail)."""
    return sample_next(*args)


class Batcher:
    """The background worker thread that owns the model and batches continuously: before every decode step
    it drops the rows of requests that went away and lets waiting requests join the running batch (up to
    `max_batch` rows, each prefilled into a free slot of the engine's KV cache); each row leaves as soon as
    it finishes, freeing its slot. When the model is idle, the first request waits up to `wait_ms` for
    others to start with it. Every row is sampled from its own logits with its own settings and seeded
    generator, at positions of its own, so a request gets the tokens it would get alone. Steps run under
    `engine.lock`, so apps sharing an engine never run the model at the same time.

    stats(): batch_sizes counts how many requests joined together at one step; max_batch_seen is the most
    rows decoded in one step."""

    def __init__(self, engine: Engine, max_batch: int = 8, wait_ms: float = 5.0):
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch} must be >= 1")
        self.engine, self.max_batch, self.wait_s = engine, max_batch, wait_ms / 1000
        self.decoder = DecodeEngine(engine.model, max_batch, sample=self._sample)
        self.watch: dict[int, Job] = {}  # id(generator) -> a running job that wants its tokens' logprobs
        self.metrics = None  # a Metrics (create_app): time to first token, tokens generated
        self.cv = threading.Condition()
        self.pending: deque[Job] = deque()
        self.running: list[Job] = []
        self.thread: threading.Thread | None = None
        self.sizes: Counter = Counter()  # requests that joined at one step -> number of such steps
        self.most = 0
        # the items a step emits go out together, one wake-up per event loop: waking a request's loop for
        # every row's token costs the worker thread more (GIL hand-offs) than a step's share of the token
        self.outbox: list = []

    def _sample(self, logits: torch.Tensor, temperature, top_k, top_p, generator) -> torch.Tensor:
        """The sampling call of the requests with these settings (a request is a group of one row; generator:
        its generator, or a list of (generator, 1) runs, one per request); a job that asked for logprobs is
        shown the logits its token was sampled from."""
        ids = _sample(logits, temperature, top_k, top_p, generator)
        if self.watch:
            runs = generator if isinstance(generator, list) else [(generator, logits.size(0))]
            start = 0
            for gen, n in runs:
                job = self.watch.get(id(gen)) if gen is not None else None
                if job is not None:
                    job.note(logits[start:start + n], ids[start:start + n])
                start += n
        return ids

    def submit(self, job: Job) -> None:
        native.release_idle_threads()  # this thread's idle OpenMP helpers would slow the worker's steps (see there)
        with self.cv:
            self.pending.append(job)
            if self.thread is None:
                self.thread = threading.Thread(target=self._loop, name="gpt-batcher", daemon=True)
                self.thread.start()
            self.cv.notify()

    def stats(self) -> dict:
        sizes = dict(self.sizes)
        return {"max_batch": self.max_batch, "batches": sum(sizes.values()),
                "requests": sum(k * v for k, v in sizes.items()), "max_batch_seen": self.most,
                "batch_sizes": {str(k): v for k, v in sorted(sizes.items())}, "waiting": len(self.pending),
                "running": len(self.running), "steps": self.decoder.steps}

    def _admit(self) -> None:
        """Cancel the rows of requests that went away; waiting requests join while there are free slots."""
        for job in self.running:
            if job.cancelled:
                self.decoder.cancel(job.row)
        with self.cv:
            if not self.running:  # idle: give requests arriving together a moment to start together
                deadline = time.monotonic() + self.wait_s
                while len(self.pending) < self.max_batch:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self.cv.wait(left)
            if any(j.cancelled for j in self.pending):  # gone while waiting: no longer queued
                self.pending = deque(j for j in self.pending if not j.cancelled)
            live = sum(not j.row.done for j in self.running)
            joined = []
            while self.pending and live + len(joined) < self.max_batch:
                job = self.pending.popleft()
                if not job.cancelled:
                    joined.append(job)
        t0 = time.perf_counter()
        for job in list(joined):
            try:
                job.row, job.t0 = self.decoder.add([job.ids], job.sampling)[0], t0
            except Exception as e:  # this request's own input: it alone fails
                joined.remove(job)
                job.fail(e)
                continue
            job.row.data, job.outbox = job, self.outbox
            if getattr(job, "top_logprobs", None) is not None:
                self.watch[id(job.gen)] = job
        if joined:
            self.sizes[len(joined)] += 1
            self.running += joined
        self.most = max(self.most, sum(not j.row.done for j in self.running))

    def _step(self) -> None:
        engine = self.engine
        ctx = (torch.autocast(torch.device(engine.device).type, dtype=engine.autocast_dtype) if engine.autocast_dtype
               else torch.autocast(torch.device(engine.device).type, enabled=False))
        try:
            with ctx:
                events = self.decoder.step()
        except Exception as e:  # the model failed: every request of the batch gets the error
            self.decoder.clear(e)
            events = []
        now, new = time.perf_counter(), 0
        for row, t in events:
            job = row.data
            if job.t_first is None:
                job.t_first = now
                if self.metrics is not None:
                    self.metrics.ttft.observe(now - job.t_created)
            if row.stop_token is None:  # a stop token is not part of the text
                new += 1
                try:
                    job.push(t)
                except Exception as e:  # this request's text failed (e.g. an id its tokenizer lacks): its row ends
                    row.finish("error", e)
        if self.metrics is not None and new:
            self.metrics.tokens.inc(new)
        still = []
        for job in self.running:
            row = job.row
            if not row.done:
                still.append(job)
                continue
            self.watch.pop(id(job.gen), None)
            if row.finish_reason == "error":
                job.fail(row.error)
            elif row.finish_reason != "cancelled":
                try:
                    job.finish()
                except Exception as e:
                    job.fail(e)
        self.running = still

    def _fail_running(self, e: Exception) -> None:
        """The worker's own code failed: every running request gets the error, the worker goes on."""
        log.error("serving step failed: %s: %s", type(e).__name__, e)
        self.decoder.clear(e)
        for job in self.running:
            job.fail(e)
        self.running, self.watch = [], {}

    def _flush(self) -> None:
        """Send the step's items, one wake-up per event loop."""
        by_loop: dict = {}
        for job, item in self.outbox:
            by_loop.setdefault(job.loop, []).append((job, item))
        self.outbox.clear()
        for loop, items in by_loop.items():
            _send(loop, items)

    def _loop(self) -> None:
        while True:
            with self.cv:
                if not self.pending and not self.running:  # idle: its OpenMP helpers go too (release_idle_threads)
                    native.release_idle_threads()
                while not self.pending and not self.running:
                    self.cv.wait()
            with self.engine.lock:
                try:
                    self._admit()
                    if self.running:
                        self._step()
                except Exception as e:  # never let the worker thread die: requests would wait forever
                    self._fail_running(e)
                finally:
                    self._flush()


class SafeJSONResponse(JSONResponse):
    """JSON that always renders: non-ASCII escaped (a lone surrogate cannot break the UTF-8 encoding) and
    NaN/Infinity refused rather than written as invalid JSON."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def _clip(x, n: int = 200):
    return x if isinstance(x, int) else str(x)[:n]


def validation_errors(errors) -> list[dict]:
    """pydantic/FastAPI errors -> what a 422 body shows: where, what, which kind. The offending input and
    ctx are left out: they may be 1 MB long, NaN or an exception object, and the client sent them anyway."""
    return [{"loc": [_clip(x) for x in e.get("loc", ())], "msg": _clip(e.get("msg", ""), 500),
             "type": _clip(e.get("type", ""))} for e in list(errors)[:20]]


class Admission:
    """The count of generation requests in flight, capped at max_queue + max_batch (more get 503)."""

    def __init__(self, cap: int):
        self.cap, self.in_flight = cap, 0


class Ticket:
    """One request's claim on Admission slots and on the model: `take(k)` once the request is valid (k rows:
    an OpenAI request with several prompts or n > 1 takes one slot per row; 503 when they do not fit), then
    `jobs` are its rows. Guard calls `release()` in its finally when the request ends, however it ends: the
    slots go back and the rows still decoding are dropped at the worker's next step."""

    def __init__(self, admission: Admission):
        self.admission, self.held = admission, 0
        self.jobs: list[Job] = []

    def take(self, k: int = 1) -> None:
        a = self.admission
        if a.in_flight + k > a.cap:
            raise HTTPException(503, f"server busy: {a.in_flight} requests in flight; retry later")
        a.in_flight += k
        self.held += k

    def release(self) -> None:
        for job in self.jobs:
            job.cancelled = True  # a no-op for a finished row
        if self.held:
            self.admission.in_flight -= self.held
            self.held = 0


ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
               413: "invalid_request_error", 499: "invalid_request_error", 503: "server_error"}
ERROR_CODES = {401: "invalid_api_key", 413: "request_too_large", 503: "server_busy"}


def error_content(path: str, status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """An error body: OpenAI's error object under /v1 ({"error": {message, type, param, code}}), where its
    clients look for it; {"detail": message} elsewhere, as before."""
    if not path.startswith("/v1/"):
        return {"detail": message}
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error" if status >= 500 else
                                                                   "invalid_request_error"),
                      "param": param, "code": code or ERROR_CODES.get(status)}}


async def _answer(send, status: int, detail: str, headers: dict[str, str] | None = None, path: str = "") -> None:
    body = SafeJSONResponse(error_content(path, status, detail)).body
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """The ASGI layer in front of every route: API key (all paths but /health when one is set), body size
    (read up to max_body_bytes, 413 beyond, before anything parses it), and the request's admission Ticket,
    put in scope["gpt.ticket"] for the route to take and released here in one finally, whatever happens
    inside (a validation error, an exception, a cancelled task, a client gone mid-stream)."""

    def __init__(self, app, admission: Admission, max_body_bytes: int, api_key: str | None = None, metrics=None):
        self.app, self.admission, self.max_body, self.metrics = app, admission, max_body_bytes, metrics
        self.key = api_key.encode() if api_key else None

    def _authorized(self, scope) -> bool:
        value = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = value.partition(b" ")
        ok = hmac.compare_digest(token.strip(), self.key)  # constant time: no timing oracle on the key
        return scheme.lower() == b"bearer" and ok

    async def _body(self, scope, receive, send) -> bytes | None:
        """The whole body, or None when it was refused (413 sent) or the client left while sending it."""
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            await _answer(send, 413, f"request body of {length.decode('latin-1')[:20]} bytes; the limit is "
                                     f"{self.max_body} (limits.max_body_bytes)", path=scope["path"])
            return None
        chunks, size = [], 0
        while True:  # also bounds chunked bodies, which carry no content-length
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                await _answer(send, 413, f"request body over {self.max_body} bytes (limits.max_body_bytes)",
                              path=scope["path"])
                return None
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status, t0 = 499, time.perf_counter()  # 499: the client left before an answer started

        async def sent(message):  # the answer's status, for /metrics
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._serve(scope, receive, sent)
        except Exception:  # answered 500 by the server's error middleware, outside this one
            if status == 499:
                status = 500
            raise
        finally:
            if self.metrics is not None:
                self.metrics.request(scope["path"], status, time.perf_counter() - t0)

    async def _serve(self, scope, receive, send) -> None:
        if self.key is not None and scope["path"] not in OPEN_PATHS and not self._authorized(scope):
            return await _answer(send, 401, "missing or wrong API key: send the header 'Authorization: Bearer "
                                            "<key>'", {"www-authenticate": "Bearer"}, scope["path"])
        body = await self._body(scope, receive, send)
        if body is None:
            return
        replayed = False

        async def replay():  # the body once, then the client's own messages (http.disconnect)
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        ticket = scope["gpt.ticket"] = Ticket(self.admission)
        try:
            await self.app(scope, replay, send)
        finally:
            ticket.release()


async def _cancel_on_disconnect(receive, job: Job) -> None:
    """Wait for the client to go away (its body is already read, so the next message is http.disconnect)
    and cancel its row."""
    while (await receive())["type"] != "http.disconnect":
        pass
    job.cancel()


# ------------------------------------------------------------------------------------------ /metrics

def _has_prometheus() -> bool:
    import importlib.util

    return importlib.util.find_spec("prometheus_client") is not None


ENDPOINTS = ("/", "/health", "/metrics", "/generate", "/generate/stream", "/v1/models", "/v1/completions",
             "/v1/chat/completions", "/tokenizer_info", "/tokenize", "/detokenize")


def _endpoint(path: str) -> str:
    """A request's /metrics label: its route (one label for /v1/models/<name>), else "other", so a client cannot
    grow the label set."""
    if path in ENDPOINTS:
        return path
    return "/v1/models/{name}" if path.startswith("/v1/models/") else "other"


class Metrics:
    """The service's Prometheus metrics, in a registry of its own (one per app). Requests are counted by
    endpoint (a known path, else "other": a client cannot grow the label set) and status, in Guard, so
    401/413 answers count too; latency is the whole request, a stream included."""

    def __init__(self, batcher: "Batcher", admission: Admission):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.requests = Counter("gpt_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.latency = Histogram("gpt_request_duration_seconds", "Request latency, streams to their end",
                                 ["endpoint"], registry=r,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120))
        self.ttft = Histogram("gpt_time_to_first_token_seconds", "From a row's arrival to its first token",
                              registry=r, buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.tokens = Counter("gpt_generated_tokens", "Tokens generated (stop tokens excluded)", registry=r)
        Gauge("gpt_running_rows", "Rows in the running batch", registry=r).set_function(
            lambda: sum(not j.row.done for j in list(batcher.running)))
        Gauge("gpt_queue_depth", "Rows waiting for a slot in the batch", registry=r).set_function(
            lambda: len(batcher.pending))
        Gauge("gpt_requests_in_flight", "Admitted generation rows (capped at max_queue + max_batch)",
              registry=r).set_function(lambda: admission.in_flight)

    def request(self, path: str, status: int, seconds: float) -> None:
        endpoint = _endpoint(path)
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)


# ------------------------------------------------------------------------------------------ OpenAI API

class ApiError(HTTPException):
    """An error answered in OpenAI's shape, naming the request field (`param`) it is about."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(status, message)
        self.param, self.code = param, code


def openai_validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """The first pydantic error -> (one line, the field it is about) for a 400 in OpenAI's shape."""
    e = errors[0]
    loc = [str(x) for x in e["loc"] if x != "body"]
    field = loc[0] if loc else None  # the request field (pydantic adds the union member it tried)
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        msg = "unknown field: this server does not support it (leave it out)"
    elif e["type"] == "json_invalid":
        msg, field = "the body is not valid JSON", None
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return (f"{field}: {msg}{more}" if field else f"{msg}{more}"), field


def _unsupported(name: str, value, default) -> None:
    if value != default and value is not None:
        raise ValueError(f"{name}={_clip(value, 60)!s} is not supported by this server; leave it out or at "
                         f"{default!r}")


class _Sampled(BaseModel):
    """The sampling fields /v1/completions and /v1/chat/completions share (OpenAI's names and defaults).
    Fields OpenAI clients commonly send are accepted at their defaults (user, frequency_penalty,
    presence_penalty, logit_bias, stream_options); a value this server would not honour is a 400 that names
    the field; anything else unknown is a 400 too."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, ge=SAMPLING_EPS, le=1.0)
    top_k: int | None = Field(None, ge=1)  # not OpenAI's (vLLM's extension); None: the whole vocabulary
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    stream: bool = False
    stream_options: dict[str, bool] | None = None
    user: str | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @field_validator("temperature", "top_p", "n", "stream", "frequency_penalty", "presence_penalty", "echo",
                     "logprobs", mode="before", check_fields=False)
    @classmethod
    def _null_is_default(cls, v, info):
        """OpenAI's API takes null for these: the field's default."""
        return cls.model_fields[info.field_name].default if v is None else v

    @field_validator("temperature")
    @classmethod
    def _greedy_or_sampled(cls, t: float) -> float:
        return GenerateRequest._greedy_or_sampled(t)

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop
        if stops is not None and (len(stops) > 4 or not all(stops)):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalty(cls, v, info):
        _unsupported(info.field_name, v, 0.0)
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v):
        _unsupported("logit_bias", v or None, None)
        return v

    @field_validator("stream_options")
    @classmethod
    def _stream_options(cls, v):
        if v and set(v) - {"include_usage"}:
            raise ValueError(f"stream_options takes only include_usage, not {sorted(set(v) - {'include_usage'})}")
        return v

    @model_validator(mode="after")
    def _options_need_a_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        return self


class CompletionRequest(_Sampled):
    prompt: str | list[str] | list[int] | list[list[int]]  # text, or token ids (lm-eval's local-completions)
    max_tokens: int | None = Field(None, ge=0)  # 0: score the prompt only (echo with logprobs)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)  # the chosen token's and this many alternatives'
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, p):
        def ids(x) -> bool:
            return isinstance(x, list) and all(type(i) is int for i in x)  # not bool, not float

        if not (isinstance(p, str) or isinstance(p, list) and (all(isinstance(x, str) for x in p) or ids(p)
                                                                or all(ids(x) for x in p))):
            raise ValueError("prompt takes a string, a list of strings, token ids (a list of integers) or a list "
                             "of token-id lists")
        if isinstance(p, list) and (not p or any(isinstance(x, list) and not x for x in p)):
            raise ValueError("prompt is empty: send a string, a list of strings, or token ids")
        return p

    @model_validator(mode="after")
    def _nothing_to_return(self):
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens=0 returns nothing without echo=true (which scores the prompt)")
        return self

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v):
        _unsupported("best_of", v, 1)
        return v

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v):
        _unsupported("suffix", v, None)
        return v


class TextPart(BaseModel):
    type: Literal["text"]
    text: str
    model_config = ConfigDict(extra="forbid", strict=True)


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]  # developer: OpenAI's newer name for system
    content: str | list[TextPart]
    name: str | None = None
    model_config = ConfigDict(extra="forbid", strict=True)

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Sampled):
    messages: list[Message] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # newer clients' name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict | None = None  # any shape: all but {"type": "text"} get the same clear 400
    tools: list | None = None
    tool_choice: str | None = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, v):
        _unsupported("response_format", v, {"type": "text"})
        return v

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, v):
        _unsupported("tools", v or None, None)
        return v

    @field_validator("tool_choice")
    @classmethod
    def _no_tool_choice(cls, v):
        _unsupported("tool_choice", v, "none")
        return v

    @field_validator("store")
    @classmethod
    def _not_stored(cls, v):
        _unsupported("store", v, False)
        return v


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize body (what lm-eval's remote tokenizer sends)."""

    prompt: str
    add_special_tokens: bool = True
    model: str | None = None
    model_config = ConfigDict(extra="forbid", strict=True)


class DetokenizeRequest(BaseModel):
    tokens: list[int]
    model: str | None = None
    model_config = ConfigDict(extra="forbid", strict=True)


def special_names(tok) -> dict[str, int]:
    """The special tokens a text may name: the tokenizer's own (the chat template's) and end-of-text."""
    names = {t: tok.special_id(t) for t in getattr(tok, "special", [])}
    if tok.eot_id is not None:
        names.setdefault(tok.decode([tok.eot_id]), tok.eot_id)
    return names


def encode_with_specials(tok, text: str, add_special_tokens: bool) -> list[int]:
    """Text -> ids with special tokens written in it taken as themselves (as a Hugging Face tokenizer splits
    added tokens out), the rest encoded as infer.py encodes text; add_special_tokens prepends <|bos|> where the
    tokenizer has one (a stage=completion model)."""
    import re

    names = special_names(tok)
    ids = [tok.bos_id] if add_special_tokens and tok.bos_id is not None else []
    if not names:
        return ids + tok.encode(text)
    for piece in re.split("(" + "|".join(map(re.escape, sorted(names, key=len, reverse=True))) + ")", text):
        ids += [names[piece]] if piece in names else (tok.encode(piece) if piece else [])
    return ids


class ApiJob(Job):
    """One choice of an OpenAI request: a row of the batch like a Job, whose items go to the request's
    shared queue tagged with the choice's index: (index, "piece", text, logprob entries), (index, "done",
    summary, None) or (index, "error", message, None). Stop strings end the row (engine.text_stop) and cut
    the text where the first one starts; while streaming, the last len(longest stop) - 1 characters are held
    back, so no part of a stop string is ever sent. top_logprobs (None: none) asks the Batcher for each
    token's log-probability and that many alternatives (from the model's logits, before temperature)."""

    def __init__(self, tokenizer, ids: list[int], sampling: Sampling, loop, queue: asyncio.Queue, index: int,
                 stream: bool, stops: list[str], top_logprobs: int | None):
        self.ids, self.sampling, self.loop, self.queue, self.tokenizer = ids, sampling, loop, queue, tokenizer
        self.gen, self.index, self.stream, self.stops, self.top_logprobs = sampling.generator, index, stream, stops, \
            top_logprobs
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.row: Row | None = None
        self.shown, self.sent, self.cancelled, self.t0 = "", 0, False, 0.0
        self.t_created, self.t_first = time.perf_counter(), None
        self.offsets: list[int] = []  # the text's length after each new token
        self.entries: list[tuple] = []  # (token, logprob, [(alternative, logprob), ...]) per new token
        self.noted: tuple | None = None

    def emit(self, *item) -> None:
        super().emit(self.index, *item)

    def note(self, logits: torch.Tensor, ids: torch.Tensor) -> None:
        """The logits (1, V) the row's next token `ids` (1,) was sampled from (worker thread)."""
        lp = torch.log_softmax(logits[0].float(), dim=-1)
        t = int(ids[0])
        top = torch.topk(lp, min(self.top_logprobs, lp.size(-1))) if self.top_logprobs else None  # a tiny vocab
        alts = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
        self.noted = (t, float(lp[t]), alts)

    def push(self, t: int) -> None:
        if self.top_logprobs is not None:
            self.entries.append(self.noted)
        text = self.tokenizer.decode(self.new)
        self.offsets.append(len(text))
        if not self.stream or self.row.done or text.endswith("\ufffd"):
            return  # a finished row's text goes out from finish(), cut at its stop string
        safe = len(text) - self.hold
        if safe > len(self.shown):
            n = self.sent
            while n < len(self.offsets) and self.offsets[n] <= safe:
                n += 1
            self.emit("piece", text[len(self.shown):safe],
                      self.entries[self.sent:n] if self.top_logprobs is not None else None)
            self.shown, self.sent = text[:safe], n

    def finish(self) -> None:
        text, reason = self.tokenizer.decode(self.new), self.row.finish_reason
        cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        kept = len(self.new)
        if cuts:
            text, reason = text[:min(cuts)], "stop"
            # the tokens whose text starts in the answer (a stop string that begins inside a token keeps that
            # token: its first characters are the answer's last) or ends within it (a token that adds no
            # character: the last bytes of a character split over tokens, a special token the text hides), so
            # the tokens cover the answer, as the stream sent them
            kept = 0
            for i, end in enumerate(self.offsets):
                if (self.offsets[i - 1] if i else 0) < len(text) or end <= len(text):
                    kept = i + 1
        self.emit("done", {"text": text, "finish_reason": reason, "tokens": len(self.new),
                           "logprobs": self.entries[:kept] if self.top_logprobs is not None else None}, None)


def _chunked(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=True, separators=(',', ':'))}\n\n"


class OpenAIRoutes:
    """/v1/models, /v1/completions and /v1/chat/completions: each request becomes one or more rows of the
    Batcher (prompts x n, each a choice), within the server's limits."""

    def __init__(self, engine: Engine, limits: Limits, batcher: Batcher, model_name: str):
        self.engine, self.limits, self.batcher, self.name = engine, limits, batcher, model_name
        self.created = int(time.time())

    def model_card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "gpt-pipeline"}

    def check_model(self, name: str) -> None:
        if name != self.name:
            raise ApiError(404, f"model {name!r} is not served here; this server serves {self.name!r} "
                                "(GET /v1/models)", "model", "model_not_found")

    def max_tokens(self, asked: int | None, default: int, field: str = "max_tokens") -> int:
        if asked is not None and asked > self.limits.max_new_tokens:
            raise ApiError(400, f"{field}={asked} is over this server's limit of {self.limits.max_new_tokens} "
                                "(limits.max_new_tokens)", field)
        return asked if asked is not None else min(default, self.limits.max_new_tokens)

    def rows(self, n: int, prompts: int) -> None:
        """Each choice is a row of its own, joining the running batch as slots free: a request may ask for more
        choices than limits.max_batch, up to the admission slots of an idle server (max_batch + max_queue)."""
        cap = self.limits.max_batch + self.limits.max_queue
        if n * prompts > cap:
            raise ApiError(400, f"n={n} x {prompts} prompt(s) asks for {n * prompts} choices; this server admits at "
                                f"most {cap} at once (limits.max_batch + limits.max_queue)", "n")

    def start(self, request: Request, prompts: list[list[int]], body: _Sampled, max_tokens: int,
              stop_ids: tuple[int, ...], top_logprobs: int | None, text=None) -> tuple[list[ApiJob], asyncio.Queue]:
        """Take one admission slot per choice (503 when full) and queue the choices: prompt p's choice i has
        index p * n + i and samples with seed + i (so choice 0 is what n=1 gives). text: what turns new ids into
        the answer's text (default the tokenizer; a chat's ChatText leaves special tokens out)."""
        text = text or self.engine.tokenizer
        ticket = request.scope["gpt.ticket"]
        ticket.take(len(prompts) * body.n)
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        jobs = []
        for p, ids in enumerate(prompts):
            for i in range(body.n):
                gen = torch.Generator(device=self.engine.device)
                gen.manual_seed((body.seed + i) % (SEED_MAX + 1) if body.seed is not None else
                                int(time.time_ns() % 2**31) + i)
                sampling = Sampling(max_tokens, body.temperature, body.top_k, body.top_p, stop_ids=stop_ids,
                                    generator=gen, stop=text_stop(text.decode, body.stop) if body.stop else None)
                job = ApiJob(text, ids, sampling, loop, queue, len(jobs), body.stream,
                             body.stop or [], top_logprobs)
                jobs.append(job)
                ticket.jobs.append(job)
        for job in jobs:
            self.batcher.submit(job)
        return jobs, queue

    async def collect(self, request: Request, jobs: list[ApiJob], queue: asyncio.Queue) -> list[dict]:
        """Wait for every choice's summary (a client that leaves cancels them all)."""
        async def watch():
            while (await request.receive())["type"] != "http.disconnect":
                pass
            for job in jobs:
                job.cancelled = True
            queue.put_nowait((None, "cancelled", None, None))

        watcher = asyncio.create_task(watch())
        done: dict[int, dict] = {}
        try:
            while len(done) < len(jobs):
                i, kind, a, _ = await queue.get()
                if kind == "done":
                    done[i] = a
                elif kind == "error":
                    raise ApiError(500, f"generation failed: {a}")
                elif kind == "cancelled":
                    raise ApiError(499, "client closed the connection")
        finally:
            watcher.cancel()
        return [done[i] for i in range(len(jobs))]

    async def stream(self, jobs: list[ApiJob], queue: asyncio.Queue, chunk, usage: dict | None):
        """SSE: chunk(index, text, entries, finish_reason) per piece, a last chunk per choice with its
        finish_reason, the usage chunk if asked, then data: [DONE]."""
        finished, sent, completion = 0, {}, 0
        while finished < len(jobs):
            i, kind, a, b = await queue.get()
            if kind == "piece":
                text, n = sent.get(i, ("", 0))
                sent[i] = (text + a, n + len(b or ()))
                yield _chunked(chunk(i, a, b, None))
            elif kind == "done":
                text, n = sent.get(i, ("", 0))
                entries = a["logprobs"][n:] if a["logprobs"] is not None else None
                rest = a["text"][len(text):]
                if rest or entries:  # the answer's last text first: OpenAI's finishing chunk carries no answer
                    yield _chunked(chunk(i, rest, entries, None))
                yield _chunked(chunk(i, "", None, a["finish_reason"]))
                finished += 1
                completion += a["tokens"]
            elif kind == "error":
                yield _chunked(error_content("/v1/", 500, f"generation failed: {a}"))
                yield "data: [DONE]\n\n"  # the stream still ends as every stream does (vLLM does the same)
                return
        if usage is not None:
            yield _chunked({**chunk(0, "", None, None), "choices": [],
                            "usage": {**usage, "completion_tokens": completion,
                                      "total_tokens": usage["prompt_tokens"] + completion}})
        yield "data: [DONE]\n\n"

    # ------------------------------------------------------------------------------ completions

    def completion_logprobs(self, entries: list[tuple] | None, start: int) -> dict | None:
        if entries is None:
            return None
        dec, out = self.engine.tokenizer.decode, {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                                   "text_offset": []}
        for t, lp, alts in entries:
            out["tokens"].append(dec([t]))
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append(None if alts is None else {dec([a]): v for a, v in alts})
            out["text_offset"].append(start)
            start += len(out["tokens"][-1])
        return out

    def prompt_ids(self, prompt) -> tuple[list[list[int]], list[str]]:
        """A completion request's prompt -> (token ids of each prompt, its text). Text is encoded as infer.py
        encodes it; token ids (one list, or a list of lists) are taken as they are, each checked against the
        vocabulary."""
        tok = self.engine.tokenizer
        if isinstance(prompt, str) or isinstance(prompt[0], str):
            texts = [prompt] if isinstance(prompt, str) else prompt
            for p in texts:
                if len(p) > self.limits.max_prompt_chars:
                    raise ApiError(400, f"a prompt of {len(p)} characters is over this server's limit of "
                                        f"{self.limits.max_prompt_chars} (limits.max_prompt_chars)", "prompt")
            try:
                return [encode_prompt(tok, p, self.engine.model.config.block_size, note=False) for p in texts], texts
            except UserError as e:
                raise ApiError(400, str(e), "prompt") from None
        lists = [prompt] if isinstance(prompt[0], int) else prompt
        for ids in lists:
            if len(ids) > self.limits.max_prompt_chars:
                raise ApiError(400, f"a prompt of {len(ids)} tokens is over this server's limit of "
                                    f"{self.limits.max_prompt_chars} (limits.max_prompt_chars)", "prompt")
            self.in_vocabulary(ids, "prompt")
        return [list(ids) for ids in lists], [tok.decode(ids) for ids in lists]

    def in_vocabulary(self, ids: list[int], field: str) -> None:
        vocab = self.engine.model.config.vocab_size
        bad = next((i for i in ids if not 0 <= i < vocab), None)
        if bad is not None:
            raise ApiError(400, f"token id {bad} is outside this model's vocabulary of {vocab} ids", field)

    def fits_scoring(self, ids: list[int]) -> None:
        block = self.engine.model.config.block_size
        if len(ids) > block:
            raise ApiError(400, f"echo with logprobs scores a prompt of at most block_size={block} tokens, not "
                                f"{len(ids)} (lm-eval: pass max_length={block})", "prompt", "context_length_exceeded")

    def score(self, ids: list[int], top: int) -> list[tuple]:
        """The prompt's own log-probabilities (echo with logprobs): (token, logprob, alternatives) per token, None
        for the first (nothing precedes it); one forward over the prompt, between the worker's decode steps."""
        with self.engine.lock, torch.no_grad():
            logits, _ = self.engine.model(torch.tensor([ids], device=self.engine.device))
        lp = torch.log_softmax(logits[0, :-1].float(), dim=-1)  # position i predicts token i + 1
        nxt = torch.tensor(ids[1:], device=lp.device)
        got = lp.gather(1, nxt[:, None])[:, 0].tolist()
        alts = torch.topk(lp, min(top, lp.size(-1)), dim=-1) if top else None
        out = [(ids[0], None, None)]
        for i, t in enumerate(ids[1:]):
            out.append((t, got[i], list(zip(alts.indices[i].tolist(), alts.values[i].tolist())) if top else []))
        return out

    async def completions(self, body: CompletionRequest, request: Request):
        self.check_model(body.model)
        tok, block = self.engine.tokenizer, self.engine.model.config.block_size
        scored = body.echo and body.logprobs is not None  # the prompt's logprobs too
        if scored and body.stream:
            raise ApiError(400, "echo with logprobs is answered whole, not streamed: drop stream", "stream")
        max_tokens = self.max_tokens(body.max_tokens, 16)  # OpenAI's default for completions
        prompts, texts = self.prompt_ids(body.prompt)
        self.rows(body.n, len(prompts))
        head = {"id": f"cmpl-{os.urandom(12).hex()}", "object": "text_completion", "created": int(time.time()),
                "model": self.name}
        if scored:  # checked before any slot is taken or row queued
            for ids in prompts:
                self.fits_scoring(ids)
            texts = [tok.decode(ids) for ids in prompts]  # the echo is what was scored (a <|bos|> included)
        if max_tokens == 0:  # the prompt alone, with its logprobs if asked (one admission slot per prompt)
            if body.stream:
                raise ApiError(400, "max_tokens=0 is answered whole, not streamed: drop stream", "stream")
            request.scope["gpt.ticket"].take(len(prompts))
        else:
            prompts = [ids[-block:] for ids in prompts]  # the context-window rule: a long prompt's last block_size
            # scored (lm-eval's loglikelihood: echo, logprobs, max_tokens 1): every answer carries its generated
            # tokens' entries after the prompt's, so end-of-text is scored as a token rather than ending the answer
            stop_ids = () if scored else answer_stop_ids(tok, chat=False)
            jobs, queue = self.start(request, prompts, body, max_tokens, stop_ids, body.logprobs)
        scores = [await asyncio.to_thread(self.score, ids, body.logprobs) for ids in prompts] if scored else None
        n_prompt = sum(len(ids) for ids in prompts)  # the tokens the model saw, each prompt once whatever n
        if max_tokens == 0:
            choices = [{"index": p * body.n + i, "text": texts[p], "finish_reason": "length",
                        "logprobs": self.completion_logprobs(scores[p], 0) if scored else None}
                       for p in range(len(prompts)) for i in range(body.n)]
            return {**head, "choices": choices,
                    "usage": {"prompt_tokens": n_prompt, "completion_tokens": 0, "total_tokens": n_prompt}}
        prefix = [texts[j.index // body.n] if body.echo else "" for j in jobs]

        if body.stream:
            streamed: dict[int, int] = {}  # choice -> characters sent, the echoed prompt included

            def chunk(i, text, entries, reason):
                first, start = i not in streamed, streamed.get(i, len(prefix[i]))
                streamed[i] = start + len(text)
                lp = self.completion_logprobs(entries, start) if entries is not None else None
                text = prefix[i] + text if first else text  # echo: the prompt goes out with the first piece
                return {**head, "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": reason}]}

            usage = {"prompt_tokens": n_prompt} if (body.stream_options or {}).get("include_usage") else None
            return StreamingResponse(self.stream(jobs, queue, chunk, usage), media_type="text/event-stream")
        done = await self.collect(request, jobs, queue)
        choices = [{"index": i, "text": prefix[i] + d["text"], "finish_reason": d["finish_reason"],
                    "logprobs": self.completion_logprobs(scores[i // body.n] + d["logprobs"], 0) if scored else
                    self.completion_logprobs(d["logprobs"], len(prefix[i]))} for i, d in enumerate(done)]
        n_new = sum(d["tokens"] for d in done)
        return {**head, "choices": choices,
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_new, "total_tokens": n_prompt + n_new}}

    # ------------------------------------------------------------------------------ chat

    def chat_logprobs(self, entries: list[tuple] | None) -> dict | None:
        if entries is None:
            return None
        dec = self.engine.tokenizer.decode

        raw = getattr(self.engine.tokenizer, "token_bytes", None)

        def one(t, lp):
            s = dec([t])  # a token holding part of a character shows U+FFFD here; its bytes are the real ones
            return {"token": s, "logprob": lp, "bytes": list(raw(t) if raw else s.encode("utf-8", "replace"))}

        return {"content": [{**one(t, lp), "top_logprobs": [one(a, v) for a, v in alts]} for t, lp, alts in entries]}

    async def chat(self, body: ChatRequest, request: Request):
        self.check_model(body.model)
        from gpt.chat import SPECIAL, encode_chat

        tok, block = self.engine.tokenizer, self.engine.model.config.block_size
        if not all(t in getattr(tok, "special", []) for t in SPECIAL):
            raise ApiError(400, f"model {self.name!r} has no chat template (a base model, not fine-tuned with "
                                "stage=sft): use /v1/completions with a text prompt", "messages",
                           "no_chat_template")
        chars = sum(len(m.text) for m in body.messages)
        if chars > self.limits.max_prompt_chars:
            raise ApiError(400, f"messages of {chars} characters in all are over this server's limit of "
                                f"{self.limits.max_prompt_chars} (limits.max_prompt_chars)", "messages")
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise ApiError(400, "max_tokens and max_completion_tokens both set: send one", "max_completion_tokens")
        field = "max_tokens" if body.max_completion_tokens is None else "max_completion_tokens"
        asked = body.max_tokens if body.max_completion_tokens is None else body.max_completion_tokens
        if asked == 0:
            raise ApiError(400, f"{field}=0: a chat answer needs at least one token", field)
        max_tokens = self.max_tokens(asked, self.limits.max_new_tokens, field)
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs=true", "top_logprobs")
        self.rows(body.n, 1)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text}
                    for m in body.messages]
        try:
            ids = encode_chat(tok, messages, generation_prompt=True)[0]
        except UserError as e:
            raise ApiError(400, str(e), "messages") from None
        ids = ids[-block:]  # the context-window rule, as infer.py's terminal chat
        stops = answer_stop_ids(tok)  # export_meta's eos ids (<|end|>, end-of-text), then a new turn's role tokens
        jobs, queue = self.start(request, [ids], body, max_tokens, stops,
                                 (body.top_logprobs or 0) if body.logprobs else None, ChatText(tok))
        head = {"id": f"chatcmpl-{os.urandom(12).hex()}", "object": "chat.completion", "created": int(time.time()),
                "model": self.name}
        n_prompt = len(ids)  # the tokens the model saw, once whatever n

        if body.stream:
            started = set()

            def chunk(i, text, entries, reason):
                delta = {} if reason is not None and not text else {"content": text}
                if i not in started:  # the first chunk of a choice names the role
                    started.add(i)
                    delta = {"role": "assistant", **delta}
                return {**head, "object": "chat.completion.chunk", "choices": [
                    {"index": i, "delta": delta, "logprobs": self.chat_logprobs(entries) if entries else None,
                     "finish_reason": reason}]}

            usage = {"prompt_tokens": n_prompt} if (body.stream_options or {}).get("include_usage") else None
            return StreamingResponse(self.stream(jobs, queue, chunk, usage), media_type="text/event-stream")
        done = await self.collect(request, jobs, queue)
        choices = [{"index": i, "message": {"role": "assistant", "content": d["text"]},
                    "logprobs": self.chat_logprobs(d["logprobs"]), "finish_reason": d["finish_reason"]}
                   for i, d in enumerate(done)]
        n_new = sum(d["tokens"] for d in done)
        return {**head, "choices": choices,
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_new, "total_tokens": n_prompt + n_new}}

    def add_to(self, app: FastAPI) -> None:
        @app.get("/v1/models")
        def models() -> dict:
            return {"object": "list", "data": [self.model_card()]}

        @app.get("/v1/models/{name:path}")
        def model(name: str) -> dict:
            self.check_model(name)
            return self.model_card()

        @app.post("/v1/completions")
        async def completions(body: CompletionRequest, request: Request):
            return await self.completions(body, request)

        # vLLM's tokenizer routes: lm-eval's local-completions uses them as its tokenizer ("remote")
        @app.get("/tokenizer_info")
        def tokenizer_info() -> dict:
            tok, names = self.engine.tokenizer, {v: k for k, v in special_names(self.engine.tokenizer).items()}
            return {"tokenizer_class": type(tok).__name__, "eos_token": names.get(tok.eot_id),
                    "bos_token": names.get(tok.bos_id) if tok.bos_id is not None else None, "pad_token": None,
                    "model_max_length": self.engine.model.config.block_size,
                    # a chat model's template in Jinja, the one its export carries (vLLM's route gives it too)
                    "chat_template": CHAT_TEMPLATE if has_chat_template(tok) else None}

        @app.post("/tokenize")
        def tokenize(body: TokenizeRequest) -> dict:
            if body.model is not None:
                self.check_model(body.model)
            try:
                ids = encode_with_specials(self.engine.tokenizer, body.prompt, body.add_special_tokens)
            except UserError as e:
                raise ApiError(400, str(e), "prompt") from None
            return {"count": len(ids), "max_model_len": self.engine.model.config.block_size, "tokens": ids,
                    "token_strs": None}

        @app.post("/detokenize")
        def detokenize(body: DetokenizeRequest) -> dict:
            if body.model is not None:
                self.check_model(body.model)
            self.in_vocabulary(body.tokens, "tokens")
            return {"prompt": self.engine.tokenizer.decode(body.tokens)}

        @app.post("/v1/chat/completions")
        async def chat(body: ChatRequest, request: Request):
            return await self.chat(body, request)


def create_app(engine: Engine, limits: Limits | None = None, api_key: str | None = None,
               model_name: str | None = None) -> FastAPI:
    """The service around `engine`; api_key (None: open) is then required on every path but / and /health.
    model_name: the id the OpenAI routes serve (None: the checkpoint file's name without its suffix)."""
    limits = limits or Limits()
    name = model_name or Path(engine.checkpoint).stem or "gpt"
    page = chat_page()
    app = FastAPI(title="gpt-pipeline inference", version="0.1.0", default_response_class=SafeJSONResponse)
    admission = Admission(limits.max_queue + limits.max_batch)
    batcher = Batcher(engine, limits.max_batch, limits.batch_wait_ms)
    app.state.batcher, app.state.admission = batcher, admission
    Body = request_model(limits)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> SafeJSONResponse:
        errors = validation_errors(exc.errors())
        if request.url.path.startswith("/v1/"):  # OpenAI answers a bad body with 400 and the field's name
            message, param = openai_validation_message(errors)
            return SafeJSONResponse(error_content(request.url.path, 400, message, param), status_code=400)
        return SafeJSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> SafeJSONResponse:
        content = error_content(request.url.path, exc.status_code, _clip(exc.detail, 1000),
                                getattr(exc, "param", None), getattr(exc, "code", None))
        return SafeJSONResponse(content, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> SafeJSONResponse:  # a bug, still answered in JSON
        return SafeJSONResponse(error_content(request.url.path, 500, f"internal error: {type(exc).__name__}"),
                                status_code=500)

    def admit(request: Request, req: GenerateRequest, stream: bool) -> Job:
        """Encode a valid request, take its ticket (503 when full) and queue its job."""
        if req.max_new_tokens is None:
            req.max_new_tokens = min(128, limits.max_new_tokens)
        try:
            ids = engine.encode(req)
        except UserError as e:
            raise HTTPException(400, str(e)) from None
        ticket = request.scope["gpt.ticket"]
        ticket.take()
        job = Job(engine, ids, req, asyncio.get_running_loop(), stream)
        ticket.jobs.append(job)
        batcher.submit(job)
        return job

    @app.get("/", include_in_schema=False)
    def index() -> Response:
        """The chat page (it reads /health to learn the model's id and whether it is a chat model)."""
        return Response(page, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    @app.get("/health")
    def health() -> dict:
        cfg = engine.model.config
        return {"status": "ok", "model_loaded": True, "model": name, "chat": has_chat_template(engine.tokenizer),
                "device": engine.device, "checkpoint": engine.checkpoint,
                "parameters": engine.model.num_params(), "block_size": cfg.block_size, "vocab_size": cfg.vocab_size,
                "in_flight": admission.in_flight, "batching": batcher.stats(),
                # what a client may ask for (the chat page fits its history and max tokens to these)
                "limits": {"max_new_tokens": limits.max_new_tokens, "max_prompt_chars": limits.max_prompt_chars}}

    @app.post("/generate")
    async def generate(req: Body, request: Request):
        job = admit(request, req, stream=False)
        watch = asyncio.create_task(_cancel_on_disconnect(request.receive, job))
        try:
            text = []
            while True:
                kind, a, b = await job.queue.get()
                if kind == "piece":
                    text.append(a)
                elif kind == "error":
                    raise HTTPException(500, f"generation failed: {a}")
                elif kind == "cancelled":  # the client is gone; nobody reads this answer
                    return SafeJSONResponse({"detail": "client closed the connection"}, status_code=499)
                else:
                    n, dt = a, b  # new tokens, seconds since the request's batch started
                    break
        finally:
            watch.cancel()
        return {"prompt": req.prompt, "completion": "".join(text), "new_tokens": n,
                "finish_reason": "length" if n >= req.max_new_tokens else "stop", "seconds": round(dt, 4),
                "tokens_per_second": round(n / dt, 2) if dt > 0 else None}

    @app.post("/generate/stream")
    async def generate_stream(req: Body, request: Request) -> StreamingResponse:
        # a client that goes away ends the response (Starlette listens for the disconnect), and with it the
        # request: Guard's finally then drops the row
        job = admit(request, req, stream=True)

        async def events():
            while True:
                kind, a, _ = await job.queue.get()
                if kind == "piece":
                    yield f"data: {json.dumps({'text': a})}\n\n"
                elif kind == "error":
                    yield f"event: error\ndata: {json.dumps({'error': a})}\n\n"
                    break
                else:
                    yield f"data: {json.dumps({'done': True, 'new_tokens': a})}\n\n"
                    break

        return StreamingResponse(events(), media_type="text/event-stream")

    metrics = Metrics(batcher, admission) if _has_prometheus() else None
    batcher.metrics = app.state.metrics = metrics

    @app.get("/metrics")
    def scrape():
        """Prometheus text format (behind the API key, like every path but /health)."""
        if metrics is None:
            raise HTTPException(501, "metrics need the prometheus-client package: pip install prometheus-client")
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    OpenAIRoutes(engine, limits, batcher, name).add_to(app)
    app.add_middleware(Guard, admission=admission, max_body_bytes=limits.max_body_bytes, api_key=api_key,
                       metrics=metrics)
    return app


def chat_page() -> bytes:
    """gpt/web/chat.html, shipped in the package (no build step, nothing fetched from elsewhere)."""
    return (importlib.resources.files("gpt") / "web" / "chat.html").read_bytes()


def has_chat_template(tokenizer) -> bool:
    """Whether the tokenizer has the chat template's tokens (a stage=sft model): the page then talks to
    /v1/chat/completions, else it continues text with /v1/completions."""
    from gpt.chat import SPECIAL

    return all(t in getattr(tokenizer, "special", []) for t in SPECIAL)


def engine_from_config(cfg) -> Engine:
    """conf/serve.yaml -> an Engine over the checkpoint, loaded like infer.py loads it (cfg.dtype, cfg.quantize)."""
    model, tokenizer, ckpt = load_for_inference(cfg.ckpt, cfg.device, cfg.get("quantize"), dtype_option(cfg))
    return Engine(model, tokenizer, cfg.device, None, ckpt["path"])


def api_key_of(cfg) -> str | None:
    """The config's api_key, else the GPT_API_KEY environment variable; None (an open server) when neither
    is set or the value is empty."""
    key = cfg.get("api_key")
    key = os.environ.get(API_KEY_ENV) if key is None else key
    return str(key) if key not in (None, "") else None


def serve(cfg) -> None:
    """serve.py: run the app for conf/serve.yaml with uvicorn until interrupted."""
    import uvicorn

    engine = engine_from_config(cfg)
    api_key = api_key_of(cfg)
    if api_key is None and cfg.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {cfg.host} without an API key: anyone who can reach port {cfg.port} can "
              f"generate; set api_key= or {API_KEY_ENV}", file=sys.stderr)
    app = create_app(engine, Limits(**cfg.limits), api_key=api_key, model_name=cfg.get("model_name"))
    uvicorn.run(app, host=cfg.host, port=int(cfg.port), log_level="info")
