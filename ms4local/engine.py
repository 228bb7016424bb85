"""The inference engine: the only module that imports `llama_cpp`.

It drives llama.cpp's low-level API rather than llama-cpp-python's `Llama` class, because the
model needs things that class cannot do: llama.cpp's log captured through a callback (not by
redirecting the process's stdout/stderr, which hides load errors), a load progress callback,
control tokens kept in the streamed text (`[THINK]`…), and our own KV-cache bookkeeping (MLA
caches cannot be shifted, only trimmed from the end, so we keep the evaluated token sequence and
evaluate only what differs from it).

Placement (which tensors go to which device) is llama.cpp's own machinery driven from here:
`n_gpu_layers` and `tensor_buft_overrides` rules (--cpu-moe, --n-cpu-moe, -ot), with buffer
types taken from the ggml copy libllama is linked to; `place` resolves the options against the
devices of this build and runs the --fit planner (ms4local/placement.py) when asked.

The engine yields small dataclasses (`Delta`, `Done`); presentation lives in the CLI/UI.
"""

from __future__ import annotations

import codecs
import ctypes
import itertools
import os
import re
import threading
import time
import warnings
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Union

import numpy as np

from .errors import ContextError, ImageError, ModelLoadError, Ms4localNotice, OptionsError, PromptError
from .grammar import check_grammar
from .images import DEFAULT_MAX_TOKENS, REFERENCE_SIDE, image_parts, load_image, part_source, prepare_bytes, read_source
from .placement import (CACHE_TYPES, DEFAULT_HEADROOM, EXPERTS_REGEX, ModelInfo, Plan, expert_overrides,
                        kv_cache_bytes, plan, read_model, read_vocab)
from .prompt import image_order, render, render_marked
from .stream import (ContentDelta, End, MalformedToolCall, ReasoningDelta, StreamParser, Tags, ToolCall,
                     ToolCallDelta)
from .stream import Event as StreamEvent
from .tokenizer import NotTekken, SpecialTokens, Tokenizer, check_text, llama_safe_segments

_llama: Any = None
_mtmd: Any = None
_log_lock = threading.Lock()
_log_lines: deque[tuple[int, str]] = deque(maxlen=4000)
_log_total = 0  # lines ever received; marks count from here because the deque drops old lines
_log_listener: Callable[[int, str], None] | None = None
_log_cb_ref: Any = None

GGML_LOG_ERROR = 4
KV_TYPES = {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "iq4_nl": 20}


def llama() -> Any:
    """Import llama_cpp once, initialise the backend and route its log into our buffer."""
    global _llama, _log_cb_ref
    if _llama is None:
        import llama_cpp

        def on_log(level: int, text: bytes, _user: Any) -> None:
            global _log_total
            line = text.decode("utf-8", "replace") if text else ""
            with _log_lock:
                _log_lines.append((int(level), line))
                _log_total += 1
            if _log_listener is not None:
                _log_listener(int(level), line)

        _log_cb_ref = llama_cpp.llama_log_callback(on_log)
        llama_cpp.llama_log_set(_log_cb_ref, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        _llama = llama_cpp
    return _llama


def mtmd() -> Any:
    """Import llama-cpp-python's libmtmd bindings once (images), with their log routed like llama.cpp's."""
    global _mtmd
    if _mtmd is None:
        llama()
        try:
            from llama_cpp import mtmd_cpp
        except (ImportError, OSError) as e:
            raise ModelLoadError(f"this llama-cpp-python build has no libmtmd, so images cannot be read: {e}") from None
        mtmd_cpp.mtmd_log_set(_log_cb_ref, ctypes.c_void_p(0))
        _mtmd = mtmd_cpp
    return _mtmd


def set_log_listener(listener: Callable[[int, str], None] | None) -> None:
    """Receive every llama.cpp log line (level, text) as it arrives, e.g. for `--verbose`."""
    global _log_listener
    _log_listener = listener


def _lines_since(since: int) -> list[tuple[int, str]]:
    """The buffered lines received after mark `since` (a value of `log_mark()`)."""
    with _log_lock:
        n = _log_total - since
        if n <= 0:
            return []
        return list(_log_lines)[-n:] if n < len(_log_lines) else list(_log_lines)


def log_text(since: int = 0) -> str:
    """llama.cpp's log received after mark `since` (0: all that is still buffered)."""
    return "".join(t for _, t in _lines_since(since))


def log_mark() -> int:
    """A position in llama.cpp's log, for `log_text(since=...)`; unlike len() of the bounded
    buffer it keeps counting once old lines are dropped."""
    with _log_lock:
        return _log_total


_FUNC_PREFIX = re.compile(r"^(?:[A-Za-z_]\w*: |error loading model: )+")
_WRAPPER = re.compile(r"^failed to load model( from .*)?$")


def _last_error(since: int) -> str:
    """llama.cpp's reason for the failure it logged after mark `since`.

    A failed load logs the cause first and then generic wrappers ("failed to load model"), so
    the wrappers and the `function: ` prefixes are dropped and the causes kept, in order.
    """
    lines = _lines_since(since)
    errors = [t.strip() for lvl, t in lines if lvl == GGML_LOG_ERROR and t.strip()]
    reasons: list[str] = []
    for line in errors:
        text = _FUNC_PREFIX.sub("", line)
        if text and not _WRAPPER.match(text) and text not in reasons:
            reasons.append(text)
    if reasons:
        return "; ".join(reasons)
    if errors:
        return errors[-1]
    tail = [t.strip() for _, t in lines if t.strip()]
    return tail[-1] if tail else "no reason given"


@dataclass
class EngineOptions:
    """How to load the model, place it on devices and size its context (llama.cpp's flag names).

    Placement: `n_gpu_layers` None means "all when a GPU is present"; -1 is all, 0 none.
    `cpu_moe` / `n_cpu_moe` / `override_tensor` keep tensors in RAM as llama.cpp's --cpu-moe,
    --n-cpu-moe and -ot do. `fit` None turns the planner on when a GPU is present and no
    placement was given by hand; `vram` (bytes) replaces the device's free memory in that plan.
    """

    ctx_size: int = 4096
    threads: int | None = None
    batch_size: int = 512
    ubatch_size: int = 512
    n_gpu_layers: int | None = None
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: str = "auto"  # on | off | auto
    logits_all: bool = False  # keep every position's logits (tests, eval)
    use_mmap: bool = True
    vocab_only: bool = False  # tokenizer and metadata only (fast; no weights, no context)
    cpu_moe: bool = False
    n_cpu_moe: int = 0
    override_tensor: list[str] = field(default_factory=list)  # "REGEX=BUFT"; the first match wins
    fit: bool | None = None
    vram: int | None = None
    # Vision: the projector GGUF (None: an mmproj-*.gguf beside the model whose projection size
    # matches, see `find_mmproj`), `no_mmproj` to load none, and the cap on merged image tokens.
    mmproj: str | None = None
    no_mmproj: bool = False
    image_max_tokens: int = DEFAULT_MAX_TOKENS
    # Sequences in the context (`serve --parallel N`): N conversations decode together in one batch,
    # each in its own KV cells of ctx_size/N tokens, as llama-server splits them (see `Slots`).
    parallel: int = 1

    @property
    def manual_placement(self) -> bool:
        """Whether the user placed tensors by hand (then --fit stays off unless asked)."""
        return self.n_gpu_layers is not None or self.cpu_moe or self.n_cpu_moe > 0 or bool(self.override_tensor)

    def check(self) -> None:
        """Raise OptionsError for values llama.cpp would reject or misread (no model needed)."""
        if self.ctx_size < 1:
            raise OptionsError(f"-c/--ctx-size must be at least 1, got {self.ctx_size}")
        if self.ctx_size > MAX_CTX:  # llama.cpp's n_ctx is a uint32: a larger value would wrap
            raise OptionsError(f"-c/--ctx-size must be at most {MAX_CTX}, got {self.ctx_size}")
        if self.batch_size < 1 or self.ubatch_size < 1:
            raise OptionsError("-b/--batch-size and -ub/--ubatch-size must be at least 1")
        if self.threads is not None and self.threads < 1:
            raise OptionsError(f"-t/--threads must be at least 1, got {self.threads}")
        if self.flash_attn not in FLASH_ATTN:
            raise OptionsError(f"-fa/--flash-attn must be on, off or auto, got {self.flash_attn!r}")
        for flag, value in (("-ctk/--cache-type-k", self.type_k), ("-ctv/--cache-type-v", self.type_v)):
            if value not in KV_TYPES:
                raise OptionsError(f"{flag} must be one of {', '.join(KV_TYPES)}, got {value!r}")
        if self.n_gpu_layers is not None and self.n_gpu_layers < -1:
            raise OptionsError(f"-ngl/--n-gpu-layers must be a number of layers or 'all', got {self.n_gpu_layers}")
        if self.n_cpu_moe < 0:
            raise OptionsError(f"--n-cpu-moe must be 0 or more, got {self.n_cpu_moe}")
        for rule in self.override_tensor:
            parse_override(rule)
        if self.vram is not None and self.vram <= 0:
            raise OptionsError("--vram must be a positive size such as 24G")
        if self.image_max_tokens < 1:
            raise OptionsError(f"--image-max-tokens must be at least 1, got {self.image_max_tokens}")
        if not 1 <= self.parallel <= 256:  # llama.cpp's LLAMA_MAX_SEQ
            raise OptionsError(f"--parallel must be between 1 and 256, got {self.parallel}")
        if self.ctx_size // self.parallel < 16:
            raise OptionsError(f"-c/--ctx-size {self.ctx_size} split over --parallel {self.parallel} leaves "
                               f"{self.ctx_size // self.parallel} tokens per conversation; raise -c")
        if self.mmproj is not None and self.no_mmproj:
            raise OptionsError("--mmproj and --no-mmproj contradict each other; pass one of them")
        if self.fit and self.manual_placement:
            raise OptionsError("--fit chooses -ngl and the expert placement itself; drop -ngl/--cpu-moe/"
                               "--n-cpu-moe/-ot, or pass --no-fit to place tensors by hand")

    def check_model(self, info: ModelInfo, memory: int | None) -> list[str]:
        """Judge -c against the model's header before llama.cpp allocates anything; notices to show.

        Above the training context (`<arch>.context_length`) is a notice, as llama.cpp warns and
        goes on (quality past it is the user's risk, not an error). A KV cache larger than
        `memory` (free RAM and GPU memory, bytes; None: unknown) is an OptionsError that names
        the size and a -c that fits, instead of minutes of loading and then `std::bad_alloc`.
        """
        notices = []
        train = info.key("context_length")
        if isinstance(train, int) and 0 < train < self.ctx_size:
            notices.append(f"-c {self.ctx_size} is above the {train} tokens {info.path.name} was trained for; "
                           "answers may degrade past that length")
        if memory is None or info.n_layer < 1:
            return notices
        need = kv_cache_bytes(info, self.ctx_size, self.type_k, self.type_v)
        if need > memory:
            per_token = max(1, kv_cache_bytes(info, 1 << 16, self.type_k, self.type_v) >> 16)
            fits = memory // per_token // 1024 * 1024
            suggest = min(fits, train) if isinstance(train, int) and train > 0 else fits
            hint = f"; try -c {suggest}" if suggest >= 1024 else "; free some memory or use a smaller model"
            raise OptionsError(f"-c {self.ctx_size} needs a {_size(need)} KV cache (-ctk {self.type_k}), "
                               f"more than the {_size(memory)} of free RAM and GPU memory{hint}")
        return notices


def check_model_path(path: str | os.PathLike[str]) -> None:
    """Raise ModelLoadError unless `path` is a file; a directory is named as one, with the GGUF
    files it holds, since `chat models/` is the likely slip."""
    p = Path(path)
    if p.is_file():
        return
    if not p.is_dir():
        raise ModelLoadError(f"model file {path} does not exist")
    ggufs = sorted(f.name for f in p.glob("*.gguf") if not f.name.startswith("mmproj"))
    if not ggufs:
        raise ModelLoadError(f"{path} is a directory with no .gguf file in it; give the model's GGUF file")
    shown = ", ".join(ggufs[:5]) + (f" and {len(ggufs) - 5} more" if len(ggufs) > 5 else "")
    raise ModelLoadError(f"{path} is a directory, not a model; give one of its GGUF files: {shown}")


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def free_ram() -> int | None:
    """Bytes of RAM available to a new allocation (Linux MemAvailable; elsewhere sysconf), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


MAX_CTX = 2**32 - 256  # llama.cpp's uint32 n_ctx, rounded up to its 256-cell padding
FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}
QUANTIZED_KV = {"q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl"}


def parse_override(rule: str) -> tuple[str, str]:
    """`REGEX=BUFT` (llama.cpp's -ot syntax) → (regex, buffer type name); checks the regex."""
    pattern, sep, buft = rule.rpartition("=")
    if not sep or not pattern or not buft:
        raise OptionsError(f"-ot/--override-tensor wants REGEX=BUFFER_TYPE (e.g. 'ffn_.*_exps=CPU'), got {rule!r}")
    try:
        # llama.cpp matches with std::regex (ECMAScript) and regex_search; Python's syntax
        # agrees for the patterns people write, and a bad one fails here instead of mid-load.
        re.compile(pattern)
    except re.error as e:
        raise OptionsError(f"-ot {rule!r}: the pattern is not a valid regex ({e})") from None
    return pattern, buft


def check_cache_types(info: ModelInfo, type_k: str, type_v: str, flash_attn: str) -> None:
    """Explain, before llama.cpp refuses the context, why a K/V cache type combination cannot work.

    Rules measured on this llama.cpp build (tests/test_offload.py walks all of them):
    an MLA model caches only K rows and reads V out of them, so K and V must have one type; a
    quantized V cache needs flash attention (`-fa auto` turns it on by itself); and a quantized
    type needs rows that are a whole number of its 32-value blocks.
    """
    if info.is_mla and type_k != type_v:
        raise OptionsError(f"-ctk {type_k} with -ctv {type_v}: {info.arch} uses MLA, whose cache stores only K rows "
                           f"and reads V from them, so both must be the same type (e.g. -ctk {type_k} -ctv {type_k})")
    if type_v in QUANTIZED_KV and flash_attn == "off":
        raise OptionsError(f"a quantized V cache (-ctv {type_v}) needs flash attention; use -fa on or -fa auto, "
                           "or an f16/bf16/f32 cache")
    for flag, what, row, kind in (("-ctk", "K", info.head_k, type_k), ("-ctv", "V", info.head_v, type_v)):
        block = CACHE_TYPES[kind][0]
        if row % block:
            raise OptionsError(f"{flag} {kind} stores blocks of {block} values but this model's {what} cache rows "
                               f"have {row}; use f16, bf16 or f32")


@dataclass
class Sampling:
    temperature: float = 0.7
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    max_tokens: int = 512
    seed: int | None = None  # None: random
    # GBNF the output must match (llama.cpp's grammar syntax; `<[ID]>` is one token by id, as the
    # server uses for [TOOL_CALLS]/[ARGS]); None: unconstrained. See `json_grammar`.
    grammar: str | None = None
    # OpenAI's logit_bias: (token id, bias added to its logit) pairs; -100 bans a token in practice.
    logit_bias: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Delta:
    """A piece of streamed output: answer text, or reasoning when `reasoning` is true."""

    text: str
    reasoning: bool = False


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass(frozen=True)
class Timings:
    prompt_eval_tokens: int
    prompt_seconds: float
    ttft_seconds: float
    decode_seconds: float
    decoded_tokens: int = 0

    @property
    def decode_tps(self) -> float:
        return 0.0 if self.decode_seconds <= 0 else self.decoded_tokens / self.decode_seconds


@dataclass(frozen=True)
class Done:
    finish_reason: str  # stop | length
    usage: Usage
    timings: Timings
    unclosed_reasoning: bool = False
    dropped_messages: int = 0  # chat(): non-system messages left out from the start to fit the context
    tool_calls: tuple[ToolCall, ...] = ()  # the well-formed calls, also yielded as they completed


Event = Union[Delta, ToolCallDelta, ToolCall, MalformedToolCall, Done]


class ChatStream:
    """The events of `Engine.chat`, with `dropped_messages` known before the first one (a caller
    that stops the answer early never sees `Done`, yet must trim its history the same way)."""

    def __init__(self, events: Iterator[Event], dropped_messages: int) -> None:
        self._events = events
        self.dropped_messages = dropped_messages

    def __iter__(self) -> ChatStream:
        return self

    def __next__(self) -> Event:
        event = next(self._events)
        if isinstance(event, Done) and self.dropped_messages:
            return replace(event, dropped_messages=self.dropped_messages)
        return event

    def close(self) -> None:
        """Close the generator (the engine's tokens and KV cache then agree)."""
        close = getattr(self._events, "close", None)
        if close is not None:
            close()


def _is_system(message: dict[str, Any]) -> bool:
    return message.get("role") in ("system", "developer")


@dataclass
class _State:
    tokens: list[int] = field(default_factory=list)


# ----------------------------------------------------------------------------- ggml devices
GGML_DEVICE_TYPES = {0: "CPU", 1: "GPU", 2: "iGPU", 3: "ACCEL"}
_OFFLOAD_TYPES = ("GPU", "iGPU")
_ggml_fns: dict[str, Any] = {}


def _ggml(name: str, restype: Any, *argtypes: Any) -> Any:
    """A ggml function from the copy of libggml that libllama itself is linked against.

    dlsym on libllama's handle searches libllama and then its dependencies, so the symbol comes
    from the libggml-base / libggml already mapped into the process. Opening
    llama_cpp/lib/libggml-base.so by path would not do: the wheel ships it as a separate file
    beside libggml-base.so.0 (the soname libllama was linked with), and that second copy has its
    own backend registry and its own CPU buffer type — which llama.cpp compares by pointer to
    recognise `=CPU` overrides. (Windows: the DLL already loaded under that name is reused.)
    """
    fn = _ggml_fns.get(name)
    if fn is None:
        llama()
        import llama_cpp.llama_cpp as lc

        proto = ctypes.CFUNCTYPE(restype, *argtypes)
        try:
            fn = proto((name, lc._lib))
        except AttributeError:
            if os.name != "nt":
                raise
            for dll in ("ggml-base.dll", "ggml.dll", "ggml-cpu.dll"):
                try:
                    fn = proto((name, ctypes.CDLL(dll)))
                    break
                except (AttributeError, OSError):
                    continue
            else:
                raise
        _ggml_fns[name] = fn
    return fn


@dataclass(frozen=True)
class Device:
    """A ggml backend device as llama.cpp sees it."""

    name: str  # CPU, CUDA0, Metal, Vulkan0 …
    description: str
    kind: str  # CPU | GPU | iGPU | ACCEL
    backend: str  # the registry it belongs to
    free: int  # bytes
    total: int  # bytes


def _dev_handles() -> list[int]:
    count = _ggml("ggml_backend_dev_count", ctypes.c_size_t)
    get = _ggml("ggml_backend_dev_get", ctypes.c_void_p, ctypes.c_size_t)
    return [get(i) for i in range(count())]


def devices() -> list[Device]:
    """Every device compiled into this llama.cpp build, with its memory."""
    name = _ggml("ggml_backend_dev_name", ctypes.c_char_p, ctypes.c_void_p)
    desc = _ggml("ggml_backend_dev_description", ctypes.c_char_p, ctypes.c_void_p)
    dtype = _ggml("ggml_backend_dev_type", ctypes.c_int, ctypes.c_void_p)
    memory = _ggml("ggml_backend_dev_memory", None, ctypes.c_void_p,
                   ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t))
    reg = _ggml("ggml_backend_dev_backend_reg", ctypes.c_void_p, ctypes.c_void_p)
    reg_name = _ggml("ggml_backend_reg_name", ctypes.c_char_p, ctypes.c_void_p)
    out = []
    for dev in _dev_handles():
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        memory(dev, ctypes.byref(free), ctypes.byref(total))
        out.append(Device(name=(name(dev) or b"?").decode(), description=(desc(dev) or b"").decode(),
                          kind=GGML_DEVICE_TYPES.get(dtype(dev), "other"), backend=(reg_name(reg(dev)) or b"?").decode(),
                          free=int(free.value), total=int(total.value)))
    return out


def gpu_devices() -> list[Device]:
    """The devices llama.cpp can offload layers to (discrete or integrated GPUs)."""
    return [d for d in devices() if d.kind in _OFFLOAD_TYPES]


def backends() -> list[tuple[str, int]]:
    """The backend registry: (name, number of devices) for each backend compiled in."""
    count = _ggml("ggml_backend_reg_count", ctypes.c_size_t)
    get = _ggml("ggml_backend_reg_get", ctypes.c_void_p, ctypes.c_size_t)
    reg_name = _ggml("ggml_backend_reg_name", ctypes.c_char_p, ctypes.c_void_p)
    dev_count = _ggml("ggml_backend_reg_dev_count", ctypes.c_size_t, ctypes.c_void_p)
    return [((reg_name(get(i)) or b"?").decode(), int(dev_count(get(i)))) for i in range(count())]


def system_info() -> str:
    """llama.cpp's own summary of the CPU features it was built with."""
    return llama().llama_print_system_info().decode("utf-8", "replace").strip()


def buffer_types() -> dict[str, int]:
    """Buffer types an -ot rule may name, by buffer-type name and by device name (CPU, CUDA0 …).

    "CPU" is ggml_backend_cpu_buffer_type() itself: llama.cpp recognises it by pointer and then
    picks the best CPU buffer (repacked, or the GPU backend's pinned host memory).
    """
    dev_name = _ggml("ggml_backend_dev_name", ctypes.c_char_p, ctypes.c_void_p)
    dev_buft = _ggml("ggml_backend_dev_buffer_type", ctypes.c_void_p, ctypes.c_void_p)
    buft_name = _ggml("ggml_backend_buft_name", ctypes.c_char_p, ctypes.c_void_p)
    out: dict[str, int] = {}
    for dev in _dev_handles():
        buft = dev_buft(dev)
        if buft:
            out.setdefault((buft_name(buft) or b"?").decode(), buft)
            out.setdefault((dev_name(dev) or b"?").decode(), buft)
    out["CPU"] = _ggml("ggml_backend_cpu_buffer_type", ctypes.c_void_p)()
    return out


class _BuftOverride(ctypes.Structure):
    """llama.h's `struct llama_model_tensor_buft_override` (llama-cpp-python declares the field
    of llama_model_params as a bare pointer and no struct)."""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def override_rules(opts: EngineOptions, n_layer: int | None = None) -> list[str]:
    """All REGEX=BUFT rules a set of options asks for, in the order llama.cpp tries them:
    the user's -ot first (the first match wins), then --cpu-moe / --n-cpu-moe."""
    rules = list(opts.override_tensor)
    if opts.cpu_moe:
        rules.append(EXPERTS_REGEX + "=CPU")
    elif opts.n_cpu_moe > 0:
        rules += expert_overrides(opts.n_cpu_moe, n_layer)
    return rules


# ----------------------------------------------------------------------------- placement
@dataclass(frozen=True)
class Placement:
    """How a model will be placed: concrete options (--fit resolved), the plan, remarks for the user."""

    options: EngineOptions  # fit resolved into n_gpu_layers / n_cpu_moe; fit is False
    plan: Plan | None = None  # what --fit chose, when it ran
    applied: bool = True  # False when the plan was only computed (no GPU in this build)
    notices: tuple[str, ...] = ()
    single_gpu: str | None = None  # --fit plans for one device: the model goes to this one only


def place(model_path: str | os.PathLike[str], options: EngineOptions, info: ModelInfo | None = None) -> Placement:
    """Resolve the placement options against the devices of this build (and plan when --fit is on).

    Without a GPU backend every GPU flag is a no-op: say so once instead of silently ignoring
    it. With one, --fit (the default unless tensors were placed by hand) reads the GGUF header
    and plans for the first GPU's free memory, or for `vram` bytes.
    """
    opts = options
    opts.check()
    gpus = gpu_devices()
    notices: list[str] = []
    try:
        info = info or read_model(model_path)
    except ModelLoadError:
        info = None  # llama.cpp's own reason is the one to show, at load
    if info is not None:
        ram = free_ram()
        memory = None if ram is None else ram + sum(d.free for d in gpus)
        notices += opts.check_model(info, memory)
    if not gpus:
        flags = [flag for flag, on in (("-ngl", opts.n_gpu_layers not in (None, 0)), ("--cpu-moe", opts.cpu_moe),
                                       ("--n-cpu-moe", opts.n_cpu_moe > 0), ("--fit", bool(opts.fit)),
                                       ("--vram", opts.vram is not None)) if on]
        plan_ = None
        if flags:
            verb = "has" if len(flags) == 1 else "have"
            notices.append(f"this llama.cpp build has no GPU backend, so everything runs on the CPU and {', '.join(flags)} "
                           f"{verb} no effect; `make install-cuda` or `make install-metal` rebuilds it with one")
        if opts.fit and opts.vram is not None:
            info = info or read_model(model_path)
            plan_ = plan(info, budget=max(opts.vram - DEFAULT_HEADROOM, 0), n_ctx=opts.ctx_size, type_k=opts.type_k,
                         type_v=opts.type_v, n_ubatch=min(opts.ubatch_size, opts.batch_size),
                         flash_attn=opts.flash_attn, device="GPU")
            notices.append(f"the --fit plan for --vram {opts.vram / 2**30:.1f} GiB is shown, not applied")
        # -ot rules for a device this build lacks are dropped with a notice, like the other GPU
        # flags: the same command line then runs on a CPU-only machine.
        known = buffer_types()
        kept, dropped = [], []
        for rule in opts.override_tensor:
            name = parse_override(rule)[1]
            (kept if name in known or name.lower() in {k.lower() for k in known} else dropped).append(rule)
        if dropped:
            notices.append(f"-ot {', '.join(repr(r) for r in dropped)} ignored: this build has no such device, "
                           f"only {', '.join(sorted(known))}")
        resolved = replace(opts, fit=False, n_gpu_layers=0, override_tensor=kept)
        return Placement(resolved, plan_, applied=False, notices=tuple(notices))
    fit = opts.fit if opts.fit is not None else not opts.manual_placement
    if not fit:
        return Placement(replace(opts, fit=False, n_gpu_layers=-1 if opts.n_gpu_layers is None else opts.n_gpu_layers))
    dev = gpus[0]
    info = info or read_model(model_path)
    memory = opts.vram if opts.vram is not None else dev.free
    plan_ = plan(info, budget=max(memory - DEFAULT_HEADROOM, 0), n_ctx=opts.ctx_size, type_k=opts.type_k,
                 type_v=opts.type_v, n_ubatch=min(opts.ubatch_size, opts.batch_size), flash_attn=opts.flash_attn,
                 device=dev.name)
    if len(gpus) > 1:
        notices.append(f"--fit plans for one GPU and puts the model on {dev.name} only; "
                       "place it by hand (-ngl, -ot) to use the others")
    if plan_.n_gpu_layers <= plan_.n_layer:
        notices.append(f"{info.path.name} does not fit on {dev.name} even with every routed expert in RAM: "
                       f"{max(plan_.n_gpu_layers - 1, 0)} of {plan_.n_layer} blocks on the GPU")
    resolved = replace(opts, fit=False, n_gpu_layers=plan_.n_gpu_layers, n_cpu_moe=plan_.n_cpu_moe, cpu_moe=False)
    return Placement(resolved, plan_, notices=tuple(notices), single_gpu=dev.name)


# ----------------------------------------------------------------------------- vision
def _projection_dim(info: ModelInfo) -> int | None:
    """The embedding size an mmproj GGUF projects images to (None: not a vision projector)."""
    meta = info.metadata
    if info.arch != "clip" or not meta.get("clip.has_vision_encoder"):
        return None
    dim = meta.get("clip.vision.projection_dim")
    return int(dim) if isinstance(dim, int) else None  # type: ignore[arg-type]


def find_mmproj(model_path: str | os.PathLike[str], n_embd: int | None = None) -> Path | None:
    """The vision projector beside a model: an `mmproj-*.gguf` whose projection size equals the
    model's embedding length (`n_embd`, else read from the model's header). Headers only.

    Files that are not readable GGUFs, not vision projectors, or made for another model are
    passed over; among the matches the name sorting first wins (F16 before F32 before Q8_0).
    """
    path = Path(model_path)
    if n_embd is None:
        try:
            info = read_model(path)
        except ModelLoadError:
            return None
        n_embd = int(info.key("embedding_length", 0) or 0)  # type: ignore[arg-type]
    try:
        candidates = sorted(p for p in path.parent.glob("mmproj-*.gguf") if p.is_file())
    except OSError:
        return None
    for candidate in candidates:
        try:
            dim = _projection_dim(read_model(candidate))
        except ModelLoadError:
            continue
        if dim == n_embd:
            return candidate
    return None


_IMAGE_STRIDE = 1 << 20  # pseudo-ids of one image: -(1 + serial·stride + offset), offset < stride
_IMAGE_PIXEL_BUDGET = 256 * 2**20  # decoded pixels kept for images not yet in the KV cache


def _pseudo(token: int) -> tuple[int, int]:
    """(image serial, offset in the image) of a pseudo-id (< 0)."""
    return divmod(-token - 1, _IMAGE_STRIDE)


@dataclass
class _ImageEntry:
    """An image the engine has seen: its layout and, until evicted, the pixels to encode it from."""

    serial: int
    n_tokens: int  # embeddings libmtmd makes: p_x·p_y + p_y − 1 ([IMG_BREAK] after each row but the last)
    grid: tuple[int, int]  # (p_x, p_y) merged patches per row, rows
    after: tuple[int, ...]  # text ids libmtmd puts after the image ([IMG_END])
    size: tuple[int, int]  # pixels handed to libmtmd (multiples of the merged patch)
    pixels: bytes | None

    @property
    def ids(self) -> list[int]:
        base = 1 + self.serial * _IMAGE_STRIDE
        return [-(base + j) for j in range(self.n_tokens)]

    def break_rows(self) -> list[int]:
        p_x, p_y = self.grid
        return [(r + 1) * p_x + r for r in range(p_y - 1)]


@dataclass
class _Vision:
    """A loaded projector: the libmtmd context and what the engine needs to drive it."""

    ctx: Any
    path: Path
    unit: int  # pixels per merged patch side (patch × spatial merge)
    max_side: int  # the reference resolution (longest side)
    max_tokens: int
    img_id: int  # the [IMG] token the chat template writes for each image
    img_break: np.ndarray  # the [IMG_BREAK] embedding row (v.token_embd.img_break)


def _img_break_row(path: Path, n_embd: int) -> np.ndarray:
    """`v.token_embd.img_break` from the mmproj, as float32 (the converter writes F32)."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # gguf raises ValueError/struct errors on damaged files
        raise ModelLoadError(f"cannot read {path.name}: {e}") from None
    for t in reader.tensors:
        if t.name == "v.token_embd.img_break":
            if t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                raise ModelLoadError(f"{path.name}: v.token_embd.img_break is {t.tensor_type.name}; expected F32 or F16 "
                                     "(re-convert the projector with `ms4local quantize --mmproj-only`)")
            row = np.asarray(t.data, dtype=np.float32).reshape(-1)
            if row.size != n_embd:
                raise ModelLoadError(f"{path.name}: v.token_embd.img_break has {row.size} values, the model {n_embd}")
            return row.copy()
    raise ModelLoadError(f"{path.name} has no v.token_embd.img_break tensor (llama.cpp's own converter omits it); "
                         "convert the projector with `ms4local quantize --mmproj-only`")


class Engine:
    """A loaded GGUF model with one context. Not thread-safe: one generation at a time.

    `placement` says how the weights were placed (with the --fit plan, if one ran) and
    `notices` holds one-line remarks the caller should show (e.g. GPU flags without a GPU).
    """

    def __init__(self, model_path: str | os.PathLike[str], options: EngineOptions | None = None,
                 progress: Callable[[float], None] | None = None, *, placement: Placement | None = None) -> None:
        L = llama()
        self.path = Path(model_path)
        self.options = opts = options or EngineOptions()
        self._state = _State()
        self.ctx = None
        self.model = None
        self._batch = None
        self._embd_batch = None
        self._vision: _Vision | None = None
        self.mmproj: Path | None = None  # the vision projector in use
        self.images_encoded = 0  # images run through the vision tower (a turn that reuses one adds 0)
        self._images: OrderedDict[bytes, _ImageEntry] = OrderedDict()  # by sha256 of the image bytes
        self._image_serials: dict[int, _ImageEntry] = {}
        self._serial = itertools.count()
        check_model_path(self.path)
        opts.check()
        info = None
        self.placement = Placement(opts)
        if not opts.vocab_only:
            # The header is read before llama.cpp loads anything, so that a cache type or a
            # placement that cannot work is explained in seconds, not after a 67 GB load. An
            # unreadable header is left to llama.cpp, whose own reason is the one to show.
            try:
                info = read_model(self.path)
            except ModelLoadError:
                info = None
            if info is not None:
                check_cache_types(info, opts.type_k, opts.type_v, opts.flash_attn)
            self.placement = placement or place(self.path, opts, info)
        self.notices: list[str] = list(self.placement.notices)
        popts = self.placement.options
        mark = log_mark()
        mparams = L.llama_model_default_params()
        mparams.n_gpu_layers = -1 if popts.n_gpu_layers is None else popts.n_gpu_layers
        mparams.use_mmap = opts.use_mmap
        mparams.vocab_only = opts.vocab_only
        if self.placement.single_gpu is not None:
            mparams.split_mode = 0  # LLAMA_SPLIT_MODE_NONE: the whole model on main_gpu
            mparams.main_gpu = 0
        self._overrides = self._override_array(override_rules(popts, info.n_layer if info else None))
        if self._overrides is not None:
            mparams.tensor_buft_overrides = ctypes.addressof(self._overrides)

        def on_progress(p: float, _user: Any) -> bool:
            if progress is not None:
                progress(float(p))
            return True

        self._progress_ref = L.llama_progress_callback(on_progress)
        mparams.progress_callback = self._progress_ref
        self.model = L.llama_model_load_from_file(str(self.path).encode(), mparams)
        if not self.model:
            raise ModelLoadError(f"llama.cpp could not load {self.path.name}: {_last_error(mark)}")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.metadata = self._read_metadata()
        self.eos_id = L.llama_vocab_eos(self.vocab)
        self.bos_id = L.llama_vocab_bos(self.vocab)
        self.tokenizer = self._load_tokenizer()
        self.think_ids = (self._special_id("[THINK]"), self._special_id("[/THINK]"))
        # Output tags by id, looked up in this vocabulary (never hard-coded: spec §4.3).
        self.tags = Tags.from_ids(think=self.think_ids[0], think_end=self.think_ids[1],
                                  tool_calls=self._special_id("[TOOL_CALLS]"), args=self._special_id("[ARGS]"),
                                  call_id=self._special_id("[CALL_ID]"), eos=self.eos_id)
        if opts.vocab_only:
            return
        cparams = L.llama_context_default_params()
        cparams.n_ctx = opts.ctx_size
        cparams.n_batch = opts.batch_size
        cparams.n_ubatch = min(opts.ubatch_size, opts.batch_size)
        threads = opts.threads or max(1, os.cpu_count() or 1)
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.type_k = KV_TYPES[opts.type_k]
        cparams.type_v = KV_TYPES[opts.type_v]
        cparams.flash_attn_type = FLASH_ATTN[opts.flash_attn]
        cparams.no_perf = False  # llama.cpp's own token counters back `perf()`
        cparams.n_seq_max = opts.parallel  # kv_unified stays off: each sequence owns n_ctx/parallel cells
        mark = log_mark()
        self.ctx = L.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            L.llama_model_free(self.model)
            self.model = None
            raise ContextError(f"llama.cpp could not create a context: {_last_error(mark)}")
        self.n_ctx = L.llama_n_ctx(self.ctx)
        self._batch = L.llama_batch_init(opts.batch_size, 0, 1)
        self.n_embd = L.llama_model_n_embd(self.model)
        if not opts.no_mmproj:
            mmproj = Path(opts.mmproj).expanduser() if opts.mmproj else find_mmproj(self.path, self.n_embd)
            if mmproj is not None:
                try:
                    self._vision = self._load_vision(mmproj)
                except BaseException:
                    self.close()
                    raise
                self.mmproj = mmproj

    @staticmethod
    def _override_array(rules: list[str]) -> Any:
        """A NULL-terminated llama_model_tensor_buft_override[] for `rules`.

        llama.cpp keeps the pointer in the model's parameters and reads the patterns while it
        loads, so the array (which owns the pattern bytes) lives as long as the Engine.
        """
        if not rules:
            return None
        bufts = buffer_types()
        arr = (_BuftOverride * (len(rules) + 1))()
        for i, rule in enumerate(rules):
            pattern, name = parse_override(rule)
            buft = bufts.get(name) or next((v for k, v in bufts.items() if k.lower() == name.lower()), None)
            if buft is None:
                raise OptionsError(f"-ot {rule!r}: no buffer type {name!r} in this llama.cpp build; "
                                   f"it has {', '.join(sorted(bufts))}")
            arr[i].pattern = pattern.encode()
            arr[i].buft = buft
        return arr  # the zeroed last entry is the terminator

    # ----------------------------------------------------------------------------- vision
    @property
    def supports_images(self) -> bool:
        """True when a vision projector is loaded: messages may then carry image parts."""
        return self._vision is not None

    def _load_vision(self, path: Path) -> _Vision:
        """Load the projector with libmtmd, after checking from its header that it fits this model."""
        if not path.is_file():
            raise ModelLoadError(f"mmproj file {path} does not exist")
        info = read_model(path)
        dim = _projection_dim(info)
        if dim is None:
            raise ModelLoadError(f"{path.name} is not a vision projector (an mmproj GGUF with a vision encoder)")
        if dim != self.n_embd:
            raise ModelLoadError(f"{path.name} projects images to {dim} values but {self.path.name} has an embedding "
                                 f"size of {self.n_embd}: it belongs to another model; use the mmproj converted from "
                                 "the same checkpoint (or --no-mmproj)")
        kind = info.metadata.get("clip.projector_type")
        if kind != "pixtral":
            raise ModelLoadError(f"{path.name} is a {kind!r} projector; ms4local drives Mistral's Pixtral projector only")
        img_id = self._special_id("[IMG]")
        if img_id is None:
            raise ModelLoadError(f"{self.path.name} has no [IMG] control token, so its template cannot place images")
        img_break = _img_break_row(path, self.n_embd)
        patch = int(info.metadata.get("clip.vision.patch_size", 14))  # type: ignore[arg-type]
        merge = int(info.metadata.get("clip.vision.spatial_merge_size", 1) or 1)  # type: ignore[arg-type]
        side = int(info.metadata.get("clip.vision.image_size", REFERENCE_SIDE) or REFERENCE_SIDE)  # type: ignore[arg-type]
        M = mtmd()
        opts = self.options
        popts = self.placement.options
        gpu = self.placement.applied and popts.n_gpu_layers not in (None, 0)
        p = M.mtmd_context_params_default()
        p.use_gpu = bool(gpu)
        p.print_timings = False
        p.n_threads = opts.threads or max(1, os.cpu_count() or 1)
        p.warmup = bool(gpu)  # reserves the GPU buffers now; on the CPU it only costs load time
        # Flash attention in the vision tower follows -fa on a GPU; the CPU path is the one the
        # numerics tests hold to the reference (tests/test_vision_numerics.py), with it off.
        p.flash_attn_type = FLASH_ATTN[opts.flash_attn] if gpu else FLASH_ATTN["off"]
        # The engine sizes images itself (ms4local/images.py) to at most image_max_tokens merged
        # patches; min 1 keeps libmtmd from enlarging a small image to its default minimum of 8.
        p.image_min_tokens = 1
        p.image_max_tokens = opts.image_max_tokens
        mark = log_mark()
        ctx = M.mtmd_init_from_file(str(path).encode(), self.model, p)
        if not ctx:
            raise ModelLoadError(f"libmtmd could not load {path.name}: {_last_error(mark)}")
        if not M.mtmd_support_vision(ctx) or M.mtmd_decode_use_mrope(ctx):
            M.mtmd_free(ctx)
            raise ModelLoadError(f"{path.name} is not an image projector ms4local can drive (no vision input, or M-RoPE)")
        return _Vision(ctx=ctx, path=path, unit=patch * merge, max_side=side, max_tokens=opts.image_max_tokens,
                       img_id=img_id, img_break=img_break)

    def load_image(self, source: Any) -> bytes:
        """`ms4local.images.load_image`: validate an image (path, data: URI, bytes) → PNG bytes."""
        return load_image(source)

    def image_embeddings(self, source: Any) -> np.ndarray:
        """The embeddings [n_tokens, n_embd] the model reads for an image (path, data: URI or
        bytes), [IMG_BREAK] rows included — what `chat` evaluates in place of its [IMG]. Encodes
        it (counted in `images_encoded`); the KV cache is not touched."""
        if self._vision is None:
            raise ImageError(f"{self.path.name} has no vision projector loaded")
        return self._encode_image(self._image({"type": "image", "image": source}))

    def _image(self, part: dict[str, Any]) -> _ImageEntry:
        """The entry of an image part, reading and validating the image (ImageError if unusable).

        Images are known by the sha256 of their bytes: the same picture in the next turn maps to
        the same pseudo-ids, so the KV-cache prefix compare reuses it without encoding it again.
        """
        v = self._vision
        assert v is not None
        src = read_source(part_source(part))
        digest = src.digest
        entry = self._images.get(digest)
        if entry is not None and entry.pixels is not None:
            self._images.move_to_end(digest)
            return entry
        pixels, grid = prepare_bytes(src, unit=v.unit, max_side=v.max_side, max_tokens=v.max_tokens)
        if entry is None:
            chunks, chunk = self._mtmd_chunk(pixels.width, pixels.height, pixels.rgb)
            try:
                n_tokens, after = self._chunk_layout(chunks, chunk)
            finally:
                mtmd().mtmd_input_chunks_free(chunks)
            p_x, p_y = grid
            if n_tokens != p_x * p_y + p_y - 1:
                raise ContextError(f"libmtmd made {n_tokens} embeddings of a {pixels.width}×{pixels.height} image, "
                                   f"expected {p_x * p_y + p_y - 1} ({p_x}×{p_y} patches and row breaks)")
            entry = _ImageEntry(serial=next(self._serial), n_tokens=n_tokens, grid=grid, after=after,
                                size=(pixels.width, pixels.height), pixels=None)
            self._image_serials[entry.serial] = entry
        entry.pixels = pixels.rgb
        self._images[digest] = entry
        self._images.move_to_end(digest)
        self._evict_images(keep=entry)
        return entry

    def _evict_images(self, keep: _ImageEntry) -> None:
        """Drop the pixels of the least recently used images beyond the memory budget (their layout
        stays, so the KV cache still recognises them), and forget the oldest beyond 4096 images."""
        total = sum(len(e.pixels) for e in self._images.values() if e.pixels is not None)
        for e in self._images.values():
            if total <= _IMAGE_PIXEL_BUDGET:
                break
            if e is not keep and e.pixels is not None:
                total -= len(e.pixels)
                e.pixels = None
        while len(self._images) > 4096:
            _, old = self._images.popitem(last=False)
            self._image_serials.pop(old.serial, None)

    def _mtmd_chunk(self, width: int, height: int, rgb: bytes) -> tuple[Any, Any]:
        """libmtmd's chunks for one RGB image (image chunk, then [IMG_END] text): (chunks, image chunk)."""
        M = mtmd()
        v = self._vision
        assert v is not None
        bitmap = M.mtmd_bitmap_init(width, height, (ctypes.c_uint8 * len(rgb)).from_buffer_copy(rgb))
        if not bitmap:
            raise ContextError("libmtmd could not take the image")
        chunks = M.mtmd_input_chunks_init()
        try:
            part = M.mtmd_input_part()
            part.bitmap = bitmap
            parts = (ctypes.POINTER(M.mtmd_input_part) * 1)(ctypes.pointer(part))
            mark = log_mark()
            rc = M.mtmd_tokenize_from_parts(v.ctx, chunks, parts, 1, False)
            if rc != 0:
                raise ContextError(f"libmtmd could not prepare the image (code {rc}): {_last_error(mark)}")
            found = [M.mtmd_input_chunks_get(chunks, i) for i in range(M.mtmd_input_chunks_size(chunks))]
            images = [c for c in found if M.mtmd_input_chunk_get_type(c) == M.MTMD_INPUT_CHUNK_TYPE_IMAGE]
            if len(images) != 1:
                raise ContextError(f"libmtmd made {len(images)} image chunks of one image")
            return chunks, images[0]
        except BaseException:
            M.mtmd_input_chunks_free(chunks)
            raise
        finally:
            M.mtmd_bitmap_free(bitmap)

    def _chunk_layout(self, chunks: Any, image: Any) -> tuple[int, tuple[int, ...]]:
        """(embeddings of the image chunk, text ids libmtmd puts after it)."""
        M = mtmd()
        after: list[int] = []
        seen = False
        for i in range(M.mtmd_input_chunks_size(chunks)):
            c = M.mtmd_input_chunks_get(chunks, i)
            if M.mtmd_input_chunk_get_type(c) == M.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                seen = True
            elif seen and M.mtmd_input_chunk_get_type(c) == M.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t()
                ptr = M.mtmd_input_chunk_get_tokens_text(c, ctypes.byref(n))
                after += [int(ptr[j]) for j in range(n.value)]
        n_tokens = int(M.mtmd_input_chunk_get_n_tokens(image))
        if int(M.mtmd_input_chunk_get_n_pos(image)) != n_tokens:
            raise ContextError("libmtmd gives this image fewer positions than embeddings (M-RoPE), which ms4local "
                               "does not drive")
        return n_tokens, tuple(after)

    def _encode_image(self, entry: _ImageEntry) -> np.ndarray:
        """The image's embeddings [n_tokens, n_embd] from the vision tower, [IMG_BREAK] rows exact.

        libmtmd builds the [IMG_BREAK] rows as (an uninitialised tensor × 0) + img_break, which is
        NaN where the garbage was Inf/NaN (an upstream bug, tests/test_vision_numerics.py); those
        rows are written here from the projector's own img_break row, which is what they should be.
        """
        M = mtmd()
        v = self._vision
        assert v is not None
        if entry.pixels is None:
            raise ContextError("this image's pixels were dropped from memory before it could be encoded; send it again")
        chunks, chunk = self._mtmd_chunk(*entry.size, entry.pixels)
        try:
            n = int(M.mtmd_input_chunk_get_n_tokens(chunk))
            if n != entry.n_tokens:
                raise ContextError(f"libmtmd made {n} embeddings of an image it had counted as {entry.n_tokens}")
            mark = log_mark()
            rc = M.mtmd_encode_chunk(v.ctx, chunk)
            if rc != 0:
                raise ContextError(f"libmtmd could not encode the image (code {rc}): {_last_error(mark)}")
            ptr = M.mtmd_get_output_embd(v.ctx)
            embd = np.ctypeslib.as_array(ptr, shape=(n * self.n_embd,)).reshape(n, self.n_embd).copy()
        finally:
            M.mtmd_input_chunks_free(chunks)
        embd[entry.break_rows()] = v.img_break
        self.images_encoded += 1
        return embd

    def _decode_embd(self, embd: np.ndarray, start_pos: int, want_all: bool, out: np.ndarray | None = None,
                     seq: int = 0) -> None:
        """Evaluate embedding rows (an image) at positions start_pos.. of sequence `seq` in batches."""
        L = llama()
        if self._embd_batch is None:
            self._embd_batch = L.llama_batch_init(self.options.batch_size, self.n_embd, 1)
        b = self._embd_batch
        step = self.options.batch_size
        embd = np.ascontiguousarray(embd, dtype=np.float32)
        for off in range(0, len(embd), step):
            part = embd[off:off + step]
            b.n_tokens = len(part)
            ctypes.memmove(b.embd, part.ctypes.data, part.nbytes)
            for i in range(len(part)):
                b.pos[i] = start_pos + off + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = seq
                b.logits[i] = want_all
            mark = log_mark()
            rc = L.llama_decode(self.ctx, b)
            if rc != 0:
                raise ContextError(f"llama_decode of image embeddings failed (code {rc}): {_last_error(mark)}")
            if out is not None:
                self._copy_logits(out[off:off + len(part)])

    def _copy_logits(self, rows: np.ndarray) -> None:
        L = llama()
        for i in range(len(rows)):
            rows[i] = np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))

    def _evaluate(self, tokens: list[int], start_pos: int, want_all: bool = False, out: np.ndarray | None = None) -> None:
        """Evaluate prompt ids (text ids and image pseudo-ids) at start_pos.., recording each run
        in the cached sequence once it is in the KV cache; logits for the last (or all) positions."""
        i = 0
        while i < len(tokens):
            j = i
            if tokens[i] >= 0:
                while j < len(tokens) and tokens[j] >= 0:
                    j += 1
                run = tokens[i:j]
                if out is None:
                    self._decode(run, start_pos + i, want_all=want_all)
                else:
                    self._decode(run, start_pos + i, want_all=want_all, out=out[i:j])
            else:
                serial, offset = _pseudo(tokens[i])
                entry = self._image_serials.get(serial)
                if entry is None or offset != 0 or tokens[i:i + entry.n_tokens] != entry.ids:
                    raise ContextError("the prompt holds image ids this engine did not make (build prompts with "
                                       "prompt_tokens or chat)")
                j = i + entry.n_tokens
                self._decode_embd(self._encode_image(entry), start_pos + i, want_all,
                                  None if out is None else out[i:j])
                run = tokens[i:j]
            self._state.tokens.extend(run)
            i = j

    def _with_images(self, ids: list[int], messages: list[dict[str, Any]], parts: list[dict[str, Any]],
                     **render_kwargs: Any) -> list[int]:
        """Replace each [IMG] the template wrote with the image's pseudo-ids and [IMG_END]."""
        v = self._vision
        assert v is not None
        where = [i for i, t in enumerate(ids) if t == v.img_id]
        if len(where) != len(parts):
            raise PromptError(f"the chat template wrote {len(where)} image markers for {len(parts)} images")
        order = image_order(self.chat_template or "", messages, **render_kwargs) if len(parts) > 1 else [0]
        entries = [self._image(parts[k]) for k in order]
        out: list[int] = []
        prev = 0
        for pos, entry in zip(where, entries):
            out += ids[prev:pos]
            out += entry.ids
            out += entry.after
            prev = pos + 1
        out += ids[prev:]
        return out

    # ----------------------------------------------------------------------------- metadata
    def _read_metadata(self) -> dict[str, str]:
        L = llama()
        out: dict[str, str] = {}
        n = L.llama_model_meta_count(self.model)
        buf = ctypes.create_string_buffer(1 << 16)
        for i in range(n):
            L.llama_model_meta_key_by_index(self.model, i, buf, len(buf))
            key = buf.value.decode("utf-8", "replace")
            size = L.llama_model_meta_val_str_by_index(self.model, i, None, 0)
            val = ctypes.create_string_buffer(max(size, 0) + 1)
            L.llama_model_meta_val_str_by_index(self.model, i, val, len(val))
            out[key] = val.value.decode("utf-8", "replace")
        return out

    @property
    def chat_template(self) -> str | None:
        L = llama()
        raw = L.llama_model_chat_template(self.model, None)
        return raw.decode("utf-8") if raw else None

    def _special_id(self, text: str) -> int | None:
        ids = self.tokenize(text, add_special=False, parse_special=True)
        if len(ids) == 1 and self.token_is_control(ids[0]):
            return ids[0]
        return None

    def token_is_control(self, token: int) -> bool:
        L = llama()
        return bool(L.llama_vocab_get_attr(self.vocab, token) & L.LLAMA_TOKEN_ATTR_CONTROL)

    # ----------------------------------------------------------------------------- tokens
    def _load_tokenizer(self) -> Tokenizer | None:
        """mistral-common's tekken tokenization built from this GGUF's vocabulary (ms4local/tokenizer.py),
        or None, with one notice, when the vocabulary is not tekken: then llama.cpp's tokenizer is used."""
        L = llama()
        try:
            tokens, types = read_vocab(self.path)
            if len(tokens) != self.n_vocab:
                raise NotTekken(f"its header lists {len(tokens)} tokens but llama.cpp loaded {self.n_vocab}")
            return Tokenizer(tokens, types, model=self.metadata.get("tokenizer.ggml.model", ""),
                             pre=self.metadata.get("tokenizer.ggml.pre", ""), bos_id=self.bos_id, eos_id=self.eos_id,
                             add_bos=bool(L.llama_vocab_get_add_bos(self.vocab)),
                             add_eos=bool(L.llama_vocab_get_add_eos(self.vocab)))
        except (NotTekken, ModelLoadError) as e:
            notice = (f"{self.path.name}: {e}; its text is tokenized by llama.cpp, whose ids can differ from "
                      "mistral-common's (text with combining marks)")
            self.notices.append(notice)
            warnings.warn(notice, Ms4localNotice, stacklevel=3)
            return None

    def tokenize(self, text: str, *, add_special: bool = False, parse_special: bool = True) -> list[int]:
        """The model's token ids for `text`: mistral-common's tekken tokenization when the vocabulary
        is tekken (`self.tokenizer`), else llama.cpp's (`llama_tokenize`). `add_special` adds BOS as
        the vocabulary asks; `parse_special` reads control-token text ("[INST]") as the token.
        PromptError for text that is not valid Unicode (a lone surrogate)."""
        if self.tokenizer is not None:
            return self.tokenizer.encode(text, add_special=add_special, parse_special=parse_special)
        return self.llama_tokenize(text, add_special=add_special, parse_special=parse_special)

    def llama_tokenize(self, text: str, *, add_special: bool = False, parse_special: bool = True) -> list[int]:
        """llama.cpp's own token ids for `text`, guarded: a stretch long enough to crash its regex
        is cut first (tokenizer.llama_safe_segments), so only such a stretch can tokenize otherwise."""
        L = llama()
        check_text(text)
        out = [self.bos_id] if add_special and L.llama_vocab_get_add_bos(self.vocab) else []
        for part in llama_safe_segments(text):
            data = part.encode("utf-8")
            cap = len(data) + 16
            buf = (L.llama_token * cap)()
            n = L.llama_tokenize(self.vocab, data, len(data), buf, cap, False, parse_special)
            if n < 0:
                cap = -n
                buf = (L.llama_token * cap)()
                n = L.llama_tokenize(self.vocab, data, len(data), buf, cap, False, parse_special)
            out += buf[:n]
        if add_special and L.llama_vocab_get_add_eos(self.vocab):
            out.append(self.eos_id)
        return out

    def piece(self, token: int, *, special: bool = True) -> bytes:
        """The bytes of one token (control tokens as their text when `special`); none for the
        pseudo-ids that stand for image embeddings in a prompt (< 0)."""
        if token < 0:
            return b""
        L = llama()
        buf = ctypes.create_string_buffer(64)
        n = L.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = L.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def detokenize(self, tokens: list[int], *, special: bool = True) -> str:
        return b"".join(self.piece(t, special=special) for t in tokens).decode("utf-8", "replace")

    # ----------------------------------------------------------------------------- evaluation
    def _decode(self, tokens: list[int], start_pos: int, want_all: bool, out: np.ndarray | None = None) -> None:
        """Evaluate `tokens` at positions start_pos.. in batches; logits for the last (or all),
        copied into `out` (one row per token) after each batch when given."""
        L = llama()
        b = self._batch
        step = self.options.batch_size
        for off in range(0, len(tokens), step):
            part = tokens[off:off + step]
            b.n_tokens = len(part)
            for i, tok in enumerate(part):
                b.token[i] = tok
                b.pos[i] = start_pos + off + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = 0
                b.logits[i] = want_all or (off + i == len(tokens) - 1)
            mark = log_mark()
            rc = L.llama_decode(self.ctx, b)
            if rc != 0:
                raise ContextError(f"llama_decode failed (code {rc}): {_last_error(mark)}")
            if out is not None:
                self._copy_logits(out[off:off + len(part)])

    def _sync_prefix(self, tokens: list[int]) -> int:
        """Drop the cached tail that differs from `tokens`; return how many tokens are reused.

        At least the last prompt token is always evaluated again so that its logits exist.
        """
        L = llama()
        cached = self._state.tokens
        keep = 0
        limit = min(len(cached), len(tokens) - 1)
        while keep < limit and cached[keep] == tokens[keep]:
            keep += 1
        while 0 < keep < len(tokens) and tokens[keep] < 0 and _pseudo(tokens[keep])[1] > 0:
            keep -= 1  # never keep part of an image: its embeddings are evaluated whole
        # Trim even when the recorded tokens are all kept: a decode interrupted before its token
        # was recorded (Ctrl-C between llama_decode and the append) leaves positions in the KV
        # cache that the list does not know about, and the next decode at those positions fails.
        mem = L.llama_get_memory(self.ctx)
        if not L.llama_memory_seq_rm(mem, 0, keep, -1):
            L.llama_memory_clear(mem, True)
            keep = 0
        del cached[keep:]
        return keep

    def reset(self) -> None:
        L = llama()
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        self._state.tokens.clear()

    def logits(self, tokens: list[int]) -> np.ndarray:
        """Logits [len(tokens), n_vocab] for every position of a fresh evaluation (tests, eval)."""
        if len(tokens) > self.n_ctx:
            raise ContextError(f"{len(tokens)} tokens do not fit in the context of {self.n_ctx}")
        self.reset()
        out = np.empty((len(tokens), self.n_vocab), dtype=np.float32)
        self._evaluate(list(tokens), 0, want_all=True, out=out)
        return out

    # ----------------------------------------------------------------------------- generation
    def render(self, messages: list[dict[str, Any]], *, reasoning_effort: str | None = None,
               tools: list[dict[str, Any]] | None = None) -> str:
        template = self.chat_template
        if not template:
            raise ContextError(f"{self.path.name} has no chat template; re-convert it with `ms4local quantize`")
        return render(template, messages, reasoning_effort=reasoning_effort, tools=tools,
                      bos_token=self.piece(self.bos_id).decode("utf-8", "replace"),
                      eos_token=self.piece(self.eos_id).decode("utf-8", "replace"))

    def prompt_tokens(self, messages: list[dict[str, Any]], *, reasoning_effort: str | None = None,
                      tools: list[dict[str, Any]] | None = None) -> list[int]:
        """The ids the engine evaluates for a conversation (the template already emits BOS).

        Control tokens come from the template only: text inside a message that reads like one
        ("[INST]", "</s>") is tokenized as the plain text it is, as mistral-common does.
        Image parts (ImageError if unusable, or without a projector) become one negative
        pseudo-id per image embedding, followed by [IMG_END]; `generate` evaluates those runs as
        the image's embeddings, and `len()` counts them as the context positions they take.
        """
        template = self.chat_template
        if not template:
            raise ContextError(f"{self.path.name} has no chat template; re-convert it with `ms4local quantize`")
        text, ranges = render_marked(template, messages, reasoning_effort=reasoning_effort, tools=tools,
                                     bos_token=self.piece(self.bos_id).decode("utf-8", "replace"),
                                     eos_token=self.piece(self.eos_id).decode("utf-8", "replace"))
        ids = self._template_tokens(text, ranges)
        parts = image_parts(messages)
        if not parts:
            return ids
        if self._vision is None:
            raise ImageError(f"{self.path.name} has no vision projector loaded, so it cannot read images; "
                             "put its mmproj-*.gguf beside it or pass --mmproj")
        # Images: each [IMG] the template wrote (message text cannot make one, see above) becomes
        # a run of pseudo-ids, negative numbers derived from the image, that `generate` evaluates
        # as the image's embeddings; they compare equal across turns like any token.
        return self._with_images(ids, messages, parts, reasoning_effort=reasoning_effort, tools=tools,
                                 bos_token=self.piece(self.bos_id).decode("utf-8", "replace"),
                                 eos_token=self.piece(self.eos_id).decode("utf-8", "replace"))

    @property
    def _specials(self) -> SpecialTokens:
        """The texts of the tokens matched whole in text (control, user-defined), with their ids."""
        if self.tokenizer is not None:
            return self.tokenizer.specials
        if self.__dict__.get("_llama_specials") is None:
            L = llama()
            mask = L.LLAMA_TOKEN_ATTR_CONTROL | L.LLAMA_TOKEN_ATTR_USER_DEFINED
            texts: dict[str, int] = {}
            for t in range(self.n_vocab):
                if L.llama_vocab_get_attr(self.vocab, t) & mask:
                    texts.setdefault(self.piece(t).decode("utf-8", "replace"), t)
            self._llama_specials = SpecialTokens(texts)
        return self._llama_specials

    def _template_tokens(self, text: str, ranges: list[tuple[int, int]]) -> list[int]:
        """Ids of a rendered prompt: control tokens where the template wrote them, everything else
        as plain text, including control-token text inside a message (`ranges`, character spans),
        as mistral-common encodes each message's text."""
        specials = self._specials
        out: list[int] = []
        pos = 0
        for m in specials.finditer(text):
            a, b = m.span()
            if any(lo < b and a < hi for lo, hi in ranges):
                continue  # typed in a message: stays text
            if a > pos:
                out += self.tokenize(text[pos:a], parse_special=False)
            out.append(specials[m.group()])
            pos = b
        if pos < len(text):
            out += self.tokenize(text[pos:], parse_special=False)
        return out

    def _sampler(self, s: Sampling) -> Any:
        L = llama()
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        if s.grammar:
            check_grammar(s.grammar)  # llama.cpp expands repetitions: bounded before it parses
            # First in the chain: the later samplers then only ever see tokens the grammar allows.
            mark = log_mark()
            grammar = L.llama_sampler_init_grammar(self.vocab, s.grammar.encode("utf-8"), b"root")
            if not grammar:
                L.llama_sampler_free(chain)
                raise PromptError(f"llama.cpp cannot parse the grammar: {_last_error(mark)[:300]}")
            L.llama_sampler_chain_add(chain, grammar)
        if s.logit_bias:
            bad = [t for t, _ in s.logit_bias if not 0 <= t < self.n_vocab]
            if bad:
                L.llama_sampler_free(chain)
                raise PromptError(f"logit_bias names token {bad[0]}, outside the vocabulary (0..{self.n_vocab - 1})")
            biases = (L.llama_logit_bias * len(s.logit_bias))(*(L.llama_logit_bias(t, b) for t, b in s.logit_bias))
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_logit_bias(self.n_vocab, len(biases), biases))
        if s.repeat_penalty != 1.0:
            # This llama.cpp's signature: (n_vocab, last_n, repeat, frequency, presence). The window
            # is the last 64 tokens generated (llama.cpp's default --repeat-last-n).
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_penalties(self.n_vocab, 64, s.repeat_penalty,
                                                                            0.0, 0.0))
        if s.temperature <= 0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
            return chain
        if 0 < s.top_k < self.n_vocab:  # 0, or at least the vocabulary: every token stays
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_k(s.top_k))
        if s.top_p < 1.0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_p(s.top_p, 1))
        if s.min_p > 0.0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_min_p(s.min_p, 1))
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp(s.temperature))
        seed = s.seed if s.seed is not None else int.from_bytes(os.urandom(4), "little")
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return chain

    def generate(self, prompt: list[int], sampling: Sampling | None = None) -> Iterator[Event]:
        """Stream the continuation of `prompt`: `Delta`s (answer or reasoning text), tool-call
        events (`ToolCallDelta` as arguments stream, then `ToolCall` or `MalformedToolCall`), then
        one `Done`.

        Generated ids go through `StreamParser` in token mode: only the vocabulary's control
        tokens are tags, so text that merely reads "[THINK]" stays text.
        """
        L = llama()
        s = sampling or Sampling()
        if len(prompt) >= self.n_ctx:
            raise ContextError(f"the prompt has {len(prompt)} tokens but the context holds {self.n_ctx}; raise -c")
        t0 = time.perf_counter()
        cached = self._sync_prefix(prompt)
        todo = prompt[cached:]
        self._evaluate(todo, cached)
        t_prompt = time.perf_counter() - t0
        chain = self._sampler(s)
        text = _TokenText(self)
        produced = 0
        finish = "length"
        ttft = None
        t_dec = time.perf_counter()
        try:
            while produced < s.max_tokens and len(self._state.tokens) < self.n_ctx:
                tok = L.llama_sampler_sample(chain, self.ctx, -1)
                produced += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
                if L.llama_vocab_is_eog(self.vocab, tok):
                    finish = "stop"
                    break
                yield from text.feed(tok)
                self._decode([tok], len(self._state.tokens), want_all=False)
                self._state.tokens.append(tok)
            yield from text.finish()
        finally:
            L.llama_sampler_free(chain)
        decode_s = time.perf_counter() - t_dec
        yield Done(
            finish_reason=text.finish_reason(finish),
            usage=Usage(prompt_tokens=len(prompt), completion_tokens=produced, cached_tokens=cached),
            timings=Timings(len(todo), t_prompt, ttft if ttft is not None else t_prompt, decode_s, produced),
            unclosed_reasoning=text.unclosed,
            tool_calls=tuple(text.calls),
        )

    def chat(self, messages: list[dict[str, Any]], sampling: Sampling | None = None, *,
             reasoning_effort: str | None = None, tools: list[dict[str, Any]] | None = None) -> ChatStream:
        """Render the conversation with the GGUF's template and stream the answer.

        When the conversation no longer fits, the oldest turns are left out (system messages
        never are) and `dropped_messages`, on the returned stream at once and on its `Done`, says
        how many non-system messages from the start were dropped. A caller that drops the same
        messages from its history keeps the prompt prefix stable, so the next turn reuses the KV
        cache instead of evaluating everything.
        """
        s = sampling or Sampling()
        prompt, dropped = self._fit_conversation(messages, s, reasoning_effort, tools)
        return ChatStream(self.generate(prompt, s), dropped)

    def _fit_conversation(self, messages: list[dict[str, Any]], s: Sampling, reasoning_effort: str | None,
                          tools: list[dict[str, Any]] | None) -> tuple[list[int], int]:
        """The prompt ids, dropping whole turns from the oldest when it does not fit; (ids, messages dropped).

        "Fits" leaves room to answer: min(max_tokens, n_ctx/4) tokens. A turn starts at a user
        message; the last one is never dropped. When turns must go, enough go that the prompt
        takes at most half the context (as llama.cpp's context shift discards half): dropping
        only the fewest would make every following turn drop one more, change the prompt's
        prefix each time and so evaluate it all again. If even the system prompt and the last
        turn leave no room, they are still used as long as they fit at all (the answer may stop
        at "length").

        The cost of finding the cut follows what is kept, not the history: each turn is rendered
        alone, newest first, and the costs are summed until the context is exceeded; only the
        chosen prompt is rendered whole (and checked, since the sum is an estimate).
        """
        opts = {"reasoning_effort": reasoning_effort, "tools": tools}
        limit = self.n_ctx - min(max(s.max_tokens, 0), self.n_ctx // 4)

        def ids(cut: int) -> list[int]:
            return self.prompt_tokens([m for i, m in enumerate(messages) if i >= cut or _is_system(m)], **opts)

        def dropped(cut: int) -> int:
            return sum(1 for m in messages[:cut] if not _is_system(m))

        starts, seen = [], False  # user messages with a non-system message before them
        for i, m in enumerate(messages):
            if seen and m.get("role") == "user":
                starts.append(i)
            seen = seen or not _is_system(m)
        if not starts:
            return ids(0), 0  # nothing to drop; generate() judges whether it fits at all
        bounds = [0] + starts + [len(messages)]  # turn k is messages[bounds[k]:bounds[k + 1]]

        def alone(k: int, n: int = 1) -> int:
            return len(self.prompt_tokens([m for m in messages[bounds[k]:bounds[k + n]] if not _is_system(m)], **opts))

        last = len(starts)  # the index of the newest turn
        minimal = ids(starts[-1])  # the system prompt and the last turn: nothing can be smaller
        if len(minimal) > limit:
            if len(minimal) >= self.n_ctx:
                raise ContextError(f"the system prompt and the last message alone take {len(minimal)} tokens "
                                   f"but the context holds {self.n_ctx}; raise -c")
            return minimal, dropped(starts[-1])
        try:
            # What rendering one turn alone costs beyond its own text (BOS, a default system prompt).
            overhead = alone(last - 1) + alone(last) - alone(last - 1, 2)
            costs: dict[int, int] = {}
            total, k = len(minimal), last
            while k > 0 and total <= limit:
                k -= 1
                costs[k] = alone(k) - overhead
                total += costs[k]
        except PromptError:  # a turn the template will not render alone: judge whole prompts only
            return self._fit_exact(ids, dropped, starts, limit)
        if total <= limit:  # every turn fits (by the estimate): the whole prompt, checked
            prompt = ids(0)
            if len(prompt) <= limit:
                return prompt, 0
        # Keep the newest turns whose estimate stays within half the context, at least the last.
        target = min(limit, self.n_ctx // 2)
        total, first = len(minimal), last
        while first - 1 in costs and first - 1 > 0 and total + costs[first - 1] <= target:
            first -= 1
            total += costs[first]
        while True:
            prompt = ids(bounds[first])
            if len(prompt) <= limit or first == last:
                return prompt, dropped(bounds[first])
            first += 1  # the estimate was short: one turn more goes

    def _fit_exact(self, ids: Callable[[int], list[int]], dropped: Callable[[int], int], starts: list[int],
                   limit: int) -> tuple[list[int], int]:
        """The fewest dropped turns that fit, by a binary search over whole renders (for a template
        that refuses to render a turn alone)."""
        prompt = ids(0)
        if len(prompt) <= limit:
            return prompt, 0
        lo, hi, best = 0, len(starts) - 1, len(starts) - 1
        while lo <= hi:
            mid = (lo + hi) // 2
            if len(ids(starts[mid])) <= limit:
                best, hi = mid, mid - 1
            else:
                lo = mid + 1
        return ids(starts[best]), dropped(starts[best])

    # ----------------------------------------------------------------------------- stats
    @property
    def cached_tokens(self) -> list[int]:
        """The token ids whose keys are in the KV cache, in order (a copy)."""
        return list(self._state.tokens)

    def perf(self) -> dict[str, int]:
        """llama.cpp's own counters since the context was made (or `reset_perf`): `prompt_eval`
        counts tokens evaluated in batches of two or more, `eval` single-token steps.

        llama.cpp reports at least 1 for each (a fresh context says 1/1), and counts a batch
        only once it has been waited for, so this synchronises first.
        """
        L = llama()
        L.llama_synchronize(self.ctx)
        d = L.llama_perf_context(self.ctx)
        return {"prompt_eval": int(d.n_p_eval), "eval": int(d.n_eval)}

    def reset_perf(self) -> None:
        llama().llama_perf_context_reset(self.ctx)

    # ----------------------------------------------------------------------------- lifetime
    def close(self) -> None:
        L = llama()
        if getattr(self, "_vision", None) is not None:
            mtmd().mtmd_free(self._vision.ctx)
            self._vision = None
        if getattr(self, "_embd_batch", None) is not None:
            L.llama_batch_free(self._embd_batch)
            self._embd_batch = None
        if getattr(self, "_batch", None) is not None:
            L.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "ctx", None):
            L.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            L.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


# ----------------------------------------------------------------------------- serving: grammars, batched slots
class _TokenText:
    """Generated ids → events, for `Engine.generate` and for each `Slots` run: UTF-8 decoded
    across token boundaries, then (unless `raw`) `StreamParser` in token mode, so that only the
    vocabulary's control tokens are tags and text that merely reads "[THINK]" stays text. `raw`
    (completions) gives the text as generated, control tokens as their text."""

    def __init__(self, engine: Engine, raw: bool = False) -> None:
        self.engine = engine
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.parser = None if raw else StreamParser(engine.tags)
        self.calls: list[ToolCall] = []
        self.unclosed = False

    def feed(self, tok: int) -> list[Event]:
        piece = self.engine.piece(tok)
        if self.parser is None:
            text = self.decoder.decode(piece)
            return [Delta(text)] if text else []
        if tok in self.engine.tags.ids:  # a tag: flush the text before it, then the tag itself
            text = self.decoder.decode(b"", final=True)
            out = self._events(self.parser.feed(text)) if text else []
            return out + self._events(self.parser.feed(piece.decode("utf-8", "replace"), token=tok))
        text = self.decoder.decode(piece)
        return self._events(self.parser.feed(text, token=tok)) if text else []

    def finish(self) -> list[Event]:
        tail = self.decoder.decode(b"", final=True)
        if self.parser is None:
            return [Delta(tail)] if tail else []
        out = self._events(self.parser.feed(tail)) if tail else []
        return out + self._events(self.parser.finish())

    def finish_reason(self, finish: str) -> str:
        return "tool_calls" if self.calls and finish == "stop" else finish

    def _events(self, batch: list[StreamEvent]) -> list[Event]:
        out: list[Event] = []
        for ev in batch:
            if isinstance(ev, ContentDelta):
                out.append(Delta(ev.text))
            elif isinstance(ev, ReasoningDelta):
                out.append(Delta(ev.text, reasoning=True))
            elif isinstance(ev, End):
                self.unclosed = ev.unclosed_reasoning
            else:
                if isinstance(ev, ToolCall):
                    self.calls.append(ev)
                out.append(ev)
        return out


@dataclass
class _Run:
    """One generation in a slot: what is left to evaluate, and its decoding state."""

    seq: int
    prompt: list[int]
    todo: list[int]
    sampling: Sampling
    chain: Any
    text: _TokenText
    cached: int
    t0: float
    pending: int | None = None  # the sampled id, evaluated in the next step
    produced: int = 0
    t_prompt: float | None = None
    ttft: float | None = None
    t_dec: float = 0.0


class Slots:
    """N conversations decoding together in one llama context: llama.cpp sequences 0..N-1.

    The engine's context must have been made with `EngineOptions(parallel=N)`; from then on the
    slots own its KV cache (`Engine.generate`/`chat` must not run beside them). Each `step` is one
    `llama_decode` that carries the next token of every slot that is decoding and, in the room left
    in the batch, the next chunk of prompts being read, so a long prompt never stalls the others.
    Each slot keeps the ids its cells hold; a new run in a slot keeps the longest common prefix
    (trimmed with `llama_memory_seq_rm`: an MLA cache cannot be shifted, only cut at the end) and
    `best_slot` picks the free slot that reuses most. Not thread-safe: one thread drives it.
    """

    def __init__(self, engine: Engine) -> None:
        L = llama()
        if engine.ctx is None:
            raise ContextError("the engine has no context (loaded with vocab_only?)")
        self.engine = engine
        self.n = int(L.llama_n_seq_max(engine.ctx))
        self.n_ctx = int(L.llama_n_ctx_seq(engine.ctx))  # cells per sequence
        self.cached: list[list[int]] = [[] for _ in range(self.n)]
        self.runs: dict[int, _Run] = {}
        self._last_used = [0.0] * self.n
        self._cap = max(engine.options.batch_size, self.n)
        self._batch = L.llama_batch_init(self._cap, 0, 1)
        self.sampled = 0  # ids sampled by all slots since they were made (throughput metrics)
        engine.reset()  # sequence 0's cells belong to the slots from now on

    def close(self) -> None:
        L = llama()
        for seq in list(self.runs):
            self.stop(seq)
        if self._batch is not None:
            L.llama_batch_free(self._batch)
            self._batch = None

    # ------------------------------------------------------------------ admission
    def free(self) -> list[int]:
        return [s for s in range(self.n) if s not in self.runs]

    def best_slot(self, prompt: list[int]) -> int | None:
        """The free slot whose cache shares the longest prefix with `prompt` (ties: least recently
        used, so that a conversation's cache survives as long as possible); None when all are busy."""
        free = self.free()
        if not free:
            return None
        return max(free, key=lambda s: (self._common(s, prompt), -self._last_used[s]))

    def _common(self, seq: int, prompt: list[int]) -> int:
        cached = self.cached[seq]
        limit = min(len(cached), len(prompt) - 1)  # the last prompt id is always evaluated again
        keep = 0
        while keep < limit and cached[keep] == prompt[keep]:
            keep += 1
        while 0 < keep < len(prompt) and prompt[keep] < 0 and _pseudo(prompt[keep])[1] > 0:
            keep -= 1  # never keep part of an image: its embeddings are evaluated whole
        return keep

    def start(self, seq: int, prompt: list[int], sampling: Sampling, *, raw: bool = False) -> int:
        """Begin a generation in free slot `seq`; returns how many prompt ids its cache reuses.

        `raw`: the text as generated, control tokens as their text (completions); otherwise the
        output goes through `StreamParser` as in `generate`. Raises ContextError when the prompt
        leaves no room to answer in one slot, PromptError for a grammar llama.cpp refuses.
        """
        L = llama()
        if seq in self.runs:
            raise RuntimeError(f"slot {seq} is busy")
        if not prompt:
            raise PromptError("the prompt is empty")
        if len(prompt) >= self.n_ctx:
            raise ContextError(f"the prompt has {len(prompt)} tokens but a conversation holds at most {self.n_ctx}")
        chain = self.engine._sampler(sampling)
        try:
            keep = self._common(seq, prompt)
            mem = L.llama_get_memory(self.engine.ctx)
            if not L.llama_memory_seq_rm(mem, seq, keep, -1):
                L.llama_memory_seq_rm(mem, seq, -1, -1)
                keep = 0
            del self.cached[seq][keep:]
            run = _Run(seq=seq, prompt=prompt, todo=prompt[keep:], sampling=sampling, chain=chain,
                       text=_TokenText(self.engine, raw), cached=keep, t0=time.perf_counter())
        except BaseException:  # the slot stays free and its sampler is not leaked
            L.llama_sampler_free(chain)
            raise
        self.runs[seq] = run
        self._last_used[seq] = time.monotonic()
        return keep

    def end(self, seq: int, finish_reason: str) -> list[Event]:
        """End the run in `seq` as finished (a stop string was seen): its last events and `Done`."""
        run = self.runs.get(seq)
        return [] if run is None else self._finish(run, finish_reason, [])

    def stop(self, seq: int) -> None:
        """End the run in `seq` now (a client went away); what its cells hold stays reusable."""
        run = self.runs.pop(seq, None)
        if run is not None:
            llama().llama_sampler_free(run.chain)
            self._last_used[seq] = time.monotonic()

    # ------------------------------------------------------------------ one step
    def step(self) -> list[tuple[int, Event]]:
        """One decode for every busy slot; returns the events it produced as (slot, event), a
        slot's last being its `Done` (the slot is then free). Raises ContextError if llama.cpp
        fails the batch; the caller should then `stop` every run."""
        L = llama()
        out: list[tuple[int, Event]] = []
        for run in list(self.runs.values()):  # images first, each in its own embedding batches
            if run.todo and run.todo[0] < 0:
                self._evaluate_image(run)
        b = self._batch
        entries: list[tuple[_Run, bool]] = []  # (run, samples here) per batch row
        n = 0
        for run in self.runs.values():
            if run.pending is not None:
                self._put(b, n, run.pending, len(self.cached[run.seq]), run.seq, True)
                self.cached[run.seq].append(run.pending)
                run.pending = None
                entries.append((run, True))
                n += 1
        for run in self.runs.values():
            if not run.todo or run.todo[0] < 0 or n >= self._cap:
                continue
            k = 0
            while k < len(run.todo) and run.todo[k] >= 0 and n + k < self._cap:
                k += 1
            chunk, run.todo = run.todo[:k], run.todo[k:]
            for i, tok in enumerate(chunk):
                last = not run.todo and i == k - 1
                self._put(b, n, tok, len(self.cached[run.seq]), run.seq, last)
                self.cached[run.seq].append(tok)
                entries.append((run, last))
                n += 1
        for run in list(self.runs.values()):  # a prompt that ended with an image samples without a row
            if not run.todo and run.pending is None and run.t_prompt is None and not any(r is run for r, _ in entries):
                raise ContextError("a prompt cannot end with an image")  # the template always closes the turn
        if n == 0:
            return out
        b.n_tokens = n
        mark = log_mark()
        rc = L.llama_decode(self.engine.ctx, b)
        if rc != 0:
            for run, _ in entries:  # the cells of this batch are in an unknown state: forget them
                self.cached[run.seq] = self.cached[run.seq][:0]
                L.llama_memory_seq_rm(L.llama_get_memory(self.engine.ctx), run.seq, -1, -1)
            raise ContextError(f"llama_decode failed (code {rc}): {_last_error(mark)}")
        for i, (run, samples) in enumerate(entries):
            if samples and run.seq in self.runs:
                out += [(run.seq, ev) for ev in self._sample(run, i)]
        return out

    @staticmethod
    def _put(b: Any, i: int, tok: int, pos: int, seq: int, logits: bool) -> None:
        b.token[i] = tok
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq
        b.logits[i] = logits

    def _evaluate_image(self, run: _Run) -> None:
        """Evaluate the image that starts `run.todo` as embeddings in the run's sequence."""
        e = self.engine
        serial, offset = _pseudo(run.todo[0])
        entry = e._image_serials.get(serial)
        if entry is None or offset != 0 or run.todo[:entry.n_tokens] != entry.ids:
            raise ContextError("the prompt holds image ids this engine did not make")
        e._decode_embd(e._encode_image(entry), len(self.cached[run.seq]), False, seq=run.seq)
        self.cached[run.seq] += run.todo[:entry.n_tokens]
        run.todo = run.todo[entry.n_tokens:]

    def _sample(self, run: _Run, index: int) -> list[Event]:
        """Sample the run's next id from batch row `index`; its events (and `Done` when it ends)."""
        L = llama()
        e = self.engine
        now = time.perf_counter()
        if run.t_prompt is None:
            run.t_prompt = now - run.t0
            run.t_dec = now
        if run.produced >= run.sampling.max_tokens:
            return self._finish(run, "length", [])
        tok = L.llama_sampler_sample(run.chain, e.ctx, index)
        run.produced += 1
        self.sampled += 1
        if run.ttft is None:
            run.ttft = time.perf_counter() - run.t0
        if L.llama_vocab_is_eog(e.vocab, tok):
            return self._finish(run, "stop", [])
        events = run.text.feed(tok)
        if run.produced >= run.sampling.max_tokens or len(self.cached[run.seq]) + 1 >= self.n_ctx:
            return self._finish(run, "length", events)
        run.pending = tok
        return events

    def _finish(self, run: _Run, finish: str, events: list[Event]) -> list[Event]:
        events += run.text.finish()
        now = time.perf_counter()
        t_prompt = run.t_prompt if run.t_prompt is not None else now - run.t0
        events.append(Done(
            finish_reason=run.text.finish_reason(finish),
            usage=Usage(prompt_tokens=len(run.prompt), completion_tokens=run.produced, cached_tokens=run.cached),
            timings=Timings(len(run.prompt) - run.cached, t_prompt, run.ttft if run.ttft is not None else t_prompt,
                            now - run.t_dec if run.t_dec else 0.0, run.produced),
            unclosed_reasoning=run.text.unclosed, tool_calls=tuple(run.text.calls)))
        self.stop(run.seq)
        return events
