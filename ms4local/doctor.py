"""What this installation can run, checked rather than assumed: `ms4local doctor` as a library.

The llama.cpp inside llama-cpp-python decides everything that matters here: which backends
were compiled in (a pip install without CMAKE_ARGS is CPU-only), which devices they see, and
whether it knows the `mistral4` architecture at all. The last is checked the only way that
cannot be fooled: a tiny Mistral-4-shaped GGUF is generated, loaded and run.
"""

from __future__ import annotations

import platform
import tempfile
from pathlib import Path
from typing import Any

from quantize import convert
from quantize.synth import TinySpec, make_checkpoint

from . import engine
from .engine import Engine, EngineOptions
from .errors import Ms4localError
from .system import memory, package_version


def check_mistral4() -> tuple[bool, str]:
    """Generate a tiny Mistral 4 GGUF, load it with this llama.cpp and evaluate a few tokens."""
    with tempfile.TemporaryDirectory(prefix="ms4local-doctor-") as tmp:
        ckpt = make_checkpoint(Path(tmp) / "Tiny-Mistral4", TinySpec(vocab=2000, seed=0))
        gguf = convert(ckpt, out=Path(tmp) / "tiny.gguf", out_type="F32").output
        try:
            with Engine(gguf, EngineOptions(ctx_size=64)) as e:
                ids = e.tokenize("Bonjour le monde", add_special=True)
                e.logits(ids)
                arch = e.metadata.get("general.architecture", "?")
        except Ms4localError as err:
            return False, str(err)
    return True, f"a generated tiny {arch} GGUF loads and runs"


def collect() -> dict[str, Any]:
    """Everything `doctor` reports, as plain data."""
    devs = engine.devices()
    ok, detail = check_mistral4()
    return {
        "python": platform.python_version(),
        "llama_cpp_python": package_version("llama-cpp-python"),
        "gguf": package_version("gguf"),
        "ms4local": package_version("ms4local"),
        "system_info": engine.system_info(),
        "backends": [{"name": n, "devices": c} for n, c in engine.backends()],
        "devices": [vars(d) for d in devs],
        "gpu_offload": any(d.kind in ("GPU", "iGPU") for d in devs),
        "ram": memory(),
        "mistral4": {"ok": ok, "detail": detail},
    }
