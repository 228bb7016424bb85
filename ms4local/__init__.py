"""ms4local: run Mistral Small 4 locally on llama.cpp.

`from ms4local import Engine` loads a GGUF and streams answers; the converter lives in the
sibling package `quantize`. This package imports from `quantize` only its GGUF header reader
(`quantize.gguf_header`, one reader with one set of rules for both) and the GPT-2 byte table the
vocabulary is written with (`quantize.vocab`); the CLI joins the rest.
"""

from .engine import Delta, Done, Engine, EngineOptions, Placement, Sampling, Timings, Usage

__all__ = ["Delta", "Done", "Engine", "EngineOptions", "Placement", "Sampling", "Timings", "Usage"]
__version__ = "0.1.0"
