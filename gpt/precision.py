"""Precision: the dtype names configs use, and whether this CPU computes bfloat16 natively.

Training (gpt.trainer.Precision: an autocast dtype and a GradScaler) and inference
(gpt.inference.resolve_dtype: the dtype the weights are cast to) read the same table.
"""

from __future__ import annotations

import os

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # accepted by hardware.autocast_dtype


def isa_pinned_below_bf16(environ=os.environ) -> bool:
    """Whether oneDNN, which runs the bf16 matmuls, is pinned below the CPU's bf16 instructions: ONEDNN_MAX_CPU_ISA
    naming an ISA without them (AVX2, AVX512_CORE, ...; the way to run as an AVX2 machine does). Then a bf16 matmul
    falls back to reference code, ~150x slower than float32 (measured on an AMX Xeon, 512 x 512); the
    ATEN_CPU_CAPABILITY pin alone leaves oneDNN's matmuls fast."""
    isa = environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    return bool(isa) and isa != "ALL" and not any(tag in isa for tag in ("BF16", "AMX", "AVX10"))


def cpu_has_fast_bf16() -> bool:
    """True where the CPU has bf16 matmul instructions (AVX512-BF16 or AMX), which make bf16 autocast
    2-3x faster than fp32, and the kernels are not pinned below them; elsewhere bf16 is emulated and slower."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return ("avx512_bf16" in flags or "amx_bf16" in flags) and not isa_pinned_below_bf16()
