"""The one module that imports `llama_cpp` and libmtmd, and the one place llama.cpp's log goes.

llama.cpp writes its log (load errors included) through a callback; capturing it here, rather
than redirecting the process's stdout/stderr, keeps the reason a load failed so that errors can
name it (`last_error`) and `--verbose` can show it as it comes (`set_log_listener`). ggml's own
functions (devices, buffer types) come from the copy libllama is linked to (`ggml_fn`), and the
one helper that fills a `llama_batch` row lives here too, so that every evaluation path (the
engine's prompt, image embeddings, the server's batched slots) writes rows the same way.
"""

from __future__ import annotations

import ctypes
import os
import re
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from ..errors import ModelLoadError

_llama: Any = None
_mtmd: Any = None
_log_lock = threading.Lock()
_log_lines: deque[tuple[int, str]] = deque(maxlen=4000)
_log_total = 0  # lines ever received; marks count from here because the deque drops old lines
_log_listener: Callable[[int, str], None] | None = None
_log_cb_ref: Any = None

GGML_LOG_ERROR = 4


def llama() -> Any:
    """Import llama_cpp once, initialise the backend and route its log into our buffer."""
    global _llama, _log_cb_ref
    if _llama is None:
        import llama_cpp

        def on_log(level: int, text: bytes, _user: Any) -> None:
            global _log_total
            line = text.decode("utf-8", "replace") if text else ""
            with _log_lock:
                _log_lines.append((int(level), line))
                _log_total += 1
            if _log_listener is not None:
                _log_listener(int(level), line)

        _log_cb_ref = llama_cpp.llama_log_callback(on_log)
        llama_cpp.llama_log_set(_log_cb_ref, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        _llama = llama_cpp
    return _llama


def mtmd() -> Any:
    """Import llama-cpp-python's libmtmd bindings once (images), with their log routed like llama.cpp's."""
    global _mtmd
    if _mtmd is None:
        llama()
        try:
            from llama_cpp import mtmd_cpp
        except (ImportError, OSError) as e:
            raise ModelLoadError(f"this llama-cpp-python build has no libmtmd, so images cannot be read: {e}") from None
        mtmd_cpp.mtmd_log_set(_log_cb_ref, ctypes.c_void_p(0))
        _mtmd = mtmd_cpp
    return _mtmd


def set_log_listener(listener: Callable[[int, str], None] | None) -> None:
    """Receive every llama.cpp log line (level, text) as it arrives, e.g. for `--verbose`."""
    global _log_listener
    _log_listener = listener


def _lines_since(since: int) -> list[tuple[int, str]]:
    """The buffered lines received after mark `since` (a value of `log_mark()`)."""
    with _log_lock:
        n = _log_total - since
        if n <= 0:
            return []
        return list(_log_lines)[-n:] if n < len(_log_lines) else list(_log_lines)


def log_text(since: int = 0) -> str:
    """llama.cpp's log received after mark `since` (0: all that is still buffered)."""
    return "".join(t for _, t in _lines_since(since))


def log_mark() -> int:
    """A position in llama.cpp's log, for `log_text(since=...)`; unlike len() of the bounded
    buffer it keeps counting once old lines are dropped."""
    with _log_lock:
        return _log_total


_FUNC_PREFIX = re.compile(r"^(?:[A-Za-z_]\w*: |error loading model: )+")
_WRAPPER = re.compile(r"^failed to load model( from .*)?$")


def last_error(since: int) -> str:
    """llama.cpp's reason for the failure it logged after mark `since`.

    A failed load logs the cause first and then generic wrappers ("failed to load model"), so
    the wrappers and the `function: ` prefixes are dropped and the causes kept, in order.
    """
    lines = _lines_since(since)
    errors = [t.strip() for lvl, t in lines if lvl == GGML_LOG_ERROR and t.strip()]
    reasons: list[str] = []
    for line in errors:
        text = _FUNC_PREFIX.sub("", line)
        if text and not _WRAPPER.match(text) and text not in reasons:
            reasons.append(text)
    if reasons:
        return "; ".join(reasons)
    if errors:
        return errors[-1]
    tail = [t.strip() for _, t in lines if t.strip()]
    return tail[-1] if tail else "no reason given"



_ggml_fns: dict[str, Any] = {}


def ggml_fn(name: str, restype: Any, *argtypes: Any) -> Any:
    """A ggml function from the copy of libggml that libllama itself is linked against.

    dlsym on libllama's handle searches libllama and then its dependencies, so the symbol comes
    from the libggml-base / libggml already mapped into the process. Opening
    llama_cpp/lib/libggml-base.so by path would not do: the wheel ships it as a separate file
    beside libggml-base.so.0 (the soname libllama was linked with), and that second copy has its
    own backend registry and its own CPU buffer type — which llama.cpp compares by pointer to
    recognise `=CPU` overrides. (Windows: the DLL already loaded under that name is reused.)
    """
    fn = _ggml_fns.get(name)
    if fn is None:
        llama()
        import llama_cpp.llama_cpp as lc

        proto = ctypes.CFUNCTYPE(restype, *argtypes)
        try:
            fn = proto((name, lc._lib))
        except AttributeError:
            if os.name != "nt":
                raise
            for dll in ("ggml-base.dll", "ggml.dll", "ggml-cpu.dll"):
                try:
                    fn = proto((name, ctypes.CDLL(dll)))
                    break
                except (AttributeError, OSError):
                    continue
            else:
                raise
        _ggml_fns[name] = fn
    return fn


def schema_converter() -> tuple[Any, Any]:
    """llama-cpp-python's copy of llama.cpp's JSON-schema → GBNF converter: (RESERVED_NAMES, SchemaConverter)."""
    llama()
    from llama_cpp.llama_grammar import RESERVED_NAMES, SchemaConverter

    return RESERVED_NAMES, SchemaConverter


def kv_override_array(values: dict[str, float | int | bool]) -> Any:
    """A zero-terminated llama_model_kv_override[] for `values` (None when empty), as llama.cpp's
    `--override-kv` builds it; the caller keeps it alive while the model loads."""
    if not values:
        return None
    L = llama()
    arr = (L.llama_model_kv_override * (len(values) + 1))()
    for i, (key, value) in enumerate(values.items()):
        arr[i].key = key.encode()
        if isinstance(value, bool):
            arr[i].tag, arr[i].value.val_bool = L.LLAMA_KV_OVERRIDE_TYPE_BOOL, value
        elif isinstance(value, int):
            arr[i].tag, arr[i].value.val_i64 = L.LLAMA_KV_OVERRIDE_TYPE_INT, value
        else:
            arr[i].tag, arr[i].value.val_f64 = L.LLAMA_KV_OVERRIDE_TYPE_FLOAT, float(value)
    return arr  # the zeroed last entry (empty key) is the terminator


def put_row(batch: Any, i: int, pos: int, seq: int, logits: bool, token: int | None = None) -> None:
    """Fill row `i` of a llama_batch: one position of sequence `seq` (a token id, or an embedding
    row already copied into `batch.embd` when `token` is None), with its logits wanted or not."""
    if token is not None:
        batch.token[i] = token
    batch.pos[i] = pos
    batch.n_seq_id[i] = 1
    batch.seq_id[i][0] = seq
    batch.logits[i] = logits
