"""Re-quantize an existing GGUF (e.g. a downloaded BF16 or Q8_0 file → Q4_K_M) with llama.cpp itself.

For a GGUF input there is no checkpoint to stream from, and `llama_model_quantize` already does
the job well, so we call it — in a child process, through ctypes on the very libllama that
llama-cpp-python installs (this package never imports the runtime). The child process keeps
llama.cpp's log callback and its aborts away from the caller: a GGML_ABORT becomes a clear error
with llama.cpp's last message instead of a dead CLI. The child prints llama.cpp's log lines; the
parent reads the per-tensor `[ i/ n] name` lines for progress.

The ms4local policy (and `--tensor-type`) reach llama.cpp as exact per-tensor overrides
(`tt_overrides`), so both routes give the same types for the same tensors.
"""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gguf import GGMLQuantizationType as T

from . import arch as arch_registry
from .arch import TensorJob
from .errors import CheckpointError, QuantizeError
from .gguf_header import read_header
from .policy import Choice, FileType, Override, Policy, nbytes
from .quants import lib_dir

_PROGRESS = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]\s+(\S+)")


class _Params(ctypes.Structure):
    # llama_model_quantize_params of the pinned llama.cpp; pointers we never set are void*.
    _fields_ = [
        ("nthread", ctypes.c_int32), ("ftype", ctypes.c_int), ("output_tensor_type", ctypes.c_int),
        ("token_embedding_type", ctypes.c_int), ("allow_requantize", ctypes.c_bool),
        ("quantize_output_tensor", ctypes.c_bool), ("only_copy", ctypes.c_bool), ("pure", ctypes.c_bool),
        ("keep_split", ctypes.c_bool), ("dry_run", ctypes.c_bool), ("imatrix", ctypes.c_void_p),
        ("kv_overrides", ctypes.c_void_p), ("tt_overrides", ctypes.c_void_p), ("prune_layers", ctypes.c_void_p),
        ("max_buf_size", ctypes.c_size_t),
    ]


class _TensorOverride(ctypes.Structure):
    _fields_ = [("pattern", ctypes.c_char_p), ("type", ctypes.c_int)]


def _libllama() -> ctypes.CDLL:
    names = {"darwin": ["libllama.dylib", "libllama.0.dylib"], "win32": ["llama.dll"]}.get(
        sys.platform, ["libllama.so.0", "libllama.so"])
    for name in names:
        path = lib_dir() / name
        if path.exists():
            return ctypes.CDLL(str(path))
    raise QuantizeError(f"libllama is not in {lib_dir()}; reinstall llama-cpp-python (`make install`)")


def _child(src: str, dst: str, ftype: int, threads: int, overrides: list[tuple[str, int]]) -> int:
    """Runs in the child process: llama_model_quantize with llama.cpp's log on stdout."""
    lib = _libllama()
    log_cb = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)

    @log_cb
    def on_log(_level: int, text: bytes, _user: object) -> None:
        sys.stdout.write(text.decode("utf-8", "replace"))
        sys.stdout.flush()

    lib.llama_log_set.argtypes = [log_cb, ctypes.c_void_p]
    lib.llama_log_set(on_log, None)
    lib.llama_backend_init()
    lib.llama_model_quantize_default_params.restype = _Params
    lib.llama_model_quantize.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(_Params)]
    lib.llama_model_quantize.restype = ctypes.c_uint32
    params = lib.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    params.allow_requantize = True
    keep = (_TensorOverride * (len(overrides) + 1))()
    patterns = [p.encode() for p, _ in overrides]
    for i, (p, (_, t)) in enumerate(zip(patterns, overrides)):
        keep[i].pattern, keep[i].type = p, t
    keep[len(overrides)].pattern = None
    if overrides:
        params.tt_overrides = ctypes.cast(keep, ctypes.c_void_p)
    return int(lib.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)))


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # numpy order
    type: T


def read_tensors(path: Path) -> tuple[list[GGUFTensor], dict[str, object], tuple[Path, ...]]:
    """Tensor infos, a few metadata fields and the files (several for a split set) of a GGUF,
    from its header only.

    The header is read by `gguf_header`, which bounds every count and checks that the tensor data
    is all there, so a corrupt or truncated file is refused here, in a second, before gguf-py or
    llama.cpp sees it."""
    header = read_header(path)
    tensors = [GGUFTensor(t.name, tuple(reversed(t.shape)), T[t.type]) for t in header.tensors]
    md = header.metadata
    meta: dict[str, object] = {k: md[k] for k in ("general.architecture", "general.name", "general.basename",
                                                  "general.file_type") if k in md}
    arch = str(meta.get("general.architecture", ""))
    for key in (f"{arch}.block_count", f"{arch}.expert_count"):
        value = md.get(key)
        meta[key.split(".", 1)[1]] = value if isinstance(value, int) and not isinstance(value, bool) else 0
    return tensors, meta, header.files


def plan(tensors: list[GGUFTensor], meta: dict[str, object], ft: FileType, policy: str,
         overrides: list[Override]) -> dict[str, Choice]:
    """The type of every tensor of a GGUF re-quantized to `ft` (unquantizable ones keep their type)."""
    model = arch_registry.by_gguf_name(meta.get("general.architecture"))
    if model is None:
        raise CheckpointError(f"this GGUF's architecture is {meta.get('general.architecture')!r}; "
                              f"ms4local quantizes {', '.join(arch_registry.gguf_names())} models")
    jobs = [TensorJob(t.name, t.shape, model.role(t.name), (), lambda: iter(()),
                      None) for t in tensors]
    chooser = Policy(ft, policy, overrides, jobs, int(meta.get("block_count") or 0),
                     int(meta.get("expert_count") or 0))
    out: dict[str, Choice] = {}
    for job, t in zip(jobs, tensors):
        c = chooser.choose(job)
        if c.rule.startswith("norms"):
            c = Choice(t.type, "not quantized (kept as stored)")
        out[t.name] = c
    return out


def requantize(src: Path, dst: Path, ft: FileType, policy: str, overrides: list[Override], choices: dict[str, Choice],
               threads: int | None, progress: Callable[[int, int, str], None] | None = None) -> None:
    """Write `dst` (through `dst.part`) with llama.cpp's quantizer; raise with llama.cpp's reason on failure.

    There is no resume on this route: llama.cpp writes the file in one go, so an interrupted or
    failed run removes its `.part` and the next run starts over."""
    if policy == "llama":
        tt = [(o.pattern.pattern, int(o.type)) for o in overrides]
    else:  # exact names: llama.cpp then uses our type for each tensor (its fallback is a no-op on them)
        tt = [(f"^{re.escape(n)}$", int(c.type)) for n, c in choices.items() if not c.rule.startswith("not quantized")]
    part = dst.with_name(dst.name + ".part")
    cmd = [sys.executable, "-c", "import sys, quantize.requant as r; sys.exit(r._main(sys.argv[1:]))",
           str(src), str(part), str(ft.ftype), str(threads or os.cpu_count() or 1),
           *[f"{p}\t{t}" for p, t in tt]]
    lines: list[str] = []
    try:
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
            try:
                assert proc.stdout is not None
                for line in proc.stdout:
                    lines.append(line.rstrip())
                    del lines[:-40]
                    m = _PROGRESS.match(line.strip())
                    if m and progress:
                        progress(int(m.group(1)), int(m.group(2)), m.group(3))
                code = proc.wait()
            except BaseException:
                # Ctrl-C (or any failure here) stops llama.cpp now: its half-written .part cannot be
                # resumed, and waiting for the child would mean waiting for the whole quantization.
                proc.kill()
                raise
        if code != 0 or not part.exists():
            reason = next((ln for ln in reversed(lines) if ln and ("error" in ln.lower() or "failed" in ln.lower()
                                                                   or "abort" in ln.lower())), lines[-1] if lines else "")
            raise QuantizeError(f"llama.cpp could not quantize {src.name}: {reason.strip() or f'exit code {code}'}")
        os.replace(part, dst)
    except BaseException:
        part.unlink(missing_ok=True)
        raise


def _main(argv: list[str]) -> int:
    src, dst, ftype, threads, *over = argv
    overrides = [(p, int(t)) for p, t in (o.rsplit("\t", 1) for o in over)]
    return _child(src, dst, int(ftype), int(threads), overrides)


__all__ = ["GGUFTensor", "plan", "read_tensors", "requantize", "nbytes"]
