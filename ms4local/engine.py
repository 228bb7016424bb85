"""The inference engine: the only module that imports `llama_cpp`.

It drives llama.cpp's low-level API rather than llama-cpp-python's `Llama` class, because the
model needs things that class cannot do: llama.cpp's log captured through a callback (not by
redirecting the process's stdout/stderr, which hides load errors), a load progress callback,
control tokens kept in the streamed text (`[THINK]`…), and our own KV-cache bookkeeping (MLA
caches cannot be shifted, only trimmed from the end, so we keep the evaluated token sequence and
evaluate only what differs from it).

The engine yields small dataclasses (`Delta`, `Done`); presentation lives in the CLI/UI.
"""

from __future__ import annotations

import codecs
import ctypes
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ContextError, ModelLoadError
from .prompt import render

_llama: Any = None
_log_lock = threading.Lock()
_log_lines: deque[tuple[int, str]] = deque(maxlen=4000)
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
            line = text.decode("utf-8", "replace") if text else ""
            with _log_lock:
                _log_lines.append((int(level), line))
            if _log_listener is not None:
                _log_listener(int(level), line)

        _log_cb_ref = llama_cpp.llama_log_callback(on_log)
        llama_cpp.llama_log_set(_log_cb_ref, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        _llama = llama_cpp
    return _llama


def set_log_listener(listener: Callable[[int, str], None] | None) -> None:
    """Receive every llama.cpp log line (level, text) as it arrives, e.g. for `--verbose`."""
    global _log_listener
    _log_listener = listener


def log_text(since: int = 0) -> str:
    with _log_lock:
        return "".join(t for _, t in list(_log_lines)[since:])


def _log_mark() -> int:
    with _log_lock:
        return len(_log_lines)


def _last_error(since: int) -> str:
    with _log_lock:
        lines = list(_log_lines)[since:]
    errors = [t.strip() for lvl, t in lines if lvl == GGML_LOG_ERROR and t.strip()]
    if errors:
        return errors[-1]
    tail = [t.strip() for _, t in lines if t.strip()]
    return tail[-1] if tail else "no reason given"


@dataclass
class EngineOptions:
    """How to load the model and size its context (names follow llama.cpp's flags)."""

    ctx_size: int = 4096
    threads: int | None = None
    batch_size: int = 512
    ubatch_size: int = 512
    n_gpu_layers: int = 0
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: str = "auto"  # on | off | auto
    logits_all: bool = False  # keep every position's logits (tests, eval)
    use_mmap: bool = True
    vocab_only: bool = False  # tokenizer and metadata only (fast; no weights, no context)


@dataclass
class Sampling:
    temperature: float = 0.7
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    max_tokens: int = 512
    seed: int | None = None  # None: random


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


@dataclass
class _State:
    tokens: list[int] = field(default_factory=list)


class Engine:
    """A loaded GGUF model with one context. Not thread-safe: one generation at a time."""

    def __init__(self, model_path: str | os.PathLike[str], options: EngineOptions | None = None,
                 progress: Callable[[float], None] | None = None) -> None:
        L = llama()
        self.path = Path(model_path)
        self.options = opts = options or EngineOptions()
        self._state = _State()
        if not self.path.is_file():
            raise ModelLoadError(f"model file {self.path} does not exist")
        if opts.type_k not in KV_TYPES or opts.type_v not in KV_TYPES:
            raise ContextError(f"KV cache types must be among {', '.join(KV_TYPES)}")
        mark = _log_mark()
        mparams = L.llama_model_default_params()
        mparams.n_gpu_layers = opts.n_gpu_layers
        mparams.use_mmap = opts.use_mmap
        mparams.vocab_only = opts.vocab_only

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
        self.think_ids = (self._special_id("[THINK]"), self._special_id("[/THINK]"))
        self.ctx = None
        self._batch = None
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
        cparams.flash_attn_type = {"auto": -1, "off": 0, "on": 1}[opts.flash_attn]
        cparams.no_perf = True
        mark = _log_mark()
        self.ctx = L.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            L.llama_model_free(self.model)
            self.model = None
            raise ContextError(f"llama.cpp could not create a context: {_last_error(mark)}")
        self.n_ctx = L.llama_n_ctx(self.ctx)
        self._batch = L.llama_batch_init(opts.batch_size, 0, 1)

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
    def tokenize(self, text: str, *, add_special: bool = False, parse_special: bool = True) -> list[int]:
        """llama.cpp's token ids for `text` with the model's vocabulary."""
        L = llama()
        data = text.encode("utf-8")
        cap = len(data) + 16
        buf = (L.llama_token * cap)()
        n = L.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = (L.llama_token * cap)()
            n = L.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        return list(buf[:n])

    def piece(self, token: int, *, special: bool = True) -> bytes:
        """The bytes of one token (control tokens as their text when `special`)."""
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
    def _decode(self, tokens: list[int], start_pos: int, want_all: bool) -> None:
        """Evaluate `tokens` at positions start_pos.. in batches; logits for the last (or all)."""
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
            rc = L.llama_decode(self.ctx, b)
            if rc != 0:
                raise ContextError(f"llama_decode failed (code {rc}): {_last_error(0)}")

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
        if keep < len(cached):
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
        L = llama()
        if len(tokens) > self.n_ctx:
            raise ContextError(f"{len(tokens)} tokens do not fit in the context of {self.n_ctx}")
        self.reset()
        self._decode(tokens, 0, want_all=True)
        self._state.tokens = list(tokens)
        out = np.empty((len(tokens), self.n_vocab), dtype=np.float32)
        for i in range(len(tokens)):
            ptr = L.llama_get_logits_ith(self.ctx, i)
            out[i] = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
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
        """The ids the engine evaluates for a conversation (the template already emits BOS)."""
        return self.tokenize(self.render(messages, reasoning_effort=reasoning_effort, tools=tools),
                             add_special=False, parse_special=True)

    def _sampler(self, s: Sampling) -> Any:
        L = llama()
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        if s.repeat_penalty != 1.0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_penalties(64, s.repeat_penalty, 0.0, 0.0))
        if s.temperature <= 0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
            return chain
        if s.top_k > 0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_k(s.top_k))
        if s.top_p < 1.0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_p(s.top_p, 1))
        if s.min_p > 0.0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_min_p(s.min_p, 1))
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp(s.temperature))
        seed = s.seed if s.seed is not None else int.from_bytes(os.urandom(4), "little")
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return chain

    def generate(self, prompt: list[int], sampling: Sampling | None = None) -> Iterator[Delta | Done]:
        """Stream the continuation of `prompt`: `Delta`s, then one `Done`."""
        L = llama()
        s = sampling or Sampling()
        if len(prompt) >= self.n_ctx:
            raise ContextError(f"the prompt has {len(prompt)} tokens but the context holds {self.n_ctx}; raise -c")
        t0 = time.perf_counter()
        cached = self._sync_prefix(prompt)
        todo = prompt[cached:]
        self._decode(todo, cached, want_all=False)
        self._state.tokens.extend(todo)
        t_prompt = time.perf_counter() - t0
        chain = self._sampler(s)
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        think_open, think_close = self.think_ids
        in_reasoning = False
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
                if tok == think_open:
                    in_reasoning = True
                elif tok == think_close:
                    in_reasoning = False
                else:
                    text = decoder.decode(self.piece(tok))
                    if text:
                        yield Delta(text, reasoning=in_reasoning)
                self._decode([tok], len(self._state.tokens), want_all=False)
                self._state.tokens.append(tok)
            tail = decoder.decode(b"", final=True)
            if tail:
                yield Delta(tail, reasoning=in_reasoning)
        finally:
            L.llama_sampler_free(chain)
        decode_s = time.perf_counter() - t_dec
        yield Done(
            finish_reason=finish,
            usage=Usage(prompt_tokens=len(prompt), completion_tokens=produced, cached_tokens=cached),
            timings=Timings(len(todo), t_prompt, ttft if ttft is not None else t_prompt, decode_s, produced),
            unclosed_reasoning=in_reasoning,
        )

    def chat(self, messages: list[dict[str, Any]], sampling: Sampling | None = None, *,
             reasoning_effort: str | None = None, tools: list[dict[str, Any]] | None = None) -> Iterator[Delta | Done]:
        """Render the conversation with the GGUF's template and stream the answer."""
        return self.generate(self.prompt_tokens(messages, reasoning_effort=reasoning_effort, tools=tools), sampling)

    # ----------------------------------------------------------------------------- lifetime
    def close(self) -> None:
        L = llama()
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
