"""Errors in OpenAI's JSON shape, `{"error": {"message", "type", "param", "code"}}`, with the status
an OpenAI client expects, so that its typed exceptions (BadRequestError, AuthenticationError …)
come out right. Bad input is always a 4xx: a 500 means a bug here, never a bad request.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ContextError, ImageError, Ms4localError, PromptError

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
         500: "server_error", 503: "server_error"}


class APIError(Exception):
    """An answer other than 200: status, message and OpenAI's `param` / `code`; `headers` such as
    Retry-After go with it."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        # A message may quote what the client sent: whatever that held, the answer must encode.
        message, param = (None if t is None else t.encode("utf-8", "backslashreplace").decode("utf-8")
                          for t in (self.message, self.param))
        return {"error": {"message": message, "type": TYPES.get(self.status, "invalid_request_error"),
                          "param": param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def from_engine(e: Ms4localError) -> APIError:
    """A runtime error caused by the request (template, image, context) as a 400."""
    code = {ContextError: "context_length_exceeded", ImageError: "invalid_image",
            PromptError: "invalid_prompt"}.get(type(e))
    return APIError(400, str(e), code=code)


def _loc(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
    return ".".join(parts)


async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {}
    where = _loc(tuple(first.get("loc", ())))
    if first.get("type") == "json_invalid":
        return APIError(400, "the request body is not valid JSON", code="invalid_json").response()
    message = first.get("msg", "invalid request")
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    code = "invalid_unicode" if first.get("type") == "invalid_unicode" else "invalid_value"
    return APIError(400, f"{where}: {message}{more}" if where else message + more, param=where or None,
                    code=code).response()


async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        return APIError(404, f"no route {request.method} {request.url.path}", code="not_found").response()
    if exc.status_code == 405:
        return APIError(405, f"{request.method} is not allowed on {request.url.path}",
                        code="method_not_allowed").response()
    return APIError(exc.status_code, str(exc.detail)).response()


async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return exc.response()


async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    """A bug: still the OpenAI shape, so that clients show a message rather than a parse error."""
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error").response()
