"""Precision: the dtype names configs use, and whether this CPU computes bfloat16 natively.

Training (gpt.trainer.Precision: an autocast dtype and a GradScaler) and inference
(gpt.inference.resolve_dtype: the dtype the weights are cast to) read the same table.
"""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # accepted by hardware.autocast_dtype


def cpu_has_fast_bf16() -> bool:
    """True where the CPU has bf16 matmul instructions (AVX512-BF16 or AMX), which make bf16 autocast
    2-3x faster than fp32; elsewhere bf16 is emulated and slower."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
