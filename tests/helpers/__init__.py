"""What the tests share: paths, the default tiny spec, and (in submodules) the harnesses.

Test modules import from here, never from each other or from conftest.py (pytest loads
conftest itself; importing it as a module is not supported). The submodules are imported by
name, so a test that needs no server does not import openai:

    helpers.serving   a real `ms4local serve` subprocess on a free loopback port, HTTP helpers
    helpers.scripted  ScriptedEngine: the real template and tokenizer, scripted answers
    helpers.ggufs     hand-made GGUFs: corrupt headers, a real-sized header over a sparse hole
    helpers.peak_rss  the forked converter run whose ru_maxrss is the conversion's own peak
"""

from __future__ import annotations

from pathlib import Path

from quantize.synth import TinySpec

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / ".venv" / "bin"

# Small-vocab spec for tests where the vocabulary does not matter (fast to generate and convert).
SMALL = TinySpec(vocab=2000)
