"""Precision: the dtype names configs use, and whether this CPU computes bfloat16 natively.

Training (gpt.trainer.Precision: an autocast dtype and a GradScaler) and inference
(gpt.inference.resolve_dtype: the dtype the weights are cast to) read the same table.
"""

from __future__ import annotations

import os

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # accepted by hardware.autocast_dtype


# oneDNN ISA names (ONEDNN_MAX_CPU_ISA) without bf16 matmul instructions. Pinned to one of them on a CPU with
# AVX512-BF16 or AMX, a bf16 matmul falls back to reference code: 168 ms against 1.2 ms in float32 for 512 x 512 on an
# AMX Xeon (AVX2_VNNI_2 the same there); AVX512_CORE_FP16 (= AVX10_1_512) has bf16, and DEFAULT / ALL pin nothing.
NO_BF16_ISAS = frozenset({"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"})


def isa_pinned_below_bf16(environ=os.environ) -> bool:
    """Whether oneDNN, which runs the bf16 matmuls, is pinned to an ISA without bf16 (ONEDNN_MAX_CPU_ISA, or its
    older name DNNL_MAX_CPU_ISA: the way to run as an AVX2 machine does). The ATEN_CPU_CAPABILITY pin alone
    leaves oneDNN's bf16 matmuls fast."""
    isa = (environ.get("ONEDNN_MAX_CPU_ISA") or environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()
    return isa in NO_BF16_ISAS


def cpu_has_fast_bf16() -> bool:
    """True where the CPU has bf16 matmul instructions (AVX512-BF16 or AMX), which make bf16 autocast
    2-3x faster than fp32, and the kernels are not pinned below them; elsewhere bf16 is emulated and slower."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return ("avx512_bf16" in flags or "amx_bf16" in flags) and not isa_pinned_below_bf16()
