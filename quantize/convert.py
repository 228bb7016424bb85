"""HF checkpoint → GGUF, the library function behind `ms4local quantize`.

Phases, each failing before the next starts: resolve the source; read and validate config.json;
index the weight files (index vs shards, truncation); map every tensor and check its shape
against the config; read the vocabulary and template; choose each tensor's type; check the
destination (exists, writable, free space). Only then is anything written, one tensor (or one
expert slice) at a time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from . import arch as arch_registry
from .arch.mistral4 import TensorJob, normalize, parameter_counts
from .hparams import load_model_config
from .hub import resolve_source
from .policy import Choice, choose, nbytes, parse_type
from .quants import encode
from .source import SafetensorsSource
from .vocab import default_chat_template, load_chat_template, load_vocab
from .errors import OutputError
from .writer import OutTensor, Progress, check_output, write_gguf

DEFAULT_MODELS_DIR = Path("models")


@dataclass(frozen=True)
class PlanRow:
    """One line of the plan: what a tensor becomes and why."""

    name: str
    shape: tuple[int, ...]  # GGUF ne order (fastest first), as llama.cpp prints it
    source_dtype: str
    type: str
    rule: str
    nbytes: int


@dataclass
class ConvertResult:
    output: Path
    out_type: str
    rows: list[PlanRow]
    name: str
    chat_template_source: str
    written: bool = False
    metadata: dict[str, object] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(r.nbytes for r in self.rows)

    @property
    def n_params(self) -> int:
        n = 0
        for r in self.rows:
            p = 1
            for d in r.shape:
                p *= d
            n += p
        return n


def models_dir() -> Path:
    return Path(os.environ.get("MS4LOCAL_MODELS", DEFAULT_MODELS_DIR))


def default_output(name: str, out_type: str) -> Path:
    """GGUF naming convention: models/<Name>-<TYPE>.gguf."""
    return models_dir() / f"{name}-{out_type.upper()}.gguf"


def convert(
    src: str | os.PathLike[str],
    *,
    out: str | os.PathLike[str] | None = None,
    out_type: str = "F16",
    force: bool = False,
    dry_run: bool = False,
    progress: Progress | None = None,
) -> ConvertResult:
    """Convert the text model of an HF checkpoint to a GGUF file (or only plan it with dry_run)."""
    tensor_type, file_type = parse_type(out_type)
    directory, name = resolve_source(src)
    top, text = load_model_config(directory)
    module = arch_registry.detect(top, text)
    hp = module.hparams(top, text)
    source = SafetensorsSource(directory)
    jobs: list[TensorJob] = module.plan(hp, source)
    vocab = load_vocab(directory, hp.vocab_size, {"bos_token_id": hp.bos_token_id, "eos_token_id": hp.eos_token_id,
                                                  "pad_token_id": hp.pad_token_id})
    template = load_chat_template(directory)
    template_source = "checkpoint"
    if template is None:
        template, template_source = default_chat_template(), "ms4local default (checkpoint has none)"

    choices: dict[str, Choice] = {j.name: choose(j, tensor_type) for j in jobs}
    out_tensors = [OutTensor(j.name, j.shape, choices[j.name].type, nbytes(choices[j.name].type, j.shape)) for j in jobs]
    dtypes = {normalize(n): source.ref(n).dtype for n in source.names()}
    rows = [
        PlanRow(j.name, tuple(reversed(j.shape)), "+".join(sorted({dtypes.get(s, "?") for s in j.sources})),
                choices[j.name].type.name, choices[j.name].rule, o.nbytes)
        for j, o in zip(jobs, out_tensors)
    ]
    output = Path(out) if out is not None else default_output(name, out_type)
    result = ConvertResult(output, out_type.upper(), rows, name, template_source)
    if dry_run:
        return result

    if out is None:
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot create the models directory {output.parent}: {e.strerror or e}; "
                              "set MS4LOCAL_MODELS or pass -o") from None
    check_output(output, force=force, needed_bytes=result.total_bytes)

    total, shared, routed = parameter_counts(jobs)
    size_label = gguf.size_label(total, shared, routed, hp.n_routed_experts)

    def add_metadata(w: gguf.GGUFWriter) -> None:
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(name)
        w.add_basename(name)
        w.add_size_label(size_label)
        module.add_metadata(w, hp)
        w.add_file_type(file_type)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        vocab.add_to(w)
        w.add_chat_template(template)

    by_name = {j.name: j for j in jobs}

    def data(t: OutTensor):
        for chunk in by_name[t.name].chunks():
            yield encode(chunk.astype(np.float32, copy=False), t.type)

    write_gguf(output, module.ARCH, add_metadata, out_tensors, data, progress)
    result.written = True
    return result

