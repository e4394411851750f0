"""Serving throughput and latency of serve.py's worker, in one process: continuous batching (the server's
Batcher) against static batching (the previous server: a batch admitted together, new requests waiting until
its longest row ends) and one request at a time (max_batch=1).

`concurrency` clients each send a request, read its streamed tokens and send the next one as soon as it is
done, until `requests` requests are answered. Each request has its own prompt (16..64 tokens), max_tokens
drawn from 16..256 (the same mix for every mode, seeded) and seeded top-k sampling; the model is a random one
of the given shape, which never stops early (no end-of-text), so every request runs to its max_tokens.
Reported per mode: requests/s, new tokens/s, time to first token and latency (p50/p99).

    python benchmarks/bench_serve.py                          # 6 layers, 6 heads, 384 wide, vocab 50304
    python benchmarks/bench_serve.py --device cuda --dtype bfloat16 --modes continuous static     # on a GPU
    python benchmarks/bench_serve.py --n-layer 2 --n-head 2 --n-embd 64 --vocab 512 --block-size 256 \
        --requests 16 --concurrency 4 --max-tokens 8 32 --rounds 1                    # a smoke run

Timings on a shared CPU are noisy: the modes run interleaved over --rounds rounds in the same process and each
mode's fastest round is reported, with the continuous / static ratio of every round (its two runs seconds apart)
and their median; compare the modes, not absolute numbers across machines.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time

import torch

from gpt.model import GPT
from gpt.serve import Batcher, Engine, GenerateRequest, Job
from gpt.trainer import measure_peak_flops


class _Tokens:
    """The tokenizer a Job needs: decode for the streamed text, no end-of-text (rows run to max_tokens)."""

    eot_id = None
    special: list[str] = []

    def decode(self, ids: list[int]) -> str:
        return "x" * len(ids)


class StaticBatcher(Batcher):
    """The previous server's schedule: waiting requests join only when the running batch has ended."""

    def _admit(self) -> None:
        if not self.running:
            super()._admit()


def _where(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu, {torch.get_num_threads()} threads"


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


async def _client(batcher: Batcher, engine: Engine, work: list, out: list) -> None:
    loop = asyncio.get_running_loop()
    while work:
        ids, req = work.pop()
        job = Job(engine, ids, req, loop, stream=True)
        t0 = time.perf_counter()
        first = None
        batcher.submit(job)
        while True:
            kind, a, _ = await job.queue.get()
            if kind == "piece" and first is None:
                first = time.perf_counter() - t0
            elif kind == "done":
                out.append((first, time.perf_counter() - t0, a))
                break
            elif kind == "error":
                raise RuntimeError(a)


def run_mode(engine: Engine, batcher: Batcher, work: list, concurrency: int) -> dict:
    out: list = []
    work = list(reversed(work))

    async def main():
        await asyncio.gather(*(_client(batcher, engine, work, out) for _ in range(concurrency)))

    t0 = time.perf_counter()
    asyncio.run(main())
    wall = time.perf_counter() - t0
    ttft, lat = [o[0] for o in out], [o[1] for o in out]
    return {"req/s": len(out) / wall, "tokens/s": sum(o[2] for o in out) / wall,
            "ttft p50": percentile(ttft, 0.5), "ttft p99": percentile(ttft, 0.99),
            "latency p50": percentile(lat, 0.5), "latency p99": percentile(lat, 0.99), "wall": wall,
            "steps": batcher.decoder.steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-layer", type=int, default=6)
    ap.add_argument("--n-head", type=int, default=6)
    ap.add_argument("--n-embd", type=int, default=384)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--block-size", type=int, default=1024)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cpu", help="cpu or cuda (a GPU: where a batch's rows cost almost nothing "
                    "each, the case continuous batching's gain is bounded by)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, nargs=2, default=[16, 256], metavar=("LO", "HI"))
    ap.add_argument("--modes", nargs="+", default=["continuous", "static", "one-at-a-time"],
                    choices=["continuous", "static", "one-at-a-time"])
    ap.add_argument("--rounds", type=int, default=3, help="the modes run interleaved this many times; each "
                    "mode's fastest round is reported (a shared CPU's load drifts between runs)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    model = GPT(vocab_size=args.vocab, block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head,
                n_embd=args.n_embd, bias=True).eval().requires_grad_(False).to(args.device)
    from gpt.inference import native_attention, native_linears, pack_linears

    if args.dtype == "bfloat16":
        model = model.to(torch.bfloat16)
        if torch.device(args.device).type == "cpu":  # oneDNN's prepacked weights, as infer.py loads them
            pack_linears(model)
    elif torch.device(args.device).type == "cpu":  # gpt.native's few-row float32 matmuls, as serve.py loads them
        native_linears(model)
    if torch.device(args.device).type == "cpu":  # gpt.native's decode attention and top-k, as serve.py loads them
        native_attention(model)
    engine = Engine(model, _Tokens(), args.device)
    rng = random.Random(args.seed)
    work = []
    for i in range(args.requests):
        ids = [rng.randrange(args.vocab) for _ in range(rng.randint(16, 64))]
        req = GenerateRequest(prompt="", max_new_tokens=rng.randint(*args.max_tokens), temperature=0.8, top_k=50,
                              seed=i)
        work.append((ids, req))
    batchers = {"continuous": lambda: Batcher(engine, args.concurrency, wait_ms=5),
                "static": lambda: StaticBatcher(engine, args.concurrency, wait_ms=5),
                "one-at-a-time": lambda: Batcher(engine, 1, wait_ms=0)}
    print(f"{args.n_layer} layers / {args.n_head} heads / {args.n_embd} wide, vocab {args.vocab}, {args.dtype}; "
          f"{args.requests} requests, concurrency {args.concurrency}, max_tokens {args.max_tokens[0]}.."
          f"{args.max_tokens[1]} ({sum(r.max_new_tokens for _, r in work)} new tokens in all), torch "
          f"{torch.__version__}, {_where(args.device)}\n")
    print("| mode | requests/s | new tokens/s | TTFT p50 (s) | TTFT p99 (s) | latency p50 (s) | latency p99 (s) "
          "| decode steps |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    results, paired = {}, []
    for _ in range(args.rounds):
        this = {}
        for mode in args.modes:
            this[mode] = r = run_mode(engine, batchers[mode](), work, args.concurrency)
            if mode not in results or r["tokens/s"] > results[mode]["tokens/s"]:
                results[mode] = r
        if "continuous" in this and "static" in this:  # the two modes of one round ran seconds apart
            paired.append(this["continuous"]["tokens/s"] / this["static"]["tokens/s"])
    for mode, r in results.items():
        print(f"| {mode} | {r['req/s']:.2f} | {r['tokens/s']:.1f} | {r['ttft p50']:.3f} | {r['ttft p99']:.3f} | "
              f"{r['latency p50']:.3f} | {r['latency p99']:.3f} | {r['steps']} |")
    if "continuous" in results and "static" in results:
        c, s = results["continuous"], results["static"]
        print(f"\ncontinuous vs static: {c['tokens/s'] / s['tokens/s']:.2f}x tokens/s (best rounds), TTFT p99 "
              f"{c['ttft p99']:.3f} s vs {s['ttft p99']:.3f} s")
        if len(paired) > 1:
            print(f"round by round: {', '.join(f'{x:.2f}x' for x in paired)}; median "
                  f"{statistics.median(paired):.2f}x")
        explain(c, s)
        floor(model, sum(r.max_new_tokens for _, r in work))


def floor(model, tokens: int) -> None:
    """The least the tokens can cost: each new token is a row of every matmul of a decode step (the blocks' and the
    output layer's weights, 2 flops per weight), at the machine's best matmul speed. Where that exceeds the budget
    of explain(), no kernel reaches 1.5x on this machine at this batch size."""
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))  # the output layer's too
    flops = 2 * weights * tokens
    dtype = model.transformer.wte.weight.dtype
    peak = measure_peak_flops(str(model.transformer.wte.weight.device), dtype, size=1536)
    print(f"the tokens' matmuls alone ({flops / 1e12:.2f} TFLOP) take at least {flops / peak:.1f} s at this machine's "
          f"best {str(dtype).replace('torch.', '')} matmul speed ({peak / 1e9:.0f} GFLOP/s, a 1536-square matmul; the "
          f"prompts' prefills not counted)")


def explain(c: dict, s: dict) -> None:
    """Split both modes' wall time into a cost per decode step (whatever its rows: reading the weights, the
    step's Python) and a cost of the tokens (the same tokens in both modes: each row's share of the matmuls,
    attention over its positions, sampling, the prompts' prefills): wall = steps * per_step + tokens. Static
    batching takes more steps for the same tokens, so continuous batching's gain is at most the ratio of the
    steps, reached only when the tokens cost nothing."""
    dsteps = s["steps"] - c["steps"]
    if dsteps <= 0:
        return
    per_step = (s["wall"] - c["wall"]) / dsteps
    tokens = c["wall"] - c["steps"] * per_step
    budget = 2 * (s["steps"] - 1.5 * c["steps"]) * per_step  # S / C >= 1.5 <=> tokens <= budget
    print(f"wall = steps x {1000 * per_step:.1f} ms + {tokens:.1f} s of tokens (static {s['wall']:.1f} s over "
          f"{s['steps']} steps, continuous {c['wall']:.1f} s over {c['steps']}); the steps' ratio bounds the gain at "
          f"{s['steps'] / c['steps']:.2f}x; 1.5x needs the tokens to cost at most {max(budget, 0):.1f} s")


if __name__ == "__main__":
    main()
