"""Native CPU kernels for decoding (gpt/csrc/decode.cpp): the few-row matmuls of a decode step with bf16 weights
(gpt.inference.PackedLinear), int8 weights (gpt.quantize.Int8Linear, kernel "native") and float32 weights
(gpt.inference.NativeLinear, up to F32_ROWS rows: a continuous batch's step too), the one-token
attention step (gpt.model.CausalSelfAttention.native_decode) and the sampler's top-k (gpt.engine.topk).

At batch 1 each Linear reads its whole weight to produce one row, so the step's speed is the rate at which the
weights stream from memory. torch's CPU kernels (oneDNN bf16, fbgemm int8) are built for many rows: on a
2-core Xeon with AMX they take ~100 us for a transformer block's 0.3-1.2 MB matmuls, 3-10 GB/s where the memory
gives ~25. The native kernel reads each weight row once, in nn.Linear's own layout, with AVX-512.

The kernels are compiled on first use with torch's C++ extension builder (a C++ compiler and ninja; ~30 s, once
per machine, Python and torch version, kept in torch's extension cache, $TORCH_EXTENSIONS_DIR or
~/.cache/torch_extensions).
They are used only where they can run: Linux on x86-64 with AVX512F/BW/VL. Anywhere else, or when the build
fails (no compiler: the reason is logged in one line, and kept in the build folder so that later processes do
not try again until the folder is deleted), or with GPT_NATIVE_KERNELS=0 in the environment, the same layers use
torch's kernels, with results equal up to float rounding.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import sys
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "decode.cpp"
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl")
CFLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma", "-fopenmp"]  # -fopenmp: at::parallel_for's threads
ENV = "GPT_NATIVE_KERNELS"
FAILED = "build-failed"  # written into the build folder with the reason when a build fails: not tried again

_lock = threading.Lock()
_state: dict = {}


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (empty elsewhere); read once."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def unavailable_reason() -> str | None:
    """Why the native kernels cannot be used here without building anything, or None."""
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return f"{ENV}=0"
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"they are built for Linux on x86-64, not {platform.system()} on {platform.machine()}"
    missing = [f for f in CPU_FLAGS if f not in cpu_flags()]
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    return None


def kernels():
    """The compiled kernel module (linear_bf16, linear_int8, linear_f32, attend_new, topk), or None where they cannot be used;
    loaded once per process, built once per machine (kept in the build folder)."""
    with _lock:
        if "module" in _state:
            return _state["module"]
        _state["module"] = None
        reason = unavailable_reason()
        if reason is None:
            try:
                _state["module"] = _build()
            except Exception as e:  # no compiler, no ninja, a failed compile: torch's kernels instead
                reason = _one_line(e)
        if reason is not None:
            _state["reason"] = reason
            log.info("native decode kernels not used (%s): torch's kernels decode instead", reason)
        return _state["module"]


def loaded():
    """The kernel module if `kernels()` has loaded it, else None (never builds: for the hot path); None inside
    `suspended()`."""
    return None if _suspended else _state.get("module")


_suspended = 0


@contextlib.contextmanager
def suspended():
    """Within it `loaded()` answers None, so attention and top-k take torch's ops (layers that hold the kernels
    keep them; `kernels()` is unaffected): for comparisons in one process (benchmarks/bench_generate.py)."""
    global _suspended
    _suspended += 1
    try:
        yield
    finally:
        _suspended -= 1


def reason() -> str | None:
    """After `kernels()`: why they are not used, or None."""
    return _state.get("reason")


def _one_line(e: Exception, limit: int = 300) -> str:
    """An exception as one log line. A failed build's message starts with ninja's long compile command; the
    compiler's own error comes last, so a long message keeps its end."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else "..." + text[-limit:]


def extension_name() -> str:
    """The kernels' module name: a digest of the source, the flags and the torch and Python versions."""
    key = SOURCE.read_bytes() + " ".join(CFLAGS).encode() + torch.__version__.encode() + sys.version.encode()
    return f"gpt_decode_{hashlib.sha256(key).hexdigest()[:16]}"


def build_directory(name: str) -> Path:
    """Where the kernels `name` are built and kept: torch's extension cache ($TORCH_EXTENSIONS_DIR, else
    ~/.cache/torch_extensions), in a folder of this Python version."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    return Path(root) / f"py{sys.version_info.major}{sys.version_info.minor}_cpu" / name


def _import(name: str, path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build():
    import fcntl

    from torch.utils.cpp_extension import load

    name = extension_name()
    folder = build_directory(name)
    folder.mkdir(parents=True, exist_ok=True)
    log.info("loading the native decode kernels %s (compiled on first use: ~30 s)", name)
    # One build at a time across processes, under a lock the system releases when its holder dies. torch's own
    # lock file would stay behind a build that was killed (and make every later load wait forever): holding
    # ours, no build of ours is running, so a torch lock found in the folder is such a leftover.
    with open(folder / "gpt-build.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        failed = folder / FAILED
        if failed.exists():  # each process that loads a model would otherwise try (and fail) again
            raise RuntimeError(f"an earlier build failed ({failed.read_text().strip()}); delete {folder} to build again")
        built = folder / f"{name}.so"
        if built.exists():  # the name is a digest of what went into the build: import it as it is (torch's load()
            try:            # would run ninja, and rebuild for a copy of the source at another path, as a wheel has)
                return _import(name, built)
            except ImportError as e:  # a damaged file: build again
                log.info("rebuilding the native decode kernels: %s", _one_line(e))
        (folder / "lock").unlink(missing_ok=True)
        try:
            return load(name=name, sources=[str(SOURCE)], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"],
                        build_directory=str(folder), verbose=False)
        except Exception as e:
            failed.write_text(_one_line(e) + "\n")
            raise


INPUT_DTYPES = (torch.float32, torch.bfloat16)  # the activations (and KV caches) the kernels take


def by_rows(fn, x: torch.Tensor, *args) -> torch.Tensor:
    """A kernel matmul `fn` (x (M, K), *args) -> (M, N) over x's rows: x (..., K) -> (..., N)."""
    shape = x.shape
    y = fn(x.reshape(-1, shape[-1]), *args)
    return y.view(*shape[:-1], y.size(1))


F32_ROWS = 16  # the most input rows a float32 Linear (gpt.inference.NativeLinear) sends to the native kernel


def max_rows(out_features: int) -> int:
    """The most input rows a bf16 or int8 Linear with `out_features` outputs sends to the native kernel (0: none); more
    go to torch's. Measured inside a batch-1 decode step of a 6-layer, 384-wide model: the kernel takes the 24 block
    matmuls in 0.67 ms where fbgemm takes 0.91 (int8), 1.33 where oneDNN takes 1.58 (bf16; 2-core Xeon with AMX);
    weights cold in cache it takes half their time at 1 row and still wins at 4 (and 8). The (50304, 384) output
    layer is another kind, many short rows, and which kernel streams it faster depends on the CPU: on the Xeon with
    AMX torch's (0.45 ms against the native 0.62 in int8, 1.02 against 1.45 in bf16), on an AMD EPYC (Zen 4, no AMX)
    the native one at 1 row (0.51 ms against fbgemm's 0.70, 1.02 against oneDNN's 1.58; at 4 rows they are even). So
    layers that wide send one row to the kernel on a CPU without AMX, none with it."""
    if out_features <= 8192:
        return 4
    return 0 if "amx_bf16" in cpu_flags() else 1


_OMP_PAUSE: list = []  # [omp_pause_resource_all or None], looked up once


def release_idle_threads() -> bool:
    """Let the calling thread's idle OpenMP worker threads go (OpenMP 5's omp_pause_resource_all, soft: a later
    parallel region of this thread starts them again) -> whether a runtime did.

    Why: serve.py decodes in a worker thread while the thread that loaded the model (uvicorn's event loop) keeps the
    pool of OpenMP threads its own torch ops started. libgomp throttles its spin-waiting once it manages more threads
    than the machine has CPUs, so each parallel region of the worker (torch's ops and these kernels alike) then waits
    ~50 us for its sleeping helper: on a 2-core machine a float32 decode step of the issue's model took 10.5 ms in
    the worker thread against 7.1 in the main thread. Called from the thread that owns the idle pool (the event loop,
    as it hands a request to the worker), it brings the worker's steps back to the main thread's speed."""
    if not _OMP_PAUSE:
        _OMP_PAUSE.append(_find_omp_pause())
    fn = _OMP_PAUSE[0]
    return fn is not None and fn(1) == 0  # 1: omp_pause_soft


def _find_omp_pause():
    """omp_pause_resource_all of the libgomp torch runs on (Linux wheels: torch/lib/libgomp*.so*; else the one loaded
    under the name libgomp.so.1), or None. Only libgomp: there it frees the calling thread's pool alone (other threads'
    teams run on), which is what release_idle_threads needs; in LLVM's libomp a pause is global. Another libgomp
    that a library of this process bundles (scikit-learn's, say) is not torch's, so it is never picked."""
    import ctypes

    lib = None
    torch_dir = os.path.dirname(torch.__file__)
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "/" in line})
    except OSError:
        paths = []
    for path in paths:
        if os.path.basename(path).startswith("libgomp") and (path.startswith(torch_dir + os.sep)
                                                             or path.startswith(torch_dir + ".libs" + os.sep)):
            lib = path
            break
    try:
        handle = ctypes.CDLL(lib) if lib else ctypes.CDLL("libgomp.so.1", mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        fn = handle.omp_pause_resource_all
    except (OSError, AttributeError):  # no libgomp loaded (torch on another runtime, or none), or an old one
        return None
    fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
    return fn
