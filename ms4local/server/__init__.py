"""`ms4local serve`: an OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn + SSE).

`serve(...)` is the library call behind the command: it starts uvicorn at once (so /health can say
503 while the model loads), loads the engine in the scheduler's thread, and on SIGTERM/SIGINT stops
taking requests, lets the accepted ones finish, then frees the model. A second signal exits now.

Needs the `server` extra (`pip install 'ms4local[server]'`); importing this package without it
raises ImportError, which the CLI turns into that one line.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable

from ..rpc import is_loopback
from .app import create_app
from .config import ServerConfig
from .image_urls import ImagePolicy
from .scheduler import Scheduler

__all__ = ["ImagePolicy", "Scheduler", "ServerConfig", "create_app", "is_loopback", "serve"]


def serve(load: Callable[[], object], config: ServerConfig, *, host: str = "127.0.0.1", port: int = 8080,
          max_queue: int = 64, log: Callable[[str], None] | None = None, public_url: str | None = None) -> None:
    """Serve until SIGTERM/SIGINT; raises the engine's load error if the model cannot be loaded.

    `load` builds the Engine (it runs in the scheduler's thread while uvicorn already answers).
    `public_url` is the address clients use when this server runs behind `serve --rpc`'s front.
    """
    import uvicorn
    from sse_starlette.sse import AppStatus

    say = log or (lambda text: print(text, file=sys.stderr, flush=True))
    # In-flight SSE streams finish on shutdown (they end with their generation); sse-starlette's
    # default would cut them at the first signal.
    AppStatus.disable_automatic_graceful_drain()
    scheduler = Scheduler(load, max_queue=max_queue, log=say)  # type: ignore[arg-type]
    app = create_app(config, scheduler)

    class Server(uvicorn.Server):
        """uvicorn's server, telling the scheduler to refuse new work once a signal arrives."""

        def handle_exit(self, sig: int, frame: object) -> None:
            if not scheduler.draining:
                scheduler.draining = True
                say("ms4local: stopping: finishing the requests in flight (signal again to exit now)")
            super().handle_exit(sig, frame)  # type: ignore[arg-type]

    server = Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on",
                                   timeout_keep_alive=5))

    def on_load_failure(error: BaseException) -> None:
        server.should_exit = True

    scheduler.on_load_failure = on_load_failure

    @app.on_event("startup")
    async def _start() -> None:
        scheduler.start()
        url = public_url or f"http://{host if ':' not in host else f'[{host}]'}:{port}"
        say(f"ms4local: serving {config.model_id} on {url}/v1 (loading the model; /health says 200 when ready)")

    @app.on_event("shutdown")
    async def _stop() -> None:
        AppStatus.should_exit = True
        scheduler.stop()

    # uvicorn re-raises the signal that stopped it once it has drained; with Python's default
    # handlers that would kill the process (SIGTERM) or raise KeyboardInterrupt (SIGINT) after a
    # clean shutdown, so both are made no-ops here and a drained server exits 0.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    scheduler.stop()
    if scheduler.load_error is not None:
        raise scheduler.load_error
