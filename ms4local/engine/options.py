"""How to load and run a model: `EngineOptions` (llama.cpp's flag names, checked before anything
loads) and `Sampling` (the one place sampling defaults are written). No llama.cpp needed here,
so the CLI and the server can build and check options without loading the library.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ModelLoadError, OptionsError
from ..images import DEFAULT_MAX_TOKENS
from ..gguf_model import ModelInfo
from ..placement import CACHE_TYPES, kv_cache_bytes
from ..rpc import parse_endpoints

KV_TYPES = {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "iq4_nl": 20}

@dataclass
class EngineOptions:
    """How to load the model, place it on devices and size its context (llama.cpp's flag names).

    Placement: `n_gpu_layers` None means "all when a GPU is present"; -1 is all, 0 none.
    `cpu_moe` / `n_cpu_moe` / `override_tensor` keep tensors in RAM as llama.cpp's --cpu-moe,
    --n-cpu-moe and -ot do. `fit` None turns the planner on when a GPU is present and no
    placement was given by hand (with `rpc`: only when asked); `vram` (bytes) replaces the (main)
    device's free memory in that plan.
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
    # How llama.cpp reads the weights (its -lm/--load-mode): auto, none (read into RAM), mmap, mlock,
    # mmap+mlock, dio (direct I/O).
    load_mode: str = "auto"
    vocab_only: bool = False  # tokenizer and metadata only (fast; no weights, no context)
    cpu_moe: bool = False
    n_cpu_moe: int = 0
    override_tensor: list[str] = field(default_factory=list)  # "REGEX=BUFT"; the first match wins
    # Share of the offloaded layers per device, in llama.cpp's device order (the --rpc servers'
    # devices first, then the local GPUs); empty: in proportion to each device's free memory.
    tensor_split: list[float] = field(default_factory=list)
    # llama.cpp rpc-servers ("HOST:PORT") whose devices take layers like local GPUs, probed before use.
    rpc: list[str] = field(default_factory=list)
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
    # Make third-party files right at load (engine/repair.py): the Llama-4 query temperature keys
    # llama.cpp's converter omits, and an mmproj without its [IMG_BREAK] row. `--no-repair` turns it off.
    repair: bool = True

    @property
    def manual_placement(self) -> bool:
        """Whether the user placed tensors by hand (then --fit stays off unless asked)."""
        return (self.n_gpu_layers is not None or self.cpu_moe or self.n_cpu_moe > 0 or bool(self.override_tensor)
                or bool(self.tensor_split))

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
        if self.load_mode not in LOAD_MODES:
            raise OptionsError(f"-lm/--load-mode must be one of {', '.join(LOAD_MODES)}, got {self.load_mode!r}")
        for flag, value in (("-ctk/--cache-type-k", self.type_k), ("-ctv/--cache-type-v", self.type_v)):
            if value not in KV_TYPES:
                raise OptionsError(f"{flag} must be one of {', '.join(KV_TYPES)}, got {value!r}")
        if self.n_gpu_layers is not None and self.n_gpu_layers < -1:
            raise OptionsError(f"-ngl/--n-gpu-layers must be a number of layers or 'all', got {self.n_gpu_layers}")
        if self.n_cpu_moe < 0:
            raise OptionsError(f"--n-cpu-moe must be 0 or more, got {self.n_cpu_moe}")
        for rule in self.override_tensor:
            parse_override(rule)
        if self.tensor_split:
            if len(self.tensor_split) > MAX_DEVICES:
                raise OptionsError(f"-ts/--tensor-split takes at most {MAX_DEVICES} shares, got {len(self.tensor_split)}")
            if any(not x >= 0 for x in self.tensor_split) or not any(x > 0 for x in self.tensor_split):
                raise OptionsError("-ts/--tensor-split wants shares of 0 or more, at least one above 0 (e.g. 3,1)")
        if self.rpc:
            parse_endpoints(self.rpc)
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
            raise OptionsError("--fit chooses -ngl and the expert placement itself; drop -ngl/-ts/--cpu-moe/"
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


MAX_DEVICES = 16  # llama_max_devices(): the length of llama.cpp's tensor_split array
MAX_CTX = 2**32 - 256  # llama.cpp's uint32 n_ctx, rounded up to its 256-cell padding
FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}
LOAD_MODES = {"auto": -1, "none": 0, "mmap": 1, "mlock": 2, "mmap+mlock": 3, "dio": 4}  # llama.h's llama_load_mode
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
    """How to pick each token (llama.cpp's sampler chain, in its order): the defaults here are the
    ones `chat`, `serve` and the Python API share."""

    temperature: float = 0.7
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    max_tokens: int = 512
    seed: int | None = None  # None: random
    # GBNF the output must match (llama.cpp's grammar syntax; `<[ID]>` is one token by id, as the
    # server uses for [TOOL_CALLS]/[ARGS]); None: unconstrained. See `grammar.json_grammar`.
    grammar: str | None = None
    # OpenAI's logit_bias: (token id, bias added to its logit) pairs; -100 bans a token in practice.
    logit_bias: tuple[tuple[int, float], ...] = ()


