"""What every architecture shares: tensor jobs, roles, the checkpoint reader, and the interface
the generic modules (convert, policy, report, requant) rely on.

An architecture is an `Architecture` subclass registered in `quantize.arch`; a vision tower is a
`VisionTower` its `vision()` hook returns. Generic code reads a model only through these two
classes, the `TensorJob`s they plan and the role names below, so adding a model touches no
generic module.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np

from ..errors import CheckpointError, MissingTensorError, ShapeError
from ..source import FLOAT_DTYPES, SafetensorsSource

# Roles decide the type policy (quantize/policy.py) and the report's classes without parsing names twice.
NORM, ROUTER, EMBED, OUTPUT, ATTN, SHEXP, EXPERTS, DENSE = (
    "norm", "router", "token_embd", "output", "attention", "shared_expert", "routed_experts", "dense_ffn")
# Roles of a vision projector's tensors (quantize/mmproj.py chooses their types).
VISION = "vision"
KEEP = "kept"  # tensors llama.cpp never quantizes in an mmproj (patch embedding, patch merger)

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some checkpoints save; recomputed at run time
ROW_BLOCK_BYTES = 64 << 20  # float32 bytes per chunk of a large 2-D tensor


@dataclass
class TensorJob:
    """One GGUF tensor to write: its name, numpy-order shape, role and how to produce its data.

    `chunks` is a generator of float32 arrays whose concatenation (in order) is the tensor, so
    the writer never holds more than one chunk (an expert slice, a row block) in memory."""

    name: str
    shape: tuple[int, ...]
    role: str
    sources: tuple[str, ...]
    chunks: Callable[[], Iterator[np.ndarray]] = field(repr=False)
    layer: int | None = None

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def normalize(name: str) -> str:
    """Strip the `language_model.` wrapper wherever it is (both transformers 4 and 5 layouts)."""
    return name.replace("language_model.", "")


def parameter_counts(jobs: Sequence[TensorJob]) -> tuple[int, int, int]:
    """(total, shared, routed-expert) parameter counts, for `general.size_label`."""
    total = sum(j.n_elements for j in jobs)
    routed = sum(j.n_elements for j in jobs if j.role == EXPERTS)
    return total, total - routed, routed


def gguf_role(name: str) -> str:
    """The role of a tensor from its llama.cpp GGUF name (a GGUF input has no checkpoint to plan from)."""
    if name == "token_embd.weight":
        return EMBED
    if name == "output.weight":
        return OUTPUT
    if name.endswith("_norm.weight"):
        return NORM
    if "ffn_gate_inp" in name:
        return ROUTER
    if "_exps" in name:
        return EXPERTS
    if "_shexp" in name:
        return SHEXP
    if ".ffn_" in name:
        return DENSE
    return ATTN


class Weights:
    """Reads HF text tensors by normalised name, dequantizing FP8 with its scales.

    `skip`: name prefixes that belong to another part of the checkpoint (a vision tower) and are
    not this reader's to account for."""

    def __init__(self, source: SafetensorsSource, skip: tuple[str, ...] = ()) -> None:
        self.source = source
        self.by_norm: dict[str, str] = {}
        for raw in source.names():
            if raw.startswith(skip) or raw.endswith(IGNORED_SUFFIXES):
                continue
            self.by_norm[normalize(raw)] = raw
        self.used: set[str] = set()
        self._expert_scales: dict[str, np.ndarray | None] = {}

    def has(self, name: str) -> bool:
        return name in self.by_norm

    def ref(self, name: str):
        if name not in self.by_norm:
            raise MissingTensorError(f"tensor {name} is missing from the checkpoint; the download may be incomplete")
        self.used.add(name)
        ref = self.source.ref(self.by_norm[name])
        if ref.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"tensor {name} has dtype {ref.dtype}; expected one of {', '.join(FLOAT_DTYPES)}")
        return ref

    def _scale_name(self, name: str) -> str:
        return name[: -len(".weight")] + ".weight_scale_inv" if name.endswith(".weight") else name + "_scale_inv"

    def _scale(self, name: str) -> np.ndarray | None:
        ref = self.ref(name)
        if ref.dtype != "F8_E4M3":
            return None
        scale_name = self._scale_name(name)
        if scale_name not in self.by_norm:
            raise MissingTensorError(f"FP8 tensor {name} has no {scale_name}; the checkpoint is incomplete")
        self.used.add(scale_name)
        act = name[: -len(".weight")] + ".activation_scale" if name.endswith(".weight") else name + "_activation_scale"
        if act in self.by_norm:
            self.used.add(act)  # activation scales are for FP8 matmuls at run time; dequantized weights drop them
        return self.source.read(self.by_norm[scale_name]).astype(np.float32)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.ref(name).shape

    def expect(self, name: str, shape: tuple[int, ...]) -> None:
        """Fail unless tensor `name` has the shape the config implies."""
        got = self.shape(name)
        if tuple(got) != tuple(shape):
            raise ShapeError(
                f"tensor {name} has shape {list(got)} but config.json implies {list(shape)}; "
                "the config and the weights do not belong together"
            )

    def read(self, name: str) -> np.ndarray:
        """The whole tensor as float32 (FP8 dequantized per tensor or per block)."""
        data = self.source.read(self.by_norm[name])
        scale = self._scale(name)
        if scale is None:
            return data
        if scale.size == 1:
            return data * scale.reshape(())
        if scale.ndim == 2 and data.ndim == 2:  # block-wise scales [ceil(rows/b0), ceil(cols/b1)]
            b0 = -(-data.shape[0] // scale.shape[0])
            b1 = -(-data.shape[1] // scale.shape[1])
            full = np.repeat(np.repeat(scale, b0, axis=0), b1, axis=1)[: data.shape[0], : data.shape[1]]
            return data * full
        raise CheckpointError(f"FP8 scale of {name} has shape {list(scale.shape)}, which this converter cannot apply")

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a 2-D tensor as float32, dequantized like `read`."""
        ref = self.ref(name)
        data = self.source.read_rows(self.by_norm[name], start, stop)
        scale = self._scale(name)
        if scale is None:
            return data
        if scale.size == 1:
            return data * scale.reshape(())
        if scale.ndim == 2:
            b0 = -(-ref.shape[0] // scale.shape[0])
            b1 = -(-ref.shape[1] // scale.shape[1])
            rows = np.repeat(scale[start // b0: -(-stop // b0)], b0, axis=0)[start - start // b0 * b0:][: stop - start]
            return data * np.repeat(rows, b1, axis=1)[:, : ref.shape[1]]
        raise CheckpointError(f"FP8 scale of {name} has shape {list(scale.shape)}, which this converter cannot apply")

    def chunks(self, name: str) -> Iterator[np.ndarray]:
        """A 2-D tensor in row blocks of at most ROW_BLOCK_BYTES of float32 (the 2 GB embeddings of the
        real model are never held whole), or the whole tensor when it is small."""
        shape = self.shape(name)
        row_bytes = 4 * (shape[1] if len(shape) == 2 else 0)
        if len(shape) != 2 or shape[0] * row_bytes <= ROW_BLOCK_BYTES:
            yield self.read(name)
            return
        step = max(1, ROW_BLOCK_BYTES // row_bytes)
        for start in range(0, shape[0], step):
            yield self.read_rows(name, start, min(shape[0], start + step))

    def read_expert(self, name: str, e: int, n_experts: int) -> np.ndarray:
        """Expert `e` of a stacked [E, rows, cols] tensor, dequantized with its per-expert scale."""
        self.ref(name)
        data = self.source.read_slice(self.by_norm[name], e)
        if name not in self._expert_scales:  # read once per stack, not once per expert
            self._expert_scales[name] = self._scale(name)
        scale = self._expert_scales[name]
        if scale is None:
            return data
        if scale.size == 1:
            return data * scale.reshape(())
        if scale.size == n_experts:
            return data * scale.reshape(-1)[e]
        raise CheckpointError(f"FP8 scale of {name} has shape {list(scale.shape)}; expected per-tensor or per-expert")

    def leftovers(self) -> list[str]:
        return sorted(n for n in self.by_norm if n not in self.used)


class TextShape(Protocol):
    """What generic code reads from an architecture's hyper-parameters (its own typed config).

    The type policy needs the layer and expert counts (0 experts: a dense model), the vocabulary
    reader the vocabulary size and special token ids."""

    vocab_size: int
    num_hidden_layers: int
    n_routed_experts: int
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None


class VisionTower(ABC):
    """A vision encoder + projector written as an mmproj GGUF beside the text model."""

    arch = "clip"  # general.architecture of every mmproj llama.cpp's libmtmd loads

    @abstractmethod
    def plan(self, source: SafetensorsSource, tokens: Sequence[str]) -> list[TensorJob]:
        """Every mmproj tensor, shapes checked against the config; `tokens` is the text vocabulary."""

    @abstractmethod
    def add_metadata(self, writer: Any, mean: tuple[float, ...], std: tuple[float, ...], file_type: int,
                     name: str) -> None:
        """The mmproj's metadata (general.* and clip.* keys); mean/std normalise the image."""


class Architecture(ABC):
    """One text architecture: its config, its tensors and its GGUF metadata.

    Subclass it, set the three class attributes, and `quantize.arch.register()` an instance;
    `convert`, `policy`, `report` and `requant` then handle it without a change."""

    arch: str  # GGUF general.architecture
    model_types: tuple[str, ...]  # HF (text) config model_type values this converts
    description: str  # one line for the "supported:" list of an unknown model's error

    @abstractmethod
    def hparams(self, top: dict[str, Any], text: dict[str, Any]) -> TextShape:
        """The typed, validated hyper-parameters from config.json (top level and text config)."""

    @abstractmethod
    def plan(self, hp: Any, source: SafetensorsSource) -> list[TensorJob]:
        """Every text tensor of the GGUF, in llama.cpp's order, with shapes checked against the config;
        a checkpoint tensor the plan does not use must make it fail."""

    @abstractmethod
    def add_metadata(self, writer: Any, hp: Any) -> None:
        """The `<arch>.*` keys (general.*, vocabulary and template are written by the converter)."""

    def vision(self, top: dict[str, Any], hp: Any) -> VisionTower | None:
        """The vision tower the checkpoint declares, or None (text-only: the default)."""
        return None

    def normalize(self, name: str) -> str:
        """A checkpoint tensor name as the plan's `sources` spell it."""
        return normalize(name)

    def role(self, gguf_name: str) -> str:
        """The role of a tensor of a GGUF of this architecture (for GGUF → GGUF re-quantization)."""
        return gguf_role(gguf_name)

    def parameter_counts(self, jobs: Sequence[TensorJob]) -> tuple[int, int, int]:
        """(total, shared, routed-expert) parameter counts, for `general.size_label`."""
        return parameter_counts(jobs)
