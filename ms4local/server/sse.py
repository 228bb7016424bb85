"""A lean Server-Sent Events response for the token streams.

Why not sse-starlette's `EventSourceResponse` (which this replaces for the completion streams):
it pays per chunk for a str → `ServerSentEvent` → bytes encoding and an anyio cancel scope
(`move_on_after`, its send timeout) around every `send`, which together cost as much Python time
per token as the rest of the path from the engine to the socket (bench/results/llamacpp.md). Here
the body iterator yields bytes already framed as SSE (`data: …\\r\\n\\r\\n`, possibly several
events at once: what the engine produced while the previous send was in flight goes out in one
write), and one watchdog task per stream does what the per-send scopes did:

* a `: ping - <time>` comment after `ping` seconds without a write (proxies keep the stream open);
* a send stuck for `send_timeout` seconds (a client that stopped reading) ends the stream;
* the client going away (`http.disconnect`) cancels the body iterator at its current `await`,
  so its `finally` runs at once (the handlers cancel their generation there).

The headers are sse-starlette's, so clients see the same response.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Any

from starlette.responses import Response

HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-store"),
           (b"connection", b"keep-alive"), (b"x-accel-buffering", b"no")]


def to_json(obj: Any) -> str:
    """A stream chunk's JSON as OpenAI's API writes it: compact (no blank after `,` and `:`), UTF-8
    left as it is. It is what every client parses once per token, so every byte counts."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def event(data: str) -> bytes:
    """One SSE event whose data is a single line (JSON, "[DONE]"), its lines ended by a bare LF as
    OpenAI's API and llama-server end theirs (a client's line splitter does least work on it)."""
    return b"data: " + data.encode("utf-8") + b"\n\n"


class SSEResponse(Response):
    """An ASGI response streaming `body` (SSE-framed bytes) until it ends or the client leaves.
    A starlette `Response` (FastAPI passes those through as they are), with its own `__call__`."""

    media_type = "text/event-stream"

    def __init__(self, body: AsyncIterator[bytes], *, ping: float = 15.0, send_timeout: float = 30.0) -> None:
        self.status_code = 200
        self.background = None
        self.raw_headers = list(HEADERS)
        self.body_iterator = body
        self.ping = ping
        self.send_timeout = send_timeout
        self._last_write = 0.0
        self._sending_since: float | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        loop = asyncio.get_running_loop()
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        self._last_write = loop.time()
        stream = asyncio.ensure_future(self._stream(send, loop))
        watch = asyncio.ensure_future(self._watch(send, loop, stream))
        gone = asyncio.ensure_future(self._disconnect(receive))
        try:
            done, _ = await asyncio.wait((stream, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (stream, watch, gone):
                task.cancel()
            # the body's `finally` (cancel the generation) runs before the handler returns
            await asyncio.gather(stream, watch, gone, return_exceptions=True)
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                await close()
        if stream in done and not stream.cancelled() and stream.exception() is not None:
            raise stream.exception()  # type: ignore[misc]
        if self.background is not None:
            await self.background()

    async def _stream(self, send: Any, loop: asyncio.AbstractEventLoop) -> None:
        async for chunk in self.body_iterator:
            self._sending_since = loop.time()
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            self._last_write = self._sending_since
            self._sending_since = None
        self._sending_since = loop.time()
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        self._sending_since = None

    async def _watch(self, send: Any, loop: asyncio.AbstractEventLoop, stream: asyncio.Future) -> None:
        tick = max(min(self.ping, self.send_timeout) / 3, 0.05)
        while True:
            await asyncio.sleep(tick)
            now = loop.time()
            if self._sending_since is not None:
                if now - self._sending_since >= self.send_timeout:
                    stream.cancel()  # the client stopped reading
                    return
            elif now - self._last_write >= self.ping:
                self._sending_since = now
                comment = f": ping - {datetime.now(timezone.utc)}\n\n".encode()
                await send({"type": "http.response.body", "body": comment, "more_body": True})
                self._last_write, self._sending_since = now, None

    @staticmethod
    async def _disconnect(receive: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
