"""The inference engine: llama.cpp driven for Mistral Small 4, one room per job.

    library.py       the one module that imports llama_cpp and libmtmd; llama.cpp's log; batch rows
    options.py       EngineOptions (load, placement, context) and Sampling, checked without llama.cpp
    events.py        what the engine yields (Delta, Done, …): shared by chat, server and UI
    devices.py       ggml devices and buffer types; `place` resolves GPU flags and --fit
    vision.py        the projector (libmtmd) and the images it has seen
    repair.py        third-party GGUFs made right at load (temperature keys, the mmproj's [IMG_BREAK] row)
    token_events.py  generated ids → events (UTF-8 across tokens, reasoning, tool calls)
    core.py          Engine: load, tokenize, render, evaluate with KV reuse, generate, chat
    slots.py         Slots: N conversations decoding in one batch (`serve --parallel`)

`from ms4local.engine import Engine, EngineOptions, Sampling` (and `from ms4local import …`) is the
public face; the names below are what the rest of ms4local uses.
"""

from __future__ import annotations

from ..gguf_model import find_mmproj, read_model
from .core import Engine
from .devices import Device, Placement, backends, buffer_types, devices, gpu_devices, place, rpc_plan, system_info
from .events import ChatStream, Delta, Done, Event, Timings, Usage
from .library import llama, log_mark, log_text, mtmd, set_log_listener
from ..system import free_ram
from .options import MAX_CTX, EngineOptions, Sampling, check_cache_types, check_model_path, parse_override
from .slots import Slots

__all__ = [
    "MAX_CTX", "ChatStream", "Delta", "Device", "Done", "Engine", "EngineOptions", "Event", "Placement", "Sampling",
    "Slots", "Timings", "Usage", "backends", "buffer_types", "check_cache_types", "check_model_path", "devices",
    "find_mmproj", "free_ram", "gpu_devices", "llama", "log_mark", "log_text", "mtmd",
    "parse_override", "place", "read_model", "rpc_plan", "set_log_listener", "system_info",
]
