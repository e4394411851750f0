"""Decoding speed at batch 1: our KV-cache generation (fp32, bf16 weights, int8) against Hugging Face
transformers' generate(use_cache=True) and against full recomputation without a cache (nanoGPT's
generate algorithm), all on the same shapes in one process; time per token as the sequence grows; and
the perplexity cost of int8.

    python benchmarks/bench_generate.py                  # 6 layers, 6 heads, 384 wide, vocab 50304
    python benchmarks/bench_generate.py --ckpt <run>     # also int8 vs float perplexity of a trained model

Timings on a shared CPU are noisy: configurations are interleaved over several rounds and the best
round is kept; compare ratios, not absolute numbers, across machines.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
import warnings

import torch

from gpt.generate import generate_tokens
from gpt.model import GPT
from gpt.quantize import quantize_int8


def hf_model(args):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=args.vocab, n_positions=args.block_size, n_embd=args.n_embd, n_layer=args.n_layer,
                     n_head=args.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    try:
        return GPT2LMHeadModel(cfg, attn_implementation="sdpa").eval()
    except (TypeError, ValueError):
        return GPT2LMHeadModel(cfg).eval()


def time_generation(fn, n_new: int, rounds: int) -> float:
    """Best new-tokens/s over `rounds` calls of fn() (one untimed warm-up call first)."""
    fn()
    best = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = max(best, n_new / (time.perf_counter() - t0))
    return best


def per_token_ms(model: GPT, positions: list[int], dtype=None, reps: int = 20) -> dict[int, float]:
    """Milliseconds for one cached decode step when the cache already holds `pos` tokens."""
    out = {}
    with torch.no_grad():
        for pos in positions:
            cache = model.new_cache(1, model.config.block_size)
            ctx = torch.randint(0, model.config.vocab_size, (1, pos))
            model(ctx, cache=cache)
            tok = torch.randint(0, model.config.vocab_size, (1, 1))
            times = []
            for _ in range(reps):
                cache.pos = pos
                t0 = time.perf_counter()
                model(tok, cache=cache)
                times.append(time.perf_counter() - t0)
            out[pos] = 1000 * sorted(times)[len(times) // 2]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-layer", type=int, default=6)
    ap.add_argument("--n-head", type=int, default=6)
    ap.add_argument("--n-embd", type=int, default=384)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--block-size", type=int, default=1024)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ckpt", default=None, help="a trained checkpoint for the int8 perplexity comparison")
    ap.add_argument("--quick", action="store_true", help="64 new tokens, 1 round")
    args = ap.parse_args()
    if args.quick:
        args.new_tokens, args.rounds = 64, 1
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    ours = GPT(vocab_size=args.vocab, block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head,
               n_embd=args.n_embd, bias=True).eval()
    hf = hf_model(args)
    from gpt.interop import to_hf_state_dict

    hf.load_state_dict(to_hf_state_dict(ours), strict=False)  # the same weights in both
    bf16 = copy.deepcopy(ours).to(torch.bfloat16)
    int8 = quantize_int8(copy.deepcopy(ours))
    prompt = torch.randint(0, args.vocab, (1, args.prompt_len))
    n = args.new_tokens

    def ours_gen(model, use_cache=True):
        g = torch.Generator().manual_seed(0)
        return lambda: list(generate_tokens(model, prompt, n, temperature=1.0, top_k=args.top_k, generator=g,
                                            use_cache=use_cache))

    def hf_gen():
        with torch.no_grad():
            hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                        do_sample=True, top_k=args.top_k, use_cache=True, pad_token_id=0)

    runs = {"transformers generate (fp32, cache)": hf_gen, "ours fp32 (KV cache)": ours_gen(ours),
            "ours bf16 weights (KV cache)": ours_gen(bf16), "ours int8 (KV cache)": ours_gen(int8),
            "no cache, full recompute (nanoGPT's generate), fp32": ours_gen(ours, use_cache=False)}
    best = {k: 0.0 for k in runs}
    for _ in range(args.rounds):  # interleaved rounds: background load hits every configuration alike
        for name, fn in runs.items():
            best[name] = max(best[name], time_generation(fn, n, 1))
    ref = best["transformers generate (fp32, cache)"]
    print(f"\nbatch 1, {args.n_layer} layers / {args.n_head} heads / {args.n_embd} wide, vocab {args.vocab}, "
          f"{args.prompt_len}-token prompt, {n} new tokens, top_k {args.top_k}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    print("| generation | new tokens/s | vs transformers |\n|---|---:|---:|")
    for name, v in best.items():
        print(f"| {name} | {v:,.1f} | {v / ref:.2f}x |")
    print(f"\nint8 vs our fp32: {best['ours int8 (KV cache)'] / best['ours fp32 (KV cache)']:.2f}x; "
          f"int8 vs our bf16: {best['ours int8 (KV cache)'] / best['ours bf16 weights (KV cache)']:.2f}x")

    positions = [p for p in (64, 512, args.block_size - 1) if p < args.block_size]
    print("\n| cached decode step, ms/token | " + " | ".join(f"pos {p}" for p in positions) + " |")
    print("|---|" + "---:|" * len(positions))
    for name, model in (("fp32", ours), ("bf16 weights", bf16), ("int8", int8)):
        ms = per_token_ms(model, positions)
        print(f"| {name} | " + " | ".join(f"{ms[p]:.2f}" for p in positions) + " |")

    if args.ckpt:
        from gpt.checkpoint import load_checkpoint, model_from_checkpoint
        from gpt.data import get_batch
        from hydra.utils import instantiate
        from gpt.tokenizer import from_identity

        ckpt = load_checkpoint(args.ckpt)
        model = model_from_checkpoint(ckpt)
        q = quantize_int8(copy.deepcopy(model))
        source = instantiate(ckpt["config"]["data"])
        data = source.load(from_identity(ckpt["tokenizer"]))
        g = torch.Generator().manual_seed(0)
        losses = {"float": [], "int8": []}
        with torch.no_grad():
            for _ in range(20):
                x, y = get_batch(data.val, 8, model.config.block_size, g)
                losses["float"].append(model(x, y)[1].item())
                losses["int8"].append(q(x, y)[1].item())
        pf, pq = (math.exp(sum(v) / len(v)) for v in losses.values())
        print(f"\nval perplexity of {ckpt['path']}: float {pf:.4f}, int8 {pq:.4f} ({100 * (pq / pf - 1):+.2f}%)")


if __name__ == "__main__":
    main()
