"""HF checkpoint → GGUF, the library function behind `ms4local quantize`.

Phases, each failing before the next starts: resolve the source; read and validate config.json;
index the weight files (index vs shards, truncation); map every tensor and check its shape
against the config; read the vocabulary and template; choose each tensor's type; check the
destination (exists, writable, free space). Only then is anything written, one tensor (or one
expert slice) at a time.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from . import arch as arch_registry
from .arch import TensorJob
from .hparams import load_model_config
from .hub import resolve_source
from .policy import Choice, Policy, nbytes, parse_override, parse_type
from .quants import Encoder
from .report import Report, report_path
from .report import save as save_report
from .source import SafetensorsSource
from .vocab import default_chat_template, load_chat_template, load_vocab
from . import mmproj as vision
from .errors import ConfigError, OutputError
from .writer import (OutTensor, Progress, check_output, check_replaceable, file_ids, layout, output_lock, prefetch,
                     write_gguf)

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
    policy: str = "ms4local"
    files: list[Path] = field(default_factory=list)  # the output files (several when split)
    mmproj: Path | None = None  # the vision projector file, when the checkpoint has a vision tower
    mmproj_rows: list[PlanRow] = field(default_factory=list)
    report: Report | None = None  # sampled quantization error (text model), also saved as <out>.quant.json

    @property
    def total_bytes(self) -> int:
        return sum(r.nbytes for r in self.rows)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.total_bytes / max(1, self.n_params)

    @property
    def n_params(self) -> int:
        return count_params(self.rows)


def count_params(rows: list[PlanRow]) -> int:
    return sum(math.prod(r.shape) for r in rows)


def models_dir() -> Path:
    return Path(os.environ.get("MS4LOCAL_MODELS", DEFAULT_MODELS_DIR))


def default_output(name: str, out_type: str) -> Path:
    """GGUF naming convention: models/<Name>-<TYPE>.gguf."""
    return models_dir() / f"{name}-{out_type.upper()}.gguf"


def is_gguf_source(src: str | os.PathLike[str]) -> bool:
    """Whether `convert` re-quantizes `src` as a GGUF (llama.cpp's quantizer: no resume) rather
    than converting a checkpoint (resumable)."""
    return str(src).endswith(".gguf") and Path(src).is_file()


def convert(
    src: str | os.PathLike[str],
    *,
    out: str | os.PathLike[str] | None = None,
    out_type: str = "F16",
    force: bool = False,
    dry_run: bool = False,
    progress: Progress | None = None,
    policy: str = "ms4local",
    tensor_types: list[str] | tuple[str, ...] = (),
    threads: int | None = None,
    split_max_tensors: int = 0,
    split_max_size: int = 0,
    mmproj: bool = True,
    mmproj_type: str = "F16",
    mmproj_only: bool = False,
    quant_report: bool = True,
) -> ConvertResult:
    """Convert the text model of an HF checkpoint to a GGUF file (or only plan it with dry_run).

    One pass: each tensor (or expert slice, or row block) is read, dequantized, quantized by ggml on
    `threads` workers and written, with reading, quantizing and writing overlapped. A killed run of
    the same command resumes (see writer.py)."""
    ft = parse_type(out_type)
    mm_type, mm_file_type = vision.parse_mmproj_type(mmproj_type)
    overrides = [parse_override(t) for t in tensor_types]
    if split_max_tensors < 0 or split_max_size < 0:
        raise OutputError("split limits must be positive")
    if is_gguf_source(src):
        if split_max_tensors or split_max_size:
            raise OutputError("--split-max-size/--split-max-tensors apply to checkpoint conversions; "
                              "re-quantize to one file, or convert from the HF checkpoint to split")
        return _requantize(Path(src), out, ft, policy, overrides, force, dry_run, progress, threads)
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

    tower = module.vision(top, hp)
    if mmproj_only and tower is None:
        raise ConfigError("--mmproj-only: this checkpoint has no vision tower (config.json has no vision_config)")
    mm_jobs: list[TensorJob] = []
    if tower is not None and (mmproj or mmproj_only):
        mm_jobs = tower.plan(source, vocab.tokens)

    chooser = Policy(ft, policy, overrides, jobs, hp.num_hidden_layers, hp.n_routed_experts)
    choices: dict[str, Choice] = {j.name: chooser.choose(j) for j in jobs}
    out_tensors = [OutTensor(j.name, j.shape, choices[j.name].type, nbytes(choices[j.name].type, j.shape)) for j in jobs]
    dtypes = {module.normalize(n): source.ref(n).dtype for n in source.names()}
    rows = [
        PlanRow(j.name, tuple(reversed(j.shape)), "+".join(sorted({dtypes.get(s, "?") for s in j.sources})),
                choices[j.name].type.name, choices[j.name].rule, o.nbytes)
        for j, o in zip(jobs, out_tensors)
    ]
    output = Path(out) if out is not None else default_output(name, ft.name)
    result = ConvertResult(output, ft.name, rows, name, template_source, policy=policy)
    mm_choices = {j.name: vision.choose(j, mm_type) for j in mm_jobs}
    mm_tensors = [OutTensor(j.name, j.shape, mm_choices[j.name].type, nbytes(mm_choices[j.name].type, j.shape))
                  for j in mm_jobs]
    if mm_jobs:
        result.mmproj = output.parent / f"mmproj-{name}-{mmproj_type.upper()}.gguf"
        result.mmproj_rows = [PlanRow(j.name, tuple(reversed(j.shape)), "+".join(sorted({dtypes.get(s, "?") for s in j.sources})),
                                      mm_choices[j.name].type.name, mm_choices[j.name].rule, o.nbytes)
                              for j, o in zip(mm_jobs, mm_tensors)]
        mean, std = vision.image_norm(directory)

    total, shared, routed = module.parameter_counts(jobs)
    size_label = gguf.size_label(total, shared, routed, hp.n_routed_experts)

    def add_metadata(w: gguf.GGUFWriter) -> None:
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(name)
        w.add_basename(name)
        w.add_size_label(size_label)
        module.add_metadata(w, hp)
        w.add_file_type(ft.ftype)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        vocab.add_to(w)
        w.add_chat_template(template)

    if dry_run:
        shards = layout(output, module.arch, add_metadata, out_tensors,
                        split_max_tensors=split_max_tensors, split_max_size=split_max_size)
        result.files = [] if mmproj_only else [s.path for s in shards]
        return result

    if out is None:
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot create the models directory {output.parent}: {e.strerror or e}; "
                              "set MS4LOCAL_MODELS or pass -o") from None
    by_name = {j.name: j for j in jobs + mm_jobs}
    report = Report()
    measure = quant_report
    fingerprint = _fingerprint(source, directory, policy)
    # Whatever the run reads must survive it, --force or not: every file of the checkpoint directory.
    inputs = file_ids(p for p in directory.iterdir())
    if measure and not mmproj_only:
        check_replaceable(report_path(output), inputs=inputs)
    if result.mmproj is not None:
        check_output(result.mmproj, force=force, needed_bytes=0, inputs=inputs)  # fail before hours of text conversion

    with Encoder(threads) as encoder:
        def data(pending: list[OutTensor]):
            floats = prefetch(((t, c) for t in pending for c in by_name[t.name].chunks()), depth=2)
            for t, chunk in floats:
                chunk = chunk.astype(np.float32, copy=False)
                encoded = encoder.encode(chunk, t.type)
                if measure:
                    report.add(t.name, by_name[t.name].role, t.type, chunk, encoded)
                yield t, encoded

        if not mmproj_only:
            result.files = write_gguf(output, module.arch, add_metadata, out_tensors, data, progress,
                                      split_max_tensors=split_max_tensors, split_max_size=split_max_size,
                                      fingerprint=fingerprint, force=force,
                                      tensor_meta=report.state if measure else None,
                                      restore_meta=report.restore if measure else None, inputs=inputs)
            if measure and report.tensors:
                result.report = report
                save_report(report, report_path(output))
        if result.mmproj is not None and tower is not None:
            write_gguf(result.mmproj, tower.arch,
                       lambda w: tower.add_metadata(w, mean, std, mm_file_type, f"{name} vision projector"),
                       mm_tensors, data, progress, fingerprint=fingerprint + f"\nmmproj {mmproj_type}", force=force,
                       inputs=inputs)
    result.written = True
    return result


def _fingerprint(source: SafetensorsSource, directory: Path, policy: str) -> str:
    """What a resumed run must share with the killed one besides the header: the same source files."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("ms4local")
    except PackageNotFoundError:
        ours = "unknown"
    parts = [f"ms4local {ours}", f"policy {policy}"]
    for p in sorted(directory.iterdir()):
        if p.is_file() and (p.suffix in (".safetensors", ".json") or p.name.endswith(".index.json")):
            st = p.stat()
            parts.append(f"{p.name} {st.st_size} {st.st_mtime_ns}")
    return "\n".join(parts)



def _requantize(src: Path, out: str | os.PathLike[str] | None, ft, policy: str, overrides, force: bool,
                dry_run: bool, progress: Progress | None, threads: int | None) -> ConvertResult:
    """GGUF → GGUF through llama.cpp's own quantizer (see requant.py)."""
    from . import requant

    tensors, meta, sources = requant.read_tensors(src)
    choices = requant.plan(tensors, meta, ft, policy, overrides)
    name = str(meta.get("general.basename") or meta.get("general.name") or src.stem)
    rows = [PlanRow(t.name, tuple(reversed(t.shape)), t.type.name, choices[t.name].type.name, choices[t.name].rule,
                    nbytes(choices[t.name].type, t.shape)) for t in tensors]
    output = Path(out) if out is not None else default_output(name, ft.name)
    result = ConvertResult(output, ft.name, rows, name, "kept from the source GGUF", policy=policy, files=[output])
    if dry_run:
        return result
    inputs = file_ids(sources)
    if out is None:
        output.parent.mkdir(parents=True, exist_ok=True)
    check_output(output, force=force, needed_bytes=result.total_bytes, inputs=inputs)
    # llama.cpp reports tensors ("[ i/ n] name", in its own order); the bar is over output bytes.
    size_of = {r.name: r.nbytes for r in rows}
    seen: set[str] = set()
    done = 0

    def by_bytes(i: int, n: int, tensor: str) -> None:
        nonlocal done
        if tensor not in seen:
            seen.add(tensor)
            done += size_of.get(tensor, 0)
        if progress:
            progress(done, result.total_bytes, tensor)

    with output_lock(output, inputs=inputs):
        check_output(output, force=force, needed_bytes=0, inputs=inputs)  # again: another run may have just finished
        requant.requantize(src, output, ft, policy, overrides, choices, threads, by_bytes)
    result.written = True
    return result
