"""The GGUF header, read with bounds: the one reader of it that both packages use.

`ms4local info`, the runtime's `--fit` planner and `quantize`'s GGUF → GGUF route all start from
the same facts (metadata, tensor names, types, shapes, sizes), and a file that one of them accepts
the others must accept too. Everything here is checked before gguf-py or llama.cpp sees a file:
gguf-py's reader trusts the counts it reads (a corrupt count is an IndexError, an array of arrays
costs minutes and gigabytes), and a file that is only half there must be called truncated, not
described.

The file is memory-mapped and only the header is touched: long arrays (the 131072-token
vocabulary) are stepped over, not decoded, so a 67 GB file is read in well under a second. Every
count is bounded by the bytes left in the file, so no corrupt value can make a loop run longer
than the file is long. The rules are llama.cpp's own (gguf.cpp): versions 2 and 3, no nested
arrays, at most 4 dimensions, rows a whole number of blocks, tensor data laid out back to back at
the file's alignment, and all of it inside the file.

Imports only the standard library and gguf's constants: the runtime imports this module without
the converter.
"""

from __future__ import annotations

import mmap
import os
import re
import stat
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from .errors import CheckpointError

DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME = 64  # GGML_MAX_NAME, terminating NUL included

SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9
KEEP_ARRAY = 256  # longer arrays (the vocabulary) are stepped over, not decoded

# Split sets: llama.cpp's `NAME-00001-of-00003.gguf`.
SPLIT = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


class GGUFHeaderError(CheckpointError):
    """A file that is not a GGUF, or one whose header is corrupt, truncated or unsupported."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: str  # ggml type name, e.g. Q4_K
    shape: tuple[int, ...]  # ne: innermost first, as GGUF stores it
    nbytes: int


@dataclass(frozen=True)
class Header:
    """What a GGUF (or a whole split set, given its first file) declares."""

    path: Path
    metadata: dict[str, object]  # scalars, strings and short arrays; long arrays are None
    tensors: tuple[TensorInfo, ...]
    files: tuple[Path, ...]  # every file of the set, the first one first


class Cursor:
    """A bounded reader over a mapped file: every read past the end is a GGUFHeaderError."""

    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def truncated(self) -> GGUFHeaderError:
        return GGUFHeaderError(f"{self.path.name} is truncated inside its GGUF header")

    def unpack(self, fmt: str) -> object:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise self.truncated()
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def u32(self) -> int:
        return int(self.unpack("<I"))  # type: ignore[arg-type]

    def u64(self) -> int:
        return int(self.unpack("<Q"))  # type: ignore[arg-type]

    def string(self) -> str:
        n = self.u64()
        if self.pos + n > len(self.buf):
            raise self.truncated()
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", "replace")
        self.pos += n
        return s

    def value(self, vtype: int) -> object:
        """One metadata value; an array longer than KEEP_ARRAY is stepped over and read as None."""
        if vtype in SCALARS:
            return self.unpack(SCALARS[vtype])
        if vtype == STRING:
            return self.string()
        if vtype != ARRAY:
            raise GGUFHeaderError(f"{self.path.name}: unknown GGUF value type {vtype} (corrupt header)")
        itype = self.u32()
        n = self.u64()
        if itype == ARRAY:  # llama.cpp reads no nested arrays; stepping over them could take minutes
            raise GGUFHeaderError(f"{self.path.name}: the GGUF header has an array of arrays, which llama.cpp "
                                  "does not read (corrupt header)")
        if itype not in SCALARS and itype != STRING:
            raise GGUFHeaderError(f"{self.path.name}: unknown GGUF value type {itype} (corrupt header)")
        if itype in SCALARS and self.pos + n * struct.calcsize(SCALARS[itype]) > len(self.buf):
            raise self.truncated()
        if itype == STRING and self.pos + 8 * n > len(self.buf):  # each string takes 8 bytes at least
            raise self.truncated()
        if n <= KEEP_ARRAY:
            return [self.value(itype) for _ in range(n)]
        if itype in SCALARS:
            self.pos += n * struct.calcsize(SCALARS[itype])
        else:
            unpack, buf, pos, end = struct.unpack_from, self.buf, self.pos, len(self.buf)
            for _ in range(n):  # step over each string: 8-byte length, then the bytes
                if pos + 8 > end:
                    raise self.truncated()
                pos += 8 + unpack("<Q", buf, pos)[0]
            if pos > end:
                raise self.truncated()
            self.pos = pos
        return None


def open_mapped(path: Path) -> tuple[object, mmap.mmap]:
    """(file, read-only map) of a GGUF; the caller closes both. A pipe or a device is refused
    before it is opened: opening a FIFO blocks until someone writes to it."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise GGUFHeaderError(f"{path} is not a regular file, not a GGUF file")
        f = open(path, "rb")
    except OSError as e:
        raise GGUFHeaderError(f"cannot open {path}: {e.strerror or e}") from None
    try:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except ValueError:
        f.close()
        raise GGUFHeaderError(f"{path.name} is empty, not a GGUF file") from None
    except OSError as e:
        f.close()
        raise GGUFHeaderError(f"cannot read {path}: {e.strerror or e}") from None
    return f, buf


@contextmanager
def mapped_gguf(path: Path) -> Iterator[Cursor]:
    """A GGUF file memory-mapped for the length of a `with`, its magic checked: a Cursor at offset 0."""
    f, buf = open_mapped(path)
    with f, buf:  # type: ignore[attr-defined]
        if buf[:4] != b"GGUF":
            raise GGUFHeaderError(f"{path.name} is not a GGUF file")
        yield Cursor(buf, path)


def read_file(path: Path) -> tuple[dict[str, object], list[TensorInfo]]:
    """Metadata and tensor infos of one GGUF file, every field checked (see the module docstring)."""
    path = Path(path)
    with mapped_gguf(path) as c:
        buf = c.buf
        c.pos = 4
        version = c.u32()
        if version not in (2, 3):
            raise GGUFHeaderError(f"{path.name}: GGUF version {version} is not supported (big-endian file?)")
        n_tensors, n_kv = c.u64(), c.u64()
        # Each key/value takes 12 bytes at least and each tensor info 24: counts the file cannot hold are corrupt.
        if 12 * n_kv + 24 * n_tensors > len(buf):
            raise GGUFHeaderError(f"{path.name} is truncated or corrupt: its header declares {n_kv} keys and "
                                  f"{n_tensors} tensors, more than {len(buf)} bytes can hold")
        meta: dict[str, object] = {}
        for _ in range(n_kv):
            key = c.string()
            if key in meta:
                raise GGUFHeaderError(f"{path.name}: duplicate GGUF key {key!r} (corrupt header)")
            meta[key] = c.value(c.u32())
        alignment = meta.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 \
                or alignment & (alignment - 1):
            raise GGUFHeaderError(f"{path.name}: general.alignment {alignment!r} is not a power of two (corrupt header)")
        infos: list[tuple[TensorInfo, int]] = []
        names: set[str] = set()
        for _ in range(n_tensors):
            name = c.string()
            if len(name.encode()) >= MAX_NAME:
                raise GGUFHeaderError(f"{path.name}: tensor name {name[:80]!r}… is longer than llama.cpp allows "
                                      "(corrupt header)")
            if name in names:
                raise GGUFHeaderError(f"{path.name}: duplicate tensor {name} (corrupt header)")
            names.add(name)
            n_dims = c.u32()
            if n_dims > MAX_DIMS:
                raise GGUFHeaderError(f"{path.name}: tensor {name} has {n_dims} dimensions, at most {MAX_DIMS} "
                                      "are possible (corrupt header)")
            shape = tuple(c.u64() for _ in range(n_dims))
            ttype = c.u32()
            offset = c.u64()
            try:
                qtype = GGMLQuantizationType(ttype)
                block, size = GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise GGUFHeaderError(f"{path.name}: tensor {name} has ggml type {ttype}, unknown to gguf-py") from None
            n = 1
            for d in shape:
                n *= d
            if n >= 1 << 63 or (shape and shape[0] % block):
                raise GGUFHeaderError(f"{path.name}: tensor {name} has an impossible shape {list(shape)} for "
                                      f"{qtype.name} (corrupt header)")
            infos.append((TensorInfo(name, qtype.name, shape, n // block * size), offset))
        data_start = -(-c.pos // alignment) * alignment
        expected = 0
        for t, offset in infos:
            if offset != expected:  # llama.cpp's rule: data back to back, each tensor padded to the alignment
                raise GGUFHeaderError(f"{path.name}: tensor {t.name} has data offset {offset}, expected {expected} "
                                      "(corrupt header)")
            end = data_start + offset + t.nbytes
            if end > len(buf):
                raise GGUFHeaderError(f"{path.name} is truncated: the data of tensor {t.name} extends past the end of "
                                      f"the file (to byte {end}, the file has {len(buf)}); copy or download it again")
            expected += -(-t.nbytes // alignment) * alignment
        return meta, [t for t, _ in infos]


def split_count(meta: dict[str, object]) -> int:
    count = meta.get("split.count", 1) or 1
    return count if isinstance(count, int) and not isinstance(count, bool) and count > 0 else 1


def read_header(path: str | Path) -> Header:
    """The header of a GGUF, of all files of a split set when given the first; no tensor data is read."""
    path = Path(path)
    meta, tensors = read_file(path)
    count = split_count(meta)
    files = [path]
    if count > 1:
        m = SPLIT.match(path.name)
        if not m:
            raise GGUFHeaderError(f"{path.name} is part 1 of {count} but is not named like NAME-00001-of-{count:05d}.gguf")
        for i in range(2, count + 1):
            part = path.with_name(f"{m['prefix']}-{i:05d}-of-{count:05d}.gguf")
            if not part.is_file():
                raise GGUFHeaderError(f"split part {part.name} is missing next to {path.name}")
            tensors += read_file(part)[1]
            files.append(part)
    return Header(path=path, metadata=meta, tensors=tuple(tensors), files=tuple(files))


def read_vocab(path: Path) -> tuple[list[str], list[int]]:
    """The token texts and token types of a GGUF (`tokenizer.ggml.tokens` / `token_type`), by id.

    `read_file` steps over these arrays; the runtime's tokenizer needs them whole. They sit in the
    header of the first file of a split set. Texts are decoded as UTF-8 with replacement, so a text
    that is not valid UTF-8 cannot pass for a byte-level token.
    """
    path = Path(path)
    with mapped_gguf(path) as c:
        buf = c.buf
        c.pos = 16  # magic, version, tensor count
        n_kv = c.u64()
        tokens: list[str] | None = None
        types: list[int] | None = None
        for _ in range(n_kv):
            key = c.string()
            vtype = c.u32()
            wanted = {"tokenizer.ggml.tokens": STRING, "tokenizer.ggml.token_type": 5}.get(key)  # 5: int32
            if wanted is None:
                c.value(vtype)
                continue
            if vtype != ARRAY or c.u32() != wanted:
                raise GGUFHeaderError(f"{path.name}: {key} is not an array of the expected type")
            n = c.u64()
            if wanted == STRING:
                tokens, pos, unpack, end = [], c.pos, struct.unpack_from, len(buf)
                for _ in range(n):
                    if pos + 8 > end:
                        raise c.truncated()
                    size = unpack("<Q", buf, pos)[0]
                    if pos + 8 + size > end:
                        raise c.truncated()
                    tokens.append(buf[pos + 8:pos + 8 + size].decode("utf-8", "replace"))
                    pos += 8 + size
                c.pos = pos
            else:
                if c.pos + 4 * n > len(buf):
                    raise c.truncated()
                types = list(struct.unpack_from(f"<{n}i", buf, c.pos))
                c.pos += 4 * n
            if tokens is not None and types is not None:
                break
        if tokens is None or types is None or len(tokens) != len(types):
            raise GGUFHeaderError(f"{path.name} has no complete vocabulary (tokenizer.ggml.tokens and token_type)")
        return tokens, types
