"""The queue in front of the engine: fair (first come, first served) admission into N slots, one
thread that drives `Slots.step()` (one llama_decode per step for every busy slot), and delivery of
the engine's events to each request's asyncio queue.

Why one thread: llama.cpp contexts are not thread-safe, and one decode carrying every slot's
next token is what makes N clients faster together than one after another. The event loop never
waits on llama.cpp; it only reads queues, so /health and /metrics answer while a batch decodes.

A request that goes away (client disconnect, handler cancelled) is marked cancelled; the thread
sees it before the next step and frees the slot, so its generation stops at the next token.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..engine import Delta, Done, Engine, Sampling, Slots
from ..errors import ContextError, Ms4localError
from .errors import APIError, from_engine


@dataclass(frozen=True)
class Started:
    """The request has a slot: its prompt size and how much of it the slot's cache reused."""

    prompt_tokens: int
    cached_tokens: int


@dataclass(frozen=True)
class Failed:
    error: APIError


@dataclass(eq=False)
class Job:
    """One request on its way through the queue. `prompt` is a callable run on the engine thread
    (tokenizing touches the engine's image cache, which only that thread may use)."""

    prompt: Callable[[Engine], list[int]]
    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    stop: tuple[str, ...] = ()
    raw: bool = False
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    submitted: float = field(default_factory=time.monotonic)
    ids: list[int] | None = None
    _filter: StopFilter | None = None

    def post(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


class StopFilter:
    """Cuts answer text at the first stop string. Text that could be the start of one is held
    back until the next piece decides, so nothing after a stop string is ever sent."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text to send now, whether a stop string was found)."""
        buf = self.held + text
        hits = [(buf.find(s), s) for s in self.stops if s in buf]
        if hits:
            at = min(h[0] for h in hits)
            self.held = ""
            return buf[:at], True
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), 0, -1):
                if s.startswith(buf[-k:]):
                    keep = max(keep, k)
                    break
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


class Metrics:
    """Counters for /metrics, written by the engine thread and read by the event loop (plain ints
    and floats: each update is atomic under the GIL, and a scrape may be one token stale)."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = {}
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.generated_tokens = 0
        self.decode_steps = 0
        self.rejected_queue_full = 0
        self.cancelled = 0
        self._window: deque[tuple[float, int]] = deque()

    def count_request(self, endpoint: str, status: int) -> None:
        key = (endpoint, status)
        self.requests[key] = self.requests.get(key, 0) + 1

    def tokens_out(self, n: int) -> None:
        self.generated_tokens += n
        now = time.monotonic()
        self._window.append((now, n))
        while self._window and now - self._window[0][0] > 10.0:
            self._window.popleft()

    def tokens_per_second(self) -> float:
        """Generated tokens per second over the last 10 s (all slots together)."""
        now = time.monotonic()
        recent = [(t, n) for t, n in list(self._window) if now - t <= 10.0]
        if not recent:
            return 0.0
        return sum(n for _, n in recent) / max(now - recent[0][0], 1.0)


class QueueFull(Exception):
    pass


class Scheduler:
    """Loads the engine in its own thread, then serves jobs in `parallel` slots.

    `state` is "loading", "ready", "failed" (see `load_error`) or "stopped". `submit` raises
    APIError 503 while loading or draining and 429 when `max_queue` jobs already wait.
    """

    def __init__(self, load: Callable[[], Engine], *, max_queue: int = 64) -> None:
        self._load = load
        self.max_queue = max_queue
        self.state = "loading"
        self.load_error: BaseException | None = None
        self.engine: Engine | None = None
        self.slots: Slots | None = None
        self.metrics = Metrics()
        self.draining = False
        self._cv = threading.Condition()
        self._incoming: list[Job] = []
        self._waiting: deque[Job] = deque()
        self._active: dict[int, Job] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._main, name="ms4local-engine", daemon=True)
        self.on_load_failure: Callable[[BaseException], None] | None = None

    # ------------------------------------------------------------------ public (event loop side)
    def start(self) -> None:
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        return len(self._incoming) + len(self._waiting)

    @property
    def busy_slots(self) -> int:
        return len(self._active)

    @property
    def n_slots(self) -> int:
        return self.slots.n if self.slots is not None else 0

    @property
    def n_ctx(self) -> int:
        return self.slots.n_ctx if self.slots is not None else 0

    def submit(self, job: Job) -> None:
        if self.state == "loading":
            raise APIError(503, "the model is still loading; retry shortly", code="model_loading",
                           headers={"Retry-After": "5"})
        if self.state != "ready" or self.draining:
            raise APIError(503, "the server is shutting down", code="shutting_down", headers={"Retry-After": "30"})
        with self._cv:
            if self.queue_depth >= self.max_queue:
                self.metrics.rejected_queue_full += 1
                raise APIError(429, f"the server is busy: {self.queue_depth} requests are already waiting "
                                    f"(--max-queue {self.max_queue}); retry later", code="queue_full",
                               headers={"Retry-After": "2"})
            self._incoming.append(job)
            self._cv.notify()

    def cancel(self, job: Job) -> None:
        """The client is gone: stop its generation at the next token and free its slot."""
        if not job.cancelled:
            job.cancelled = True
            with self._cv:
                self._cv.notify()

    def stop(self, timeout: float | None = None) -> None:
        """Finish what was accepted, then stop the thread and free the model."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ------------------------------------------------------------------ engine thread
    def _main(self) -> None:
        try:
            self.engine = self._load()
            self.slots = Slots(self.engine)
        except BaseException as e:  # reported to the CLI, which prints it as one line
            self.load_error = e
            self.state = "failed"
            if self.on_load_failure is not None:
                self.on_load_failure(e)
            return
        self.state = "ready"
        try:
            self._serve()
        finally:
            for job in list(self._active.values()) + list(self._waiting) + list(self._incoming):
                job.post(Failed(APIError(503, "the server stopped", code="shutting_down")))
            self.slots.close()
            self.engine.close()
            self.state = "stopped"

    def _serve(self) -> None:
        slots = self.slots
        assert slots is not None and self.engine is not None
        sampled = slots.sampled
        while True:
            with self._cv:
                while not (self._incoming or self._waiting or self._active or self._stopping):
                    self._cv.wait()
                if self._stopping and not (self._incoming or self._waiting or self._active):
                    return
                incoming, self._incoming = self._incoming, []
            for job in incoming:
                self._prepare(job)
            self._reap()
            self._admit()
            if not slots.runs:
                continue
            try:
                events = slots.step()
            except Ms4localError as e:
                for seq, job in list(self._active.items()):
                    slots.stop(seq)
                    job.post(Failed(APIError(500, f"generation failed: {e}", code="engine_error")))
                self._active.clear()
                continue
            self.metrics.decode_steps += 1
            self.metrics.tokens_out(slots.sampled - sampled)
            sampled = slots.sampled
            for seq, ev in events:
                self._deliver(seq, ev)

    def _prepare(self, job: Job) -> None:
        """Tokenize on this thread; a prompt that cannot be answered fails now, before it waits."""
        if job.cancelled:
            return
        slots = self.slots
        assert slots is not None and self.engine is not None
        try:
            ids = job.prompt(self.engine)
            if len(ids) >= slots.n_ctx:
                over = len(ids) - slots.n_ctx + 1
                per = " per conversation (-c / --parallel)" if slots.n > 1 else ""
                raise ContextError(f"the prompt has {len(ids)} tokens but the context holds {slots.n_ctx}{per}: "
                                   f"{over} tokens too many (shorten the messages or start the server with a "
                                   f"larger -c)")
        except Ms4localError as e:
            job.post(Failed(from_engine(e)))
            return
        except APIError as e:
            job.post(Failed(e))
            return
        job.ids = ids
        job._filter = StopFilter(job.stop) if job.stop else None
        self._waiting.append(job)

    def _reap(self) -> None:
        slots = self.slots
        assert slots is not None
        for seq, job in list(self._active.items()):
            if job.cancelled:
                slots.stop(seq)
                del self._active[seq]
                self.metrics.cancelled += 1
        if any(j.cancelled for j in self._waiting):
            self._waiting = deque(j for j in self._waiting if not j.cancelled)

    def _admit(self) -> None:
        slots = self.slots
        assert slots is not None
        while self._waiting and slots.free():
            job = self._waiting.popleft()
            assert job.ids is not None
            seq = slots.best_slot(job.ids)
            assert seq is not None
            try:
                cached = slots.start(seq, job.ids, job.sampling, raw=job.raw)
            except Ms4localError as e:
                job.post(Failed(from_engine(e)))
                continue
            self._active[seq] = job
            self.metrics.prompt_tokens += len(job.ids)
            self.metrics.cached_tokens += cached
            job.post(Started(prompt_tokens=len(job.ids), cached_tokens=cached))

    def _deliver(self, seq: int, ev: Any) -> None:
        job = self._active.get(seq)
        if job is None:
            return
        if isinstance(ev, Done):
            del self._active[seq]
            if job._filter is not None:
                tail = job._filter.flush()
                if tail:
                    job.post(Delta(tail))
            job.post(ev)
            return
        if job._filter is not None and isinstance(ev, Delta) and not ev.reasoning:
            text, hit = job._filter.feed(ev.text)
            if text:
                job.post(Delta(text))
            if hit:
                assert self.slots is not None
                job._filter = None
                for end in self.slots.end(seq, "stop"):
                    if isinstance(end, Done):
                        self._deliver(seq, end)
                    # text after the stop string is dropped; tool calls cannot follow it
            return
        job.post(ev)
