"""The HTTP front of `serve --rpc`: it holds the public address and outlives the engine process.

llama.cpp aborts the process whose RPC client loses a server, so with rpc-servers the model is
served by a child `ms4local serve` on a private loopback port, and this process — which never
loads llama.cpp — passes requests through to it. When the child dies of that abort, the front
answers the requests in flight with an error (a 503, or an error event in a stream that has
begun), answers every new request and /health with 503 and the reason, probes the rpc-servers
every second, and starts the child again once they all answer; its /health (503 while the model
loads, 200 when ready) shows through from then on. A child that ends on its own (the model does
not load, a flag is wrong) ends the front too, with its exit code.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import RpcError
from ..rpc import Endpoint, preflight
from .sse import event, to_json

RETRY_AFTER = "5"
PROBE_EVERY = 1.0  # seconds between probes of the rpc-servers while the engine is down
# Hop-by-hop headers (RFC 9110 §7.6.1), and Host, which names the front rather than the child.
_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
        "transfer-encoding", "upgrade", "host"}


@dataclass
class EngineProcess:
    """The child `ms4local serve` and what the front knows of it."""

    start: Callable[[int], subprocess.Popen[bytes]]  # port → a started child serving 127.0.0.1:port
    endpoints: list[Endpoint]
    describe_death: Callable[[int], str]  # the child's negative return code → one line naming the lost server
    log: Callable[[str], None]
    state: str = "starting"  # up | down | stopping
    reason: str = ""
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    exit_code: int | None = None  # set when the child ended on its own: the front ends with it
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def launch(self) -> None:
        self.port = free_port()
        self.proc = self.start(self.port)
        self.state, self.reason = "up", ""
        self._signal()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _signal(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    async def watch(self, on_exit: Callable[[], None]) -> None:
        """Follow the child: restart it after an abort once the rpc-servers answer; else end the front."""
        while self.proc is not None:
            code = await asyncio.to_thread(self.proc.wait)
            if self.state == "stopping":
                return
            if code >= 0:
                self.exit_code = code
                self.state, self.reason = "stopping", "the engine process ended"
                self._signal()
                on_exit()
                return
            # The reason first, then "down": a request that saw the child go waits for the state to
            # change (wait_down) and then answers with the reason, which must be there by then.
            reason = await asyncio.to_thread(self.describe_death, code)
            if self.state == "stopping":
                return
            self.state, self.reason = "down", reason
            self._signal()
            self.log(f"ms4local: {self.reason} (until then /health and requests get 503)")
            while self.state == "down":
                try:
                    await asyncio.to_thread(preflight, self.endpoints, 2.0)
                    break
                except RpcError as e:
                    self.reason = f"{self.reason.split(' — now: ')[0]} — now: {e}"
                    await asyncio.sleep(PROBE_EVERY)
            if self.state != "down":
                return
            self.restarts += 1
            self.log(f"ms4local: the rpc-servers answer again; loading the model again (restart {self.restarts})")
            self.launch()

    @property
    def death_wait(self) -> float:
        """How long a request that saw the child go waits for the watcher's reason: the probe of
        each rpc-server (2 s at most each, a vanished host takes all of it) and a margin."""
        return 3.0 + 2.0 * len(self.endpoints)

    async def wait_down(self, timeout: float) -> None:
        """Give the watcher a moment to learn why the child went away (a request saw it first)."""
        deadline = time.monotonic() + timeout
        while self.state == "up" and time.monotonic() < deadline:
            try:
                await asyncio.wait_for(self.changed.wait(), deadline - time.monotonic())
            except asyncio.TimeoutError:
                break

    def stop(self, now: bool = False) -> None:
        """SIGTERM to the child (it finishes its requests in flight) and no restart after it; sent
        once, unless `now`: a second SIGTERM makes the child exit at once."""
        if self.state == "stopping" and not now:
            return
        if self.state == "down":
            self.proc = None  # lost before the stop, and said so: stopping now is a clean exit (0)
        self.state = "stopping"
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _unavailable(engine: EngineProcess, path: str, reason: str | None = None) -> JSONResponse:
    reason = reason or engine.reason or "the engine process is starting"
    if path == "/health":
        return JSONResponse({"status": "unavailable", "reason": reason, "restarts": engine.restarts},
                            status_code=503, headers={"Retry-After": RETRY_AFTER})
    return JSONResponse({"error": {"message": reason, "type": "server_error", "param": None, "code": "engine_unavailable"}},
                        status_code=503, headers={"Retry-After": RETRY_AFTER})


def _error_event(reason: str) -> bytes:
    body = {"error": {"message": reason, "type": "server_error", "param": None, "code": "engine_lost"}}
    return event(to_json(body)) + event("[DONE]")


def create_front(engine: EngineProcess) -> Starlette:
    """The ASGI app that passes every request through to the engine process."""
    client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0), limits=httpx.Limits(max_keepalive_connections=32))

    async def proxy(request: Request) -> Response:
        path = request.url.path
        if engine.state != "up":
            return _unavailable(engine, path)
        url = httpx.URL(scheme="http", host="127.0.0.1", port=engine.port, path=path,
                        query=request.url.query.encode())
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP]
        # The body streams through (the child enforces --max-body-size), never held here whole.
        upstream_req = client.build_request(request.method, url, headers=headers, content=request.stream())
        try:
            upstream = await client.send(upstream_req, stream=True)
        except httpx.TransportError as e:
            if isinstance(e, httpx.ConnectError) and engine.alive():
                return _unavailable(engine, path, "the engine process is starting")  # not listening yet
            await engine.wait_down(engine.death_wait)  # gone: the watcher says why
            return _unavailable(engine, path)
        streaming = upstream.headers.get("content-type", "").startswith("text/event-stream")
        out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP}

        async def body() -> AsyncIterator[bytes]:
            tail = b"\n\n"
            try:
                async for chunk in upstream.aiter_raw():
                    if chunk:
                        tail = chunk[-4:]
                        yield chunk
            except httpx.TransportError:
                await engine.wait_down(engine.death_wait)
                if streaming:  # headers are sent: the error goes into the stream, as the server's own do
                    yield (b"" if tail.endswith(b"\n\n") else b"\n\n") + _error_event(
                        engine.reason or "the engine process went away")
            finally:
                await upstream.aclose()

        return StreamingResponse(body(), status_code=upstream.status_code, headers=out_headers)

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]
    app = Starlette(routes=[Route("/{path:path}", proxy, methods=methods)])
    app.state.client = client
    return app


def run_front(engine: EngineProcess, *, host: str, port: int, public: str) -> int:
    """Serve the front on host:port until SIGTERM/SIGINT (passed on to the child) or until the child
    ends on its own; returns the exit code."""
    app = create_front(engine)
    say = engine.log

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: object) -> None:
            if engine.state != "stopping":
                say("ms4local: stopping: the engine process finishes the requests in flight (signal again to "
                    "exit now)")
                engine.stop()
            else:
                engine.stop(now=True)
            super().handle_exit(sig, frame)  # type: ignore[arg-type]

    server = Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off",
                                   timeout_keep_alive=5))

    async def main() -> None:
        engine.launch()
        say(f"ms4local: {public} answers for the engine process (restarted when an rpc-server is lost and back)")
        watcher = asyncio.create_task(engine.watch(lambda: setattr(server, "should_exit", True)))
        await server.serve()
        engine.stop()
        if engine.proc is not None:
            await asyncio.to_thread(engine.proc.wait)
        watcher.cancel()
        await app.state.client.aclose()

    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        asyncio.run(main())
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if engine.exit_code is not None:
        return engine.exit_code
    return 0 if engine.proc is None or engine.proc.returncode in (0, None) else (
        1 if engine.proc.returncode < 0 else engine.proc.returncode)
