"""HTTP inference service (FastAPI): GET /health, POST /generate, POST /generate/stream (server-sent events).

Requests are validated (prompt length, max_new_tokens, sampling ranges) and answered with a clear
4xx on bad input. One background worker thread owns the model (`Batcher`): requests that arrive while it
is busy, or within `batch_wait_ms` of the first, are decoded together as one batch of up to `max_batch`
rows (left padding, one KV cache of that batch's own), each row sampled from its own logits with its own
temperature/top-k/top-p, seeded generator, stop token and max_new_tokens, so a request gets the text it
would get alone. A finished row is dropped from the batch. Each request receives its pieces through its own
queue. Beyond a full batch, up to `max_queue` requests wait; more get 503. max_batch=1 is the previous
one-generation-at-a-time server.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass

import torch
from fastapi import FastAPI, HTTPException
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from gpt.errors import UserError
from gpt.generate import last_logits, left_pad, sample_next
from gpt.inference import dtype_option, encode_prompt, load_for_inference


@dataclass
class Limits:
    max_prompt_chars: int = 8192
    max_new_tokens: int = 512
    max_queue: int = 16  # requests waiting for the model beyond a full running batch
    max_batch: int = 8  # concurrent requests decoded together (1: one generation at a time)
    batch_wait_ms: float = 5.0  # how long the worker waits for more requests to join a batch


class GenerateRequest(BaseModel):
    prompt: str = Field(..., description="text to continue")
    max_new_tokens: int | None = Field(None, ge=1, description="default: min(128, the server's limit)")
    temperature: float = Field(0.8, ge=0.0, le=5.0, description="0 = greedy")
    top_k: int | None = Field(200, ge=1)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = None
    chat: bool = False

    model_config = {"extra": "forbid"}


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

    The worker calls `push(token)` for each sampled token (text pieces go out as whole UTF-8 characters)
    and `finish()` once; the request's coroutine reads ("piece", text, token), then ("done", new_tokens,
    seconds) or ("error", message, None) from `queue` (an asyncio.Queue on `loop`)."""

    def __init__(self, engine: Engine, ids: list[int], req: GenerateRequest, loop: asyncio.AbstractEventLoop,
                 stream: bool = True):
        # stream=False (/generate): the text goes out once, at the end; waking the request's event loop for
        # every token costs the worker thread more time (GIL hand-offs) than decoding the token itself
        self.ids, self.req, self.loop, self.tokenizer, self.stream = ids, req, loop, engine.tokenizer, stream
        self.queue: asyncio.Queue = asyncio.Queue()
        self.stop = engine.stop_id(req)
        self.gen = torch.Generator(device=engine.device)
        self.gen.manual_seed(req.seed if req.seed is not None else int(time.time_ns() % 2**31))
        self.new: list[int] = []
        self.shown = ""
        self.cancelled = False  # the client went away: the worker drops the row
        self.t0 = 0.0

    def emit(self, *item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the request's event loop is closed
            self.cancelled = True

    def push(self, t: int) -> bool:
        """Take the row's next token; True when the row is finished (stop token or max_new_tokens)."""
        if t == self.stop:
            return True
        self.new.append(t)
        if self.stream:
            text = self.tokenizer.decode(self.new)
            if not text.endswith("\ufffd"):
                self.emit("piece", text[len(self.shown):], t)
                self.shown = text
        return len(self.new) >= self.req.max_new_tokens or self.cancelled

    def finish(self) -> None:
        text = self.tokenizer.decode(self.new)
        if text != self.shown:
            self.emit("piece", text[len(self.shown):], None)
        self.emit("done", len(self.new), time.perf_counter() - self.t0)


def run_batch(engine: Engine, jobs: list[Job]) -> None:
    """Decode the jobs together: left-padded prompts, one KV cache for this batch only, each row sampled
    from its own logits with its own settings and generator (the decoding of generate_tokens, whose pad
    handling makes every row generate what it would alone). Finished rows leave the batch."""
    model, block = engine.model, engine.model.config.block_size
    idx, pad = left_pad([j.ids for j in jobs], device=engine.device)
    B, T0 = idx.shape
    steps = max(j.req.max_new_tokens for j in jobs)
    seq = torch.empty(B, T0 + steps, dtype=torch.long, device=engine.device)
    seq[:, :T0] = idx
    n = T0
    cache = model.new_cache(B, block)
    active = list(jobs)
    ctx = (torch.autocast(torch.device(engine.device).type, dtype=engine.autocast_dtype) if engine.autocast_dtype
           else torch.autocast(torch.device(engine.device).type, enabled=False))
    with torch.no_grad(), ctx:
        for step in range(steps):
            lo = max(0, n - block)  # the model sees at most the last block_size columns
            wpad = (pad - lo).clamp(min=0)
            wpad = wpad if bool(wpad.any()) else None  # no padding: the exact path of a lone request
            if step == 0 or cache.pos >= block:  # (re)fill the cache from the last block_size columns
                cache.reset()
                logits = last_logits(model, seq[:, lo:n], cache, wpad)
            else:
                logits = last_logits(model, seq[:, n - 1:n], cache, wpad)
            keep = []
            for i, job in enumerate(active):
                r = job.req
                t = int(sample_next(logits[i:i + 1], r.temperature, r.top_k, r.top_p, job.gen)[0])
                seq[i, n] = t
                if job.push(t):
                    job.finish()
                else:
                    keep.append(i)
            n += 1
            if not keep:
                return
            if len(keep) < len(active):  # drop finished rows: their cache rows go with them
                k = torch.tensor(keep, device=engine.device)
                seq, pad = seq[k], pad[k]
                cache.k, cache.v = cache.k[:, k], cache.v[:, k]
                active = [active[i] for i in keep]
    for job in active:  # not reached: every row finishes by its max_new_tokens
        job.finish()


class Batcher:
    """The background worker thread that owns the model: it takes up to `max_batch` waiting jobs (waiting
    `wait_ms` for more to join when fewer are there), decodes them as one batch, and repeats. Batches run
    under `engine.lock`, so apps sharing an engine never run the model at the same time."""

    def __init__(self, engine: Engine, max_batch: int = 8, wait_ms: float = 5.0):
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch} must be >= 1")
        self.engine, self.max_batch, self.wait_s = engine, max_batch, wait_ms / 1000
        self.cv = threading.Condition()
        self.pending: deque[Job] = deque()
        self.thread: threading.Thread | None = None
        self.sizes: Counter = Counter()  # batch size -> number of batches run

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
                "requests": sum(k * v for k, v in sizes.items()), "max_batch_seen": max(sizes, default=0),
                "batch_sizes": {str(k): v for k, v in sorted(sizes.items())}, "waiting": len(self.pending)}

    def _take(self) -> list[Job]:
        with self.cv:
            deadline = time.monotonic() + self.wait_s
            while len(self.pending) < self.max_batch:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cv.wait(left)
            jobs = [self.pending.popleft() for _ in range(min(self.max_batch, len(self.pending)))]
        return [j for j in jobs if not j.cancelled]

    def _loop(self) -> None:
        while True:
            with self.cv:
                while not self.pending:
                    self.cv.wait()
            with self.engine.lock:
                jobs = self._take()
                if not jobs:
                    continue
                self.sizes[len(jobs)] += 1
                t0 = time.perf_counter()
                for j in jobs:
                    j.t0 = t0
                try:
                    run_batch(self.engine, jobs)
                except Exception as e:  # every request of the batch gets the error
                    for j in jobs:
                        j.emit("error", f"{type(e).__name__}: {e}", None)


def create_app(engine: Engine, limits: Limits | None = None) -> FastAPI:
    limits = limits or Limits()
    app = FastAPI(title="gpt-pipeline inference", version="0.1.0")
    state = {"waiting": 0}
    batcher = Batcher(engine, limits.max_batch, limits.batch_wait_ms)
    app.state.batcher = batcher

    def check(req: GenerateRequest) -> list[int]:
        if len(req.prompt) > limits.max_prompt_chars:
            raise HTTPException(413, f"prompt has {len(req.prompt)} characters; the limit is {limits.max_prompt_chars}")
        if req.max_new_tokens is None:
            req.max_new_tokens = min(128, limits.max_new_tokens)
        if req.max_new_tokens > limits.max_new_tokens:
            raise HTTPException(422, f"max_new_tokens={req.max_new_tokens} exceeds the limit {limits.max_new_tokens}")
        try:
            return engine.encode(req)
        except UserError as e:
            raise HTTPException(400, str(e)) from None

    async def admitted():
        if state["waiting"] >= limits.max_queue + limits.max_batch:
            raise HTTPException(503, f"server busy: {state['waiting']} requests in flight; retry later")
        state["waiting"] += 1

    @app.get("/health")
    def health() -> dict:
        cfg = engine.model.config
        return {"status": "ok", "model_loaded": True, "device": engine.device, "checkpoint": engine.checkpoint,
                "parameters": engine.model.num_params(), "block_size": cfg.block_size, "vocab_size": cfg.vocab_size,
                "in_flight": state["waiting"], "batching": batcher.stats()}

    @app.post("/generate")
    async def generate(req: GenerateRequest) -> dict:
        ids = check(req)
        await admitted()
        job = Job(engine, ids, req, asyncio.get_running_loop(), stream=False)
        try:
            batcher.submit(job)
            text = []
            while True:
                kind, a, b = await job.queue.get()
                if kind == "piece":
                    text.append(a)
                elif kind == "error":
                    raise RuntimeError(a)
                else:
                    n, dt = a, b  # new tokens, seconds since the request's batch started
                    break
        finally:
            job.cancelled = True  # a no-op once done; drops the row if this request was abandoned
            state["waiting"] -= 1
        return {"prompt": req.prompt, "completion": "".join(text), "new_tokens": n,
                "finish_reason": "length" if n >= req.max_new_tokens else "stop", "seconds": round(dt, 4),
                "tokens_per_second": round(n / dt, 2) if dt > 0 else None}

    @app.post("/generate/stream")
    async def generate_stream(req: GenerateRequest) -> StreamingResponse:
        ids = check(req)
        await admitted()

        async def events():
            job = Job(engine, ids, req, asyncio.get_running_loop())
            try:
                batcher.submit(job)
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
            finally:
                job.cancelled = True  # the client went away: the worker drops the row
                state["waiting"] -= 1

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def engine_from_config(cfg) -> Engine:
    """conf/serve.yaml -> an Engine over the checkpoint, loaded like infer.py loads it (cfg.dtype, cfg.quantize)."""
    model, tokenizer, ckpt = load_for_inference(cfg.ckpt, cfg.device, cfg.get("quantize"), dtype_option(cfg))
    return Engine(model, tokenizer, cfg.device, None, ckpt["path"])


def serve(cfg) -> None:
    """serve.py: run the app for conf/serve.yaml with uvicorn until interrupted."""
    import uvicorn

    engine = engine_from_config(cfg)
    uvicorn.run(create_app(engine, Limits(**cfg.limits)), host=cfg.host, port=int(cfg.port), log_level="info")
