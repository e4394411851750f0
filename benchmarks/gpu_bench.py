#!/usr/bin/env python
"""Training throughput and MFU of gpt2_small, and decode speed at batch 1 and 32, on one device.

    python benchmarks/gpu_bench.py                       # CUDA: gpt2_small (124M, vocab 50304, block 1024), bf16, compile
    python benchmarks/gpu_bench.py --device cpu --tiny   # the same code on a tiny model (a smoke run anywhere)

Training: the model of gpt/conf/model/gpt2_small.yaml, AdamW (fused on CUDA), bf16 autocast, torch.compile on
CUDA, random token batches (the input pipeline is not what is measured), warm-up steps excluded; tokens/s over
the timed steps and MFU = model.flops_per_token(T) * tokens/s / the bf16 matmul peak measured on this device in
the same process (gpt.trainer.measure_peak_flops). Decoding: gpt.engine through gpt.generate.generate_tokens
(KV cache, top-k 50), bf16 weights, new tokens/s at batch 1 and 32. One JSON line per result, and a summary.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_speed(args) -> dict:
    from gpt.model import GPT
    from gpt.trainer import measure_peak_flops

    torch.manual_seed(0)
    model = GPT(vocab_size=args.vocab, block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head,
                n_embd=args.n_embd).to(args.device)
    fused = args.device.startswith("cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=fused)
    step_model = torch.compile(model) if args.compile else model
    x = torch.randint(0, args.vocab, (args.batch_size, args.block_size), device=args.device)
    device_type = torch.device(args.device).type

    def step():
        with torch.autocast(device_type, dtype=torch.bfloat16):
            _, loss = step_model(x, x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        step()
    sync(args.device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync(args.device)
    seconds = time.perf_counter() - t0
    tokens_per_sec = args.steps * args.batch_size * args.block_size / seconds
    peak = measure_peak_flops(args.device, torch.bfloat16, seconds=1.0)
    mfu = model.flops_per_token(args.block_size) * tokens_per_sec / peak
    return {"what": "train", "device": args.device, "params": model.num_params(), "batch": args.batch_size,
            "block": args.block_size, "compile": args.compile, "tokens_per_sec": tokens_per_sec,
            "bf16_peak_tflops": peak / 1e12, "mfu": mfu, "loss": float(loss)}


def decode_speed(args, batch: int) -> dict:
    from gpt.generate import generate_tokens
    from gpt.model import GPT

    torch.manual_seed(0)
    model = GPT(vocab_size=args.vocab, block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head,
                n_embd=args.n_embd).to(args.device, dtype=torch.bfloat16).eval()
    idx = torch.randint(0, args.vocab, (batch, 16), device=args.device)
    g = torch.Generator(device=args.device).manual_seed(0)
    list(generate_tokens(model, idx, 8, top_k=50, generator=g))  # warm-up
    sync(args.device)
    t0 = time.perf_counter()
    steps = list(generate_tokens(model, idx, args.new_tokens, top_k=50, generator=g))
    sync(args.device)
    seconds = time.perf_counter() - t0
    return {"what": "decode", "device": args.device, "batch": batch, "new_tokens": len(steps),
            "tokens_per_sec": batch * len(steps) / seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="a 2-layer, 64-wide model with block 64 (a smoke run)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the training step (default: on CUDA)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=256)
    args = p.parse_args()
    if args.compile is None:
        args.compile = args.device.startswith("cuda")
    if args.tiny:
        args.n_layer, args.n_head, args.n_embd, args.block_size, args.vocab = 2, 2, 64, 64, 512
        args.batch_size, args.steps, args.warmup, args.new_tokens = min(args.batch_size, 4), min(args.steps, 3), 1, 16
    else:  # gpt2_small with the vocabulary padded to a multiple of 64
        args.n_layer, args.n_head, args.n_embd, args.block_size, args.vocab = 12, 12, 768, 1024, 50304
    results = [train_speed(args), decode_speed(args, 1), decode_speed(args, 32 if not args.tiny else 4)]
    for r in results:
        print(json.dumps(r))
    t = results[0]
    print(f"\ntraining: {t['tokens_per_sec']:,.0f} tokens/s, MFU {100 * t['mfu']:.1f}% of the measured bf16 peak "
          f"({t['bf16_peak_tflops']:.0f} TFLOP/s), {t['params'] / 1e6:.0f}M parameters, batch {t['batch']} x "
          f"{t['block']}, compile {t['compile']}")
    for r in results[1:]:
        print(f"decode batch {r['batch']}: {r['tokens_per_sec']:,.0f} new tokens/s")


if __name__ == "__main__":
    main()
