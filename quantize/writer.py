"""Stream tensors into a GGUF file: header and metadata through gguf-py, data a chunk at a time.

gguf-py's `GGUFWriter` holds every tensor until `write_tensors_to_file`; for a 240 GB model we
instead declare all tensor infos first (`add_tensor_info`), let it write header, KV and tensor
infos, then append each tensor's data ourselves, chunk by chunk (one expert slice at a time),
with the same alignment rule gguf-py uses for its offsets. The file is written as `OUT.part`,
flushed and fsynced, and renamed only when complete, so the final name never holds a partial file.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from .errors import OutputError, QuantizeError

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class OutTensor:
    """A tensor as it will be stored: name, numpy-order logical shape, type and byte size."""

    name: str
    shape: tuple[int, ...]
    type: gguf.GGMLQuantizationType
    nbytes: int


def part_path(path: Path) -> Path:
    return path.with_name(path.name + ".part")


def check_output(path: Path, *, force: bool, needed_bytes: int) -> None:
    """Everything about the destination that can fail, checked before the first byte is written."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"output {path} is a directory; give a file name ending in .gguf")
    if path.exists() and not force:
        raise OutputError(f"output {path} already exists; pass --force to overwrite it or choose another -o")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"output directory {parent} does not exist; create it or choose another -o")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"output directory {parent} is not writable; choose another -o")
    free = shutil.disk_usage(parent).free
    if free < needed_bytes:
        raise OutputError(
            f"not enough disk space in {parent}: the output needs {_gib(needed_bytes)}, {_gib(free)} free; "
            "free some space or choose another -o"
        )


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def write_gguf(
    path: Path,
    arch: str,
    add_metadata: Callable[[gguf.GGUFWriter], None],
    tensors: list[OutTensor],
    data: Callable[[OutTensor], Iterable[np.ndarray]],
    progress: Progress | None = None,
) -> None:
    """Write a complete GGUF at `path` (via `path.part`); remove the partial file on any failure."""
    path = Path(path)
    tmp = part_path(path)
    writer = gguf.GGUFWriter(None, arch)
    add_metadata(writer)
    for t in tensors:
        # A non-uint8 dtype with raw_dtype set keeps the logical shape as given.
        np_dtype = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}.get(t.type)
        writer.add_tensor_info(t.name, t.shape, np.dtype(np_dtype or np.float32), t.nbytes,
                               raw_dtype=None if np_dtype else t.type)
    total = sum(t.nbytes for t in tensors)
    done = 0
    try:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        assert writer.fout is not None
        fout = writer.fout[0]
        writer.write_padding(fout, fout.tell())
        for t in tensors:
            written = 0
            for chunk in _chunks(data(t)):
                fout.write(memoryview(chunk).cast("B"))
                written += chunk.nbytes
                done += chunk.nbytes
                if progress:
                    progress(done, total, t.name)
            if written != t.nbytes:
                raise QuantizeError(f"internal error: {t.name} produced {written} bytes, expected {t.nbytes}")
            writer.write_padding(fout, written)
        fout.flush()
        os.fsync(fout.fileno())
        writer.close()
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        _discard(writer, tmp)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutputError(f"disk full while writing {path.name}; free some space or choose another -o") from None
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        _discard(writer, tmp)
        raise


def _chunks(items: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    for item in items:
        yield np.ascontiguousarray(item)


def _discard(writer: gguf.GGUFWriter, tmp: Path) -> None:
    try:
        writer.close()
    except OSError:
        pass
    tmp.unlink(missing_ok=True)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
