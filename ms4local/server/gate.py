"""The ASGI middleware every HTTP request passes before a route: API key, body size, JSON bodies, counts.

It works on the raw ASGI messages so that a refused request (401, 413) costs no JSON parsing and
a body over the limit is never read whole, and so that every answer, a route's or its own, is
counted for /metrics with its status.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

from .config import ServerConfig
from .errors import APIError, bad_request
from .metrics import endpoint_of
from .scheduler import Scheduler


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
            self.scheduler.metrics.count_request(endpoint_of(path), seen.get("status", 499))

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
