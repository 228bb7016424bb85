"""Float32 rows → the bytes of a GGUF tensor type.

F32/F16 are numpy casts (round-to-nearest-even, as ggml's own conversion) and BF16 is gguf-py's
rounding; every block type goes through ggml's own quantizer, `ggml_quantize_chunk`, in the
libggml-base that llama-cpp-python installs. We load the very file libllama links against (its
soname), so the quantizer is bit-identical to llama-quantize's and is never a second copy. This
module reaches ggml through ctypes only: `quantize/` must not import `llama_cpp`.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants as gguf_quants

from .errors import QuantizeError
from .policy import nbytes


def _library_names() -> list[str]:
    if sys.platform == "darwin":
        return ["libggml-base.0.dylib", "libggml-base.dylib"]
    if sys.platform == "win32":
        return ["ggml-base.dll"]
    return ["libggml-base.so.0", "libggml-base.so"]


@lru_cache(maxsize=1)
def ggml() -> ctypes.CDLL:
    """ggml-base from llama-cpp-python's lib directory (found without importing llama_cpp)."""
    directory = lib_dir()
    for name in _library_names():
        path = directory / name
        if path.exists():
            lib = ctypes.CDLL(str(path))
            break
    else:
        raise QuantizeError(f"ggml's library is not in {directory}; reinstall llama-cpp-python (`make install`)")
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_validate_row_data.restype = ctypes.c_bool
    lib.ggml_validate_row_data.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
    return lib


def lib_dir() -> Path:
    """llama-cpp-python's lib directory, where libllama and the ggml libraries it links against live."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise QuantizeError("llama-cpp-python is not installed; run `make install`")
    return Path(list(spec.submodule_search_locations)[0]) / "lib"


class Encoder:
    """Quantizes row blocks on worker threads: ctypes drops the GIL inside ggml_quantize_chunk,
    so `threads` workers really run in parallel (rows are independent without an importance matrix)."""

    def __init__(self, threads: int | None = None) -> None:
        self.threads = max(1, threads or os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="ggml-quant") if self.threads > 1 else None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "Encoder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def encode(self, rows: np.ndarray, t: T) -> np.ndarray:
        return encode(rows, t, self._pool, self.threads)


def encode(rows: np.ndarray, t: T, pool: ThreadPoolExecutor | None = None, parts: int = 1) -> np.ndarray:
    """Encode float32 data (last axis = ne0) as tensor type `t`; returns a flat byte-compatible array.

    With a pool, the rows are cut into `parts` contiguous blocks quantized concurrently into
    disjoint ranges of the same output buffer (the bytes are the same as a single call's)."""
    data = np.ascontiguousarray(rows, dtype=np.float32)
    if t == T.F32:
        return data.reshape(-1)
    if t == T.F16:
        return data.astype(np.float16).reshape(-1)
    if t == T.BF16:
        return gguf_quants.quantize(data, T.BF16).reshape(-1)
    n_per_row = data.shape[-1]
    nrows = data.size // n_per_row
    out = np.empty(nbytes(t, data.shape), dtype=np.uint8)
    lib = ggml()
    if lib.ggml_quantize_requires_imatrix(int(t)):
        raise QuantizeError(f"{t.name} needs an importance matrix, which ms4local does not compute")
    row_bytes = out.size // nrows

    def run(first: int, count: int) -> int:
        n = lib.ggml_quantize_chunk(int(t), data.ctypes.data, out.ctypes.data, first * n_per_row, count, n_per_row, None)
        if not lib.ggml_validate_row_data(int(t), out.ctypes.data + first * row_bytes, n):
            raise QuantizeError(f"ggml produced invalid {t.name} data (NaN or Inf in the source weights?)")
        return n

    if pool is None or parts <= 1 or nrows < 2 * parts:
        written = run(0, nrows)
    else:
        step = -(-nrows // parts)
        written = sum(pool.map(lambda a: run(a, min(step, nrows - a)), range(0, nrows, step)))
    if written != out.size:
        raise QuantizeError(f"ggml wrote {written} bytes for a {t.name} tensor, expected {out.size}")
    return out
