"""Peak RSS of converting a >2 GB checkpoint stays under 1 GB (measured in a subprocess)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

# One expert stack of 64 × 2048 × 1024 F32 = 512 MiB; three layers ≈ 2.3 GB of weights in total.
SPEC = dict(vocab=2000, layers=3, hidden=1024, experts=64, moe_inter=1024, q_lora=256, kv_lora=128,
            nope=32, rope=32, v_dim=64, heads=8, dtype="F32")


@pytest.mark.slow
def test_convert_peak_rss_under_1gb(tmp_path):
    if shutil.disk_usage(tmp_path).free < 6 * 2**30:
        pytest.fail("need 6 GiB free in the temp dir for the memory test")
    src, out = tmp_path / "big", tmp_path / "big-F16.gguf"
    gen = f"from quantize.synth import make_checkpoint; make_checkpoint({str(src)!r}, **{SPEC!r})"
    subprocess.run([sys.executable, "-c", gen], check=True, cwd=ROOT)
    size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    assert size > 2 * 10**9
    code = (
        "import resource, quantize\n"
        f"quantize.convert({str(src)!r}, out={str(out)!r}, out_type='F16')\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    rss_kib = int(subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True,
                                 text=True).stdout.split()[-1])
    print(f"checkpoint {size / 2**30:.2f} GiB → F16; converter peak RSS {rss_kib / 1024:.0f} MiB")
    assert rss_kib < 1024 * 1024
    assert abs(out.stat().st_size - size / 2) < 0.02 * size
