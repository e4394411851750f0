"""HTTP inference service (FastAPI): GET /health, POST /generate, POST /generate/stream (server-sent events).

Requests are validated (prompt length, max_new_tokens, sampling ranges) and answered with a clear
4xx on bad input. One model instance serves one generation at a time: requests queue for it (up to
`max_queue` waiting, beyond that 503), so no request ever runs on top of another's KV cache.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass

import torch
from fastapi import FastAPI, HTTPException
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from gpt.errors import UserError
from gpt.generate import generate_tokens
from gpt.inference import dtype_option, encode_prompt, load_for_inference


@dataclass
class Limits:
    max_prompt_chars: int = 8192
    max_new_tokens: int = 512
    max_queue: int = 16  # requests waiting for the model beyond the one running


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

    def pieces(self, ids: list[int], req: GenerateRequest):
        """Yield (text piece, token id) for each new token; decoding waits for whole UTF-8 characters."""
        g = torch.Generator(device=self.device)
        g.manual_seed(req.seed if req.seed is not None else int(time.time_ns() % 2**31))
        idx = torch.tensor([ids], dtype=torch.long, device=self.device)
        new, shown = [], ""
        ctx = (torch.autocast(torch.device(self.device).type, dtype=self.autocast_dtype) if self.autocast_dtype
               else torch.autocast(torch.device(self.device).type, enabled=False))
        stop = self.stop_id(req)
        with self.lock, ctx:
            for nxt in generate_tokens(self.model, idx, req.max_new_tokens, temperature=req.temperature,
                                       top_k=req.top_k, top_p=req.top_p, eot_id=stop, generator=g):
                t = int(nxt[0])
                if t == stop:
                    return
                new.append(t)
                text = self.tokenizer.decode(new)
                if not text.endswith("\ufffd"):
                    yield text[len(shown):], t
                    shown = text
        text = self.tokenizer.decode(new)
        if text != shown:
            yield text[len(shown):], None


def create_app(engine: Engine, limits: Limits | None = None) -> FastAPI:
    limits = limits or Limits()
    app = FastAPI(title="gpt-pipeline inference", version="0.1.0")
    state = {"waiting": 0}
    gate = asyncio.Semaphore(1)

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
        if state["waiting"] >= limits.max_queue + 1:
            raise HTTPException(503, f"server busy: {state['waiting']} requests in flight; retry later")
        state["waiting"] += 1

    @app.get("/health")
    def health() -> dict:
        cfg = engine.model.config
        return {"status": "ok", "model_loaded": True, "device": engine.device, "checkpoint": engine.checkpoint,
                "parameters": engine.model.num_params(), "block_size": cfg.block_size, "vocab_size": cfg.vocab_size,
                "in_flight": state["waiting"]}

    @app.post("/generate")
    async def generate(req: GenerateRequest) -> dict:
        ids = check(req)
        await admitted()
        try:
            async with gate:
                t0 = time.perf_counter()
                out = await asyncio.to_thread(lambda: [p for p in engine.pieces(ids, req)])
                dt = time.perf_counter() - t0
        finally:
            state["waiting"] -= 1
        n = sum(1 for _, t in out if t is not None)
        text = "".join(p for p, _ in out)
        return {"prompt": req.prompt, "completion": text, "new_tokens": n,
                "finish_reason": "length" if n >= req.max_new_tokens else "stop", "seconds": round(dt, 4),
                "tokens_per_second": round(n / dt, 2) if dt > 0 else None}

    @app.post("/generate/stream")
    async def generate_stream(req: GenerateRequest) -> StreamingResponse:
        ids = check(req)
        await admitted()

        async def events():
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue = asyncio.Queue()

            def produce():
                try:
                    for piece, tok in engine.pieces(ids, req):
                        loop.call_soon_threadsafe(queue.put_nowait, ("piece", piece, tok))
                    loop.call_soon_threadsafe(queue.put_nowait, ("done", None, None))
                except Exception as e:  # surfaced to the client as an error event
                    loop.call_soon_threadsafe(queue.put_nowait, ("error", f"{type(e).__name__}: {e}", None))

            try:
                async with gate:
                    task = asyncio.create_task(asyncio.to_thread(produce))
                    n = 0
                    while True:
                        kind, piece, tok = await queue.get()
                        if kind == "piece":
                            n += tok is not None
                            yield f"data: {json.dumps({'text': piece})}\n\n"
                        elif kind == "error":
                            yield f"event: error\ndata: {json.dumps({'error': piece})}\n\n"
                            break
                        else:
                            yield f"data: {json.dumps({'done': True, 'new_tokens': n})}\n\n"
                            break
                    await task
            finally:
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
