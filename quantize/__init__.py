"""HF safetensors checkpoints → GGUF for llama.cpp (arch `mistral4`).

Imports only numpy, safetensors, gguf and the standard library (plus ctypes into ggml's
quantizer, and jinja2 to check that a checkpoint's chat template compiles); never the runtime,
typer or rich. Progress reaches the CLI through a callback. `gguf_header` is the one GGUF header
reader of the project; the runtime imports it too.
"""

from .convert import ConvertResult, PlanRow, convert
from .errors import QuantizeError

__all__ = ["ConvertResult", "PlanRow", "QuantizeError", "convert"]
