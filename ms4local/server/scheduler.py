"""The queue in front of the engine: fair (first come, first served) admission into N slots, one
thread that drives `Slots.step()` (one llama_decode per step for every busy slot), and delivery of
the engine's events to each request's asyncio queue.

Why one thread: llama.cpp contexts are not thread-safe, and one decode carrying every slot's
next token is what makes N clients faster together than one after another. The event loop never
waits on llama.cpp; it only reads queues, so /health and /metrics answer while a batch decodes.

A request that goes away (client disconnect, handler cancelled) is marked cancelled; the thread
sees it before the next step and frees the slot, so its generation stops at the next token.

The thread never dies from a request: an error that belongs to one request (its prompt, its
grammar, a bug met while serving it) becomes that request's 4xx/5xx; anything else that escapes a
step (a bug in the batch loop) fails the requests in flight with a 500, throws the slots away and
starts fresh ones on the same loaded model, and says so in the log. Only if that fails too does
the scheduler give up ("failed"), and the server exits so that a supervisor can restart it.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import traceback
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

    def stage(self, item: Any, outbox: list[tuple[Job, Any]]) -> None:
        """Queue `item` for the next hand-over of a decode step's events (`Scheduler._flush`)."""
        outbox.append((self, item))

    def post(self, item: Any) -> None:
        """Hand `item` to the event loop now."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


def _hand_over(items: list[tuple[Job, Any]]) -> None:
    """On the event loop: one decode step's events into their jobs' queues."""
    for job, item in items:
        job.queue.put_nowait(item)


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


MAX_RESTARTS = 5  # within RESTART_WINDOW_S: a loop that fails on its own, not on a request, gives up
RESTART_WINDOW_S = 60.0


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Scheduler:
    """Loads the engine in its own thread, then serves jobs in `parallel` slots.

    `state` is "loading", "ready", "failed" (see `load_error`) or "stopped". `submit` raises
    APIError 503 while loading or draining and 429 when every slot is taken and `max_queue` jobs
    already wait for one (so `max_queue=0` serves up to `parallel` requests at once, none waiting).
    `restarts` counts the times the slots were rebuilt after an unexpected error; `log` gets
    one line (and the traceback) each time.
    """

    def __init__(self, load: Callable[[], Engine], *, max_queue: int = 64,
                 log: Callable[[str], None] | None = None) -> None:
        self._load = load
        self.max_queue = max_queue
        self.log = log or _stderr
        self.restarts = 0
        self._recent_restarts: list[float] = []
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
        # A decode step's events for the clients, handed to the event loop in one callback:
        # one wake-up of the loop per step instead of one per token per slot.
        self._outbox: list[tuple[Job, Any]] = []
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
        if self.state == "failed":
            raise APIError(503, "the engine failed and the server is stopping", code="engine_failed")
        if self.state != "ready" or self.draining:
            raise APIError(503, "the server is shutting down", code="shutting_down", headers={"Retry-After": "30"})
        with self._cv:
            # Jobs beyond the free slots wait; `max_queue` bounds those, as Ollama's OLLAMA_MAX_QUEUE.
            waiting = self.queue_depth + self.busy_slots - self.n_slots
            if waiting >= self.max_queue:
                self.metrics.rejected_queue_full += 1
                raise APIError(429, f"the server is busy: all {self.n_slots} slots are taken and "
                                    f"{max(waiting, 0)} requests already wait (--max-queue {self.max_queue}); "
                                    "retry later", code="queue_full", headers={"Retry-After": "2"})
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
            self._fail(e)
            return
        self.state = "ready"
        try:
            while True:
                try:
                    self._serve()
                    return
                except Exception as e:  # a bug in the loop itself: the slots' state is unknown
                    if not self._restart(e):
                        return
        finally:
            self._fail_all(APIError(503, "the server stopped", code="shutting_down"))
            try:
                self.slots.close()
            finally:
                self.engine.close()
                if self.state != "failed":
                    self.state = "stopped"

    def _fail(self, error: BaseException) -> None:
        self.load_error = error
        self.state = "failed"
        if self.on_load_failure is not None:
            self.on_load_failure(error)

    def _fail_all(self, error: APIError, *, queued: bool = True) -> None:
        """Answer the requests in the slots (and, if `queued`, those waiting) with `error`."""
        self._flush()  # what was produced before the error arrives first
        jobs = list(self._active.values())
        self._active.clear()
        if queued:
            with self._cv:
                jobs += self._incoming
                self._incoming = []
            jobs += self._waiting
            self._waiting.clear()
        for job in jobs:
            try:
                job.post(Failed(error))
            except Exception:
                pass  # nobody left to tell

    def _restart(self, error: Exception) -> bool:
        """Throw the slots away and make fresh ones on the same model (the requests in the slots
        get a 500, those waiting are served by the new slots); False when that fails, or when the
        loop keeps failing (MAX_RESTARTS within RESTART_WINDOW_S): then the scheduler gives up."""
        self.log(f"ms4local: engine error: {type(error).__name__}: {error}; restarting the slots "
                 "(the requests in flight get a 500)\n" + "".join(traceback.format_exception(error)).rstrip())
        self._fail_all(APIError(500, f"internal error: {type(error).__name__}: {error} (the engine was restarted)",
                                code="internal_error"), queued=False)
        assert self.engine is not None and self.slots is not None
        now = time.monotonic()
        self._recent_restarts = [t for t in self._recent_restarts if now - t < RESTART_WINDOW_S] + [now]
        if len(self._recent_restarts) > MAX_RESTARTS:
            self.log(f"ms4local: {MAX_RESTARTS} engine restarts within {RESTART_WINDOW_S:g} s; stopping")
            self._fail(error)
            return False
        try:
            try:
                self.slots.close()
            except Exception:
                pass  # its runs are forgotten either way; Slots() clears the KV cache
            self.slots = Slots(self.engine)
        except Exception as e:
            self.log(f"ms4local: the engine cannot be restarted ({type(e).__name__}: {e}); stopping")
            self._fail(e)
            return False
        self.restarts += 1
        self.log(f"ms4local: engine restarted ({self.restarts} restart{'s' * (self.restarts > 1)} so far)")
        return True

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
            self._flush()

    def _flush(self) -> None:
        """Hand the events gathered by `_deliver` to their event loops, one callback per loop."""
        if not self._outbox:
            return
        box, self._outbox = self._outbox, []
        loops: dict[asyncio.AbstractEventLoop, list[tuple[Job, Any]]] = {}
        for job, item in box:
            loops.setdefault(job.loop, []).append((job, item))
        for loop, items in loops.items():
            try:
                loop.call_soon_threadsafe(_hand_over, items)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

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
        except Exception as e:  # a bug met while reading this prompt: its 500, the engine goes on
            job.post(Failed(self._internal(e)))
            return
        job.ids = ids
        job._filter = StopFilter(job.stop) if job.stop else None
        self._waiting.append(job)

    def _internal(self, error: Exception) -> APIError:
        """A bug met while serving one request: logged with its traceback, that request's 500."""
        self.log(f"ms4local: internal error in a request: {type(error).__name__}: {error}\n"
                 + "".join(traceback.format_exception(error)).rstrip())
        return APIError(500, f"internal error: {type(error).__name__}: {error}", code="internal_error")

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
            try:
                seq = slots.best_slot(job.ids or [])
                if seq is None or job.ids is None:
                    raise RuntimeError("no free slot or no prompt ids for a job about to start")
                cached = slots.start(seq, job.ids, job.sampling, raw=job.raw)
            except Ms4localError as e:
                job.post(Failed(from_engine(e)))
                continue
            except Exception as e:  # a bug met while starting this run (Slots.start left the slot free)
                job.post(Failed(self._internal(e)))
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
                    job.stage(Delta(tail), self._outbox)
            job.stage(ev, self._outbox)
            return
        if job._filter is not None and isinstance(ev, Delta) and not ev.reasoning:
            text, hit = job._filter.feed(ev.text)
            if text:
                job.stage(Delta(text), self._outbox)
            if hit:
                assert self.slots is not None
                job._filter = None
                for end in self.slots.end(seq, "stop"):
                    if isinstance(end, Done):
                        self._deliver(seq, end)
                    # text after the stop string is dropped; tool calls cannot follow it
            return
        job.stage(ev, self._outbox)
