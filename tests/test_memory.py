"""Peak memory of a conversion: a >2 GB checkpoint converts to F16 in well under 1 GB of RSS.

The converter promises "a few tensors" of memory (one expert slice of a stack, not the model):
safetensors headers are indexed lazily, tensors are read with plain reads rather than mmap
(mapped pages would count towards RSS), and the writer streams each expert slice to disk. The
checkpoint below is F32 with three 480 MiB expert stacks, so holding even one whole stack as
float32 plus its F16 copy would already cost ~720 MiB on top of the interpreter and imports.

The peak is `ru_maxrss` of a fresh process that does nothing but the conversion, so pytest's own
memory (and the generation of the checkpoint) does not count; helpers/peak_rss.py says why it forks.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time

import gguf
import numpy as np
import pytest

from helpers import ROOT
from helpers.peak_rss import CONVERT
from quantize.source import SafetensorsSource
from quantize.synth import TinySpec, make_checkpoint, text_tensors

# 60 experts × (2·1024) × 1024 F32 = 480 MiB per gate_up stack, 240 MiB per down stack; three MoE
# layers ≈ 2.27 GB (> 2 GiB, so tensor offsets past 2**31 are read too). A 2,000-token vocabulary
# keeps the embeddings and the tokenizer out of the picture.
SPEC = TinySpec(vocab=2000, layers=3, hidden=1024, heads=8, q_lora=256, kv_lora=128, nope=32, rope=32, v_dim=64,
                experts=60, top_k=4, moe_inter=1024, dtype="F32")
LIMIT_BYTES = 10**9  # "under 1 GB"
HEADROOM = 2**30  # free space we keep beyond the checkpoint and the output


def f32_bytes(spec: TinySpec) -> int:
    return sum(4 * math.prod(shape) for _, shape, _ in text_tensors(spec))


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    """The >2 GB checkpoint, generated once for this module and deleted afterwards."""
    root = tmp_path_factory.mktemp("memory")
    need = f32_bytes(SPEC) * 3 // 2 + HEADROOM  # checkpoint + F16 output + headroom
    free = shutil.disk_usage(root).free
    if free < need:
        pytest.fail(f"the memory test needs {need / 2**30:.1f} GiB free in {root} (checkpoint + GGUF), "
                    f"only {free / 2**30:.1f} GiB free; free some space or point --basetemp elsewhere")
    t0 = time.perf_counter()
    src = make_checkpoint(root / "Big-Mistral4", SPEC)
    print(f"\ngenerated {f32_bytes(SPEC) / 2**30:.2f} GiB F32 checkpoint in {time.perf_counter() - t0:.1f} s")
    try:
        yield src
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_convert_peak_rss_under_1gb(big_checkpoint, tmp_path_factory):
    src = big_checkpoint
    on_disk = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    stack = 4 * SPEC.experts * 2 * SPEC.moe_inter * SPEC.hidden
    assert on_disk > 2 * 10**9 and stack >= 400 * 2**20, "the checkpoint is not as big as this test needs"
    out = src.parent / "Big-Mistral4-F16.gguf"

    p = subprocess.run([sys.executable, "-c", CONVERT, str(src), str(out), "F16"], cwd=ROOT, capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stderr
    stats = json.loads(p.stdout.strip().splitlines()[-1])
    peak = stats["peak_kib"] * 1024
    print(f"checkpoint {on_disk / 2**30:.2f} GiB F32 (expert stack {stack / 2**20:.0f} MiB) → F16 in "
          f"{stats['seconds']:.1f} s; converter peak RSS {peak / 2**20:.0f} MiB "
          f"(after imports {stats['import_kib'] / 1024:.0f} MiB)")
    assert peak < LIMIT_BYTES, f"peak RSS {peak / 2**20:.0f} MiB is not under 1 GB"
    # Sharper than the 1 GB promise: the conversion itself must not hold even one whole expert
    # stack (it streams a slice at a time); a quarter of a stack leaves room for the largest plain
    # tensor and allocator slack.
    grew = peak - stats["import_kib"] * 1024
    assert grew < stack / 4, f"the conversion grew RSS by {grew / 2**20:.0f} MiB: a whole expert stack in memory?"

    # The file is complete: the planned tensor bytes plus a small header, about half the F32 data
    # (norms and routers stay F32, a few hundred KiB), and no partial file is left.
    assert stats["written"]
    size = out.stat().st_size
    assert stats["total_bytes"] < size < stats["total_bytes"] + 2**20
    assert abs(size - on_disk / 2) < 0.005 * on_disk
    assert not list(src.parent.glob("*.part"))

    # Streaming kept the data in place: the last expert of the last stack (source offset > 2**31)
    # is the F16 rounding of the source's values.
    name = f"language_model.model.layers.{SPEC.layers - 1}.mlp.experts.down_proj"
    source = SafetensorsSource(src)
    ref = source.ref(name)
    assert ref.offset + ref.nbytes * (SPEC.experts - 1) // SPEC.experts > 2**31
    want = source.read_slice(name, SPEC.experts - 1).astype(np.float16)
    reader = gguf.GGUFReader(out)
    t = next(t for t in reader.tensors if t.name == f"blk.{SPEC.layers - 1}.ffn_down_exps.weight")
    assert t.tensor_type == gguf.GGMLQuantizationType.F16
    got = np.asarray(t.data).reshape(SPEC.experts, SPEC.hidden, SPEC.moe_inter)[-1]
    np.testing.assert_array_equal(got, want)
    del reader, t, got
    out.unlink()
