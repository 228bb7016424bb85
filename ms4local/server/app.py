"""The FastAPI app: OpenAI's chat completions, completions and models routes over the scheduler,
plus /health and /metrics. A route takes the pieces `translate` makes of a request (prompt,
`Sampling`, stops), runs them as a scheduler job, and serialises the engine's events (`Delta`,
`ToolCallDelta`, `ToolCall`, `Done` …) as OpenAI's objects and SSE chunks; nothing else in
ms4local knows about HTTP.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import string
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import Delta, Done, Engine
from ..errors import Ms4localError
from ..stream import MalformedToolCall, Tag, ToolCall, ToolCallDelta
from . import errors as E
from .config import ServerConfig
from .errors import APIError, bad_request
from .gate import Gate
from .metrics import prometheus
from .scheduler import Failed, Job, Scheduler, Started
from .schemas import ChatRequest, CompletionRequest
from .sse import SSEResponse, event, to_json
from .translate import effort_of, grammar_of, messages_of, sampling_of, stops_of


def create_app(config: ServerConfig, scheduler: Scheduler) -> FastAPI:
    """The ASGI app. The scheduler must be started by the caller (lifespan or test)."""
    app = FastAPI(title="ms4local", version="0.1.0", docs_url=None, redoc_url=None,
                  description="OpenAI-compatible API over a Mistral Small 4 GGUF (ms4local serve).")
    app.state.config = config
    app.state.scheduler = scheduler
    app.add_exception_handler(RequestValidationError, E.on_validation_error)
    app.add_exception_handler(StarletteHTTPException, E.on_http_error)
    app.add_exception_handler(APIError, E.on_api_error)
    app.add_exception_handler(Exception, E.on_unexpected)
    app.add_middleware(Gate, config=config, scheduler=scheduler)

    @app.get("/health")
    async def health() -> JSONResponse:
        state = scheduler.state
        if state == "ready" and not scheduler.draining:
            return JSONResponse({"status": "ok", "slots": scheduler.n_slots, "busy": scheduler.busy_slots,
                                 "queue": scheduler.queue_depth, "restarts": scheduler.restarts})
        status = {"loading": "loading", "failed": "error"}.get(state, "shutting_down")
        return JSONResponse({"status": status}, status_code=503, headers={"Retry-After": "5"})

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(prometheus(scheduler), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(config, scheduler)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        check_model(config, model_id)
        return model_card(config, scheduler)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        return await chat(config, scheduler, body, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await complete(config, scheduler, body, request)

    return app


# ----------------------------------------------------------------------------- models
def check_model(config: ServerConfig, name: str | None) -> None:
    """Clients name the model; a name that is not ours is a 404, as with OpenAI."""
    if name is None or name == "" or name == config.model_id or name == config.model_id + ".gguf":
        return
    raise APIError(404, f"the model {name!r} does not exist; this server serves {config.model_id!r}",
                   param="model", code="model_not_found")


def model_card(config: ServerConfig, scheduler: Scheduler) -> dict[str, Any]:
    card: dict[str, Any] = {"id": config.model_id, "object": "model", "created": config.created, "owned_by": "ms4local"}
    e = scheduler.engine
    if e is not None and scheduler.state == "ready":
        meta = e.metadata
        arch = meta.get("general.architecture", "")
        card["meta"] = {
            "architecture": arch, "name": meta.get("general.name"), "file": e.path.name,
            "file_bytes": e.path.stat().st_size if e.path.exists() else None,
            "n_ctx": scheduler.n_ctx, "n_ctx_train": _int(meta.get(f"{arch}.context_length")),
            "parallel": scheduler.n_slots, "n_vocab": e.n_vocab, "n_embd": e.n_embd,
            "vision": e.supports_images, "reasoning_efforts": ["none", "high"],
        }
    return card


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


# ----------------------------------------------------------------------------- jobs and their events
def _completion_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def _call_id() -> str:
    """Nine letters and digits: the form Mistral's own API gives tool-call ids."""
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(9))


def usage_of(done: Done) -> dict[str, Any]:
    u = done.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}


class _Watch:
    """Cancels `job` when its client goes away, from submission until the answer is written:
    a task waits on the ASGI `receive` (the body is read by then, so the next message uvicorn
    gives is `http.disconnect`), marks the job cancelled, so that the engine thread stops its
    generation at the next token, and puts a 499 in the job's queue to wake the handler. Waiting
    on the event rather than polling between tokens is what stops a request that is generating
    fast. Streams hand over to sse-starlette, which watches the same way."""

    def __init__(self, request: Request, job: Job, scheduler: Scheduler) -> None:
        self.task = asyncio.create_task(self._run(request, job, scheduler))

    @staticmethod
    async def _run(request: Request, job: Job, scheduler: Scheduler) -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                scheduler.cancel(job)
                job.queue.put_nowait(Failed(APIError(499, "the client closed the request", code="client_closed")))
                return

    def stop(self) -> None:
        self.task.cancel()


async def _events(job: Job) -> AsyncIterator[Any]:
    """The job's events up to and including its `Done`; a `Failed` raises its APIError. Callers
    cancel the job in their own `finally` (an abandoned async generator is closed only later)."""
    while True:
        item = await job.queue.get()
        if isinstance(item, Failed):
            raise item.error
        yield item
        if isinstance(item, Done):
            return


async def _batches(job: Job) -> AsyncIterator[list[Any]]:
    """`_events` a batch at a time: every event already waiting in the queue comes with the one
    awaited, so a stream that fell behind (a busy loop, a slow client) catches up in one write."""
    queue = job.queue
    while True:
        batch = []
        item = await queue.get()
        while True:
            if isinstance(item, Failed):
                if batch:
                    yield batch
                raise item.error
            batch.append(item)
            if isinstance(item, Done):
                yield batch
                return
            if queue.empty():
                break
            item = queue.get_nowait()
        yield batch


def _framer(obj: dict[str, Any], slot: str) -> Callable[[str], str]:
    """`to_json(obj)` with the JSON text `part` in place of the value at
    key `slot`, without encoding the constant rest again: the chunk's prefix and suffix are
    encoded once per stream (the per-token cost is then one string's escaping)."""
    marker = "\ue000ms4local-slot\ue000"
    head, tail = to_json({**obj, slot: marker}).split(to_json(marker))
    return lambda part: head + part + tail


def _string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


async def _start(scheduler: Scheduler, job: Job) -> Started:
    scheduler.submit(job)
    try:
        first = await job.queue.get()
    except BaseException:
        scheduler.cancel(job)
        raise
    if isinstance(first, Failed):
        raise first.error
    return first


async def _tokenized(prompt: Callable[[Engine], list[int]], engine: Engine) -> Callable[[Engine], list[int]]:
    """Tokenize in a worker thread (the tokenizer is thread-safe), so that a megabyte of text
    does not hold the engine thread and the other clients' tokens; the scheduler then only checks
    the ids against the context (a 400 when they overflow) before the job waits for a slot."""
    try:
        ids = await run_in_threadpool(prompt, engine)
    except Ms4localError as e:
        raise E.from_engine(e) from None
    return lambda _e: ids


def _ready(scheduler: Scheduler) -> Engine:
    if scheduler.state == "loading":
        raise APIError(503, "the model is still loading; retry shortly", code="model_loading",
                       headers={"Retry-After": "5"})
    if scheduler.state == "failed":
        raise APIError(503, "the engine failed and the server is stopping", code="engine_failed")
    if scheduler.engine is None or scheduler.state != "ready" or scheduler.draining:
        raise APIError(503, "the server is shutting down", code="shutting_down", headers={"Retry-After": "30"})
    return scheduler.engine


# ----------------------------------------------------------------------------- /v1/chat/completions
async def chat(config: ServerConfig, scheduler: Scheduler, body: ChatRequest, request: Request) -> Any:
    check_model(config, body.model)
    engine = _ready(scheduler)
    effort = effort_of(body.reasoning_effort, config.reasoning_effort)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    tools, grammar = grammar_of(engine, body, effort)
    sampling = sampling_of(config, body, effort, max_tokens, grammar)
    if body.tool_choice == "none" and tools:  # the model knows the tools but cannot start a call
        calls = {tok for tok, tag in engine.tags.ids.items() if tag == Tag.TOOL_CALLS}
        kept = tuple((t, b) for t, b in sampling.logit_bias if t not in calls)
        sampling = replace(sampling, logit_bias=kept + tuple((t, float("-inf")) for t in calls))
    stops = stops_of(body.stop)
    messages, n_images = await run_in_threadpool(messages_of, body.messages, config.images)
    if n_images and not engine.supports_images:
        raise bad_request("this model has no vision projector, so it cannot read images (start the server with "
                          "--mmproj PATH, or put the model's mmproj-*.gguf beside it)", "messages", "no_vision")

    def prompt(e: Engine) -> list[int]:
        return e.prompt_tokens(messages, reasoning_effort=effort, tools=tools)

    if not n_images:  # images use the engine thread's cache; text alone is tokenized off it
        prompt = await _tokenized(prompt, engine)
    job = Job(prompt=prompt, sampling=sampling, loop=asyncio.get_running_loop(), stop=stops)
    watch = _Watch(request, job, scheduler)
    try:
        await _start(scheduler, job)
        cid, created = _completion_id("chatcmpl"), int(time.time())
        if body.stream:
            watch.stop()
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return SSEResponse(_chat_stream(scheduler, job, config.model_id, cid, created, include_usage),
                               ping=15, send_timeout=30)
        try:
            return await _chat_whole(job, config.model_id, cid, created)
        finally:
            scheduler.cancel(job)
    finally:
        watch.stop()


async def _chat_whole(job: Job, model_id: str, cid: str, created: int) -> dict[str, Any]:
    content: list[str] = []
    reasoning: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    async for item in _events(job):
        if isinstance(item, Delta):
            (reasoning if item.reasoning else content).append(item.text)
        elif isinstance(item, (ToolCall, MalformedToolCall)):
            calls[item.index] = {"id": _call_id(), "type": "function",
                                 "function": {"name": item.name, "arguments": item.arguments}}
        elif isinstance(item, Done):
            text = "".join(content)
            message: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
            if reasoning:
                message["reasoning_content"] = "".join(reasoning)
            if calls:
                message["tool_calls"] = [calls[k] for k in sorted(calls)]
            return {"id": cid, "object": "chat.completion", "created": created, "model": model_id,
                    "choices": [{"index": 0, "message": message, "finish_reason": item.finish_reason,
                                 "logprobs": None}],
                    "usage": usage_of(item), "system_fingerprint": "ms4local"}
    raise AssertionError("a job's events end with Done")


async def _chat_stream(scheduler: Scheduler, job: Job, model_id: str, cid: str, created: int,
                       include_usage: bool) -> AsyncIterator[bytes]:
    """SSE chunks: role first, then content / reasoning_content / tool_calls deltas, the finish
    reason, usage (when asked) and [DONE]. Cancelling this generator (client gone) stops the job.

    Each chunk is the JSON `to_json(chunk_object)` gives; the constant
    parts are encoded once per stream (`_framer`), and all events that are waiting go out in one
    write (`_batches`)."""
    base: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_id,
                            "system_fingerprint": "ms4local", "choices": None}
    if include_usage:
        base["usage"] = None
    choice = _framer({"index": 0, "delta": None, "finish_reason": None, "logprobs": None}, "delta")
    frame = _framer(base, "choices")

    def chunk(delta: str, finish: str | None = None) -> str:
        if finish is None:
            return frame("[" + choice(delta) + "]")
        return frame("[" + _framer({"index": 0, "delta": {}, "finish_reason": finish, "logprobs": None},
                                   "delta")(delta) + "]")

    ids: dict[int, str] = {}
    try:
        yield event(chunk('{"role":"assistant","content":""}'))
        try:
            async for batch in _batches(job):
                out = []
                for item in batch:
                    if isinstance(item, Delta):
                        out.append(chunk(('{"reasoning_content":' if item.reasoning else '{"content":')
                                         + _string(item.text) + "}"))
                    elif isinstance(item, ToolCallDelta):
                        if item.index not in ids:
                            ids[item.index] = _call_id()
                            out.append(chunk(to_json(
                                {"tool_calls": [{"index": item.index, "id": ids[item.index], "type": "function",
                                                 "function": {"name": item.name, "arguments": item.arguments}}]})))
                        elif item.arguments:
                            out.append(chunk(to_json(
                                {"tool_calls": [{"index": item.index, "function": {"arguments": item.arguments}}]})))
                    elif isinstance(item, Done):
                        out.append(chunk("{}", item.finish_reason))
                        if include_usage:
                            out.append(to_json({"id": cid, "object": "chat.completion.chunk", "created": created,
                                                   "model": model_id, "system_fingerprint": "ms4local", "choices": [],
                                                   "usage": usage_of(item)}))
                if out:
                    yield b"".join(event(o) for o in out)
        except APIError as e:  # headers are sent: the error goes into the stream
            yield event(to_json(e.body()))
        yield event("[DONE]")
    finally:
        scheduler.cancel(job)


# ----------------------------------------------------------------------------- /v1/completions
async def complete(config: ServerConfig, scheduler: Scheduler, body: CompletionRequest, request: Request) -> Any:
    check_model(config, body.model)
    _ready(scheduler)
    if body.echo or body.suffix:
        raise bad_request("echo and suffix are not supported by this server", "echo" if body.echo else "suffix",
                          "unsupported_value")
    prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
    if len(prompts) != 1:
        raise bad_request("give one prompt (a string, or a list of one string)", "prompt", "unsupported_value")
    text = prompts[0]
    if not text:
        raise bad_request("the prompt is empty", "prompt", "invalid_value")
    sampling = sampling_of(config, body, config.reasoning_effort, body.max_tokens, None)

    def prompt(e: Engine) -> list[int]:
        # Raw text, read as llama-server reads it: BOS first, control-token text ("[INST]") as tokens.
        return e.tokenize(text, add_special=True, parse_special=True)

    prompt = await _tokenized(prompt, _ready(scheduler))
    job = Job(prompt=prompt, sampling=sampling, loop=asyncio.get_running_loop(), stop=stops_of(body.stop), raw=True)
    watch = _Watch(request, job, scheduler)
    try:
        await _start(scheduler, job)
        if body.stream:
            watch.stop()
            return _complete_stream(config, scheduler, job, body)
        try:
            return await _complete_whole(config, job)
        finally:
            scheduler.cancel(job)
    finally:
        watch.stop()


def _completion_obj(model_id: str, cid: str, created: int) -> Callable[[str, str | None], dict[str, Any]]:
    def obj(text: str, finish: str | None) -> dict[str, Any]:
        return {"id": cid, "object": "text_completion", "created": created, "model": model_id,
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}
    return obj


def _complete_stream(config: ServerConfig, scheduler: Scheduler, job: Job, body: CompletionRequest) -> Any:
    obj = _completion_obj(config.model_id, _completion_id("cmpl"), int(time.time()))
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    text_chunk = _framer(obj("", None), "choices")
    choice = _framer({"index": 0, "text": None, "finish_reason": None, "logprobs": None}, "text")

    async def gen() -> AsyncIterator[bytes]:
        try:
            try:
                async for batch in _batches(job):
                    out = []
                    for item in batch:
                        if isinstance(item, Delta):
                            out.append(text_chunk("[" + choice(_string(item.text)) + "]"))
                        elif isinstance(item, Done):
                            out.append(to_json(obj("", item.finish_reason)))
                            if include_usage:
                                out.append(to_json({**obj("", None), "choices": [], "usage": usage_of(item)}))
                    if out:
                        yield b"".join(event(o) for o in out)
            except APIError as e:
                yield event(to_json(e.body()))
            yield event("[DONE]")
        finally:
            scheduler.cancel(job)

    return SSEResponse(gen(), ping=15, send_timeout=30)


async def _complete_whole(config: ServerConfig, job: Job) -> dict[str, Any]:
    obj = _completion_obj(config.model_id, _completion_id("cmpl"), int(time.time()))
    parts: list[str] = []
    async for item in _events(job):
        if isinstance(item, Delta):
            parts.append(item.text)
        elif isinstance(item, Done):
            return {**obj("".join(parts), item.finish_reason), "usage": usage_of(item)}
    raise AssertionError("a job's events end with Done")
