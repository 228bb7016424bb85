"""The quantization report (issue #7): errors ordered by bits, and equal to a measurement made here.

The independent measurement: every quantized tensor of the written file is dequantized with
gguf-py (`gguf.quants.dequantize`, all rows, not a sample) and compared with the same tensor of the
F32 conversion of the same checkpoint, which holds the source values exactly (the checkpoint is
BF16) after the converter's own reshaping (fused experts, MLA kv_b split).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from gguf import quants as gq

from quantize import convert
from quantize.report import report_path
from quantize.synth import TinySpec

# ne0 multiples of 256 everywhere but attn_k_b, so Q6_K and Q4_K are stored as such.
SPEC = TinySpec(layers=2, hidden=256, heads=2, q_lora=256, kv_lora=256, nope=32, rope=32, v_dim=64, experts=8,
                top_k=2, moe_inter=256, inter=512, first_dense=1, vocab=2000, dtype="BF16", seed=5)


@pytest.fixture(scope="module")
def files(ckpt, tmp_path_factory):
    src = ckpt(SPEC)
    d = tmp_path_factory.mktemp("report")
    # llama-quantize's own mix: one type for nearly every tensor (ms4local's floors keep attention at Q8_0).
    return {t: convert(src, out=d / f"R-{t}.gguf", out_type=t, policy="llama").output
            for t in ("F32", "Q8_0", "Q6_K", "Q4_K_M")}


def full_errors(path, source) -> dict[str, tuple[str, float]]:
    """name → (type, relative RMS error over every row) for the quantized tensors of `path`."""
    src = {t.name: np.asarray(t.data, dtype=np.float64) for t in GGUFReader(source).tensors}
    out = {}
    for t in GGUFReader(path).tensors:
        q = T(t.tensor_type)
        if q in (T.F32, T.F16, T.BF16):
            continue
        ref = src[t.name].reshape(-1)
        back = gq.dequantize(t.data, q).astype(np.float64).reshape(-1)
        out[t.name] = (q.name, float(np.sqrt(((back - ref) ** 2).sum() / (ref ** 2).sum())))
    return out


def test_report_matches_a_full_dequantize_and_compare(files):
    for out_type in ("Q8_0", "Q6_K", "Q4_K_M"):
        saved = json.loads(report_path(files[out_type]).read_text())
        full = full_errors(files[out_type], files["F32"])
        assert set(saved["tensors"]) == set(full), out_type  # every quantized tensor, and only those
        for name, (qtype, err) in full.items():
            rec = saved["tensors"][name]
            assert rec["type"] == qtype
            # The report samples a few rows of each chunk; on these small tensors that is most rows.
            assert 0.75 * err <= rec["rel_rms"] <= 1.25 * err, (out_type, name, rec["rel_rms"], err)


def test_errors_are_ordered_q8_0_q6_k_q4_k(files):
    rep = {t: json.loads(report_path(files[t]).read_text()) for t in ("Q8_0", "Q6_K", "Q4_K_M")}
    types = {t: {n: r["type"] for n, r in rep[t]["tensors"].items()} for t in rep}
    # The same tensor stored as Q8_0, Q6_K and Q4_K in the three files: each step down loses more.
    same = [n for n in types["Q8_0"] if types["Q8_0"][n] == "Q8_0" and types["Q6_K"].get(n) == "Q6_K"
            and types["Q4_K_M"].get(n) == "Q4_K"]
    assert len(same) >= 8, same
    for n in same:
        e8, e6, e4 = (rep[t]["tensors"][n]["rel_rms"] for t in ("Q8_0", "Q6_K", "Q4_K_M"))
        assert e8 < e6 < e4, (n, e8, e6, e4)
    # Also per class, for the routed experts that dominate the model.
    by = {t: rep[t]["by_class"]["routed experts"] for t in rep}
    assert by["Q8_0"] < by["Q6_K"] < by["Q4_K_M"]
    # Roughly where the formats put them (gaussian weights): Q8_0 ~0.4%, Q6_K ~1.5%, Q4_K ~7%.
    assert by["Q8_0"] < 0.01 and 0.005 < by["Q6_K"] < 0.03 and 0.03 < by["Q4_K_M"] < 0.15
