"""Decoding speed at batch 1, measured on the path infer.py uses: the model loaded by
gpt.inference.load_for_inference from a checkpoint with infer.py's `dtype` option (weights cast once, no
autocast; auto = bf16 weights where the CPU has bf16 instructions, prepacked for oneDNN), KV cache, top-k
sampling, against Hugging Face transformers' generate(use_cache=True) on the same weights and shapes in the
same process; also fp32, int8, the previous default (fp32 weights under bf16 autocast), the previous int8
(torch.ao quantize_dynamic modules), bf16 and int8 with torch's kernels only (gpt.native's off: what its kernels add) and full recomputation without a cache (nanoGPT's generate algorithm). Then the time of one decode step (model +
sampling) when the cache already holds 64, 512 and block_size - 1 tokens, and the perplexity cost of int8.

    python benchmarks/bench_generate.py                  # 6 layers, 6 heads, 384 wide, vocab 50304
    python benchmarks/bench_generate.py --ckpt <run>     # also int8 vs float perplexity of a trained model

Timings on a shared CPU are noisy: configurations are interleaved over several rounds and the best
round is kept; compare ratios, not absolute numbers, across machines.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import tempfile
import time
import warnings
from pathlib import Path

import torch

from gpt import native
from gpt.checkpoint import save_checkpoint
from gpt.generate import generate_tokens, last_logits, sample_next
from gpt.inference import load_for_inference, resolve_dtype
from gpt.model import GPT


def hf_model(args):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=args.vocab, n_positions=args.block_size, n_embd=args.n_embd, n_layer=args.n_layer,
                     n_head=args.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    try:
        return GPT2LMHeadModel(cfg, attn_implementation="sdpa").eval()
    except (TypeError, ValueError):
        return GPT2LMHeadModel(cfg).eval()


def ao_int8(model):
    """The previous int8 path: torch.ao dynamic quantization of every nn.Linear (its module wrappers)."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    return quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8).eval()


@contextlib.contextmanager
def stacked(*contexts):
    with contextlib.ExitStack() as stack:
        for c in contexts:
            stack.enter_context(c)
        yield


def torch_kernels_only(model):
    """The model with gpt.native's kernel switched off in every Linear layer (float32 ones plain nn.Linear again);
    run under native.suspended() (no native attention or top-k either), it decodes as GPT_NATIVE_KERNELS=0 would."""
    from gpt.inference import NativeLinear, NativeOutputHead
    from gpt.model import OutputHead

    for m in model.modules():
        if isinstance(m, NativeLinear):
            m.__class__ = OutputHead if isinstance(m, NativeOutputHead) else torch.nn.Linear
        if getattr(m, "_native", None) is not None:
            m._native = None
    return model


def per_token_ms(model, positions: list[int], top_k: int, autocast=contextlib.nullcontext,
                 reps: int = 15) -> dict[int, float]:
    """Milliseconds for one cached decode step (model on one new token + top-k sampling) when the cache
    already holds `pos` tokens; best of `reps`."""
    out = {}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad(), autocast():
        for pos in positions:
            cache = model.new_cache(1, model.config.block_size)
            last_logits(model, torch.randint(0, model.config.vocab_size, (1, pos)), cache)
            tok = torch.randint(0, model.config.vocab_size, (1, 1))
            times = []
            for _ in range(reps):
                cache.pos = pos
                t0 = time.perf_counter()
                sample_next(last_logits(model, tok, cache), 1.0, top_k, None, g)
                times.append(time.perf_counter() - t0)
            out[pos] = 1000 * min(times)
    return out


def read_bandwidth(mib: int = 1024, reps: int = 5) -> float:
    """Bytes/s this machine streams from memory into the cores: the best of `reps` sums over a float32 tensor far
    larger than any cache, with torch's threads (those decoding uses)."""
    x = torch.ones(mib * 2**20 // 4)
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best


def bytes_per_token(model, positions: float) -> float:
    """What one batch-1 decode step reads from memory: every weight (int8 weights and their scales, bf16 or fp32
    ones; a tied output layer once; an embedding table only one row, so not counted) and the KV cache at the mean
    position `positions`. Memory bandwidth / this bounds tokens/s."""
    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            continue
        for t in (*module._parameters.values(), *module._buffers.values()):
            if isinstance(t, torch.Tensor) and id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    cfg = model.config
    kv = 2 * cfg.n_layer * (cfg.n_kv_head or cfg.n_head) * (cfg.n_embd // cfg.n_head) * positions
    cache_dtype = next((t.dtype for t in model.parameters() if t.is_floating_point()), torch.float32)
    return total + kv * torch.empty(0, dtype=cache_dtype).element_size()


def kernel_paths(models: dict) -> str:
    """Which CPU kernels the configurations run: the ISA torch dispatches to, the CPU's bf16/int8 features, the
    bf16 layers oneDNN prepacked and the int8 layers' kernel."""
    from gpt.inference import PackedLinear
    from gpt.quantize import Int8Linear

    flags = set()
    with contextlib.suppress(OSError):
        flags = set(open("/proc/cpuinfo").read().split())
    features = [f for f in ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx512f", "avx2") if f in flags]
    out = [f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}; CPU features: {', '.join(features)}"]
    for name, (model, _) in models.items():
        packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
        int8 = sorted({getattr(m, "kernel", "?") for m in model.modules() if isinstance(m, Int8Linear)})
        own = [m for m in model.modules() if getattr(m, "_native", None) is not None]
        small = (f"; {len(own)} of them take gpt.native's AVX-512 kernel for calls of at most "
                 f"{max(m._native_rows for m in own)} rows" if own else "")
        if packed:
            out.append(f"{name}: {sum(m._packed is not None for m in packed)} of {len(packed)} linear layers "
                       f"prepacked for oneDNN{small}")
        if int8:
            out.append(f"{name}: int8 kernel {', '.join(int8)}{small}")
        if own and not packed and not int8:
            out.append(f"{name}: {len(own)} float32 linear layers{small}")
    from gpt import native

    if native.kernels() is None:
        out.append(f"gpt.native's kernels not used: {native.reason()}")
    return "\n".join(out)


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
    cfg = dict(vocab_size=args.vocab, block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head,
               n_embd=args.n_embd, bias=True)
    ref = GPT(**cfg).eval()
    hf = hf_model(args)
    from gpt.interop import to_hf_state_dict

    hf.load_state_dict(to_hf_state_dict(ref), strict=False)  # the same weights in both
    tmp = tempfile.TemporaryDirectory()
    path = str(save_checkpoint({"model": ref.state_dict(), "config": {"model": {"_target_": "gpt.model.GPT", **cfg}},
                                "tokenizer": {"type": "tiktoken", "name": "gpt2"}, "step": 0},
                               Path(tmp.name) / "random.pt"))
    auto = str(resolve_dtype("auto", "cpu")).replace("torch.", "")
    models = {  # name -> (model loaded as infer.py loads it, the context it runs in: autocast, native.suspended)
        f"ours dtype=auto ({auto} weights; infer.py default)": (load_for_inference(path, dtype="auto")[0], None),
        "ours dtype=float32": (load_for_inference(path, dtype="float32")[0], None),
        "ours int8 (quantize=int8)": (load_for_inference(path, quantize="int8")[0], None),
        # the previous paths as they were: torch's ops only
        "previous default: fp32 weights, bf16 autocast": (torch_kernels_only(load_for_inference(path, dtype="float32")[0]),
                                                          lambda: stacked(torch.autocast("cpu", dtype=torch.bfloat16),
                                                                          native.suspended())),
        "previous int8: torch.ao quantize_dynamic modules": (ao_int8(torch_kernels_only(load_for_inference(path, dtype="float32")[0])),
                                                              native.suspended),
        # the same two paths with torch's kernels only (oneDNN / fbgemm for every call): what gpt.native adds
        "ours dtype=auto, torch's kernels only": (torch_kernels_only(load_for_inference(path, dtype="auto")[0]),
                                                   native.suspended),
        "ours int8, torch's kernels only": (torch_kernels_only(load_for_inference(path, quantize="int8")[0]),
                                            native.suspended),
        "ours dtype=float32, torch's kernels only": (torch_kernels_only(load_for_inference(path, dtype="float32")[0]),
                                                     native.suspended),
    }
    names = list(models)
    prompt = torch.randint(0, args.vocab, (1, args.prompt_len))
    n = args.new_tokens

    def ours_gen(model, autocast=None, use_cache=True):
        def run():
            g = torch.Generator().manual_seed(0)
            with autocast() if autocast else contextlib.nullcontext():
                list(generate_tokens(model, prompt, n, temperature=1.0, top_k=args.top_k, generator=g,
                                     use_cache=use_cache))
        return run

    def hf_gen():
        with torch.no_grad():
            hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                        do_sample=True, top_k=args.top_k, use_cache=True, pad_token_id=0)

    hf_name = "transformers generate (fp32, cache)"
    runs = {hf_name: hf_gen, **{name: ours_gen(m, ac) for name, (m, ac) in models.items()},
            "no cache, full recompute (nanoGPT's generate), fp32": ours_gen(models[names[7]][0], native.suspended,
                                                                            use_cache=False)}
    for fn in runs.values():  # warm-up
        fn()
    best = {k: 0.0 for k in runs}
    for _ in range(args.rounds):  # interleaved rounds: background load hits every configuration alike
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            best[name] = max(best[name], n / (time.perf_counter() - t0))
    base = best[hf_name]
    bandwidth = read_bandwidth()
    mean_pos = args.prompt_len + n / 2
    read = {hf_name: bytes_per_token(ref, mean_pos),  # the same fp32 weights and cache
            **{name: bytes_per_token(m, mean_pos) for name, (m, _) in models.items() if name != names[4]}}
    # (torch.ao's quantized modules keep their packed weights where module state does not show them: not counted)
    print(f"\nbatch 1, {args.n_layer} layers / {args.n_head} heads / {args.n_embd} wide, vocab {args.vocab}, "
          f"{args.prompt_len}-token prompt, {n} new tokens, top_k {args.top_k}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; best of {args.rounds} interleaved rounds; memory read bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s (sum over 1 GiB)\n")
    print(kernel_paths(models) + "\n")
    print("| generation | new tokens/s | ms/token | vs transformers | MB read per token | bandwidth bound, "
          "tokens/s | of the bound |\n|---|---:|---:|---:|---:|---:|---:|")
    for name, v in best.items():
        cached = name in read
        bound = bandwidth / read[name] if cached else math.nan
        print(f"| {name} | {v:,.1f} | {1000 / v:.2f} | {v / base:.2f}x | "
              + (f"{read[name] / 1e6:.1f} | {bound:,.0f} | {v / bound:.0%} |" if cached else "- | - | - |"))
    i8, a, f = best[names[2]], best[names[0]], best[names[1]]
    print(f"\nint8 vs our fp32: {i8 / f:.2f}x; int8 vs our dtype=auto: {i8 / a:.2f}x; "
          f"dtype=auto vs the previous default: {a / best[names[3]]:.2f}x; "
          f"int8 vs the previous int8: {i8 / best[names[4]]:.2f}x; gpt.native's kernels: dtype=auto "
          f"{a / best[names[5]]:.2f}x, int8 {i8 / best[names[6]]:.2f}x, float32 {f / best[names[7]]:.2f}x of torch's "
          "kernels only")

    positions = [p for p in (64, 512, args.block_size - 1) if p < args.block_size]
    print("\n| decode step (model + top-k sampling), ms | " + " | ".join(f"pos {p}" for p in positions)
          + f" | pos {positions[-1]} / pos {positions[0]} |")
    print("|---|" + "---:|" * (len(positions) + 1))
    ms_all = {name: {} for name in names}
    for _ in range(2):  # two interleaved passes, best of both
        for name, (model, ac) in models.items():
            ms = per_token_ms(model, positions, args.top_k, ac or contextlib.nullcontext)
            ms_all[name] = {p: min(ms[p], ms_all[name].get(p, math.inf)) for p in positions}
    for name in names:
        ms = ms_all[name]
        print(f"| {name} | " + " | ".join(f"{ms[p]:.2f}" for p in positions)
              + f" | {ms[positions[-1]] / ms[positions[0]]:.2f} |")

    if args.ckpt:  # the perplexity cost of int8 and of dtype=auto, on the checkpoint's val split
        from hydra.utils import instantiate

        from gpt.checkpoint import load_checkpoint
        from gpt.data import get_batch
        from gpt.tokenizer import from_identity

        ckpt = load_checkpoint(args.ckpt)
        variants = {"float32": load_for_inference(args.ckpt, dtype="float32")[0],
                    f"dtype=auto ({auto})": load_for_inference(args.ckpt, dtype="auto")[0],
                    "int8": load_for_inference(args.ckpt, quantize="int8")[0]}
        block = variants["float32"].config.block_size
        data = instantiate(ckpt["config"]["data"]).load(from_identity(ckpt["tokenizer"]))
        g = torch.Generator().manual_seed(0)
        losses = {k: [] for k in variants}
        with torch.no_grad():
            for _ in range(20):
                x, y = get_batch(data.val, 8, block, g)
                for k, m in variants.items():
                    losses[k].append(m(x, y)[1].item())
        ppl = {k: math.exp(sum(v) / len(v)) for k, v in losses.items()}
        pf = ppl["float32"]
        print(f"\nval perplexity of {ckpt['path']}: " + ", ".join(
            f"{k} {v:.4f}" + ("" if k == "float32" else f" ({100 * (v / pf - 1):+.2f}%)") for k, v in ppl.items()))

if __name__ == "__main__":
    main()
