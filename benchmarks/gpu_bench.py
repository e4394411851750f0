#!/usr/bin/env python
"""Training throughput and MFU of gpt2_small, and decode speed at batch 1 and 32, on one device.

    python benchmarks/gpu_bench.py                       # CUDA: gpt2_small (124M, vocab 50257 padded to 50304,
                                                         # block 1024), the preset's optimizer, bf16, compile
    python benchmarks/gpu_bench.py --device cpu --tiny   # the same code on a tiny model (a smoke run anywhere)

Training is what train.py runs: the config composed from gpt/conf/train.yaml with model=gpt2_small tokenizer=gpt2
hardware=gpu (hardware=cpu on a CPU), the model, the preset's default optimizer (train.yaml's, MuonAdamW with fused
AdamW on CUDA) and schedule built from it as gpt.run does, and gpt.trainer.Trainer.train_step timed (autocast,
torch.compile per hardware.compile, gradient clipping, the step's one host-device synchronisation, the optimizer
and schedule step). Batches are random token ids already on the device (the input pipeline is not what is
measured); warm-up steps (compilation) are excluded. MFU = model.flops_per_token(T) * tokens/s / the chip's
bf16 dense peak from its spec sheet (gpt.trainer.SPEC_BF16_TFLOPS, by device name) where the name is known,
else the bf16 matmul peak measured here (gpt.trainer.peak_flops_for, train.py's rule); the output says which.
Decoding: gpt.engine through gpt.generate.generate_tokens (KV cache, top-k 50), bf16 weights, new tokens/s at
batch 1 and 32.
One JSON line per result, and a summary.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

CONF = Path(__file__).resolve().parents[1] / "gpt" / "conf"

def peak_flops(device: str) -> tuple[float, str]:
    """(peak FLOP/s, where it came from): the spec sheet's bf16 dense peak of this device, else the bf16 matmul
    peak measured now (1 s): train.py's rule for a bf16 run (gpt.trainer.peak_flops_for)."""
    from gpt.trainer import peak_flops_for

    return peak_flops_for(device, torch.bfloat16, seconds=1.0)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def compose(args):
    """train.py's config for the benchmark: gpt2_small (or a tiny shape) with the GPT-2 vocabulary, the hardware
    preset of the device, train.yaml's default optimizer and schedule."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from omegaconf import open_dict

    hardware = "gpu" if args.device.startswith("cuda") else "cpu"
    overrides = ["model=gpt2_small", "tokenizer=gpt2", f"hardware={hardware}",
                 f"hardware.compile={str(args.compile).lower()}", f"trainer.batch_size={args.batch_size}"]
    if args.tiny:
        overrides += ["model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=64"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.tokenizer.vocab_size = args.vocab  # what the run builder fills in from the tokenizer
        if args.device.startswith("cuda"):
            cfg.hardware.device = args.device
    return cfg


class RandomTokens:
    """A pretraining objective over random ids already on the device: the trainer's step without the input
    pipeline (gpt.stages.pretrain computes the same loss, model(x, y))."""

    def __init__(self, vocab: int, batch_size: int, block_size: int, device: str):
        g = torch.Generator().manual_seed(0)
        self.batches = [torch.randint(0, vocab, (batch_size, block_size + 1), generator=g).to(device) for _ in range(4)]
        self.i = 0

    def train_batch(self):
        self.i += 1
        b = self.batches[self.i % len(self.batches)]
        return b[:, :-1], b[:, 1:]

    @staticmethod
    def loss(model, batch):
        _, loss = model(*batch)
        return loss, {}

    @staticmethod
    def batch_tokens(batch) -> int:
        return batch[0].numel()

    state_dict = staticmethod(lambda: {})
    load_state_dict = staticmethod(lambda state: None)


def train_speed(args) -> dict:
    from hydra.utils import instantiate

    from gpt.optim import build_optimizer
    from gpt.run import configure_hardware
    from gpt.trainer import Loop, Precision, Trainer

    cfg = compose(args)
    configure_hardware(cfg.hardware)  # TF32, threads: as train.py sets them
    torch.manual_seed(0)
    model = instantiate(cfg.model).to(args.device)
    optimizer = build_optimizer(instantiate(cfg.optimizer), model, cfg.optimizer.get("weight_decay", 0.0))
    scheduler = instantiate(cfg.scheduler)(optimizer)
    T = model.config.block_size
    never = 10**9  # no evaluation, no per-layer statistics: the plain training step
    loop = Loop(max_iters=never, eval_interval=never, eval_iters=1, log_interval=never, batch_size=args.batch_size,
                grad_clip=cfg.trainer.grad_clip, layer_stats=False)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(model, RandomTokens(model.config.vocab_size, args.batch_size, T, args.device), optimizer,
                          scheduler, loop, precision=Precision(args.device, cfg.hardware.autocast_dtype),
                          run_dir=run_dir, compile=bool(cfg.hardware.compile), progress=False)
        for _ in range(args.warmup):
            trainer.train_step()
        sync(args.device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            loss, *_ = trainer.train_step()
        sync(args.device)
        seconds = time.perf_counter() - t0
    tokens_per_sec = args.steps * args.batch_size * T / seconds
    peak, source = peak_flops(args.device)
    fused = getattr(optimizer, "adamw", optimizer).defaults.get("fused")  # MuonAdamW's AdamW part, or AdamW
    return {"what": "train", "device": args.device, "params": model.num_params(), "vocab": model.config.vocab_size,
            "vocab_rows": model.config.padded_vocab_size, "batch": args.batch_size, "block": T,
            "compile": bool(cfg.hardware.compile), "optimizer": type(optimizer).__name__, "fused_adamw": bool(fused),
            "precision": str(trainer.precision), "tokens_per_sec": tokens_per_sec,
            "step_ms": 1e3 * seconds / args.steps,
            "peak_tflops": peak / 1e12, "peak_source": source,
            "mfu": model.flops_per_token(T) * tokens_per_sec / peak, "loss": float(loss)}


def loss_speed(args) -> dict:
    """The output layer + cross-entropy alone, forward and backward, at the benchmark's shape (batch x block rows,
    the padded vocabulary) under the preset's autocast: the fused chunked loss the model uses by default
    (model.loss_chunk_size) against plain logits + F.cross_entropy left to torch.compile to fuse (what
    model.loss_chunk_size=0 gives under hardware.compile). On a GPU this says which to keep; without --compile the
    second runs eagerly."""
    import torch.nn.functional as F

    from gpt.model import _FusedLinearCrossEntropy

    cfg = compose(args)
    C, chunk = int(cfg.model.n_embd), int(cfg.model.loss_chunk_size)
    rows = -(-args.vocab // int(cfg.model.vocab_multiple)) * int(cfg.model.vocab_multiple)
    n, V = args.batch_size * int(cfg.model.block_size), args.vocab
    g = torch.Generator(device=args.device).manual_seed(0)
    h = torch.randn(n, C, device=args.device, generator=g, requires_grad=True)
    w = (0.02 * torch.randn(rows, C, device=args.device, generator=g)).requires_grad_()
    y = torch.randint(0, V, (n,), device=args.device, generator=g)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32

    def plain(h, w, y):
        return F.cross_entropy(F.linear(h, w)[:, :V].float(), y, ignore_index=-1)

    ways = {"fused": lambda: _FusedLinearCrossEntropy.apply(h, w, y, chunk, -1, True, V),
            "compiled": (lambda f: lambda: f(h, w, y))(torch.compile(plain) if args.compile else plain)}
    out = {"what": "loss", "device": args.device, "rows": n, "vocab_rows": rows, "compile": bool(args.compile)}
    for name, fn in ways.items():
        with torch.autocast(args.device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
            for _ in range(args.warmup + 1):  # the first call of the compiled one compiles it
                fn().backward()
            sync(args.device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                loss = fn()
                loss.backward()
            sync(args.device)
        out[f"{name}_ms"] = 1e3 * (time.perf_counter() - t0) / args.steps
        out[f"{name}_loss"] = float(loss.detach())
    out["faster"] = min(("fused", "compiled"), key=lambda k: out[f"{k}_ms"])
    return out


def decode_speed(args, batch: int) -> dict:
    from hydra.utils import instantiate

    from gpt.generate import generate_tokens

    torch.manual_seed(0)
    model = instantiate(compose(args).model).to(args.device, dtype=torch.bfloat16).eval()
    idx = torch.randint(0, model.config.vocab_size, (batch, 16), device=args.device)
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
                   help="torch.compile the training step (default: on CUDA, as hardware=gpu does)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=256)
    args = p.parse_args()
    if args.compile is None:
        args.compile = args.device.startswith("cuda")
    args.vocab = 50257  # GPT-2's tokenizer; the preset pads the model's rows to 50304 (model.vocab_multiple)
    if args.tiny:
        args.vocab = 500
        args.batch_size, args.steps, args.warmup, args.new_tokens = min(args.batch_size, 4), min(args.steps, 3), 1, 16
    results = [train_speed(args), loss_speed(args), decode_speed(args, 1),
               decode_speed(args, 32 if not args.tiny else 4)]
    for r in results:
        print(json.dumps(r))
    t = results[0]
    print(f"\ntraining: {t['tokens_per_sec']:,.0f} tokens/s ({t['step_ms']:.1f} ms/step), MFU {100 * t['mfu']:.1f}% "
          f"of {t['peak_tflops']:.0f} TFLOP/s ({t['peak_source']}), {t['params'] / 1e6:.0f}M parameters, "
          f"vocab {t['vocab']} in {t['vocab_rows']} rows, batch {t['batch']} x {t['block']}, {t['precision']}, "
          f"compile {t['compile']}, {t['optimizer']} (fused AdamW {t['fused_adamw']})")
    c = results[1]
    print(f"output layer + loss ({c['rows']} rows x {c['vocab_rows']}), forward and backward: fused chunked "
          f"{c['fused_ms']:.2f} ms, logits + F.cross_entropy {'compiled' if c['compile'] else 'eager'} "
          f"{c['compiled_ms']:.2f} ms: the {c['faster']} one is faster")
    for r in results[2:]:
        print(f"decode batch {r['batch']}: {r['tokens_per_sec']:,.0f} new tokens/s")


if __name__ == "__main__":
    main()
