"""HF safetensors checkpoints → GGUF for llama.cpp (arch `mistral4`).

Imports only numpy, safetensors, gguf and the standard library (plus ctypes into ggml's
quantizer); never the runtime, typer or rich. Progress reaches the CLI through a callback.
"""

from .convert import ConvertResult, PlanRow, convert
from .errors import QuantizeError

__all__ = ["ConvertResult", "PlanRow", "QuantizeError", "convert"]
