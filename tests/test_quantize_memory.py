"""Peak memory of quantizing: Q8_0 and Q4_K_M of a checkpoint whose gate_up expert stack alone is
over 2 GiB stay under 2 GB of RSS.

The promise is the writer's "a few tensors, one expert slice of a stack at a time" (house style,
habit 3), now with ggml's quantizer and its worker threads in the loop. The checkpoint is F32 so
that one stack passes 2 GiB on disk with the fewest elements to quantize (Q4_K runs at ~12 M
weights/s per core): 130 experts × 2048 × 2048 F32 = 2.03 GiB, and decoded to float32 it is the
same 2.03 GiB, so a converter that materialised one stack would fail the 2 GB limit on its own.

The peak is `ru_maxrss` of a process forked from a small one that does nothing but the conversion,
as in test_memory.py (helpers/peak_rss.py explains why an exec'd child would report pytest's peak
instead).
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from helpers import ROOT
from helpers.peak_rss import CONVERT  # the forked, rusage-clean converter run; argv: src out type
from quantize.quants import encode
from quantize.source import SafetensorsSource
from quantize.synth import TinySpec, config_json, text_tensors, tokenizer_json, v15_tekken, values

SPEC = TinySpec(layers=1, first_dense=0, hidden=2048, heads=8, q_lora=256, kv_lora=256, nope=32, rope=32, v_dim=64,
                experts=130, top_k=4, moe_inter=1024, vocab=2000, dtype="F32")
LIMIT_BYTES = 2 * 10**9  # "under 2 GB"
HEADROOM = 2**30


def stack_bytes(spec: TinySpec) -> int:
    return 4 * spec.experts * 2 * spec.moe_inter * spec.hidden


def write_checkpoint(directory: Path, spec: TinySpec) -> Path:
    """`quantize.synth.make_checkpoint`'s layout and files, but expert stacks are generated and
    written one expert at a time (make_checkpoint builds each tensor whole: three copies of a 2 GiB
    stack would cost pytest ~6 GB)."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config_json(spec), indent=2))
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer_json(v15_tekken(spec.vocab)), ensure_ascii=False))
    tensors = [("language_model." + name, shape, kind) for name, shape, kind in text_tensors(spec)]
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, _ in tensors:
        n = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(directory / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, kind in tensors:
            if kind != "experts":
                f.write(values(spec, name, shape, kind).astype("<f4").tobytes())
                continue
            scale = np.float32(1 / math.sqrt(shape[-1]))
            for e in range(shape[0]):
                block = np.random.default_rng([spec.seed, zlib.crc32(name.encode()), e]).standard_normal(
                    shape[1:], dtype=np.float32)
                block *= scale
                f.write(block)
    return directory


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantize-memory")
    on_disk = sum(4 * math.prod(shape) for _, shape, _ in text_tensors(SPEC))
    need = on_disk + on_disk // 3 + HEADROOM  # checkpoint + Q8_0 file (8.5/32 of it) + headroom
    free = shutil.disk_usage(root).free
    if free < need:
        pytest.fail(f"this test needs {need / 2**30:.1f} GiB free in {root}, only {free / 2**30:.1f} GiB is; "
                    "free some space or point --basetemp elsewhere")
    t0 = time.perf_counter()
    src = write_checkpoint(root / "Big-Mistral4", SPEC)
    print(f"\ngenerated a {on_disk / 2**30:.2f} GiB F32 checkpoint in {time.perf_counter() - t0:.1f} s")
    try:
        yield src
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("out_type, stack_type", [("Q8_0", T.Q8_0), ("Q4_K_M", T.Q4_K)], ids=["Q8_0", "Q4_K_M"])
def test_quantize_peak_rss_under_2gb(big_checkpoint, out_type, stack_type):
    src = big_checkpoint
    stack = stack_bytes(SPEC)
    assert stack > 2**31, "the expert stack is not over 2 GiB"
    out = src.parent / f"Big-Mistral4-{out_type}.gguf"

    p = subprocess.run([sys.executable, "-c", CONVERT, str(src), str(out), out_type], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    stats = json.loads(p.stdout.strip().splitlines()[-1])
    peak = stats["peak_kib"] * 1024
    grew = peak - stats["import_kib"] * 1024
    print(f"{out_type}: gate_up stack {stack / 2**30:.2f} GiB F32, quantized in {stats['seconds']:.1f} s; "
          f"peak RSS {peak / 2**20:.0f} MiB (after imports {stats['import_kib'] / 1024:.0f} MiB, "
          f"grew {grew / 2**20:.0f} MiB)")
    assert peak < LIMIT_BYTES, f"peak RSS {peak / 2**20:.0f} MiB is not under 2 GB"
    # Sharper: the conversion holds a few expert slices (16 MiB of float32 each), not a stack;
    # a quarter of a stack leaves room for the thread pool, prefetch queues and allocator slack.
    assert grew < stack / 4, f"the conversion grew RSS by {grew / 2**20:.0f} MiB: a whole expert stack in memory?"

    assert stats["written"]
    size = out.stat().st_size
    assert stats["total_bytes"] < size < stats["total_bytes"] + 2**20
    assert not list(src.parent.glob("*.part*"))

    # Streamed in place: the last expert of the stack (its source bytes lie past 2**31) is exactly
    # what ggml makes of that source slice.
    name = "language_model.model.layers.0.mlp.experts.gate_up_proj"
    source = SafetensorsSource(src)
    ref = source.ref(name)
    assert ref.offset + ref.nbytes * (SPEC.experts - 1) // SPEC.experts > 2**31
    want = encode(source.read_slice(name, SPEC.experts - 1), stack_type)
    reader = gguf.GGUFReader(out)
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_gate_up_exps.weight")
    assert t.tensor_type == stack_type
    got = np.asarray(t.data).reshape(SPEC.experts, -1)[-1]
    assert got.tobytes() == want.tobytes()
    del reader, t, got
    out.unlink()
    for extra in src.parent.glob(f"Big-Mistral4-{out_type}.*"):
        extra.unlink()
