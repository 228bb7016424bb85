"""Per-tensor output type: what each GGUF tensor is stored as, and the rule that decided it.

The spine writes F32, F16, BF16 and Q8_0 files. Rules are data (name, predicate, outcome) so that
the MoE-aware K-quant policies and `--tensor-type` overrides slot in as more rules, and
`--dry-run` can say *why* every tensor got its type.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from .arch.mistral4 import NORM, ROUTER, TensorJob
from .errors import UnsupportedTypeError

# Output types → (tensor type, general.file_type). File-type numbers are llama.cpp's LLAMA_FTYPE_*.
OUTPUT_TYPES: dict[str, tuple[T, int]] = {
    "F32": (T.F32, 0),
    "F16": (T.F16, 1),
    "BF16": (T.BF16, 32),
    "Q8_0": (T.Q8_0, 7),
}

# llama.cpp's fallback chain when ne0 is not a multiple of the block size (spec §7.4).
FALLBACK: dict[T, T] = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0, T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0}


@dataclass(frozen=True)
class Choice:
    type: T
    rule: str


def parse_type(name: str) -> tuple[T, int]:
    """The tensor type and file type of an output type name, or a clear error."""
    key = name.upper()
    if key not in OUTPUT_TYPES:
        raise UnsupportedTypeError(f"unsupported --type {name}; choose one of {', '.join(OUTPUT_TYPES)}")
    return OUTPUT_TYPES[key]


def block_size(t: T) -> int:
    return GGML_QUANT_SIZES[t][0]


def nbytes(t: T, shape: tuple[int, ...]) -> int:
    block, size = GGML_QUANT_SIZES[t]
    n = 1
    for d in shape:
        n *= d
    return n // block * size


def fits(t: T, shape: tuple[int, ...]) -> bool:
    return shape[-1] % block_size(t) == 0


def choose(job: TensorJob, out_type: T) -> Choice:
    """The type of one tensor for a requested output type."""
    if job.role in (NORM, ROUTER) or len(job.shape) == 1:
        # Norms are tiny and the router decides which experts run: both stay exact (llama.cpp does the same).
        return Choice(T.F32, "norms, router and 1-D tensors stay F32")
    t, rule = out_type, "requested type"
    while not fits(t, job.shape):
        ne0 = job.shape[-1]
        nxt = FALLBACK.get(t, T.F16)
        if nxt == t or t in (T.F16, T.F32, T.BF16):
            break
        rule = f"ne0 {ne0} not a multiple of {block_size(t)}: {t.name} → {nxt.name}"
        t = nxt
    return Choice(t, rule)
