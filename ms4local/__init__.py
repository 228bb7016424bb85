"""ms4local: run Mistral Small 4 locally on llama.cpp.

`from ms4local import Engine` loads a GGUF and streams answers; the converter lives in the
sibling package `quantize`. This package never imports `quantize` (the CLI joins the two).
"""

from .engine import Delta, Done, Engine, EngineOptions, Placement, Sampling, Timings, Usage

__all__ = ["Delta", "Done", "Engine", "EngineOptions", "Placement", "Sampling", "Timings", "Usage"]
__version__ = "0.1.0"
