"""Lazy tensor index over a (sharded) safetensors checkpoint.

Only the JSON headers are read up front. Tensor data is read on demand with plain file reads
(not mmap: mapped pages count towards the process's resident set, and the converter promises a
small peak RSS on a 240 GB model), and decoded to float32 here because safetensors' numpy loader
cannot decode BF16 or FP8.

Everything that can be checked before heavy work is checked when the index is built: the index
file against the shards, every shard's header against its size (a truncated download fails here,
not half-way through a conversion).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CheckpointError, MissingTensorError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

# Bytes per element of the safetensors dtypes we decode.
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "I64": 8, "I32": 4, "U8": 1}
FLOAT_DTYPES = ("F32", "F16", "BF16", "F8_E4M3")


def _fp8_e4m3fn_table() -> np.ndarray:
    """The 256 values of FP8 E4M3FN (bias 7, no infinities, 0x7F/0xFF are NaN)."""
    table = np.empty(256, dtype=np.float32)
    for b in range(256):
        sign = -1.0 if b & 0x80 else 1.0
        exp = (b >> 3) & 0xF
        man = b & 0x7
        if exp == 0xF and man == 0x7:
            table[b] = np.nan
        elif exp == 0:
            table[b] = sign * 2.0**-6 * (man / 8.0)
        else:
            table[b] = sign * 2.0 ** (exp - 7) * (1.0 + man / 8.0)
    return table


FP8_E4M3FN = _fp8_e4m3fn_table()


def decode(raw: bytes | bytearray | memoryview, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Decode raw little-endian safetensors bytes to a float32 array of `shape`."""
    if dtype == "F32":
        arr = np.frombuffer(raw, dtype="<f4")
    elif dtype == "F16":
        arr = np.frombuffer(raw, dtype="<f2").astype(np.float32)
    elif dtype == "BF16":
        arr = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    elif dtype == "F8_E4M3":
        arr = FP8_E4M3FN[np.frombuffer(raw, dtype=np.uint8)]
    elif dtype == "F64":
        arr = np.frombuffer(raw, dtype="<f8").astype(np.float32)
    else:
        raise CheckpointError(f"tensor dtype {dtype} is not a float type this converter can read")
    return arr.reshape(shape)


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor lives: file, absolute byte offset, dtype and shape."""

    name: str
    file: Path
    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]


def read_header(path: Path) -> tuple[dict, int]:
    """Read a safetensors header; return it and the offset where tensor data starts."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise CheckpointError(f"{path.name} is truncated or not a safetensors file (no header); re-download it")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 * 1024 * 1024):
                raise CheckpointError(f"{path.name} is truncated or not a safetensors file (header length {n}); re-download it")
            header = json.loads(f.read(n))
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path.name} has a corrupt safetensors header; re-download it") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name} has a corrupt safetensors header; re-download it")
    return header, 8 + n


def _int(value: object) -> int:
    """A JSON integer (not a float, not a bool, not a string): header fields are exact."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(value)
    return value


class SafetensorsSource:
    """All tensors of a checkpoint directory, indexed by their names in the files."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.refs: dict[str, TensorRef] = {}
        files = self._weight_files()
        for path in files:
            self._index_file(path)

    def _weight_files(self) -> list[Path]:
        index_path = self.directory / INDEX_NAME
        if index_path.exists():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
                if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                    raise TypeError
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
                raise CheckpointError(f"{INDEX_NAME} is malformed (no weight_map); re-download it") from None
            self._index_map = weight_map
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (self.directory / s).is_file()]
            if missing:
                raise CheckpointError(
                    f"shard {missing[0]} listed in {INDEX_NAME} is missing"
                    + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                    + "; the download is incomplete"
                )
            return [self.directory / s for s in shards]
        self._index_map = None
        single = self.directory / SINGLE_NAME
        if single.is_file():
            return [single]
        found = sorted(self.directory.glob("*.safetensors"))
        found = [p for p in found if not p.name.startswith("consolidated")]
        if not found:
            raise CheckpointError(f"no safetensors weights in {self.directory} (expected {SINGLE_NAME} or {INDEX_NAME})")
        return found

    def _index_file(self, path: Path) -> None:
        header, data_start = read_header(path)
        size = path.stat().st_size
        spans: list[tuple[int, int, str]] = []
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype = info["dtype"]
                shape = tuple(_int(d) for d in info["shape"])
                start, end = (_int(x) for x in info["data_offsets"])
                if not isinstance(dtype, str):
                    raise TypeError
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path.name}: corrupt header entry for {name}; re-download it") from None
            # Offsets are relative to the end of the header: a negative one reads the header as weights.
            if start < 0 or end < start or any(d < 0 for d in shape):
                raise CheckpointError(f"{path.name}: tensor {name} has impossible data_offsets [{start}, {end}] "
                                      f"or shape {list(shape)}; the file is corrupt, re-download it")
            if dtype in DTYPE_SIZES and end - start != math.prod(shape) * DTYPE_SIZES[dtype]:
                raise CheckpointError(f"{path.name}: header of {name} is inconsistent ({dtype} {list(shape)}); re-download it")
            if data_start + end > size:
                raise CheckpointError(
                    f"{path.name} is truncated ({size} bytes, tensor {name} needs {data_start + end}); re-download it"
                )
            if self._index_map is not None and self._index_map.get(name) != path.name:
                where = self._index_map.get(name)
                raise CheckpointError(
                    f"{INDEX_NAME} does not match the shards: {name} is in {path.name} but the index says "
                    + (f"{where}" if where else "nothing")
                    + "; re-download the checkpoint"
                )
            spans.append((start, end, name))
            self.refs[name] = TensorRef(name, path, data_start + start, end - start, dtype, shape)
        # Two tensors over the same bytes would both convert "fine", to wrong weights.
        spans.sort()
        for (a0, a1, a), (b0, b1, b) in zip(spans, spans[1:]):
            if b0 < a1:
                raise CheckpointError(f"{path.name}: the data of tensors {a} [{a0}, {a1}] and {b} [{b0}, {b1}] overlap; "
                                      "the file is corrupt, re-download it")
        if self._index_map is not None:
            listed = [k for k, v in self._index_map.items() if v == path.name and k not in self.refs]
            if listed:
                raise CheckpointError(
                    f"{INDEX_NAME} does not match the shards: {listed[0]} is listed in {path.name} but not there; "
                    "re-download the checkpoint"
                )

    def __contains__(self, name: str) -> bool:
        return name in self.refs

    def names(self) -> list[str]:
        return list(self.refs)

    def ref(self, name: str) -> TensorRef:
        try:
            return self.refs[name]
        except KeyError:
            raise MissingTensorError(
                f"tensor {name} is missing from the checkpoint; the download may be incomplete"
            ) from None

    def read_raw(self, name: str, start: int = 0, length: int | None = None) -> bytes:
        """Raw bytes of a tensor (or of `length` bytes from `start` within it)."""
        ref = self.ref(name)
        length = ref.nbytes - start if length is None else length
        with open(ref.file, "rb") as f:
            f.seek(ref.offset + start)
            raw = f.read(length)
        if len(raw) != length:
            raise CheckpointError(f"{ref.file.name} is truncated (reading {name}); re-download it")
        return raw

    def read(self, name: str) -> np.ndarray:
        """The whole tensor as float32."""
        ref = self.ref(name)
        return decode(self.read_raw(name), ref.dtype, ref.shape)

    def read_slice(self, name: str, index: int) -> np.ndarray:
        """`tensor[index]` along the first axis as float32, reading only that slice's bytes.

        This is how expert stacks ([E, rows, cols]) are streamed one expert at a time.
        """
        ref = self.ref(name)
        inner = ref.shape[1:]
        step = math.prod(inner) * DTYPE_SIZES[ref.dtype]
        return decode(self.read_raw(name, index * step, step), ref.dtype, inner)

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a 2-D tensor as float32, reading only their bytes."""
        ref = self.ref(name)
        row = math.prod(ref.shape[1:]) * DTYPE_SIZES[ref.dtype]
        return decode(self.read_raw(name, start * row, (stop - start) * row), ref.dtype, (stop - start, *ref.shape[1:]))

    def scalar_or_vector(self, name: str) -> np.ndarray:
        """A small tensor (a scale) as float32, flattened."""
        return self.read(name).reshape(-1)
