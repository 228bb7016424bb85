"""What a GGUF model file says, from its header alone: `ModelInfo` (hyper-parameters and every
tensor's size), its vocabulary, and the vision projector that belongs beside it.

The reader is the converter's (`quantize.gguf_header`: memory-mapped, bounded, split sets read
together), so that `info`, `--fit`, the engine and the GGUF → GGUF route accept and refuse the
same files; its errors become ModelLoadError here. Pure Python, no llama.cpp.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from quantize.gguf_header import GGUFHeaderError, TensorInfo, read_header
from quantize.gguf_header import read_vocab as gguf_read_vocab

from .errors import ModelLoadError


@dataclass(frozen=True)
class ModelInfo:
    """What the placement needs from a GGUF: hyper-parameters and every tensor's size."""

    path: Path
    arch: str
    metadata: dict[str, object]  # scalars, strings and short arrays; long arrays are skipped
    tensors: tuple[TensorInfo, ...]

    def key(self, name: str, default: object = None) -> object:
        """An architecture key without its prefix: key("block_count") → mistral4.block_count."""
        return self.metadata.get(f"{self.arch}.{name}", default)

    @property
    def n_layer(self) -> int:
        return int(self.key("block_count", 0))  # type: ignore[arg-type]

    @property
    def is_mla(self) -> bool:
        """Multi-head latent attention (Mistral 4, DeepSeek): the cache holds one latent K row."""
        return self.key("attention.kv_lora_rank") is not None

    @property
    def head_k(self) -> int:
        """Elements of one cached K row per KV head (MLA: kv_lora + rope = 320)."""
        if self.is_mla:
            return int(self.key("attention.kv_lora_rank")) + int(self.key("rope.dimension_count", 0))  # type: ignore[arg-type]
        return int(self.key("attention.key_length") or self._head_dim())  # type: ignore[arg-type]

    @property
    def head_v(self) -> int:
        """Elements of one V row per KV head (MLA: kv_lora = 256, a view into the K row)."""
        if self.is_mla:
            return int(self.key("attention.kv_lora_rank"))  # type: ignore[arg-type]
        return int(self.key("attention.value_length") or self._head_dim())  # type: ignore[arg-type]

    @property
    def head_count_kv(self) -> int:
        v = self.key("attention.head_count_kv", self.key("attention.head_count", 1))
        return int(max(v) if isinstance(v, list) else v)  # type: ignore[arg-type]

    def _head_dim(self) -> int:
        return int(self.key("embedding_length", 0)) // max(1, int(self.key("attention.head_count", 1)))  # type: ignore[arg-type]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def read_vocab(path: str | Path) -> tuple[list[str], list[int]]:
    """The token texts and token types of a GGUF, by id (for ms4local/tokenizer.py); the reader is
    `quantize.gguf_header`'s, its errors become ModelLoadError here."""
    try:
        return gguf_read_vocab(Path(path))
    except GGUFHeaderError as e:
        raise ModelLoadError(str(e)) from None


def read_model(path: str | Path) -> ModelInfo:
    """Header of a GGUF (all files of a split set, given the first); no tensor data is read.

    The reader is the converter's (`quantize.gguf_header`), so that `info`, `--fit` and the
    GGUF → GGUF route accept and refuse the same files; its errors become ModelLoadError here."""
    try:
        header = read_header(path)
    except GGUFHeaderError as e:
        raise ModelLoadError(str(e)) from None
    arch = str(header.metadata.get("general.architecture", "?"))
    _check_types(header.path, arch, header.metadata)
    return ModelInfo(path=header.path, arch=arch, metadata=header.metadata, tensors=header.tensors)


# Keys read as counts or ids (ModelInfo, the planner, `info`): a string or a float there is a corrupt
# file, refused here instead of a ValueError deep in the planner.
_COUNTS = ("block_count", "embedding_length", "context_length", "vocab_size", "expert_count", "expert_used_count",
           "expert_shared_count", "expert_gating_func", "attention.head_count", "attention.head_count_kv",
           "attention.key_length", "attention.value_length", "attention.kv_lora_rank", "rope.dimension_count")
_GLOBAL_COUNTS = ("general.file_type", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                  "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id", "clip.vision.projection_dim")
_STRINGS = ("general.architecture", "general.name", "tokenizer.chat_template", "tokenizer.ggml.model")


def _check_types(path: Path, arch: str, meta: dict[str, object]) -> None:
    def count(x: object) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    for key in [f"{arch}.{k}" for k in _COUNTS] + list(_GLOBAL_COUNTS):
        v = meta.get(key)
        per_layer = key.endswith(".head_count_kv") and isinstance(v, list) and v  # llama.cpp allows one per layer
        if v is not None and not (all(count(x) for x in v) if per_layer else count(v)):  # type: ignore[union-attr]
            raise ModelLoadError(f"{path.name}: {key} is {str(v)[:40]!r}, not a count (corrupt header)")
    for key in _STRINGS:
        v = meta.get(key)
        if v is not None and not isinstance(v, str):
            raise ModelLoadError(f"{path.name}: {key} is {str(v)[:40]!r}, not a string (corrupt header)")


def projection_dim(info: ModelInfo) -> int | None:
    """The embedding size an mmproj GGUF projects images to (None: not a vision projector)."""
    meta = info.metadata
    if info.arch != "clip" or not meta.get("clip.has_vision_encoder"):
        return None
    dim = meta.get("clip.vision.projection_dim")
    return int(dim) if isinstance(dim, int) else None  # type: ignore[arg-type]


def find_mmproj(model_path: str | os.PathLike[str], n_embd: int | None = None) -> Path | None:
    """The vision projector beside a model: an `mmproj-*.gguf` whose projection size equals the
    model's embedding length (`n_embd`, else read from the model's header). Headers only.

    Files that are not readable GGUFs, not vision projectors, or made for another model are
    passed over; among the matches the name sorting first wins (F16 before F32 before Q8_0).
    `info` and the engine both ask here, so `info` names the projector the engine will load.
    """
    path = Path(model_path)
    if n_embd is None:
        try:
            info = read_model(path)
        except ModelLoadError:
            return None
        n_embd = int(info.key("embedding_length", 0) or 0)  # type: ignore[arg-type]
    try:
        candidates = sorted(p for p in path.parent.glob("mmproj-*.gguf") if p.is_file())
    except OSError:
        return None
    for candidate in candidates:
        try:
            dim = projection_dim(read_model(candidate))
        except ModelLoadError:
            continue
        if dim == n_embd:
            return candidate
    return None
