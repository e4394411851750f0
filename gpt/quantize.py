"""INT8 inference: every Linear layer gets int8 weights (symmetric, one float32 scale per output
channel), and a compact checkpoint format for quantized models.

    python -m gpt.quantize <checkpoint or run folder> <out.pt>    # writes an int8 checkpoint
    python infer.py ckpt=<run> quantize=int8                      # quantize at load time

Batch-1 decoding on a CPU reads every weight once per token and makes 25 Linear calls, so the int8 Linear
(Int8Linear) is a thin module around one kernel call: fbgemm's dynamic int8 matmul (the op behind
torch.ao's dynamic quantization, activations quantized on the fly) called directly, ~4 us less per call
than torch.ao's module. Where that kernel is missing or disagrees with the dequantized reference, a layer
falls back to `aten._weight_int8pack_mm` (bf16 activations) and last to a dequantized float matmul. Calls of a
few rows (a batch-1 decode step's block matmuls) take gpt.native's compiled kernel instead, where it runs:
weight-only int8 (float32 activations), streaming the weights ~1.4x faster than fbgemm inside a decode step.
(Measured on a 2-core AVX512-BF16 CPU: int8pack is no faster once its activations are cast to and from
bf16, and 2x slower for the (V, C) output layer.) Embeddings, layer norms, attention, the KV cache and
the logits stay float32; the output layer is a separate int8 copy of the tied embedding, which stays
float for the input lookup.

A quantized checkpoint stores each Linear's int8 weight, float32 scales and float bias as plain tensors
(no packed objects), so it loads with `weights_only=True` like every other checkpoint; the kernels'
packed weights are rebuilt from them at load time.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt import native
from gpt.checkpoint import build_model, load_checkpoint, model_from_checkpoint, save_checkpoint
from gpt.errors import cli_result, UserError
from gpt.model import OutputHead

log = logging.getLogger(__name__)

FORMAT = "int8-per-channel-symmetric"
OLD_FORMATS = ("int8-dynamic-per-channel",)  # torch.ao dynamic quantization, zero points stored explicitly


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float weight (out, in) -> (int8 weight in [-127, 127], float32 scales (out,)): w ~ int8 * scales[:, None]."""
    w = w.detach().float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


class Int8Linear(nn.Module):
    """y = x @ (int8 weight * scales[:, None])^T + bias, with float32 input and output.

    Buffers `weight` (int8, (out, in)), `scales` (float32, (out,)) and `bias` (float or None) are its
    whole state; the kernel's own copies are derived from them in `setup`. kernel: "int8pack"
    (aten._weight_int8pack_mm, bf16 activations), "fbgemm" (torch.ao's dynamic int8 Linear op) or
    "dequant" (float matmul with the dequantized weight, every call; the portable fallback). With "native" in
    `prefer`, calls of at most `native.max_rows` rows (a batch-1 decode step) take gpt.native's kernel where it
    runs here (weight-only int8: float32 activations, exact int8 x float32 products summed in float32), the
    others the kernel chosen from the rest.
    """

    KERNELS = ("native", "fbgemm", "int8pack", "dequant")

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                 prefer: tuple[str, ...] = KERNELS):
        super().__init__()
        if weight.dtype != torch.int8 or weight.dim() != 2 or scales.shape != weight.shape[:1]:
            raise ValueError(f"Int8Linear needs an int8 (out, in) weight and (out,) scales, got "
                             f"{weight.dtype} {tuple(weight.shape)} and {tuple(scales.shape)}")
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("scales", scales.float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())
        self.prefer = tuple(prefer)
        self.setup()

    @classmethod
    def from_linear(cls, linear: nn.Linear, prefer: tuple[str, ...] = KERNELS) -> Int8Linear:
        q, scales = quantize_weight(linear.weight)
        return cls(q, scales, linear.bias, prefer)

    def extra_repr(self) -> str:
        rows = f"{self._native_rows} row{'s' if self._native_rows != 1 else ''}"
        small = f"native (up to {rows}), then " if self._native is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, kernel={small}{self.kernel}")

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.scales[:, None]

    # -- kernels -------------------------------------------------------------------------------------
    def _prepare(self, kernel: str) -> None:
        if kernel == "int8pack":
            if self.weight.device.type != "cpu" or self.in_features % 16:  # the CPU kernel needs K % 16 == 0
                raise RuntimeError(f"int8pack needs a CPU weight with in_features % 16 == 0")
            self._scales_bf16 = self.scales.to(torch.bfloat16)
            self._mm = torch.ops.aten._weight_int8pack_mm
        elif kernel == "fbgemm":
            with warnings.catch_warnings():  # quantized tensor types are announced as deprecated
                warnings.simplefilter("ignore")
                qw = torch._make_per_channel_quantized_tensor(
                    self.weight, self.scales.double(), torch.zeros(self.out_features, dtype=torch.long), 0)
            self._packed = torch.ops.quantized.linear_prepack(qw, self.bias)
            self._mm = torch.ops.quantized.linear_dynamic
        elif kernel != "dequant":
            raise ValueError(f"unknown Int8Linear kernel {kernel!r}")

    def _run(self, kernel: str, x2: torch.Tensor) -> torch.Tensor:
        """x2 (N, in) float -> (N, out) float32."""
        if kernel == "int8pack":
            y = self._mm(x2.to(torch.bfloat16).contiguous(), self.weight, self._scales_bf16)
            return y.float() if self.bias is None else torch.add(y, self.bias)  # bf16 + float32 -> float32
        if kernel == "fbgemm":
            return self._mm(x2.float().contiguous(), self._packed, True)  # reduce_range: fbgemm's 7-bit activations
        return F.linear(x2.float(), self.dequantized(), self.bias)

    def setup(self) -> str:
        """Pick the first kernel of `prefer` that runs here and agrees with the dequantized float matmul."""
        self.kernel, self._packed, self._mm = "dequant", None, None
        self.scales = self.scales.float()  # kept float32 through .to(dtype) / .half()
        if self.bias is not None:
            self.bias = self.bias.float()
        x = torch.randn(3, self.in_features, device=self.weight.device)
        want = F.linear(x, self.dequantized(), self.bias)
        tol = 0.05 * want.abs().max().item() + 1e-4
        for kernel in (*[k for k in self.prefer if k not in ("dequant", "native")], "dequant"):
            try:
                self._prepare(kernel)
                got = self._run(kernel, x)
            except (RuntimeError, AttributeError, NotImplementedError) as e:
                log.info("no %s kernel for a %dx%d int8 Linear: %s", kernel, self.out_features, self.in_features, e)
                continue
            if got.shape == want.shape and got.dtype == torch.float32 and (got - want).abs().max().item() <= tol:
                self.kernel = kernel
                break
        self._fbgemm = self.kernel == "fbgemm"
        self._native, self._native_rows = None, native.max_rows(self.out_features)
        self._native_cap = self._native_rows * self.in_features  # the most elements of an input the kernel takes
        use = "native" in self.prefer and self.weight.device.type == "cpu" and self._native_rows
        kernels = native.kernels() if use else None
        if kernels is not None:  # calls of a few rows (a batch-1 decode step) take gpt.native's kernel
            got = kernels.linear_int8(x, self.weight, self.scales, self.bias)
            if got.shape == want.shape and (got - want).abs().max().item() <= tol:
                self._native = kernels
        return self.kernel

    @property
    def rows_independent(self) -> bool:
        """Whether each row's output depends on that row alone. Not with fbgemm's dynamic kernel: it quantizes a
        call's activations with one scale over all of its rows (gpt.engine then prefills joining prompts in
        forwards of their own instead of packing them into the decode step's). Nor where a few rows take the
        native kernel and more rows int8pack (bf16 activations): a row's output would depend on its call's size."""
        return self.kernel != "fbgemm" and (self._native is None or self.kernel == "dequant")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # lean: a decode step makes 25 of these calls
        kernels = self._native
        if kernels is not None:  # a few rows, no autograd, float32 or bf16: gpt.native's kernel
            if (x.numel() <= self._native_cap and x.shape[-1] == self.in_features and x.dtype in native.INPUT_DTYPES
                    and not (x.requires_grad and torch.is_grad_enabled())):
                return native.by_rows(kernels.linear_int8, x, self.weight, self.scales, self.bias)
        if self._fbgemm:  # the op takes any leading dims and a float32 input
            return self._mm(x if x.dtype is torch.float32 else x.float(), self._packed, True)
        y = self._run(self.kernel, x.reshape(-1, self.in_features))
        return y.view(*x.shape[:-1], self.out_features)

    def _apply(self, fn, recurse=True):  # .to() / .cpu(): the kernel's copies follow the buffers
        out = super()._apply(fn, recurse)
        self.setup()
        return out

    def __getstate__(self):  # deepcopy / pickle: the packed fbgemm weight is rebuilt, not copied
        state = self.__dict__.copy()
        state.pop("_packed", None)
        state.pop("_mm", None)
        state.pop("_native", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.setup()


# kernel preference of the output layer (V rows) and of the transformer blocks' Linears
LM_HEAD_KERNELS = ("native", "fbgemm", "int8pack", "dequant")
BLOCK_KERNELS = ("native", "fbgemm", "int8pack", "dequant")


def _kernels_for(name: str) -> tuple[str, ...]:
    return LM_HEAD_KERNELS if name == "lm_head" else BLOCK_KERNELS


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def quantize_int8(model: nn.Module) -> nn.Module:
    """A CPU copy of `model` in eval mode with every nn.Linear replaced by an Int8Linear (the tied input
    embedding keeps its float weight)."""
    model = copy.deepcopy(model).cpu().float().eval()
    for name, m in _quantizable(model).items():
        _replace(model, name, Int8Linear.from_linear(_unpadded(m), _kernels_for(name)))
    return model.requires_grad_(False)


def _quantizable(model: nn.Module) -> dict[str, nn.Linear]:
    """The Linear layers int8 replaces: those whose parameters are a weight and a bias only (a head that carries
    another learned value, the answer_logp reward head's weight of the log-likelihood, stays float)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)
            and {k for k, _ in m.named_parameters(recurse=False)} <= {"weight", "bias"}}


def _unpadded(linear: nn.Linear) -> nn.Linear:
    """The output layer without its padding rows (gpt.model.OutputHead: logits over the true vocabulary only), so
    the int8 copy scores exactly the ids the float model does; any other Linear as it is."""
    if not isinstance(linear, OutputHead) or linear.vocab_size == linear.out_features:
        return linear
    trimmed = nn.Linear(linear.in_features, linear.vocab_size, bias=False, device="meta")
    trimmed.weight = nn.Parameter(linear.weight.detach()[: linear.vocab_size], requires_grad=False)
    return trimmed


def _int8_linears(model: nn.Module) -> dict[str, Int8Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Int8Linear)}


def num_params(model: nn.Module, non_embedding: bool = True) -> int:
    """model.num_params() with an int8 model's Linear weights counted too (buffers of Int8Linear, not
    parameters): the count of the float model it was made from. The int8 output layer is a copy of the tied
    embedding, which the float count already holds once (an untied one is counted like any Linear)."""
    n = model.num_params(non_embedding)
    config = getattr(model, "config", None)
    tied = getattr(config, "tie_embeddings", True)
    for name, m in _int8_linears(model).items():
        if name != "lm_head" or not tied:
            n += m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
        if name == "lm_head" and not tied:  # the float layer's padding rows, which the int8 copy leaves out
            n += (getattr(config, "padded_vocab_size", m.out_features) - m.out_features) * m.in_features
    return n


def quantized_checkpoint(qmodel: nn.Module, ckpt: dict) -> dict:
    """The parent checkpoint's metadata with int8 weights and scales in place of the float Linear weights."""
    qlinears = _int8_linears(qmodel)
    floats = {k: v for k, v in qmodel.state_dict().items()
              if isinstance(v, torch.Tensor) and not any(k.startswith(n + ".") for n in qlinears)}
    packed = {name: {"int8": m.weight, "scales": m.scales, "bias": m.bias} for name, m in qlinears.items()}
    keep = {k: v for k, v in ckpt.items() if k not in ("model", "optimizer", "scheduler", "scaler", "rng", "path")}
    return {**keep, "model": floats, "quantized": {"format": FORMAT, "linears": packed}}


def _linear_tensors(ckpt: dict, fmt: str, name: str, p: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    if fmt == FORMAT:
        return p["int8"], p["scales"], p["bias"]
    # the previous format: torch.ao per-channel weights; symmetric (all zero points 0) along the output axis
    if int(p.get("axis", 0)) != 0 or bool(torch.as_tensor(p["zero_points"]).ne(0).any()):
        raise UserError(f"checkpoint {ckpt.get('path')!r} is an old int8 checkpoint this version cannot read "
                        f"({name}); re-run `python -m gpt.quantize <run> <out.pt>` on the float checkpoint")
    return p["int8"], p["scales"], p["bias"]


def model_from_quantized(ckpt: dict) -> nn.Module:
    """Rebuild an int8 model from a checkpoint written by `quantized_checkpoint`."""
    q = ckpt.get("quantized") or {}
    fmt = q.get("format")
    if fmt not in (FORMAT, *OLD_FORMATS):
        raise UserError(f"checkpoint {ckpt.get('path')!r} has int8 format {fmt!r}, not {FORMAT!r}; "
                        f"re-run `python -m gpt.quantize <run> <out.pt>` on the float checkpoint")
    model = build_model(ckpt)  # a float shell; its Linear layers are replaced below
    linear = set(_quantizable(model))
    res = model.load_state_dict(ckpt["model"], strict=False)  # embeddings, norms (lm_head follows the tied wte)
    stray = [k for k in res.missing_keys if k.rsplit(".", 1)[0] not in linear] + list(res.unexpected_keys)
    if stray:
        raise UserError(f"checkpoint {ckpt.get('path')!r}: float weights do not fit its config ({stray[:3]})")
    if linear != set(q["linears"]):
        raise UserError(f"checkpoint {ckpt.get('path')!r}: quantized layers do not match its model config")
    model = model.cpu().float().eval()
    for name, p in q["linears"].items():
        w, s, b = _linear_tensors(ckpt, fmt, name, p)
        m = model.get_submodule(name)
        rows = getattr(m, "vocab_size", m.out_features)  # a padded output layer is stored over its true rows
        shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else t for t in (w, s, b)]
        if shapes != [(rows, m.in_features), (rows,), None if m.bias is None else (rows,)]:
            raise UserError(f"checkpoint {ckpt.get('path')!r}: int8 layer {name} has shapes {shapes}, not those of "
                            f"its model config ({rows} x {m.in_features}); re-run `python -m gpt.quantize`")
        _replace(model, name, Int8Linear(w, s, b, _kernels_for(name)))
    return model.requires_grad_(False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gpt.quantize", description="write an int8 copy of a checkpoint")
    ap.add_argument("ckpt", help="checkpoint file or run folder (best.pt preferred)")
    ap.add_argument("out", help="output .pt path")
    args = ap.parse_args(argv)

    def write():
        ckpt = load_checkpoint(args.ckpt, prefer="best")
        if ckpt.get("quantized"):
            raise UserError(f"{ckpt['path']!r} is already quantized")
        return save_checkpoint(quantized_checkpoint(quantize_int8(model_from_checkpoint(ckpt)), ckpt), args.out)

    return cli_result(write)


if __name__ == "__main__":
    sys.exit(main())
