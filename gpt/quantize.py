"""INT8 inference: dynamic quantization of every Linear layer (int8 weights per output channel,
activations quantized on the fly), and a compact checkpoint format for quantized models.

    python -m gpt.quantize <checkpoint or run folder> <out.pt>    # writes an int8 checkpoint
    python infer.py ckpt=<run> quantize=int8                      # quantize at load time

On CPU, torch.ao's dynamic int8 Linear reads a quarter of fp32's bytes, which is what batch-1 decoding
is bound by. The embedding tables (and so the tied input embedding) stay float.
A quantized checkpoint stores each Linear's int8 weight, scales and zero points as plain tensors (no
packed objects), so it loads with `weights_only=True` like every other checkpoint.
"""

from __future__ import annotations

import argparse
import sys
import warnings

import torch
import torch.nn as nn

from gpt.checkpoint import build_model, load_checkpoint, model_from_checkpoint, save_checkpoint
from gpt.errors import UserError

FORMAT = "int8-dynamic-per-channel"


def quantize_int8(model: nn.Module) -> nn.Module:
    """A copy of `model` with every nn.Linear replaced by a dynamically quantized int8 Linear (CPU)."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():  # torch.ao.quantization announces its future move to torchao
        warnings.simplefilter("ignore")
        q = quantize_dynamic(model.cpu().eval(), {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)
    return q.eval()


def _quantized_linears(model: nn.Module) -> dict[str, nn.Module]:
    from torch.ao.nn.quantized.dynamic import Linear as QLinear

    return {name: m for name, m in model.named_modules() if isinstance(m, QLinear)}


def quantized_checkpoint(qmodel: nn.Module, ckpt: dict) -> dict:
    """The parent checkpoint's metadata with int8 weights in place of the float Linear weights."""
    qlinears = _quantized_linears(qmodel)
    floats = {k: v for k, v in qmodel.state_dict().items()
              if isinstance(v, torch.Tensor) and not any(k.startswith(n + ".") for n in qlinears)}
    packed = {}
    for name, mod in qlinears.items():
        w, b = mod.weight(), mod.bias()
        packed[name] = {"int8": w.int_repr(), "scales": w.q_per_channel_scales().float(),
                        "zero_points": w.q_per_channel_zero_points(), "axis": int(w.q_per_channel_axis()),
                        "bias": None if b is None else b.detach()}
    keep = {k: v for k, v in ckpt.items() if k not in ("model", "optimizer", "scheduler", "scaler", "rng", "path")}
    return {**keep, "model": floats, "quantized": {"format": FORMAT, "linears": packed}}


def model_from_quantized(ckpt: dict) -> nn.Module:
    """Rebuild an int8 model from a checkpoint written by `quantized_checkpoint`."""
    q = ckpt.get("quantized") or {}
    if q.get("format") != FORMAT:
        raise UserError(f"checkpoint {ckpt.get('path')!r} has quantization format {q.get('format')!r}; "
                        f"expected {FORMAT!r}")
    model = build_model(ckpt)  # a float shell; its Linear weights are replaced below
    linear = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    res = model.load_state_dict(ckpt["model"], strict=False)  # embeddings, norms (lm_head follows the tied wte)
    stray = [k for k in res.missing_keys if k.rsplit(".", 1)[0] not in linear] + list(res.unexpected_keys)
    if stray:
        raise UserError(f"checkpoint {ckpt.get('path')!r}: float weights do not fit its config ({stray[:3]})")
    qmodel = quantize_int8(model)
    qlinears = _quantized_linears(qmodel)
    if set(qlinears) != set(q["linears"]):
        raise UserError(f"checkpoint {ckpt.get('path')!r}: quantized layers do not match its model config")
    for name, p in q["linears"].items():
        w = torch._make_per_channel_quantized_tensor(p["int8"], p["scales"].double(), p["zero_points"], p["axis"])
        qlinears[name].set_weight_bias(w, p["bias"])
    return qmodel.eval()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gpt.quantize", description="write an int8 copy of a checkpoint")
    ap.add_argument("ckpt", help="checkpoint file or run folder (best.pt preferred)")
    ap.add_argument("out", help="output .pt path")
    args = ap.parse_args(argv)
    try:
        ckpt = load_checkpoint(args.ckpt, prefer="best")
        if ckpt.get("quantized"):
            raise UserError(f"{ckpt['path']!r} is already quantized")
        path = save_checkpoint(quantized_checkpoint(quantize_int8(model_from_checkpoint(ckpt)), ckpt), args.out)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
