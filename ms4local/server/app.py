"""The FastAPI app: OpenAI's chat completions, completions and models routes over the scheduler,
plus /health and /metrics. Requests are turned into prompts and `Sampling` here; the engine's
events (`Delta`, `ToolCallDelta`, `ToolCall`, `Done` …) are serialised as OpenAI's objects and
SSE chunks here; nothing else in ms4local knows about HTTP.

Effort mapping (OpenAI → Mistral Small 4, which knows only "none" and "high"): "none" and
"minimal" → none; "low", "medium" and "high" → high. Any other value is a 400.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import string
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..chat_session import default_sampling
from ..engine import Delta, Done, Engine, Sampling
from ..errors import Ms4localError, OptionsError
from ..grammar import json_grammar
from ..stream import MalformedToolCall, Tag, ToolCall, ToolCallDelta
from . import errors as E
from .errors import APIError, bad_request
from .images import ImagePolicy, resolve
from .scheduler import Failed, Job, Scheduler, Started
from .schemas import ChatRequest, CompletionRequest, ContentPart, Message

EFFORTS = {"none": "none", "minimal": "none", "low": "high", "medium": "high", "high": "high"}
MAX_STOP = 16
MAX_LOGIT_BIAS = 4096
MAX_STOP_CHARS = 256  # the stop filter holds back up to this much text and scans it at every token
TOOL_NAME_CHARS = set(string.ascii_letters + string.digits + "_-.")


@dataclass
class ServerConfig:
    """What `ms4local serve` decided: the model's public id, the key, defaults and limits."""

    model_id: str
    api_key: str | None = None  # None: no auth; an empty key is refused by `check`
    reasoning_effort: str = "none"
    temperature: float | None = None  # None: 0.7 with high effort, 0.1 with none (Mistral's guidance)
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    max_tokens: int = 2048
    images: ImagePolicy = field(default_factory=ImagePolicy)
    max_body_bytes: int = 32 * 2**20
    created: int = field(default_factory=lambda: int(time.time()))

    def check(self) -> None:
        """Refuse defaults that would fail every request, and a key no client could send."""
        if self.api_key is not None and (not self.api_key.strip() or not self.api_key.isascii()
                                         or not self.api_key.isprintable() or self.api_key != self.api_key.strip()):
            raise OptionsError("--api-key must be a non-empty key of printable ASCII characters without surrounding "
                               "spaces (leave the option out to serve without a key)")
        for flag, param, value in (("--temp", "temperature", self.temperature), ("--top-p", "top_p", self.top_p),
                                   ("--top-k", "top_k", self.top_k), ("--min-p", "min_p", self.min_p),
                                   ("--repeat-penalty", "repeat_penalty", self.repeat_penalty),
                                   ("-n/--max-tokens", "max_tokens", self.max_tokens)):
            problem = None if value is None else out_of_range(param, value)
            if problem:
                raise OptionsError(f"{flag}: {problem}")


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


# ----------------------------------------------------------------------------- gate (auth, size, counts)
class Gate:
    """Pure ASGI middleware: request counts for /metrics, the API key (constant-time compare),
    the body size limit (413 before the JSON is parsed; a chunked body is read up to the limit),
    and POST bodies read as JSON whatever their Content-Type says (`text/plain`, none), as OpenAI
    and llama-server read them: FastAPI would otherwise hand the route raw bytes and answer with a
    puzzling "Input should be a valid dictionary". A body that is not JSON still gets a 400."""

    OPEN = ("/health",)

    def __init__(self, app: Any, config: ServerConfig, scheduler: Scheduler) -> None:
        self.app = app
        self.config = config
        self.scheduler = scheduler

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        seen: dict[str, int] = {}
        if scope.get("method") == "POST":
            headers = [(k, v) for k, v in scope.get("headers", []) if k != b"content-type"]
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}

        async def counted(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
            await send(message)

        try:
            error = self._check_key(scope, path)
            if error is None:
                error, receive = await self._limit_body(scope, receive)
            if error is not None:
                await error.response()(scope, receive, counted)
            else:
                await self.app(scope, receive, counted)
        finally:
            endpoint = path if path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health",
                                        "/metrics") else "other"
            self.scheduler.metrics.count_request(endpoint, seen.get("status", 499))

    def _check_key(self, scope: dict[str, Any], path: str) -> APIError | None:
        key = self.config.api_key
        if not key or path in self.OPEN:
            return None
        given = None
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer":
                    given = token.strip()
        if given is None:
            return APIError(401, "missing API key: send it as the header 'Authorization: Bearer KEY'",
                            code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.encode("utf-8", "replace"), key.encode("utf-8")):
            return APIError(401, "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return None

    async def _limit_body(self, scope: dict[str, Any], receive: Callable) -> tuple[APIError | None, Callable]:
        limit = self.config.max_body_bytes
        too_big = APIError(413, f"the request body is larger than {limit} bytes (start the server with a larger "
                                "--max-body-size)", code="request_too_large")
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    return bad_request("the Content-Length header is not a number"), receive
                if length > limit:
                    return too_big, receive
                return None, receive
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return None, receive
        chunks: list[bytes] = []
        size = 0
        while True:  # no Content-Length (chunked): read it all here, up to the limit
            message = await receive()
            if message["type"] == "http.disconnect":
                return None, receive
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return too_big, receive
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return None, replay


# ----------------------------------------------------------------------------- models, metrics
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


def prometheus(s: Scheduler) -> str:
    m = s.metrics
    lines = ["# HELP ms4local_requests_total HTTP requests by endpoint and status.",
             "# TYPE ms4local_requests_total counter"]
    for (endpoint, status), n in sorted(m.requests.items()):
        lines.append(f'ms4local_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
    for name, kind, help_, value in (
            ("prompt_tokens_total", "counter", "Prompt tokens of admitted requests.", m.prompt_tokens),
            ("prompt_tokens_cached_total", "counter", "Prompt tokens reused from a slot's KV cache.", m.cached_tokens),
            ("generated_tokens_total", "counter", "Tokens generated.", m.generated_tokens),
            ("decode_steps_total", "counter", "llama_decode steps (each carries every busy slot).", m.decode_steps),
            ("requests_rejected_queue_full_total", "counter", "Requests refused with 429.", m.rejected_queue_full),
            ("requests_cancelled_total", "counter", "Generations stopped by a client going away.", m.cancelled),
            ("engine_restarts_total", "counter", "Times the slots were rebuilt after an unexpected error.", s.restarts),
            ("queue_depth", "gauge", "Requests waiting for a slot.", s.queue_depth),
            ("slots_busy", "gauge", "Slots generating now.", s.busy_slots),
            ("slots_total", "gauge", "Slots (--parallel).", s.n_slots),
            ("tokens_per_second", "gauge", "Generated tokens per second over the last 10 s.", round(m.tokens_per_second(), 3)),
            ("ready", "gauge", "1 when the model is loaded and requests are accepted.",
             int(s.state == "ready" and not s.draining))):
        lines += [f"# HELP ms4local_{name} {help_}", f"# TYPE ms4local_{name} {kind}", f"ms4local_{name} {value}"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- request → job
def effort_of(value: str | None, default: str) -> str:
    if value is None:
        return default
    effort = EFFORTS.get(value.strip().lower())
    if effort is None:
        raise bad_request(f"reasoning_effort must be one of {', '.join(EFFORTS)}, got {value!r} (this model thinks "
                          "at \"none\" or \"high\"; minimal maps to none, low and medium to high)",
                          "reasoning_effort", "invalid_value")
    return effort


def sampling_of(config: ServerConfig, body: ChatRequest | CompletionRequest, effort: str, max_tokens: int | None,
                grammar: str | None) -> Sampling:
    """The request's sampling, checked (400s), on top of the server's defaults."""
    if body.n not in (None, 1):
        raise bad_request("only n=1 is supported", "n", "unsupported_value")
    if body.logprobs not in (None, False, 0):
        raise bad_request("logprobs are not supported by this server", "logprobs", "unsupported_value")
    temp = body.temperature if body.temperature is not None else (
        config.temperature if config.temperature is not None else default_sampling(effort).temperature)
    top_p = config.top_p if body.top_p is None else body.top_p
    top_k = config.top_k if body.top_k is None else body.top_k
    min_p = config.min_p if body.min_p is None else body.min_p
    penalty = config.repeat_penalty if body.repeat_penalty is None else body.repeat_penalty
    n = config.max_tokens if max_tokens is None else max_tokens
    for param, value in (("temperature", temp), ("top_p", top_p), ("top_k", top_k), ("min_p", min_p),
                         ("repeat_penalty", penalty), ("max_tokens", n)):
        problem = out_of_range(param, value)
        if problem:
            raise bad_request(problem, param, "invalid_value")
    seed = None if body.seed is None else body.seed & 0xFFFFFFFF  # -1 → 0xFFFFFFFF: llama.cpp's "random"
    return Sampling(temperature=temp, top_p=top_p, top_k=top_k, min_p=min_p, repeat_penalty=penalty,
                    max_tokens=n, seed=seed, grammar=grammar, logit_bias=logit_bias_of(body.logit_bias))


# Where each sampling value is accepted: one table for requests and for `serve`'s defaults. NaN fails
# every comparison, so it is refused too; top_k beyond the vocabulary means "all" (the engine skips it).
RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "temperature": (lambda v: 0 <= v <= 2, "between 0 and 2"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "top_k": (lambda v: v >= 0, "0 or more"),
    "min_p": (lambda v: 0 <= v <= 1, "between 0 and 1"),
    "repeat_penalty": (lambda v: 0 < v <= 10, "in (0, 10]"),
    "max_tokens": (lambda v: v >= 1, "at least 1"),
}


def out_of_range(param: str, value: float) -> str | None:
    """"param must be …" when `value` lies outside what RANGES accepts, else None."""
    ok, what = RANGES[param]
    return None if ok(value) else f"{param} must be {what}, got {value}"


def logit_bias_of(bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's `{"token id": bias}` with biases in [-100, 100]; ids beyond the vocabulary are
    refused by the engine when the sampler is built (a 400 as well)."""
    if bias and len(bias) > MAX_LOGIT_BIAS:
        raise bad_request(f"logit_bias may name at most {MAX_LOGIT_BIAS} tokens, got {len(bias)}", "logit_bias",
                          "invalid_value")
    out = []
    for key, value in (bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise bad_request(f"logit_bias keys must be token ids, got {key!r}", "logit_bias", "invalid_value") from None
        if token < 0 or not -100 <= value <= 100:
            raise bad_request(f"logit_bias must map token ids to biases in [-100, 100], got {key}: {value}",
                              "logit_bias", "invalid_value")
        out.append((token, float(value)))
    return tuple(out)


def stops_of(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > MAX_STOP:
        raise bad_request(f"at most {MAX_STOP} stop strings are accepted, got {len(stops)}", "stop", "invalid_value")
    long = next((s for s in stops if len(s) > MAX_STOP_CHARS), None)
    if long is not None:
        raise bad_request(f"stop strings may hold at most {MAX_STOP_CHARS} characters, got one of {len(long)}",
                          "stop", "invalid_value")
    return tuple(s for s in stops if s)


def _text_of(content: str | list[ContentPart] | None, where: str) -> str | None:
    if content is None or isinstance(content, str):
        return content
    out = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise bad_request(f"{where}.content[{j}]: only text parts are accepted in this message",
                              f"{where}.content", "invalid_content")
        out.append(part.text)
    return "".join(out)


def messages_of(messages: list[Message], policy: ImagePolicy) -> tuple[list[dict[str, Any]], int]:
    """OpenAI messages → the dicts the chat template reads; (messages, number of images).

    Blocking where an image is fetched or read (only with --allow-image-urls/--allow-local-files).
    """
    if not messages:
        raise bad_request("messages must hold at least one message", "messages", "invalid_value")
    out: list[dict[str, Any]] = []
    images = 0
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        role = "system" if m.role == "developer" else m.role
        msg: dict[str, Any] = {"role": role}
        if role == "user":
            if m.content is None:
                raise bad_request(f"{where}.content is required for a user message", f"{where}.content")
            if isinstance(m.content, str):
                msg["content"] = m.content
            else:
                parts: list[dict[str, Any]] = []
                for j, part in enumerate(m.content):
                    p = f"{where}.content[{j}]"
                    if part.type == "text":
                        if part.text is None:
                            raise bad_request(f"{p}: a text part needs \"text\"", p)
                        parts.append({"type": "text", "text": part.text})
                    elif part.type == "image_url":
                        url = part.image_url.url if part.image_url is not None and not isinstance(part.image_url, str) \
                            else part.image_url
                        if not url:
                            raise bad_request(f"{p}: an image_url part needs \"image_url\": {{\"url\": ...}}", p)
                        parts.append({"type": "image", "image": resolve(url, policy, p)})
                        images += 1
                    else:
                        raise bad_request(f"{p}: content parts of type {part.type!r} are not supported "
                                          "(text and image_url are)", p, "invalid_content")
                msg["content"] = parts
        else:
            text = _text_of(m.content, where)
            if role in ("system", "tool") and text is None:
                raise bad_request(f"{where}.content is required for a {m.role} message", f"{where}.content")
            msg["content"] = text if text is not None else ""
            if role == "assistant":
                if m.tool_calls:
                    msg["tool_calls"] = [{"id": c.id or f"call{k}", "type": "function",
                                          "function": {"name": c.function.name, "arguments": c.function.arguments}}
                                         for k, c in enumerate(m.tool_calls)]
                if m.reasoning_content:
                    msg["reasoning_content"] = m.reasoning_content
            if role == "tool":
                if m.tool_call_id is not None:
                    msg["tool_call_id"] = m.tool_call_id
                if m.name is not None:
                    msg["name"] = m.name
        out.append(msg)
    return out, images


def grammar_of(engine: Engine, body: ChatRequest, effort: str) -> tuple[list[dict[str, Any]] | None, str | None]:
    """The tools the template shows and the grammar that holds the output to the request.

    * `response_format` json_object / json_schema: the answer is JSON (valid against the schema).
    * `tool_choice` "required" or a named function: the answer is one or more tool calls,
      `[TOOL_CALLS]name[ARGS]{arguments valid against the tool's parameters}`, written with the
      vocabulary's control tokens (`<[id]>` in GBNF), as the model writes them unconstrained.
    * Both JSON and tools with "auto": JSON or tool calls. "none": the tools are shown (the prompt
      is the one "auto" gives, so its cache is shared) and the caller bans [TOOL_CALLS].
    * At high effort the grammar starts with the [THINK]…[/THINK] block the model writes then.
    No grammar otherwise: the model is free, and the parser reads what it writes.
    """
    tools = body.tools or None
    choice = body.tool_choice
    if choice is not None and not tools and choice != "none":
        raise bad_request("tool_choice needs tools", "tool_choice", "invalid_value")
    fmt = body.response_format
    want_json = fmt is not None and fmt.type != "text"
    forced = choice == "required" or (tools is not None and not isinstance(choice, (str, type(None))))
    callable_tools = tools if choice != "none" else None
    if tools:
        for k, t in enumerate(tools):
            name = t.function.name
            if not name or len(name) > 64 or not set(name) <= TOOL_NAME_CHARS:
                raise bad_request(f"tools[{k}].function.name must be 1-64 letters, digits, '_', '-' or '.', "
                                  f"got {name!r}", f"tools[{k}].function.name", "invalid_value")
    shown = [t.model_dump(exclude_none=True, by_alias=True) for t in tools] if tools else None
    if not want_json and not forced:
        return shown, None
    ids = {tag: tok for tok, tag in engine.tags.ids.items()}
    schemas: dict[str, Any] = {}
    rules: list[str] = []
    body_alts: list[str] = []
    if want_json:
        schema: Any = {"type": "object"}
        if fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None or fmt.json_schema.schema_ is None:
                raise bad_request("response_format json_schema needs json_schema.schema", "response_format")
            schema = fmt.json_schema.schema_
        schemas["ms4-json"] = schema
        if not forced:
            body_alts.append("ms4-json")
    if callable_tools is not None and (forced or want_json):
        if Tag.TOOL_CALLS not in ids or Tag.ARGS not in ids:
            raise bad_request("this model's vocabulary has no [TOOL_CALLS]/[ARGS] tokens, so tool calls cannot be "
                              "enforced", "tool_choice")
        named = choice.function.name if forced and choice != "required" else None  # type: ignore[union-attr]
        picked = [t for t in tools if named is None or t.function.name == named]
        if not picked:
            raise bad_request(f"tool_choice names {named!r}, which is not among the tools", "tool_choice")
        alts = []
        for k, t in enumerate(picked):
            schemas[f"ms4-args-{k}"] = t.function.parameters or {"type": "object"}
            alts.append(f"{json.dumps(t.function.name)} <[{ids[Tag.ARGS]}]> ms4-args-{k}")
        rules.append(f"ms4-call ::= <[{ids[Tag.TOOL_CALLS]}]> ({' | '.join(alts)})")
        body_alts.append("ms4-call+" if named is None else "ms4-call")
    think = ""
    if effort == "high" and Tag.THINK in ids and Tag.THINK_END in ids:
        rules.append(f"ms4-think ::= <[{ids[Tag.THINK]}]> (!<[{ids[Tag.THINK_END]}]>)* <[{ids[Tag.THINK_END]}]>")
        think = "ms4-think "
    try:
        shared = json_grammar(schemas)
    except Exception as e:  # PromptError from the converter
        raise bad_request(str(e), "response_format" if want_json else "tools", "invalid_schema") from None
    root = f"root ::= {think}({' | '.join(body_alts)})"
    return shown, "\n".join([root, *rules, shared])


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
            return EventSourceResponse(_chat_stream(scheduler, job, config.model_id, cid, created, include_usage),
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
                       include_usage: bool) -> AsyncIterator[str]:
    """SSE chunks: role first, then content / reasoning_content / tool_calls deltas, the finish
    reason, usage (when asked) and [DONE]. Cancelling this generator (client gone) stops the job."""
    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        out: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_id,
                               "system_fingerprint": "ms4local",
                               "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        if include_usage:
            out["usage"] = None
        return json.dumps(out, ensure_ascii=False)

    ids: dict[int, str] = {}
    try:
        yield chunk({"role": "assistant", "content": ""})
        try:
            async for item in _events(job):
                if isinstance(item, Delta):
                    yield chunk({"reasoning_content": item.text} if item.reasoning else {"content": item.text})
                elif isinstance(item, ToolCallDelta):
                    if item.index not in ids:
                        ids[item.index] = _call_id()
                        yield chunk({"tool_calls": [{"index": item.index, "id": ids[item.index], "type": "function",
                                                     "function": {"name": item.name, "arguments": item.arguments}}]})
                    elif item.arguments:
                        yield chunk({"tool_calls": [{"index": item.index, "function": {"arguments": item.arguments}}]})
                elif isinstance(item, Done):
                    yield chunk({}, item.finish_reason)
                    if include_usage:
                        yield json.dumps({"id": cid, "object": "chat.completion.chunk", "created": created,
                                          "model": model_id, "system_fingerprint": "ms4local", "choices": [],
                                          "usage": usage_of(item)})
        except APIError as e:  # headers are sent: the error goes into the stream
            yield json.dumps(e.body())
        yield "[DONE]"
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

    async def gen() -> AsyncIterator[str]:
        try:
            try:
                async for item in _events(job):
                    if isinstance(item, Delta):
                        yield json.dumps(obj(item.text, None), ensure_ascii=False)
                    elif isinstance(item, Done):
                        yield json.dumps(obj("", item.finish_reason))
                        if include_usage:
                            yield json.dumps({**obj("", None), "choices": [], "usage": usage_of(item)})
            except APIError as e:
                yield json.dumps(e.body())
            yield "[DONE]"
        finally:
            scheduler.cancel(job)

    return EventSourceResponse(gen(), ping=15, send_timeout=30)


async def _complete_whole(config: ServerConfig, job: Job) -> dict[str, Any]:
    obj = _completion_obj(config.model_id, _completion_id("cmpl"), int(time.time()))
    parts: list[str] = []
    async for item in _events(job):
        if isinstance(item, Delta):
            parts.append(item.text)
        elif isinstance(item, Done):
            return {**obj("".join(parts), item.finish_reason), "usage": usage_of(item)}
    raise AssertionError("a job's events end with Done")
