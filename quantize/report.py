"""The quantization report: how far each stored tensor is from its source, measured as it is written.

For every tensor stored in a quantized (block) type, a few evenly spaced rows of each chunk (one expert slice,
one row block) are decoded again with gguf-py's own dequantizers — independent of ggml, which
encoded them — and compared with the float32 source rows. The relative RMS error per tensor and
per class is what a user wants to know after an hour of quantizing ("which part lost most?").
Sampling keeps it to a small fraction of the conversion time (`make bench-quantize` measures it).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants as gguf_quants

from .arch import ATTN, DENSE, EMBED, EXPERTS, NORM, OUTPUT, ROUTER, SHEXP

ROWS_PER_CHUNK = 4
CLASSES = {EXPERTS: "routed experts", SHEXP: "shared expert", ATTN: "attention", DENSE: "dense FFN",
           EMBED: "embeddings/output", OUTPUT: "embeddings/output", NORM: "norms/router", ROUTER: "norms/router"}


@dataclass
class _Acc:
    err2: float = 0.0
    ref2: float = 0.0
    rows: int = 0


@dataclass
class Report:
    """Relative RMS error per tensor (sampled rows), and the classes they belong to."""

    tensors: dict[str, _Acc] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)
    types: dict[str, str] = field(default_factory=dict)

    def add(self, name: str, role: str, t: T, source: np.ndarray, encoded: np.ndarray) -> None:
        if t in (T.F32, T.F16, T.BF16):
            return  # float storage: the report is about quantization
        ne0 = source.shape[-1]
        src = source.reshape(-1, ne0)
        n = src.shape[0]
        pick = np.unique(np.linspace(0, n - 1, min(ROWS_PER_CHUNK, n)).astype(np.int64))
        raw = encoded.view(np.uint8).reshape(n, -1)[pick]
        back = gguf_quants.dequantize(raw, t).reshape(len(pick), ne0).astype(np.float64)
        ref = src[pick].astype(np.float64)
        acc = self.tensors.setdefault(name, _Acc())
        acc.err2 += float(((back - ref) ** 2).sum())
        acc.ref2 += float((ref ** 2).sum())
        acc.rows += len(pick)
        self.roles[name], self.types[name] = role, t.name

    def state(self, name: str) -> list[float] | None:
        """What to keep in the resume journal for one finished tensor."""
        a = self.tensors.get(name)
        return None if a is None else [a.err2, a.ref2, a.rows, self.roles[name], self.types[name]]

    def restore(self, name: str, state: list) -> None:
        """A tensor measured by an earlier, interrupted run of the same conversion."""
        err2, ref2, rows, role, type_name = state
        self.tensors[name] = _Acc(float(err2), float(ref2), int(rows))
        self.roles[name], self.types[name] = role, type_name

    def rel_rms(self, name: str) -> float:
        a = self.tensors[name]
        return (a.err2 / a.ref2) ** 0.5 if a.ref2 > 0 else 0.0

    def by_class(self) -> dict[str, float]:
        """Relative RMS error per class, pooled over the sampled rows of its tensors."""
        pooled: dict[str, _Acc] = {}
        for name, a in self.tensors.items():
            p = pooled.setdefault(CLASSES.get(self.roles[name], "other"), _Acc())
            p.err2, p.ref2, p.rows = p.err2 + a.err2, p.ref2 + a.ref2, p.rows + a.rows
        return {c: (p.err2 / p.ref2) ** 0.5 if p.ref2 > 0 else 0.0 for c, p in pooled.items()}

    def to_json(self) -> dict[str, object]:
        return {
            "metric": "relative RMS error of the stored values vs the source, on sampled rows",
            "rows_per_chunk": ROWS_PER_CHUNK,
            "by_class": self.by_class(),
            "tensors": {n: {"type": self.types[n], "class": CLASSES.get(self.roles[n], "other"),
                            "rel_rms": self.rel_rms(n), "rows": a.rows} for n, a in self.tensors.items()},
        }


def report_path(output: Path) -> Path:
    """`<Name>-<TYPE>.gguf` → `<Name>-<TYPE>.quant.json` (beside the first file of a split set)."""
    return output.with_name(output.name.removesuffix(".gguf") + ".quant.json")


def save(report: Report, path: Path) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(report.to_json(), indent=1))
    os.replace(tmp, path)
