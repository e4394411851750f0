"""HTTP inference service (FastAPI): GET /health, POST /generate, POST /generate/stream (server-sent events).

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
import json
import os
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from gpt.errors import UserError
from gpt.engine import DecodeEngine, Row, Sampling, sample_next
from gpt.inference import dtype_option, encode_prompt, load_for_inference

SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes a 64-bit value; larger ones raise inside the request
# The sampler works in float32: a positive temperature below ~1e-37 or a top_p below ~1e-45 becomes 0 there
# and turns every probability into NaN. Below 1e-5 sampling is argmax in practice, so that is the floor.
SAMPLING_EPS = 1e-5
API_KEY_ENV = "GPT_API_KEY"  # read by serve() when api_key is not set in the config


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
        return encode_prompt(self.tokenizer, req.prompt, self.model.config.block_size, out=None)[
            -self.model.config.block_size:]

    def stop_id(self, req: GenerateRequest) -> int | None:
        if req.chat:
            from gpt.chat import END

            return self.tokenizer.special_id(END)
        return self.tokenizer.eot_id

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
        self.ids, self.req, self.loop, self.tokenizer, self.stream = ids, req, loop, engine.tokenizer, stream
        self.queue: asyncio.Queue = asyncio.Queue()
        self.stop = engine.stop_id(req)
        self.gen = torch.Generator(device=engine.device)
        self.gen.manual_seed(req.seed if req.seed is not None else int(time.time_ns() % 2**31))
        self.sampling = Sampling(req.max_new_tokens, req.temperature, req.top_k, req.top_p,
                                 stop_ids=() if self.stop is None else (self.stop,), generator=self.gen)
        self.row: Row | None = None
        self.shown = ""
        self.cancelled = False  # the client went away: the worker drops the row before its next step
        self.t0 = 0.0

    @property
    def new(self) -> list[int]:
        """The request's new token ids so far."""
        return self.row.new if self.row is not None else []

    def cancel(self) -> None:
        """The client went away (call on the request's event loop): the worker drops the row before its next
        step, and whoever waits on `queue` wakes up now instead of after the row's last step."""
        self.cancelled = True
        self.queue.put_nowait(("cancelled", None, None))

    def emit(self, *item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the request's event loop is closed
            self.cancelled = True

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
        self.decoder = DecodeEngine(engine.model, max_batch, sample=_sample)
        self.cv = threading.Condition()
        self.pending: deque[Job] = deque()
        self.running: list[Job] = []
        self.thread: threading.Thread | None = None
        self.sizes: Counter = Counter()  # requests that joined at one step -> number of such steps
        self.most = 0

    def submit(self, job: Job) -> None:
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
            live = sum(not j.row.done for j in self.running)
            joined = []
            while self.pending and live + len(joined) < self.max_batch:
                job = self.pending.popleft()
                if not job.cancelled:
                    joined.append(job)
        t0 = time.perf_counter()
        for job in joined:
            job.row, job.t0 = self.decoder.add([job.ids], job.sampling)[0], t0
            job.row.data = job
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
        for row, t in events:
            if row.stop_token is None:  # a stop token is not part of the text
                row.data.push(t)
        still = []
        for job in self.running:
            row = job.row
            if not row.done:
                still.append(job)
            elif row.finish_reason == "error":
                job.fail(row.error)
            elif row.finish_reason != "cancelled":
                job.finish()
        self.running = still

    def _loop(self) -> None:
        while True:
            with self.cv:
                while not self.pending and not self.running:
                    self.cv.wait()
            with self.engine.lock:
                self._admit()
                if self.running:
                    self._step()


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
    """One request's claim on an Admission slot and on the model: `take()` once the request is valid (503
    when full), then `job` is its row. Guard calls `release()` in its finally when the request ends, however
    it ends: the slot goes back and the row, if still decoding, is dropped at the worker's next step."""

    def __init__(self, admission: Admission):
        self.admission, self.held = admission, False
        self.job: Job | None = None

    def take(self) -> None:
        a = self.admission
        if a.in_flight >= a.cap:
            raise HTTPException(503, f"server busy: {a.in_flight} requests in flight; retry later")
        a.in_flight += 1
        self.held = True

    def release(self) -> None:
        if self.job is not None:
            self.job.cancelled = True  # a no-op for a finished row
        if self.held:
            self.held = False
            self.admission.in_flight -= 1


async def _answer(send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    body = SafeJSONResponse({"detail": detail}).body
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """The ASGI layer in front of every route: API key (all paths but /health when one is set), body size
    (read up to max_body_bytes, 413 beyond, before anything parses it), and the request's admission Ticket,
    put in scope["gpt.ticket"] for the route to take and released here in one finally, whatever happens
    inside (a validation error, an exception, a cancelled task, a client gone mid-stream)."""

    def __init__(self, app, admission: Admission, max_body_bytes: int, api_key: str | None = None):
        self.app, self.admission, self.max_body = app, admission, max_body_bytes
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
                                     f"{self.max_body} (limits.max_body_bytes)")
            return None
        chunks, size = [], 0
        while True:  # also bounds chunked bodies, which carry no content-length
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                await _answer(send, 413, f"request body over {self.max_body} bytes (limits.max_body_bytes)")
                return None
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.key is not None and scope["path"] != "/health" and not self._authorized(scope):
            return await _answer(send, 401, "missing or wrong API key: send the header 'Authorization: Bearer "
                                            "<key>'", {"www-authenticate": "Bearer"})
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


def create_app(engine: Engine, limits: Limits | None = None, api_key: str | None = None) -> FastAPI:
    """The service around `engine`; api_key (None: open) is then required on every path but /health."""
    limits = limits or Limits()
    app = FastAPI(title="gpt-pipeline inference", version="0.1.0", default_response_class=SafeJSONResponse)
    admission = Admission(limits.max_queue + limits.max_batch)
    batcher = Batcher(engine, limits.max_batch, limits.batch_wait_ms)
    app.state.batcher, app.state.admission = batcher, admission
    Body = request_model(limits)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> SafeJSONResponse:
        return SafeJSONResponse({"detail": validation_errors(exc.errors())}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> SafeJSONResponse:
        return SafeJSONResponse({"detail": _clip(exc.detail, 1000)}, status_code=exc.status_code,
                                headers=exc.headers)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> SafeJSONResponse:  # a bug, still answered in JSON
        return SafeJSONResponse({"detail": f"internal error: {type(exc).__name__}"}, status_code=500)

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
        job = ticket.job = Job(engine, ids, req, asyncio.get_running_loop(), stream)
        batcher.submit(job)
        return job

    @app.get("/health")
    def health() -> dict:
        cfg = engine.model.config
        return {"status": "ok", "model_loaded": True, "device": engine.device, "checkpoint": engine.checkpoint,
                "parameters": engine.model.num_params(), "block_size": cfg.block_size, "vocab_size": cfg.vocab_size,
                "in_flight": admission.in_flight, "batching": batcher.stats()}

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

    app.add_middleware(Guard, admission=admission, max_body_bytes=limits.max_body_bytes, api_key=api_key)
    return app


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
    app = create_app(engine, Limits(**cfg.limits), api_key=api_key)
    uvicorn.run(app, host=cfg.host, port=int(cfg.port), log_level="info")
