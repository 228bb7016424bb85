"""Third-party GGUFs made right at load: what llama.cpp's own converter leaves out (spec §3.3, §6.4).

Most people run a GGUF someone published, made by llama.cpp's `convert_hf_to_gguf.py`. For Mistral
Small 4 that converter writes no Llama-4 query temperature keys, so llama.cpp skips the
position-dependent query scaling and the model is wrong past 8,192 tokens; and from the HF
checkpoint it writes an mmproj without `v.token_embd.img_break`, which libmtmd refuses to load.
Both are repaired here without touching the file (a downloaded file is a shared blob in the HF
cache):

- the keys through llama.cpp's `kv_overrides` — β = 0.1 (Mistral Small 4's published
  `llama_4_scaling_beta`, not stored in such a file) and the file's own
  `rope.scaling.original_context_length` — always both, since llama.cpp aborts on a scale
  without a length;
- the projector as a copy with the missing row — the text model's own `[IMG_BREAK]` embedding,
  dequantized from its `token_embd` — written once under ms4local's cache directory (a temporary
  name renamed when complete) and reused from then on.

One override here is not a repair but follows from the same keys (`unit_temperature`): below
`temperature_length` the query factor is exactly 1, so a context that never reaches that length
loads with the scale set to 0, which leaves the math unchanged and lets llama.cpp reuse its decode
graph from token to token.

What cannot be repaired — another model family, a key set this llama.cpp does not read — is
said in one line by `load_failure`, naming what the file is rather than only llama.cpp's reason.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelLoadError
from ..gguf_model import ModelInfo
from ..system import cache_root

LLAMA4_BETA = 0.1  # Mistral Small 4's llama_4_scaling_beta (config.json), spec §3.3
TEMPERATURE_ARCHS = ("mistral4",)  # architectures whose published checkpoints use the Llama-4 scaling
IMG_BREAK_TENSOR = "v.token_embd.img_break"


# Architectures Mistral Small 4 is published under: mistral4 (HF-path converters, ours), deepseek2
# (llama.cpp's --mistral-format path, spec §7.5 and §9).
MISTRAL4_ARCHS = ("mistral4", "deepseek2")


def load_failure(name: str, info: ModelInfo | None, reason: str) -> str:
    """The one line for a GGUF llama.cpp refused to load: what the file is, then llama.cpp's reason."""
    if info is None:
        return f"llama.cpp could not load {name}: {reason}"
    title = info.metadata.get("general.name")
    what = f"a {info.arch!r} model" + (f" ({title})" if title else "")
    if info.arch not in MISTRAL4_ARCHS:
        return f"{name} is {what}, not Mistral Small 4 (mistral4), and llama.cpp could not load it: {reason}"
    if "key not found" in reason:
        return (f"{name} is {what} without a key this llama.cpp reads ({reason.rsplit(':', 1)[-1].strip()}): written by "
                f"an older or other converter; convert the checkpoint again with `ms4local quantize`")
    return f"llama.cpp could not load {name} ({what}): {reason}"


def _temperature_keys(arch: str) -> tuple[str, str]:
    """The names of an architecture's query temperature keys: (scale β, length L)."""
    return f"{arch}.attention.temperature_scale", f"{arch}.attention.temperature_length"


def temperature_overrides(info: ModelInfo) -> dict[str, float | int]:
    """The kv_overrides a model needs for its query temperature ({} when it needs none or cannot
    get them: no original context length to take the length from)."""
    if info.arch not in TEMPERATURE_ARCHS:
        return {}
    scale_key, length_key = _temperature_keys(info.arch)
    scale, length = info.metadata.get(scale_key), info.metadata.get(length_key)
    original = info.key("rope.scaling.original_context_length")
    if scale is not None and length:
        return {}
    if not isinstance(original, int) or original <= 0:
        return {}
    out: dict[str, float | int] = {length_key: original}
    if scale is None:
        out[scale_key] = LLAMA4_BETA
    return out


def unit_temperature(info: ModelInfo, fixes: dict[str, float | int], n_ctx: int,
                     n_seq: int = 1) -> dict[str, float | int]:
    """The override that turns the query temperature off where it is exactly 1 ({} elsewhere).

    llama.cpp multiplies the queries by `1 + β·ln(floor(pos/L) + 1)` (offset 0 for mistral4 and
    deepseek2: `llama_model_deepseek2::load_arch_hparams`), which is 1.0 exactly for every
    position below L = `temperature_length`. The multiply is a graph input whose class has no
    `can_reuse` in this llama.cpp (`llm_graph_input_attn_temp`), so while β ≠ 0 every decode
    step rebuilds and re-allocates the whole graph — llama-server and llama-bench included. When
    no position can reach L, β = 0 gives bit-identical logits and a reused graph: 3–4% more
    decode t/s on the bench model (bench/results/llamacpp.md). `fixes` are the repair's
    overrides, which take the place of the file's keys.

    A sequence's positions stay below its cells: llama.cpp rounds n_ctx up to a multiple of 256,
    and with `n_seq` sequences (`serve --parallel`, separate KV cells each) gives each n_ctx/n_seq
    rounded up to a multiple of 256 again (llama_context's constructor).
    """
    if info.arch not in MISTRAL4_ARCHS:
        return {}
    scale_key, length_key = _temperature_keys(info.arch)
    scale = fixes.get(scale_key, info.metadata.get(scale_key))
    length = fixes.get(length_key, info.metadata.get(length_key))
    if not scale or not isinstance(length, int) or length <= 0:
        return {}

    def pad(n: int) -> int:
        return -(-n // 256) * 256

    return {scale_key: 0.0} if pad(pad(n_ctx) // n_seq) <= length else {}


def describe(overrides: dict[str, float | int], name: str) -> str:
    """The one line that announces a key repair."""
    keys = ", ".join(f"{k.split('.', 1)[1]} = {v}" for k, v in sorted(overrides.items()))
    return (f"{name} was made without the Llama-4 query temperature keys (llama.cpp's converter omits them), "
            f"so answers past the original context would be wrong; set at load: {keys} (--no-repair to keep "
            "the file as it is)")


def has_img_break(path: Path) -> bool:
    """Whether an mmproj holds the `[IMG_BREAK]` row libmtmd requires (read from the header)."""
    from ..gguf_model import read_model

    return any(t.name == IMG_BREAK_TENSOR for t in read_model(path).tensors)


def cache_dir() -> Path:
    """Where repaired copies go: `repaired/` in ms4local's own cache (system.cache_root)."""
    return cache_root() / "repaired"


def repaired_mmproj(mmproj: Path, model: ModelInfo, img_break_id: int) -> Path:
    """A usable copy of `mmproj` with the text model's `[IMG_BREAK]` row added, made once.

    The copy is named after the two files it comes from (their resolved paths, sizes and mtimes),
    so a changed file is repaired again and an unchanged one is reused without reading it.
    """
    src = mmproj.resolve()
    st, mt = src.stat(), model.path.resolve().stat()
    key = f"{src}|{st.st_size}|{st.st_mtime_ns}|{model.path.resolve()}|{mt.st_size}|{mt.st_mtime_ns}|{img_break_id}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    out_dir = cache_dir()
    out = out_dir / f"{mmproj.stem}-img_break-{digest}.gguf"
    if out.is_file():
        return out
    row = img_break_row_of(model, img_break_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".{os.getpid()}.part")
    try:
        _copy_with_tensor(src, tmp, IMG_BREAK_TENSOR, row)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def img_break_row_of(model: ModelInfo, token: int) -> np.ndarray:
    """Row `token` of the text model's `token_embd.weight`, dequantized to float32 (gguf-py's
    dequantizers; only the one row's blocks are read from the memory-mapped file)."""
    import gguf

    for path in _split_files(model.path):
        try:
            reader = gguf.GGUFReader(path)
        except Exception as e:  # gguf raises ValueError/struct errors on damaged files
            raise ModelLoadError(f"cannot read {path.name}: {e}") from None
        for t in reader.tensors:
            if t.name != "token_embd.weight":
                continue
            n_embd = int(t.shape[0])
            if not 0 <= token < int(t.shape[1]):
                raise ModelLoadError(f"{path.name}: token {token} is outside token_embd ({int(t.shape[1])} rows)")
            row = np.asarray(t.data[token])
            values = gguf.quants.dequantize(row, t.tensor_type) if t.tensor_type not in (
                gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) else row
            return np.asarray(values, dtype=np.float32).reshape(-1)[:n_embd].copy()
    raise ModelLoadError(f"{model.path.name} has no token_embd.weight to take the [IMG_BREAK] row from")


_SPLIT = re.compile(r"^(.*)-(\d{5})-of-(\d{5})\.gguf$")


def _split_files(path: Path) -> list[Path]:
    m = _SPLIT.match(path.name)
    if not m:
        return [path]
    n = int(m.group(3))
    return [path.with_name(f"{m.group(1)}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]


def _copy_with_tensor(src: Path, dst: Path, name: str, data: np.ndarray) -> None:
    """Copy a GGUF's metadata and tensors to `dst` with one F32 tensor added (gguf-py's reader and
    writer; tensor data streamed from the memory map)."""
    import gguf

    reader = gguf.GGUFReader(src)
    arch = reader.fields.get(gguf.Keys.General.ARCHITECTURE)
    writer = gguf.GGUFWriter(dst, arch.contents() if arch is not None else "clip", endianess=reader.endianess)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    tensors: list[Any] = list(reader.tensors)
    for t in tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    row = np.ascontiguousarray(data, dtype=np.float32)
    writer.add_tensor_info(name, row.shape, row.dtype, row.nbytes, gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in tensors:
        writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
    writer.write_tensor_data(row, tensor_endianess=reader.endianess)
    writer.close()
