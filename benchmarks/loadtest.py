"""Bounded load test of the HTTP service: concurrent clients, requests/s and latency percentiles.

    python serve.py ckpt=<run> port=8000 &
    python benchmarks/loadtest.py --url http://127.0.0.1:8000 --concurrency 4 --requests 40 --max-new-tokens 32

Or let it start and stop a server itself: `python benchmarks/loadtest.py --ckpt <run>`; extra serve.py
overrides go through --server-arg, e.g. `--server-arg limits.max_batch=1` (one generation at a time).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


async def run(url: str, concurrency: int, total: int, body: dict, timeout: float) -> dict:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    tokens = 0
    counter = iter(range(total))

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal tokens
        for i in counter:
            t0 = time.perf_counter()
            r = await client.post(f"{url}/generate", json={**body, "seed": i})
            latencies.append(time.perf_counter() - t0)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            if r.status_code == 200:
                tokens += r.json()["new_tokens"]

    key = os.environ.get("GPT_API_KEY")  # the server's api_key, when it requires one
    headers = {"authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(timeout=timeout, headers=headers) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"requests": len(latencies), "wall_s": wall, "req_per_s": len(latencies) / wall,
            "new_tokens_per_s": tokens / wall, "statuses": statuses,
            "p50_ms": 1000 * percentile(latencies, 0.5), "p90_ms": 1000 * percentile(latencies, 0.9),
            "p99_ms": 1000 * percentile(latencies, 0.99), "mean_ms": 1000 * statistics.mean(latencies)}


def wait_healthy(url: str, seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"no healthy server at {url} after {seconds}s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default=None, help="a running server; without it --ckpt starts one")
    ap.add_argument("--ckpt", default=None, help="checkpoint or run folder to serve for the test")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--prompt", default="ROMEO:")
    ap.add_argument("--timeout", type=float, default=120)
    ap.add_argument("--server-arg", action="append", default=[], help="serve.py override for the server it "
                    "starts, e.g. limits.max_batch=1 (repeatable)")
    args = ap.parse_args()
    server = None
    url = args.url
    if url is None:
        if not args.ckpt:
            raise SystemExit("give --url of a running server or --ckpt to start one")
        url = f"http://127.0.0.1:{args.port}"
        root = Path(__file__).resolve().parents[1]
        server = subprocess.Popen([sys.executable, str(root / "serve.py"), f"ckpt={args.ckpt}", f"port={args.port}",
                                   *args.server_arg],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    try:
        wait_healthy(url)
        body = {"prompt": args.prompt, "max_new_tokens": args.max_new_tokens, "temperature": 0.8, "top_k": 50}
        res = asyncio.run(run(url, args.concurrency, args.requests, body, args.timeout))
        batching = httpx.get(f"{url}/health", timeout=5).json().get("batching")
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    print(f"{res['requests']} requests, concurrency {args.concurrency}, {args.max_new_tokens} new tokens each: "
          f"{res['req_per_s']:.2f} req/s, {res['new_tokens_per_s']:.0f} new tokens/s, latency p50 "
          f"{res['p50_ms']:.0f} ms, p90 {res['p90_ms']:.0f} ms, p99 {res['p99_ms']:.0f} ms, statuses {res['statuses']}")
    if batching:
        print(f"server batches: {batching['batches']}, sizes {batching['batch_sizes']}")


if __name__ == "__main__":
    main()
