"""The `Engine`: one loaded GGUF model with one context, driven through llama.cpp's low-level API.

It drives llama.cpp's C API rather than llama-cpp-python's `Llama` class, because the model
needs things that class cannot do: llama.cpp's log captured through a callback (library.py), a
load progress callback, control tokens kept in the streamed text (`[THINK]`…), our own
tokenizer (mistral-common's tekken, ms4local/tokenizer.py), and our own KV-cache bookkeeping
(MLA caches cannot be shifted, only trimmed from the end, so we keep the evaluated token
sequence and evaluate only what differs from it). Placement comes from devices.py, images from
vision.py; the engine yields the dataclasses of events.py.
"""

from __future__ import annotations

import ctypes
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ContextError, ImageError, ModelLoadError, Ms4localNotice, PromptError
from ..gguf_model import ModelInfo, find_mmproj, read_vocab
from ..grammar import check_grammar
from ..images import image_parts, load_image
from ..prompt import image_order, render, render_marked
from ..stream import Tags
from ..tokenizer import NotTekken, SpecialTokens, Tokenizer, check_text, llama_safe_segments
from .devices import Placement, gpu_devices, model_device_handles, override_array, override_rules, place
from .events import ChatStream, Done, Event, Timings, Usage
from .library import kv_override_array, last_error, llama, log_mark, put_row
from .repair import describe, has_img_break, load_failure, repaired_mmproj, temperature_overrides, unit_temperature
from .options import FLASH_ATTN, KV_TYPES, LOAD_MODES, EngineOptions, Sampling, check_cache_types, check_model_path
from .token_events import TokenEvents
from .vision import Vision, reusable_prefix


def _is_system(message: dict[str, Any]) -> bool:
    return message.get("role") in ("system", "developer")


@dataclass
class _State:
    tokens: list[int] = field(default_factory=list)


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
        self.vision: Vision | None = None  # the projector, when one is loaded
        self._pieces: dict[bool, dict[int, bytes]] = {True: {}, False: {}}  # `piece` by `special`
        self.mmproj: Path | None = None  # the vision projector in use
        check_model_path(self.path)
        opts.check()
        info = None
        self.placement = Placement(opts)
        if not opts.vocab_only:
            # The header is read before llama.cpp loads anything (once: by `place`, or by the
            # caller's `place`), so that a cache type or a placement that cannot work is explained
            # in seconds, not after a 67 GB load. An unreadable header is left to llama.cpp, whose
            # own reason is the one to show.
            self.placement = placement or place(self.path, opts)
            info = self.placement.info
            if info is not None:
                check_cache_types(info, opts.type_k, opts.type_v, opts.flash_attn)
        self.notices: list[str] = list(self.placement.notices)
        popts = self.placement.options
        mark = log_mark()
        mparams = L.llama_model_default_params()
        mparams.n_gpu_layers = -1 if popts.n_gpu_layers is None else popts.n_gpu_layers
        mparams.load_mode = LOAD_MODES[opts.load_mode]
        mparams.vocab_only = opts.vocab_only
        if self.placement.single_gpu is not None:
            mparams.split_mode = 0  # LLAMA_SPLIT_MODE_NONE: the whole model on main_gpu
            mparams.main_gpu = 0
        handles = None if opts.vocab_only else model_device_handles(popts)
        if handles is not None:  # a NULL-terminated ggml_backend_dev_t[], kept alive with the model
            self._devices = (ctypes.c_void_p * (len(handles) + 1))(*handles)
            mparams.devices = ctypes.addressof(self._devices)
        if popts.tensor_split:
            self._split = (ctypes.c_float * L.llama_max_devices())(*popts.tensor_split)
            mparams.tensor_split = ctypes.cast(self._split, ctypes.POINTER(ctypes.c_float))
        self._overrides = override_array(override_rules(popts, info.n_layer if info else None))
        if self._overrides is not None:
            mparams.tensor_buft_overrides = ctypes.addressof(self._overrides)
        self.repairs: list[str] = []  # what was made right at load (repair.py), one line each
        fixes = temperature_overrides(info) if info is not None and opts.repair else {}
        speed = (unit_temperature(info, fixes, opts.ctx_size, opts.parallel)
                 if info is not None and not opts.vocab_only else {})
        self._kv_overrides = kv_override_array({**fixes, **speed})
        if self._kv_overrides is not None:
            mparams.kv_overrides = self._kv_overrides
        if fixes:
            self._notice(describe(fixes, self.path.name))

        def on_progress(p: float, _user: Any) -> bool:
            if progress is not None:
                progress(float(p))
            return True

        self._progress_ref = L.llama_progress_callback(on_progress)
        mparams.progress_callback = self._progress_ref
        self.model = L.llama_model_load_from_file(str(self.path).encode(), mparams)
        if not self.model:
            raise ModelLoadError(load_failure(self.path.name, info, last_error(mark)))
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
            raise ContextError(f"llama.cpp could not create a context: {last_error(mark)}")
        self.n_ctx = L.llama_n_ctx(self.ctx)
        if speed and not unit_temperature(info, fixes, L.llama_n_ctx_seq(self.ctx)):  # sized past L after all
            self.close()
            raise ContextError(f"llama.cpp gave each sequence {L.llama_n_ctx_seq(self.ctx)} tokens from -c "
                               f"{opts.ctx_size}, past the query temperature length the model was loaded for")
        self._batch = L.llama_batch_init(opts.batch_size, 0, 1)
        self.n_embd = L.llama_model_n_embd(self.model)
        if not opts.no_mmproj:
            mmproj = Path(opts.mmproj).expanduser() if opts.mmproj else find_mmproj(self.path, self.n_embd)
            if mmproj is not None:
                # The projector runs on a local GPU only: libmtmd would take the first GPU-type
                # device, and an rpc-server's is one too.
                gpu = self.placement.applied and popts.n_gpu_layers not in (None, 0) and bool(gpu_devices())
                try:
                    usable = self._usable_mmproj(mmproj, info) if opts.repair else mmproj
                    self.vision = Vision(usable, model=self.model, model_name=self.path.name, n_embd=self.n_embd,
                                         img_id=self._special_id("[IMG]"), options=opts, use_gpu=bool(gpu))
                except BaseException:
                    self.close()
                    raise
                self.mmproj = mmproj

    def _notice(self, text: str, repair: bool = True) -> None:
        """Tell the caller once: in `notices`, and as an Ms4localNotice warning (the CLI prints those)."""
        self.notices.append(text)
        if repair:
            self.repairs.append(text)
        warnings.warn(text, Ms4localNotice, stacklevel=3)

    def _usable_mmproj(self, mmproj: Path, info: ModelInfo | None) -> Path:
        """`mmproj`, or a repaired copy when it lacks the [IMG_BREAK] row libmtmd requires (repair.py)."""
        try:
            if has_img_break(mmproj):
                return mmproj
        except ModelLoadError:
            return mmproj  # unreadable: Vision names the reason
        img_break = self._special_id("[IMG_BREAK]")
        if img_break is None or info is None:
            return mmproj
        repaired = repaired_mmproj(mmproj, info, img_break)
        self._notice(f"{mmproj.name} lacks the [IMG_BREAK] row (llama.cpp's converter omits it); using a copy with "
                     f"{self.path.name}'s own row: {repaired} (--no-repair to keep the file as it is)")
        return repaired

    # ----------------------------------------------------------------------------- vision
    @property
    def supports_images(self) -> bool:
        """True when a vision projector is loaded: messages may then carry image parts."""
        return self.vision is not None

    @property
    def images_encoded(self) -> int:
        """Images run through the vision tower so far (a turn that reuses one adds 0)."""
        return 0 if self.vision is None else self.vision.images_encoded

    def load_image(self, source: Any) -> bytes:
        """`ms4local.images.load_image`: validate an image (path, data: URI, bytes) → PNG bytes."""
        return load_image(source)

    def image_embeddings(self, source: Any) -> np.ndarray:
        """The embeddings [n_tokens, n_embd] the model reads for an image (path, data: URI or
        bytes), [IMG_BREAK] rows included — what `chat` evaluates in place of its [IMG]. Encodes
        it (counted in `images_encoded`); the KV cache is not touched."""
        if self.vision is None:
            raise ImageError(f"{self.path.name} has no vision projector loaded")
        return self.vision.encode(self.vision.entry({"type": "image", "image": source}))

    def evaluate_image(self, ids: list[int], start_pos: int, *, seq: int = 0, want_all: bool = False,
                       out: np.ndarray | None = None) -> int:
        """Evaluate the image whose pseudo-ids start `ids` as its embeddings, at positions
        start_pos.. of sequence `seq`; returns how many ids it took. This and `sampler` are what
        `Slots` uses of the engine: the image cache and the embedding batch stay inside."""
        if self.vision is None:
            raise ContextError("the prompt holds image ids but no vision projector is loaded")
        entry = self.vision.lookup(ids)
        embd = np.ascontiguousarray(self.vision.encode(entry), dtype=np.float32)
        L = llama()
        if self._embd_batch is None:
            self._embd_batch = L.llama_batch_init(self.options.batch_size, self.n_embd, 1)
        b = self._embd_batch
        step = self.options.batch_size
        for off in range(0, len(embd), step):
            part = embd[off:off + step]
            b.n_tokens = len(part)
            ctypes.memmove(b.embd, part.ctypes.data, part.nbytes)
            for i in range(len(part)):
                put_row(b, i, start_pos + off + i, seq, want_all)
            mark = log_mark()
            rc = L.llama_decode(self.ctx, b)
            if rc != 0:
                raise ContextError(f"llama_decode of image embeddings failed (code {rc}): {last_error(mark)}")
            if out is not None:
                self._copy_logits(out[off:off + len(part)])
        return entry.n_tokens

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
                j = i + self.evaluate_image(tokens[i:], start_pos + i, want_all=want_all,
                                            out=None if out is None else out[i:])
                run = tokens[i:j]
            self._state.tokens.extend(run)
            i = j

    def _with_images(self, ids: list[int], messages: list[dict[str, Any]], parts: list[dict[str, Any]],
                     **render_kwargs: Any) -> list[int]:
        """Replace each [IMG] the template wrote with the image's pseudo-ids and [IMG_END]."""
        v = self.vision
        assert v is not None
        where = [i for i, t in enumerate(ids) if t == v.img_id]
        if len(where) != len(parts):
            raise PromptError(f"the chat template wrote {len(where)} image markers for {len(parts)} images")
        order = image_order(self.chat_template or "", messages, **render_kwargs) if len(parts) > 1 else [0]
        entries = [v.entry(parts[k]) for k in order]
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
            self._notice(f"{self.path.name}: {e}; its text is tokenized by llama.cpp, whose ids can differ from "
                         "mistral-common's (text with combining marks)", repair=False)
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
        cache = self._pieces[special]  # a token's bytes never change: one llama.cpp call per id
        piece = cache.get(token)
        if piece is None:
            L = llama()
            buf = ctypes.create_string_buffer(64)
            n = L.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = L.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
            piece = cache[token] = buf.raw[:n]
        return piece

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
                put_row(b, i, start_pos + off + i, 0, want_all or (off + i == len(tokens) - 1), token=tok)
            mark = log_mark()
            rc = L.llama_decode(self.ctx, b)
            if rc != 0:
                raise ContextError(f"llama_decode failed (code {rc}): {last_error(mark)}")
            if out is not None:
                self._copy_logits(out[off:off + len(part)])

    def _sync_prefix(self, tokens: list[int]) -> int:
        """Drop the cached tail that differs from `tokens`; return how many tokens are reused.

        At least the last prompt token is always evaluated again so that its logits exist.
        """
        L = llama()
        cached = self._state.tokens
        keep = reusable_prefix(cached, tokens)
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
        if self.vision is None:
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

    def sampler(self, s: Sampling) -> Any:
        """A llama.cpp sampler chain for `s` (grammar first, then biases, penalties and the
        samplers in llama.cpp's order); the caller frees it with `llama_sampler_free`."""
        L = llama()
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        if s.grammar:
            check_grammar(s.grammar)  # llama.cpp expands repetitions: bounded before it parses
            # First in the chain: the later samplers then only ever see tokens the grammar allows.
            mark = log_mark()
            grammar = L.llama_sampler_init_grammar(self.vocab, s.grammar.encode("utf-8"), b"root")
            if not grammar:
                L.llama_sampler_free(chain)
                raise PromptError(f"llama.cpp cannot parse the grammar: {last_error(mark)[:300]}")
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
        chain = self.sampler(s)
        text = TokenEvents(self)
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

    def graphs_reused(self) -> int:
        """How many evaluations since the context was made (or `reset_perf`) reused the previous
        one's compute graph instead of building and allocating a new one (llama.cpp's counter)."""
        return int(llama().llama_perf_context(self.ctx).n_reused)

    def reset_perf(self) -> None:
        llama().llama_perf_context_reset(self.ctx)

    # ----------------------------------------------------------------------------- lifetime
    def close(self) -> None:
        L = llama()
        if getattr(self, "vision", None) is not None:
            self.vision.close()
            self.vision = None
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
