"""Stream tensors into a GGUF file (or a split set): resumable, never a partial file under the final name.

gguf-py's `GGUFWriter` holds every tensor until `write_tensors_to_file`; for a 240 GB model we
instead let it lay out the header, metadata and tensor infos (and the shards, with llama.cpp's
`split.*` keys, when splitting) into memory, then append each tensor's data ourselves, chunk by
chunk (one expert slice at a time), with gguf-py's alignment rule.

Every file is written as `NAME.part`. After each tensor its data is fsynced and a line is
appended to a journal (`FIRST.part.journal`: a fingerprint of the plan and source, then one line
per finished tensor with its end offset and CRC). A run killed at any moment (SIGKILL included)
leaves only `.part` files and the journal; the same command run again checks the header bytes,
the fingerprint, the offsets and the CRC of the last finished tensor, truncates after it and goes
on — or starts over when anything does not match. The output is byte-identical either way. Only a
complete, fsynced set is renamed, the first shard (the one llama.cpp opens) last.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import queue
import shutil
import stat
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import gguf
import numpy as np

from .errors import OutputError, QuantizeError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

Progress = Callable[[int, int, str], None]
X = TypeVar("X")
JOURNAL_VERSION = 1


@dataclass(frozen=True)
class OutTensor:
    """A tensor as it will be stored: name, numpy-order logical shape, type and byte size."""

    name: str
    shape: tuple[int, ...]
    type: gguf.GGMLQuantizationType
    nbytes: int


@dataclass
class Shard:
    """One output file: its final path, its tensors and its exact header bytes (padded to alignment)."""

    path: Path
    tensors: list[OutTensor]
    header: bytes

    @property
    def data_bytes(self) -> int:
        return sum(_pad(t.nbytes) for t in self.tensors)

    @property
    def size(self) -> int:
        return len(self.header) + self.data_bytes


def part_path(path: Path) -> Path:
    return path.with_name(path.name + ".part")


def journal_path(first: Path) -> Path:
    return first.with_name(first.name + ".part.journal")


def _pad(n: int, align: int = gguf.GGUF_DEFAULT_ALIGNMENT) -> int:
    return (n + align - 1) // align * align


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


FileId = tuple[int, int]  # (st_dev, st_ino): the same file through any name, symlink or hard link


def file_ids(paths: Iterable[Path]) -> frozenset[FileId]:
    """The identities of the files a run reads (symlinks followed), which it must never write."""
    ids = set()
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            continue
        ids.add((st.st_dev, st.st_ino))
    return frozenset(ids)


def check_replaceable(path: Path, *, inputs: frozenset[FileId] = frozenset()) -> bool:
    """Refuse a destination that is an input of the run or not a regular file; True if it exists.

    Holds even with --force: a rename over a device node replaces the node (as root, `-o /dev/full`
    turned /dev/full into a regular file), and a rename over an input, whatever its name, destroys
    the very checkpoint the run reads. A symlink is followed: its target is what the user means."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):  # a missing parent is check_directory's to report
        return False
    except OSError as e:
        raise OutputError(f"cannot check the output {path}: {e.strerror or e}; choose another -o") from None
    if (st.st_dev, st.st_ino) in inputs:
        raise OutputError(f"output {path} is a file this run reads (the same file, by name or by link); "
                          "ms4local never overwrites its input, even with --force; choose another -o")
    if stat.S_ISDIR(st.st_mode):
        raise OutputError(f"output {path} is a directory; give a file name ending in .gguf")
    if not stat.S_ISREG(st.st_mode):
        raise OutputError(f"output {path} is not a regular file (a device, pipe or socket); ms4local replaces "
                          "only regular files, even with --force; choose another -o")
    return True


def check_output(path: Path, *, force: bool, needed_bytes: int, inputs: frozenset[FileId] = frozenset()) -> None:
    """Everything about the destination that can fail, checked before the first byte is written.

    `inputs` are the files the run reads (`file_ids`): neither the output nor its `.part` may be one."""
    path = Path(path)
    check_replaceable(part_path(path), inputs=inputs)
    if check_replaceable(path, inputs=inputs) and not force:
        raise OutputError(f"output {path} already exists; pass --force to overwrite it or choose another -o")
    parent = check_directory(path)
    free = shutil.disk_usage(parent).free
    if free < needed_bytes:
        raise OutputError(
            f"not enough disk space in {parent}: the output needs {_gib(needed_bytes)}, {_gib(free)} free; "
            "free some space or choose another -o"
        )


def check_directory(path: Path) -> Path:
    """The directory `path` will be written in, if it exists and is writable."""
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"output directory {parent} does not exist; create it or choose another -o")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"output directory {parent} is not writable; choose another -o")
    return parent


def lock_path(first: Path) -> Path:
    return first.with_name(first.name + ".part.lock")


@contextmanager
def output_lock(first: Path, *, inputs: frozenset[FileId] = frozenset()) -> Iterator[None]:
    """Hold an exclusive lock on `FIRST.part.lock` while an output is written; refuse at once if
    another run holds it.

    Two runs writing the same `.part` file interleave their tensors, and the one that renames last
    reports success over a file that matches neither (issue #18). flock, not the file's presence,
    is the lock: the kernel drops it when its holder dies, even by SIGKILL, so a killed run's
    leftover lock file never blocks the resume. The holder writes its pid into the file for the
    message, and removes the file when it is done (while still holding the lock; a run that locked
    the file just as it was removed sees that the name now points elsewhere and tries again).
    """
    path = lock_path(Path(first))
    if fcntl is None:  # no flock (Windows): no lock, as before
        yield
        return
    check_directory(path)
    check_replaceable(path, inputs=inputs)
    for _ in range(5):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise OutputError(f"cannot create the lock file {path}: {e.strerror or e}; choose another -o") from None
        owned = False
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OutputError(f"the lock file {path} is not a regular file; remove it or choose another -o")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise OutputError(f"cannot lock {path}: {e.strerror or e}; choose another -o") from None
                raise OutputError(f"output {first} is being written by another ms4local run ({_holder(fd)}); "
                                  "wait for it to finish, or stop it, or choose another -o") from None
            if not _names(path, st):
                continue  # locked a file its last holder had just removed: open the name again
            owned = True
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            yield
            return
        except KeyboardInterrupt:
            # Ctrl-C between creating the lock file and owning it: the file is this run's to remove
            # when no other run holds it (a terminal's Ctrl-C right at the start leaves nothing).
            if not owned and stat.S_ISREG(os.fstat(fd).st_mode) and _names(path, os.fstat(fd)):
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    path.unlink(missing_ok=True)
                except OSError:
                    pass
            raise
        finally:
            if owned:
                path.unlink(missing_ok=True)
            os.close(fd)
    raise OutputError(f"cannot lock {path}: it keeps being replaced; is another run starting? choose another -o")


def _names(path: Path, st: os.stat_result) -> bool:
    """Whether `path` still names the file `st` describes (a holder may have just removed it)."""
    try:
        now = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


def _holder(fd: int) -> str:
    """`pid N` of the run holding a lock file, from what it wrote (it may not have written it yet)."""
    for _ in range(20):
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        if text.isdigit():
            return f"pid {text}"
        time.sleep(0.01)
    return "pid unknown"


def layout(path: Path, arch: str, add_metadata: Callable[[gguf.GGUFWriter], None], tensors: list[OutTensor],
           *, split_max_tensors: int = 0, split_max_size: int = 0) -> list[Shard]:
    """The files to write: names (`-00001-of-0000N` when split), tensors per file and header bytes."""
    writer = gguf.GGUFWriter(None, arch, split_max_tensors=split_max_tensors, split_max_size=split_max_size)
    add_metadata(writer)
    for t in tensors:
        # A non-uint8 dtype with raw_dtype set keeps the logical shape as given.
        np_dtype = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}.get(t.type)
        writer.add_tensor_info(t.name, t.shape, np.dtype(np_dtype or np.float32), t.nbytes,
                               raw_dtype=None if np_dtype else t.type)
    n = len(writer.tensors)
    buffers = [io.BytesIO() for _ in range(n)]
    # Write into memory instead of files: the same bytes gguf-py would put at the start of each file.
    writer.path = Path(path)
    writer.fout = buffers  # type: ignore[assignment]
    writer.state = gguf.gguf_writer.WriterState.EMPTY
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    by_name = {t.name: t for t in tensors}
    names = writer.format_shard_names(Path(path))
    shards = []
    for buf, name, infos in zip(buffers, names, writer.tensors):
        head = buf.getvalue()
        shards.append(Shard(Path(name), [by_name[k] for k in infos], head + b"\0" * (_pad(len(head)) - len(head))))
    return shards


def prefetch(items: Iterable[X], depth: int = 2) -> Iterator[X]:
    """Run `items` in a background thread, `depth` items ahead, so producing and consuming overlap.

    Exceptions in the producer are re-raised in the consumer; closing the consumer stops the producer.
    """
    q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def run() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(("item", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(("end", None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put(("error", e))

    thread = threading.Thread(target=run, name="ms4local-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.05)


class _Journal:
    """The resume journal: a fingerprint line, then one line per fsynced tensor."""

    def __init__(self, path: Path, shards: list[Shard], fingerprint: str) -> None:
        self.path = path
        self.shards = shards
        h = hashlib.sha256(fingerprint.encode())
        for s in shards:
            h.update(s.header)
        self.fingerprint = h.hexdigest()
        self.f: io.BufferedWriter | None = None
        self.renaming = False  # a previous run finished every tensor and had started renaming
        self.metas: dict[str, Any] = {}  # per-tensor data the caller stored with each line (e.g. report sums)

    def start(self) -> None:
        self.f = open(self.path, "wb")
        head = {"version": JOURNAL_VERSION, "fingerprint": self.fingerprint, "files": [s.path.name for s in self.shards]}
        self._append(head)

    def reopen(self) -> None:
        self.f = open(self.path, "ab")

    def done(self, shard: int, name: str, end: int, crc: int, meta: Any = None) -> None:
        line = {"shard": shard, "tensor": name, "end": end, "crc": crc}
        if meta is not None:
            line["meta"] = meta
        self._append(line)

    def mark_renaming(self) -> None:
        self._append({"renaming": True})

    def _append(self, obj: dict[str, Any]) -> None:
        assert self.f is not None
        self.f.write((json.dumps(obj) + "\n").encode())
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None

    def completed(self) -> int:
        """How many tensors (in write order) a previous run finished and we can trust; 0 to start over."""
        try:
            lines = self.path.read_bytes().split(b"\n")
            head = json.loads(lines[0])
        except (OSError, ValueError, IndexError):
            return 0
        if head.get("version") != JOURNAL_VERSION or head.get("fingerprint") != self.fingerprint:
            return 0
        entries = []
        for line in lines[1:]:
            try:
                e = json.loads(line)
            except ValueError:
                break  # a torn last line: the tensor before it is the last one we know is on disk
            if e.get("renaming"):
                self.renaming = True
                break
            entries.append(e)
        order = [(i, t, len(s.header) + sum(_pad(u.nbytes) for u in s.tensors[: k + 1]))
                 for i, s in enumerate(self.shards) for k, t in enumerate(s.tensors)]
        n = 0
        for e, (i, t, end) in zip(entries, order):
            if e.get("shard") != i or e.get("tensor") != t.name or e.get("end") != end:
                return 0
            n += 1
        if n == 0:
            return 0
        if self.renaming and n != len(order):
            return 0
        for s in self.shards:
            try:
                with open(self._file_of(s), "rb") as f:
                    if f.read(len(s.header)) != s.header:
                        return 0
            except OSError:
                return 0
        i, t, end = order[n - 1]
        part = self._file_of(self.shards[i])
        try:
            with open(part, "rb") as f:
                f.seek(end - _pad(t.nbytes))
                crc, left = 0, t.nbytes
                while left:
                    block = f.read(min(left, 64 << 20))
                    if not block:
                        return 0
                    crc = zlib.crc32(block, crc)
                    left -= len(block)
        except OSError:
            return 0
        if crc != entries[n - 1].get("crc"):
            return 0
        self.metas = {e["tensor"]: e["meta"] for e in entries[:n] if "meta" in e}
        return n

    def _file_of(self, s: Shard) -> Path:
        """A shard's .part file — or, once renaming had begun, its final file if already renamed."""
        part = part_path(s.path)
        return s.path if self.renaming and not part.exists() and s.path.exists() else part


def write_gguf(
    path: Path,
    arch: str,
    add_metadata: Callable[[gguf.GGUFWriter], None],
    tensors: list[OutTensor],
    data: Callable[[list[OutTensor]], Iterable[tuple[OutTensor, np.ndarray]]],
    progress: Progress | None = None,
    *,
    split_max_tensors: int = 0,
    split_max_size: int = 0,
    fingerprint: str = "",
    force: bool = False,
    tensor_meta: Callable[[str], Any] | None = None,
    restore_meta: Callable[[str, Any], None] | None = None,
    inputs: frozenset[FileId] = frozenset(),
) -> list[Path]:
    """Write a complete GGUF (or split set) at `path`, resuming a killed run of the same plan.

    `data(pending)` yields (tensor, encoded chunk) for the pending tensors, in order. A
    KeyboardInterrupt keeps the `.part` files and journal for the next run; any other failure
    removes them. `tensor_meta(name)` is stored with each finished tensor in the journal and handed
    back through `restore_meta(name, meta)` for the tensors a resumed run skips. The whole write
    holds `output_lock`; no file it writes may be one of `inputs`. Returns the final paths.
    """
    shards = layout(Path(path), arch, add_metadata, tensors,
                    split_max_tensors=split_max_tensors, split_max_size=split_max_size)
    check_replaceable(journal_path(shards[0].path), inputs=inputs)
    with output_lock(shards[0].path, inputs=inputs):
        return _write_locked(shards, path, data, progress, fingerprint=fingerprint, force=force,
                             tensor_meta=tensor_meta, restore_meta=restore_meta, inputs=inputs)


def _write_locked(shards: list[Shard], path: Path,
                  data: Callable[[list[OutTensor]], Iterable[tuple[OutTensor, np.ndarray]]],
                  progress: Progress | None, *, fingerprint: str, force: bool,
                  tensor_meta: Callable[[str], Any] | None, restore_meta: Callable[[str, Any], None] | None,
                  inputs: frozenset[FileId]) -> list[Path]:
    """write_gguf's work, under the output lock: resume or start, write, rename."""
    journal = _Journal(journal_path(shards[0].path), shards, fingerprint)
    done = journal.completed()
    if restore_meta is not None:
        for name, meta in journal.metas.items():
            restore_meta(name, meta)
    if journal.renaming and done:
        # Killed while renaming a complete set: finish the renames, first shard last.
        for s in reversed(shards):
            if part_path(s.path).exists():
                check_replaceable(s.path, inputs=inputs)
                os.replace(part_path(s.path), s.path)
        journal.path.unlink(missing_ok=True)
        _fsync_dir(shards[0].path.parent)
        return [s.path for s in shards]
    existing = sum(part_path(s.path).stat().st_size for s in shards if part_path(s.path).exists()) if done else 0
    for s in shards:
        check_output(s.path, force=force, needed_bytes=max(0, sum(x.size for x in shards) - existing), inputs=inputs)
    order = [(i, t) for i, s in enumerate(shards) for t in s.tensors]
    total = sum(t.nbytes for _, t in order)
    files: list[io.BufferedRandom] = []
    try:
        if done:
            journal.reopen()
            offsets = _resume_offsets(shards, done)
            for s, size in zip(shards, offsets):
                f = open(part_path(s.path), "r+b")
                f.truncate(size)
                f.seek(size)
                files.append(f)
        else:
            journal.path.unlink(missing_ok=True)
            for s in shards:
                f = open(part_path(s.path), "w+b")
                f.write(s.header)
                f.flush()
                os.fsync(f.fileno())
                files.append(f)
            journal.start()
        written = sum(t.nbytes for _, t in order[:done])
        pending = order[done:]
        shard_of = {t.name: i for i, t in pending}
        current: OutTensor | None = None
        got = crc = finished = 0
        for t, chunk in prefetch(data([t for _, t in pending]), depth=2):
            if current is not None and t.name != current.name:
                _finish(files[shard_of[current.name]], journal, shard_of[current.name], current, got, crc,
                        tensor_meta(current.name) if tensor_meta else None)
                got = crc = 0
                finished += 1
            current = t
            view = memoryview(np.ascontiguousarray(chunk)).cast("B")
            files[shard_of[t.name]].write(view)
            crc = zlib.crc32(view, crc)
            got += len(view)
            written += len(view)
            if progress:
                progress(written, total, t.name)
        if current is not None:
            _finish(files[shard_of[current.name]], journal, shard_of[current.name], current, got, crc,
                    tensor_meta(current.name) if tensor_meta else None)
            finished += 1
        if finished != len(pending):
            raise QuantizeError(f"internal error: {finished} of {len(pending)} tensors were produced")
        for f in files:
            f.flush()
            os.fsync(f.fileno())
            f.close()
        journal.mark_renaming()
        journal.close()
        # The first shard last: llama.cpp opens the set from it, so it appears only when all are there.
        for s in reversed(shards):
            os.replace(part_path(s.path), s.path)
        journal.path.unlink(missing_ok=True)
        _fsync_dir(shards[0].path.parent)
        return [s.path for s in shards]
    except KeyboardInterrupt:
        _close(files, journal)
        raise
    except OSError as e:
        _close(files, journal)
        _discard(shards, journal)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutputError(f"disk full while writing {shards[0].path.name}; free some space or choose another -o") from None
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        _close(files, journal)
        _discard(shards, journal)
        raise


def _finish(f: io.BufferedRandom, journal: _Journal, shard: int, t: OutTensor, got: int, crc: int,
            meta: Any = None) -> None:
    if got != t.nbytes:
        raise QuantizeError(f"internal error: {t.name} produced {got} bytes, expected {t.nbytes}")
    f.write(b"\0" * (_pad(got) - got))
    f.flush()
    os.fsync(f.fileno())
    journal.done(shard, t.name, f.tell(), crc, meta)


def _resume_offsets(shards: list[Shard], done: int) -> list[int]:
    """The length each part file must be truncated to after `done` finished tensors."""
    sizes = []
    left = done
    for s in shards:
        k = min(left, len(s.tensors))
        sizes.append(len(s.header) + sum(_pad(t.nbytes) for t in s.tensors[:k]))
        left -= k
    return sizes


def _close(files: list[io.BufferedRandom], journal: _Journal) -> None:
    for f in files:
        try:
            f.close()
        except OSError:
            pass
    journal.close()


def _discard(shards: list[Shard], journal: _Journal) -> None:
    for s in shards:
        part_path(s.path).unlink(missing_ok=True)
    journal.path.unlink(missing_ok=True)


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
