"""`Slots`: N conversations decoding together in one llama context (`serve --parallel N`), as
llama-server's slots do. It uses the engine's public face only: its context and vocabulary,
`sampler` for each run's sampler chain and `evaluate_image` for image embeddings.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from ..errors import ContextError, PromptError
from .core import Engine
from .events import Done, Event, Timings, Usage
from .library import last_error, llama, log_mark, put_row
from .options import Sampling
from .token_events import TokenEvents
from .vision import reusable_prefix


@dataclass
class _Run:
    """One generation in a slot: what is left to evaluate, and its decoding state."""

    seq: int
    prompt: list[int]
    todo: list[int]
    sampling: Sampling
    chain: Any
    text: TokenEvents
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
        return reusable_prefix(self.cached[seq], prompt)

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
        chain = self.engine.sampler(sampling)
        try:
            keep = self._common(seq, prompt)
            mem = L.llama_get_memory(self.engine.ctx)
            if not L.llama_memory_seq_rm(mem, seq, keep, -1):
                L.llama_memory_seq_rm(mem, seq, -1, -1)
                keep = 0
            del self.cached[seq][keep:]
            run = _Run(seq=seq, prompt=prompt, todo=prompt[keep:], sampling=sampling, chain=chain,
                       text=TokenEvents(self.engine, raw), cached=keep, t0=time.perf_counter())
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
        # Rows in sequence order, as llama-server fills its batch: llama.cpp splits a batch whose
        # sequences come out of order into a reordered ubatch, which cannot reuse the previous
        # step's graph and computed 8-slot steps ~15% slower (31 vs 26 ms on the bench model).
        runs = sorted(self.runs.values(), key=lambda r: r.seq)
        for run in runs:
            if run.pending is not None:
                put_row(b, n, len(self.cached[run.seq]), run.seq, True, token=run.pending)
                self.cached[run.seq].append(run.pending)
                run.pending = None
                entries.append((run, True))
                n += 1
        for run in runs:
            if not run.todo or run.todo[0] < 0 or n >= self._cap:
                continue
            k = 0
            while k < len(run.todo) and run.todo[k] >= 0 and n + k < self._cap:
                k += 1
            chunk, run.todo = run.todo[:k], run.todo[k:]
            for i, tok in enumerate(chunk):
                last = not run.todo and i == k - 1
                put_row(b, n, len(self.cached[run.seq]), run.seq, last, token=tok)
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
            raise ContextError(f"llama_decode failed (code {rc}): {last_error(mark)}")
        for i, (run, samples) in enumerate(entries):
            if samples and run.seq in self.runs:
                out += [(run.seq, ev) for ev in self._sample(run, i)]
        return out

    def _evaluate_image(self, run: _Run) -> None:
        """Evaluate the image that starts `run.todo` as embeddings in the run's sequence."""
        n = self.engine.evaluate_image(run.todo, len(self.cached[run.seq]), seq=run.seq)
        self.cached[run.seq] += run.todo[:n]
        run.todo = run.todo[n:]

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
